"""GPU power and energy: a two-state model (idle / busy), the busy power scaled by how
compute-bound the iteration is.

    P(iteration) = idle + (max - idle) * (memory_bound_fraction
                                          + (1 - memory_bound_fraction) * compute_share)

where `compute_share` is the share of the iteration's tokens that are context (prefill)
tokens: a decode-only step streams weights and KV (memory bound, drawing
`memory_bound_fraction` of the dynamic range), a prefill-only step keeps the tensor cores
busy (the full range). Between iterations the GPU draws `idle`. Energy is integrated over
the run (first arrival to last finish) per replica GPU; `energy_per_token_j` is that
energy over the output tokens. On the GPU backend the same keys come from measured power
(NVML) instead, and `fit_power` fits the two busy levels to such a run.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field


class PowerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    idle_w: float | None = Field(None, gt=0, description="idle power per GPU (null: the hardware file's)")
    max_w: float | None = Field(None, gt=0, description="power of a compute-bound step (null: the hardware's max)")
    memory_bound_fraction: float = Field(0.55, ge=0, le=1, description="share of the idle..max range a "
                                         "memory-bound (decode) step draws")


def iteration_power(it: pa.Table, idle_w: float, max_w: float, mem_frac: float) -> np.ndarray:
    ctx = it.column("ctx_tokens").to_numpy().astype(np.float64)
    gen = it.column("gen_tokens").to_numpy().astype(np.float64)
    tot = np.maximum(ctx + gen, 1.0)
    share = ctx / tot
    return idle_w + (max_w - idle_w) * (mem_frac + (1 - mem_frac) * share)


def energy(it: pa.Table, span_s: float, gpus: int, idle_w: float, power_w: np.ndarray) -> float:
    """Joules over `span_s` seconds on `gpus` GPUs: iterations at `power_w`, the rest idle."""
    dur = it.column("duration_s").to_numpy()
    busy = float(dur.sum())
    return float((power_w * dur).sum()) + idle_w * max(span_s * gpus - busy, 0.0)


def fit_power(it: pa.Table, measured_w: np.ndarray, idle_w: float) -> tuple[float, float]:
    """(max_w, memory_bound_fraction) that best explain measured per-iteration power,
    given the idle power: a linear least-squares fit of P - idle = a + b * compute_share."""
    ctx = it.column("ctx_tokens").to_numpy().astype(np.float64)
    gen = it.column("gen_tokens").to_numpy().astype(np.float64)
    share = ctx / np.maximum(ctx + gen, 1.0)
    ok = np.isfinite(measured_w)
    A = np.stack([np.ones(ok.sum()), share[ok]], axis=1)
    (a, b), *_ = np.linalg.lstsq(A, measured_w[ok] - idle_w, rcond=None)
    dyn = a + b  # range used by a compute-bound step
    return idle_w + dyn, float(np.clip(a / dyn, 0, 1)) if dyn > 0 else 0.0
