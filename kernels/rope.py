"""Fused rotary embedding (neox / HF-Llama ``rotate_half``) + paged KV-cache write (Triton).

Reference: ``reference.rope_kv_write_ref``. One program per token: it rotates all q heads
and all k heads of the token, stores ``q_rot``/``k_rot``, and writes ``k_rot`` and ``v``
into ``k_cache``/``v_cache`` at ``slot_mapping[t]`` unless that slot is -1 (padding). An fp8
(e4m3) cache gets ``clamp(k_rot / k_scale, -448, 448)`` and the same of ``v`` (per-tensor
scales, `reference.kv_quantize`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import as_last_dim_contiguous, check_interpreted, jit_options, new_empty, next_pow2, pdl_kwargs
from ._gdc import gdc_enter
from .reference import check_kv_scales, is_fp8_cache


@triton.jit(**jit_options(no_align=["pos_ptr", "slot_ptr"]))
def _rope_kv_write_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, kc_ptr, vc_ptr, slot_ptr, qo_ptr, ko_ptr,
    s_q_t, s_q_h, s_k_t, s_k_h, s_v_t, s_v_h,
    s_cs,
    s_kc_b, s_kc_o, s_kc_h, s_vc_b, s_vc_o, s_vc_h,
    s_qo_t, s_qo_h, s_ko_t, s_ko_h,
    HQ, HKV, HALF, block_size,
    inv_k_scale, inv_v_scale,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    KV_FP8: tl.constexpr,
    GDC: tl.constexpr = False,  # programmatic dependent launch (kernels/_gdc.py)
):
    if GDC:
        gdc_enter()
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    jm = j < HALF
    cos = tl.load(cs_ptr + pos * s_cs + j, mask=jm, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs_ptr + pos * s_cs + HALF + j, mask=jm, other=0.0).to(tl.float32)[None, :]

    # ---- q: [BLOCK_HQ, BLOCK_HALF] tiles of the two halves ----
    hq = tl.arange(0, BLOCK_HQ)
    mq = (hq < HQ)[:, None] & jm[None, :]
    q_off = t * s_q_t + hq[:, None] * s_q_h + j[None, :]
    q1 = tl.load(q_ptr + q_off, mask=mq, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptr + q_off + HALF, mask=mq, other=0.0).to(tl.float32)
    qo_off = t * s_qo_t + hq[:, None] * s_qo_h + j[None, :]
    qo_ty = qo_ptr.dtype.element_ty
    tl.store(qo_ptr + qo_off, (q1 * cos - q2 * sin).to(qo_ty), mask=mq)
    tl.store(qo_ptr + qo_off + HALF, (q2 * cos + q1 * sin).to(qo_ty), mask=mq)

    # ---- k ----
    hk = tl.arange(0, BLOCK_HKV)
    mk = (hk < HKV)[:, None] & jm[None, :]
    k_off = t * s_k_t + hk[:, None] * s_k_h + j[None, :]
    k1 = tl.load(k_ptr + k_off, mask=mk, other=0.0).to(tl.float32)
    k2 = tl.load(k_ptr + k_off + HALF, mask=mk, other=0.0).to(tl.float32)
    ko_ty = ko_ptr.dtype.element_ty
    kr1 = (k1 * cos - k2 * sin).to(ko_ty)
    kr2 = (k2 * cos + k1 * sin).to(ko_ty)
    ko_off = t * s_ko_t + hk[:, None] * s_ko_h + j[None, :]
    tl.store(ko_ptr + ko_off, kr1, mask=mk)
    tl.store(ko_ptr + ko_off + HALF, kr2, mask=mk)

    # ---- paged cache write (skipped for slot -1) ----
    slot = tl.load(slot_ptr + t).to(tl.int64)
    blk = slot // block_size
    off = slot % block_size
    # (vector compare: the interpreter rejects masks built from a scalar bool)
    write = (tl.zeros([BLOCK_HKV], dtype=tl.int64) + slot) >= 0
    mkw = mk & write[:, None]
    kc_off = blk * s_kc_b + off * s_kc_o + hk[:, None] * s_kc_h + j[None, :]
    kc_ty = kc_ptr.dtype.element_ty
    v_off = t * s_v_t + hk[:, None] * s_v_h + j[None, :]
    v1 = tl.load(v_ptr + v_off, mask=mkw, other=0.0)
    v2 = tl.load(v_ptr + v_off + HALF, mask=mkw, other=0.0)
    vc_off = blk * s_vc_b + off * s_vc_o + hk[:, None] * s_vc_h + j[None, :]
    vc_ty = vc_ptr.dtype.element_ty
    if KV_FP8:  # per-tensor scales, saturated to e4m3's range
        tl.store(kc_ptr + kc_off, tl.minimum(tl.maximum(kr1.to(tl.float32) * inv_k_scale, -448.0), 448.0).to(kc_ty),
                 mask=mkw)
        tl.store(kc_ptr + kc_off + HALF,
                 tl.minimum(tl.maximum(kr2.to(tl.float32) * inv_k_scale, -448.0), 448.0).to(kc_ty), mask=mkw)
        tl.store(vc_ptr + vc_off, tl.minimum(tl.maximum(v1.to(tl.float32) * inv_v_scale, -448.0), 448.0).to(vc_ty),
                 mask=mkw)
        tl.store(vc_ptr + vc_off + HALF,
                 tl.minimum(tl.maximum(v2.to(tl.float32) * inv_v_scale, -448.0), 448.0).to(vc_ty), mask=mkw)
    else:
        tl.store(kc_ptr + kc_off, kr1.to(kc_ty), mask=mkw)
        tl.store(kc_ptr + kc_off + HALF, kr2.to(kc_ty), mask=mkw)
        tl.store(vc_ptr + vc_off, v1.to(vc_ty), mask=mkw)
        tl.store(vc_ptr + vc_off + HALF, v2.to(vc_ty), mask=mkw)


def rope_kv_write_triton(
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
    T, HQ, D = q.shape
    HKV = k.shape[1]
    assert k.shape == (T, HKV, D) and v.shape == (T, HKV, D), "q/k/v shapes disagree"
    assert D % 2 == 0, "head_dim must be even for rotary"
    assert cos_sin.dim() == 2 and cos_sin.shape[1] == D, "cos_sin must be [max_pos, head_dim]"
    assert k_cache.dim() == 4 and k_cache.shape[2:] == (HKV, D), "k_cache must be [blocks, bs, Hkv, D]"
    assert v_cache.shape == k_cache.shape, "v_cache must match k_cache"
    assert positions.shape == (T,) and slot_mapping.shape == (T,), "positions/slot_mapping must be [T]"
    check_interpreted(_rope_kv_write_kernel, q, k_cache)
    check_kv_scales(k_cache, k_scale, v_scale)
    q, k, v = (as_last_dim_contiguous(t) for t in (q, k, v))
    cos_sin = as_last_dim_contiguous(cos_sin)
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "caches must be contiguous in head_dim"
    q_rot = new_empty((T, HQ, D), q.dtype, q.device)
    k_rot = new_empty((T, HKV, D), k.dtype, k.device)
    if T == 0:
        return q_rot, k_rot
    HALF = D // 2
    BLOCK_HQ, BLOCK_HKV, BLOCK_HALF = next_pow2(HQ), next_pow2(HKV), next_pow2(HALF)
    num_warps = min(max(BLOCK_HQ * BLOCK_HALF // 1024, 1), 8)
    _rope_kv_write_kernel[(T,)](
        q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, q_rot, k_rot,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        q_rot.stride(0), q_rot.stride(1), k_rot.stride(0), k_rot.stride(1),
        HQ, HKV, HALF, k_cache.shape[1],
        1.0 / float(k_scale), 1.0 / float(v_scale),
        BLOCK_HQ=BLOCK_HQ, BLOCK_HKV=BLOCK_HKV, BLOCK_HALF=BLOCK_HALF, KV_FP8=is_fp8_cache(k_cache),
        num_warps=num_warps,
        **pdl_kwargs(q),
    )
    return q_rot, k_rot
