"""Paged decode attention with split-K over the sequence (flash-decoding), GQA-aware (Triton).

Reference: ``reference.paged_decode_attention_ref``.

Kernel 1 (``_decode_split_kernel``), a 1-D grid of ``B * Hkv * max_splits`` programs: one
program takes the ``group = Hq // Hkv`` query heads that share one kv head as a
``[group, D]`` tile, so each KV tile is loaded once per group, and walks its split of the
sequence in ``BLOCK_N``-token tiles gathered through the block table, with an online softmax
(base-2 exponentials, the scale folded into ``qk_scale``).

How a sequence is split is decided *in the kernel*, from its own ``seq_lens[b]``: it uses
``n = min(max_splits, cdiv(len, min_split_tokens))`` splits (so a short sequence of a batch
of long ones uses few, and its programs beyond ``n`` exit at once), each
``cdiv(cdiv(len, n), BLOCK_N) * BLOCK_N`` tokens long (the last ones may be empty and are
not used). Nothing is read back to the host, so the op can be captured in a CUDA graph; the
grid depends on shapes only, and ``max_splits`` / ``min_split_tokens`` are run-time
arguments, so no split count compiles a kernel of its own.

A sequence that uses one split gets its output written by that program. Otherwise each split
writes its running max ``m`` (log2 domain), sum ``l`` and unnormalised accumulator ``acc``
(fp32) and the splits are merged

* by kernel 2 (``_decode_reduce_kernel``, grid ``B * Hkv``), or
* with ``fused_reduce``, in kernel 1 itself: each split program increments a per-(sequence,
  kv head) counter after writing its partials (release), and the one that finds itself last
  (acquire) merges them -- every head of its group at once, one ``[splits, heads, head_dim]``
  tile per trip over the partials (`_merge_heads`; a head at a time made the merge's L2
  round trips serial, and lost to the separate reduce at batch 1-16) -- and resets the
  counter to 0 for the next launch (the counters live in a per-device buffer zeroed once;
  CUDA-graph safe). One launch instead of two.

Scores: ``tl.dot`` on a ``[BLOCK_G, D] x [D, BLOCK_N]`` tile when ``use_dot`` (BLOCK_G is the
group padded to >= 16 rows, the padding rows masked; the default, fastest on an H100 for
every group measured), else a broadcast multiply + sum over a ``[BLOCK_G, BLOCK_N, D]`` tile
(``use_dot=False``, groups < 16 only).

Launch parameters are a `DecodeConfig`: split bounds, tile, warps, pipelining stages, the
reduce (fused or not) and the program order. Where they are not given, they come from a
*tuning table* (`set_tuning`, `load_tuning`, the JSON file named by the environment variable
``SERVESIM_DECODE_TUNING``, or a table in ``kernels/tuning/`` made on this CUDA device;
``benchmarks/gpu_bench.py --sections 12`` measures one on the device and writes it), looked up
by the shapes of the call (dtype, group, kv heads, head dim, block size, batch) and the
device's SM count; else from `default_config`, the safe default (the heuristics this kernel
shipped with). `precompile` compiles every variant a table can pick before a run starts.

An fp8 (e4m3) cache: its per-tensor scales are folded -- ``k_scale`` into ``qk_scale``, the
values' into the output -- so a tile is only converted, never multiplied; its configs are a
dimension of their own (the key names the cache's dtype after q's,
``bfloat16-kv-float8_e4m3fn/...``; ``benchmarks/gpu_kv_fp8.py`` tunes them), its default tiles
and split bounds are sized in bytes (twice a 2-byte cache's tokens), and its dots run in fp16
(``kv_math="f16"``: e4m3 -> fp16 is exact, one conversion a pair on sm89+; q clamped to
fp16's range) or in q's dtype (``"q"``).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import triton
import triton.language as tl

from ._common import cdiv, check_interpreted, dot_precision, jit_options, new_empty, next_pow2, num_sms, pdl_kwargs
from . import tuning_table as _tt
from ._gdc import gdc_enter
from .reference import FP8_KV, check_kv_scales, is_fp8_cache

LOG2E = 1.4426950408889634
MAX_SPLITS = 32
MIN_TOKENS_PER_SPLIT = 64
WAVES = 4
STRAGGLER_SPLITS = 8  # see choose_num_splits
MERGE_CHUNK = 16  # splits a merge reads at once (one compiled variant for every split count)
MERGE_TILE = 8192  # fp32 elements of the fused merge's [chunk, heads, head_dim] tile (64 a thread at 4 warps)
TUNING_ENV = "SERVESIM_DECODE_TUNING"
TUNING_VERSION = 1
KV_MATHS = ("f16", "q")  # DecodeConfig.kv_math


# The block-table row stride changes with the longest request of a batch, the batch and the
# split bounds with every batch size; specialising on them (Triton specialises integers on
# divisibility by 16 and on == 1) would compile new variants in the middle of a serving run,
# stalling it for a second each.
@triton.jit(**jit_options(
    no_specialize=["s_bt_b", "n_kv_heads", "max_splits", "min_split_tokens",
                   "s_ml_b", "s_ml_h", "s_ml_s", "s_acc_b", "s_acc_h", "s_acc_s"],
    no_align=["bt_ptr", "sl_ptr"]))
def _decode_split_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, sl_ptr,
    m_ptr, l_ptr, acc_ptr, cnt_ptr, out_ptr,
    s_q_b, s_q_h,
    s_kc_b, s_kc_o, s_kc_h,
    s_vc_b, s_vc_o, s_vc_h,
    s_bt_b,
    s_ml_b, s_ml_h, s_ml_s,
    s_acc_b, s_acc_h, s_acc_s,
    s_o_b, s_o_h,
    qk_scale, v_scale,
    n_kv_heads, max_splits, min_split_tokens,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
    HEAD_MAJOR: tl.constexpr,
    CHUNK: tl.constexpr,
    KV_FP8: tl.constexpr,
    MATH_F16: tl.constexpr,
    MERGE_G: tl.constexpr,
    GDC: tl.constexpr = False,  # programmatic dependent launch (kernels/_gdc.py)
):
    if GDC:
        gdc_enter()
    pid = tl.program_id(0)
    if HEAD_MAJOR:  # kv heads of one (sequence, split) side by side: they read the same blocks
        kvh = pid % n_kv_heads
        rest = pid // n_kv_heads
        split = rest % max_splits
        b = rest // max_splits
    else:  # sequences side by side (the order of the former (B, Hkv, splits) grid)
        n_seq = tl.num_programs(0) // (n_kv_heads * max_splits)
        b = pid % n_seq
        rest = pid // n_seq
        kvh = rest % n_kv_heads
        split = rest // n_kv_heads
    b = b.to(tl.int64)
    kvh = kvh.to(tl.int64)

    seq_len = tl.load(sl_ptr + b)
    n_want = tl.minimum(tl.maximum(tl.cdiv(seq_len, min_split_tokens), 1), max_splits)
    split_len = tl.cdiv(tl.cdiv(tl.maximum(seq_len, 1), n_want), BLOCK_N) * BLOCK_N
    n_used = tl.maximum(tl.cdiv(seq_len, split_len), 1)
    if split >= n_used:
        return
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kvh * GROUP + g
    gd_mask = g_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + b * s_q_b + heads[:, None] * s_q_h + d[None, :], mask=gd_mask, other=0.0)
    if MATH_F16:  # an fp8 cache's dots in fp16: e4m3 -> f16 is one cvt a pair (bf16 takes several)
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    if not USE_DOT:
        qf = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

    bt_row = bt_ptr + b * s_bt_b
    for s0 in range(start, end, BLOCK_N):
        pos = s0 + n
        p_mask = pos < end
        blk = tl.load(bt_row + pos // PAGE, mask=p_mask, other=0).to(tl.int64)
        off = (pos % PAGE).to(tl.int64)
        kv_mask = p_mask[:, None] & d_mask[None, :]
        k = tl.load(
            kc_ptr + blk[:, None] * s_kc_b + off[:, None] * s_kc_o + kvh * s_kc_h + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if KV_FP8:  # e4m3 -> q's (math) dtype; k_scale is folded into qk_scale
            k = k.to(q.dtype)
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
        if KV_FP8:
            v = v.to(q.dtype)
        if USE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    if KV_FP8:  # the values' per-tensor scale (linear: the split partials merge as before)
        acc = acc * v_scale

    o_ptrs = out_ptr + b * s_o_b + heads[:, None] * s_o_h + d[None, :]
    if n_used == 1:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # seq_len == 0 -> acc == 0 -> zeros
        tl.store(o_ptrs, (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=gd_mask)
    else:
        ml_row = b * s_ml_b + kvh * s_ml_h + g
        acc_tile = b * s_acc_b + kvh * s_acc_h + g[:, None] * BLOCK_D + d[None, :]
        tl.store(m_ptr + ml_row + split * s_ml_s, m_i, mask=g_mask)
        tl.store(l_ptr + ml_row + split * s_ml_s, l_i, mask=g_mask)
        tl.store(acc_ptr + acc_tile + split * s_acc_s, acc, mask=gd_mask)
        if FUSED_REDUCE:
            # every thread's partials are written before one thread's release increment
            tl.debug_barrier()
            cnt = cnt_ptr + b * n_kv_heads + kvh
            arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
            if arrived == n_used - 1:  # the last split of this (sequence, kv head): merge
                # all GROUP heads at once (one [CHUNK, MERGE_G, D] tile per trip; .cg: from L2,
                # where the other programs' partials are, not a stale L1)
                o = _merge_heads(m_ptr, l_ptr, acc_ptr, b * s_ml_b + kvh * s_ml_h, b * s_acc_b + kvh * s_acc_h,
                                 n_used, s_ml_s, s_acc_s, CHUNK, MERGE_G, GROUP, BLOCK_D, HEAD_DIM, ".cg")
                mg = tl.arange(0, MERGE_G)
                tl.store(out_ptr + b * s_o_b + (kvh * GROUP + mg)[:, None] * s_o_h + d[None, :],
                         o.to(out_ptr.dtype.element_ty), mask=(mg < GROUP)[:, None] & d_mask[None, :])
                tl.store(cnt, 0)  # all n_used arrived: ready for the next launch


@triton.jit
def _merge_heads(m_ptr, l_ptr, acc_ptr, ml_off, acc_off, n_used, s_ml_s, s_acc_s,
                 CHUNK: tl.constexpr, MERGE_G: tl.constexpr, GROUP: tl.constexpr, BLOCK_D: tl.constexpr,
                 HEAD_DIM: tl.constexpr, CACHE: tl.constexpr):
    """The ``GROUP`` heads of one (sequence, kv head) merged from their ``n_used`` (>= 2, all
    non-empty) splits' partials in one online pass, ``CHUNK`` splits per trip, every head of
    a trip in one ``[CHUNK, MERGE_G, BLOCK_D]`` tile (the partials' rows are ``g`` =
    0..GROUP-1 of a split, ``BLOCK_D`` apart). Returns ``[MERGE_G, BLOCK_D]`` (rows past
    GROUP: garbage, masked by the caller)."""
    c = tl.arange(0, CHUNK)
    g = tl.arange(0, MERGE_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    m_run = tl.full([MERGE_G], float("-inf"), dtype=tl.float32)
    l_run = tl.zeros([MERGE_G], dtype=tl.float32)
    a_run = tl.zeros([MERGE_G, BLOCK_D], dtype=tl.float32)
    for c0 in range(0, n_used, CHUNK):
        sp = c0 + c
        sg = (sp < n_used)[:, None] & g_mask[None, :]
        ml = ml_off + sp[:, None] * s_ml_s + g[None, :]
        m_c = tl.load(m_ptr + ml, mask=sg, other=float("-inf"), cache_modifier=CACHE)
        l_c = tl.load(l_ptr + ml, mask=sg, other=0.0, cache_modifier=CACHE)
        a_c = tl.load(acc_ptr + acc_off + sp[:, None, None] * s_acc_s + g[None, :, None] * BLOCK_D + d[None, None, :],
                      mask=sg[:, :, None] & d_mask[None, None, :], other=0.0, cache_modifier=CACHE)
        m_new = tl.maximum(m_run, tl.max(m_c, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padding heads: never a finite max
        alpha = tl.exp2(m_run - m_safe)
        w = tl.exp2(m_c - m_safe[None, :])  # masked splits: exp2(-inf) = 0
        l_run = l_run * alpha + tl.sum(w * l_c, axis=0)
        a_run = a_run * alpha[:, None] + tl.sum(w[:, :, None] * a_c, axis=0)
        m_run = m_new
    l_safe = tl.where(l_run == 0.0, 1.0, l_run)
    return a_run / l_safe[:, None]


@triton.jit
def _merge_splits(m_ptr, l_ptr, acc_ptr, ml_off, acc_off, n_used, s_ml_s, s_acc_s,
                  CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, CACHE: tl.constexpr):
    """One head's output from its ``n_used`` (>= 2, all non-empty) splits' partials, read
    ``CHUNK`` splits at a time: the max first, then the weighted sums."""
    c = tl.arange(0, CHUNK)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    m_run = tl.max(tl.full([CHUNK], float("-inf"), dtype=tl.float32), axis=0)
    for c0 in range(0, n_used, CHUNK):
        sp = c0 + c
        m_c = tl.load(m_ptr + ml_off + sp * s_ml_s, mask=sp < n_used, other=float("-inf"), cache_modifier=CACHE)
        m_run = tl.maximum(m_run, tl.max(m_c, axis=0))
    l_run = tl.sum(tl.zeros([CHUNK], dtype=tl.float32), axis=0)
    a_run = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c0 in range(0, n_used, CHUNK):
        sp = c0 + c
        s_mask = sp < n_used
        m_c = tl.load(m_ptr + ml_off + sp * s_ml_s, mask=s_mask, other=float("-inf"), cache_modifier=CACHE)
        l_c = tl.load(l_ptr + ml_off + sp * s_ml_s, mask=s_mask, other=0.0, cache_modifier=CACHE)
        a_c = tl.load(acc_ptr + acc_off + sp[:, None] * s_acc_s + d[None, :], mask=s_mask[:, None] & d_mask[None, :],
                      other=0.0, cache_modifier=CACHE)
        w = tl.exp2(m_c - m_run)  # masked splits: exp2(-inf) = 0
        l_run += tl.sum(w * l_c, axis=0)
        a_run += tl.sum(w[:, None] * a_c, axis=0)
    return a_run / l_run


@triton.jit(**jit_options(
    no_specialize=["n_q_heads", "n_kv_heads", "max_splits", "min_split_tokens",
                   "s_ml_b", "s_ml_h", "s_ml_s", "s_acc_b", "s_acc_h", "s_acc_s"],
    no_align=["sl_ptr"]))
def _decode_reduce_kernel(
    sl_ptr, m_ptr, l_ptr, acc_ptr, out_ptr,
    s_ml_b, s_ml_h, s_ml_s,
    s_acc_b, s_acc_h, s_acc_s,
    s_o_b, s_o_h,
    n_q_heads, n_kv_heads, max_splits, min_split_tokens,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNK: tl.constexpr,
    GDC: tl.constexpr = False,  # programmatic dependent launch (kernels/_gdc.py)
):
    if GDC:
        gdc_enter()
    pid = tl.program_id(0)
    b = (pid // n_q_heads).to(tl.int64)
    h = (pid % n_q_heads).to(tl.int64)
    kvh = h // GROUP
    gi = h % GROUP
    seq_len = tl.load(sl_ptr + b)
    # the split kernel's rule, to the letter
    n_want = tl.minimum(tl.maximum(tl.cdiv(seq_len, min_split_tokens), 1), max_splits)
    split_len = tl.cdiv(tl.cdiv(tl.maximum(seq_len, 1), n_want), BLOCK_N) * BLOCK_N
    n_used = tl.maximum(tl.cdiv(seq_len, split_len), 1)
    if n_used == 1:  # the split kernel wrote the output itself
        return
    d = tl.arange(0, BLOCK_D)
    o = _merge_splits(m_ptr, l_ptr, acc_ptr, b * s_ml_b + kvh * s_ml_h + gi, b * s_acc_b + kvh * s_acc_h + gi * BLOCK_D,
                      n_used, s_ml_s, s_acc_s, CHUNK, BLOCK_D, HEAD_DIM, "")
    tl.store(out_ptr + b * s_o_b + h * s_o_h + d, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


# ---------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the decode attention. ``None`` fields are filled by
    `resolve_config` from the call's shapes (see `default_config`).

    Every field ``None`` means "not set here" (`resolve_config` fills it).
    ``max_splits``: the grid's splits per (sequence, kv head), an upper bound; a sequence of
    ``L`` tokens uses ``min(max_splits, cdiv(L, min_split_tokens))`` of them (decided on the
    device). ``block_n``: tokens per tile. ``num_stages``: Triton's software-pipelining depth
    (0: Triton's default). ``fused_reduce``: merge the splits in the split kernel (one
    launch) instead of a second kernel. ``head_major``: program order with the kv heads of
    one (sequence, split) adjacent instead of the sequences.
    """

    max_splits: int | None = None
    min_split_tokens: int | None = None
    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None  # (0 in a resolved config: Triton's default)
    fused_reduce: bool | None = None
    head_major: bool | None = None
    use_dot: bool | None = None
    kv_math: str | None = None  # fp8 cache: "f16" (dots in fp16) or "q" (in q's dtype); ignored otherwise

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DecodeConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"DecodeConfig: unknown keys {sorted(unknown)}")
        if d.get("kv_math") not in (None, *KV_MATHS):
            raise ValueError(f"DecodeConfig: kv_math must be one of {KV_MATHS}, got {d['kv_math']!r}")
        return cls(**d)

    def compile_key(self) -> tuple:
        """What makes a separate Triton compilation (the split bounds do not)."""
        return (self.block_n, self.num_warps, self.num_stages, self.fused_reduce, self.head_major, self.use_dot,
                self.kv_math)

    def label(self) -> str:
        return (f"S{self.max_splits}/T{self.min_split_tokens}/N{self.block_n}/w{self.num_warps}/"
                f"st{self.num_stages or 'd'}"
                f"{'/fused' if self.fused_reduce else ''}{'/hm' if self.head_major else ''}"
                f"{'/f16' if self.kv_math == 'f16' else ''}")

    @classmethod
    def from_label(cls, label: str, fp8: bool = False) -> DecodeConfig:
        """The resolved config `label` names (its inverse on resolved configs: ``use_dot``
        True, ``fused_reduce`` / ``head_major`` False unless marked; ``kv_math`` "f16" where
        marked, else "q" for an fp8 cache (``fp8``) and None otherwise). ValueError naming the
        part that does not parse."""
        parts = label.strip().split("/")
        nums = {"S": "max_splits", "T": "min_split_tokens", "N": "block_n", "w": "num_warps", "st": "num_stages"}
        if len(parts) < 5:
            raise ValueError(f"decode attention label {label!r}: needs S/T/N/w/st, got {len(parts)} part(s)")
        got: dict = {}
        for part, (prefix, name) in zip(parts[:5], nums.items()):
            v = part[len(prefix):]
            if not part.startswith(prefix) or not (v.isdigit() or (prefix == "st" and v == "d")):
                raise ValueError(f"decode attention label {label!r}: {part!r} is not {prefix}<number>")
            got[name] = 0 if v == "d" else int(v)
        flags = parts[5:]
        order = ("fused", "hm", "f16")
        if any(f not in order for f in flags) or [f for f in order if f in flags] != flags:
            raise ValueError(f"decode attention label {label!r}: flags {flags} are not an ordered subset of {order}")
        return cls(**got, fused_reduce="fused" in flags, head_major="hm" in flags, use_dot=True,
                   kv_math="f16" if "f16" in flags else ("q" if fp8 else None))


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
    return 1 << (n.bit_length() - 1)


def default_config(batch: int, num_kv_heads: int, max_seq_len: int, head_dim: int, group: int,
                   sms: int = 132, dtype: torch.dtype | None = None, kv_dtype: torch.dtype | None = None) -> DecodeConfig:
    """The safe default: `choose_num_splits`' split bound, 64-token tiles (32 past head_dim
    128), 4 warps, Triton's default pipelining, the separate reduce kernel.

    Tiles and split bounds are sized in *bytes*: a cache of 1-byte elements (fp8) gets twice
    the tokens per tile and per split of a 2-byte one, so a tile moves the same bytes (the
    same number of loop trips would otherwise move half the data at the same latency); its
    dots run in fp16 when q is 16-bit (``kv_math="f16"``: e4m3 -> fp16 is exact and one
    conversion instruction a pair on sm89+, e4m3 -> bf16 several)."""
    use_dot = True
    block_d = max(next_pow2(head_dim), 16)
    fp8 = kv_dtype is not None and kv_dtype in FP8_KV
    per = 2 if fp8 else 1  # tokens of this cache in the bytes of one 2-byte-element token
    min_tokens = MIN_TOKENS_PER_SPLIT * per
    kv_math = ("f16" if dtype in (torch.bfloat16, torch.float16) else "q") if fp8 else None
    return DecodeConfig(
        max_splits=choose_num_splits(batch, num_kv_heads, max_seq_len, sms, min_tokens_per_split=min_tokens),
        min_split_tokens=min_tokens,
        block_n=(64 if block_d <= 128 else 32) * per,
        num_warps=4, num_stages=0, fused_reduce=False, head_major=False, use_dot=use_dot, kv_math=kv_math)


# ---------------------------------------------------------------------------------- tuning table
_TUNING: dict | None = None
_TUNING_LOADED_ENV = False
_EPOCH = 0  # bumped by every set_tuning (resolve_config's memo)


def tuning_key(dtype: torch.dtype, group: int, num_kv_heads: int, head_dim: int, block_size: int, sms: int,
               kv_dtype: torch.dtype | None = None) -> str:
    """The table's key of a call's shapes: q's dtype, and the cache's where it differs (an fp8
    cache under bf16 q: ``bfloat16-kv-float8_e4m3fn/...``; its configs are tuned apart)."""
    kv = None if kv_dtype is None else str(kv_dtype).replace('torch.', '')
    return _tt.table_key(str(dtype).replace('torch.', ''), group, num_kv_heads, head_dim, block_size, sms, kv)


def set_tuning(table: dict | None) -> None:
    """Install a tuning table (the dict `load_tuning` reads; None: back to `default_config`).
    Checks its entries; ValueError naming the bad one."""
    global _TUNING, _TUNING_LOADED_ENV, _EPOCH
    if table is not None:
        if table.get("version") != TUNING_VERSION:
            raise ValueError(f"decode attention tuning: version {table.get('version')!r}, expected {TUNING_VERSION}")
        for key, rows in table.get("entries", {}).items():
            for i, row in enumerate(rows):
                if "batch" not in row or "config" not in row:
                    raise ValueError(f"decode attention tuning: entries[{key!r}][{i}] needs 'batch' and 'config'")
                DecodeConfig.from_dict(row["config"])
    _TUNING = table
    _TUNING_LOADED_ENV = True  # an explicit table wins over the environment variable
    _EPOCH += 1


def load_tuning(path: str | os.PathLike) -> dict:
    """Read and install a tuning table written by ``gpu_bench.py --sections 12``."""
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"decode attention tuning {path}: {e}") from None
    try:
        set_tuning(table)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return table


TUNING_DIR = _tt.TUNING_DIR
assert _tt.MAX_SCALED_SPLITS == 2 * MAX_SPLITS


def get_tuning() -> dict | None:
    """The installed table; at the first call, the file named by ``SERVESIM_DECODE_TUNING``
    (``none``: no table), else the table in ``kernels/tuning/*.json`` made on this CUDA
    device (its ``device`` name and SM count), if one is there."""
    global _TUNING_LOADED_ENV
    if not _TUNING_LOADED_ENV:
        _TUNING_LOADED_ENV = True
        path = os.environ.get(TUNING_ENV, "").strip()
        if path.lower() == "none":
            return _TUNING
        if path:
            load_tuning(path)
        else:
            found = _tuning_for_this_device()
            if found is not None:
                load_tuning(found)
    return _TUNING


def _tuning_for_this_device() -> Path | None:
    if not torch.cuda.is_available() or not TUNING_DIR.is_dir():
        return None
    name, sms = torch.cuda.get_device_name(), num_sms(torch.device("cuda"))
    for f in sorted(TUNING_DIR.glob("*.json")):
        try:
            t = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if t.get("device") == name and t.get("sms") == sms:
            return f
    return None


def tuned_config(batch: int, key: str) -> DecodeConfig | None:
    """The table's config for ``key`` at the tuned batch nearest ``batch`` (in log2; ties
    to the larger), its split bound scaled to keep the same number of programs."""
    table = get_tuning()
    rows = (table or {}).get("entries", {}).get(key)
    if not rows:
        return None
    s, row = _tt.split_bound(rows, batch)  # the simulator prices the same bound (sim/kv_attention.py)
    cfg = DecodeConfig.from_dict(row)
    return cfg if s is None else replace(cfg, max_splits=s)


def resolve_config(batch: int, num_kv_heads: int, max_seq_len: int, head_dim: int, group: int, block_size: int,
                   dtype: torch.dtype, sms: int, config: DecodeConfig | None = None,
                   kv_dtype: torch.dtype | None = None) -> DecodeConfig:
    """The config a call runs: ``config``'s fields where set, else the tuning table's for
    these shapes (``kv_dtype``: the cache's element type, default q's ``dtype``), else
    `default_config`'s. Memoised per installed table (an eager forward asks once per layer:
    the lookup must not add host time)."""
    table = get_tuning()
    return _resolve_cached(batch, num_kv_heads, max_seq_len, head_dim, group, block_size, dtype, sms, config,
                           (_EPOCH, id(table)), kv_dtype)


@functools.lru_cache(maxsize=4096)
def _resolve_cached(batch, num_kv_heads, max_seq_len, head_dim, group, block_size, dtype, sms, config,
                    _table_id, kv_dtype=None) -> DecodeConfig:
    base = default_config(batch, num_kv_heads, max_seq_len, head_dim, group, sms, dtype, kv_dtype)
    tuned = tuned_config(batch, tuning_key(dtype, group, num_kv_heads, head_dim, block_size, sms, kv_dtype))
    if tuned is not None:
        base = _fill(tuned, base)
    if config is not None:
        base = _fill(config, base)
    return base


def _fill(cfg: DecodeConfig, base: DecodeConfig) -> DecodeConfig:
    """``cfg`` with its None fields taken from ``base``."""
    return replace(cfg, **{f.name: getattr(base, f.name) for f in fields(cfg) if getattr(cfg, f.name) is None})


# ---------------------------------------------------------------------------------- counters
_COUNTERS: dict = {}
_KEEP: list = []  # buffers replaced by larger ones stay alive: captured graphs point at them


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """A zeroed int32 buffer of >= n counters for the fused reduce, kept per device (each
    launch leaves its counters at 0). Inside a CUDA-graph capture a buffer too small is
    not replaced: the capture gets a zeroed one of its own (a memset node of the graph)."""
    key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is not None and buf.numel() >= n:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device)
    if buf is not None:
        _KEEP.append(buf)
    buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    _COUNTERS[key] = buf
    return buf


# ---------------------------------------------------------------------------------- entry point
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
    config: DecodeConfig | None = None,
    min_split_tokens: int | None = None,
    num_stages: int | None = None,
    fused_reduce: bool | None = None,
    head_major: bool | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """``num_splits`` given: every sequence is split ``num_splits`` ways (by its own length,
    in whole tiles; ``min_split_tokens`` defaults to 1 then). The keyword arguments override
    single fields of ``config`` / the tuned / the default config."""
    assert q.dim() == 3, f"q must be [B, Hq, D], got {tuple(q.shape)}"
    B, HQ, D = q.shape
    assert k_cache.dim() == 4 and v_cache.shape == k_cache.shape, "caches must be [blocks, bs, Hkv, D]"
    _, block_size, HKV, Dk = k_cache.shape
    assert Dk == D, "head_dim of q and cache differ"
    assert HQ % HKV == 0, f"Hq={HQ} must be a multiple of Hkv={HKV}"
    assert block_tables.dim() == 2 and block_tables.shape[0] == B, "block_tables must be [B, max_blocks]"
    assert seq_lens.shape == (B,), "seq_lens must be [B]"
    check_interpreted(_decode_split_kernel, q, k_cache)
    check_kv_scales(k_cache, k_scale, v_scale)
    if q.stride(-1) != 1:
        q = q.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "caches must be contiguous in head_dim"
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()

    group = HQ // HKV
    out = new_empty((B, HQ, D), q.dtype, q.device)
    if B == 0:
        return out
    over = {}
    if num_splits is not None:
        over["max_splits"] = max(int(num_splits), 1)
        over["min_split_tokens"] = 1
    for name, val in (("use_dot", use_dot), ("block_n", block_n), ("num_warps", num_warps),
                      ("min_split_tokens", min_split_tokens), ("num_stages", num_stages),
                      ("fused_reduce", fused_reduce), ("head_major", head_major)):
        if val is not None:
            over[name] = val
    if over:
        config = replace(config or DecodeConfig(), **over)
    cfg = resolve_config(B, HKV, block_tables.shape[1] * block_size, D, group, block_size, q.dtype,
                         num_sms(q.device), config, k_cache.dtype)
    return _launch(q, k_cache, v_cache, block_tables, seq_lens, scale, out, cfg, k_scale, v_scale)


def _launch(q, k_cache, v_cache, block_tables, seq_lens, scale, out, cfg: DecodeConfig, k_scale: float = 1.0,
            v_scale: float = 1.0) -> torch.Tensor:
    B, HQ, D = q.shape
    _, block_size, HKV, _ = k_cache.shape
    group = HQ // HKV
    use_dot = True if cfg.use_dot is None else bool(cfg.use_dot)
    if group >= 16:
        # (the broadcast tile gains nothing here, and Triton's compiler would rewrite its
        # multiply-reduce into a dot of default, TF32, precision for fp32 inputs)
        use_dot = True
    BLOCK_D = max(next_pow2(D), 16)
    BLOCK_G = max(next_pow2(group), 16) if use_dot else next_pow2(group)
    block_n = cfg.block_n
    if block_n is None:
        block_n = 64 if BLOCK_D <= 128 else 32
    if not use_dot:  # keep the [G, N, D] broadcast tile at ~8K elements
        block_n = max(16, min(block_n, 8192 // (BLOCK_G * BLOCK_D)))
    BLOCK_N = max(next_pow2(block_n), 16)
    S = max(int(cfg.max_splits or 1), 1)
    T = max(int(cfg.min_split_tokens), 1)
    fused = bool(cfg.fused_reduce) and S > 1
    chunk = MERGE_CHUNK
    fp8 = is_fp8_cache(k_cache)

    if S == 1:
        m = l = acc = out  # unused placeholders
        s_ml = (0, 0, 0)
        s_acc = (0, 0, 0)
    else:
        m = new_empty((B, HKV, S, BLOCK_G), torch.float32, q.device)
        l = new_empty(m.shape, m.dtype, m.device)
        acc = new_empty((B, HKV, S, BLOCK_G, BLOCK_D), torch.float32, q.device)
        s_ml = (m.stride(0), m.stride(1), m.stride(2))
        s_acc = (acc.stride(0), acc.stride(1), acc.stride(2))
    cnt = _counters(q.device, B * HKV) if fused else out
    extra = {"num_stages": int(cfg.num_stages)} if cfg.num_stages else {}
    _decode_split_kernel[(B * HKV * S,)](
        q, k_cache, v_cache, block_tables, seq_lens,
        m, l, acc, cnt, out,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        *s_ml, *s_acc,
        out.stride(0), out.stride(1),
        float(scale) * LOG2E * float(k_scale), float(v_scale),
        HKV, S, T,
        HEAD_DIM=D,
        PAGE=block_size,
        GROUP=group,
        BLOCK_G=BLOCK_G,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        USE_DOT=use_dot,
        DOT_PREC=dot_precision(q.dtype),
        FUSED_REDUCE=fused,
        HEAD_MAJOR=bool(cfg.head_major),
        CHUNK=merge_chunk(group, BLOCK_D) if fused else 1,
        KV_FP8=fp8,
        MATH_F16=fp8 and cfg.kv_math == "f16",
        MERGE_G=next_pow2(group),
        num_warps=int(cfg.num_warps),
        **extra,
        **pdl_kwargs(q),
    )
    if S > 1 and not fused:
        _decode_reduce_kernel[(B * HQ,)](
            seq_lens, m, l, acc, out,
            *s_ml, *s_acc,
            out.stride(0), out.stride(1),
            HQ, HKV, S, T,
            HEAD_DIM=D,
            GROUP=group,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
            CHUNK=chunk,
            num_warps=1 if chunk * BLOCK_D <= 512 else (2 if chunk * BLOCK_D <= 2048 else 4),
            **pdl_kwargs(q),
        )
    return out


def merge_chunk(group: int, block_d: int) -> int:
    """Splits per trip of the fused merge: ``MERGE_CHUNK``, fewer where the group's
    ``[chunk, heads, head_dim]`` tile would pass ``MERGE_TILE`` elements (a power of two)."""
    c = max(1, min(MERGE_CHUNK, MERGE_TILE // (next_pow2(group) * block_d)))
    return 1 << (c.bit_length() - 1)


def table_configs(key: str) -> list[DecodeConfig]:
    """Every distinct config of the installed table for ``key`` (e.g. to compile them all
    before a run starts: `precompile`)."""
    rows = ((get_tuning() or {}).get("entries", {}) or {}).get(key, [])
    seen, out = set(), []
    for r in rows:
        c = DecodeConfig.from_dict(r["config"])
        if c.compile_key() not in seen:
            seen.add(c.compile_key())
            out.append(c)
    return out


def precompile(k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, scale: float,
               q_dtype: torch.dtype | None = None) -> int:
    """Compile every kernel variant the installed tuning table (and the default) can pick for
    this cache's shapes, on a 2-sequence batch over block 0 (read only), so no iteration of a
    run meets a Triton compilation. ``q_dtype``: the queries' (default the cache's; bf16 for
    an fp8 cache). Returns how many variants ran."""
    _, bs, hkv, d = k_cache.shape
    dev = k_cache.device
    q_dtype = q_dtype or (torch.bfloat16 if is_fp8_cache(k_cache) else k_cache.dtype)
    key = tuning_key(q_dtype, num_heads // hkv, hkv, d, bs, num_sms(dev), k_cache.dtype)
    cfgs = table_configs(key) + [default_config(2, hkv, bs, d, num_heads // hkv, num_sms(dev), q_dtype,
                                                k_cache.dtype)]
    q = torch.zeros(2, num_heads, d, dtype=q_dtype, device=dev)
    bt = torch.zeros(2, 1, dtype=torch.int32, device=dev)
    sl = torch.full((2,), min(bs, 4), dtype=torch.int32, device=dev)
    for c in cfgs:
        for s in (1, 2):  # the one-split path and the split + merge path
            paged_decode_attention_triton(q, k_cache, v_cache, bt, sl, scale, config=replace(
                c, max_splits=s, min_split_tokens=1))
    return len(cfgs)
