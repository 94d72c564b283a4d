"""SiLU-and-multiply of the fused gate/up projection (Triton). Reference: ``reference.silu_mul_ref``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import as_last_dim_contiguous, check_interpreted, new_empty, next_pow2, pdl_kwargs
from ._gdc import gdc_enter


@triton.jit
def _silu_mul_kernel(
    gu_ptr, out_ptr,
    stride_gu, stride_out,
    I,
    BLOCK: tl.constexpr,
    GDC: tl.constexpr = False,  # programmatic dependent launch (kernels/_gdc.py)
):
    if GDC:
        gdc_enter()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + I + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul_triton(gate_up: torch.Tensor, block: int | None = None) -> torch.Tensor:
    assert gate_up.dim() == 2 and gate_up.shape[1] % 2 == 0, (
        f"gate_up must be [T, 2I], got {tuple(gate_up.shape)}"
    )
    check_interpreted(_silu_mul_kernel, gate_up)
    gate_up = as_last_dim_contiguous(gate_up)
    T, I = gate_up.shape[0], gate_up.shape[1] // 2
    out = new_empty((T, I), gate_up.dtype, gate_up.device)
    if T == 0 or I == 0:
        return out
    BLOCK = block or min(next_pow2(I), 1024)
    num_warps = 4 if BLOCK >= 512 else (2 if BLOCK >= 128 else 1)
    grid = (T, triton.cdiv(I, BLOCK))
    _silu_mul_kernel[grid](gate_up, out, gate_up.stride(0), out.stride(0), I, BLOCK=BLOCK, num_warps=num_warps,
                            **pdl_kwargs(gate_up))
    return out
