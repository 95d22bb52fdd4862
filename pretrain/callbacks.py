"""Small pieces that ride along the training loop without living in it: each hooks the start and end of the fit
and of every step (OLMo-core's callback idea). The loop calls them; they keep their own state."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from pretrain.config import profile_range


class Callback:
    def fit_start(self, trainer) -> None:
        pass

    def step_start(self, trainer) -> None:
        pass

    def step_end(self, trainer) -> None:
        pass

    def fit_end(self, trainer) -> None:
        pass


class Heartbeat(Callback):
    """A thread printing "still in step N" while one step takes longer than ``every`` seconds: a hung collective
    shows in the log instead of silence."""

    def __init__(self, every: float):
        self.every = every
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.step_started = time.monotonic()

    def fit_start(self, trainer) -> None:
        self.stop.clear()
        self.step_started = time.monotonic()

        def beat():
            while not self.stop.wait(self.every):
                waited = time.monotonic() - self.step_started
                if waited >= self.every:
                    trainer.metrics.console(f"heartbeat: rank {trainer.dist.rank} still in step {trainer.step + 1} "
                                            f"after {waited:.0f} s", every_rank=True)

        self.thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
        self.thread.start()

    def step_start(self, trainer) -> None:
        self.step_started = time.monotonic()

    def fit_end(self, trainer) -> None:
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
            self.thread = None


class Profiler(Callback):
    """A torch profiler trace of steps ``first``..``last`` in ``RUN_DIR/profile/steps-A-B-rankR.json`` (also
    written when the run stops inside the range)."""

    def __init__(self, first: int, last: int):
        self.first, self.last = first, last
        self.profiler = None

    def step_start(self, trainer) -> None:
        if trainer.step + 1 == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if trainer.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profiler.__enter__()

    def step_end(self, trainer) -> None:
        if self.profiler is not None:
            self.profiler.step()
            if trainer.step >= self.last:
                self._finish(trainer)

    def fit_end(self, trainer) -> None:
        if self.profiler is not None:  # stopped inside the profiled range
            self._finish(trainer)

    def _finish(self, trainer) -> None:
        prof, self.profiler = self.profiler, None
        prof.__exit__(None, None, None)
        last = min(self.last, trainer.step)
        out = Path(trainer.cfg.logging.run_dir) / "profile" / f"steps-{self.first}-{last}-rank{trainer.dist.rank}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        prof.export_chrome_trace(str(partial))
        partial.replace(out)
        trainer.metrics.console(f"profiler trace of steps {self.first}-{last}: {out} (open in chrome://tracing or "
                                "ui.perfetto.dev)")


class RouterBias(Callback):
    """DeepSeek-V3's aux-loss-free balancing after each optimizer step: every MoE layer's loads of the step are
    summed over the data-parallel ranks, so the bias update is the same on every rank."""

    def __init__(self, rate: float):
        self.rate = rate

    def step_end(self, trainer) -> None:
        from pretrain import distributed
        from pretrain.models.moe import MoE, update_router_bias

        for module in trainer.raw_model.modules():
            if isinstance(module, MoE):
                load = module.load.clone()
                if trainer.dp_size > 1:
                    distributed.all_reduce_sum(load, trainer.dp_group)
                update_router_bias(module, load, self.rate)


def default_callbacks(logging_cfg, model_cfg=None) -> list[Callback]:
    """From ``[logging]``: the heartbeat (``heartbeat_s``) and the profiler (``profile_steps``); from ``[model]``:
    the MoE router bias (``moe_balance`` = bias | both)."""
    out: list[Callback] = []
    if model_cfg is not None and model_cfg.n_experts and model_cfg.moe_balance in ("bias", "both"):
        out.append(RouterBias(model_cfg.moe_bias_rate))
    if logging_cfg.heartbeat_s:
        out.append(Heartbeat(logging_cfg.heartbeat_s))
    span = profile_range(logging_cfg.profile_steps)
    if span:
        out.append(Profiler(*span))
    return out
