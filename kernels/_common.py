"""Shared checks for the Function boundaries: one clear error for what a kernel cannot take."""

from __future__ import annotations

import os

import torch


def require_triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        from pretrain.errors import MissingExtra

        raise MissingExtra("the Triton kernels need triton: pip install -e '.[triton]'") from None


def check_device(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"inputs are on different devices: {sorted(str(d) for d in devices)}")
    device = tensors[0].device
    if device.type == "cuda" and not compile_only():
        current_arch()
    if device.type != "cuda" and not interpreting() and not compile_only():
        raise RuntimeError(f"Triton kernels run on CUDA; on {device.type} set TRITON_INTERPRET=1 (the interpreter, "
                           "for tests) or use model.kernels = \"torch\"")


def check_dtypes(*tensors: torch.Tensor) -> None:
    allowed = (torch.float32, torch.float16, torch.bfloat16)
    for t in tensors:
        if t.dtype not in allowed:
            raise TypeError(f"unsupported dtype {t.dtype}: the kernels take float32, float16 or bfloat16")


def nbytes(*tensors) -> int:
    """Bytes of the tensors given (None skipped): what a kernel reading or writing each once moves."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def next_power_of_2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def compile_only() -> bool:
    """True inside ``pretrain.kernels.compile_check``: launches only compile, for a target that is not this machine."""
    from triton.runtime.driver import driver

    try:
        return bool(getattr(driver.active, "compile_only", False))
    except RuntimeError:  # no GPU driver at all (a CPU machine outside the interpreter)
        return False


MIN_ARCH = 80  # tensor-core bf16, cp.async: sm_80 (A100) and newer


def current_arch() -> int:
    """The compute capability the kernels are built for (80 = sm_80); one clear error below sm_80."""
    from triton.runtime.driver import driver

    target = driver.active.get_current_target()
    if target.backend != "cuda" or not isinstance(target.arch, int):
        raise RuntimeError(f"the Triton kernels target NVIDIA GPUs, not {target.backend} {target.arch}; "
                           "use model.kernels = \"torch\"")
    if target.arch < MIN_ARCH:
        raise RuntimeError(f"the Triton kernels need sm_{MIN_ARCH} (A100) or newer, this GPU is sm_{target.arch}; "
                           "use model.kernels = \"torch\"")
    return target.arch


def seq_bucket(t: int) -> int:
    """Autotuning key for a sequence length: the next power of two, 256 at least (nearby lengths share a pick)."""
    return max(256, next_power_of_2(t))


def autotuned(table: dict, choose, key: list[str], interpreter_config):
    """``triton.autotune`` over the candidate lists in ``table`` (a dict of lists of ``triton.Config``).

    Per call, ``choose(arch, named_args, kwargs)`` names the list for this target and shape, so only configs that
    the compile gate (``pretrain.kernels.compile_check``) has seen for that target are timed. The interpreter cannot time
    candidates: there, ``interpreter_config`` alone is used.
    """
    import triton

    if interpreting():
        return triton.autotune(configs=[interpreter_config], key=key)
    union = list(dict.fromkeys(c for configs in table.values() for c in configs))

    def prune(configs, named_args, **kwargs):
        return table[choose(current_arch(), named_args, kwargs)]

    return triton.autotune(configs=union, key=key, prune_configs_by={"early_config_prune": prune})
