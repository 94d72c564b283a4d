"""The kernel ops the GPU backend calls: each dispatches to Triton or to its torch reference.

``impl``: ``"triton"``, ``"torch"`` (the plain-torch reference in ``reference.py``) or
``"auto"`` = Triton when the main input is on a CUDA device, else torch; ``"triton"`` on a CPU
tensor runs Triton's interpreter (``TRITON_INTERPRET=1``; fp32/fp16 only, bf16 is wrong there).

The Triton modules are imported on first use only, so this module imports without triton,
and ``TRITON_INTERPRET`` need only be set before the first Triton call (Triton reads it when
a kernel module is imported).

Shapes (T tokens, B / N sequences, Hq / Hkv heads, D head_dim, paged KV cache
``[num_blocks, block_size, Hkv, D]``) are documented on the references in ``reference.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import use_triton
from .reference import (
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    quant_fp8_rowwise_ref,
    rms_norm_ref,
    rope_kv_write_ref,
    silu_mul_ref,
)

__all__ = [
    "rms_norm",
    "silu_mul",
    "rope_kv_write",
    "paged_decode_attention",
    "paged_prefill_attention",
    "quant_fp8_rowwise",
    "linear",
    "rms_norm_linear",
    "silu_mul_linear",
    "rms_norm_qkv_rope",
]


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``h = x + residual``; ``out = RMSNorm(h) * weight``. Returns ``(out, h)``.

    x, residual: [T, H]; weight: [H]. fp32 math, ``x.dtype`` out. Without a residual,
    ``h`` is ``x`` itself.
    """
    if use_triton(impl, x):
        from .rmsnorm import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)


def silu_mul(gate_up: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """``silu(gate_up[:, :I]) * gate_up[:, I:]``: [T, 2I] -> [T, I]."""
    if use_triton(impl, gate_up):
        from .activation import silu_mul_triton

        return silu_mul_triton(gate_up)
    return silu_mul_ref(gate_up)


def rope_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    impl: str = "auto",
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """neox rotary on q [T, Hq, D] and k [T, Hkv, D] at ``positions`` [T] (int64), using
    ``cos_sin`` [max_pos, D] (cos | sin halves, fp32); writes rotated k and v into the
    paged caches at ``slot_mapping`` [T] (int64, -1 = skip). Returns ``(q_rot, k_rot)``.

    q/k/v may be strided views (e.g. splits of a fused qkv projection) as long as head_dim
    is contiguous. An fp8 (e4m3) cache stores ``clamp(k / k_scale)`` and ``clamp(v / v_scale)``
    (per-tensor scales; 1 for a cache in the model's dtype).
    """
    if use_triton(impl, q):
        from .rope import rope_kv_write_triton

        return rope_kv_write_triton(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return rope_kv_write_ref(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    impl: str = "auto",
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """One query token per sequence: q [B, Hq, D] over its ``seq_lens[b]`` cached tokens,
    block_tables [B, max_blocks] int32, seq_lens [B] int32 (0 -> zeros). Split-K over the
    sequence; ``num_splits=None`` picks it from B x Hkv vs the SM count (shapes only). An fp8
    cache is read as ``cache * k_scale`` / ``cache * v_scale``.
    """
    if use_triton(impl, q):
        from .decode_attention import paged_decode_attention_triton

        return paged_decode_attention_triton(
            q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits, k_scale=k_scale, v_scale=v_scale
        )
    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits,
                                      k_scale, v_scale)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_q_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    impl: str = "auto",
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of packed chunks q [T, Hq, D] (sequence n owns rows
    ``cu_q_lens[n]:cu_q_lens[n+1]``) over paged KV of ``seq_lens[n]`` tokens each, the
    chunk's own tokens being the last ``q_len`` of them (already written to the cache). An
    fp8 cache is read as ``cache * k_scale`` / ``cache * v_scale``.
    """
    if use_triton(impl, q):
        from .prefill_attention import paged_prefill_attention_triton

        return paged_prefill_attention_triton(
            q, k_cache, v_cache, block_tables, cu_q_lens, seq_lens, scale, k_scale=k_scale, v_scale=v_scale
        )
    return paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_q_lens, seq_lens, scale,
                                       k_scale, v_scale)


def quant_fp8_rowwise(x: torch.Tensor, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token fp8-e4m3 quantisation: ``x [T, K]`` -> ``(q [T, K] float8_e4m3fn, scale [T, 1]
    fp32)`` with ``x ~= q * scale`` (row absmax / 448)."""
    if use_triton(impl, x):
        from .quant import quant_fp8_rowwise_triton

        return quant_fp8_rowwise_triton(x)
    return quant_fp8_rowwise_ref(x)


# ---------------------------------------------------------------------------------- decode GEMMs
# A linear of a decode step, with the small kernel before it fused in where the Triton small-M
# GEMM (gemv.py) is chosen for the shape: by ``config``, else by the installed tuning table's
# ``gemv_entries`` (`gemv.tuned_config`). Elsewhere -- no entry, cuBLAS measured faster, a CPU
# tensor under impl="auto", impl="torch" -- the unfused path: the norm / activation op, then
# ``F.linear``. w: [N, K] (out, in), as the model stores it.
def _gemv_config(x: torch.Tensor, w: torch.Tensor, impl: str, config, prologue: str = "none"):
    if config is not None:
        return config if use_triton(impl, x) else None
    if not use_triton(impl, x):  # (on a CPU tensor: only under impl="triton", the interpreter)
        return None
    from .gemv import tuned_config

    return tuned_config(x.shape[0], w.shape[0], w.shape[1], x.dtype, x.device, prologue)


def linear(x: torch.Tensor, w: torch.Tensor, impl: str = "auto", config=None) -> torch.Tensor:
    """``x [M, K] @ w.T`` (w [N, K]) -> [M, N]."""
    cfg = _gemv_config(x, w, impl, config)
    if cfg is None:
        return F.linear(x, w)
    from .gemv import gemv_triton

    return gemv_triton(x, w, cfg)[0]


def rms_norm_linear(x: torch.Tensor, weight: torch.Tensor, eps: float, w: torch.Tensor,
                    residual: torch.Tensor | None = None, impl: str = "auto",
                    config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`rms_norm` (fused residual add) then ``@ w.T``: returns ``(y, h)``, h the residual stream."""
    cfg = _gemv_config(x, w, impl, config, "rms")
    if cfg is None:
        xn, h = rms_norm(x, weight, eps, residual, impl=impl)
        return F.linear(xn, w), h
    from .gemv import gemv_triton

    return gemv_triton(x, w, cfg, prologue="rms", norm_weight=weight, eps=eps, residual=residual)


def silu_mul_linear(gate_up: torch.Tensor, w: torch.Tensor, impl: str = "auto", config=None) -> torch.Tensor:
    """`silu_mul` of ``gate_up [M, 2K]`` then ``@ w.T`` (w [N, K]) -> [M, N]."""
    cfg = _gemv_config(gate_up, w, impl, config, "silu")
    if cfg is None:
        return F.linear(silu_mul(gate_up, impl=impl), w)
    from .gemv import gemv_triton

    return gemv_triton(gate_up, w, cfg, prologue="silu")[0]


QKV_ROPE = "rms_rope"  # the tuning table's prologue name of the fused qkv + rotary + KV-write GEMM


def rms_norm_qkv_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, w: torch.Tensor,
                      residual: torch.Tensor | None, positions: torch.Tensor, cos_sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int,
                      num_kv_heads: int, impl: str = "auto", k_scale: float = 1.0, v_scale: float = 1.0,
                      config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's attention input in one kernel where the tuning table (``gemv_entries`` under
    the prologue ``rms_rope``) or ``config`` picks the small-M GEMM for it: fused residual add +
    rmsnorm, the qkv projection (w [(Hq + 2 Hkv) D, H]), rotary on q and k, k and v written
    into the paged caches at ``slot_mapping`` (-1: skipped). Elsewhere the unfused path:
    `rms_norm_linear`, then `rope_kv_write` on the projection's q | k | v views. Returns
    ``(q_rot [T, Hq, D], h)``, h the residual stream."""
    cfg = _gemv_config(x, w, impl, config, QKV_ROPE)
    if cfg is None:
        qkv, h = rms_norm_linear(x, weight, eps, w, residual, impl=impl)
        T = x.shape[0]
        D = w.shape[0] // (num_heads + 2 * num_kv_heads)
        q, k, v = qkv.split([num_heads * D, num_kv_heads * D, num_kv_heads * D], dim=-1)
        q, _ = rope_kv_write(q.view(T, num_heads, D), k.view(T, num_kv_heads, D), v.view(T, num_kv_heads, D),
                             positions, cos_sin, k_cache, v_cache, slot_mapping, impl=impl, k_scale=k_scale,
                             v_scale=v_scale)
        return q, h
    from .gemv import RopeKV, gemv_triton

    rope = RopeKV(positions, cos_sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, k_scale, v_scale)
    return gemv_triton(x, w, cfg, prologue="rms", norm_weight=weight, eps=eps, residual=residual, rope=rope)
