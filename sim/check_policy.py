"""``sim check-policy POLICY [--family F]``: the engine's invariants, against one policy, on
random workloads (hypothesis), with the first violation shrunk into a runnable experiment.

Each example is a run of the real engine and cost model (Llama-3.2-1B's roofline on an
H100, a small KV pool) with the policy in its family's slot and random other settings
(batch and token limits, block size, pool size, capacity policy, chunking, CUDA graphs,
the overlap scheduler, piecewise graphs, prefix reuse with a host tier, swap or recompute
preemption, replicas for a router, speculative decoding for a draft policy) over a random
workload of up to 40 requests: offline bursts and streams at a rate well above what the
engine serves, prompts sharing per-tenant prefixes, priorities. Checked, in this order:

``engine_invariants``
    every iteration: no KV block leaked or owned twice, the pool's counters exact, cached
    blocks hold their own tokens, at most ``max_batch_size`` requests (the engine's
    ``check_invariants``); an engine error (the pool over-committed) counts here too.
``policy_decision``
    the policy returned something the engine cannot carry out (an index out of range, a
    block to evict twice), or raised.
``every_admitted_request_finishes``
    the run ends (no livelock: at most 20 iterations per prompt and output token).
``outputs_exact``
    every request finishes with exactly ``output_len`` tokens at increasing times after its
    arrival, or is rejected for a reason that holds (it can never fit).
``limits``
    no iteration over ``max_batch_size`` requests or ``max_num_tokens`` tokens, or over the pool.
``pool_returned``
    at the end nothing is held, reserved or lost: every block is free or cached.
``no_starvation``
    (one replica) no request is overtaken (a request that arrived later scheduled before it)
    more than ``--max-overtakes`` times (default 16).
``byte_identical_rerun``
    a second run of the example (fresh policy instances) writes the same tables.

A violation is shrunk by hypothesis to a small example, written as an experiment file
(default ``./check-policy-failure.yaml``) and its workload beside it (``.csv``): ``sim run``
runs it, and ``sim check-policy --reproduce FILE`` checks it again.
"""

from __future__ import annotations

import copy
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from servesim.policies.loading import FAMILIES, PolicyError, PolicyRef, find_family, load_policy

from .types import ConfigError

MODEL = "llama-3.2-1b"
HARDWARE = "h100-sxm"
INVARIANTS = ("engine_invariants", "policy_decision", "every_admitted_request_finishes", "outputs_exact",
              "limits", "pool_returned", "no_starvation", "byte_identical_rerun")


@dataclass
class Violation:
    invariant: str
    message: str


@dataclass
class CheckReport:
    policy: str
    family: str
    examples: int = 0  # examples run (shrinking included)
    violation: Violation | None = None
    settings: dict | None = None  # the shrunk example's settings (an experiment's run settings)
    rows: list | None = None  # its requests: (arrival_s, prompt_len, output_len, group, priority)
    reproducer: Path | None = None
    max_overtakes_seen: int = 0
    stats: dict = field(default_factory=dict)


class _Livelock(Exception):
    pass


# ---------------------------------------------------------------------------------------
# examples


def _set(d: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def example_strategy(family: str, policy_value: Any, max_n: int = 40):
    """Hypothesis strategy of (run settings, workload rows) with `policy_value` at the family's key."""
    from hypothesis import strategies as st

    @st.composite
    def examples(draw):
        max_batch = draw(st.integers(1, 12))
        tpb = draw(st.sampled_from([1, 2, 4, 16]))
        blocks = draw(st.integers(4, 100)) * (16 // tpb)
        spec = family == "draft"
        if family == "capacity":
            capacity = policy_value
        elif family == "preemption":
            capacity = "max_utilization"
        else:
            capacity = draw(st.sampled_from(["guaranteed_no_evict", "max_utilization", "static_batch"]))
        sched: dict = {"capacity": capacity, "max_batch_size": max_batch,
                       "max_num_tokens": draw(st.integers(max(max_batch, 16), 256))}
        if family != "chunking" and draw(st.booleans()):
            sched["enable_chunked_context"] = True
            sched["chunk_size"] = draw(st.sampled_from([None, tpb * 4, tpb * 8]))
        if capacity == "max_utilization" and draw(st.booleans()):
            sched["preemption"] = "swap"
        reuse = family == "eviction" or draw(st.booleans())
        kv: dict = {"tokens_per_block": tpb, "pool_tokens": blocks * tpb, "enable_block_reuse": reuse}
        if reuse and draw(st.booleans()):
            kv["host_cache_size_gb"] = draw(st.sampled_from([0.001, 0.004]))
        runtime = {"cuda_graphs": draw(st.booleans()), "overlap_scheduler": (not spec) and draw(st.booleans())}
        pw = draw(st.sampled_from([None, 32, 100]))
        if pw is not None:
            runtime.update(piecewise_graphs=True, piecewise_max_tokens=pw)
        settings: dict = {"model": MODEL, "hardware": HARDWARE, "seed": 0, "scheduler": sched, "kv_cache": kv,
                          "runtime": runtime, "output": {"plots": False, "timeline": False}}
        if family == "router":
            settings["cluster"] = {"replicas": draw(st.integers(2, 3))}
        if spec:
            settings["speculative"] = {"proposer": "ngram", "max_draft_len": draw(st.integers(1, 4)),
                                       "acceptance": 0.7}
        if family not in ("capacity",):
            _set(settings, FAMILIES[family].key, policy_value)
        # the workload: an offline burst or a stream faster than the engine serves it
        offline = draw(st.integers(0, 3)) == 3  # a quarter offline bursts, the rest streams
        prefix = draw(st.lists(st.integers(0, 64), min_size=4, max_size=4))
        reqs = draw(st.lists(st.tuples(st.floats(0, 0.004), st.integers(1, 120), st.integers(1, 80),
                                       st.integers(0, 3), st.integers(0, 3)),
                             min_size=draw(st.sampled_from([1, max_n * 3 // 5])), max_size=max_n))
        t = 0.0
        rows = []
        for gap, p, o, g, prio in reqs:
            if not offline:
                t += gap
            rows.append((t, p, o, g, prio))
        return settings, {"rows": rows, "prefix": prefix}

    return examples()


def workload_frame(work: dict):
    """The workload table of an example: tenants t0..t3 share their group's prefix tokens."""
    from servesim.traces.schema import make_workload

    rows, prefix = work["rows"], work["prefix"]
    toks = []
    for i, (_, p, _, g, _) in enumerate(rows):
        shared = [1000 * g + j for j in range(min(prefix[g], p))]
        toks.append(tuple(shared + [50000 + 200 * i + j for j in range(p - len(shared))]))
    return make_workload([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                         priority=[r[4] for r in rows], tenant=[f"t{r[3]}" for r in rows], prompt_tokens=toks)


# ---------------------------------------------------------------------------------------
# one run, checked


def _run(setup, step_limit: int):
    from .driver import run_simulation
    from .engine import Engine
    from .executor import SimExecutor
    from .runner import engine_config, finish_run, make_cost_model, make_run_router, make_sim_speculation, \
        prepare_requests

    requests = prepare_requests(setup)
    cost = make_cost_model(setup)
    engines = [Engine(engine_config(setup, check_invariants=True),
                      SimExecutor(cost, setup.cfg.runtime.overlap_scheduler, make_sim_speculation(setup, i)),
                      replica=i) for i in range(setup.cfg.cluster.replicas)]
    every = 256
    calls = [0]

    def progress(now, finished):
        calls[0] += 1
        if calls[0] * every > step_limit:
            raise _Livelock(f"still running after {calls[0] * every:,} engine steps "
                            f"({finished} of {len(requests)} requests done): a livelock")

    run_simulation(requests, engines, make_run_router(setup), progress=progress, progress_every=every)
    return requests, engines, finish_run(setup, requests, engines, "sim", 0.0)


def _describe(e: BaseException) -> str:
    """The exception and where it was raised (the last frame outside the engine, if the policy's)."""
    tb = traceback.extract_tb(e.__traceback__)
    where = ""
    if tb:
        f = tb[-1]
        where = f" (at {Path(f.filename).name}:{f.lineno}, in {f.name})"
    msg = str(e) or "assertion failed"
    if isinstance(e, AssertionError) and tb and not str(e):
        msg = f"assert failed: {tb[-1].line}"
    return f"{type(e).__name__}: {msg}{where}"


def check_setup(setup, max_overtakes: int = 16, rerun: bool = True) -> tuple[Violation | None, int]:
    """Run one setup with every check; (the first violation or None, most overtakes seen)."""
    cfg = setup.cfg
    df = setup.workload
    step_limit = 20 * int(df["prompt_len"].sum() + df["output_len"].sum()) + 10_000
    try:
        reqs, engines, result = _run(setup, step_limit)
    except _Livelock as e:
        return Violation("every_admitted_request_finishes", str(e)), 0
    except PolicyError as e:
        return Violation("policy_decision", str(e)), 0
    except AssertionError as e:
        return Violation("engine_invariants", _describe(e)), 0
    except RuntimeError as e:
        if "can never be admitted" in str(e) or "livelock" in str(e):
            return Violation("every_admitted_request_finishes", _describe(e)), 0
        return Violation("engine_invariants", _describe(e)), 0
    except ConfigError:
        raise
    except Exception as e:  # the policy's own code raised
        return Violation("policy_decision", "the policy raised " + _describe(e)), 0
    s = cfg.scheduler
    tpb = cfg.kv_cache.tokens_per_block
    blocks = setup.num_blocks
    req = result.requests
    status = req.column("status").to_pylist()
    reason = req.column("reject_reason").to_pylist()
    out_len = req.column("output_len").to_numpy()
    p_len = req.column("prompt_len").to_numpy()
    arrival = req.column("arrival_s").to_numpy()
    first = req.column("first_scheduled_s").to_numpy()
    times = req.column("token_times").to_pylist()
    rid = req.column("request_id").to_numpy()
    spec = setup.speculation is not None
    splits = engines[0].cfg.chunking.splits
    for i in range(len(status)):
        if status[i] == "finished":
            t = np.asarray(times[i])
            if len(t) != out_len[i]:
                return Violation("outputs_exact", f"request {rid[i]} emitted {len(t)} tokens, its output_len is "
                                 f"{out_len[i]}"), 0
            d = np.diff(t)
            if (np.any(d < 0) if spec else np.any(d <= 0)) or (len(t) and t[0] <= arrival[i]):
                return Violation("outputs_exact", f"request {rid[i]}'s token times do not increase after its "
                                 "arrival"), 0
        else:
            need = -(-(p_len[i] + out_len[i] - 1 + cfg.runtime.overlap_scheduler) // tpb)
            ok = {"kv_pool": need > blocks, "token_budget": (not splits) and p_len[i] > s.max_num_tokens,
                  "max_positions": p_len[i] + out_len[i] - 1 > (setup.model.max_position_embeddings or 1 << 62)}
            if not ok.get(reason[i], False):
                return Violation("outputs_exact", f"request {rid[i]} (prompt {p_len[i]}, output {out_len[i]}) was "
                                 f"rejected ({reason[i]!r}) though it fits ({need} of {blocks} blocks, "
                                 f"max_num_tokens {s.max_num_tokens})"), 0
    it = result.iterations
    n_req = it.column("num_ctx_requests").to_numpy() + it.column("num_gen_requests").to_numpy()
    tok = it.column("ctx_tokens").to_numpy() + it.column("gen_tokens").to_numpy()
    used = it.column("kv_blocks_used").to_numpy()
    for name, bad, what in (("batch", n_req > s.max_batch_size, f"more than max_batch_size {s.max_batch_size} "
                             "requests"), ("tokens", tok > s.max_num_tokens, f"more than max_num_tokens "
                             f"{s.max_num_tokens} tokens"), ("empty", tok <= 0, "no tokens"),
                            ("pool", used > blocks, f"more than the pool's {blocks} blocks in use")):
        if np.any(bad):
            j = int(np.argmax(bad))
            return Violation("limits", f"iteration {j} ran {what} ({n_req[j]} requests, {tok[j]} tokens, "
                             f"{used[j]} blocks)"), 0
    for e in engines:
        kv = e.kv
        if e.has_work() or kv.used or kv.reserved or len(kv.free_ids) + kv.cached != kv.total:
            return Violation("pool_returned", f"replica {e.replica} ended with {kv.used} blocks used, {kv.reserved} "
                             f"reserved, {len(kv.free_ids)} free + {kv.cached} cached of {kv.total}"), 0
    worst = 0
    if cfg.cluster.replicas == 1:
        fin = np.array([x == "finished" for x in status])
        a, f, ids = arrival[fin], first[fin], rid[fin]
        over = ((a[None, :] > a[:, None]) & (f[None, :] < f[:, None])).sum(axis=1) if len(a) else np.zeros(0)
        if len(over):
            worst = int(over.max())
            if worst > max_overtakes:
                j = int(np.argmax(over))
                return Violation("no_starvation", f"request {ids[j]} (arrived {a[j]:.4f} s, prompt "
                                 f"{p_len[fin][j]}, output {out_len[fin][j]}) was overtaken by {worst} requests "
                                 f"that arrived after it (bound {max_overtakes}): it waited "
                                 f"{f[j] - a[j]:.4f} s"), worst
    if rerun:
        try:
            _, _, again = _run(setup, step_limit)
        except Exception as e:  # the first run passed: a second that fails is not deterministic
            return Violation("byte_identical_rerun", "a second run failed: " + _describe(e)), worst
        for name, a_t, b_t in (("requests", req, again.requests), ("iterations", it, again.iterations)):
            if _ipc_bytes(a_t) != _ipc_bytes(b_t):
                return Violation("byte_identical_rerun", f"a second run of the same example wrote a different "
                                 f"{name} table (the policy keeps state across runs, or is random)"), worst
    return None, worst


def _ipc_bytes(t) -> bytes:
    """A table's bytes (NaN equal to NaN, unlike Table.equals)."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    return sink.getvalue().to_pybytes()


# ---------------------------------------------------------------------------------------
# the search


class _Base:
    """The model and hardware every example shares, resolved once."""

    def __init__(self, base_dir: Path):
        from .specs import load_hardware, load_model

        self.model = load_model(MODEL, base_dir)
        self.hw = load_hardware(HARDWARE, base_dir)
        self.base_dir = base_dir

    def setup(self, settings: dict, work: dict):
        from .config import RunConfig
        from .runner import Setup, resolve_speculation
        from servesim.policies.loading import load_run_policies

        cfg = RunConfig.model_validate({**settings, "workload": {"trace": "check-policy-failure.csv"}})
        pols = load_run_policies(cfg, self.base_dir)
        blocks = cfg.kv_cache.pool_tokens // cfg.kv_cache.tokens_per_block
        spec = resolve_speculation(cfg, self.model, self.hw, cfg.cost_model.roofline, self.base_dir, "", pols)
        return Setup(cfg, self.model, self.hw, blocks, workload_frame(work), cfg.cost_model.roofline, None, spec,
                     policies=pols, base_dir=self.base_dir)


_VIOLATION_TYPES: dict[str, type] = {}


def _violation_type(name: str) -> type:
    """One exception class per invariant: hypothesis shrinks each kind of failure on its own."""
    if name not in _VIOLATION_TYPES:
        _VIOLATION_TYPES[name] = type(f"Violated_{name}", (AssertionError,), {})
    return _VIOLATION_TYPES[name]


def policy_value(policy: str, args: dict | None):
    """The config value for POLICY and --args: a name or module:Class, or {class, args}."""
    if not args:
        return policy
    return {"class": policy, "args": dict(args)}


def check_policy(policy: str, family: str | None = None, args: dict | None = None, *, base_dir: Path | None = None,
                 examples: int = 100, seed: int = 0, max_overtakes: int = 16, out: Path | None = None,
                 shrink_budget: int = 150, on_example: Callable[[int], None] | None = None) -> CheckReport:
    """Search random examples for a violation of the policy; write the shrunk one to `out`.
    Shrinking runs at most `shrink_budget` more examples."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hseed

    base_dir = Path(base_dir or Path.cwd())
    value = policy_value(policy, args)
    if family is None:
        family = find_family(value, base_dir, "POLICY")
    elif family not in FAMILIES:
        raise ConfigError(f"unknown family {family!r} (one of {', '.join(FAMILIES)})", "command line: --family")
    # its errors, up front (a draft policy's built-in takes the examples' speculative settings)
    load_policy(value, family, f"POLICY ({FAMILIES[family].key})", base_dir,
                {"name": "ngram", "max_draft_len": 2} if family == "draft" else None)
    base = _Base(base_dir)
    report = CheckReport(policy if not args else f"{policy} {args}", family)
    found: dict = {}

    @hseed(seed)
    @settings(max_examples=examples, deadline=None, database=None, report_multiple_bugs=False,
              suppress_health_check=list(HealthCheck), phases=(Phase.generate, Phase.shrink),
              verbosity=Verbosity.quiet)
    @given(example_strategy(family, value))
    def prop(ex):
        settings_, work = ex
        v = None
        if "last" in found and found["shrinks"] >= shrink_budget:
            # shrinking's budget spent: only the smallest violation so far still fails (the
            # last one found: hypothesis replays it at the end)
            if (settings_, work) == found["last"][:2]:
                v = found["last"][2]
        else:
            report.examples += 1
            if "last" in found:
                found["shrinks"] += 1
            if on_example is not None:
                on_example(report.examples)
            # while shrinking another kind of violation, a second run is not needed
            rerun = "last" not in found or found["last"][2].invariant == "byte_identical_rerun"
            v, worst = check_setup(base.setup(settings_, work), max_overtakes, rerun=rerun)
            report.max_overtakes_seen = max(report.max_overtakes_seen, worst)
            if v is not None:
                found["last"] = (settings_, work, v)
                found.setdefault("shrinks", 0)
        if v is not None:
            raise _violation_type(v.invariant)(v.message)

    # hypothesis ends shrinking after MAX_SHRINKS successful shrinks (500): each of ours is a
    # simulation, so fewer; the calls past `shrink_budget` runs are answered without one
    from hypothesis.internal.conjecture import engine as _hyp_engine

    saved = getattr(_hyp_engine, "MAX_SHRINKS", None)
    if saved is not None:
        _hyp_engine.MAX_SHRINKS = max(1, shrink_budget // 3)
    try:
        prop()
    except AssertionError:
        if "last" not in found:
            raise
    finally:
        if saved is not None:
            _hyp_engine.MAX_SHRINKS = saved
    if "last" in found:
        settings_, work, v = found["last"]
        report.violation, report.settings, report.rows = v, settings_, work
        if out is not None:
            report.reproducer = write_reproducer(out, settings_, work, v, report, base_dir, family)
    return report


def _portable(value, base_dir: Path, out_dir: Path):
    """The policy reference as the reproducer's folder resolves it: a module or file found
    from `base_dir` becomes a path relative to `out_dir` (an installed module stays)."""
    import os

    ref = value.get("class") if isinstance(value, dict) else value
    if not isinstance(ref, str) or ":" not in ref:
        return value
    mod, _, cls = ref.rpartition(":")
    if mod.endswith(".py"):
        f = (base_dir / mod).resolve()
    else:
        f = base_dir / (mod.replace(".", "/") + ".py")
        if not f.is_file() or "." in mod:
            return value
    new = f"{os.path.relpath(f.resolve(), out_dir.resolve())}:{cls}"
    return {**value, "class": new} if isinstance(value, dict) else new


def write_reproducer(path: Path, settings: dict, work: dict, v: Violation, report: CheckReport,
                     base_dir: Path | None = None, family: str | None = None) -> Path:
    """The example as an experiment file and its workload (``<stem>.csv`` beside it)."""
    from servesim.traces.writers import write_table

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    trace = path.with_suffix(".csv")
    write_table(workload_frame(work), trace)
    doc = {"name": path.stem, "description": f"sim check-policy {report.policy}: {v.invariant}: {v.message}"}
    s = copy.deepcopy(settings)
    if base_dir is not None and family is not None:
        d = s
        parts = FAMILIES[family].key.split(".")
        for p in parts[:-1]:
            d = d[p]
        d[parts[-1]] = _portable(d[parts[-1]], Path(base_dir), path.parent)
    s["workload"] = {"trace": trace.name}
    doc.update(s)
    head = (f"# Found by `sim check-policy {report.policy} --family {report.family}`: {v.invariant}\n"
            f"#   {v.message}\n"
            f"# Check it again: sim check-policy --reproduce {path.name}    Run it: sim run {path.name}\n")
    path.write_text(head + yaml.safe_dump(_plain(doc), sort_keys=False, width=100))
    return path


def _plain(x):
    if isinstance(x, PolicyRef):
        return x.model_dump(mode="json")
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def reproduce(path: Path, max_overtakes: int = 16) -> list[tuple[str, Violation | None]]:
    """Check every variant of an experiment file (a reproducer) again: (variant, violation)."""
    from .config import load_experiment
    from .runner import resolve_experiment

    exp = load_experiment(path)
    setups = resolve_experiment(exp, str(path))
    return [(v.name, check_setup(s, max_overtakes)[0]) for v, s in zip(exp.variants, setups)]
