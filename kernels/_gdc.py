"""Grid dependency control for programmatic dependent launch (kernels/_common.py `PDL`).

``gdc_enter()`` -- ``griddepcontrol.wait`` (every memory operation of the preceding kernel is
done and visible), then ``griddepcontrol.launch_dependents`` (the next kernel, launched with
``launch_pdl``, may start its CTAs: its own wait keeps it from reading what this one writes).
Call it under a ``GDC`` constexpr only: Triton's CPU interpreter has no such instructions.
Triton builds without ``triton.language.extra.cuda.gdc_*`` get no-ops, and `AVAILABLE` False.
"""

from __future__ import annotations

import triton

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    AVAILABLE = True
except ImportError:  # pragma: no cover - older Triton
    AVAILABLE = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


@triton.jit
def gdc_enter():
    gdc_wait()
    gdc_launch_dependents()
