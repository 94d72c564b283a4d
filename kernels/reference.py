"""Plain-torch references of every kernel in :mod:`servesim.kernels`.

Each function has exactly the signature of its Triton counterpart (see ``ops.py``), computes
in fp32 and returns the input dtype. They are written to be read, not to be fast: the
attention references gather each sequence's K/V through its block table and run an explicit
masked softmax. They are also the ``impl="torch"`` path of ``ops.py`` (CPU runs, debugging).

Shapes and conventions (shared with the Triton kernels):

* paged KV cache: ``k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]``;
  token at absolute position ``p`` of a sequence lives in block ``block_tables[n, p // bs]``
  at offset ``p % bs``; a *slot* is ``block_id * block_size + offset``.
* ``cos_sin: [max_pos, head_dim]``: first ``head_dim/2`` columns are cos, last are sin, of
  the ``head_dim/2`` rotary frequencies (neox / HF-Llama ``rotate_half`` convention).
* GQA: query head ``h`` uses kv head ``h // (Hq // Hkv)``.
* fp8 KV cache (``float8_e4m3fn`` caches): one scale per tensor, ``k_scale`` / ``v_scale``
  (a layer's keys, its values): the write stores ``clamp(x / scale, -448, 448)`` in e4m3
  (`kv_quantize`), the attention reads ``cache * scale`` (`kv_dequantize`). With a cache in
  the model's dtype the scales must be 1 (nothing is scaled).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm.

    ``h = x + residual`` (rounded to ``x.dtype``, as the model's residual stream is),
    ``out = h * rsqrt(mean(h^2) + eps) * weight`` computed in fp32, returned in ``x.dtype``.
    Returns ``(out, h)``; ``h`` is ``x`` itself when ``residual`` is None.
    """
    h = x if residual is None else (x + residual).to(x.dtype)
    hf = h.float()
    rstd = torch.rsqrt(hf.pow(2).mean(dim=-1, keepdim=True) + eps)
    out = hf * rstd * weight.float()
    return out.to(x.dtype), h


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with ``gate, up = gate_up.chunk(2, -1)``; fp32 math."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def linear_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` with ``w [N, K]`` (a linear's ``[out, in]``): fp32 math, x's dtype out."""
    return (x.float() @ w.float().t()).to(x.dtype)


def rms_norm_linear_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, w: torch.Tensor,
                        residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`rms_norm_ref` then `linear_ref` of its output: ``(y, h)``."""
    xn, h = rms_norm_ref(x, weight, eps, residual)
    return linear_ref(xn, w), h


def silu_mul_linear_ref(gate_up: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`silu_mul_ref` then `linear_ref`."""
    return linear_ref(silu_mul_ref(gate_up), w)


FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_KV = (torch.float8_e4m3fn,)


def is_fp8_cache(cache: torch.Tensor) -> bool:
    return cache.dtype in FP8_KV


def kv_quantize(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """``x`` as stored in a cache of ``cache_dtype``: e4m3 of ``clamp(x / scale)`` for an fp8
    cache, else ``x`` in that dtype (``scale`` must be 1 then)."""
    if cache_dtype in FP8_KV:
        return (x.float() * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(cache_dtype)
    return x.to(cache_dtype)


def kv_dequantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Cache rows as fp32 values: ``x * scale`` (an fp8 cache's), else ``x`` in fp32."""
    return x.float() * scale if x.dtype in FP8_KV else x.float()


def check_kv_scales(k_cache: torch.Tensor, k_scale: float, v_scale: float) -> None:
    if not (k_scale > 0 and v_scale > 0):
        raise ValueError(f"KV scales must be positive, got k_scale={k_scale}, v_scale={v_scale}")
    if not is_fp8_cache(k_cache) and (k_scale != 1.0 or v_scale != 1.0):
        raise ValueError(f"KV scales {k_scale}, {v_scale} given for a {k_cache.dtype} cache (only an fp8 cache "
                         "is scaled)")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """neox rotary: ``x * [cos, cos] + rotate_half(x) * [sin, sin]``; cos/sin: [T, D/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rope_kv_write_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary on q and k, then write rotated k and v into the paged caches (in place;
    an fp8 cache gets them quantised with ``k_scale`` / ``v_scale``, `kv_quantize`).

    Tokens with ``slot_mapping == -1`` (CUDA-graph padding) are not written.
    Returns new tensors ``(q_rot, k_rot)``.
    """
    check_kv_scales(k_cache, k_scale, v_scale)
    cos, sin = cos_sin[positions.long()].float().chunk(2, dim=-1)
    q_rot = _rotate(q, cos, sin)
    k_rot = _rotate(k, cos, sin)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    block_size = k_cache.shape[1]
    blk, off = slots // block_size, slots % block_size
    k_cache[blk, off] = kv_quantize(k_rot[valid], k_cache.dtype, k_scale)
    v_cache[blk, off] = kv_quantize(v[valid], v_cache.dtype, v_scale)
    return q_rot, k_rot


def rms_norm_qkv_rope_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, w: torch.Tensor, residual: torch.Tensor | None,
    positions: torch.Tensor, cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int, k_scale: float = 1.0, v_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's attention input: `rms_norm_linear_ref` with the fused qkv weight ``w``
    [(Hq + 2 Hkv) D, H], the projection split into q | k | v heads, then `rope_kv_write_ref`
    (rotary on q and k, k and v into the caches). Returns ``(q_rot [T, Hq, D], h)``."""
    qkv, h = rms_norm_linear_ref(x, weight, eps, w, residual)
    T = x.shape[0]
    D = w.shape[0] // (num_heads + 2 * num_kv_heads)
    q, k, v = qkv.split([num_heads * D, num_kv_heads * D, num_kv_heads * D], dim=-1)
    q_rot, _ = rope_kv_write_ref(q.reshape(T, num_heads, D), k.reshape(T, num_kv_heads, D),
                                 v.reshape(T, num_kv_heads, D), positions, cos_sin, k_cache, v_cache, slot_mapping,
                                 k_scale, v_scale)
    return q_rot, h


def gather_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``seq_len`` K and V rows of one sequence: two ``[seq_len, Hkv, D]`` tensors
    (in the cache's dtype; an fp8 cache's dequantised to fp32 with its scales)."""
    block_size = k_cache.shape[1]
    nblocks = -(-seq_len // block_size)
    ids = block_table[:nblocks].long()
    k = k_cache[ids].flatten(0, 1)[:seq_len]
    v = v_cache[ids].flatten(0, 1)[:seq_len]
    if is_fp8_cache(k_cache):
        return kv_dequantize(k, k_scale), kv_dequantize(v, v_scale)
    return k, v


def _masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """q: [M, Hq, D], k/v: [L, Hkv, D], mask: [M, L] (True = attend). fp32 out [M, Hq, D]."""
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)  # [L, Hq, D]
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("mhd,lhd->hml", q.float(), kf) * scale  # [Hq, M, L]
    scores = scores.masked_fill(~mask[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with nothing to attend to -> zeros
    return torch.einsum("hml,lhd->mhd", probs, vf)


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """One new token per sequence attending to its ``seq_lens[b]`` cached tokens (an fp8
    cache dequantised with ``k_scale`` / ``v_scale``).

    ``num_splits`` is accepted for signature parity and ignored. Rows with
    ``seq_lens[b] == 0`` give zeros.
    """
    check_kv_scales(k_cache, k_scale, v_scale)
    B, Hq, D = q.shape
    out = torch.zeros(B, Hq, D, dtype=q.dtype, device=q.device)
    for b in range(B):
        L = int(seq_lens[b])
        if L == 0:
            continue
        k, v = gather_kv(k_cache, v_cache, block_tables[b], L, k_scale, v_scale)
        mask = torch.ones(1, L, dtype=torch.bool, device=q.device)
        out[b] = _masked_attention(q[b : b + 1], k, v, mask, scale)[0].to(q.dtype)
    return out


def paged_prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_q_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of packed context chunks over their paged KV (earlier + new tokens;
    an fp8 cache dequantised with ``k_scale`` / ``v_scale``).

    Sequence ``n`` owns query rows ``cu_q_lens[n]:cu_q_lens[n+1]``; its ``q_len`` new tokens
    are the last ``q_len`` of its ``seq_lens[n]`` cached tokens, so new token ``i`` sits at
    absolute position ``seq_lens[n] - q_len + i`` and attends to positions ``0..that``.
    """
    check_kv_scales(k_cache, k_scale, v_scale)
    out = torch.zeros_like(q)
    N = seq_lens.shape[0]
    for n in range(N):
        q0, q1 = int(cu_q_lens[n]), int(cu_q_lens[n + 1])
        qlen, L = q1 - q0, int(seq_lens[n])
        if qlen == 0:
            continue
        k, v = gather_kv(k_cache, v_cache, block_tables[n], L, k_scale, v_scale)
        qpos = torch.arange(L - qlen, L, device=q.device)
        kpos = torch.arange(L, device=q.device)
        mask = kpos[None, :] <= qpos[:, None]
        out[q0:q1] = _masked_attention(q[q0:q1], k, v, mask, scale).to(q.dtype)
    return out


def quant_fp8_rowwise_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp8-e4m3 quantisation of ``x [T, K]``: ``scale = max(amax_row, 1e-12) / 448``
    (fp32 ``[T, 1]``), ``q = clamp(x / scale, -448, 448)`` rounded to e4m3 (nearest even).
    ``q.float() * scale`` is ``x`` within e4m3's rounding (3 mantissa bits)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 448.0
    q = (xf * (1.0 / scale)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q, scale
