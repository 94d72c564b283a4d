"""The ``workload:`` section of an experiment file, and the builder that turns it into
a workload table.

Either replay a trace::

    workload:
      trace: azure_conv           # bundled name (azure_conv, mooncake_conv) or a path to
                                  # .csv/.parquet/.jsonl, relative to the experiment's folder
      format: auto                # auto|azure|table|mooncake
      arrival: {kind: trace}      # trace (the file's own times)|offline|poisson|gamma|fixed
      rate_scale: 1.0             # 2.0 = twice the request rate (gaps halved)
      target_rate_req_s: null     # or: rescale to this mean rate (not with rate_scale)
      num_requests: null          # keep the first N
      window_s: null              # [start, end): keep arrivals in it, start becomes t=0
      max_prompt_len: null        # truncate longer prompts
      max_output_len: null        # truncate longer outputs
      hash_block_size: null       # block size of block_hashes in a CSV table without one
      slo: {ttft_s: null, tpot_s: null}   # defaults for rows without their own

or generate one::

    workload:
      synthetic:
        num_requests: 1000
        arrival: {kind: gamma, rate_req_s: 5, cv: 2}
        prompt_len: {kind: lognormal, mean: 1000, sigma: 0.8, max: 8192}
        output_len: {kind: empirical, trace: azure_conv}
      max_output_len: 1024

Arrival kinds: ``offline`` (all at t=0), ``poisson {rate_req_s}``, ``gamma {rate_req_s,
cv}`` (cv = coefficient of variation of the gaps; 1 = Poisson), ``fixed {rate_req_s}``,
and, for a trace only, ``trace``. Length kinds (each also takes ``min`` (default 1) and
``max`` (default none) clip bounds; a bare integer means ``constant``): ``constant
{value}``, ``uniform {low, high}`` (inclusive), ``lognormal {mean, sigma}`` (arithmetic
mean in tokens, sigma = std of the log), ``zipf {a, max}`` (P(k) ∝ k^-a on [min, max]),
``empirical {trace, format, column}`` (sampled with replacement from a trace's
``prompt_len`` / ``output_len``; ``column`` defaults to the one being generated).

Steps, in order: load or generate -> window_s -> num_requests -> arrival override ->
rate_scale / target_rate_req_s -> max_*_len -> slo defaults -> request_id 0..N-1.
Random draws come from independent streams of ``seed`` (arrivals, prompt lengths, output
lengths, arrival override), so changing one distribution leaves the others' draws alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
import pandas as pd
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from servesim.sim.types import ConfigError
from servesim.traces import synthetic, transforms
from servesim.traces.fingerprint import workload_fingerprint
from servesim.traces.readers import read_trace, resolve_trace
from servesim.traces.schema import validate_workload

__all__ = [
    "WorkloadConfig",
    "SyntheticConfig",
    "SloDefaults",
    "build_workload",
    "parse_workload_config",
    "config_error_from_validation",
    "workload_fingerprint",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------- arrivals


class TraceArrival(_Strict):
    """Keep the arrival times of the trace."""

    kind: Literal["trace"] = "trace"


class OfflineArrival(_Strict):
    """Every request at t = 0."""

    kind: Literal["offline"] = "offline"


class PoissonArrival(_Strict):
    kind: Literal["poisson"] = "poisson"
    rate_req_s: float = Field(gt=0, allow_inf_nan=False, description="mean arrival rate, requests per second")


class GammaArrival(_Strict):
    kind: Literal["gamma"] = "gamma"
    rate_req_s: float = Field(gt=0, allow_inf_nan=False, description="mean arrival rate, requests per second")
    cv: float = Field(gt=0, allow_inf_nan=False, description="coefficient of variation of the gaps (1 = Poisson)")


class FixedArrival(_Strict):
    kind: Literal["fixed"] = "fixed"
    rate_req_s: float = Field(gt=0, allow_inf_nan=False, description="one request every 1/rate seconds")


GeneratedArrival = Annotated[
    Union[OfflineArrival, PoissonArrival, GammaArrival, FixedArrival], Field(discriminator="kind")
]
Arrival = Annotated[
    Union[TraceArrival, OfflineArrival, PoissonArrival, GammaArrival, FixedArrival], Field(discriminator="kind")
]


# ---------------------------------------------------------------------- lengths


class _Length(_Strict):
    min: int = Field(1, ge=1, description="clip: smallest length")
    max: int | None = Field(None, ge=1, description="clip: largest length (none: unbounded)")

    @model_validator(mode="after")
    def _bounds(self):
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self


class ConstantLength(_Length):
    kind: Literal["constant"] = "constant"
    value: int = Field(ge=1)


class UniformLength(_Length):
    kind: Literal["uniform"] = "uniform"
    low: int = Field(ge=1)
    high: int = Field(ge=1)

    @model_validator(mode="after")
    def _order(self):
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        return self


class LognormalLength(_Length):
    kind: Literal["lognormal"] = "lognormal"
    mean: float = Field(gt=0, allow_inf_nan=False, description="arithmetic mean in tokens (before clipping)")
    sigma: float = Field(ge=0, allow_inf_nan=False, description="standard deviation of log(length)")


class ZipfLength(_Length):
    kind: Literal["zipf"] = "zipf"
    a: float = Field(gt=0, allow_inf_nan=False, description="exponent: P(k) ∝ k^-a on [min, max]")
    max: int = Field(ge=1, le=10_000_000, description="largest length (required: the support is finite)")


class EmpiricalLength(_Length):
    kind: Literal["empirical"] = "empirical"
    trace: str = Field(description="bundled trace name or path whose lengths are resampled")
    format: Literal["auto", "azure", "table", "mooncake"] = "auto"
    column: Literal["prompt_len", "output_len"] | None = Field(
        None, description="which lengths of the trace (default: the one being generated)"
    )


def _int_is_constant(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool):
        return {"kind": "constant", "value": v}
    return v


Length = Annotated[
    Union[ConstantLength, UniformLength, LognormalLength, ZipfLength, EmpiricalLength],
    Field(discriminator="kind"),
    BeforeValidator(_int_is_constant),
]


# ---------------------------------------------------------------------- workload


class SyntheticConfig(_Strict):
    num_requests: int = Field(gt=0, le=100_000_000)
    arrival: GeneratedArrival
    prompt_len: Length
    output_len: Length


class SloDefaults(_Strict):
    ttft_s: float | None = Field(None, gt=0, allow_inf_nan=False, description="time-to-first-token SLO, seconds")
    tpot_s: float | None = Field(None, gt=0, allow_inf_nan=False, description="time-per-output-token SLO, seconds")


class WorkloadConfig(_Strict):
    trace: str | None = Field(None, description="bundled trace name or a path relative to the experiment file")
    format: Literal["auto", "azure", "table", "mooncake"] = "auto"
    synthetic: SyntheticConfig | None = None
    arrival: Arrival = Field(default_factory=TraceArrival)
    rate_scale: float = Field(1.0, gt=0, allow_inf_nan=False)
    target_rate_req_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    num_requests: int | None = Field(None, gt=0)
    window_s: tuple[Annotated[float, Field(ge=0, allow_inf_nan=False)], Annotated[float, Field(gt=0)]] | None = None
    max_prompt_len: int | None = Field(None, ge=1)
    max_output_len: int | None = Field(None, ge=1)
    hash_block_size: int | None = Field(None, gt=0)
    slo: SloDefaults = Field(default_factory=SloDefaults)

    @model_validator(mode="after")
    def _consistent(self):
        if (self.trace is None) == (self.synthetic is None):
            raise ValueError("give exactly one of 'trace' (a file to replay) or 'synthetic' (a generated workload)")
        if self.synthetic is not None:
            if self.arrival.kind != "trace":
                raise ValueError("with 'synthetic', set the arrival process in synthetic.arrival, not in 'arrival'")
            if self.format != "auto":
                raise ValueError("'format' applies to 'trace' only")
        if self.target_rate_req_s is not None and self.rate_scale != 1.0:
            raise ValueError("give 'rate_scale' or 'target_rate_req_s', not both")
        return self

    @field_validator("window_s")
    @classmethod
    def _window(cls, w):
        if w is not None and not w[1] > w[0]:
            raise ValueError(f"must be [start, end) with start < end, got {list(w)}")
        return w


# ---------------------------------------------------------------------- parsing


def parse_workload_config(data: Any, source: str = "", prefix: str = "workload") -> WorkloadConfig:
    """Validate a ``workload:`` mapping; every problem becomes a ConfigError entry
    located at ``source: workload.key.path``."""
    try:
        return WorkloadConfig.model_validate(data)
    except ValidationError as e:
        raise config_error_from_validation(e, data, source, prefix) from None


def config_error_from_validation(err: ValidationError, data: Any, source: str = "", prefix: str = "") -> ConfigError:
    """One (location, message) per pydantic error. Locations are dotted key paths
    (``workload.synthetic.arrival.rate_req_s``, ``workload.window_s[1]``) with the
    discriminated-union tags pydantic inserts (``poisson`` ...) left out."""
    problems = []
    for item in err.errors():
        path = _key_path(item["loc"], data, prefix)
        loc = f"{source}: {path}" if source and path else (source or path)
        msg = item["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        elif item["type"] == "union_tag_not_found":
            msg = f"missing key {item.get('ctx', {}).get('discriminator', 'kind').strip(chr(39))!r}"
        elif item["type"] == "missing":
            msg = "missing key"
        elif item["type"] not in ("missing", "union_tag_invalid", "union_tag_not_found") and "input" in item:
            inp = item["input"]
            if not isinstance(inp, (dict, list)):
                msg = f"{msg}, got {inp!r}"
        problems.append((loc, msg))
    return ConfigError(problems)


def _key_path(loc: tuple, data: Any, prefix: str) -> str:
    parts: list[str] = [prefix] if prefix else []
    node = data
    for item in loc:
        if isinstance(item, str) and isinstance(node, dict) and item not in node and node.get("kind") == item:
            continue  # a union tag, not a key of the input
        if isinstance(item, str) and node is not None and not isinstance(node, (dict, list, tuple)):
            break  # a scalar shorthand (``prompt_len: 0``) expanded by a validator: the path ends here
        if isinstance(item, int):
            parts.append(f"[{item}]")
            node = node[item] if isinstance(node, (list, tuple)) and item < len(node) else None
        else:
            parts.append(f".{item}" if parts else str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts)


# ---------------------------------------------------------------------- builder


def build_workload(cfg: WorkloadConfig, base_dir: Path | str, seed: int, *, config_source: str = "") -> pd.DataFrame:
    """The workload table described by ``cfg`` (a pure function of ``cfg``, the files it
    names and ``seed``). Relative paths are resolved against ``base_dir`` (the experiment
    file's folder). request_id is 0..N-1 in arrival order. Errors about config keys are
    located at ``config_source: workload.key`` (trace-file errors name the file)."""
    try:
        return _build(cfg, Path(base_dir), seed)
    except ConfigError as e:
        if not config_source:
            raise
        problems = [(f"{config_source}: {loc}" if loc.startswith("workload") else loc, msg) for loc, msg in e.problems]
        raise ConfigError(problems) from None


def _build(cfg: WorkloadConfig, base_dir: Path, seed: int) -> pd.DataFrame:
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)]
    rng_arrival, rng_prompt, rng_output, rng_override = streams

    if cfg.trace is not None:
        path = _trace_path(cfg.trace, base_dir, "workload.trace")
        fmt = cfg.format
        if fmt == "auto":
            fmt = resolve_trace(cfg.trace, base_dir)[1] or "auto"
        df = read_trace(path, fmt, cfg.hash_block_size)
        source = str(path)
    else:
        syn = cfg.synthetic
        n = syn.num_requests
        arrivals = _arrivals(syn.arrival, n, rng_arrival)
        prompt = _lengths(syn.prompt_len, n, rng_prompt, base_dir, "prompt_len", "workload.synthetic.prompt_len")
        output = _lengths(syn.output_len, n, rng_output, base_dir, "output_len", "workload.synthetic.output_len")
        df = synthetic.synthetic_workload(arrivals, prompt, output)
        source = "workload.synthetic"

    if cfg.window_s is not None:
        start, end = cfg.window_s
        df = transforms.time_window(df, start, end)
        if len(df) == 0:
            raise ConfigError(
                f"no request arrives in [{start}, {end}) s of {source}", "workload.window_s"
            )
    if cfg.num_requests is not None:
        df = transforms.first_n(df, cfg.num_requests)
    if cfg.arrival.kind != "trace":
        df = transforms.with_arrivals(df, _arrivals(cfg.arrival, len(df), rng_override))
    if cfg.target_rate_req_s is not None:
        if not np.isfinite(transforms.mean_rate(df)):
            raise ConfigError(
                "cannot rescale to a target rate: every request arrives at the same time", "workload.target_rate_req_s"
            )
        df = transforms.set_rate(df, cfg.target_rate_req_s)
    elif cfg.rate_scale != 1.0:
        df = transforms.scale_rate(df, cfg.rate_scale)
    if cfg.max_prompt_len is not None or cfg.max_output_len is not None:
        df = transforms.cap_lengths(df, cfg.max_prompt_len, cfg.max_output_len)
    if cfg.slo.ttft_s is not None or cfg.slo.tpot_s is not None:
        df = transforms.fill_slo(df, cfg.slo.ttft_s, cfg.slo.tpot_s)
    df = transforms.renumber(df)
    validate_workload(df, source)
    return df


def _trace_path(trace: str, base_dir: Path, key: str) -> Path:
    path, _ = resolve_trace(trace, base_dir)
    if not path.is_file():
        what = "not a file" if path.exists() else "file not found"
        raise ConfigError(
            f"{what}: {path} (a bundled name — azure_conv, mooncake_conv — or a path relative to {base_dir})", key
        )
    return path


def _arrivals(spec: Any, n: int, rng: np.random.Generator) -> np.ndarray:
    if spec.kind == "offline":
        return synthetic.offline_arrivals(n)
    if spec.kind == "poisson":
        return synthetic.poisson_arrivals(n, spec.rate_req_s, rng)
    if spec.kind == "gamma":
        return synthetic.gamma_arrivals(n, spec.rate_req_s, spec.cv, rng)
    if spec.kind == "fixed":
        return synthetic.fixed_arrivals(n, spec.rate_req_s)
    raise AssertionError(f"unhandled arrival kind {spec.kind!r}")


def _lengths(spec: Any, n: int, rng: np.random.Generator, base_dir: Path, column: str, key: str) -> np.ndarray:
    lo, hi = spec.min, spec.max
    if spec.kind == "constant":
        return synthetic.constant_lengths(n, spec.value, lo, hi)
    if spec.kind == "uniform":
        return synthetic.uniform_lengths(n, spec.low, spec.high, rng, lo, hi)
    if spec.kind == "lognormal":
        return synthetic.lognormal_lengths(n, spec.mean, spec.sigma, rng, lo, hi)
    if spec.kind == "zipf":
        return synthetic.zipf_lengths(n, spec.a, spec.max, rng, lo)
    if spec.kind == "empirical":
        path = _trace_path(spec.trace, base_dir, f"{key}.trace")
        fmt = spec.format if spec.format != "auto" else (resolve_trace(spec.trace, base_dir)[1] or "auto")
        values = read_trace(path, fmt)[spec.column or column].to_numpy()
        return synthetic.empirical_lengths(n, values, rng, lo, hi)
    raise AssertionError(f"unhandled length kind {spec.kind!r}")
