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

if __name__ == "kernels":
    # This folder imported under its bare name: the checkout's root is on sys.path (`python -m ...`
    # run from it, or a script that put it there to find servesim). That name belongs to the
    # installed distribution of it, if there is one -- Hugging Face's `kernels`, which
    # transformers >= 5 imports whenever it is installed -- so the import is handed to it (the
    # import system returns what sys.modules holds once this module has run); with none
    # installed, this package stays what the name gives.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys
    from pathlib import Path as _Path

    _root = _Path(__file__).resolve().parent.parent

    def _elsewhere(entry: str) -> bool:
        try:
            return _Path(entry or _os.getcwd()).resolve() != _root
        except OSError:
            return True

    _spec = _machinery.PathFinder.find_spec("kernels", [p for p in _sys.path if _elsewhere(p)])
    if _spec is not None and _spec.loader is not None:
        _installed = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _installed
        try:
            _spec.loader.exec_module(_installed)
        except BaseException:
            del _sys.modules["kernels"]  # nothing half-made left under the name
            raise
