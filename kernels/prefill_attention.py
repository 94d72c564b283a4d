"""Paged causal prefill attention over packed variable-length chunks, GQA-aware (Triton).

Reference: ``reference.paged_prefill_attention_ref``.

The new tokens of sequence ``n`` (rows ``cu_q_lens[n]:cu_q_lens[n+1]`` of ``q``) are the last
``q_len`` of its ``seq_lens[n]`` tokens, whose K/V are all in the paged cache already
(``rope_kv_write`` ran first). So the kernel serves plain prefill, chunked context and
prefix reuse alike: new token ``i`` (absolute position ``seq_lens[n] - q_len + i``) attends to
cache positions ``0..that position``.

Grid ``(cdiv(T, BLOCK_Q) + N, Hkv)``. Sequence ``n`` owns tiles
``cu_q_lens[n] // BLOCK_Q + n ...``: that count is >= ``cdiv(q_len, BLOCK_Q)`` for every
sequence, so the grid needs no host-side knowledge of the lengths (no device->host sync;
CUDA-graph friendly) and a program finds its sequence by binary search over ``cu_q_lens``.
Surplus tiles exit at once.

One program holds ``BLOCK_Q`` query tokens x the ``group = Hq // Hkv`` heads of one kv head as
``BLOCK_M`` rows (row ``r`` = token ``r // group``, head ``r % group``), so each K/V tile is
read once for the whole group. K/V are walked in ``BLOCK_N`` tiles gathered through the
block table, with ``tl.dot`` for QK^T and PV and an online softmax in base 2. Tiles entirely
before the first query's position need no causal mask; only the last few are masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_interpreted, dot_precision, jit_options, new_empty, next_pow2
from .reference import check_kv_scales, is_fp8_cache

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tiles(
    q, m_i, l_i, acc,
    kc_ptr, vc_ptr, bt_row, kvh,
    s_kc_b, s_kc_o, s_kc_h, s_vc_b, s_vc_o, s_vc_h,
    lo, hi, kv_end, qpos, qk_scale, block_size,
    d, d_mask,
    MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    n = tl.arange(0, BLOCK_N)
    for s0 in range(lo, hi, BLOCK_N):
        pos = s0 + n
        if MASKED:
            p_mask = pos < kv_end
            kv_mask = p_mask[:, None] & d_mask[None, :]
            blk = tl.load(bt_row + pos // block_size, mask=p_mask, other=0).to(tl.int64)
        else:
            kv_mask = d_mask[None, :]
            blk = tl.load(bt_row + pos // block_size).to(tl.int64)
        off = (pos % block_size).to(tl.int64)
        k = tl.load(
            kc_ptr + blk[:, None] * s_kc_b + off[:, None] * s_kc_o + kvh * s_kc_h + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if KV_FP8:  # e4m3 -> q's dtype; k_scale is folded into qk_scale
            k = k.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if MASKED:
            causal = p_mask[None, :] & (pos[None, :] <= qpos[:, None])
            s = tl.where(causal, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            vc_ptr + blk[:, None] * s_vc_b + off[:, None] * s_vc_o + kvh * s_vc_h + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if KV_FP8:  # v_scale multiplies the output
            v = v.to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return m_i, l_i, acc


# the block-table row stride and the number of sequences change every iteration: not
# specialised, so a serving run never compiles new variants mid-run
@triton.jit(**jit_options(no_specialize=["s_bt_b", "num_seqs"], no_align=["bt_ptr", "cu_ptr", "sl_ptr"]))
def _prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, cu_ptr, sl_ptr, out_ptr,
    s_q_t, s_q_h,
    s_kc_b, s_kc_o, s_kc_h,
    s_vc_b, s_vc_o, s_vc_h,
    s_bt_b,
    s_o_t, s_o_h,
    qk_scale, v_scale,
    HEAD_DIM, block_size, num_seqs,
    GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)

    # Last sequence n whose first tile (cu_q_lens[n] // BLOCK_Q + n) is <= tile.
    lo = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        ok = tl.load(cu_ptr + mid) // BLOCK_Q + mid <= tile
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    seq = lo

    q_begin = tl.load(cu_ptr + seq)
    q_len = tl.load(cu_ptr + seq + 1) - q_begin
    q_start = (tile - (q_begin // BLOCK_Q + seq)) * BLOCK_Q
    if q_start < q_len:
        seq_len = tl.load(sl_ptr + seq)
        ctx_len = seq_len - q_len  # tokens before this chunk (cached prefix / earlier chunks)

        r = tl.arange(0, BLOCK_M)
        tok = r // GROUP
        g = r % GROUP
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        row_valid = (tok < BLOCK_Q) & (q_start + tok < q_len)
        t_idx = (q_begin + q_start + tok).to(tl.int64)
        heads = kvh * GROUP + g
        qo_mask = row_valid[:, None] & d_mask[None, :]
        q = tl.load(
            q_ptr + t_idx[:, None] * s_q_t + heads[:, None] * s_q_h + d[None, :],
            mask=qo_mask,
            other=0.0,
        )
        qpos = ctx_len + q_start + tok

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        bt_row = bt_ptr + seq.to(tl.int64) * s_bt_b

        # Positions < ctx_len + q_start are visible to every row of the tile: no mask.
        kv_end = tl.minimum(seq_len, ctx_len + tl.minimum(q_start + BLOCK_Q, q_len))
        full_end = ((ctx_len + q_start) // BLOCK_N) * BLOCK_N
        m_i, l_i, acc = _attend_tiles(
            q, m_i, l_i, acc, kc_ptr, vc_ptr, bt_row, kvh,
            s_kc_b, s_kc_o, s_kc_h, s_vc_b, s_vc_o, s_vc_h,
            0, full_end, kv_end, qpos, qk_scale, block_size, d, d_mask,
            MASKED=False, BLOCK_N=BLOCK_N, DOT_PREC=DOT_PREC, KV_FP8=KV_FP8,
        )
        m_i, l_i, acc = _attend_tiles(
            q, m_i, l_i, acc, kc_ptr, vc_ptr, bt_row, kvh,
            s_kc_b, s_kc_o, s_kc_h, s_vc_b, s_vc_o, s_vc_h,
            full_end, kv_end, kv_end, qpos, qk_scale, block_size, d, d_mask,
            MASKED=True, BLOCK_N=BLOCK_N, DOT_PREC=DOT_PREC, KV_FP8=KV_FP8,
        )

        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        if KV_FP8:
            o = o * v_scale
        tl.store(
            out_ptr + t_idx[:, None] * s_o_t + heads[:, None] * s_o_h + d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=qo_mask,
        )


def paged_prefill_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_q_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    assert q.dim() == 3, f"q must be [T, Hq, D], got {tuple(q.shape)}"
    T, HQ, D = q.shape
    assert k_cache.dim() == 4 and v_cache.shape == k_cache.shape, "caches must be [blocks, bs, Hkv, D]"
    _, block_size, HKV, Dk = k_cache.shape
    assert Dk == D, "head_dim of q and cache differ"
    assert HQ % HKV == 0, f"Hq={HQ} must be a multiple of Hkv={HKV}"
    N = seq_lens.shape[0]
    assert cu_q_lens.shape == (N + 1,), "cu_q_lens must be [N+1]"
    assert block_tables.dim() == 2 and block_tables.shape[0] == N, "block_tables must be [N, max_blocks]"
    check_interpreted(_prefill_kernel, q, k_cache)
    check_kv_scales(k_cache, k_scale, v_scale)
    if q.stride(-1) != 1:
        q = q.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "caches must be contiguous in head_dim"
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    cu_q_lens = cu_q_lens.contiguous()
    seq_lens = seq_lens.contiguous()

    out = new_empty((T, HQ, D), q.dtype, q.device)
    if T == 0 or N == 0:
        return out
    group = HQ // HKV
    BLOCK_D = max(next_pow2(D), 16)
    if block_m is None:
        # H100, bf16, D=128, group 4: 128 rows for long chunks; 64 when the average chunk
        # (known from shapes: T / N, no sync) is short, to keep enough programs in flight.
        block_m = 128 if (BLOCK_D <= 128 and T > 256 * N) else 64
    BLOCK_M = max(next_pow2(block_m), 16, next_pow2(group))
    BLOCK_Q = max(BLOCK_M // group, 1)
    BLOCK_N = max(next_pow2(block_n or 32), 16)
    if num_warps is None:
        num_warps = 4
    if num_stages is None:
        num_stages = 2
    grid = (triton.cdiv(T, BLOCK_Q) + N, HKV)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_q_lens, seq_lens, out,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        float(scale) * LOG2E * float(k_scale), float(v_scale),
        D, block_size, N,
        GROUP=group,
        BLOCK_Q=BLOCK_Q,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        DOT_PREC=dot_precision(q.dtype),
        KV_FP8=is_fp8_cache(k_cache),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
