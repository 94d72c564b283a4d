"""GPU power and energy: idle power, plus per iteration a busy level and energy per unit of
work -- bytes moved through HBM and arithmetic done.

    P(iteration) = idle + busy + (memory * t_bytes + kv * t_kv + compute * t_flops) / duration
                   (capped at max_w)

``t_bytes`` is the iteration's weight traffic (each weight read once) over the achievable
HBM bandwidth, ``t_kv`` the KV cache decode attention reads over the same bandwidth, and
``t_flops`` its FLOPs (linear layers over every token, lm_head over the sampled ones,
causal attention over context chunks) over the achievable bf16 matmul rate: the seconds
the work would take at full speed. So ``memory`` is the power above the busy level of a
step streaming weights at the achievable rate, ``kv`` that of the attention kernel
streaming the cache (it computes on what it reads -- scores, softmax, the weighted sum;
the H100 calibrations fit it at 1.8x a weight read's power per byte for Llama-3.2-1B and
0.9-1.25x for Llama-3.1-8B; one term for both had priced the 1B's KV-heavy runs 7-12%
low), and ``compute`` that of one using the
tensor cores at their achievable rate; energy
goes with the work done, not with the time an iteration takes. An iteration that is slow
for reasons other than work -- an eager forward waiting on Python's kernel launches, a
small kernel that cannot fill the GPU -- draws little above the busy level, which is what
the GPU's power draw does (the two-level idle/max model this replaces overestimated
exactly those iterations by 20-40%). Between iterations the GPU draws ``idle``. Energy is
integrated over the run (first arrival to last finish) per GPU; ``energy_per_token_j``
is that energy over the output tokens.

The cap ``max_w`` is the hardware file's ``max_power_w`` (the board's power limit, 700 W on
an H100 SXM) unless a calibration measured more: NVML's energy counter, which the fit
explains, counts more than the power the limit holds (on the H100s here the grid's
prefill runs of 0.3-0.5 s averaged 730-760 W under a 700 W limit; the driver also
reports ~40 W of memory power separately). A cap below what the fit saw would clip
exactly the iterations it was fitted on, so a profile stores the highest average power
of its sustained grid runs (``max_w``) and that is the cap.

On the GPU backend the energy is measured instead (NVML's energy counter over the run);
`fit_power` fits busy, memory and compute to the energies of several such runs (the
calibration grid), given the measured idle power, and `sim calibrate` stores them in the
profile, which the calibrated cost model then uses.
"""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from .schemas import numpy_of


class PowerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # every float finite

    idle_w: float | None = Field(None, gt=0, description="idle power per GPU (null: the calibration profile's, "
                                 "else the hardware file's)")
    busy_w: float | None = Field(None, ge=0, description="power above idle while an iteration runs, before its "
                                 "work (null: the profile's, else 10% of the hardware's max - idle)")
    kv_w: float | None = Field(None, ge=0, description="power above busy of decode attention streaming the KV "
                               "cache at the achievable bandwidth (null: the profile's, else memory_w)")
    memory_w: float | None = Field(None, ge=0, description="power above busy of a step streaming HBM at the "
                                   "achievable bandwidth (null: the profile's, else 45% of max - idle)")
    compute_w: float | None = Field(None, ge=0, description="power above busy of a step at the achievable bf16 "
                                    "matmul rate (null: the profile's, else 90% of max - idle)")
    max_w: float | None = Field(None, gt=0, description="the most an iteration draws, as the energy counter "
                                "sees it (null: the profile's highest sustained grid power, else the hardware "
                                "file's max_power_w)")


# shares of the hardware's (max - idle) power when neither experiment nor profile set them
DEFAULT_SHARES = {"busy_w": 0.10, "memory_w": 0.45, "compute_w": 0.90}
POWER_KEYS = ("idle_w", "busy_w", "memory_w", "compute_w")  # kv_w: optional (older profiles: memory_w)


def roofline_work(it: pa.Table, model, hw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per iteration: (t_flops, t_bytes, t_kv), its FLOPs over the achievable bf16 rate,
    its weight bytes and its KV-cache reads over the achievable bandwidth (module doc)."""
    def col(name):
        return numpy_of(it.column(name)).astype(np.float64) if name in it.column_names else np.zeros(it.num_rows)

    ctx, gen, pad = col("ctx_tokens"), col("gen_tokens"), col("padded_tokens")
    prior, kv = col("ctx_cached_tokens"), col("decode_kv_tokens")
    nctx = col("num_ctx_requests")
    f = model.linear_flops_per_token
    per_layer = f["qkv"] + f["o"] + f["gate_up"] + f["down"]
    tokens = ctx + gen + pad  # padding rows: a decode graph's, or piecewise graphs' (token-wise work only)
    sampled = gen + nctx + np.where(nctx > 0, 0, pad)
    attn = 4.0 * model.num_layers * model.num_heads * model.head_dim * ctx * (prior / np.maximum(nctx, 1) + ctx
                                                                             / np.maximum(2 * nctx, 1))
    flops = model.num_layers * per_layer * tokens + f["lm_head"] * sampled + attn
    t_f = flops / hw.achievable_bf16_flops
    t_b = np.where(tokens > 0, float(model.weight_bytes), 0.0) / hw.achievable_hbm_bytes_per_s
    t_kv = np.where(tokens > 0, kv * model.kv_bytes_per_token, 0.0) / hw.achievable_hbm_bytes_per_s
    return t_f, t_b, t_kv


def iteration_power(dur: np.ndarray, t_f: np.ndarray, t_b: np.ndarray, t_kv: np.ndarray, p: dict,
                    cap_w: float) -> np.ndarray:
    """Watts per iteration (``p``: idle_w, busy_w, memory_w, compute_w and kv_w, which
    defaults to memory_w), at most ``cap_w``."""
    d = np.maximum(np.asarray(dur, dtype=np.float64), 1e-12)
    kv_w = p.get("kv_w")
    kv_w = p["memory_w"] if kv_w is None else kv_w
    w = p["idle_w"] + p["busy_w"] + (p["memory_w"] * t_b + kv_w * t_kv + p["compute_w"] * t_f) / d
    return np.minimum(w, cap_w)


def energy(it: pa.Table, span_s: float, gpus: int, idle_w: float, power_w: np.ndarray) -> float:
    """Joules over `span_s` seconds on `gpus` GPUs: iterations at `power_w`, the rest idle.
    Iterations that overlap in time (the overlap scheduler's) count once: each is charged
    only up to the next one's start."""
    dur = numpy_of(it.column("duration_s"))
    if len(dur) > 1:
        start = numpy_of(it.column("start_s"))
        order = np.argsort(start, kind="stable")
        nxt = np.empty_like(dur)
        nxt[order[:-1]] = start[order[1:]]
        nxt[order[-1]] = np.inf
        if "replica" not in it.column_names or len(set(numpy_of(it.column("replica")).tolist())) == 1:
            dur = np.minimum(dur, np.maximum(nxt - start, 0.0))
    busy = float(dur.sum())
    return float((power_w * dur).sum()) + idle_w * max(span_s * gpus - busy, 0.0)


def run_power_terms(it: pa.Table, t_f: np.ndarray, t_b: np.ndarray, t_kv: np.ndarray) -> tuple[float, ...]:
    """(busy seconds, sum of t_bytes, sum of t_kv, sum of t_flops): a run's regressors."""
    dur = numpy_of(it.column("duration_s")).astype(np.float64)
    return float(dur.sum()), float(np.sum(t_b)), float(np.sum(t_kv)), float(np.sum(t_f))


POWER_TERMS = ("busy_w", "memory_w", "kv_w", "compute_w")  # the fitted terms, in run_power_terms' order


def fit_power(runs: list[tuple[float, ...]], idle_w: float, names: tuple[str, ...] = POWER_TERMS) -> dict:
    """The powers (``names``) that best explain measured run energies.

    `runs`: (energy_j, span_s, *regressors) per run, one regressor per name (by default
    busy_s, bytes_s, kv_s, flops_s). Model: E = idle*span + sum(power_i * regressor_i):
    least squares on relative errors (a short run counts as much as a long one), every
    power >= 0 (every subset of them is tried; the best fit with none negative wins)."""
    k = len(names)
    E = np.array([r[0] for r in runs], dtype=np.float64)
    span = np.array([r[1] for r in runs], dtype=np.float64)
    X = np.array([list(r[2:2 + k]) for r in runs], dtype=np.float64)
    w = 1.0 / np.maximum(E, 1e-9)
    Xw, yw = X * w[:, None], (E - idle_w * span) * w
    best, best_res = np.zeros(k), float(yw @ yw)
    for m in range(k, 0, -1):
        for cols in itertools.combinations(range(k), m):
            c = list(cols)
            sol, *_ = np.linalg.lstsq(Xw[:, c], yw, rcond=None)
            if np.any(sol < 0):
                continue
            x = np.zeros(k)
            x[c] = sol
            r = yw - Xw @ x
            if float(r @ r) < best_res - 1e-15:
                best, best_res = x, float(r @ r)
    return {n: float(v) for n, v in zip(names, best)}
