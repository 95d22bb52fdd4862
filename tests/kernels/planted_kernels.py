"""Kernels the compile gate must refuse (tests/kernels/test_compile_gate.py): each is fine in the interpreter."""

import torch
import triton
import triton.language as tl

PLAIN_NEG = -1.0e30  # a plain float global: the interpreter reads it, no real target compiles it


@triton.jit
def _plain_global_kernel(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < N, other=PLAIN_NEG)
    tl.store(Y + offs, x, mask=offs < N)


@triton.jit
def _big_tiles_kernel(A, B, C, K, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """256 × 128 + 128 × 256 tiles of 16-bit operands, pipelined 4 deep: ~512 KiB of shared memory."""
    rows = tl.arange(0, BLOCK)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(A + rows[:, None] * K + (k + ks)[None, :])
        b = tl.load(B + (k + ks)[:, None] * BLOCK + rows[None, :])
        acc += tl.dot(a, b)
    tl.store(C + rows[:, None] * BLOCK + rows[None, :], acc)


def plain_global(dtype):
    x = torch.zeros(64, dtype=dtype)
    _plain_global_kernel[(1,)](x, torch.empty_like(x), 64, BLOCK=64)


def big_tiles(dtype):
    a = torch.zeros(256, 1024, dtype=dtype)
    b = torch.zeros(1024, 256, dtype=dtype)
    _big_tiles_kernel[(1,)](a, b, torch.empty(256, 256), 1024, BLOCK=256, BLOCK_K=128, num_warps=8, num_stages=4)


CASES = [("planted plain global", plain_global, ("bf16",)), ("planted big tiles", big_tiles, ("bf16",))]
