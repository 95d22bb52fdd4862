"""What a user reads: metrics fields (documented, all present), MFU with a measured peak, the profiler trace, the
plot tool, and the GPU check's dry run."""

import csv
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import ConfigError, load_config
from pretrain.distributed import DistInfo
from pretrain.metrics import EVAL_FIELDS, STEP_FIELDS, MetricsLogger
from pretrain.train import build_trainer

from .conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def train(tmp_path, *extra, name="run"):
    cfg = tiny_config(tmp_path, "logging.interval=1", "eval.interval=3", "eval.steps=1", "train.steps=6",
                      f"logging.run_dir={tmp_path / name}", *extra)
    trainer = build_trainer(cfg, DistInfo())
    try:
        trainer.fit()
    finally:
        trainer.metrics.close()
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return trainer, rows


def test_every_documented_field_is_logged_and_documented(tmp_path):
    _, rows = train(tmp_path)
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert len(steps) == 6 and [r["step"] for r in evals] == [0, 3, 6]
    for r in steps:
        assert set(r) == {"step", "time", *STEP_FIELDS, "mem_rss_gb"}
        assert r["step_time_s"] > 0 and 0 <= r["data_wait_s"] < r["step_time_s"]
        assert r["tokens_per_s_per_device"] == r["tokens_per_s"]  # one device
    assert all(set(r) == {"step", "time", *EVAL_FIELDS} for r in evals)
    readme = (ROOT / "README.md").read_text()
    missing = [f for f in (*STEP_FIELDS, *EVAL_FIELDS, "mem_allocated_gb", "mem_reserved_gb", "mem_rss_gb")
               if f"`{f}`" not in readme]
    assert not missing, f"README does not document {missing}"


def test_measured_peak_gives_an_mfu_on_cpu(tmp_path, capsys):
    trainer, rows = train(tmp_path, "logging.measure_peak=true")
    assert "MFU peak: measured" in capsys.readouterr().out
    peak = trainer.peak
    assert 1e8 < peak < 1e14  # a CPU's dense fp32 matmul rate
    for r in (r for r in rows if "loss" in r):
        assert r["mfu"] == pytest.approx(trainer.flops_per_token * r["tokens_per_s"] / peak, rel=1e-9)
        assert 0 < r["mfu"] < 1.5


def test_profile_steps_writes_a_trace_of_those_steps(tmp_path, capsys):
    train(tmp_path, "logging.profile_steps=2-3")
    trace = tmp_path / "run" / "profile" / "steps-2-3-rank0.json"
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert "aten::mm" in names or "aten::addmm" in names  # the model's matmuls were recorded
    assert f"profiler trace of steps 2-3: {trace}" in capsys.readouterr().out
    assert not list(trace.parent.glob("*.partial"))


def test_profile_stopped_early_still_writes(tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=6", "eval.interval=0", "logging.profile_steps=2-5")
    trainer = build_trainer(cfg, DistInfo())
    trainer.fit(stop_after=3)  # as a preempted run stops
    assert (tmp_path / "run" / "profile" / "steps-2-3-rank0.json").is_file()


@pytest.mark.parametrize("value", ["x", "0-2", "5-3", "2-", "-3"])
def test_bad_profile_steps_is_one_line(tmp_path, value):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"logging.profile_steps={value}"])
    assert str(info.value) == f'logging.profile_steps must be "A-B" or "A" with 1 <= A <= B, got {value!r}'


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_runs_overlaid(tmp_path):
    train(tmp_path, name="a")
    train(tmp_path, "optim.lr=5e-3", name="b")
    out = tmp_path / "plot.png"
    done = subprocess.run([sys.executable, "tools/plot_metrics.py", str(tmp_path / "a"), str(tmp_path / "b"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {out} (a: 6 steps, b: 6 steps)"
    width, height = _png_size(out)
    assert width >= 800 and height >= 600 and out.stat().st_size > 20_000


def test_plot_kernel_csvs(tmp_path):
    fields = ["device", "commit", "date", "op", "shape", "impl", "dtype", "ms", "tflops", "gbs"]
    for name, scale in (("h100", 1.0), ("h200", 0.8)):
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for impl, ms in (("triton", 1.0), ("sdpa_flash", 1.2)):
                writer.writerow({"device": name, "commit": "abc", "date": "2026-11-29", "op": "attention",
                                 "shape": "b1h16s4096d128", "impl": impl, "dtype": "bfloat16", "ms": ms * scale,
                                 "tflops": 100, "gbs": 1})
    out = tmp_path / "k.png"
    done = subprocess.run([sys.executable, "tools/plot_metrics.py", str(tmp_path / "h100.csv"),
                           str(tmp_path / "h200.csv"), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "h100: 2 rows, h200: 2 rows" in done.stdout and _png_size(out)[0] > 0


@pytest.mark.parametrize("args, message", [
    (["RUN"], "error: {tmp}/RUN has no metrics.jsonl (is it a run directory?)"),
    (["RUN", "--out-suffix"], "error: --out {tmp}/plot.jpg must end in .png"),
    (["BAD"], "error: {tmp}/BAD/metrics.jsonl line 2 is not JSON"),
    (["CSV"], "error: {tmp}/x.csv is not a kernel benchmark CSV (needs columns op, shape, impl, ms)"),
])
def test_plot_bad_input_is_one_line(tmp_path, args, message):
    (tmp_path / "BAD").mkdir()
    (tmp_path / "BAD" / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n')
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    paths = {"RUN": str(tmp_path / "RUN"), "BAD": str(tmp_path / "BAD"), "CSV": str(tmp_path / "x.csv")}
    out = tmp_path / ("plot.jpg" if "--out-suffix" in args else "plot.png")
    cmd = [sys.executable, "tools/plot_metrics.py", *[paths[a] for a in args if a in paths], "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == message.format(tmp=tmp_path)
    assert not out.exists()


def test_wandb_missing_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails as if not installed
    with pytest.raises(RuntimeError) as info:
        MetricsLogger(tmp_path, wandb_project="p", tensorboard=False)
    assert "pip install -e '.[wandb]'" in str(info.value)


@pytest.mark.slow  # ~30 s alone, ~90 s beside the rest of the suite: CI runs it
def test_gpu_check_dry_run_passes_on_cpu_with_only_python3(tmp_path):
    """The GPU image may have only ``python3``: with no ``python`` on PATH the check finds python3. The dry run
    validates every step's config, that no training step can leave a checkpoint under OUT, and the meter."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    path = os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])
    if shutil.which("python", path=path):
        pytest.skip("this machine has a python on /usr/bin or /bin")
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"} | {"PATH": path}
    done = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run", "--out", str(tmp_path / "gc")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "dry run ok"
    steps = ("facts", "gpu_tests", "train_triton", "train_torch", "train_fp8", "hf_triton", "meter", "gpt7b_bf16",
             "gpt7b_fp8", "bench_kernels", "bench_docs", "train_deepseek", "hf_torch", "train_compiled")
    for step in steps:
        assert any(line.split()[:1] == [step] for line in lines), step
    assert not any(line.split()[:1] == ["compile_gate"] for line in lines)  # CPU work: never on the loan
    assert sum(line.startswith("ok    ") for line in lines) == 14
    assert f"ok    python: {bin_dir / 'python3'}" in lines
    assert "ok    checkpoints outside OUT: checkpoints outside OUT in all 7 training steps" in lines
    assert not (tmp_path / "gc").exists()  # a dry run writes nothing


def test_gpu_check_rule_catches_a_checkpoint_under_out(tmp_path):
    out = tmp_path / "gc"
    inside = f"--config configs/gpt_1b.toml --set train.steps=2 logging.run_dir={out}/train"
    outside = f"--config configs/gpt_1b.toml --set checkpoint.dir={tmp_path}/elsewhere logging.run_dir={out}/train"
    done = subprocess.run([sys.executable, "tools/gpu_report.py", "--checkpoints-outside", str(out), outside,
                           inside], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout.strip() == f"checkpoints would land in OUT: {out}/train/checkpoints"


def test_gpu_check_config_checks_fail_on_a_bad_config():
    """The dry run's config checks (one process for all): a refused config is a FAIL line and exit 1, the others
    still checked."""
    done = subprocess.run([sys.executable, "tools/gpu_report.py", "--check-configs",
                           "bad|--set model.n_heads=3 model.d_model=32", "good|--set model.n_layers=2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    lines = done.stdout.splitlines()
    assert done.returncode == 1, done.stdout + done.stderr
    assert lines[0] == "FAIL  bad: error: model.d_model (32) must be divisible by model.n_heads (3), or set model.head_dim"
    assert lines[1].startswith("ok    good: predicted memory per GPU")


def test_gpu_check_refuses_without_a_gpu(tmp_path):
    if subprocess.run(["bash", "-c", "nvidia-smi -L"], capture_output=True).returncode == 0:
        pytest.skip("this machine has a GPU")
    done = subprocess.run(["bash", "tools/gpu_check.sh", "--out", str(tmp_path / "gc")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: no NVIDIA GPU here (nvidia-smi -L failed); on CPU use --dry-run"


def test_console_rates_durations_and_the_eta_window():
    from pretrain.trainer import ETA_WINDOW_STEPS, duration, rate

    assert [rate(x) for x in (0.4, 512, 1234, 12_345, 2_500_000)] == ["0", "512", "1.23k", "12.3k", "2.50M"]
    assert [duration(x) for x in (0.2, 42, 425, 11_220)] == ["0s", "42s", "7m05s", "3h07m"]
    assert ETA_WINDOW_STEPS >= 100


def test_the_banner_says_what_the_run_is(tmp_path, capsys):
    from pretrain.train import main

    assert main(["--set", "train.steps=1", "logging.interval=1", "model.head_dim=32", "model.n_kv_heads=2",
                 f"logging.run_dir={tmp_path / 'run'}", "logging.tensorboard=false"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("pretrain: gpt/llama ") and "4 heads of 32 (2 kv)" in first
    assert "1,024 tokens a step (8 × 128 × accum 1 × dp 1), 1 steps from scratch" in first
    assert "1 process = dp_replicate 1 × dp_shard 1 × tp 1 × pp 1 | cpu, fp32, torch kernels" in first
