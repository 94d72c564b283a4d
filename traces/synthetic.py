"""Synthetic workloads: arrival processes and length distributions (numpy only).

Every random function takes a ``numpy.random.Generator``; the same generator state
gives the same numbers. Arrival times start at 0 (the first request arrives at t=0 and
the next ``n - 1`` inter-arrival gaps follow), so a process of rate ``r`` over ``n``
requests spans about ``(n - 1) / r`` seconds.

Lengths are int64 tokens clipped to ``[lo, hi]`` (``hi=None``: no upper bound; ``lo``
is at least 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from servesim.traces.schema import MAX_LENGTH, make_workload

if TYPE_CHECKING:
    import pandas as pd

# ---------------------------------------------------------------------- arrivals


def _from_gaps(gaps: np.ndarray) -> np.ndarray:
    out = np.zeros(gaps.size + 1, dtype=np.float64)
    np.cumsum(gaps, out=out[1:])
    return out


def _check_n(n: int) -> None:
    if n < 0:
        raise ValueError(f"number of requests must be >= 0, got {n}")


def _check_pos(name: str, value: float) -> None:
    if not (value > 0 and np.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value}")


def poisson_arrivals(n: int, rate_req_s: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson process: exponential inter-arrival gaps of mean ``1 / rate_req_s``."""
    _check_n(n)
    _check_pos("rate_req_s", rate_req_s)
    if n == 0:
        return np.zeros(0)
    return _from_gaps(rng.exponential(1.0 / rate_req_s, size=n - 1))


def gamma_arrivals(n: int, rate_req_s: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Gamma renewal process: gaps of mean ``1 / rate_req_s`` and coefficient of
    variation ``cv`` (std / mean): shape ``1 / cv**2``, scale ``cv**2 / rate_req_s``.
    ``cv = 1`` is Poisson, ``cv > 1`` burstier, ``cv < 1`` more regular."""
    _check_n(n)
    _check_pos("rate_req_s", rate_req_s)
    _check_pos("cv", cv)
    if n == 0:
        return np.zeros(0)
    shape = 1.0 / (cv * cv) if cv * cv > 0 else np.inf
    scale = 1.0 / (rate_req_s * shape) if rate_req_s * shape > 0 else np.inf
    if not (np.isfinite(shape) and np.isfinite(scale) and scale > 0):
        raise ValueError(f"a gamma process of rate {rate_req_s:g} and cv {cv:g} is beyond floating point "
                         f"(shape 1/cv^2 = {shape:g}, scale = {scale:g})")
    return _from_gaps(rng.gamma(shape, scale, size=n - 1))


def fixed_arrivals(n: int, rate_req_s: float) -> np.ndarray:
    """One request every ``1 / rate_req_s`` seconds."""
    _check_n(n)
    _check_pos("rate_req_s", rate_req_s)
    return np.arange(n, dtype=np.float64) / rate_req_s


def offline_arrivals(n: int) -> np.ndarray:
    """Every request at t = 0 (offline / batch throughput runs)."""
    _check_n(n)
    return np.zeros(n, dtype=np.float64)


# ---------------------------------------------------------------------- lengths


def clip_lengths(x: np.ndarray, lo: int = 1, hi: int | None = None) -> np.ndarray:
    """Round to the nearest integer and clip to ``[max(lo, 1), hi]``. ValueError for a
    value that is not a number or, after clipping, longer than ``schema.MAX_LENGTH`` (a
    cast to int64 would wrap it around to a negative length)."""
    lo = max(int(lo), 1)
    if hi is not None and hi < lo:
        raise ValueError(f"length bounds are empty: min {lo} > max {hi}")
    out = np.clip(np.rint(np.asarray(x, dtype=np.float64)), lo, hi if hi is not None else np.inf)
    if out.size and not (out.max() <= MAX_LENGTH):  # also NaN
        bad = out[~(out <= MAX_LENGTH)][0]
        raise ValueError(f"a drawn length of {bad:.3g} tokens is beyond the largest length, {MAX_LENGTH:,}: "
                         "give the distribution a 'max' (or smaller parameters)")
    return out.astype(np.int64)


def constant_lengths(n: int, value: int, lo: int = 1, hi: int | None = None) -> np.ndarray:
    return clip_lengths(np.full(n, value, dtype=np.float64), lo, hi)


def uniform_lengths(n: int, low: int, high: int, rng: np.random.Generator, lo: int = 1, hi: int | None = None) -> np.ndarray:
    """Integers uniform on ``[low, high]`` (both inclusive)."""
    if high < low:
        raise ValueError(f"uniform lengths need low <= high, got {low} > {high}")
    return clip_lengths(rng.integers(low, high + 1, size=n), lo, hi)


def lognormal_lengths(
    n: int, mean: float, sigma: float, rng: np.random.Generator, lo: int = 1, hi: int | None = None
) -> np.ndarray:
    """Log-normal with arithmetic mean ``mean`` (tokens, before rounding and clipping) and
    shape ``sigma`` (std of the log): ``log X ~ Normal(ln(mean) - sigma**2 / 2, sigma)``.
    The median is ``mean * exp(-sigma**2 / 2)``; ``sigma = 0`` is a constant."""
    _check_pos("mean", mean)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    mu = np.log(mean) - 0.5 * sigma * sigma
    return clip_lengths(rng.lognormal(mu, sigma, size=n), lo, hi)


def zipf_lengths(n: int, a: float, hi: int, rng: np.random.Generator, lo: int = 1) -> np.ndarray:
    """Bounded Zipf: ``P(k) ∝ k**-a`` for integers ``lo <= k <= hi`` (any ``a > 0``)."""
    _check_pos("a", a)
    lo = max(int(lo), 1)
    if hi < lo:
        raise ValueError(f"zipf lengths need min <= max, got {lo} > {hi}")
    k = np.arange(lo, hi + 1, dtype=np.float64)
    cdf = np.cumsum(k**-a)
    cdf /= cdf[-1]
    idx = np.searchsorted(cdf, rng.random(n), side="right")
    return (np.minimum(idx, k.size - 1) + lo).astype(np.int64)


def empirical_lengths(
    n: int, values: np.ndarray, rng: np.random.Generator, lo: int = 1, hi: int | None = None
) -> np.ndarray:
    """Sampled with replacement from ``values`` (e.g. a trace's prompt lengths)."""
    values = np.asarray(values)
    if values.size == 0:
        raise ValueError("cannot sample lengths from an empty set of values")
    return clip_lengths(values[rng.integers(0, values.size, size=n)], lo, hi)


# ---------------------------------------------------------------------- workload


def synthetic_workload(arrival_s: np.ndarray, prompt_len: np.ndarray, output_len: np.ndarray) -> pd.DataFrame:
    """A workload table from generated columns (request_id 0..N-1)."""
    if not (len(arrival_s) == len(prompt_len) == len(output_len)):
        raise ValueError("arrival_s, prompt_len and output_len must have the same length")
    return make_workload(arrival_s, prompt_len, output_len)
