"""GPU power and energy: a two-state model (idle / busy), the busy power scaled by how
compute-bound the iteration is.

    P(iteration) = idle + (max - idle) * (memory_bound_fraction
                                          + (1 - memory_bound_fraction) * compute_share)

`compute_share` is the share of the iteration's roofline time that is arithmetic:
t_flops / (t_flops + t_bytes), with t_flops = FLOPs / achievable matmul rate (linear
layers over every token, lm_head over the sampled ones, causal attention over context
chunks) and t_bytes = bytes / achievable bandwidth (weights once, the KV cache that decode
attention reads). A batch-1 decode step is ~0 (streams weights: memory bound), a long
prefill ~1 (tensor cores busy), a batch-256 decode in between -- which is what the GPU's
power draw does. Between iterations the GPU draws `idle`. Energy is integrated over the
run (first arrival to last finish) per GPU; `energy_per_token_j` is that energy over the
output tokens.

On the GPU backend the energy is measured instead (NVML's energy counter over the run);
`fit_power` fits the model's two busy levels to the energies of several such runs (the
calibration grid), given the measured idle power, and `sim calibrate` stores them in the
profile, which the calibrated cost model then uses.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field


class PowerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    idle_w: float | None = Field(None, gt=0, description="idle power per GPU (null: the calibration profile's, "
                                 "else the hardware file's)")
    max_w: float | None = Field(None, gt=0, description="power of a compute-bound step (null: the profile's, "
                                "else the hardware's max)")
    memory_bound_fraction: float | None = Field(None, ge=0, le=1, description="share of the idle..max range a "
                                                "memory-bound (decode) step draws (null: the profile's, else 0.55)")


DEFAULT_MEMORY_BOUND_FRACTION = 0.55


def compute_share(it: pa.Table, model, hw) -> np.ndarray:
    """Per iteration: t_flops / (t_flops + t_bytes) of its roofline (see the module doc)."""
    def col(name):
        return it.column(name).to_numpy().astype(np.float64) if name in it.column_names else np.zeros(it.num_rows)

    ctx, gen, pad = col("ctx_tokens"), col("gen_tokens"), col("padded_tokens")
    prior, kv = col("ctx_cached_tokens"), col("decode_kv_tokens")
    nctx = col("num_ctx_requests")
    f = model.linear_flops_per_token
    per_layer = f["qkv"] + f["o"] + f["gate_up"] + f["down"]
    tokens = ctx + gen + pad
    sampled = gen + pad + nctx
    attn = 4.0 * model.num_layers * model.num_heads * model.head_dim * ctx * (prior / np.maximum(nctx, 1) + ctx
                                                                             / np.maximum(2 * nctx, 1))
    flops = model.num_layers * per_layer * tokens + f["lm_head"] * sampled + attn
    t_f = flops / hw.achievable_bf16_flops
    t_b = (model.weight_bytes + kv * model.kv_bytes_per_token) / hw.achievable_hbm_bytes_per_s
    return t_f / np.maximum(t_f + t_b, 1e-30)


def iteration_power(share: np.ndarray, idle_w: float, max_w: float, mem_frac: float) -> np.ndarray:
    return idle_w + (max_w - idle_w) * (mem_frac + (1 - mem_frac) * share)


def energy(it: pa.Table, span_s: float, gpus: int, idle_w: float, power_w: np.ndarray) -> float:
    """Joules over `span_s` seconds on `gpus` GPUs: iterations at `power_w`, the rest idle.
    Iterations that overlap in time (the overlap scheduler's) count once: each is charged
    only up to the next one's start."""
    dur = it.column("duration_s").to_numpy()
    if len(dur) > 1:
        start = it.column("start_s").to_numpy()
        order = np.argsort(start, kind="stable")
        nxt = np.empty_like(dur)
        nxt[order[:-1]] = start[order[1:]]
        nxt[order[-1]] = np.inf
        if "replica" not in it.column_names or len(set(it.column("replica").to_numpy().tolist())) == 1:
            dur = np.minimum(dur, np.maximum(nxt - start, 0.0))
    busy = float(dur.sum())
    return float((power_w * dur).sum()) + idle_w * max(span_s * gpus - busy, 0.0)


def run_power_terms(it: pa.Table, share: np.ndarray) -> tuple[float, float]:
    """(busy seconds, sum of duration x compute_share): the run's two regressors."""
    dur = it.column("duration_s").to_numpy().astype(np.float64)
    return float(dur.sum()), float((dur * share).sum())


def fit_power(runs: list[tuple[float, float, float, float]], idle_w: float) -> tuple[float, float]:
    """(max_w, memory_bound_fraction) that best explain measured run energies.

    `runs`: (energy_j, span_s, busy_s, busy_share_s) per run, with busy_share_s the sum of
    iteration duration x compute_share. Model: E = idle*span + a*busy + b*busy_share with
    a = (max-idle)*frac, b = (max-idle)*(1-frac): a least-squares fit of a and b (>= 0)
    on relative errors."""
    E = np.array([r[0] for r in runs], dtype=np.float64)
    span = np.array([r[1] for r in runs], dtype=np.float64)
    X = np.array([[r[2], r[3]] for r in runs], dtype=np.float64)
    y = E - idle_w * span
    w = 1.0 / np.maximum(E, 1e-9)  # relative error: short runs count as much as long ones
    Xw, yw = X * w[:, None], y * w
    (a, b), *_ = np.linalg.lstsq(Xw, yw, rcond=None)
    if a < 0 or b < 0:  # non-negative: keep the one term that fits alone
        k = 1 if a < 0 else 0
        c = max(float(Xw[:, k] @ yw / max(Xw[:, k] @ Xw[:, k], 1e-30)), 0.0)
        a, b = (0.0, c) if k == 1 else (c, 0.0)
    a, b = float(a), float(b)
    dyn = a + b
    return idle_w + dyn, float(a / dyn) if dyn > 0 else 0.0
