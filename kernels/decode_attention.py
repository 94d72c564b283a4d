"""Paged decode attention with split-K over the sequence (flash-decoding), GQA-aware (Triton).

Reference: ``reference.paged_decode_attention_ref``.

Kernel 1 (``_decode_split_kernel``), grid ``(B, Hkv, num_splits)``: one program takes the
``group = Hq // Hkv`` query heads that share one kv head as a ``[group, D]`` tile, so each
KV tile is loaded once per group, and walks its split of the sequence in ``BLOCK_N``-token
tiles gathered through the block table, with an online softmax (base-2 exponentials, the
scale folded into ``qk_scale``). It writes the split's running max ``m`` (log2 domain),
sum ``l`` and unnormalised accumulator ``acc``; with one split it writes the output itself.

Kernel 2 (``_decode_reduce_kernel``), grid ``(B, Hq)``: merges the splits'
``(m, l, acc)`` into the output.

Each sequence's split length is derived *in the kernel* from its own ``seq_lens[b]``
(``cdiv(cdiv(len, S), BLOCK_N) * BLOCK_N``), so nothing is read back to the host and the op
can be captured in a CUDA graph; ``num_splits`` depends only on shapes.

Scores: ``tl.dot`` on a ``[BLOCK_G, D] x [D, BLOCK_N]`` tile when ``use_dot`` (BLOCK_G is the
group padded to >= 16 rows, the padding rows masked; the default, fastest on an H100 for
every group measured), else a broadcast multiply + sum over a ``[BLOCK_G, BLOCK_N, D]`` tile
(``use_dot=False``, groups < 16 only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, check_interpreted, dot_precision, jit_options, new_empty, next_pow2, num_sms

LOG2E = 1.4426950408889634
MAX_SPLITS = 32
MIN_TOKENS_PER_SPLIT = 64
WAVES = 4
STRAGGLER_SPLITS = 8  # see choose_num_splits


# The block-table row stride changes with the longest request of a batch; specialising on
# it (Triton specialises integers on divisibility by 16) would compile new variants in the
# middle of a serving run, stalling it for a second each.
@triton.jit(**jit_options(no_specialize=["s_bt_b"], no_align=["bt_ptr", "sl_ptr"]))
def _decode_split_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, sl_ptr,
    m_ptr, l_ptr, acc_ptr, out_ptr,
    s_q_b, s_q_h,
    s_kc_b, s_kc_o, s_kc_h,
    s_vc_b, s_vc_o, s_vc_h,
    s_bt_b,
    s_ml_b, s_ml_h,
    s_acc_b, s_acc_h, s_acc_s,
    s_o_b, s_o_h,
    qk_scale,
    HEAD_DIM, block_size,
    GROUP: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)

    seq_len = tl.load(sl_ptr + b)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kvh * GROUP + g
    q = tl.load(
        q_ptr + b * s_q_b + heads[:, None] * s_q_h + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if not USE_DOT:
        qf = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

    bt_row = bt_ptr + b * s_bt_b
    for s0 in range(start, end, BLOCK_N):
        pos = s0 + n
        p_mask = pos < end
        blk = tl.load(bt_row + pos // block_size, mask=p_mask, other=0).to(tl.int64)
        off = (pos % block_size).to(tl.int64)
        kv_mask = p_mask[:, None] & d_mask[None, :]
        k = tl.load(
            kc_ptr + blk[:, None] * s_kc_b + off[:, None] * s_kc_o + kvh * s_kc_h + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if USE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        else:
            s = tl.sum(qf[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        s = tl.where(p_mask[None, :], s * qk_scale, float("-inf"))
        # every tile holds >= 1 valid position, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            vc_ptr + blk[:, None] * s_vc_b + off[:, None] * s_vc_o + kvh * s_vc_h + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if USE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    gd_mask = g_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # seq_len == 0 -> acc == 0 -> zeros
        o = acc / l_safe[:, None]
        tl.store(
            out_ptr + b * s_o_b + heads[:, None] * s_o_h + d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=gd_mask,
        )
    else:
        ml_off = b * s_ml_b + heads * s_ml_h + split
        tl.store(m_ptr + ml_off, m_i, mask=g_mask)
        tl.store(l_ptr + ml_off, l_i, mask=g_mask)
        tl.store(
            acc_ptr + b * s_acc_b + heads[:, None] * s_acc_h + split * s_acc_s + d[None, :],
            acc,
            mask=gd_mask,
        )


@triton.jit
def _decode_reduce_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr,
    s_ml_b, s_ml_h,
    s_acc_b, s_acc_h, s_acc_s,
    s_o_b, s_o_h,
    HEAD_DIM,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = sp < NUM_SPLITS
    d_mask = d < HEAD_DIM
    ml_off = b * s_ml_b + h * s_ml_h + sp
    m = tl.load(m_ptr + ml_off, mask=s_mask, other=float("-inf"))
    l = tl.load(l_ptr + ml_off, mask=s_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # all splits empty (seq_len 0)
    w = tl.exp2(m - m_max)  # empty split: exp2(-inf) = 0
    l_tot = tl.sum(w * l, axis=0)
    acc = tl.load(
        acc_ptr + b * s_acc_b + h * s_acc_h + sp[:, None] * s_acc_s + d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    o = tl.sum(w[:, None] * acc, axis=0) / tl.where(l_tot == 0.0, 1.0, l_tot)
    tl.store(out_ptr + b * s_o_b + h * s_o_h + d, o.to(out_ptr.dtype.element_ty), mask=d_mask)


def choose_num_splits(
    batch: int, num_kv_heads: int, max_seq_len: int, sms: int = 132,
    max_splits: int = MAX_SPLITS, min_tokens_per_split: int = MIN_TOKENS_PER_SPLIT,
    straggler_splits: int = STRAGGLER_SPLITS,
) -> int:
    """Splits per (sequence, kv head): about ``WAVES`` programs per SM while ``B * Hkv``
    programs leave SMs idle, and never fewer than ``straggler_splits``; at most
    ``max_splits``, and no split shorter than ``min_tokens_per_split`` tokens of
    ``max_seq_len``, an upper bound known from shapes (block-table width x block size).
    Depends on shapes only (CUDA-graph safe).

    Why the floor: a sequence's splits share its own length, so with one split per
    sequence the longest sequence of a batch is walked by one program while the GPU runs
    out of other work -- serving batches mix lengths (lognormal prompts), and gpu_bench
    section 11 measured one split at 2-3x the time of 8 on such batches of 32-64 (the same
    total KV in equal lengths: within 15% either way), and 8 splits within 10% of the best
    count for every batch of 8-256 with unequal lengths.

    Tuned on an H100 (bf16, Hq=32, D=64/128, Hkv 8, lengths 1K..8K, CUDA-graph timing).
    Rounded down to a power of two (MAX_SPLITS is one).
    """
    work = max(batch * num_kv_heads, 1)
    by_sms = max((WAVES * sms) // work, 1)
    by_len = max(cdiv(max_seq_len, min_tokens_per_split), 1)
    n = max(1, min(max(by_sms, straggler_splits), by_len, max_splits))
    # a power of two: NUM_SPLITS is a compile-time constant, and a handful of values (all
    # compiled at warm-up) keeps a serving run from compiling new kernels as batches change
    return 1 << (n.bit_length() - 1)


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    *,
    use_dot: bool | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    assert q.dim() == 3, f"q must be [B, Hq, D], got {tuple(q.shape)}"
    B, HQ, D = q.shape
    assert k_cache.dim() == 4 and v_cache.shape == k_cache.shape, "caches must be [blocks, bs, Hkv, D]"
    _, block_size, HKV, Dk = k_cache.shape
    assert Dk == D, "head_dim of q and cache differ"
    assert HQ % HKV == 0, f"Hq={HQ} must be a multiple of Hkv={HKV}"
    assert block_tables.dim() == 2 and block_tables.shape[0] == B, "block_tables must be [B, max_blocks]"
    assert seq_lens.shape == (B,), "seq_lens must be [B]"
    check_interpreted(_decode_split_kernel, q, k_cache)
    if q.stride(-1) != 1:
        q = q.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "caches must be contiguous in head_dim"
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()

    group = HQ // HKV
    out = new_empty((B, HQ, D), q.dtype, q.device)
    if B == 0:
        return out
    if num_splits is None:
        num_splits = choose_num_splits(B, HKV, block_tables.shape[1] * block_size, num_sms(q.device))
    num_splits = max(int(num_splits), 1)

    if use_dot is None:
        # Measured on an H100 (bf16, D=128): the group padded to 16 rows with tl.dot beat the
        # broadcast multiply-sum for every group tried (1, 4), by up to 4x at group 4.
        use_dot = True
    if group >= 16:
        # (the broadcast tile gains nothing here, and Triton's compiler would rewrite its
        # multiply-reduce into a dot of default, TF32, precision for fp32 inputs)
        use_dot = True
    BLOCK_D = max(next_pow2(D), 16)
    BLOCK_G = max(next_pow2(group), 16) if use_dot else next_pow2(group)
    if block_n is None:
        if use_dot:
            block_n = 64 if BLOCK_D <= 128 else 32
        else:  # keep the [G, N, D] broadcast tile at ~8K elements
            block_n = max(16, min(64, 8192 // (BLOCK_G * BLOCK_D)))
    BLOCK_N = max(next_pow2(block_n), 16)
    if num_warps is None:
        num_warps = 4

    if num_splits == 1:
        m = l = acc = out  # unused placeholders
        s_ml = (0, 0)
        s_acc = (0, 0, 0)
    else:
        m = new_empty((B, HQ, num_splits), torch.float32, q.device)
        l = new_empty(m.shape, m.dtype, m.device)
        acc = new_empty((B, HQ, num_splits, D), torch.float32, q.device)
        s_ml = (m.stride(0), m.stride(1))
        s_acc = (acc.stride(0), acc.stride(1), acc.stride(2))

    _decode_split_kernel[(B, HKV, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens,
        m, l, acc, out,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        *s_ml, *s_acc,
        out.stride(0), out.stride(1),
        float(scale) * LOG2E,
        D, block_size,
        GROUP=group,
        NUM_SPLITS=num_splits,
        BLOCK_G=BLOCK_G,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        USE_DOT=bool(use_dot),
        DOT_PREC=dot_precision(q.dtype),
        num_warps=num_warps,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(B, HQ)](
            m, l, acc, out,
            *s_ml, *s_acc,
            out.stride(0), out.stride(1),
            D,
            NUM_SPLITS=num_splits,
            BLOCK_S=next_pow2(num_splits),
            BLOCK_D=BLOCK_D,
            num_warps=1 if BLOCK_D <= 64 else 2,
        )
    return out
