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

or generate one whose prompts share prefixes (KV-cache reuse; see
:mod:`servesim.traces.prefix_workloads`)::

    workload:
      prefix:
        kind: multi_turn            # shared_system_prompt | multi_turn | few_shot
        num_conversations: 200
        arrival: {kind: poisson, rate_req_s: 0.5}   # conversation starts
        turns: {kind: uniform, low: 2, high: 8}     # per conversation
        system_len: 0               # tokens shared by every conversation
        user_len: {kind: lognormal, mean: 200, sigma: 0.8, max: 2048}   # per turn
        output_len: {kind: lognormal, mean: 300, sigma: 0.6, max: 1024} # per turn
        think_time_s: {kind: exponential, mean: 20} # gap between a turn's arrival and the next's
        response_s_per_token: 0.0   # + this x the turn's output_len
        hash_block_size: 16         # block_hashes granularity; null: write prompt_tokens
        vocab_size: 32000           # token ids drawn from [0, vocab_size)

    workload:
      prefix:
        kind: shared_system_prompt
        num_requests: 1000
        arrival: {kind: poisson, rate_req_s: 5}
        system_len: 2000
        user_len: {kind: lognormal, mean: 300, sigma: 0.8}
        output_len: 200

    workload:
      prefix:
        kind: few_shot
        num_requests: 1000
        arrival: {kind: poisson, rate_req_s: 5}
        num_templates: 20
        template_len: {kind: uniform, low: 500, high: 3000}   # drawn once per template
        popularity_zipf_a: 1.0      # template k picked with P ∝ (k + 1)^-a
        question_len: {kind: uniform, low: 20, high: 200}
        output_len: 100

A multi-turn turn's prompt is the previous turn's prompt + its output + a new user
message; arrivals are fixed in advance (open loop). Duration kinds (``think_time_s``;
a bare number means ``constant``): ``constant {value}``, ``exponential {mean}``,
``uniform {low, high}``, ``lognormal {mean, sigma}`` (seconds). ``turns`` takes the
length kinds below except ``empirical``. ``workload.arrival`` and
``workload.hash_block_size`` do not apply (set them inside ``prefix``); the transforms
below do (``num_requests`` keeps the first N requests, not conversations).

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
lengths, arrival override; ``prefix`` draws everything from a fifth stream, split further
by :mod:`~servesim.traces.prefix_workloads`), so changing one distribution leaves the
others' draws alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from servesim.traces import synthetic
from servesim.traces.readers import binary_columns, read_trace, resolve_trace
from servesim.traces.schema import MAX_LENGTH, WorkloadColumns, core_columns_valid, validate_workload

from ..sim.errors import KeyedError, PathStr, validation_problems
from ..sim.types import ConfigError

if TYPE_CHECKING:  # (pandas, transforms and the prefix generators are imported where a DataFrame is made:
    import pandas as pd  # a `sim run` of a bundled trace needs none of them, workload_columns)

__all__ = [
    "WorkloadConfig",
    "SyntheticConfig",
    "PrefixConfig",
    "SloDefaults",
    "build_workload",
    "workload_columns",
    "parse_workload_config",
    "workload_fingerprint",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # every float finite


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
    min: int = Field(1, ge=1, le=MAX_LENGTH, description="clip: smallest length")
    max: int | None = Field(None, ge=1, le=MAX_LENGTH, description="clip: largest length (none: unbounded)")

    @model_validator(mode="after")
    def _bounds(self):
        if self.max is not None and self.max < self.min:
            raise KeyedError(f"max ({self.max}) must be >= min ({self.min})", "max", "min")
        return self


class ConstantLength(_Length):
    kind: Literal["constant"] = "constant"
    value: int = Field(ge=1, le=MAX_LENGTH)


class UniformLength(_Length):
    kind: Literal["uniform"] = "uniform"
    low: int = Field(ge=1, le=MAX_LENGTH)
    high: int = Field(ge=1, le=MAX_LENGTH)

    @model_validator(mode="after")
    def _order(self):
        if self.high < self.low:
            raise KeyedError(f"high ({self.high}) must be >= low ({self.low})", "high", "low")
        return self


class LognormalLength(_Length):
    kind: Literal["lognormal"] = "lognormal"
    mean: float = Field(gt=0, le=MAX_LENGTH, allow_inf_nan=False,
                        description="arithmetic mean in tokens (before clipping)")
    sigma: float = Field(ge=0, allow_inf_nan=False, description="standard deviation of log(length)")


class ZipfLength(_Length):
    kind: Literal["zipf"] = "zipf"
    a: float = Field(gt=0, allow_inf_nan=False, description="exponent: P(k) ∝ k^-a on [min, max]")
    max: int = Field(ge=1, le=10_000_000, description="largest length (required: the support is finite)")


class EmpiricalLength(_Length):
    kind: Literal["empirical"] = "empirical"
    trace: PathStr = Field(description="bundled trace name or path whose lengths are resampled")
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


TurnCount = Annotated[
    Union[ConstantLength, UniformLength, LognormalLength, ZipfLength],
    Field(discriminator="kind"),
    BeforeValidator(_int_is_constant),
]


# ---------------------------------------------------------------------- durations


class ConstantDuration(_Strict):
    kind: Literal["constant"] = "constant"
    value: float = Field(ge=0, allow_inf_nan=False, description="seconds")


class ExponentialDuration(_Strict):
    kind: Literal["exponential"] = "exponential"
    mean: float = Field(gt=0, allow_inf_nan=False, description="mean, seconds")


class UniformDuration(_Strict):
    kind: Literal["uniform"] = "uniform"
    low: float = Field(ge=0, allow_inf_nan=False, description="seconds")
    high: float = Field(ge=0, allow_inf_nan=False, description="seconds")

    @model_validator(mode="after")
    def _order(self):
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        return self


class LognormalDuration(_Strict):
    kind: Literal["lognormal"] = "lognormal"
    mean: float = Field(gt=0, allow_inf_nan=False, description="arithmetic mean, seconds")
    sigma: float = Field(ge=0, allow_inf_nan=False, description="standard deviation of log(duration)")


def _number_is_constant(v: Any) -> Any:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return {"kind": "constant", "value": v}
    return v


Duration = Annotated[
    Union[ConstantDuration, ExponentialDuration, UniformDuration, LognormalDuration],
    Field(discriminator="kind"),
    BeforeValidator(_number_is_constant),
]


# ---------------------------------------------------------------------- shared-prefix workloads


class _PrefixBase(_Strict):
    kind: str  # each subclass narrows it to its Literal (declared here so it dumps first)
    arrival: GeneratedArrival
    output_len: Length
    hash_block_size: int | None = Field(
        16, ge=1, le=1_000_000, description="tokens per block of the written block_hashes; null: write prompt_tokens"
    )
    vocab_size: int = Field(32_000, ge=2, le=2**31, description="token ids are drawn from [0, vocab_size)")


class SharedSystemPromptConfig(_PrefixBase):
    kind: Literal["shared_system_prompt"] = "shared_system_prompt"
    num_requests: int = Field(gt=0, le=100_000_000)
    system_len: int = Field(ge=1, le=10_000_000, description="tokens of the system prompt every request shares")
    user_len: Length
    shared_fraction: float = Field(1.0, gt=0, le=1, description="share of requests with the system prompt "
                                   "(tenant 'system'); the rest are unique prompts of the same length (tenant 'oneoff')")


class MultiTurnConfig(_PrefixBase):
    kind: Literal["multi_turn"] = "multi_turn"
    num_conversations: int = Field(gt=0, le=100_000_000)
    turns: TurnCount
    system_len: int = Field(0, ge=0, le=10_000_000, description="tokens shared by every conversation (0: none)")
    user_len: Length
    think_time_s: Duration
    response_s_per_token: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="added to the gap after a turn, per output token of that turn"
    )


class FewShotConfig(_PrefixBase):
    kind: Literal["few_shot"] = "few_shot"
    num_requests: int = Field(gt=0, le=100_000_000)
    num_templates: int = Field(gt=0, le=10_000_000)
    template_len: Length
    popularity_zipf_a: float = Field(1.0, ge=0, allow_inf_nan=False, description="template k picked with P ∝ (k+1)^-a")
    question_len: Length


PrefixConfig = Annotated[
    Union[SharedSystemPromptConfig, MultiTurnConfig, FewShotConfig], Field(discriminator="kind")
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
    trace: PathStr | None = Field(None, description="bundled trace name or a path relative to the experiment file")
    format: Literal["auto", "azure", "table", "mooncake"] = "auto"
    synthetic: SyntheticConfig | None = None
    prefix: PrefixConfig | None = None
    replay: PathStr | None = Field(None, description="a run directory (or its requests.parquet) whose requests "
                               "-- arrivals, lengths, SLOs, prompt block hashes or tokens -- this run replays, "
                               "on either backend")
    arrival: Arrival = Field(default_factory=TraceArrival)
    rate_scale: float = Field(1.0, gt=0, allow_inf_nan=False)
    target_rate_req_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    num_requests: int | None = Field(None, gt=0, le=MAX_LENGTH)
    window_s: tuple[Annotated[float, Field(ge=0, allow_inf_nan=False)], Annotated[float, Field(gt=0)]] | None = None
    max_prompt_len: int | None = Field(None, ge=1, le=MAX_LENGTH)
    max_output_len: int | None = Field(None, ge=1, le=MAX_LENGTH)
    hash_block_size: int | None = Field(None, gt=0)
    slo: SloDefaults = Field(default_factory=SloDefaults)

    @model_validator(mode="after")
    def _consistent(self):
        given = [k for k in ("trace", "synthetic", "prefix", "replay") if getattr(self, k) is not None]
        if len(given) != 1:
            raise KeyedError(
                "give exactly one of 'trace' (a file to replay), 'synthetic' (a generated workload), "
                "'prefix' (a generated workload with shared prefixes) or 'replay' (the requests of an earlier "
                f"run); got {given or 'none'}", *given[::-1]
            )
        for key in ("synthetic", "prefix"):
            if getattr(self, key) is not None:
                if self.arrival.kind != "trace":
                    raise KeyedError(f"with '{key}', set the arrival process in {key}.arrival, not in 'arrival'",
                                     "arrival", key)
                if self.format != "auto":
                    raise KeyedError("'format' applies to 'trace' only", "format")
        if self.prefix is not None and self.hash_block_size is not None:
            raise KeyedError("'hash_block_size' applies to 'trace' only; with 'prefix', set prefix.hash_block_size",
                             "hash_block_size")
        if self.target_rate_req_s is not None and self.rate_scale != 1.0:
            raise KeyedError("give 'rate_scale' or 'target_rate_req_s', not both", "target_rate_req_s", "rate_scale")
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
        raise ConfigError(validation_problems(e, data, source, prefix)) from None


# ---------------------------------------------------------------------- builder


def replay_path(replay: str, base_dir: Path | str) -> Path:
    """requests.parquet of the run directory (or file) named by `workload.replay`."""
    p = Path(replay).expanduser()
    if not p.is_absolute():
        p = Path(base_dir) / p
    from ..sim.rundir import check_finished_run

    check_finished_run(p, "workload.replay")  # not an interrupted run, not a run folder without its files
    if p.is_dir():
        p = p / "requests.parquet"
    if not p.is_file():
        raise ConfigError(f"no run to replay: {p} does not exist (give a run directory holding "
                          "requests.parquet)", "workload.replay")
    return p


def read_replay(path: Path) -> pd.DataFrame:
    """The requests of an earlier run (sim or GPU): same ids, arrivals, lengths and SLOs."""
    import pyarrow.parquet as pq

    from .schema import HASH_BLOCK_SIZE, TUPLE_COLUMNS

    cols = ["request_id", "arrival_s", "prompt_len", "output_len", "priority", "tenant", "slo_ttft_s", "slo_tpot_s"]
    try:
        names = pq.read_schema(path).names
        t = pq.read_table(path, columns=cols + [c for c in TUPLE_COLUMNS if c in names])
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
        raise ConfigError(f"cannot read a run's requests from it: {e}", str(path)) from None
    bs = (t.schema.metadata or {}).get(b"servesim." + HASH_BLOCK_SIZE.encode())
    df = t.to_pandas().sort_values(["arrival_s", "request_id"], kind="stable").reset_index(drop=True)
    for c in TUPLE_COLUMNS:  # the prompts' identity (prefix reuse): as tuples, like a trace's
        if c in df.columns:
            df[c] = [None if v is None else tuple(int(x) for x in v) for v in df[c]]
    if bs is not None and "block_hashes" in df.columns:
        df.attrs[HASH_BLOCK_SIZE] = int(bs)
    if df["tenant"].eq("").all():
        df = df.drop(columns=["tenant"])
    if df["priority"].eq(0).all():
        df = df.drop(columns=["priority"])
    for c in ("slo_ttft_s", "slo_tpot_s"):
        if df[c].isna().all():
            df = df.drop(columns=[c])
    return df


def build_workload(cfg: WorkloadConfig, base_dir: Path | str, seed: int, *, config_source: str = "") -> pd.DataFrame:
    """The workload table described by ``cfg`` (a pure function of ``cfg``, the files it
    names and ``seed``). Relative paths are resolved against ``base_dir`` (the experiment
    file's folder). request_id is 0..N-1 in arrival order. Errors about config keys are
    located at ``config_source: workload.key`` (trace-file errors name the file)."""
    try:
        # overflowing arithmetic (a rate of 1e-300 req/s) is caught by validate_workload,
        # which names the key; numpy's warnings would only add noise
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return _build(cfg, Path(base_dir), seed)
    except ConfigError as e:
        if not config_source:
            raise
        problems = [(f"{config_source}: {loc}" if loc.startswith("workload") else loc, msg) for loc, msg in e.problems]
        raise ConfigError(problems) from None


def _build(cfg: WorkloadConfig, base_dir: Path, seed: int) -> pd.DataFrame:
    from servesim.traces import transforms

    # spawn(5)'s first four children are those of spawn(4): adding the prefix stream
    # changed no earlier workload
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)]
    rng_arrival, rng_prompt, rng_output, rng_override, rng_prefix = streams

    if cfg.trace is not None:
        path = _trace_path(cfg.trace, base_dir, "workload.trace")
        fmt = cfg.format
        if fmt == "auto":
            fmt = resolve_trace(cfg.trace, base_dir)[1] or "auto"
        df = read_trace(path, fmt, cfg.hash_block_size)
        source = str(path)
    elif cfg.prefix is not None:
        df = _prefix_workload(cfg.prefix, base_dir, rng_prefix)
        source = "workload.prefix"
    elif cfg.replay is not None:
        df = read_replay(replay_path(cfg.replay, base_dir))
        source = str(replay_path(cfg.replay, base_dir))
    else:
        syn = cfg.synthetic
        n = syn.num_requests
        arrivals = _arrivals(syn.arrival, n, rng_arrival, "workload.synthetic.arrival")
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


def workload_columns(cfg: WorkloadConfig, base_dir: Path | str, seed: int, *,
                     config_source: str = "") -> WorkloadColumns:
    """`build_workload`'s table as WorkloadColumns. A bundled trace with a binary copy
    (traces/readers.py BUNDLED_BINARY), its own or redrawn arrivals and at most its first
    N requests (steps of `_build` done here in numpy, the same arithmetic) is read without
    pandas; anything else, or a table that breaks a rule, is `build_workload`'s
    DataFrame (which says what is wrong)."""
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            fast = _bundled_columns(cfg, Path(base_dir), seed)
    except ConfigError:
        fast = None  # (build_workload raises it, located)
    if fast is not None:
        return fast
    return WorkloadColumns.of(build_workload(cfg, base_dir, seed, config_source=config_source))


def _bundled_columns(cfg: WorkloadConfig, base_dir: Path, seed: int) -> WorkloadColumns | None:
    if (cfg.trace is None or cfg.window_s is not None or cfg.target_rate_req_s is not None or cfg.rate_scale != 1.0
            or cfg.max_prompt_len is not None or cfg.max_output_len is not None or cfg.slo.ttft_s is not None
            or cfg.slo.tpot_s is not None):
        return None
    path, fmt = resolve_trace(cfg.trace, base_dir)
    if (cfg.format if cfg.format != "auto" else fmt) != "azure":
        return None
    cols = binary_columns(path)
    if cols is None:
        return None
    arrival = cols["arrival_s"].astype(np.float64)
    prompt = cols["prompt_len"].astype(np.int64)
    output = cols["output_len"].astype(np.int64)
    if cfg.num_requests is not None:  # transforms.first_n
        arrival, prompt, output = arrival[:cfg.num_requests], prompt[:cfg.num_requests], output[:cfg.num_requests]
    if cfg.arrival.kind != "trace":  # the arrival-override stream of _build's seed
        rng_override = np.random.default_rng(np.random.SeedSequence(seed).spawn(5)[3])
        arrival = np.asarray(_arrivals(cfg.arrival, len(arrival), rng_override), dtype=np.float64)
    if not core_columns_valid(arrival, prompt, output):
        return None
    return WorkloadColumns({"request_id": np.arange(len(arrival), dtype=np.int64), "arrival_s": arrival,
                            "prompt_len": prompt, "output_len": output})


def __getattr__(name: str):
    if name == "workload_fingerprint":  # (imports pandas)
        from servesim.traces.fingerprint import workload_fingerprint

        return workload_fingerprint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _trace_path(trace: str, base_dir: Path, key: str) -> Path:
    path, _ = resolve_trace(trace, base_dir)
    if not path.is_file():
        what = "not a file" if path.exists() else "file not found"
        raise ConfigError(
            f"{what}: {path} (a bundled name — azure_conv, mooncake_conv — or a path relative to {base_dir})", key
        )
    return path


def _arrivals(spec: Any, n: int, rng: np.random.Generator, key: str = "workload.arrival") -> np.ndarray:
    try:
        return _arrivals_of(spec, n, rng)
    except ValueError as e:  # parameters numpy cannot draw from (a cv so small its shape overflows)
        raise ConfigError(f"cannot draw arrivals: {e}", key) from None


def _arrivals_of(spec: Any, n: int, rng: np.random.Generator) -> np.ndarray:
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
    try:
        return _lengths_of(spec, n, rng, base_dir, column, key)
    except ValueError as e:  # a draw beyond MAX_LENGTH (a lognormal's tail), parameters numpy refuses
        raise ConfigError(str(e), key) from None


def _lengths_of(spec: Any, n: int, rng: np.random.Generator, base_dir: Path, column: str, key: str) -> np.ndarray:
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


def _sampler(spec: Any, base_dir: Path, column: str, key: str):
    """A length sampler ``f(n, rng)`` for prefix_workloads."""
    return lambda n, rng: _lengths(spec, n, rng, base_dir, column, key)


def _durations(spec: Any, n: int, rng: np.random.Generator) -> np.ndarray:
    if spec.kind == "constant":
        return np.full(n, spec.value, dtype=np.float64)
    if spec.kind == "exponential":
        return rng.exponential(spec.mean, size=n)
    if spec.kind == "uniform":
        return rng.uniform(spec.low, spec.high, size=n)
    if spec.kind == "lognormal":
        return rng.lognormal(np.log(spec.mean) - 0.5 * spec.sigma**2, spec.sigma, size=n)
    raise AssertionError(f"unhandled duration kind {spec.kind!r}")


def _prefix_workload(p: Any, base_dir: Path, rng: np.random.Generator) -> pd.DataFrame:
    from servesim.traces import prefix_workloads

    key = "workload.prefix"
    common = dict(
        arrival_s=lambda n, r: _arrivals(p.arrival, n, r, f"{key}.arrival"),
        rng=rng,
        hash_block_size=p.hash_block_size,
        vocab_size=p.vocab_size,
    )
    output = _sampler(p.output_len, base_dir, "output_len", f"{key}.output_len")
    if p.kind == "shared_system_prompt":
        return prefix_workloads.shared_system_prompt(
            p.num_requests, p.system_len, _sampler(p.user_len, base_dir, "prompt_len", f"{key}.user_len"), output,
            shared_fraction=p.shared_fraction, **common
        )
    if p.kind == "multi_turn":
        return prefix_workloads.multi_turn(
            p.num_conversations,
            _sampler(p.turns, base_dir, "prompt_len", f"{key}.turns"),
            _sampler(p.user_len, base_dir, "prompt_len", f"{key}.user_len"),
            output,
            think_time_s=lambda n, r: _durations(p.think_time_s, n, r),
            system_len=p.system_len,
            response_s_per_token=p.response_s_per_token,
            **common,
        )
    if p.kind == "few_shot":
        return prefix_workloads.few_shot(
            p.num_requests,
            p.num_templates,
            _sampler(p.template_len, base_dir, "prompt_len", f"{key}.template_len"),
            _sampler(p.question_len, base_dir, "prompt_len", f"{key}.question_len"),
            output,
            zipf_a=p.popularity_zipf_a,
            **common,
        )
    raise AssertionError(f"unhandled prefix kind {p.kind!r}")
