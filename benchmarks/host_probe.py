"""Where a decode step's host time goes, and why the calibration grid's runs spent more of
it than the served runs (fidelity.md: 0.44 vs 0.26 ms per Llama-3.2-1B step at batch 1-4).

In one process, on the GPU (or a CPU, for a smoke check), it runs the same small engine
workloads under different settings and prints, per run, the median per decode step of:
the executor's input packing (``prep``), the part of it in host->device copies
(``to_device``: pinning + the async copy's launch), and the engine's time outside the
executor (``outside``). Settings varied, one at a time, from a calibration grid point:
the KV pool's size, ``max_batch_size``, the longest sequence the executor is built for
(its block-table width), and where in the process the run comes (first, or after others).

    python benchmarks/host_probe.py --out $OUT [--model llama-3.2-1b]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_device import hardware_here  # noqa: E402

import numpy as np  # noqa: E402


def _cfg(model: str, n: int, prompt: int, output: int, *, pool_tokens: int | None = None,
         mem_fraction: float | None = None, max_batch: int | None = None, arrival: dict | None = None) -> dict:
    kv = {"tokens_per_block": 32}
    if pool_tokens is not None:
        kv["pool_tokens"] = pool_tokens
    if mem_fraction is not None:
        kv["free_gpu_memory_fraction"] = mem_fraction
    return {
        "model": model, "hardware": hardware_here(),  # this device's spec: the GPU backend checks it
        "workload": {"synthetic": {"num_requests": n, "arrival": arrival or {"kind": "offline"},
                                   "prompt_len": {"kind": "constant", "value": prompt},
                                   "output_len": {"kind": "constant", "value": output}}},
        "scheduler": {"max_batch_size": max_batch or max(n, 1), "max_num_tokens": 8192},
        "kv_cache": kv,
        "runtime": {"cuda_graphs": True, "piecewise_graphs": True},
        "output": {"plots": False},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU")
    ap.add_argument("--repeat", type=int, default=0, help="instead: the first grid point this many times in a row "
                    "(does host time grow with the process's age?)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads(N) first (0: torch's default)")
    ap.add_argument("--heat-up", type=float, default=0.0, help="seconds of matmuls first, as sim calibrate does")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from servesim.gpu_backend import executor as ex_mod
    from servesim.gpu_backend.runner import simulate_gpu
    from servesim.sim.config import RunConfig
    from servesim.sim.runner import resolve

    model = args.model
    if args.smoke:
        import json

        tiny = args.out / "tiny.json"
        tiny.write_text(json.dumps(dict(model_type="llama", hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        intermediate_size=128, vocab_size=256, rms_norm_eps=1e-5,
                                        rope_theta=10000.0, max_position_embeddings=4096,
                                        tie_word_embeddings=False)))
        model = str(tiny)

    # time spent in the executor's host->device copies, per iteration
    to_dev: dict[int, float] = {}
    orig = ex_mod.GpuExecutor._to_device
    orig_exec = ex_mod.GpuExecutor.execute
    cur = {"it": -1}

    def timed_to_device(self, a):
        t0 = time.perf_counter()
        r = orig(self, a)
        to_dev[cur["it"]] = to_dev.get(cur["it"], 0.0) + time.perf_counter() - t0
        return r

    def tracked_execute(self, batch):
        cur["it"] = batch.iteration
        return orig_exec(self, batch)

    ex_mod.GpuExecutor._to_device = timed_to_device
    ex_mod.GpuExecutor.execute = tracked_execute

    if args.heat_up > 0:
        import torch

        from servesim.gpu_backend.nvml import heat_up

        if torch.cuda.is_available():
            heat_up(torch.device("cuda"), args.heat_up)
    small = 1 if args.smoke else 0
    runs = [
        ("grid 16x512+64 (first run of the process)", _cfg(model, 16, 512 >> (3 * small), 64, pool_tokens=16 * 576 + 4096)),
        ("grid 1x1024+64", _cfg(model, 1, 1024 >> (3 * small), 64, pool_tokens=1088 + 4096)),
        ("same, max_batch_size 256", _cfg(model, 1, 1024 >> (3 * small), 64, pool_tokens=1088 + 4096, max_batch=256)),
        ("same, KV pool 90% of free memory", _cfg(model, 1, 1024 >> (3 * small), 64,
                                                 mem_fraction=None if args.smoke else 0.9,
                                                 pool_tokens=20000 if args.smoke else None)),
        ("served-like: 16 requests, Poisson 4/s, 512+64", _cfg(model, 16, 512 >> (3 * small), 64,
                                                               pool_tokens=16 * 576 + 4096,
                                                               arrival={"kind": "poisson", "rate_req_s": 4.0})),
        ("grid 16x512+64 again (last run)", _cfg(model, 16, 512 >> (3 * small), 64, pool_tokens=16 * 576 + 4096)),
    ]
    if args.repeat:
        runs = [(f"{runs[0][0].split(' (')[0]} #{i + 1}", runs[0][1]) for i in range(args.repeat)]
    import gc
    import resource

    lines = ["| run | decode steps | step ms | prep ms | of which to_device ms | outside ms | exec - prep ms "
             "| Python objects | max RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, raw in runs:
        if args.smoke:
            raw["kv_cache"].pop("free_gpu_memory_fraction", None)
        cfg = RunConfig.model_validate(raw)
        setup = resolve(cfg, REPO)
        to_dev.clear()
        res = simulate_gpu(setup)
        it = res.iterations.to_pandas()
        it["prep"] = res.host_times["prep_s"][it.iteration.to_numpy()]
        it["exec"] = res.host_times["exec_s"][it.iteration.to_numpy()]
        it["todev"] = [to_dev.get(i, np.nan) for i in it.iteration]
        d = it[(it.num_ctx_requests == 0)].iloc[2:]
        ms = lambda s: 1e3 * float(np.nanmedian(s))  # noqa: E731
        row = (f"| {label} | {len(d)} | {ms(d.duration_s):.3f} | {ms(d.prep):.3f} | {ms(d.todev):.3f} | "
               f"{ms(d.duration_s - d.exec):.3f} | {ms(d.exec - d.prep):.3f} | {len(gc.get_objects())} | "
               f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} |")
        print(row, flush=True)
        lines.append(row)
    (args.out / "host_probe.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
