"""Every parallel layout trains to the single-process losses and parameters (gloo, fp32, 3 steps, 1e-5):
one torchrun launch per world size runs its whole list (tests/parallel/harness.py) and the checks of that size
(context-parallel attention, the expert-parallel dispatcher)."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import ConfigError, load_config
from pretrain.parallel.dims import ParallelDims

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.parallel.harness import CHECKS, LAYOUTS, SLOW_LAYOUTS  # noqa: E402

from ..conftest import TINY_MODEL  # noqa: E402


def launch(world: int, names: list[str]) -> tuple[dict[str, str], str]:
    """One torchrun launch of the harness over ``names`` (layouts and checks): ({layout: its line}, stdout)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                           "tests/parallel/harness.py", *names], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    found = dict(re.findall(r"^LAYOUT (\S+) (.*)$", proc.stdout, re.M))
    layouts = [n for n in names if n not in CHECKS]
    assert set(found) == set(layouts), proc.stdout[-3000:] + proc.stderr[-5000:]
    return found, proc.stdout + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def launched():
    """(world, slow) -> the launch of every layout of that world size (the ``SLOW_LAYOUTS`` ones, or the others and
    the checks), once per module."""
    done = {}

    def get(world: int, slow: bool = False) -> tuple[dict[str, str], str]:
        if (world, slow) not in done:
            names = [name for name, (w, _) in LAYOUTS.items() if w == world and (name in SLOW_LAYOUTS) == slow]
            checks = [] if slow else [c for c, (worlds, _) in CHECKS.items() if world in worlds]
            done[world, slow] = launch(world, names + checks)
        return done[world, slow]

    return get


@pytest.mark.parametrize("world, slow", [(2, False), (4, False), pytest.param(2, True, marks=pytest.mark.slow),
                                         pytest.param(4, True, marks=pytest.mark.slow),
                                         pytest.param(8, False, marks=pytest.mark.slow)])
def test_layouts_match_one_process(world, slow, launched):
    lines = launched(world, slow)[0]
    assert lines
    for name, line in lines.items():
        assert line.startswith("ok "), f"{name}: {line}"


@pytest.mark.parametrize("world", [2, 4])
def test_ring_and_alltoall_attention_equal_one_process(world, launched):
    """Context-parallel attention (tests/parallel/cp_attention.py, inside the harness launch): outputs and q/k/v
    gradients within 1e-5 for MHA and GQA (kv heads fewer than cp ranks: repeated for the all-to-all), and with
    packed documents crossing the chunk borders (against the reference's dense document mask). The ring
    skips the sub-blocks the causal mask hides but every rank keeps exchanging at every step: a rank that skipped
    its send/recv with a masked block would leave its neighbour waiting until the launch's timeout."""
    out = launched(world)[1]
    lines = re.findall(r"^CPATTN (.*)$", out, re.M)
    with_triton = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
    assert len(lines) == (12 if with_triton and world == 2 else 8), out[-3000:]
    assert sum(" documents " in line for line in lines) == (3 if with_triton and world == 2 else 2)
    assert all(" ok " in line for line in lines), lines


def test_downstream_scores_under_layouts_equal_one_process(launched):
    """In-loop downstream evaluation (tests/parallel/downstream_layouts.py, inside the 2-rank harness launch): a
    multiple-choice and a last-word task under DP2, ZeRO-3, TP2 + SP, MoE EP2, PP2 (1F1B), CP2 (ring and
    all-to-all) and DeepSpeed ZeRO-3 give one process's accuracies exactly (13 items: uneven over the ranks) and
    its perplexity to 1e-6, and a training step runs after each."""
    lines = re.findall(r"^DOWNSTREAM (.*)$", launched(2)[1], re.M)
    assert len(lines) == 8 and all(line.split()[1] == "ok" for line in lines), lines


def test_expert_dispatch_equals_local_even_when_a_ranks_experts_get_no_token(launched):
    """EP2 all-to-all dispatch (tests/parallel/moe_dispatch.py, inside the 2-rank harness launch) = the local
    dispatcher (output and input gradient), also when every token goes to the other rank's experts; asking only
    for the input gradient (as a pipeline's shape inference does) must run the same all-to-alls on every rank, or
    the launch hangs until its timeout."""
    out = launched(2)[1]
    lines = re.findall(r"^MOEDISPATCH (.*)$", out, re.M)
    assert len(lines) == 2 and all(" ok " in line for line in lines), out[-3000:]


def dims(*overrides, world):
    return ParallelDims.from_config(load_config(None, ["model.n_heads=4", "model.d_model=64", *overrides]), world)


def test_dims_resolve_and_order():
    d = dims("parallel.tp=2", "parallel.dp_replicate=2", "parallel.zero_stage=3", world=8)
    assert (d.dp_replicate, d.dp_shard, d.tp, d.pp, d.dp) == (2, 2, 2, 1, 4)
    assert dims(world=4).dp_shard == 4


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.tp=2", "parallel.pp=2"], 6, "world size 6 is not divisible by dp_replicate × tp × pp = 1 × 2 × 2 = 4"),
    (["parallel.dp_shard=3"], 4, "= 3, but the world size is 4"),
    (["parallel.tp=3"], 3, "parallel.tp = 3 must divide model.n_heads (4)"),
    (["parallel.tp=2", "model.n_kv_heads=1"], 2, "must divide model.n_heads (4) and the kv heads (1)"),
    (["parallel.tp=2", "model.vocab_size=1001", "model.tie_embeddings=false"], 2, "pad it to 1024"),
    (["parallel.pp=4", "model.n_layers=2"], 4, "4 pipeline stages (pp 4 × 1 per rank) need at least as many"),
    (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "model.n_layers=3"], 2,
     "4 pipeline stages (pp 2 × 2 per rank) need at least as many layers; model.n_layers = 3"),
    (["parallel.pp=2", "parallel.pp_schedule=1f1b", "parallel.n_microbatches=1", "model.n_layers=4"], 2,
     "parallel.pp_schedule = 1f1b needs parallel.n_microbatches >= pp (2), got 1"),
    (["parallel.tp=2"], 4, "tensor parallelism with data parallelism needs FSDP: set parallel.zero_stage = 2 or 3"),
    (["parallel.tp=2", "model.arch=bert", "parallel.sequence_parallel=true"], 2, "sequence_parallel needs a GPT"),
])
def test_bad_layouts_give_one_line_before_any_process_group(overrides, world, message):
    with pytest.raises(ConfigError) as info:
        dims(*overrides, world=world)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_deepspeed_with_tp_is_refused_at_load():
    with pytest.raises(ConfigError, match="deepspeed.*pure data parallelism"):
        load_config(None, ["parallel.engine=deepspeed", "parallel.tp=2"])


def test_cli_bad_layout_exits_2(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "--set", "parallel.tp=2",
                           f"logging.run_dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: world size 3 is not divisible by dp_replicate × tp × pp = 1 × 2 × 1 = 2"]


def test_tensor_parallel_split_matches_megatron_core():
    pytest.importorskip("megatron.core")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "tests/parallel/megatron_peer.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert re.search(r"^PEER ok ", proc.stdout, re.M), proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_checkpoint_converts_like_a_native_one(tmp_path, stage):
    """ZeRO-2 / ZeRO-3 under the DeepSpeed engine on 2 ranks and one native process train the same 2 steps;
    both checkpoints consolidate to the same weights and export to Hugging Face."""
    pytest.importorskip("deepspeed")
    from pretrain.checkpoint import load_model
    from pretrain.checkpoint.hf import export_hf

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [*TINY_MODEL, "train.steps=2", "data.source=synthetic", "eval.interval=0", "checkpoint.interval=2",
              "logging.tensorboard=false", "schedule.warmup_steps=1"]
    ds = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                         "-m", "pretrain.train", "--set", *common, "train.micro_batch_size=2",
                         "parallel.engine=deepspeed", f"parallel.zero_stage={stage}", f"logging.run_dir={tmp_path / 'ds'}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert ds.returncode == 0, ds.stderr[-3000:]
    native = subprocess.run([sys.executable, "-m", "pretrain.train", "--set", *common, "train.micro_batch_size=4",
                             f"logging.run_dir={tmp_path / 'native'}"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert native.returncode == 0, native.stderr[-3000:]
    from_ds, cfg = load_model(tmp_path / "ds" / "checkpoints")
    from_native, _ = load_model(tmp_path / "native" / "checkpoints")
    assert cfg.parallel.engine == "deepspeed"
    assert max((from_ds.state_dict()[k] - v).abs().max().item() for k, v in from_native.state_dict().items()) < 1e-5
    assert (export_hf(from_ds, cfg.model, tmp_path / "hf") / "model.safetensors").is_file()


