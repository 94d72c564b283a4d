"""`simulate_gpu`: run one variant of an experiment on the real model (``sim run --backend gpu``).

The same engine (`servesim.sim.engine.Engine`, built by `servesim.sim.runner.engine_config`),
the same requests (`prepare_requests`: prefix keys and retention exactly as
`servesim.sim.runner.simulate` attaches them), the same records and summary
(`finish_run`) -- with `GpuExecutor` running every
iteration on a Llama model and the wall-clock driver (`gpu_backend/driver.py`) in place of
SimPy. ``summary["backend"] == "gpu"``.

Model: the dimensions of ``setup.model`` (the bundled or user config the experiment names).
Weights: random, seeded with the experiment's ``seed`` (default), or an HF safetensors
checkpoint (file or directory, sharded or not) named by the environment variable
``SERVESIM_WEIGHTS`` (or the ``weights=`` argument); its tensors must match the config.
Device: CUDA when available (bf16 weights and KV cache), else the CPU (fp32, the kernels'
torch references). The KV pool has exactly the engine's ``num_blocks`` blocks of
``kv_cache.tokens_per_block`` tokens.

Supported: every capacity policy, chunked context, CUDA graphs with padding (decode-only
iterations whole; iterations with context chunks piecewise, ``runtime.piecewise_graphs``),
the overlap scheduler, prefix reuse (with partial-block copies), retention priorities,
preemption by recompute or by swap, speculative decoding with the ``draft_model`` and
``ngram`` proposers (gpu_backend/speculative.py; acceptance ``speculative.gpu_acceptance``:
``controlled`` draws it as the simulator does, ``natural`` verifies the drafts; the drafter
gets random weights seeded with the experiment's ``seed``, or the checkpoint named by
``SERVESIM_DRAFT_WEIGHTS``), tensor parallelism (``cluster.tensor_parallel``: one process per
GPU, rank 0 here and the others spawned, gloo on a CPU: gpu_backend/tp.py). Not supported
(ConfigError): several replicas, speculative decoding with tensor parallelism, the
``medusa`` and ``eagle`` proposers (no heads), the prefix cache's host offload tier
(``kv_cache.host_cache_size_gb``: the engine does not say which block it offloads), models
with biases or sliding-window attention. On a CPU the KV pool is capped at
`CPU_POOL_LIMIT_BYTES`.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from servesim.sim.engine import Engine
from servesim.sim.memory import default_activation_reserve_bytes
from servesim.sim.runner import RunResult, Setup, engine_config, finish_run, make_run_router, prepare_requests
from servesim.sim.schemas import build_table
from servesim.sim.types import ConfigError
from servesim.traces.schema import HASH_BLOCK_SIZE

WEIGHTS_ENV = "SERVESIM_WEIGHTS"
DRAFT_WEIGHTS_ENV = "SERVESIM_DRAFT_WEIGHTS"
CPU_POOL_LIMIT_BYTES = 2 * 10**9


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def model_dims(setup: Setup):
    """`ModelDims` of the experiment's model (ConfigError for what the backend lacks)."""
    from .weights import ModelDims

    m = setup.model
    unsupported = [f for f in ("qkv_bias", "o_bias", "mlp_bias") if getattr(m, f, False)]
    if unsupported:
        raise ConfigError(f"model {m.name}: the gpu backend's Llama has no biases ({', '.join(unsupported)})",
                          "model")
    if getattr(m, "sliding_window", None):
        raise ConfigError(f"model {m.name}: sliding-window attention is not supported by the gpu backend", "model")
    try:
        return ModelDims.from_spec(m)
    except ValueError as e:
        raise ConfigError(f"model {m.name}: {e}", "model") from None


def drafter_dims(setup: Setup):
    """`ModelDims` of the speculative drafter (ConfigError for what the backend lacks)."""
    from .weights import ModelDims

    try:
        return ModelDims.from_spec(setup.speculation.drafter)
    except ValueError as e:
        raise ConfigError(f"drafter {setup.speculation.drafter.name}: {e}", "speculative.draft_model") from None


def _check_supported(setup: Setup) -> None:
    cfg = setup.cfg
    problems = []
    if cfg.cluster.replicas != 1:
        problems.append(("cluster.replicas",
                         f"the gpu backend runs one replica on one GPU, got {cfg.cluster.replicas}"))
    if cfg.cluster.groups and cfg.cluster.replicas == 1:
        problems.append(("cluster.groups", "the gpu backend runs the run's own settings on one GPU: give them "
                         "at the top level, not in cluster.groups"))
    if cfg.cluster.disaggregation is not None:
        problems.append(("cluster.disaggregation", "the gpu backend runs one replica on one GPU: disaggregated "
                         "serving is simulated only (--backend sim)"))
    tp = cfg.cluster.tensor_parallel
    if tp > 1 and setup.speculation is not None:
        problems.append(("cluster.tensor_parallel", f"the gpu backend runs speculative decoding on one GPU "
                         f"(tensor_parallel 1), got {tp}: switch speculative decoding off or set it to 1"))
    if tp > 1:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() < tp:
            problems.append(("cluster.tensor_parallel", f"tensor_parallel {tp} runs one process per GPU but "
                             f"{torch.cuda.device_count()} GPU(s) are visible"))
    if cfg.kv_cache.host_cache_size_gb > 0:
        problems.append(("kv_cache.host_cache_size_gb",
                         "the gpu backend has no host offload tier: set it to 0"))
    if cfg.kv_cache.scales == "calibrated" and tp > 1:
        problems.append(("kv_cache.scales", f"calibrated KV scales are measured on one GPU (tensor_parallel 1), got "
                         f"tensor_parallel {tp}: use kv_cache.scales: unit"))
    if setup.speculation is not None and cfg.speculative.proposer not in ("draft_model", "ngram"):
        problems.append(("speculative.proposer", f"the gpu backend runs the draft_model and ngram proposers, not "
                         f"{cfg.speculative.proposer} (no {cfg.speculative.proposer} heads)"))
    if problems:
        raise ConfigError(problems)


KV_CALIBRATION_PROMPTS = 4  # kv_cache.scales: calibrated -- seeded random prompts prefilled before the run
KV_CALIBRATION_TOKENS = 512


def calibrated_kv_scales(model, seed: int, block_size: int) -> tuple[list[float], list[float]]:
    """``kv_cache.scales: calibrated``: per-layer fp8 scales from a prefill of
    `KV_CALIBRATION_PROMPTS` random prompts of `KV_CALIBRATION_TOKENS` tokens (seeded by the
    experiment's ``seed``; never the served requests) into a pool of the model's dtype:
    amax x 2 / 448 of each layer's keys and values (`LlamaModel.calibrate_kv_scales`)."""
    import torch

    n = max(1, min(KV_CALIBRATION_TOKENS, model.max_positions - 1))
    g = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    prompts = torch.randint(0, model.dims.vocab_size, (KV_CALIBRATION_PROMPTS, n), generator=g).tolist()
    return model.calibrate_kv_scales(prompts, block_size)


def _check_workload(setup: Setup, dims) -> int:
    """The longest KV length a request can reach; ConfigError if beyond the model."""
    df = setup.workload
    if not len(df):
        return 1
    total = df["prompt_len"].to_numpy(dtype=np.int64) + df["output_len"].to_numpy(dtype=np.int64)
    longest = int(total.max())
    if longest - 1 > dims.max_position_embeddings:
        raise ConfigError(f"a request reaches {longest - 1} tokens (prompt + output), beyond the model's "
                          f"max_position_embeddings ({dims.max_position_embeddings}): cap them with "
                          "workload.max_prompt_len / workload.max_output_len", "workload")
    if "prompt_tokens" in df.columns:
        hi = -1
        lo = 0
        for t in df["prompt_tokens"].tolist():
            if t is not None and not (isinstance(t, float) and np.isnan(t)) and len(t):
                a = np.asarray(t, dtype=np.int64)
                hi = max(hi, int(a.max()))
                lo = min(lo, int(a.min()))
        if hi >= dims.vocab_size or lo < 0:
            raise ConfigError(f"prompt_tokens hold token id {hi if hi >= dims.vocab_size else lo}, outside the "
                              f"model's vocabulary [0, {dims.vocab_size}) (a generated prefix workload takes "
                              "vocab_size)", "workload")
    return longest


def _mem_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_memory(setup: Setup, dims, device, dtype, piecewise_tokens: int = 0, drafter=None,
                  verify_tokens: int = 0, resident_bytes: int = 0) -> None:
    """ConfigError unless weights, KV pool and reserves fit the device (the host on a CPU).
    ``piecewise_tokens``: the largest token count of the piecewise graphs (0: off).
    ``drafter``: the draft model's `ModelDims` (its weights and its own KV pool of the same
    block count count too); ``verify_tokens``: the largest token count of the verification's
    piecewise graphs (0: none); ``resident_bytes``: of the weights, those already on the
    device (models kept from an earlier run)."""
    import torch

    from .kv_pool import KVPool
    from .piecewise_runner import static_buffer_bytes

    elem = torch.empty((), dtype=dtype).element_size()
    weights = dims.num_params() * elem
    kv_dt = torch.float8_e4m3fn if dims.kv_dtype == "fp8" else dtype  # LlamaModel.kv_cache_dtype
    per_block = KVPool.bytes_per_block(dims.num_layers, setup.cfg.kv_cache.tokens_per_block, dims.num_kv_heads,
                                       dims.head_dim, kv_dt)
    pool = per_block * setup.num_blocks
    if drafter is not None:
        weights += drafter.num_params() * elem
        pool += KVPool.bytes_per_block(drafter.num_layers, setup.cfg.kv_cache.tokens_per_block,
                                       drafter.num_kv_heads, drafter.head_dim, dtype) * setup.num_blocks
    kvc = setup.cfg.kv_cache
    s = setup.cfg.scheduler
    if device.type == "cuda":
        reserve = (kvc.activation_reserve_gb * 1e9 if kvc.activation_reserve_gb is not None
                   else default_activation_reserve_bytes(setup.model, s.max_num_tokens, 1,
                                                         max_batch_size=s.max_batch_size))
        if setup.cfg.runtime.cuda_graphs:
            reserve += min(setup.cfg.runtime.graph_max_batch_size or s.max_batch_size, s.max_batch_size) \
                * dims.vocab_size * 4  # the graphs' static logits
        if piecewise_tokens:
            reserve += static_buffer_bytes(dims, piecewise_tokens, dtype)  # the piecewise graphs' buffers
        if verify_tokens:
            reserve += static_buffer_bytes(dims, verify_tokens, dtype)
        if drafter is not None and setup.cfg.runtime.cuda_graphs:  # the drafter's static logits (2x rows)
            reserve += 2 * min(setup.cfg.runtime.graph_max_batch_size or s.max_batch_size, s.max_batch_size) \
                * dims.vocab_size * 4
        free, _ = torch.cuda.mem_get_info(device)
        need = weights - resident_bytes + pool + reserve
        if need > free:
            raise ConfigError(
                f"weights {_gb(weights)} + KV pool {_gb(pool)} ({setup.num_blocks} blocks"
                f"{', the drafter and its pool included' if drafter is not None else ''}) + activation reserve "
                f"{_gb(reserve)} = {_gb(need)} exceed the free memory of {torch.cuda.get_device_name(device)} "
                f"({_gb(free)}): set kv_cache.pool_tokens or lower kv_cache.free_gpu_memory_fraction", "kv_cache")
        return
    if pool > CPU_POOL_LIMIT_BYTES:
        raise ConfigError(
            f"the KV pool of {setup.num_blocks} blocks takes {_gb(pool)} in fp32 on the CPU (limit "
            f"{_gb(CPU_POOL_LIMIT_BYTES)}): set kv_cache.pool_tokens (e.g. 16384) to run the gpu backend on a CPU",
            "kv_cache.pool_tokens")
    avail = _mem_available_bytes()
    if avail is not None and weights + pool > 0.9 * avail:
        raise ConfigError(f"model {setup.model.name}: fp32 weights {_gb(weights)} + KV pool {_gb(pool)} do not fit "
                          f"the {_gb(avail)} of available host memory (no CUDA device found)", "model")


def check_device(hw, device_name: str) -> None:
    """ConfigError when the CUDA device is not the GPU the hardware spec describes: a run
    or a calibration on it would be recorded, and a profile fitted, as that other GPU's."""
    names = hw.device_names
    if names and not any(n.lower() in device_name.lower() for n in names):
        raise ConfigError(f"this machine's GPU is {device_name!r} but hardware {hw.name!r} describes "
                          f"{' / '.join(names)}: name this GPU's hardware spec (hardware: / --hardware)", "hardware")


def simulate_gpu(setup: Setup, progress: Callable[[float], None] | None = None, *,
                 check_invariants: bool = False, device: str | None = None, weights: str | os.PathLike | None = None,
                 use_graphs: bool | None = None, dtype=None, draft_weights: str | os.PathLike | None = None,
                 model_cache: dict | None = None) -> RunResult:
    """Run ``setup`` on the real model; returns the same `RunResult` as `simulate`.

    The result also carries ``tokens`` (request_id -> generated token ids, an
    ``array('q')`` each), ``gpu_stats`` (device, dtype, iteration counts, whether CUDA
    graphs were captured) and ``host_times`` (per iteration: ``prep_s``, the executor's
    input packing before the launch, and ``exec_s``, its whole call; an iteration's
    ``duration_s`` minus ``exec_s`` is the engine's scheduling and bookkeeping). On a GPU
    with NVML the run's energy is the GPU's energy counter over the run. ``use_graphs=False``
    keeps the padded graph paths (decode and piecewise) but runs them eagerly (default:
    capture on CUDA). ``dtype``: a torch dtype for weights and KV cache (default bf16 on
    CUDA, fp32 on a CPU). ``draft_weights``: the drafter's checkpoint (default
    ``SERVESIM_DRAFT_WEIGHTS``, else random weights seeded with the experiment's ``seed``).
    ``model_cache``: a dict in which the built models are kept and reused by later calls
    with the same model, weights, dtype, device and seed (a benchmark's many runs; the
    caller frees it), instead of being freed after the run."""
    import torch

    from .executor import GpuExecutor
    from .model import LlamaModel
    from .weights import WeightLoadError

    t_start = time.perf_counter()
    cfg = setup.cfg
    _check_supported(setup)
    dims = model_dims(setup)
    if cfg.kv_cache.scales == "calibrated" and dims.kv_dtype != "fp8":
        raise ConfigError(f"kv_cache.scales: calibrated applies to an fp8 KV cache; {setup.model.name}'s is "
                          f"{dims.kv_dtype} (set kv_cache.dtype: fp8, or kv_cache.scales: unit)", "kv_cache.scales")
    longest = _check_workload(setup, dims)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        check_device(setup.hardware, torch.cuda.get_device_name(dev))
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    ecfg = engine_config(setup, check_invariants)
    pw = ecfg.piecewise_padding
    sp = setup.speculation
    ddims = None
    if sp is not None and sp.drafter is not None:
        ddims = drafter_dims(setup)
    gp = ecfg.graph_padding
    vt = 0
    if sp is not None and gp is not None:
        from .executor import verify_sizes

        vt = verify_sizes(gp.sizes, sp.policy.max_draft_len)[-1]
    wpath = weights if weights is not None else (os.environ.get(WEIGHTS_ENV) or None)
    if wpath is not None and not Path(wpath).exists():
        raise ConfigError(f"checkpoint not found: {wpath}", WEIGHTS_ENV)
    dpath = None
    if ddims is not None:
        dpath = draft_weights if draft_weights is not None else (os.environ.get(DRAFT_WEIGHTS_ENV) or None)
        if dpath is not None and not Path(dpath).exists():
            raise ConfigError(f"checkpoint not found: {dpath}", DRAFT_WEIGHTS_ENV)

    def key(d, path):
        return (repr(d.spec), str(path), str(dtype), str(dev), cfg.seed)

    elem = torch.empty((), dtype=dtype).element_size()
    resident = sum(d.num_params() * elem for d, p in ((dims, wpath), (ddims, dpath))
                   if d is not None and model_cache is not None and key(d, p) in model_cache)
    tp = cfg.cluster.tensor_parallel
    if tp > 1:
        from .tp import shard_dims

        if dev.type == "cuda":
            dev = torch.device("cuda:0")  # rank r on cuda:r
        mem_dims = shard_dims(dims, tp, 0)  # what one GPU holds
    else:
        mem_dims = dims
    _check_memory(setup, mem_dims, dev, dtype, piecewise_tokens=pw.sizes[-1] if pw is not None else 0,
                  drafter=ddims, verify_tokens=vt, resident_bytes=resident)

    requests = prepare_requests(setup)

    def build(d, path, env):
        k = key(d, path)
        if model_cache is not None and k in model_cache:
            return model_cache[k]
        try:
            m = LlamaModel(d, path, dtype=dtype, device=dev, seed=cfg.seed)
        except (WeightLoadError, FileNotFoundError, OSError) as e:
            raise ConfigError(f"cannot load weights from {path}: {e}", env) from None
        if model_cache is not None:
            model_cache[k] = m
        return m

    hbs = setup.workload.attrs.get(HASH_BLOCK_SIZE)
    if tp > 1:
        from .tp import tp_executor

        try:
            group, executor = tp_executor(
                dims, tp, dev, dtype, wpath, cfg.seed, ecfg.num_blocks, ecfg.tokens_per_block,
                graph_sizes=ecfg.graph_padding.sizes if ecfg.graph_padding is not None else None,
                piecewise_sizes=pw.sizes if pw is not None else None, max_seq_len=longest,
                use_graphs=use_graphs, overlap=cfg.runtime.overlap_scheduler,
                hash_block_size=int(hbs) if hbs else None)
        except (WeightLoadError, FileNotFoundError) as e:
            raise ConfigError(f"cannot load weights from {wpath}: {e}", WEIGHTS_ENV) from None
        ok = False
        try:
            box = [executor]
            del executor
            result = _run_gpu(setup, box, requests, dev, t_start, progress, check_invariants, ecfg)
            ok = True
            return result
        finally:
            group.close(ok=ok)  # after a failure: the other ranks are terminated, not waited for
    model = build(dims, wpath, WEIGHTS_ENV)
    speculation = None
    if sp is not None:
        from .speculative import GpuSpeculation

        scfg = cfg.speculative
        speculation = GpuSpeculation(
            scfg.proposer, sp.policy.max_draft_len, acceptance=scfg.gpu_acceptance, alpha=sp.alpha, beta=sp.beta,
            # the simulator's seed for the same replica (sim/runner.make_sim_speculation): a run
            # and its simulated replay draw the same acceptances for the same schedule
            seed=cfg.seed * 1009 + 0,
            drafter=build(ddims, dpath, DRAFT_WEIGHTS_ENV) if ddims is not None else None)
    kv_scales = (calibrated_kv_scales(model, cfg.seed, ecfg.tokens_per_block)
                 if cfg.kv_cache.scales == "calibrated" else None)
    executor = GpuExecutor(model, ecfg.num_blocks, ecfg.tokens_per_block,
                           graph_sizes=ecfg.graph_padding.sizes if ecfg.graph_padding is not None else None,
                           piecewise_sizes=pw.sizes if pw is not None else None,
                           max_seq_len=longest, overlap=cfg.runtime.overlap_scheduler, seed=cfg.seed,
                           hash_block_size=int(hbs) if hbs else None, use_graphs=use_graphs,
                           speculation=speculation, kv_scales=kv_scales)
    box = [executor]
    del executor, model, speculation  # (held by the box only: freed before the next variant)
    return _run_gpu(setup, box, requests, dev, t_start, progress, check_invariants, ecfg)


def _run_gpu(setup: Setup, box: list, requests, dev, t_start: float, progress, check_invariants: bool,
             ecfg) -> RunResult:
    """Warm up the executor in ``box`` (its only reference), run every request through the
    engine on the wall clock and build the `RunResult` (the executor's model, pool and
    graphs are freed before it returns)."""
    import torch

    from .driver import run_wallclock

    cfg = setup.cfg
    executor = box.pop()
    model = executor.model
    speculation = executor.spec
    executor.warmup()
    engine = Engine(ecfg, executor)
    router = make_run_router(setup)  # the same router class (and policies) as the simulator's
    nvml = None
    if dev.type == "cuda":
        from .nvml import Nvml, device_index, run_energy

        idx = device_index(dev)
        nvml = Nvml.open(idx)
    temps = {}
    tp = cfg.cluster.tensor_parallel
    ranks_nvml = []  # the other ranks' GPUs: their energy counters over the run count too
    if nvml is not None and tp > 1:
        ranks_nvml = [n for n in (Nvml.open(i) for i in range(1, tp)) if n is not None]
    # no garbage-collector pauses mid-run (tens of ms with the run's many small objects):
    # what exists now is frozen out of collection, and collection waits for the end
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        if nvml is not None:
            temps["start"] = nvml.temperature_c()
            others0 = [n.energy_j() for n in ranks_nvml]
            _, energy_j = run_energy(nvml, idx, lambda: run_wallclock(requests, [engine], router, progress=progress))
            energy_j += sum(n.energy_j() - e0 for n, e0 in zip(ranks_nvml, others0))
            temps["end"] = nvml.temperature_c()
        else:
            energy_j = None
            run_wallclock(requests, [engine], router, progress=progress)
    finally:
        gc.enable()
        gc.unfreeze()

    tokens = executor.outputs
    stats = executor.stats()
    host = {"prep_s": np.array([executor.prep_s.get(i, np.nan) for i in range(engine.g)]),
            "exec_s": np.array([executor.exec_s.get(i, np.nan) for i in range(engine.g)])}
    # free the model, the KV pool and the graphs before the next variant builds its own
    engine.executor = None
    model.kv_pool = None  # (a cached model outlives the run: not its pool)
    if speculation is not None and speculation.drafter is not None:
        speculation.drafter.kv_pool = None
    del executor, model, speculation
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    result = finish_run(setup, requests, [engine], "gpu", time.perf_counter() - t_start,
                        measured_energy_j=energy_j)
    result.tokens = tokens
    result.gpu_stats = stats
    if temps.get("start") is not None:  # the die's temperature at the run's start and end
        result.summary["gpu_temperature_c"] = temps
    result.host_times = host
    # per iteration, the executor's host time (input packing; its whole call) beside the
    # engine's columns: where an iteration's time went, for `sim compare` and calibration
    its = result.iterations
    idx = its.column("iteration").to_numpy()
    result.iterations = build_table("iterations", {**{c: its.column(c) for c in its.column_names},
                                                   "host_prep_s": host["prep_s"][idx],
                                                   "host_exec_s": host["exec_s"][idx]})
    return result

