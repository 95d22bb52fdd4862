"""A stop signal saves and exits with the requeue code, and the run resumes from there; non-finite steps skip
their update and abort the run after ``train.max_nonfinite_steps`` in a row."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.distributed import DistInfo
from pretrain.train import build_trainer
from pretrain.trainer import PREEMPTED_EXIT, TrainingError

from .conftest import TINY_MODEL, tiny_config

ROOT = Path(__file__).resolve().parents[1]
COMMON = [*TINY_MODEL, "train.micro_batch_size=4", "data.source=synthetic", "eval.interval=0", "logging.interval=1",
          "logging.tensorboard=false", "schedule.warmup_steps=1"]


def test_stop_signal_saves_exits_75_and_resumes(tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "pretrain.train", "--set", *COMMON, "train.steps=100000", f"logging.run_dir={run}"]
    proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT, out
    latest = (run / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("-")[1])
    assert step >= 3 and f"saved checkpoint {run / 'checkpoints' / latest} at step {step}" in out
    resumed = subprocess.run([sys.executable, "-m", "pretrain.train", "--set", *COMMON, f"train.steps={step + 2}",
                              f"logging.run_dir={run}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run / 'checkpoints' / latest} at step {step}" in resumed.stdout + resumed.stderr


def test_nonfinite_step_is_skipped_then_k_in_a_row_abort(tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=6", "train.max_nonfinite_steps=2", "eval.interval=0")
    trainer = build_trainer(cfg, DistInfo())
    real_loss = trainer.task.loss
    poisoned = {2}

    class Task:
        count = staticmethod(trainer.task.count)

        @staticmethod
        def loss(model, batch, accuracy=True):
            out = real_loss(model, batch, accuracy)
            if trainer.step + 1 in poisoned:
                out.loss_sum = out.loss_sum * float("nan")
            return out

    trainer.task = Task()
    trainer.fit(stop_after=1)
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    trainer.fit(stop_after=2)  # step 2 is non-finite: no update
    assert all(torch.equal(before[k], v) for k, v in trainer.raw_model.state_dict().items())
    assert trainer.skipped_updates == 1 and math.isnan(trainer.losses[-1])
    trainer.fit(stop_after=3)  # a good step updates again
    assert not all(torch.equal(before[k], v) for k, v in trainer.raw_model.state_dict().items())
    poisoned.update({4, 5})  # two in a row: the run stops with one clear line
    with pytest.raises(TrainingError) as info:
        trainer.fit(stop_after=6)
    assert str(info.value) == ("loss or gradient norm non-finite for 2 steps in a row (up to step 5): lower "
                               "optim.lr or check the data")


def test_runaway_learning_rate_aborts_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "--set", *COMMON, "train.steps=50",
                           "optim.lr=1e30", "optim.min_lr=0", "optim.grad_clip=0", "train.max_nonfinite_steps=3",
                           f"logging.run_dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 3, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: loss or gradient norm non-finite for 3 steps in a row")
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["skipped_updates"] >= 2


def test_heartbeat_shows_a_long_step(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "train.steps=2", "eval.interval=0", "logging.heartbeat_s=0.2")
    trainer = build_trainer(cfg, DistInfo())
    step = trainer.train_step

    def slow_step():
        time.sleep(0.7)  # a stuck collective, as the log would see it
        return step()

    trainer.train_step = slow_step
    trainer.fit()
    beats = [line for line in capsys.readouterr().out.splitlines() if line.startswith("heartbeat:")]
    assert beats and beats[0].startswith("heartbeat: rank 0 still in step 1 after")


def test_injected_nan_steps_are_skipped_like_real_ones(tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=4", "eval.interval=0", "train.inject_nan_steps=[2]")
    trainer = build_trainer(cfg, DistInfo())
    trainer.fit(stop_after=1)
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    trainer.fit(stop_after=2)
    assert all(torch.equal(before[k], v) for k, v in trainer.raw_model.state_dict().items())
    trainer.fit()
    assert trainer.skipped_updates == 1 and math.isnan(trainer.losses[1])
    assert all(math.isfinite(x) for i, x in enumerate(trainer.losses) if i != 1)


@pytest.mark.parametrize("value, message", [
    ("[0]", "train.inject_nan_steps must be a list of step numbers >= 1, got [0]"),
    ('["a"]', "train.inject_nan_steps must be a list of step numbers >= 1, got ['a']"),
    ("3", "train.inject_nan_steps expects list, got int 3"),
])
def test_bad_nan_drill_is_one_line(tmp_path, value, message):
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "--set", *COMMON,
                           f"train.inject_nan_steps={value}", f"logging.run_dir={tmp_path / 'run'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {message}"
    assert not (tmp_path / "run").exists()


def test_check_validates_the_layout_for_the_launched_world(tmp_path):
    def check(world, *extra):
        env = {**os.environ, "WORLD_SIZE": str(world)}
        return subprocess.run([sys.executable, "-m", "pretrain.train", "--config", "configs/gpt_7b.toml", "--check",
                               "--set", f"logging.run_dir={tmp_path / 'run'}", *extra], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    ok = check(64)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("config ok: configs/gpt_7b.toml, 64 processes = dp_replicate 1 × dp_shard 64 × "
                                "tp 1 × pp 1")
    bad = check(6, "parallel.tp=4")
    assert bad.returncode == 2 and bad.stderr.strip() == ("error: world size 6 is not divisible by dp_replicate × "
                                                          "tp × pp = 1 × 4 × 1 = 4")
    assert not (tmp_path / "run").exists()  # nothing started, nothing written
