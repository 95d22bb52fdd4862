"""Shared checks for the Function boundaries: one clear error for what a kernel cannot take."""

from __future__ import annotations

import os

import torch


def require_triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        raise RuntimeError("the Triton kernels need triton: pip install 'pretrain[triton]'") from None


def check_device(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"inputs are on different devices: {sorted(str(d) for d in devices)}")
    device = tensors[0].device
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"Triton kernels run on CUDA; on {device.type} set TRITON_INTERPRET=1 (the interpreter, "
                           "for tests) or use model.kernels = \"torch\"")


def check_dtypes(*tensors: torch.Tensor) -> None:
    allowed = (torch.float32, torch.float16, torch.bfloat16)
    for t in tensors:
        if t.dtype not in allowed:
            raise TypeError(f"unsupported dtype {t.dtype}: the kernels take float32, float16 or bfloat16")


def next_power_of_2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()
