"""Small helpers shared by the kernel modules and the dispatcher (no triton import here).

Triton decides between compiling and interpreting when a ``@triton.jit`` function is
*defined* (``TRITON_INTERPRET`` is read at decoration time).  The Triton kernel modules of
this package are therefore only imported on first use by :mod:`servesim.kernels.ops`, so
setting ``TRITON_INTERPRET=1`` any time before the first Triton call is enough.
"""

from __future__ import annotations

import functools
import os

import torch

H100_NUM_SMS = 132


# Test hook: when True, every output / workspace tensor the kernel wrappers allocate is
# filled with NaN first, so a test can show that the kernels write every element.
POISON_OUTPUTS = False


def new_empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs and workspaces (NaN-filled under POISON_OUTPUTS)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS and t.is_floating_point():
        t.fill_(float("nan"))
    return t


# Programmatic dependent launch (Hopper+): when on, the decode-path Triton kernels (the small-M
# GEMM, rmsnorm, RoPE + KV write, silu_mul, decode attention) are launched with
# ``launch_pdl=True`` and begin with ``griddepcontrol.wait`` (``GDC``), so a kernel's CTAs are
# resident -- and the GEMM's first weight tile in flight -- while its predecessor drains; each
# then signals ``launch_dependents`` once its own wait has returned. Every kernel launched this
# way waits before it reads or writes anything another kernel touches (the weights, which no
# kernel writes, are the only pre-wait reads), so results are bit-identical to a plain launch.
# Off by default; ``programmatic_launch(True)`` around a CUDA-graph capture turns it on.
PDL = False


class programmatic_launch:
    """Context manager: the decode-path kernels launched with programmatic dependent launch
    (``on``) or without, inside the block (kernels/_common.py `PDL`)."""

    def __init__(self, on: bool = True):
        self.on = bool(on)

    def __enter__(self):
        global PDL
        self._was, PDL = PDL, self.on
        return self

    def __exit__(self, *exc):
        global PDL
        PDL = self._was
        return False


def pdl_kwargs(x: torch.Tensor) -> dict:
    """The launch keywords of a GDC-aware kernel: ``GDC`` (the kernel's constexpr: emit the
    wait / launch_dependents instructions) and ``launch_pdl``, on a CUDA tensor while `PDL` is on;
    nothing otherwise (Triton's CPU interpreter has no grid dependency control)."""
    if PDL and x.is_cuda:
        return {"GDC": True, "launch_pdl": True}
    return {}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def use_triton(impl: str, x: torch.Tensor) -> bool:
    """Resolve ``impl`` ("triton" | "torch" | "auto") for an op whose main input is ``x``."""
    if impl == "torch":
        return False
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' requested but triton is not importable")
        if not x.is_cuda and not interpret_requested():
            raise RuntimeError(
                "impl='triton' on a CPU tensor needs Triton's interpreter: set "
                "TRITON_INTERPRET=1 before servesim.kernels runs its first Triton kernel"
            )
        return True
    if impl == "auto":
        # Triton on a GPU; on a CPU the torch reference. The interpreter (TRITON_INTERPRET=1)
        # is orders of magnitude slower than torch, so it runs only when asked for by name
        # (impl="triton"), as the kernel tests do -- a process-wide env var must not slow
        # every model forward in the same process down.
        return triton_available() and x.is_cuda
    raise ValueError(f"impl must be 'triton', 'torch' or 'auto', got {impl!r}")


def check_interpreted(kernel, *tensors: torch.Tensor) -> None:
    """Clear errors for what Triton's CPU interpreter cannot run, instead of garbage.

    CPU tensors need the kernel module to have been imported under TRITON_INTERPRET=1, and
    the interpreter computes bf16 attention wrongly (seen with triton 3.9), so bf16 on CPU
    is refused: use fp32/fp16 there, or impl="torch".
    """
    if tensors[0].is_cuda:
        return
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            "servesim.kernels: the Triton kernels were imported without TRITON_INTERPRET=1, "
            "so they cannot run on CPU tensors; set TRITON_INTERPRET=1 before the first "
            "import of a servesim.kernels Triton module (e.g. in conftest.py)"
        )
    if any(t.dtype == torch.bfloat16 for t in tensors):
        raise TypeError(
            "servesim.kernels: Triton's CPU interpreter does not compute bf16 correctly; "
            "use float32/float16 on CPU, or impl='torch'"
        )


@functools.lru_cache(maxsize=None)
def _cuda_num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; the H100's 132 for CPU (interpreter) tensors."""
    if device.type == "cuda":
        return _cuda_num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return H100_NUM_SMS


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 products for fp32 inputs (no silent TF32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def as_last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def jit_options(no_specialize=(), no_align=()) -> dict:
    """Keyword arguments for ``triton.jit`` that keep per-iteration values out of the
    compilation key. Triton compiles a new variant when an integer argument changes
    between 1 / a multiple of 16 / anything else, and when a pointer argument's 16-byte
    alignment changes. Block tables, sequence lengths, positions and slot maps are small
    views into one packed host-to-device buffer, so their alignment varies from iteration
    to iteration: specialising on it made a serving run meet new variants -- a Triton
    compilation of a second or so -- in the middle of the run. They are read as scalars,
    so the alignment hint buys nothing there."""
    import inspect

    import triton

    kw = {"do_not_specialize": list(no_specialize)}
    if no_align and "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters:
        kw["do_not_specialize_on_alignment"] = list(no_align)
    return kw
