"""Metrics: ``RUN_DIR/metrics.jsonl`` (one object per logged step / eval), TensorBoard, W&B when configured.

Each logged step carries STEP_FIELDS plus the memory fields of ``memory_stats`` (CUDA: ``mem_allocated_gb``,
``mem_reserved_gb``, peaks since the start; CPU: ``mem_rss_gb``); each evaluation carries EVAL_FIELDS. Both also
have ``step`` and ``time`` (Unix seconds).

MFU = model FLOPs per token (``models/flops.py``) × tokens per second / (peak FLOP/s × devices). Peak is
looked up from the device name (dense bf16 tensor-core figures), set by ``logging.peak_tflops``, or measured at
the start with ``logging.measure_peak`` (a dense matmul); it is unknown, and MFU null, on CPU unless set or
measured.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pretrain.errors import missing_extra

STEP_FIELDS = ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "mfu", "step_time_s",
               "data_wait_s", "data_skipped", "skipped_updates")
EVAL_FIELDS = ("val_loss", "val_ppl", "accuracy")

# dense bf16 peak TFLOP/s by device-name fragment (vendor datasheets), most specific first
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("A10G", 125.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("V100", 125.0),
    ("MI300X", 1307.0),
)


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, tflops in PEAK_TFLOPS:
            if fragment in name:
                return tflops * 1e12
    return None


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """Dense matmul FLOP/s this device reaches (square products, 8192 on CUDA, 1024 on CPU): an MFU peak that
    reflects the clocks and power limit the device actually runs at."""
    n, iters = (8192, 20) if device.type == "cuda" else (1024, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync()
    return 2 * n**3 * iters / (time.perf_counter() - start)


def memory_stats(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"mem_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "mem_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    # ru_maxrss is KiB on Linux
    return {"mem_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class MetricsLogger:
    """Rank 0 writes; other ranks hold a logger that does nothing."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True, wandb_project: str = "",
                 config: dict | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise missing_extra("logging.wandb_project", "wandb") from None
            self.wandb = wandb.init(project=wandb_project, dir=str(self.run_dir), config=config, resume="allow")

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        self.file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):  # mfu may be None
                    self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in values.items() if v is not None}, step=step)

    def console(self, line: str, every_rank: bool = False) -> None:
        if self.enabled or every_rank:
            print(line, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of ``RUN_DIR/metrics.jsonl`` ([] and a line on stderr when there is none); a line that is
    not JSON raises ValueError naming the file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        print(f"no metrics.jsonl in {run_dir}", file=sys.stderr)
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path} line {n} is not JSON") from None
    return records


def summarize(run_dir: str | Path) -> str:
    """A few lines on how a run went: the loss curve at ten points, every evaluation and every downstream score."""
    records = read_metrics(run_dir)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    if not steps:
        return f"{run_dir}: no logged steps"
    pick = steps[:: max(1, len(steps) // 10)]
    if pick[-1] is not steps[-1]:
        pick.append(steps[-1])
    lines = [f"loss curve ({run_dir}):"]
    lines += [f"  step {r['step']:>6}  loss {r['loss']:.4f}  lr {r['lr']:.2e}" for r in pick]
    lines += [f"  eval {r['step']:>6}  val loss {r['val_loss']:.4f}  ppl {r['val_ppl']:.1f}  acc {r['accuracy']:.3f}"
              for r in evals]
    if len(evals) >= 2:
        lines.append(f"val loss {evals[0]['val_loss']:.3f} -> {evals[-1]['val_loss']:.3f}")
    for r in records:  # downstream tasks (eval.tasks): <task>_acc, <task>_acc_norm, <task>_ppl
        scores = {k: v for k, v in r.items() if k.endswith(("_acc", "_acc_norm")) or
                  (k.endswith("_ppl") and k != "val_ppl")}
        if scores:
            lines.append(f"  tasks {r['step']:>5}  " + "  ".join(f"{k} {v:.3f}" for k, v in sorted(scores.items())))
    return "\n".join(lines)
