"""servesim.kernels: Triton kernels of the GPU backend, each with a plain-torch reference.

- ``ops.py``: the entry points (``rms_norm``, ``silu_mul``, ``rope_kv_write``,
  ``paged_decode_attention``, ``paged_prefill_attention``, ``quant_fp8_rowwise``, and the decode
  linears ``linear``, ``rms_norm_linear``, ``silu_mul_linear``, ``rms_norm_qkv_rope`` -- rmsnorm,
  qkv, RoPE and the KV write in one kernel), each taking
  ``impl="auto" | "triton" | "torch"``.
- ``reference.py``: the plain-torch references (same signatures, fp32 math).
- ``rmsnorm.py``, ``activation.py``, ``rope.py``, ``decode_attention.py``,
  ``prefill_attention.py``, ``quant.py``, ``gemv.py`` (small-M GEMM, fused prologue, the qkv
  projection's rotary + KV-write epilogue): the
  Triton kernels, imported lazily by ``ops``.

Kept import-light on purpose: importing this package imports neither torch nor triton.
"""
