"""Rotary position embedding tables for Llama-family models.

The table layout is what `kernels.ops.rope_kv_write` expects: ``cos_sin[p]`` holds the
``D/2`` cosines of position ``p`` followed by its ``D/2`` sines (fp32). Rotation is the
neox / ``rotate_half`` style of HF Llama, so only one half of each is stored.

The inverse frequencies and the angles are computed with the same operations, in the same
order and precision, as ``transformers`` (``_compute_default_rope_parameters``,
``_compute_llama3_parameters`` and ``LlamaRotaryEmbedding.forward``) so the tables agree
with it bit for bit on the same device.

Supported scalings: none (``rope_scaling`` null or ``rope_type: default``), ``linear`` and
``llama3``. Anything else is a clear error rather than a silently wrong model. The settings
themselves (theta, scaling, either config layout) are read once, by
`servesim.sim.specs.rope_settings`; this module only computes the tables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..sim.specs import DEFAULT_ROPE_THETA, rope_type

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(head_dim: int, rope_theta: float = DEFAULT_ROPE_THETA,
                  rope_scaling: Mapping[str, Any] | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` (fp32), as transformers computes them."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope: head_dim must be a positive even number, got {head_dim}")
    kind = rope_type(rope_scaling)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_scaling and float(rope_scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("rope: partial_rotary_factor != 1 is not supported for Llama models")
    dim = head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    inv_freq = 1.0 / (rope_theta ** exponents)
    if kind == "default":
        return inv_freq
    try:
        factor = float(rope_scaling["factor"])
    except KeyError:
        raise ValueError(f"rope_scaling of type {kind!r} needs a 'factor'") from None
    if kind == "linear":
        return inv_freq / factor
    # llama3
    missing = [k for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
               if k not in rope_scaling]
    if missing:
        raise ValueError(f"rope_scaling of type 'llama3' is missing {', '.join(missing)}")
    low_freq_factor = rope_scaling["low_freq_factor"]
    high_freq_factor = rope_scaling["high_freq_factor"]
    old_context_len = rope_scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def build_cos_sin_cache(head_dim: int, max_positions: int, rope_theta: float = DEFAULT_ROPE_THETA,
                        rope_scaling: Mapping[str, Any] | None = None,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """``[max_positions, head_dim]`` fp32: cosines in the first half, sines in the second."""
    if max_positions <= 0:
        raise ValueError(f"rope: max_positions must be positive, got {max_positions}")
    inv_freq = rope_inv_freq(head_dim, rope_theta, rope_scaling, device=device)
    positions = torch.arange(max_positions, dtype=torch.int64, device=device).float()
    freqs = positions[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).contiguous()


def apply_rope_reference(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, H, D]`` by ``positions [T]`` (plain torch; for tests and debugging)."""
    half = x.shape[-1] // 2
    cs = cos_sin[positions]
    cos = torch.cat((cs[:, :half], cs[:, :half]), dim=-1)[:, None, :]
    sin = torch.cat((cs[:, half:], cs[:, half:]), dim=-1)[:, None, :]
    xf = x.float()
    rot = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rot * sin).to(x.dtype)
