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


class MoEBalance(Callback):
    """After each step, for the MoE layers: their step totals (routed slots per expert, Σ aux and z terms, tokens,
    dropped slots) summed over the data-parallel ranks — and over the pipeline stages, each holding its own
    layers — in one all-reduce; DeepSeek-V3's aux-loss-free bias updated from the summed loads (``moe_balance`` =
    bias | both; the same on every rank, skipped with a skipped update); the step's metrics for the log:
    ``moe_aux_loss``, ``moe_z_loss`` (coefficient · Σ over layers of the per-token means), ``moe_max_load`` (the
    busiest expert over the mean, worst layer) and ``moe_max_load.{layer}``, ``moe_dropped`` (share of slots over
    capacity), ``moe_bias_min`` / ``moe_bias_max``."""

    def __init__(self, model_cfg):
        self.cfg = model_cfg
        self.bias = model_cfg.moe_balance in ("bias", "both")

    def step_end(self, trainer) -> None:
        from pretrain import distributed
        from pretrain.models.moe import update_router_bias

        layers, e = trainer.moe_layers, self.cfg.n_experts
        # one row a block: the model's and the multi-token-prediction depths' (indices n_layers + j)
        table = torch.zeros(self.cfg.n_layers + self.cfg.mtp_depth, e + 6, dtype=torch.float64, device=trainer.device)
        for m in layers:  # [loads..., Σaux, Σz, tokens, dropped, bias min, bias max (dp rank 0 only)]
            table[m.index, :e + 4] = torch.cat([m.load, m.totals]).to(torch.float64)
            if trainer.parallel.grad_rank == 0:
                bias = m.gate.e_score_correction_bias
                table[m.index, e + 4:] = torch.stack([bias.min(), bias.max()]).to(torch.float64)
        if trainer.grad_ranks > 1:
            distributed.all_reduce_sum(table, trainer.grad_group)
        if trainer.parallel.pp_group() is not None:
            distributed.all_reduce_sum(table, trainer.parallel.pp_group())
        if self.bias and trainer.nonfinite_in_a_row == 0:
            for m in layers:
                update_router_bias(m, table[m.index, :e], self.cfg.moe_bias_rate)
        for m in layers:
            m.clear_step()
        rows = table[self.cfg.moe_dense_layers:]
        load, (aux, z, tokens, dropped, low, high) = rows[:, :e], rows[:, e:].unbind(1)
        ratio = load.max(1).values / load.mean(1).clamp(min=1e-9)
        aux_coef = self.cfg.moe_aux_coef if self.cfg.moe_balance in ("aux_loss", "both") else 0.0
        per_token = tokens.clamp(min=1)
        out = {"moe_aux_loss": float(aux_coef * (aux / per_token).sum()),
               "moe_z_loss": float(self.cfg.moe_z_coef * (z / per_token).sum()),
               "moe_max_load": float(ratio.max()), "moe_dropped": float(dropped.sum() / load.sum().clamp(min=1)),
               "moe_bias_min": float(low.min()), "moe_bias_max": float(high.max())}
        out.update({f"moe_max_load.{self.cfg.moe_dense_layers + i}": float(r) for i, r in enumerate(ratio)})
        trainer.step_metrics.update(out)


class MemoryCheck(Callback):
    """At the second step of a CUDA run: the planner's predicted bytes per GPU (``pretrain.plan.memory``) against
    the peak this rank allocated, as a log line and ``mem_predicted_gb`` / ``mem_measured_gb`` in the step's
    metrics, so every GPU run checks the memory model. ``measure`` (tests) replaces the CUDA reading."""

    STEP = 2

    def __init__(self, measure=None):
        self.measure = measure

    def step_end(self, trainer) -> None:
        if trainer.step != self.STEP:
            return
        if self.measure is None and trainer.device.type != "cuda":
            return
        import torch

        from pretrain.plan.memory import estimate_memory

        predicted = estimate_memory(trainer.cfg, trainer.dist.world_size).total_bytes / 2**30
        measured = (self.measure() if self.measure else torch.cuda.max_memory_allocated(trainer.device)) / 2**30
        trainer.step_metrics.update({"mem_predicted_gb": round(predicted, 3), "mem_measured_gb": round(measured, 3)})
        trainer.metrics.console(f"memory at step {self.STEP}: predicted {predicted:.2f} GiB per GPU, measured peak "
                                f"{measured:.2f} GiB on rank {trainer.dist.rank} ({100 * (predicted / measured - 1):+.0f} %)"
                                if measured else f"memory at step {self.STEP}: predicted {predicted:.2f} GiB per GPU")


def default_callbacks(logging_cfg, model_cfg=None) -> list[Callback]:
    """From ``[logging]``: the heartbeat (``heartbeat_s``) and the profiler (``profile_steps``); from ``[model]``:
    the MoE layers' balancing and statistics."""
    out: list[Callback] = []
    if model_cfg is not None and model_cfg.n_experts:
        out.append(MoEBalance(model_cfg))
    if logging_cfg.heartbeat_s:
        out.append(Heartbeat(logging_cfg.heartbeat_s))
    span = profile_range(logging_cfg.profile_steps)
    if span:
        out.append(Profiler(*span))
    out.append(MemoryCheck())  # acts on CUDA only
    return out
