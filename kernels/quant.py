"""Per-token (row-wise) fp8-e4m3 quantisation of activations (Triton).

Reference: ``reference.quant_fp8_rowwise_ref``. One program per row of ``x [T, K]``: a
first pass over the row finds its absolute maximum, the second writes
``clamp(x / scale, -448, 448)`` as e4m3 with ``scale = max(amax, eps) / 448`` (fp32, one a
row). The fp8 linears of the GPU backend (`gpu_backend/weights.py` ``Fp8Weight``) feed the
result and its scales to ``torch._scaled_mm`` with the weights' per-channel scales.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_interpreted, new_empty

FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_EPS = 1e-12  # a row of zeros (CUDA-graph padding) gets this scale, not 0


@triton.jit
def _quant_fp8_rowwise_kernel(x_ptr, q_ptr, s_ptr, s_x_t, s_q_t, K, eps, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        m = k0 + o < K
        x = tl.load(x_ptr + t * s_x_t + k0 + o, mask=m, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), eps) / 448.0
    inv = 1.0 / scale
    for k0 in range(0, K, BLOCK):
        m = k0 + o < K
        x = tl.load(x_ptr + t * s_x_t + k0 + o, mask=m, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(x * inv, -448.0), 448.0)
        tl.store(q_ptr + t * s_q_t + k0 + o, y.to(q_ptr.dtype.element_ty), mask=m)
    tl.store(s_ptr + t, scale)


def quant_fp8_rowwise_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    assert x.dim() == 2, f"x must be [T, K], got {tuple(x.shape)}"
    check_interpreted(_quant_fp8_rowwise_kernel, x)
    if x.stride(-1) != 1:
        x = x.contiguous()
    T, K = x.shape
    q = torch.empty((T, K), dtype=torch.float8_e4m3fn, device=x.device)
    s = new_empty((T, 1), torch.float32, x.device)
    if T == 0:
        return q, s
    block = min(max(triton.next_power_of_2(K), 16), 4096)
    _quant_fp8_rowwise_kernel[(T,)](x, q, s, x.stride(0), q.stride(0), K, SCALE_EPS, BLOCK=block,
                                    num_warps=4 if block <= 2048 else 8)
    return q, s
