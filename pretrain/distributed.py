"""Process-group set-up from torchrun's or SLURM's environment, and the device choice.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. ``srun`` without torchrun sets
SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; the master is then the first host of SLURM_JOB_NODELIST (expanded
by ``scontrol show hostnames``) and the port is derived from the job id. CUDA present -> nccl, one GPU per
local rank; otherwise gloo on CPU.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a plain tensor as it is): what in-place updates and kernels work on."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole on every rank (a replicated one made plain; a plain tensor as it is)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int, least: int = 0) -> int:
    """The first of ``names`` set in the environment, as an int >= ``least``; ConfigError naming it otherwise."""
    for name in names:
        if os.environ.get(name):
            text = os.environ[name].strip()
            if not text.isdigit() or int(text) < least:
                from pretrain.errors import ConfigError

                raise ConfigError(f"{name} = {os.environ[name]!r} is not a whole number >= {least} (the launcher's "
                                  "environment: torchrun, srun or your own)")
            return int(text)
    return default


def _slurm_master() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0]


def choose_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device = cuda but no CUDA device is visible")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launched_world_size() -> int:
    """How many processes the launcher started (torchrun's WORLD_SIZE or srun's SLURM_NTASKS), read before any
    process group exists so a bad layout fails at once."""
    if "WORLD_SIZE" in os.environ:
        return _env_int("WORLD_SIZE", default=1, least=1)
    if "SLURM_PROCID" in os.environ:
        return _env_int("SLURM_NTASKS", default=1, least=1)
    return 1


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join the process group the launcher describes (no-op for a single process)."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:  # srun, one task per device
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ.setdefault("MASTER_ADDR", _slurm_master())
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
    rank = _env_int("RANK", default=0)
    world_size = _env_int("WORLD_SIZE", default=1, least=1)
    local_rank = _env_int("LOCAL_RANK", default=0)
    if rank != 0:  # every rank runs the same code: its Python warnings are rank 0's, printed there once
        import warnings

        for category in (UserWarning, FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
    dev = choose_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    return DistInfo(rank, world_size, local_rank, dev)


def all_reduce_sum(value: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over ``group`` (default: every rank) in place; a no-op without a process group."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value


def all_reduce_min(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
