"""fp8 KV cache against bf16 on one GPU: the decode iteration, beside the simulator's ratio (S7).

Llama-3.1-8B, random bf16 weights (seeded), one model and two KV pools of the same blocks --
bf16 and e4m3 (`kv_cache.dtype: fp8`: per-tensor scales, written by the RoPE + KV-write
kernel, read by the paged decode attention kernel) -- filled with the same random keys and
values. One call measures:

1. **decode iteration time** (CUDA-graph replay of ``forward_decode``, median of ``--reps``)
   at batch x context shapes, bf16 KV vs fp8 KV, and the simulator's fp8 / bf16 ratio of the
   same shapes: the roofline and the shipped profile of this GPU (its KV bandwidth);
2. **accuracy**: last-position logits of a few prompts (prefill through the prefill
   attention kernel, then decode steps through the decode kernel) with each pool: relative
   error and top-1 agreement, stated as measured (random weights);
3. **the quantisation kernel of the fp8 linears timed back to back** (``--skip quant`` to
   leave it out): ``kernels.ops.quant_fp8_rowwise`` at decode row counts, ``reps`` calls
   between two events behind a spin kernel (the calibration's GEMM-sweep method,
   gpu_backend/profiler.py) beside one call timed alone as a graph replay (what
   gpu_quantization.py measured): the in-graph cost the cost model's
   ``act_quant_latency_s`` stands for (benchmarks/results/quantization_fidelity.md).

    python benchmarks/gpu_kv_fp8.py --out $OUT            # one device call (~1-2 min on an H200)
    python benchmarks/gpu_kv_fp8.py --smoke --out DIR     # CPU, tiny model (~20 s)

Writes OUT/gpu_kv_fp8.md (the tables, the command, the device) and OUT/gpu_kv_fp8.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]  # this checkout's servesim, then the benchmarks

SHAPES = ((1, 1024), (16, 1024), (64, 1024), (256, 1024), (16, 4096), (64, 4096), (16, 16384))


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def decode_rows(model, spec, dev, shapes, reps: int, timer, graphed) -> tuple[list[dict], dict]:
    """Per shape: bf16-KV and fp8-KV decode iteration seconds (the same random KV in both)."""
    import torch

    from servesim.gpu_backend.kv_pool import KVPool

    bs = 16
    per_max = max(-(-(c + 1) // bs) * b for b, c in shapes)
    pools = {}
    g = torch.Generator(device="cpu").manual_seed(2)
    for name, dt in (("bf16", model.dtype), ("fp8", torch.float8_e4m3fn)):
        pools[name] = KVPool(spec.num_layers, per_max, bs, spec.num_kv_heads, spec.head_dim, dt, dev)
    src = torch.empty(pools["bf16"].kv.shape[2:], dtype=torch.float32, device=dev)
    for layer in range(spec.num_layers):  # the same values in both pools, layer by layer (memory)
        for kv in (0, 1):
            src.normal_(0, 0.5)
            pools["bf16"].kv[layer, kv].copy_(src)
            pools["fp8"].kv[layer, kv].copy_(src.clamp(-448, 448))
    del src
    rows = []
    for B, ctx in shapes:
        per = -(-(ctx + 1) // bs)
        bt = torch.randperm(per_max, generator=g)[: B * per].view(B, per).to(torch.int32).to(dev)
        pos = torch.full((B,), ctx, dtype=torch.int64, device=dev)
        slot = bt[:, ctx // bs].to(torch.int64) * bs + ctx % bs
        seq = torch.full((B,), ctx + 1, dtype=torch.int32, device=dev)
        ids = torch.randint(0, spec.vocab_size, (B,), generator=g).to(dev)
        row = {"batch": B, "ctx": ctx}
        for name, pool in pools.items():
            try:  # one device call: a failing shape is reported, the others still measured
                fn = graphed(lambda pool=pool: model.forward_decode(ids, pos, bt, seq, slot, pool), dev)
                row[f"{name}_kv_s"] = timer(fn, reps=reps)
                del fn
            except Exception as e:  # noqa: BLE001
                log(f"decode B={B} ctx={ctx} {name} KV failed: {type(e).__name__}: {e}")
                row["error"] = f"{name}: {type(e).__name__}: {str(e)[:200]}"
                row[f"{name}_kv_s"] = float("nan")
        row["ratio"] = row["fp8_kv_s"] / row["bf16_kv_s"]
        log(f"decode B={B} ctx={ctx}: bf16 KV {row['bf16_kv_s'] * 1e3:.3f} ms, fp8 KV {row['fp8_kv_s'] * 1e3:.3f} ms, "
            f"ratio {row['ratio']:.3f}")
        rows.append(row)
    return rows, pools


def accuracy(model, spec, pools: dict, n: int, P: int, steps: int) -> dict:
    """Logits with each pool: prefill of n prompts of P tokens, then `steps` decode steps fed
    the same tokens (so both see the same inputs)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(1)
    prompts = torch.randint(0, spec.vocab_size, (n, P), generator=g).tolist()
    fed = torch.randint(0, spec.vocab_size, (steps, n), generator=g).tolist()
    per = -(-(P + steps + 1) // pools["bf16"].block_size)
    tables = [list(range(i * per, (i + 1) * per)) for i in range(n)]
    out = {}
    for name, pool in pools.items():
        lg = [model.step([(p, 0, t, True) for p, t in zip(prompts, tables)], [], pool).float()]
        for j in range(steps):
            lg.append(model.step([], [(fed[j][i], P + j, tables[i]) for i in range(n)], pool).float())
        out[name] = torch.cat(lg)
    a, b = out["bf16"], out["fp8"]
    return {"prompts": n, "prompt_len": P, "decode_steps": steps,
            "logit_rel_err": float((b - a).norm() / a.norm()),
            "logit_cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def quant_times(spec, dev, rows, reps: int, timer, graphed) -> list[dict]:
    """The fp8 linears' input quantisation kernel at each row count: back to back (the
    calibration sweep's method) and alone (one graph replay between events)."""
    import torch

    from servesim.kernels import ops

    out = []
    cuda = dev.type == "cuda"
    for K in sorted({spec.hidden_size, spec.intermediate_size}):
        for T in rows:
            xs = [torch.randn(T, K, device=dev, dtype=torch.bfloat16 if cuda else torch.float32) for _ in range(8)]
            ops.quant_fp8_rowwise(xs[0])
            if cuda:
                best = float("inf")
                for _ in range(3):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda._sleep(2_000_000)  # the launches below queue up behind it
                    a.record()
                    for r in range(reps):
                        ops.quant_fp8_rowwise(xs[r % len(xs)])
                    b.record()
                    b.synchronize()
                    best = min(best, a.elapsed_time(b) / 1e3 / reps)
            else:
                t0 = time.perf_counter()
                for r in range(reps):
                    ops.quant_fp8_rowwise(xs[r % len(xs)])
                best = (time.perf_counter() - t0) / reps
            alone = timer(graphed(lambda: ops.quant_fp8_rowwise(xs[0]), dev), reps=reps)
            out.append({"k": K, "tokens": T, "back_to_back_s": best, "alone_s": alone,
                        "bytes": T * K * 3 + 4 * T})
            log(f"quant K={K} T={T}: back to back {best * 1e6:.2f} us, alone {alone * 1e6:.2f} us")
    return out


def sim_ratios(spec, hw_name: str, rows: list[dict]) -> list[str]:
    """Adds, per row, the simulator's fp8-KV / bf16-KV decode GPU-time ratio: the roofline
    and (when shipped for this model and GPU) the calibrated profile."""
    from servesim.sim.calibrate import load_profile
    from servesim.sim.cost_model import RooflineConfig, RooflineCostModel
    from servesim.sim.specs import apply_precision, load_hardware
    from servesim.sim.types import IterationShape

    hw = load_hardware(hw_name)
    bf, f8 = apply_precision(spec, hw, "bf16", "bf16"), apply_precision(spec, hw, "bf16", "fp8")
    models = {"sim roofline": RooflineConfig()}
    prof = REPO / "profiles" / f"{hw_name.split('-')[0]}-{spec.name}.yaml"
    if prof.is_file():
        try:
            models[f"sim {prof.name}"] = load_profile(prof, bf, hw)[0]
        except Exception as e:  # noqa: BLE001 - a profile of another model (smoke)
            log(f"profile {prof.name} not used: {e}")
    for r in rows:
        sh = IterationShape(n_decode=r["batch"], decode_kv_sum=r["batch"] * (r["ctx"] + 1), graph=True,
                            padded_decode=r["batch"])
        for lab, c in models.items():
            r[lab] = RooflineCostModel(f8, hw, c).gpu_time(sh) / RooflineCostModel(bf, hw, c).gpu_time(sh)
    return list(models)


def report(path: Path, argv, dev_name, hw, dec, sims, acc, quant, wall) -> None:
    import torch

    L = ["# fp8 KV cache vs bf16 on one GPU: the decode iteration, and the simulator's ratio", "",
         f"`python benchmarks/gpu_kv_fp8.py {' '.join(argv)}` on {dev_name} (hardware spec {hw}), torch "
         f"{torch.__version__}, {platform.node()}, {time.strftime('%Y-%m-%d %H:%M')}; {wall:.0f} s.", "",
         "Model weights bf16 (random); the KV pool bf16 or e4m3 with per-tensor scales 1.0 (the same random "
         "keys and values in both), written by the RoPE + KV-write kernel, read by the paged decode attention "
         "kernel. Decode iteration: CUDA-graph replay of `forward_decode`, every request at the context shown.",
         "", "| batch | context | bf16 KV ms | fp8 KV ms | fp8 / bf16 measured | "
         + " | ".join(sims) + " |", "|---:|---:|---:|---:|---:|" + "---:|" * len(sims)]
    for r in dec:
        L.append(f"| {r['batch']} | {r['ctx']} | {r['bf16_kv_s'] * 1e3:.3f} | {r['fp8_kv_s'] * 1e3:.3f} | "
                 f"{r['ratio']:.3f} | " + " | ".join(f"{r[s]:.3f} ({r[s] / r['ratio'] - 1:+.1%})" for s in sims)
                 + " |")
    for r in dec:
        if r.get("error"):
            L.append(f"\nbatch {r['batch']}, context {r['ctx']}: {r['error']}")
    L += ["", "(Simulator columns: fp8-KV / bf16-KV of the cost model's GPU time for the same shape; in brackets "
          "its error against the measured ratio.)", ""]
    if acc:
        L += ["## Accuracy (random weights)", "",
              f"{acc['prompts']} prompts of {acc['prompt_len']} tokens, prefill then {acc['decode_steps']} decode "
              f"steps fed the same tokens: logits relative error {acc['logit_rel_err']:.4f} (cosine "
              f"{acc['logit_cosine']:.5f}), top-1 agreement {acc['top1_agreement']:.0%}.", ""]
    if quant:
        L += ["## The fp8 linears' input quantisation kernel", "",
              "| K | rows | back to back us | alone (graph replay) us | bytes |", "|---:|---:|---:|---:|---:|"]
        for q in quant:
            L.append(f"| {q['k']} | {q['tokens']} | {q['back_to_back_s'] * 1e6:.2f} | {q['alone_s'] * 1e6:.2f} | "
                     f"{q['bytes']:,} |")
        L.append("")
    path.write_text("\n".join(L) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "out"))
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, tiny shapes")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: accuracy,quant")
    args = ap.parse_args(argv)
    import torch

    from bench_device import device_name, hardware_here
    from gpu_quantization import TINY, Timer, graphed

    from servesim.gpu_backend.model import LlamaModel
    from servesim.sim.specs import ModelSpec, load_model

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    hw_name = hardware_here("h200-sxm")
    shapes, rows, acc_n = list(SHAPES), [1, 16, 64, 256], (8, 256, 8)
    if args.smoke:
        cfg = Path(tempfile.mkdtemp(prefix="gpu_kv_fp8_")) / "tiny.json"
        cfg.write_text(json.dumps(TINY))
        spec = ModelSpec.from_file(cfg, name="tiny")
        shapes, rows, acc_n, args.reps, dtype = [(1, 64), (4, 64)], [1, 4], (2, 16, 3), 2, torch.float32
    else:
        spec, dtype = load_model(args.model), torch.bfloat16
    timer = Timer(dev)
    log(f"device {device_name()} -> {hw_name}; model {spec.name}")
    model = LlamaModel(spec, None, dtype=dtype, device=dev, seed=0)
    dec, pools = decode_rows(model, spec, dev, shapes, args.reps, timer, graphed)
    for p in pools.values():  # the accuracy prompts' blocks come first: clear what the timing wrote there
        p.kv.view(torch.uint8).zero_()
    acc = {}
    if "accuracy" not in skip:
        try:
            acc = accuracy(model, spec, pools, *acc_n)
        except Exception as e:  # noqa: BLE001 - reported, the rest still runs
            log(f"accuracy failed: {type(e).__name__}: {e}")
    if acc:
        log(f"accuracy: {acc}")
    del pools
    quant = quant_times(spec, dev, rows, args.reps, timer, graphed) if "quant" not in skip else []
    sims = sim_ratios(spec, hw_name, dec)
    wall = time.perf_counter() - t0
    report(out / "gpu_kv_fp8.md", argv, device_name(), hw_name, dec, sims, acc, quant, wall)
    rec = [{"what": "decode", **r} for r in dec] + [{"what": "quant", **q} for q in quant]
    rec += [{"what": "accuracy", **acc}] if acc else []
    keys: list[str] = []
    for r in rec:
        keys.extend(k for k in r if k not in keys)
    with open(out / "gpu_kv_fp8.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rec)
    log(f"wrote {out / 'gpu_kv_fp8.md'} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
