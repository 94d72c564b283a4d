"""Measure a calibration grid on the GPU with the real engine and executor.

Each grid point is a small designed workload run by `simulate_gpu` -- the very engine,
executor, CUDA graphs and kernels a `--backend gpu` run uses -- so the measured iteration
durations include everything an iteration costs there (input packing, the forward pass,
sampling, synchronisation), not just the model's forward. The iterations' shapes come from
iterations.parquet (`decode_kv_tokens`, `ctx_cached_tokens`, ...). None of these workloads
is a fidelity workload: they are constant-length requests, offline.
"""

from __future__ import annotations

import platform

import numpy as np

from servesim.sim.config import RunConfig
from servesim.sim.runner import resolve
from servesim.sim.specs import ModelSpec

# (name, batch, prompt, output, graphs): decode points run `output` steps at `batch`
DECODE_POINTS = [(1, 1024, 32, True), (16, 1024, 32, True), (64, 2048, 24, True), (256, 1024, 16, True),
                 (8, 8192, 16, True), (32, 1024, 12, False)]
PREFILL_POINTS = [(1, 512), (1, 2048), (2, 8192), (8, 512)]  # (requests, prompt)


def _run(model_ref: str, n: int, prompt: int, output: int, graphs: bool, chunked: bool, hardware: str):
    from .runner import simulate_gpu

    cfg = RunConfig.model_validate({
        "model": model_ref,
        "hardware": hardware,
        "workload": {"synthetic": {"num_requests": n, "arrival": {"kind": "offline"},
                                   "prompt_len": {"kind": "constant", "value": prompt},
                                   "output_len": {"kind": "constant", "value": output}}},
        "scheduler": {"max_batch_size": max(n, 1), "max_num_tokens": 8192,
                      "enable_chunked_context": chunked},
        "kv_cache": {"pool_tokens": n * (prompt + output) + 4096},
        "runtime": {"cuda_graphs": graphs},
        "output": {"plots": False},
    })
    from pathlib import Path

    return simulate_gpu(resolve(cfg, Path.cwd())).iterations.to_pandas()


def measure_grid(model: ModelSpec, model_ref: str | None = None, hardware: str = "h100-sxm",
                 decode_points=None, prefill_points=None) -> tuple[list[dict], dict]:
    """Rows for sim/calibrate.py and the environment they were measured in. `model_ref`
    is what an experiment would name the model by (default: its bundled name)."""
    import torch

    ref = model_ref or model.name
    rows: list[dict] = []
    for n, prompt, output, graphs in (decode_points or DECODE_POINTS):
        it = _run(ref, n, prompt, output, graphs, chunked=True, hardware=hardware)
        dec = it[(it.num_ctx_requests == 0) & (it.num_gen_requests == n)].iloc[2:]  # skip warm-up steps
        for _, r in dec.iterrows():
            rows.append(dict(model=model.name, kind="decode", n_decode=n, kv_sum=int(r.decode_kv_tokens),
                             ctx_tokens=0, ctx_prior=0, n_chunks=0, chunk_tokens=0, graph=bool(r.graph),
                             time_s=float(r.duration_s)))
    for n, prompt in (prefill_points or PREFILL_POINTS):
        it = _run(ref, n, prompt, 1, True, chunked=True, hardware=hardware)
        pre = it[(it.num_gen_requests == 0) & (it.ctx_tokens > 0)]
        for _, r in pre.iterrows():
            k = int(r.num_ctx_requests)
            rows.append(dict(model=model.name, kind="prefill", n_decode=0, kv_sum=0, ctx_tokens=int(r.ctx_tokens),
                             ctx_prior=int(r.ctx_cached_tokens), n_chunks=k,
                             chunk_tokens=int(r.ctx_tokens) // k, graph=False, time_s=float(r.duration_s)))
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
    return rows, env
