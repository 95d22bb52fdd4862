"""RoPE's inverse frequencies, plain or scaled for a longer context (``model.rope_scaling``).

Computed once, in fp32, into the rotary tables every kernel reads (torch or Triton RoPE, context-parallel
chunks indexing them by true position), so scaling costs nothing per step:

- ``linear`` (position interpolation, Chen et al. 2023): every frequency divided by ``factor``.
- ``llama3`` (Llama 3.1+): wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are
  divided by ``factor``, those shorter than ``… / high_freq_factor`` kept, those between blended linearly in
  ``original / wavelength``.
- ``yarn`` (Peng et al. 2023): per frequency, a ramp between interpolation (÷ factor) and extrapolation over the
  dimensions whose rotation count at ``original_max_position_embeddings`` lies between ``beta_slow`` and
  ``beta_fast``; cos and sin are multiplied by ``attention_factor`` (default 0.1·ln(factor) + 1, or the ratio of
  the two ``mscale`` terms when both are given).

The formulas are the published ones, written to give the same numbers as Hugging Face's rope initialisers for
these types (tests compare them to 1e-7).
"""

from __future__ import annotations

import math

import torch


def plain_inverse_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """theta^(-2i/E) for i < E/2, fp32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None = None,
                        device=None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (E/2,) fp32, the factor cos and sin are multiplied by) for ``model.rope_scaling``
    (validated by ``config.check_rope_scaling``)."""
    inv = plain_inverse_frequencies(head_dim, theta, device)
    if not scaling:
        return inv, 1.0
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "llama3":
        original = scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelength = 2 * math.pi / inv
        scaled = torch.where(wavelength > original / low, inv / factor, inv)
        blend = (original / wavelength - low) / (high - low)
        smoothed = (1 - blend) * scaled / factor + blend * scaled
        between = (wavelength >= original / high) & (wavelength <= original / low)
        return torch.where(between, smoothed, scaled), 1.0
    if kind == "yarn":
        original = scaling["original_max_position_embeddings"]
        attention = scaling.get("attention_factor")
        if attention is None:
            mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attention = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all) if mscale and mscale_all
                         else yarn_mscale(factor))

        def dimension(rotations):  # the dimension whose frequency turns ``rotations`` times over ``original``
            return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = dimension(scaling.get("beta_fast") or 32), dimension(scaling.get("beta_slow") or 1)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, head_dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - lo) / (hi - lo)).clamp(0, 1)
        extrapolate = 1 - ramp  # 1: keep the frequency, 0: divide it by factor
        return inv / factor * (1 - extrapolate) + inv * extrapolate, float(attention)
    raise ValueError(f"unknown rope_type {kind!r}")
