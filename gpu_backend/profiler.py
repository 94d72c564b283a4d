"""Measure a calibration grid on the GPU with the real engine and executor.

Each grid point (`DECODE_POINTS`, `MIXED_POINTS`, `PIECEWISE_POINTS`, `PREFIX_POINTS`,
`PROMPT_POINTS`, `CHUNKED_POINTS`, `SERVED_POINTS` / `SERVED_HIGH_POINTS`, `PREFILL_POINTS`;
`POWER_POINTS` for the power model only) is a small
designed workload run by `simulate_gpu`, so the measured iterations cost what they cost in
a `--backend gpu` run; each row splits off the host's part for the fit of the scheduler
overhead. `measure_grid` heats the GPU up, measures its idle power, times every
decoder-layer GEMM alone (`gemm_sweep`), and spreads the grid's runs over several fresh
processes (a step's host speed differs between processes), returning the rows, each run's
energy and iterations, and the environment for `sim calibrate` (sim/calibrate.py) to fit.

The grid, why each point is there, and the measurements behind it: docs/calibration.md.
"""

from __future__ import annotations

import platform

import numpy as np
import pandas as pd

from servesim.sim.calibrate import part_label, rows_from_iterations
from servesim.sim.config import RunConfig
from servesim.sim.runner import resolve
from servesim.sim.specs import ModelSpec

# (requests, prompt, output, graphs): offline runs of constant-length requests. Context
# chunks are packed up to max_num_tokens (8192) per iteration, so requests enter decoding
# in waves: one run yields decode-only iterations at several batch sizes and KV lengths
# and mixed (context + decode) iterations, besides its full-batch steps.
# The two largest batches decode 48 tokens: enough full-batch steps at long KV (an offline
# run's regime) that the fit does not extrapolate there.
# 48, 64 and 96 requests x 32-40 tokens: a serving batch's sizes (the 1B's online runs spend
# half their decode steps at 32-96 requests), where the grid had ~20 pure decode steps (the
# 64 x 2048 run's context takes most of its 16 steps) and the fit interpolated: +12% there
# on an H200 (benchmarks/results/feature_fidelity.md).
# 1, 8 and 32 requests x 256-token prompts: decode steps at short KV (256-384 tokens a
# request), where the grid's shortest were 1024+ (1x1024+64) and the fit extrapolated down:
# the 8B's batch-1 step is 5.43 ms at KV 1056, 6.17 ms at 6921 (a steeper slope than at
# batch), fitted +5% at 1056; the plain and speculative runs of gpu_spec_decoding.py decode
# at 256-384 (their drafter's graph steps too, at 1-64 rows), and the plain steps are every
# speedup's denominator (benchmarks/results/spec_replay.md).
DECODE_POINTS = [(1, 1024, 64, True), (8, 2048, 48, True), (16, 512, 64, True), (32, 1024, 48, True),
                 (48, 1024, 40, True), (64, 1024, 40, True), (96, 768, 32, True),
                 (64, 2048, 16, True), (128, 512, 48, True), (256, 1024, 48, True), (8, 8192, 12, True),
                 (32, 1024, 12, False), (96, 512, 8, False),
                 (1, 256, 128, True), (8, 256, 96, True), (32, 256, 64, True),
                 (256, (128, 1024), (16, 272), True)]
# The last point: 256 requests of unequal lengths (prompts uniform 128-1024, outputs uniform
# 16-272, `_lengths`), so the batch empties one request at a time and the run's decode steps
# sit at every batch size from 256 down to a few, each at unequal KV lengths as a serving
# batch's are: the grid had 41, 34, 45, 8 and 23 pure decode steps at 49-64, 65-96, 97-128,
# 129-192 and 193-256 requests where an offline fidelity run spends a third of its decode
# time (benchmarks/results/fidelity_h200.md's decode table), ~250 here; ~1.5 s of device
# time for the 1B, ~4 s for the 8B.
# Runs for the power model only (their energy and iterations; no rows for the time fit). A
# long decode at a large batch is the one run whose time goes mostly to decoding, so a third
# of it is decode attention reading the KV cache, as in an offline or busy serving run: the
# short runs spend theirs on the prefills, and without it the 8B's power model fitted its KV
# term on runs with at most 8% of their time there and priced the offline fidelity run's
# energy 9% low (with it: 1-3%). Its time rows are left out of the time fit: 128 requests of
# equal length read their KV at 3.2-3.8 TB/s (the step time's slope in the KV length), faster
# than a serving batch of unequal lengths does, and one KV efficiency cannot be both; fitted
# to them too, the calibrated model priced the serving runs' decode steps 2-5% fast (device
# calls 9 and 10-12, two machines: 4.5% -> 2.8% and 3.7% -> 3.1% over the fidelity table).
POWER_POINTS = [(128, 1024, 384, True)]
PREFILL_POINTS = [(1, 512), (1, 2048), (2, 8192), (8, 512), (4, 3000)]  # (requests, prompt)
# (requests, prompt, output, max_num_tokens): a token budget just above one prompt, so
# each iteration is one context chunk beside the decodes of the requests admitted before
# it -- the mixed iterations an online run is made of (small chunks, host-bound launches)
MIXED_POINTS = [(48, 64, 24, 96), (64, 256, 32, 320), (48, 512, 32, 640), (32, 1536, 24, 2048)]
# The same kind of runs with piecewise CUDA graphs (runtime.piecewise_graphs): its mixed
# iterations at padded token counts, and one-chunk prefills (the last point)
PIECEWISE_POINTS = [(48, 64, 24, 96), (64, 256, 32, 320), (32, 1536, 24, 2048), (8, 512, 1, 512)]
# Cached context (KV reuse): (requests, cached prefix, new tokens, output, max_num_tokens).
# Every request shares the prefix (a system prompt) and arrives 1/PREFIX_RATE s after the
# previous one, when the prefix is cached: each is one chunk of its new tokens over the
# cached prefix beside the earlier requests' decodes -- the iterations of a multi-turn
# conversation, whose attention walks the whole prefix with few programs.
PREFIX_POINTS = [(16, 1024, 256, 16, 320), (16, 3072, 512, 16, 640), (12, 6144, 768, 16, 896),
                 (16, 2048, 128, 16, 192)]
PREFIX_RATE = 8.0
# (requests, Poisson rate req/s, mean prompt, mean output; lognormal lengths): a sustained
# serving run of ~15 s, "small" for models under ~3B parameters, else "large" (a rate
# the model sustains on an H100 at roughly half load). Its batches have the unequal KV
# lengths and the queue of a real workload, and it averages the host's speed over
# thousands of steps where a short grid run samples it once (the speed also differs
# between processes: benchmarks/results/host_probe.md). Not a fidelity workload: synthetic arrivals and lengths.
SERVED_POINTS = {"small": (480, 36.0, 700, 180), "large": (160, 10.0, 700, 160)}
# A second served run at the load of the 1B's busiest fidelity workload (1b-online-high, 55
# req/s): the decode steps of the served run above sit at batch 8-20, the 1B's fidelity runs
# spend 44% (online-high) to 52% (online-low) of their busy time in decode steps at 33-96
# requests (their iteration tables, 20261202-1857-h200-sxm), where the grid had only the
# designed offline points (equal KV lengths, a host part 1.5-2x a served run's). Small models
# only (None: none): the 8B's grid is the long pole of a device call (220 s of its ~545), and
# its decode steps at 33-128 requests, priced from the designed points, are within 2.8-4%.
SERVED_HIGH_POINTS = {"small": (360, 58.0, 700, 180), "large": None}
# (requests, prompt): warm prompt-only steps (a drafter's eager pass over a joining prompt;
# the eager context iteration of a decode-graph run; a speculative target's verification
# beside context chunks, every request a chunk of 1 + k tokens: a context-only eager pass
# too): offline, one output token, a token budget of one prompt, so every iteration is one
# prompt alone as an eager prefill, back to back. PREFILL_POINTS' rows are each their run's
# first iteration (cold: 1x2048 measured 4x its warm time), and steps after an idle gap run
# their host part ~1.7x slower for ~16 steps (the served runs' steps, by steps since a gap
# of 5 ms), so no arrival gaps here. They identify host_overhead_eager_decode_s (an eager
# pass without decodes launches no decode attention). Every model: the 8B's grid without
# them fitted 2.1 ms for it, so a context-only eager pass was priced 22.4 ms of launches,
# while the plain runs of the H200 speculative benchmark (benchmarks/results/spec_gpu) ran a
# warm 256-token eager prefill of the 8B in 11-13 ms all told (spec_replay.md: those steps
# priced +48%, the drafting iterations beside a prompt +19..+50%); ~1 s of device time.
PROMPT_POINTS = [(40, 128), (24, 768)]
# (requests, prompt, output, max_num_tokens, piecewise): prompts several budgets long, so
# successive chunks of one prompt attend to 0, 1, 2, ... budgets of earlier chunks (the
# long-conversation iterations whose (requests, tokens) key is the same at very different
# attended context: S11's Mooncake gap), beside the decodes of the requests before. The
# first eager (4096-token chunks), the second piecewise (2048, small models only).
CHUNKED_POINTS = [(6, 12288, 8, 4096, False), (8, 8192, 8, 2048, True)]
SKIP_FIRST = 2  # iterations of each run left out (the first steps after the warm-up)
# Row counts of the GEMM sweep: the decode graphs' small batches, every multiple of 16 up to
# 2048 (the piecewise graphs' padded sizes; cuBLAS's tiles are 64-256 rows, so a step in
# time between two of them is at most 16 rows off), then coarser up to a full 8192-token
# budget with 512 decodes beside it
GEMM_TOKENS = (1, 2, 4, 8, *range(16, 2049, 16), *range(2112, 4097, 64), *range(4352, 8705, 256))
L2_BYTES = 50 * 2**20  # H100 L2; the sweep cycles through enough weight copies to miss it
SPIN_CYCLES = 3_000_000  # ~1.5-2 ms of GPU spin before each timing window (gemm_sweep)


def back_to_back_seconds(call, reps: int, windows: int, cuda: bool, spin_cycles: int = SPIN_CYCLES) -> float:
    """Seconds per ``call(r)`` (r = 1..reps) launched back to back: on a GPU the best of
    ``windows`` CUDA-event windows, each behind a spin so the launches queue up and the GPU
    never waits for the host; on the CPU one wall-clock window."""
    import time

    import torch

    if not cuda:
        t0 = time.perf_counter()
        for r in range(reps):
            call(r + 1)
        return (time.perf_counter() - t0) / reps
    s = float("inf")
    for _ in range(windows):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(spin_cycles)  # the launches below queue up behind it
        a.record()
        for r in range(reps):
            call(r + 1)
        b.record()
        b.synchronize()
        s = min(s, a.elapsed_time(b) / 1e3 / reps)
    return s
HEAT_UP_S = 12.0  # seconds of matmuls before the grid (see measure_grid)
WORKER_HEAT_UP_S = 2.0  # and at the start of each further grid process


def _run(model_ref: str, n: int, prompt: int, output: int, graphs: bool, chunked: bool, hardware: str,
         max_num_tokens: int = 8192, piecewise: bool = False, served_rate: float | None = None,
         part: str = "", prefix: int = 0, tp: int = 1):
    from .runner import simulate_gpu

    reuse = False
    if prefix:  # a shared cached prefix, one request at a time (PREFIX_POINTS)
        workload = {"prefix": {"kind": "shared_system_prompt", "num_requests": n,
                               "arrival": {"kind": "fixed", "rate_req_s": PREFIX_RATE}, "system_len": prefix,
                               "user_len": {"kind": "constant", "value": prompt},
                               "output_len": {"kind": "constant", "value": output}}}
        sched = {"max_batch_size": max(n, 1), "max_num_tokens": max_num_tokens, "enable_chunked_context": True}
        kv = {"pool_tokens": n * (prefix + prompt + output) + 4096}
        reuse = True
    elif served_rate is None:
        workload = {"num_requests": n, "arrival": {"kind": "offline"},
                    "prompt_len": _lengths(prompt), "output_len": _lengths(output)}
        sched = {"max_batch_size": max(n, 1), "max_num_tokens": max_num_tokens, "enable_chunked_context": chunked}
        kv = {"pool_tokens": n * (_longest(prompt) + _longest(output)) + 4096}
    else:  # a served run: Poisson arrivals, lognormal lengths, a serving engine's limits
        workload = {"num_requests": n, "arrival": {"kind": "poisson", "rate_req_s": served_rate},
                    "prompt_len": {"kind": "lognormal", "mean": prompt, "sigma": 0.8, "max": 6144},
                    "output_len": {"kind": "lognormal", "mean": output, "sigma": 0.6, "max": 768}}
        sched = {"max_batch_size": 256, "max_num_tokens": max_num_tokens, "enable_chunked_context": chunked}
        import torch

        # as a serving engine sizes its pool (on a CPU, where that is the host's memory: a
        # pool for every request at three times the mean lengths)
        kv = {"free_gpu_memory_fraction": 0.9} if torch.cuda.is_available() else \
            {"pool_tokens": 3 * n * (prompt + output) + 4096}
    cfg = RunConfig.model_validate({
        "model": model_ref,
        "hardware": hardware,
        "workload": workload if prefix else {"synthetic": workload},
        "scheduler": sched,
        "kv_cache": {**kv, "enable_block_reuse": reuse},
        "runtime": {"cuda_graphs": graphs, "piecewise_graphs": piecewise},
        "cluster": {"tensor_parallel": tp},
        "output": {"plots": False},
    })
    from pathlib import Path

    from servesim.sim.power import roofline_work, run_power_terms

    setup = resolve(cfg, Path.cwd())
    res = simulate_gpu(setup)
    it = res.iterations.to_pandas()
    it["exec_s"] = res.host_times["exec_s"]
    it["prep_s"] = res.host_times["prep_s"]
    busy, bytes_s, kv_s, flops_s = run_power_terms(res.iterations,
                                                   *roofline_work(res.iterations, setup.model, setup.hardware))
    energy = res.summary.get("energy_j") if res.summary.get("energy_source", "").startswith("measured") else None
    label = (f"served {n} at {served_rate:g}/s, ~{prompt}+{output}" if served_rate is not None else
             f"{n}x({prefix} cached)+{prompt}+{output}" if prefix else
             f"{n}x{_label(prompt)}+{_label(output)}{'' if graphs else ' eager'}")
    run = dict(workload=f"{label}{' piecewise' if piecewise else ''}"
                        f"{f' budget {max_num_tokens}' if max_num_tokens != 8192 else ''}{part}", energy_j=energy,
               span_s=res.summary["duration_s"], busy_s=busy, bytes_s=bytes_s, kv_s=kv_s, flops_s=flops_s)
    temps = res.summary.get("gpu_temperature_c") or {}
    run.update(temp_start_c=temps.get("start"), temp_end_c=temps.get("end"))
    it["workload"] = run["workload"]
    return it, run


def _lengths(v) -> dict:
    """A grid point's prompt or output length as a workload length: an int is constant, a
    (low, high) pair uniform between them (inclusive)."""
    if isinstance(v, (tuple, list)):
        lo, hi = (int(x) for x in v)
        return {"kind": "uniform", "low": lo, "high": hi}
    return {"kind": "constant", "value": int(v)}


def _longest(v) -> int:
    return int(max(v)) if isinstance(v, (tuple, list)) else int(v)


def _label(v) -> str:
    return f"{v[0]}-{v[1]}" if isinstance(v, (tuple, list)) else str(v)


def _small(model: ModelSpec) -> bool:
    """Below ~3B parameters: the grid's "small" points."""
    return model.weight_bytes < 6e9


def served_point(model: ModelSpec) -> tuple[int, float, int, int]:
    """The served run for this model: the small point below ~3B parameters."""
    return SERVED_POINTS["small" if _small(model) else "large"]


def served_points_of(model: ModelSpec) -> list[tuple[int, float, int, int]]:
    """The served runs for this model: `served_point` and its `SERVED_HIGH_POINTS` one, if any."""
    high = SERVED_HIGH_POINTS.get("small" if _small(model) else "large")
    return [served_point(model), *([high] if high else [])]


def gemm_sweep(model: ModelSpec, device=None, dtype=None, tokens=GEMM_TOKENS, reps: int = 5,
               windows: int = 3, tp: int = 1, precision: str = "bf16") -> list[dict]:
    """Seconds of each decoder-layer GEMM of ``model`` (``F.linear``, as the model runs
    it; at ``tp > 1`` one GPU's shard of it, `ModelSpec.linear_shapes`) at each row count
    in ``tokens``: rows ``linear, k, n, tokens, seconds`` for `GemmCurve`. Random weights of the real shapes; each repetition uses the next of
    enough weight copies that the weights come from HBM, as in a forward pass whose other
    layers have evicted them from L2.

    CUDA: the GPU time of ``reps`` back-to-back calls between two events, the least of
    ``windows`` such windows, after a warm-up call. Each window starts behind a ~1.5 ms
    spin kernel (``torch.cuda._sleep``) so that all its launches are queued before the
    first GEMM runs: a small GEMM runs in 5-10 us, less than the host takes to launch one
    (~40 us on the H100 hosts here), and timed bare it measured the launch rate (the first
    sweep priced Llama-3.2-1B's qkv at 50 us at one row: 12x the roofline). In a forward
    pass the GEMMs run back to back inside CUDA graphs, which this reproduces. Elsewhere
    (tests): the host's clock.

    ``precision="fp8"``: the fp8 linears' GEMM as the model runs it (`weights.fp8_linear`):
    ``torch._scaled_mm`` of e4m3 weights (per-channel scales) and inputs already quantised
    per token -- the curve `RooflineConfig.gemm_times_by_precision["fp8"]` stands for (the
    input quantisation is priced apart, ``act_quant_latency_s``)."""
    import time

    import torch
    import torch.nn.functional as F

    from servesim.sim.cost_model import LINEARS

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    cuda = dev.type == "cuda"
    elem = torch.empty((), dtype=dt).element_size()
    shapes = model.linear_shapes(tp)
    top = max(tokens)
    out = []
    gen = torch.Generator(device=dev).manual_seed(0)
    if precision not in ("bf16", "fp8"):
        raise ValueError(f"gemm_sweep: precision must be bf16 or fp8, got {precision!r}")
    fp8 = precision == "fp8"
    if fp8:
        from servesim.kernels import ops

        from .weights import quantize_fp8
        elem = 1
    for name in LINEARS:
        k, n = shapes[name]
        copies = max(2, -(-2 * L2_BYTES // (k * n * elem))) if cuda else 1
        ws = [torch.randn(n, k, generator=gen, device=dev, dtype=dt) * 0.02 for _ in range(copies)]
        if fp8:
            ws = [quantize_fp8(w) for w in ws]
        x = torch.randn(top, k, generator=gen, device=dev, dtype=dt)
        for t in tokens:
            xt = x[:t]
            if fp8:
                xq, sx = ops.quant_fp8_rowwise(xt)

                def lin(w, xq=xq, sx=sx):
                    return torch._scaled_mm(xq, w.q.t(), scale_a=sx, scale_b=w.scale, out_dtype=dt)
            else:
                def lin(w, xt=xt):
                    return F.linear(xt, w)
            lin(ws[0])  # warm-up: cuBLAS's heuristics and workspace for this shape
            s = back_to_back_seconds(lambda r: lin(ws[r % copies]), reps, windows, cuda)
            out.append({"linear": name, "k": k, "n": n, "tokens": int(t), "seconds": float(s)})
        del ws, x
    if cuda:
        torch.cuda.empty_cache()
    return out


def grid_jobs(model: ModelSpec, decode_points=None, prefill_points=None, mixed_points=None,
              piecewise_points=None, served_points=None, processes: int = 1, power_points=None,
              prefix_points=None, tp: int = 1, prompt_points=None, chunked_points=None) -> list[dict]:
    """The grid's runs, in order: each a dict of `_run`'s keyword arguments plus ``keep``
    (which iterations become rows: all but the first SKIP_FIRST, the prefills only, or none
    for the power model's runs).
    With several processes the served run is split into one part per process (the same
    arrivals, 1/processes of the requests each), so the host terms it informs come from
    every process."""
    jobs = []
    for n, prompt, output, graphs in (decode_points or DECODE_POINTS):
        jobs.append(dict(n=n, prompt=prompt, output=output, graphs=graphs, keep="skip"))
    for n, prompt, output, graphs in (POWER_POINTS if power_points is None else power_points):
        jobs.append(dict(n=n, prompt=prompt, output=output, graphs=graphs, keep="power"))
    for n, prompt, output, budget in (MIXED_POINTS if mixed_points is None else mixed_points):
        jobs.append(dict(n=n, prompt=prompt, output=output, graphs=True, max_num_tokens=budget, keep="skip"))
    for n, prompt, output, budget in (PIECEWISE_POINTS if piecewise_points is None else piecewise_points):
        jobs.append(dict(n=n, prompt=prompt, output=output, graphs=True, max_num_tokens=budget, piecewise=True,
                         keep="skip"))
    for n, prefix, new, output, budget in (PREFIX_POINTS if prefix_points is None else prefix_points):
        jobs.append(dict(n=n, prompt=new, output=output, graphs=True, max_num_tokens=budget, piecewise=True,
                         prefix=prefix, keep="skip"))
    small = _small(model)
    for n, prompt in (PROMPT_POINTS if prompt_points is None else prompt_points):
        jobs.append(dict(n=n, prompt=prompt, output=1, graphs=True, max_num_tokens=prompt, keep="skip"))
    for n, prompt, output, budget, pw in (CHUNKED_POINTS if chunked_points is None else chunked_points):
        if pw and not small and chunked_points is None:
            continue
        jobs.append(dict(n=n, prompt=prompt, output=output, graphs=True, max_num_tokens=budget, piecewise=pw,
                         keep="skip"))
    for n, rate, prompt, output in (served_points_of(model) if served_points is None else served_points):
        k = max(1, min(processes, n))
        for part in range(k):
            jobs.append(dict(n=n // k + (part < n % k), prompt=prompt, output=output, graphs=True, piecewise=True,
                             served_rate=rate, part=part_label(part, k), keep="skip"))
    for n, prompt in (prefill_points or PREFILL_POINTS):
        jobs.append(dict(n=n, prompt=prompt, output=1, graphs=True, keep="prefill"))
    if tp > 1:  # every run on tp GPUs (cluster.tensor_parallel)
        jobs = [{**j, "tp": tp} for j in jobs]
    return jobs


def _progress(msg: str) -> None:
    """A line on stderr: a calibration runs for minutes."""
    import sys

    print(f"[sim calibrate] {msg}", file=sys.stderr, flush=True)


def run_jobs(ref: str, hardware: str, jobs: list[dict], where: str = "") -> list[tuple]:
    """(iterations, energy run) of each job, run in this process."""
    import time

    out = []
    for i, j in enumerate(jobs):
        kw = {k: v for k, v in j.items() if k != "keep"}
        t0 = time.perf_counter()
        out.append(_run(ref, chunked=True, hardware=hardware, **kw))
        _progress(f"{where}grid run {i + 1}/{len(jobs)} {out[-1][1]['workload']!r}: "
                  f"{len(out[-1][0])} iterations, {time.perf_counter() - t0:.1f} s")
    return out


def _run_in_processes(ref: str, hardware: str, jobs: list[dict], processes: int) -> list[tuple]:
    """`run_jobs` over `processes` fresh Python processes, one after the other, job i in
    process i mod processes: each grid run is measured at some process's host speed, and
    every kind of run at several (host_probe.md: the host part of a step runs 1.5-2x
    faster or slower from one process to the next; a one-process calibration carries its
    process's speed into every host term)."""
    import pickle
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    results: list[tuple | None] = [None] * len(jobs)
    with tempfile.TemporaryDirectory() as tmp:
        for w in range(processes):
            mine = [i for i in range(len(jobs)) if i % processes == w]
            if not mine:
                continue
            spec, out = Path(tmp) / f"jobs{w}.pkl", Path(tmp) / f"out{w}.pkl"
            spec.write_bytes(pickle.dumps({"ref": ref, "hardware": hardware, "jobs": [jobs[i] for i in mine]}))
            _progress(f"grid process {w + 1}/{processes}: {len(mine)} runs")
            p = subprocess.run([sys.executable, "-m", "servesim.gpu_backend.profiler", str(spec), str(out),
                                f"process {w + 1}/{processes}: "], stdout=subprocess.DEVNULL)  # stderr: live
            if p.returncode != 0:
                raise RuntimeError(f"calibration grid process {w + 1}/{processes} failed (exit {p.returncode}; "
                                   "its traceback is above)")
            for i, r in zip(mine, pickle.loads(out.read_bytes())):
                results[i] = r
    return results  # type: ignore[return-value]


def measure_grid(model: ModelSpec, model_ref: str | None = None, hardware: str = "h100-sxm",
                 decode_points=None, prefill_points=None, mixed_points=None,
                 piecewise_points=None, served_points=None, processes: int = 1,
                 power_points=None, prefix_points=None, tp: int = 1, prompt_points=None,
                 chunked_points=None,
                 gemm_precisions: tuple[str, ...] | None = None,
                 kv_dtypes: tuple[str, ...] | None = None, long_kv_sizes=True) -> tuple[list[dict], dict]:
    """Rows for sim/calibrate.py and the environment they were measured in (with
    ``idle_power_w`` and ``power_runs``, the energy of each grid run, where NVML reports
    it). `model_ref` is what an experiment would name the model by (default: its bundled
    name). ``processes``: the grid's runs are spread over this many fresh processes
    (`_run_in_processes`); the heat-up, the idle power and the GEMM sweep run here.
    ``tp > 1``: every grid run at ``cluster.tensor_parallel: tp``, the GEMM sweep at one
    GPU's shapes, and ``env["allreduce"]``: one all-reduce's seconds by message size over
    ``tp`` GPUs (`tp.allreduce_sweep`, the sizes of `tp.allreduce_sizes`).
    ``gemm_precisions``: the GEMM sweeps besides bf16's (``("fp8",)``; default: fp8 when the
    model's weights are fp8), each in ``env["gemm_<precision>"]``. ``kv_dtypes``: the decode
    attention kernel alone per KV-cache dtype (`kv_attention_sweep`; default bf16 and fp8 when
    the model's KV cache is fp8), in ``env["kv_attention"]``; ``env["gemm_sweep_s"]``: each
    GEMM sweep's wall seconds by precision. ``long_kv_sizes``: the kernel alone
    in the model's own KV dtype at the (batch, context) sizes given (True:
    `kv_attention_sweep.LONG_SIZES`, long contexts at the decode graphs' batches; falsy: none), in
    ``env["kv_attention_long"]`` (sim/kv_attention.py `fit_long`)."""
    import time

    import torch

    ref = model_ref or model.name
    rows: list[dict] = []
    runs: list[dict] = []
    its = []  # every grid run's iterations, labelled by run (kept beside the grid)
    idle_w = None
    if torch.cuda.is_available():  # before minutes of measuring: is this the spec's GPU?
        from servesim.sim.specs import load_hardware

        from .nvml import Nvml, device_index
        from .runner import check_device

        check_device(load_hardware(hardware), torch.cuda.get_device_name())

        nv = Nvml.open(device_index(torch.device("cuda")))
        if nv is not None:
            from .nvml import heat_up

            # warm the GPU first (serving GPUs run hot; power at the same work rises with
            # temperature), then its idle power: what a warm GPU draws between iterations
            heat_up(torch.device("cuda"), HEAT_UP_S)
            torch.cuda.synchronize()
            idle_w = nv.idle_power_w(3.0)
    _progress(f"{model.name}: timing the decoder-layer GEMMs at {len(GEMM_TOKENS)} row counts")
    t_sweep = time.perf_counter()
    gemm = gemm_sweep(model, tp=tp)
    extra_gemm = {}
    sweep_s = {"bf16": round(time.perf_counter() - t_sweep, 1)}  # wall seconds of each sweep (the provenance's)
    for prec in gemm_precisions if gemm_precisions is not None else (("fp8",) if model.quant.weights == "fp8" else ()):
        _progress(f"{model.name}: timing the {prec} GEMMs (torch._scaled_mm) at {len(GEMM_TOKENS)} row counts")
        t_sweep = time.perf_counter()
        extra_gemm[f"gemm_{prec}"] = gemm_sweep(model, tp=tp, precision=prec)
        sweep_s[prec] = round(time.perf_counter() - t_sweep, 1)
    kvd = kv_dtypes if kv_dtypes is not None else (("bf16", "fp8") if model.kv_dtype == "fp8" else ())
    if kvd:
        from .kv_attention_sweep import kv_attention_sweep

        _progress(f"{model.name}: timing the decode attention kernel alone per KV dtype ({', '.join(kvd)})")
        extra_gemm["kv_attention"] = kv_attention_sweep(model, kvd, tp=tp)
    if model.kv_dtype in ("bf16", "fp8") and long_kv_sizes:
        from .kv_attention_sweep import LONG_SIZES, kv_attention_sweep

        sizes = LONG_SIZES if long_kv_sizes is True else tuple(long_kv_sizes)
        _progress(f"{model.name}: timing the decode attention kernel alone at long contexts ({len(sizes)} sizes)")
        extra_gemm["kv_attention_long"] = kv_attention_sweep(model, (model.kv_dtype,), sizes=sizes, tp=tp)
    allreduce = None
    if tp > 1:
        from .tp import allreduce_sizes, allreduce_sweep

        _progress(f"all-reduce over {tp} GPUs at {len(allreduce_sizes(model))} message sizes")
        allreduce = allreduce_sweep(tp, allreduce_sizes(model))

    def host(r) -> float:  # the step's host time: outside the executor + its input packing
        return float(r.duration_s - r.exec_s + r.prep_s)

    jobs = grid_jobs(model, decode_points, prefill_points, mixed_points, piecewise_points, served_points,
                     processes, power_points, prefix_points, tp, prompt_points, chunked_points)
    results = (run_jobs(ref, hardware, jobs) if processes <= 1 else
               _run_in_processes(ref, hardware, jobs, processes))
    k = max(1, processes)
    for i, (j, (it, run)) in enumerate(zip(jobs, results)):  # a grid run: its energy, iterations, rows
        measured = it.iloc[SKIP_FIRST:] if j["keep"] == "skip" else it.iloc[:0] if j["keep"] == "power" else \
            it[(it.num_gen_requests == 0) & (it.ctx_tokens > 0)]
        runs.append(run)
        its.append(it)
        # the process it ran in (job i in process i mod k): fit_host gives each its host speed
        rows.extend({**r, "process": i % k} for r in rows_from_iterations(model.name, measured, host))
    env = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": str(torch.__version__),
        "cuda": str(torch.version.cuda),
        "measurements": len(rows),
        "median_decode_s": float(np.median([r["time_s"] for r in rows if r["kind"] == "decode"])),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import subprocess

        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    env["grid_processes"] = max(1, processes)
    env["idle_power_w"] = idle_w
    env["power_runs"] = runs
    env["grid_iterations"] = pd.concat(its, ignore_index=True) if its else None
    env["gemm"] = gemm
    env["gemm_sweep_s"] = sweep_s
    env.update(extra_gemm)
    if tp > 1:
        env["tensor_parallel"] = tp
        env["allreduce"] = allreduce
    return rows, env


def _worker(spec_path: str, out_path: str, where: str = "") -> int:
    """A grid process (`_run_in_processes`): runs its jobs, pickles their results."""
    import pickle
    from pathlib import Path

    import torch

    spec = pickle.loads(Path(spec_path).read_bytes())
    if torch.cuda.is_available():  # the GPU cooled while this process started
        from .nvml import heat_up

        heat_up(torch.device("cuda"), WORKER_HEAT_UP_S)
    Path(out_path).write_bytes(pickle.dumps(run_jobs(spec["ref"], spec["hardware"], spec["jobs"], where)))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_worker(*sys.argv[1:4]))
