"""The real entry point under torchrun: 2 gloo ranks with half the micro-batch equal one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]
COMMON = [*TINY_MODEL, "train.steps=4", "schedule.warmup_steps=1", "optim.lr=1e-2", "logging.interval=1",
          "logging.tensorboard=false", "data.source=synthetic"]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_data_parallel_matches_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "pretrain.train", "--set", *COMMON, "train.micro_batch_size=8",
                             f"logging.run_dir={tmp_path / 'single'}"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "pretrain.train", "--set", *COMMON, "train.micro_batch_size=4",
                          f"logging.run_dir={tmp_path / 'ddp'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert ddp.returncode == 0, ddp.stderr
    a, b = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)


def test_resume_on_another_data_parallel_size_continues_the_global_stream(tmp_path, prepared):
    """2 ranks x 4 train 3 steps on shards and save; 1 rank x 8 resumes: the same 6 losses as 1 x 8 throughout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [*COMMON[:-1], "data.source=shards", f"data.path={prepared}", "model.vocab_size=512",
              "schedule.decay=constant", "eval.interval=0", "data.num_workers=1"]

    def train(run_dir: Path, steps: int, batch: int, ranks: int):
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
        proc = subprocess.run([sys.executable, *launcher, "-m", "pretrain.train", "--set", *common,
                               f"train.steps={steps}", f"train.micro_batch_size={batch}", "checkpoint.interval=3",
                               f"logging.run_dir={run_dir}"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr

    train(tmp_path / "straight", 6, 8, 1)
    train(tmp_path / "moved", 3, 4, 2)
    train(tmp_path / "moved", 6, 8, 1)
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "moved")
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
