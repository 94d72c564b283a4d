"""Small-M GEMM ``y = prologue(x) @ w.T`` for decode (M = 1..64 rows), split-K in one kernel (Triton).

Reference: ``reference.linear_ref`` (``rms_norm_linear_ref``, ``silu_mul_linear_ref`` for the
fused prologues).

``w`` is a linear's weight as the model stores it, ``[N, K]`` (``[out, in]``, K contiguous).
A 2-D grid of ``cdiv(N, BLOCK_N) x split_k`` programs: program ``(n, s)`` owns the output
columns ``n * BLOCK_N ..`` and the K range ``s * k_per_split ..`` and streams its weight tile
``[BLOCK_N, BLOCK_K]`` at a time (each row a contiguous run of K), against all M rows of x.
Products: ``tl.dot`` on a ``[BLOCK_M >= 16, BLOCK_K] x [BLOCK_K, BLOCK_N]`` tile (``use_dot``),
or a broadcast multiply into a ``[BLOCK_M, BLOCK_N, BLOCK_K]`` fp32 accumulator reduced once
after the loop (M <= 4: nothing padded to 16 rows).

Split-K (``split_k > 1``) without a second kernel: each split writes its fp32 partial
``[M, BLOCK_N]`` to a workspace, then increments its column tile's counter (acq_rel); the
program that arrives last sums the ``split_k`` partials *in split order* (so the result does
not depend on which program came last: bit-identical from run to run) and writes ``y``, then
resets the counter to 0 for the next launch (the per-device counter buffer of
`decode_attention`, zeroed once; CUDA-graph safe).

Prologues (what the small input gets before the product; the input is tiny next to the
weight, so recomputing it per program costs L2 reads only):

* ``rms``: ``h = x + residual`` (rounded to x's dtype) and ``RMSNorm(h) * norm_w`` (fp32 math,
  rounded to x's dtype, exactly as `rms_norm` writes it); every program computes the rows'
  ``rstd`` over all of K first; program (0, 0) also writes ``h`` (the residual stream);
* ``silu``: x is the gate/up projection ``[M, 2K]`` and the input is
  ``silu(gate) * up`` (fp32 math, rounded), as `silu_mul` writes it.

Epilogue ``rope`` (a `RopeKV`; the qkv projection, ``N = (Hq + 2 Hkv) D``, q | k | v): a
column tile holds *pairs* -- column ``j`` of a head's low half beside its column ``j + D/2`` --
so the neox rotation of a pair is local to the tile: the accumulator (rounded to x's dtype,
as the unfused projection's output) is rotated at each row's position (q and k heads; v heads
pass), q stored ``[M, Hq, D]`` and k and v written into the paged caches at the rows' slots
(-1: not written; fp8: ``clamp(x / scale)``), as `rope_kv_write` does -- one kernel for
rmsnorm, qkv, RoPE and the cache write (`ops.rms_norm_qkv_rope`; reference
``reference.rms_norm_qkv_rope_ref``). With split-K the last split applies it.

Launch parameters are a `GemvConfig`. The model asks `tuned_config` for the config of a shape
(dtype, N, K, M, SM count): the ``gemv_entries`` of the decode tuning table (the same file,
the same loading: `decode_attention.get_tuning`; ``gpu_bench.py --sections 15`` times these
kernels against cuBLAS per shape and writes the winner, or ``null`` where cuBLAS wins). No
entry: cuBLAS (``F.linear``) and the separate norm / activation kernels, as before.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields

import torch
import triton
import triton.language as tl

from . import _common
from ._common import cdiv, check_interpreted, dot_precision, jit_options, new_empty, next_pow2, num_sms
from ._gdc import gdc_enter

GEMV_ENTRIES = "gemv_entries"  # the decode tuning table's key for this kernel's rows
PROLOGUES = ("none", "rms", "silu")
_PRO = {p: i for i, p in enumerate(PROLOGUES)}


# (positions and slots: views into the iteration's packed host-to-device buffer, alignment varies)
@triton.jit(**jit_options(no_specialize=["M", "tiles_per_split", "n_splits"], no_align=["pos_ptr", "slot_ptr"]))
def _gemv_kernel(
    x_ptr, r_ptr, nw_ptr, w_ptr, y_ptr, h_ptr, ws_ptr, cnt_ptr,
    pos_ptr, cs_ptr, slot_ptr, kc_ptr, vc_ptr,
    M, N, K, tiles_per_split, n_splits,
    s_xm, s_rm, s_wn, s_ym, s_hm,
    s_cs, s_kc_b, s_kc_o, s_kc_h, s_vc_b, s_vc_o, s_vc_h, page, n_qh, n_kvh,
    eps, inv_k_scale, inv_v_scale,
    PROLOGUE: tl.constexpr,  # 0 none, 1 rms, 2 silu
    HAS_RES: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROPE: tl.constexpr = False,  # the qkv epilogue: rotary on q / k, k and v into the paged cache
    HEAD_DIM: tl.constexpr = 2,
    KV_FP8: tl.constexpr = False,
    PRELOAD: tl.constexpr = False,  # the first weight tile loaded before GDC's wait
    GDC: tl.constexpr = False,  # programmatic dependent launch (kernels/_gdc.py)
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    m_mask = rm < M
    if ROPE:
        # column i of a tile: pair pid_n * BLOCK_N / 2 + i // 2, its low (i even) or high half
        # column: the two columns neox rotary mixes sit side by side in the accumulator
        i = tl.arange(0, BLOCK_N)
        pair = pid_n * (BLOCK_N // 2) + i // 2
        rn = (pair // (HEAD_DIM // 2)) * HEAD_DIM + pair % (HEAD_DIM // 2) + (i % 2) * (HEAD_DIM // 2)
        n_mask = pair < N // 2
    else:
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * s_xm
    dt = w_ptr.dtype.element_ty
    # a split's K range starts at a multiple of BLOCK_K (so the compiler knows the tiles are
    # aligned) and only the last tile of K is partial: the mask is ``kk < K`` alone, which
    # keeps the loads vectorised (K a multiple of 16) where a mask at a run-time split end
    # would make them 2-byte loads
    k_lo = pid_k * tiles_per_split * BLOCK_K
    k_hi = tl.minimum(K, k_lo + tiles_per_split * BLOCK_K)
    w_rows = w_ptr + rn[:, None].to(tl.int64) * s_wn
    if PRELOAD:  # the first weight tile in flight before the wait (weights: written by no kernel)
        kk0 = k_lo + rk
        w0 = tl.load(w_rows + kk0[None, :], mask=n_mask[:, None] & (kk0 < k_hi)[None, :], other=0.0)
    if GDC:
        gdc_enter()

    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if PROLOGUE == 1:  # the rows' rstd over all of K (and h, written once)
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        h_rows = tl.where((pid_n == 0) & (pid_k == 0), M, 0)  # rows program (0, 0) writes h of
        h_mask = rm < h_rows
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            msk = m_mask[:, None] & (kk < K)[None, :]
            xv = tl.load(x_rows + kk[None, :], mask=msk, other=0.0)
            if HAS_RES:
                rv = tl.load(r_ptr + rm[:, None].to(tl.int64) * s_rm + kk[None, :], mask=msk, other=0.0)
                xv = (xv.to(tl.float32) + rv.to(tl.float32)).to(xv.dtype)
                tl.store(h_ptr + rm[:, None].to(tl.int64) * s_hm + kk[None, :], xv, mask=h_mask[:, None] & (kk < K)[None, :])
            hf = xv.to(tl.float32)
            ss += tl.sum(hf * hf, axis=1)
        rstd = 1.0 / tl.sqrt(ss / K + eps)

    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    k_first = k_lo
    if PRELOAD:  # the preloaded tile first: the same products in the same order as the loop's
        kk0 = k_lo + rk
        xv = _x_tile(x_rows, r_ptr, nw_ptr, rm, kk0, m_mask, kk0 < k_hi, rstd, s_rm, K, dt, PROLOGUE, HAS_RES)
        acc = _accumulate(acc, xv, w0, USE_DOT, DOT_PREC)
        k_first = k_lo + BLOCK_K
    for k0 in range(k_first, k_hi, BLOCK_K):
        kk = k0 + rk
        k_mask = kk < K
        xv = _x_tile(x_rows, r_ptr, nw_ptr, rm, kk, m_mask, k_mask, rstd, s_rm, K, dt, PROLOGUE, HAS_RES)
        wv = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = _accumulate(acc, xv, wv, USE_DOT, DOT_PREC)
    if not USE_DOT:
        acc = tl.sum(acc, axis=2)

    omask = m_mask[:, None] & n_mask[None, :]
    done = n_splits == 1
    if n_splits > 1:
        part = rm[:, None] * N + rn[None, :]
        MN = M * N
        tl.store(ws_ptr + pid_k * MN + part, acc, mask=omask)
        # every thread's partial is written before one thread's release increment
        tl.debug_barrier()
        cnt = cnt_ptr + pid_n
        arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        done = arrived == n_splits - 1
        if done:  # the last split of this column tile: sum in split order
            tot = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(0, n_splits, 4):
                # four partials in flight at a time (independent loads), added in split order;
                # .cg: from L2, where the other programs' partials are (not a stale L1)
                p0 = tl.load(ws_ptr + s * MN + part, mask=omask, other=0.0, cache_modifier=".cg")
                m1 = (rm < tl.where(s + 1 < n_splits, M, 0))[:, None] & n_mask[None, :]
                p1 = tl.load(ws_ptr + (s + 1) * MN + part, mask=m1, other=0.0, cache_modifier=".cg")
                m2 = (rm < tl.where(s + 2 < n_splits, M, 0))[:, None] & n_mask[None, :]
                p2 = tl.load(ws_ptr + (s + 2) * MN + part, mask=m2, other=0.0, cache_modifier=".cg")
                m3 = (rm < tl.where(s + 3 < n_splits, M, 0))[:, None] & n_mask[None, :]
                p3 = tl.load(ws_ptr + (s + 3) * MN + part, mask=m3, other=0.0, cache_modifier=".cg")
                tot = (((tot + p0) + p1) + p2) + p3
            acc = tot
            tl.store(cnt, 0)
    if done:
        if ROPE:
            _rope_kv_epilogue(acc, rm, m_mask, pid_n, N // 2, y_ptr, s_ym, pos_ptr, cs_ptr, s_cs, slot_ptr, kc_ptr,
                              vc_ptr, s_kc_b, s_kc_o, s_kc_h, s_vc_b, s_vc_o, s_vc_h, page, n_qh, n_kvh,
                              inv_k_scale, inv_v_scale, BLOCK_M, BLOCK_N, HEAD_DIM, KV_FP8)
        else:
            y_ptrs = y_ptr + rm[:, None].to(tl.int64) * s_ym + rn[None, :]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _x_tile(x_rows, r_ptr, nw_ptr, rm, kk, m_mask, k_mask, rstd, s_rm, K, dt,
            PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr):
    """The input tile ``[BLOCK_M, BLOCK_K]`` after the prologue (in the weight's dtype)."""
    xm = m_mask[:, None] & k_mask[None, :]
    if PROLOGUE == 2:
        g = tl.load(x_rows + kk[None, :], mask=xm, other=0.0).to(tl.float32)
        u = tl.load(x_rows + K + kk[None, :], mask=xm, other=0.0).to(tl.float32)
        xv = (g * tl.sigmoid(g) * u).to(dt)
    elif PROLOGUE == 1:
        xv = tl.load(x_rows + kk[None, :], mask=xm, other=0.0)
        if HAS_RES:
            rv = tl.load(r_ptr + rm[:, None].to(tl.int64) * s_rm + kk[None, :], mask=xm, other=0.0)
            xv = (xv.to(tl.float32) + rv.to(tl.float32)).to(xv.dtype)
        nw = tl.load(nw_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
        xv = (xv.to(tl.float32) * rstd[:, None] * nw[None, :]).to(dt)
    else:
        xv = tl.load(x_rows + kk[None, :], mask=xm, other=0.0).to(dt)
    return xv


@triton.jit
def _accumulate(acc, xv, wv, USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr):
    """``acc += xv @ wv.T``: ``tl.dot`` into ``[BLOCK_M, BLOCK_N]``, or the broadcast product into
    ``[BLOCK_M, BLOCK_N, BLOCK_K]`` (reduced once after the loop)."""
    if USE_DOT:
        acc = tl.dot(xv, tl.trans(wv), acc, input_precision=DOT_PREC)
    else:
        acc += xv.to(tl.float32)[:, None, :] * wv.to(tl.float32)[None, :, :]
    return acc


@triton.jit
def _rope_kv_epilogue(acc, rm, m_mask, pid_n, n_pairs, q_ptr, s_qm, pos_ptr, cs_ptr, s_cs, slot_ptr, kc_ptr,
                      vc_ptr, s_kc_b, s_kc_o, s_kc_h, s_vc_b, s_vc_o, s_vc_h, page, n_qh, n_kvh,
                      inv_k_scale, inv_v_scale,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, KV_FP8: tl.constexpr):
    """A qkv tile in pair order (`_gemv_kernel` with ROPE): each value rounded to the model's
    dtype first (as the unfused path's qkv output is), neox rotary on the q and k heads at the
    rows' positions, then q into ``q [M, n_qh, HEAD_DIM]``, k and v into the paged caches at
    the rows' slots (-1: not written; an fp8 cache: ``clamp(x / scale)``), as `rope_kv_write`."""
    HALF = HEAD_DIM // 2
    dt = q_ptr.dtype.element_ty
    lo, hi = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N // 2, 2]))
    lo = lo.to(dt).to(tl.float32)
    hi = hi.to(dt).to(tl.float32)
    pair = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    head = pair // HALF
    j = pair % HALF
    pm = m_mask[:, None] & (pair < n_pairs)[None, :]
    rows = rm.to(tl.int64)
    pos = tl.load(pos_ptr + rows, mask=m_mask, other=0).to(tl.int64)
    cs = cs_ptr + pos[:, None] * s_cs + j[None, :]
    cos = tl.load(cs, mask=pm, other=1.0).to(tl.float32)
    sin = tl.load(cs + HALF, mask=pm, other=0.0).to(tl.float32)
    rot = (head < n_qh + n_kvh)[None, :]  # q and k heads; v heads pass unrotated
    r_lo = tl.where(rot, lo * cos - hi * sin, lo).to(dt)
    r_hi = tl.where(rot, hi * cos + lo * sin, hi).to(dt)
    # q
    qm = pm & (head < n_qh)[None, :]
    qp = q_ptr + rows[:, None] * s_qm + (head * HEAD_DIM + j)[None, :]
    tl.store(qp, r_lo, mask=qm)
    tl.store(qp + HALF, r_hi, mask=qm)
    # k and v into the cache
    slot = tl.load(slot_ptr + rows, mask=m_mask, other=-1).to(tl.int64)
    blk = tl.where(slot >= 0, slot, 0) // page
    off = tl.where(slot >= 0, slot, 0) % page
    wm = pm & (slot >= 0)[:, None]
    km = wm & ((head >= n_qh) & (head < n_qh + n_kvh))[None, :]
    vm = wm & (head >= n_qh + n_kvh)[None, :]
    kp = kc_ptr + blk[:, None] * s_kc_b + off[:, None] * s_kc_o + ((head - n_qh) * s_kc_h + j)[None, :]
    vp = vc_ptr + blk[:, None] * s_vc_b + off[:, None] * s_vc_o + ((head - n_qh - n_kvh) * s_vc_h + j)[None, :]
    kty = kc_ptr.dtype.element_ty
    vty = vc_ptr.dtype.element_ty
    if KV_FP8:  # per-tensor scales, saturated to e4m3's range
        tl.store(kp, tl.minimum(tl.maximum(r_lo.to(tl.float32) * inv_k_scale, -448.0), 448.0).to(kty), mask=km)
        tl.store(kp + HALF, tl.minimum(tl.maximum(r_hi.to(tl.float32) * inv_k_scale, -448.0), 448.0).to(kty),
                 mask=km)
        tl.store(vp, tl.minimum(tl.maximum(r_lo.to(tl.float32) * inv_v_scale, -448.0), 448.0).to(vty), mask=vm)
        tl.store(vp + HALF, tl.minimum(tl.maximum(r_hi.to(tl.float32) * inv_v_scale, -448.0), 448.0).to(vty),
                 mask=vm)
    else:
        tl.store(kp, r_lo.to(kty), mask=km)
        tl.store(kp + HALF, r_hi.to(kty), mask=km)
        tl.store(vp, r_lo.to(vty), mask=vm)
        tl.store(vp + HALF, r_hi.to(vty), mask=vm)


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters: output columns per program, K per loop step, splits of K (1: no
    workspace), warps, pipelining stages (0: Triton's default), ``tl.dot`` or the broadcast
    product (the latter for M <= 4 only: its accumulator is ``BLOCK_M x BLOCK_N x BLOCK_K``)."""

    block_n: int = 32
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 0
    use_dot: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GemvConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"GemvConfig: unknown keys {sorted(unknown)}")
        cfg = cls(**d)
        for f in ("block_n", "block_k", "split_k", "num_warps"):
            v = getattr(cfg, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"GemvConfig: {f} must be a positive integer, got {v!r}")
        return cfg

    def compile_key(self) -> tuple:
        """What makes a separate Triton compilation (the split count does not)."""
        return (self.block_n, self.block_k, self.num_warps, self.num_stages, self.use_dot)

    def label(self) -> str:
        return (f"N{self.block_n}/K{self.block_k}/S{self.split_k}/w{self.num_warps}/st{self.num_stages or 'd'}"
                f"{'/dot' if self.use_dot else '/fma'}")


def block_m(m: int, use_dot: bool) -> int:
    return max(next_pow2(m), 16) if use_dot else next_pow2(m)


@dataclass(frozen=True)
class RopeKV:
    """What the qkv GEMM's rotary + KV-write epilogue needs (`gemv_triton`'s ``rope``): the
    rows' ``positions`` and ``slot_mapping`` [M] (int64, slot -1: not written), the
    ``cos_sin`` table [max_pos, D] (cos | sin halves, fp32), the paged caches
    [blocks, block_size, n_kv_heads, D] and their per-tensor scales (an fp8 cache's)."""

    positions: torch.Tensor
    cos_sin: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor
    num_heads: int
    num_kv_heads: int
    k_scale: float = 1.0
    v_scale: float = 1.0


def gemv_triton(x: torch.Tensor, w: torch.Tensor, cfg: GemvConfig, *, prologue: str = "none",
                norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                residual: torch.Tensor | None = None,
                rope: RopeKV | None = None, preload: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``y [M, N] = prologue(x) @ w.T`` in x's dtype; returns ``(y, h)`` where ``h`` is the
    rms prologue's residual stream (``x + residual``; ``x`` itself without a residual) and
    None for the other prologues. x: [M, K] ([M, 2K] for ``silu``), w: [N, K].

    ``rope``: w is a fused qkv projection (``N = (Hq + 2 Hkv) D``, q | k | v) and the
    epilogue does `rope_kv_write`'s work: ``y`` is the rotated q ``[M, Hq, D]``, the rotated k
    and v are written into the caches (nothing else of the projection is stored).

    ``preload``: each program's first weight tile loaded before anything else (the same
    products in the same order: bit-identical); default: when launched with programmatic
    dependent launch (kernels/_common.py `PDL`), where the load overlaps the previous kernel."""
    if prologue not in _PRO:
        raise ValueError(f"gemv: prologue must be one of {PROLOGUES}, got {prologue!r}")
    assert x.dim() == 2 and w.dim() == 2, "gemv: x [M, K] and w [N, K]"
    M = x.shape[0]
    N, K = w.shape
    kx = 2 * K if prologue == "silu" else K
    assert x.shape[1] == kx, f"gemv: x has {x.shape[1]} columns, the {prologue} prologue needs {kx}"
    assert x.dtype == w.dtype, f"gemv: x {x.dtype} vs w {w.dtype}"
    check_interpreted(_gemv_kernel, x, w)
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    rp = _rope_args(rope, M, N, x) if rope is not None else None
    y = new_empty((M, rope.num_heads, N // (rope.num_heads + 2 * rope.num_kv_heads)) if rope else (M, N),
                  x.dtype, x.device)
    h = None
    r = nw = hx = x
    s_r = s_h = 0
    if prologue == "rms":
        assert norm_weight is not None and norm_weight.shape == (K,), "gemv: rms prologue needs norm_weight [K]"
        nw = norm_weight.contiguous()
        if residual is not None:
            assert residual.shape == x.shape, "gemv: residual must have x's shape"
            r = residual if residual.stride(-1) == 1 else residual.contiguous()
            h = hx = new_empty(x.shape, x.dtype, x.device)
            s_r, s_h = r.stride(0), h.stride(0)
        else:
            h = x
    if M == 0:
        return y, h
    use_dot = bool(cfg.use_dot)
    BM = block_m(M, use_dot)
    BN = max(next_pow2(cfg.block_n), 16 if use_dot else (2 if rope else 1))
    BK = max(next_pow2(cfg.block_k), 16)
    S = max(1, min(int(cfg.split_k), cdiv(K, BK)))
    tiles = cdiv(cdiv(K, S), BK)  # BLOCK_K tiles per split
    S = cdiv(K, tiles * BK)  # no empty splits
    n_tiles = cdiv(N // 2, BN // 2) if rope else cdiv(N, BN)
    if S > 1:
        from .decode_attention import _counters  # one zeroed per-device counter buffer for both kernels

        ws = new_empty((S, M, N), torch.float32, x.device)
        cnt = _counters(x.device, n_tiles)
    else:
        ws = cnt = y
    extra = {"num_stages": int(cfg.num_stages)} if cfg.num_stages else {}
    if rp is None:
        rp = dict(ptrs=(y, y, y, y, y), ints=(0,) * 10, scales=(1.0, 1.0), const={})
    pdl = _common.pdl_kwargs(x)
    extra["PRELOAD"] = bool(pdl) if preload is None else bool(preload)
    _gemv_kernel[(n_tiles, S)](
        x, r, nw, w, y, hx, ws, cnt,
        *rp["ptrs"],
        M, N, K, tiles, S,
        x.stride(0), s_r, w.stride(0), y.stride(0), s_h,
        *rp["ints"],
        float(eps), *rp["scales"],
        PROLOGUE=_PRO[prologue], HAS_RES=prologue == "rms" and residual is not None,
        USE_DOT=use_dot, DOT_PREC=dot_precision(x.dtype),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        num_warps=int(cfg.num_warps), **rp["const"], **extra, **pdl,
    )
    return y, h


def _rope_args(rope: RopeKV, M: int, N: int, x: torch.Tensor) -> dict:
    """The epilogue's kernel arguments (checked): pointers, integer strides / sizes, scales,
    constexprs."""
    from .reference import check_kv_scales, is_fp8_cache

    hq, hkv = int(rope.num_heads), int(rope.num_kv_heads)
    kc, vc = rope.k_cache, rope.v_cache
    assert N % (hq + 2 * hkv) == 0, f"gemv rope: N={N} is not (Hq + 2 Hkv) heads"
    D = N // (hq + 2 * hkv)
    assert D % 2 == 0 and D == next_pow2(D), f"gemv rope: head_dim {D} must be an even power of two"
    assert kc.dim() == 4 and kc.shape[2:] == (hkv, D) and vc.shape == kc.shape, \
        "gemv rope: caches must be [blocks, bs, Hkv, D]"
    assert kc.stride(-1) == 1 and vc.stride(-1) == 1, "gemv rope: caches must be contiguous in head_dim"
    assert rope.positions.shape == (M,) and rope.slot_mapping.shape == (M,), "gemv rope: positions / slots [M]"
    cs = rope.cos_sin if rope.cos_sin.stride(-1) == 1 else rope.cos_sin.contiguous()
    assert cs.dim() == 2 and cs.shape[1] == D, "gemv rope: cos_sin must be [max_pos, head_dim]"
    check_kv_scales(kc, rope.k_scale, rope.v_scale)
    check_interpreted(_gemv_kernel, x, kc)
    return dict(ptrs=(rope.positions, cs, rope.slot_mapping, kc, vc),
                ints=(cs.stride(0), kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1),
                      vc.stride(2), kc.shape[1], hq, hkv),
                scales=(1.0 / float(rope.k_scale), 1.0 / float(rope.v_scale)),
                const=dict(ROPE=True, HEAD_DIM=D, KV_FP8=is_fp8_cache(kc)))


# ---------------------------------------------------------------------------------- tuning
def gemv_key(dtype: torch.dtype, prologue: str, n: int, k: int, sms: int) -> str:
    return f"{str(dtype).replace('torch.', '')}/{prologue}/n{n}/k{k}/sm{sms}"


def check_entries(entries: dict) -> None:
    """ValueError naming the first bad row of a table's ``gemv_entries``."""
    if not isinstance(entries, dict):
        raise ValueError(f"decode tuning: {GEMV_ENTRIES} must be a mapping")
    for key, rows in entries.items():
        for i, row in enumerate(rows):
            if "m" not in row or "config" not in row:
                raise ValueError(f"decode tuning: {GEMV_ENTRIES}[{key!r}][{i}] needs 'm' and 'config'")
            if row["config"] is not None:
                try:
                    GemvConfig.from_dict(row["config"])
                except (TypeError, ValueError) as e:
                    raise ValueError(f"decode tuning: {GEMV_ENTRIES}[{key!r}][{i}]: {e}") from None


def tuned_config(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device,
                 prologue: str = "none") -> GemvConfig | None:
    """The installed table's config for ``m`` rows of an ``[n, k]`` weight after ``prologue``: the row of the
    smallest tuned M >= ``m`` (its tiles cover ``m``); None (cuBLAS) where that row says
    cuBLAS, past the largest tuned M, or without an entry. Memoised per installed table."""
    from . import decode_attention as da

    table = da.get_tuning()
    return _tuned_cached(int(m), int(n), int(k), dtype, num_sms(device), prologue, (da._EPOCH, id(table)))


@functools.lru_cache(maxsize=4096)
def _tuned_cached(m, n, k, dtype, sms, prologue, _table_id) -> GemvConfig | None:
    from . import decode_attention as da

    entries = (da.get_tuning() or {}).get(GEMV_ENTRIES) or {}
    key = gemv_key(dtype, prologue, n, k, sms)
    rows = entries.get(key)
    if not rows or m < 1:
        return None
    check_entries({key: rows})
    fit = [r for r in rows if int(r["m"]) >= m]
    if not fit:
        return None
    row = min(fit, key=lambda r: int(r["m"]))
    return None if row["config"] is None else GemvConfig.from_dict(row["config"])


def candidates(m: int, n: int, k: int, sms: int) -> list[GemvConfig]:
    """The configs ``gpu_bench.py --sections 15`` times for one shape (few compile keys: the
    split counts are run-time arguments). Broadcast product for m <= 4, ``tl.dot`` always."""
    tiles = []
    if m <= 4:
        bm = next_pow2(m)
        # (st 3: the weight loads software-pipelined; 8 x 1024 at 8 warps: twice the bytes in
        # flight a trip -- the qkv / o / down GEMVs reached 44-59% of copy bandwidth without)
        for bn, bk, wp, st in ((8, 512, 4, 0), (16, 256, 4, 0), (32, 128, 4, 0), (16, 512, 8, 0), (8, 512, 4, 3),
                               (8, 1024, 8, 0)):
            if bm * bn * bk <= 2048 * wp:  # the fp32 accumulator: <= 64 registers a thread
                tiles.append((bn, bk, wp, st, False))
    for bn, bk, wp, st in ((32, 128, 4, 4), (64, 128, 4, 3), (64, 64, 4, 6), (128, 64, 8, 4), (32, 256, 4, 3),
                           (16, 256, 4, 4)):
        if m > 16 or bn <= 64:
            tiles.append((bn, bk, wp, st, True))
    out = []
    for bn, bk, wp, st, dot in tiles:
        tiles_n = cdiv(n, bn)
        splits = [s for s in (1, 2, 4, 8, 16) if s == 1 or (tiles_n * s <= 8 * sms and cdiv(k, s) >= 2 * bk)]
        # no split, and the split counts whose program counts are nearest 1, 2 and 4 per SM (more
        # programs: more weight bytes in flight per SM, and more partials to sum)
        near = {min(splits, key=lambda s: abs(math.log2(tiles_n * s / (w * sms)))) for w in (1, 2, 4)}
        for s in sorted({1, *near}):
            out.append(GemvConfig(block_n=bn, block_k=bk, split_k=s, num_warps=wp, num_stages=st, use_dot=dot))
    return out
