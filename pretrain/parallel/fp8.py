"""FP8 training (``train.fp8``): the model's ``nn.Linear`` layers swapped for torchao's ``Float8Linear``.

Each converted matmul (forward, grad-input, grad-weight) casts both operands to float8 with a dynamic scale
(``tensorwise``: one amax per tensor, e4m3 forward and e5m2 gradients; ``rowwise``: one amax per row, e4m3
throughout, power-of-two scales) and multiplies in FP8 tensor cores; parameters, gradients, optimizer state and
checkpoints stay in the master dtype, so an FP8 run resumes as bf16 and the other way, and HF export is unchanged.

The conversion runs first in ``parallelize`` — before tensor parallelism, whose input/output hooks live on the
module objects the swap replaces (torchtitan converts at the same point), and before FSDP. What FP8 hurts is left
in high precision: the output heads, the first and last ``train.fp8_keep_edge_blocks`` blocks, any layer named by
``train.fp8_exclude`` (fnmatch patterns on the module's name, e.g. ``"layers.*.self_attn.o_proj"``), and any layer
whose dimensions are not multiples of 16 (what the FP8 GEMMs take). MoE routers and grouped experts are not
``nn.Linear`` and stay in high precision.

Devices: CUDA with FP8 tensor cores (compute capability >= 8.9: H100, H200, B200, L40S) runs ``torch._scaled_mm``;
elsewhere (CPU, the tests) torchao's emulation computes the same casts and scales with fp32 matmuls.

FSDP's float8 all-gather (``train.fp8_all_gather``: the weights travel as float8, half the bytes) needs NCCL:
gloo cannot send float8 tensors, and a failed attempt leaves its process group broken. ``auto`` turns it on
where it can work (tensorwise, FSDP-sharded, NCCL) and says in one line why it is off otherwise.
"""

from __future__ import annotations

import fnmatch
import logging

import torch
import torch.nn as nn

from pretrain.config import Config, ConfigError

log = logging.getLogger(__name__)

HEADS = ("lm_head", "mlm_head.*", "pooler", "nsp_head")  # output heads: left out always
MIN_CAPABILITY = (8, 9)


def _torchao():
    """torchao's float8 training API (imported lazily: the ``fp8`` extra)."""
    quiet = logging.getLogger("torchao")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it warns about every prebuilt kernel library this machine cannot load
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise ConfigError("train.fp8 needs torchao: pip install -e '.[fp8]'") from None
    finally:
        quiet.setLevel(level)
    return Float8LinearConfig, convert_to_float8_training


def emulated(device: torch.device) -> bool:
    """Whether FP8 matmuls are emulated here; refuses a GPU without FP8 tensor cores."""
    if device.type != "cuda":
        return True
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        raise ConfigError(f"train.fp8 needs FP8 tensor cores (compute capability >= 8.9: H100, H200, B200, L40S); "
                          f"this GPU is sm_{cap[0]}{cap[1]}: set train.fp8 = \"none\"")
    return False


def all_gather_in_fp8(cfg: Config, backend: str, fsdp: bool) -> bool:
    """Whether FSDP gathers the converted weights as float8: ``on`` refused (one line) where it cannot work,
    ``auto`` on where it can, with one log line naming why it is off on a sharded run."""
    choice, recipe = cfg.train.fp8_all_gather, cfg.train.fp8
    if recipe == "none" or choice == "off":
        return False
    why = None
    if recipe != "tensorwise":
        why = f'it gathers tensorwise-scaled weights; train.fp8 = "{recipe}" scales each row'
    elif not fsdp:
        why = "nothing is FSDP-sharded in this layout (parallel.zero_stage < 2 or one data-parallel rank)"
    elif backend != "nccl":
        why = f"the {backend} backend cannot send float8 tensors (NCCL only)"
    if why is None:
        return True
    if choice == "on":
        raise ConfigError(f"train.fp8_all_gather = \"on\" cannot work here: {why}")
    if fsdp:
        log.info("fp8: FSDP all-gathers weights in high precision: %s", why)
    return False


def convertible(cfg: Config):
    """``(module, name) -> bool``: True for a Linear to convert to FP8 (not a head, an edge block, an excluded
    name or a shape the FP8 GEMMs cannot take)."""
    t, n = cfg.train, cfg.model.n_layers
    edge = {str(i) for i in [*range(min(t.fp8_keep_edge_blocks, n)), *range(max(n - t.fp8_keep_edge_blocks, 0), n)]}
    patterns = [*HEADS, *t.fp8_exclude]

    def convert(module: nn.Module, name: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if module.in_features % 16 or module.out_features % 16:
            return False
        parts = name.split(".")
        if len(parts) > 1 and parts[0] == "layers" and parts[1] in edge:
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in patterns)

    return convert


def converts_nothing(cfg: Config, converted: int) -> str:
    """The one line for a ``train.fp8`` that converts no Linear layer of a whole model ("" when it converts some)."""
    if converted or cfg.train.fp8 == "none" or cfg.parallel.pp > 1:  # a pipeline stage may hold only edge blocks
        return ""
    t = cfg.train
    return (f"train.fp8 = {t.fp8!r} converts no Linear layer of this model: of its {cfg.model.n_layers} blocks "
            f"train.fp8_keep_edge_blocks = {t.fp8_keep_edge_blocks} keeps the first and last ones in high precision, "
            f"train.fp8_exclude {t.fp8_exclude or '[]'} the matching ones, and FP8 GEMMs need both dims multiples of "
            '16; set train.fp8 = "none" or convert some layers')


def convertible_count(cfg: Config) -> int:
    """Linear layers ``train.fp8`` would convert in the whole model (built on the meta device)."""
    from pretrain.models import build_model

    with torch.device("meta"):
        model = build_model(cfg.model)
    convert = convertible(cfg)
    return sum(convert(module, name) for name, module in model.named_modules())


def apply_fp8(model: nn.Module, cfg: Config, device: torch.device, all_gather: bool = False) -> int:
    """Swap the eligible Linear layers of ``model`` (whole, unsharded, possibly on meta) for Float8Linear in place;
    returns how many were converted."""
    recipe = cfg.train.fp8
    if recipe == "none":
        return 0
    Float8LinearConfig, convert_to_float8_training = _torchao()
    import dataclasses

    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulated(device),
                                 enable_fsdp_float8_all_gather=all_gather)
    convert = convertible(cfg)
    names = [name for name, module in model.named_modules() if convert(module, name)]
    if names:
        convert_to_float8_training(model, module_filter_fn=convert, config=config)
    return len(names)
