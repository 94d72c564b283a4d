"""Fused residual-add + RMSNorm (Triton). Reference: ``reference.rms_norm_ref``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import as_last_dim_contiguous, check_interpreted, new_empty, next_pow2, pdl_kwargs
from ._gdc import gdc_enter


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_res, stride_out, stride_res_out,
    H, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GDC: tl.constexpr = False,  # programmatic dependent launch (kernels/_gdc.py)
):
    if GDC:
        gdc_enter()
    # One program per row; the whole row sits in registers (BLOCK_H >= H).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # The residual stream lives in x.dtype: round the sum before normalising it.
        h = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * stride_res_out + cols, h, mask=mask)
    else:
        h = x
    hf = h.to(tl.float32)
    var = tl.sum(hf * hf, axis=0) / H
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = hf * rstd * w
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    assert x.dim() == 2, f"x must be [T, H], got {tuple(x.shape)}"
    T, H = x.shape
    assert weight.shape == (H,), f"weight must be [{H}], got {tuple(weight.shape)}"
    check_interpreted(_rms_norm_kernel, x)
    x = as_last_dim_contiguous(x)
    weight = weight.contiguous()
    out = new_empty((T, H), x.dtype, x.device)
    if residual is not None:
        assert residual.shape == x.shape, "residual must have x's shape"
        residual = as_last_dim_contiguous(residual)
        res_out = new_empty(out.shape, out.dtype, out.device)
        res_in, s_res, s_res_out = residual, residual.stride(0), res_out.stride(0)
    else:
        res_out = x
        res_in, s_res, s_res_out = x, 0, 0
    if T == 0:
        return out, res_out
    BLOCK_H = next_pow2(H)
    num_warps = min(max(BLOCK_H // 512, 1), 16)
    _rms_norm_kernel[(T,)](
        x, res_in, weight, out, res_out,
        x.stride(0), s_res, out.stride(0), s_res_out,
        H, float(eps),
        HAS_RESIDUAL=residual is not None,
        BLOCK_H=BLOCK_H,
        num_warps=num_warps,
        **pdl_kwargs(x),
    )
    return out, res_out
