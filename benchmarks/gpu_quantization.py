"""fp8 weights against bf16 on one GPU, beside the simulator's ratios for the same shapes (S7).

Llama-3.1-8B, random weights (seeded), on the machine's GPU (an H200: the hardware spec is
picked from the device). fp8: the four linears of every layer in e4m3 with per-channel
scales (``--scales tensor``: one per tensor), each input quantised per token by a Triton
kernel and multiplied by ``torch._scaled_mm`` (gpu_backend/weights.py ``fp8_linear``);
embeddings, norms, lm_head and the KV cache stay bf16. One call measures:

1. **accuracy** on random weights: last-position logits of 16 prompts (relative error,
   top-1 agreement) and 64 greedy tokens from each prompt with each model (agreement, and
   the tokens before the first divergence), stated as measured;
2. **decode iteration time** at batch 1 / 16 / 64 / 256, every request at a context of 1,024
   tokens, each a CUDA-graph replay (median of 30), bf16 vs fp8;
3. **the GEMMs**: each linear's time by row count, bf16 ``F.linear``, fp8 ``_scaled_mm`` of
   an already quantised input, and the quantisation kernel alone (the curves a calibration
   would fit, `gemm_times` / `gemm_times_by_precision`, written to OUT/gpu_quantization_gemm.yaml);
4. **offline throughput**: a few hundred requests through `sim run --backend gpu`'s
   runner (`simulate_gpu`), bf16 and ``model_precision: fp8``, every request at t=0;

and the simulator's fp8 / bf16 ratios for the same shapes: the pure roofline of the
hardware file (W8A8 input quantisation fused, and as this backend does it, a kernel of its
own per linear), the shipped calibration profile of this GPU (bf16 curves scaled by the
roofline ratio), and that profile with the GEMM curves measured in step 3.

    python benchmarks/gpu_quantization.py --out $OUT       # one device call (~4-6 min on an H200)
    python benchmarks/gpu_quantization.py --smoke --out D  # CPU, tiny model (~30 s)

Writes OUT/gpu_quantization.md (the tables, the command, the device), OUT/gpu_quantization.csv
(one row a measurement) and OUT/gpu_quantization_gemm.yaml.
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
sys.path.insert(0, str(REPO / "benchmarks"))

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 512,
        "vocab_size": 1000, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": False}
ROWS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048, 4096, 8192)


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


class Timer:
    def __init__(self, dev):
        import torch

        self.torch, self.cuda = torch, dev.type == "cuda"

    def __call__(self, fn, reps: int = 30, warmup: int = 3) -> float:
        import numpy as np

        torch = self.torch
        for _ in range(warmup):
            fn()
        if self.cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return float(np.median(times))


def graphed(fn, dev):
    """``fn`` captured in a CUDA graph (on CUDA): the replay; else ``fn``."""
    import torch

    if dev.type != "cuda":
        return fn
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


# ------------------------------------------------------------------------------ 1 accuracy
def accuracy(mb, mf, spec, dev, args) -> dict:
    import torch

    n, P, G, bs = args.acc_prompts, args.acc_prompt_len, args.acc_tokens, 16
    per = -(-(P + G + 1) // bs)
    g = torch.Generator(device="cpu").manual_seed(1)
    prompts = torch.randint(0, spec.vocab_size, (n, P), generator=g).tolist()
    out = {}
    gens = {}
    for name, m in (("bf16", mb), ("fp8", mf)):
        pool = m.make_kv_pool(n * per, bs)
        tables = [list(range(i * per, (i + 1) * per)) for i in range(n)]
        logits = m.step([(p, 0, t, True) for p, t in zip(prompts, tables)], [], pool).float()
        out[name] = logits
        toks = [logits.argmax(-1).tolist()]
        for j in range(G - 1):
            lg = m.step([], [(toks[-1][i], P + j, tables[i]) for i in range(n)], pool)
            toks.append(lg.argmax(-1).tolist())
        gens[name] = list(zip(*toks))  # per prompt
        del pool
        m.kv_pool = None
    a, b = out["bf16"], out["fp8"]
    rel = float((b - a).norm() / a.norm())
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())
    top1 = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    same = [sum(x == y for x, y in zip(gb, gf)) / G for gb, gf in zip(gens["bf16"], gens["fp8"])]
    prefix = []
    for gb, gf in zip(gens["bf16"], gens["fp8"]):
        k = 0
        while k < G and gb[k] == gf[k]:
            k += 1
        prefix.append(k)
    p = torch.softmax(a, -1)
    margin = float((p.topk(2, -1).values[:, 0] - p.topk(2, -1).values[:, 1]).median())
    return {"prompts": n, "prompt_len": P, "greedy_tokens": G, "logit_rel_err": rel, "logit_cosine": cos,
            "top1_agreement": top1, "greedy_agreement": sum(same) / n, "greedy_prefix_mean": sum(prefix) / n,
            "top1_prob_margin_median": margin, "max_prob_median": float(p.max(-1).values.median())}


# ------------------------------------------------------------------------------ 2 decode
def decode_times(models: dict, spec, dev, args, timer) -> list[dict]:
    import torch

    from servesim.gpu_backend.kv_pool import KVPool

    bs, ctx = 16, args.ctx
    per = -(-(ctx + 1) // bs)
    Bmax = max(args.batches)
    pool = KVPool(spec.num_layers, Bmax * per, bs, spec.num_kv_heads, spec.head_dim, models["bf16"].dtype, dev)
    pool.kv.normal_(0, 0.5)
    rows = []
    g = torch.Generator(device="cpu").manual_seed(2)
    for B in args.batches:
        bt = torch.randperm(Bmax * per, generator=g)[: B * per].view(B, per).to(torch.int32).to(dev)
        pos = torch.full((B,), ctx, dtype=torch.int64, device=dev)
        slot = bt[:, ctx // bs].to(torch.int64) * bs + ctx % bs
        seq = torch.full((B,), ctx + 1, dtype=torch.int32, device=dev)
        ids = torch.randint(0, spec.vocab_size, (B,), generator=g).to(dev)
        row = {"batch": B, "ctx": ctx}
        for name, m in models.items():
            fn = graphed(lambda m=m: m.forward_decode(ids, pos, bt, seq, slot, pool), dev)
            row[f"{name}_s"] = timer(fn, reps=args.reps)
            del fn
        row["ratio"] = row["fp8_s"] / row["bf16_s"]
        log(f"decode B={B}: bf16 {row['bf16_s'] * 1e3:.3f} ms, fp8 {row['fp8_s'] * 1e3:.3f} ms, "
            f"ratio {row['ratio']:.3f}")
        rows.append(row)
    del pool
    return rows


# ------------------------------------------------------------------------------ 3 GEMMs
def gemm_curves(mb, mf, spec, dev, args, timer) -> tuple[dict, dict, list[dict]]:
    import torch
    import torch.nn.functional as F

    from servesim.kernels import ops

    lw_b, lw_f = mb.weights.layers[0], mf.weights.layers[0]
    bf, f8, rows = {}, {}, []
    for k in ("qkv", "o", "gate_up", "down"):
        wb, wf = getattr(lw_b, k), getattr(lw_f, k)
        N, K = wb.shape
        tb, tf, tq = [], [], []
        for T in args.rows:
            x = torch.randn(T, K, device=dev, dtype=mb.dtype)
            xq, sx = ops.quant_fp8_rowwise(x)
            tb.append(timer(graphed(lambda: F.linear(x, wb), dev), reps=args.reps))
            tf.append(timer(graphed(lambda: torch._scaled_mm(xq, wf.q.t(), scale_a=sx, scale_b=wf.scale,
                                                             out_dtype=x.dtype), dev), reps=args.reps))
            tq.append(timer(graphed(lambda: ops.quant_fp8_rowwise(x), dev), reps=args.reps))
            rows.append({"linear": k, "k": K, "n": N, "tokens": T, "bf16_s": tb[-1], "fp8_gemm_s": tf[-1],
                         "quant_s": tq[-1]})
        bf[k] = {"k": K, "n": N, "tokens": list(args.rows), "seconds": tb}
        f8[k] = {"k": K, "n": N, "tokens": list(args.rows), "seconds": tf}
        log(f"gemm {k} [{K}x{N}]: T=1 bf16 {tb[0] * 1e6:.1f} us, fp8 {tf[0] * 1e6:.1f} us, quant {tq[0] * 1e6:.1f} us")
    return bf, f8, rows


# ------------------------------------------------------------------------------ 4 offline
def run_config(args, model_ref: str, hardware: str, precision: str | None) -> dict:
    n, P, O, B = args.requests, args.prompt_len, args.output_len, args.max_batch
    return {"seed": 0, "model": model_ref, "hardware": hardware, "model_precision": precision,
            "kv_cache": {"pool_tokens": B * (P + O + 32) + 4096, "tokens_per_block": 32},
            "workload": {"synthetic": {"num_requests": n, "prompt_len": P, "output_len": O,
                                       "arrival": {"kind": "offline"}}},
            "scheduler": {"max_batch_size": B, "max_num_tokens": max(8192, B)},
            "output": {"plots": False, "timeline": False}}


def offline(args, model_ref: str, hardware: str, dev) -> dict:
    import gc

    import torch

    from servesim.gpu_backend.runner import simulate_gpu
    from servesim.sim.config import RunConfig
    from servesim.sim.runner import resolve

    out = {}
    for name, prec in (("bf16", None), ("fp8", args.fp8)):
        cfg = RunConfig.model_validate(run_config(args, model_ref, hardware, prec))
        t0 = time.perf_counter()
        res = simulate_gpu(resolve(cfg, REPO), device=str(dev))
        s = res.summary
        out[name] = {"tok_s": s["throughput_out_tok_s"], "tpot_p50_s": s["tpot_s"]["p50"],
                     "ttft_p50_s": s["ttft_s"]["p50"], "duration_s": s["duration_s"],
                     "iterations": s["num_iterations"], "wall_s": time.perf_counter() - t0,
                     "achieved_over_bound": s["bounds"]["achieved_over_bound"]}
        log(f"offline {name}: {out[name]['tok_s']:,.0f} tok/s, TPOT p50 {out[name]['tpot_p50_s'] * 1e3:.2f} ms")
        del res
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------ the simulator
def sim_models(spec, hw_name: str, fp8: str, bf_curves: dict | None, f8_curves: dict | None,
               quant_s: float | None) -> dict:
    """label -> (bf16 cost model, fp8 cost model)."""
    from servesim.sim.calibrate import load_profile
    from servesim.sim.cost_model import RooflineConfig, RooflineCostModel
    from servesim.sim.specs import apply_precision, load_hardware

    hw = load_hardware(hw_name)
    bf = apply_precision(spec, hw, "bf16")
    f8 = apply_precision(spec, hw, fp8)
    out = {}
    for lab, cfg in (("roofline, input quantisation fused", RooflineConfig()),
                     ("roofline, a quantisation kernel per linear", RooflineConfig(act_quant_fused=False))):
        out[lab] = (RooflineCostModel(bf, hw, cfg), RooflineCostModel(f8, hw, cfg))
    prof = REPO / "profiles" / f"{hw_name.split('-')[0]}-{spec.name}.yaml"
    if prof.is_file():
        try:
            base = load_profile(prof, bf, hw)[0]
        except Exception as e:  # noqa: BLE001 - a profile of another model (smoke)
            log(f"profile {prof.name} not used: {e}")
            base = None
        if base is not None:
            c = RooflineConfig(**{**base.model_dump(), "act_quant_fused": False})
            out[f"profile {prof.name} (bf16 curves x roofline ratio)"] = (RooflineCostModel(bf, hw, c),
                                                                          RooflineCostModel(f8, hw, c))
            if bf_curves and f8_curves:
                # the quantisation pass at its bytes (act_quant_latency_s default): its time alone is
                # mostly the cost of timing one kernel by itself (quantization_fidelity.md)
                c2 = RooflineConfig(**{**base.model_dump(), "gemm_times": bf_curves,
                                       "gemm_times_by_precision": {"fp8": f8_curves}, "act_quant_fused": False})
                out[f"profile {prof.name} + this run's GEMM curves"] = (RooflineCostModel(bf, hw, c2),
                                                                        RooflineCostModel(f8, hw, c2))
    return out


def sim_decode_ratios(cms: dict, rows: list[dict]) -> None:
    from servesim.sim.types import IterationShape

    for r in rows:
        B, ctx = r["batch"], r["ctx"]
        shape = IterationShape(n_decode=B, decode_kv_sum=B * (ctx + 1), graph=True, padded_decode=B)
        for lab, (cb, cf) in cms.items():
            gb = cb.gpu_time(shape)
            gf = cf.gpu_time(shape)
            r[f"sim: {lab}"] = gf / gb


def sim_offline(args, model_ref: str, hw_name: str, gemm: dict | None) -> dict:
    """The simulator's offline runs of the same requests: the roofline, the profile's
    parameters (a quantisation kernel per linear, as this backend runs it), and those with
    this run's GEMM curves (``gemm``: gemm_times, gemm_times_by_precision)."""
    from servesim.sim.config import RunConfig
    from servesim.sim.runner import resolve, simulate
    from servesim.sim.yamlio import safe_load

    out = {}
    # (a bundled name keeps its dots: Path("llama-3.1-8b").stem would be "llama-3")
    stem = Path(model_ref).stem if model_ref.endswith(".json") else model_ref
    prof = REPO / "profiles" / f"{hw_name.split('-')[0]}-{stem}.yaml"
    kinds = [("roofline, input quantisation fused", {}),
             ("roofline, a quantisation kernel per linear", {"roofline": {"act_quant_fused": False}})]
    if prof.is_file() and not args.smoke:
        base = {**safe_load(prof.read_text())["roofline"], "act_quant_fused": False}
        kinds.append((f"profile {prof.name}", {"roofline": base}))
        if gemm:
            kinds.append((f"profile {prof.name} + this run's GEMM curves", {"roofline": {**base, **gemm}}))
    for lab, cm in kinds:
        tok = {}
        for name, prec in (("bf16", None), ("fp8", args.fp8)):
            d = run_config(args, model_ref, hw_name, prec)
            d["cost_model"] = cm
            tok[name] = simulate(resolve(RunConfig.model_validate(d), REPO)).summary["throughput_out_tok_s"]
        out[lab] = tok["fp8"] / tok["bf16"]
    return out


# ------------------------------------------------------------------------------ the report
def report(path: Path, args, dev_name: str, hw: str, acc: dict, dec: list[dict], gemm: list[dict], off: dict,
           sim_off: dict, wall: float) -> None:
    import torch

    L = ["# fp8 weights vs bf16 on one GPU, and the simulator's ratios", "",
         f"`python benchmarks/gpu_quantization.py {' '.join(sys.argv[1:])}` on {dev_name} (hardware spec {hw}), "
         f"torch {torch.__version__}, {platform.node()}, {time.strftime('%Y-%m-%d %H:%M')}; {wall:.0f} s.", "",
         f"Model: {args.model_name}, random weights (seed 0). fp8 ({args.fp8}): the decoder linears in e4m3, "
         "inputs quantised per token (a Triton kernel per linear), `torch._scaled_mm` with row-wise scales; "
         "embeddings, norms, lm_head and the KV cache bf16.", "",
         "## Accuracy on random weights", "",
         f"{acc['prompts']} prompts of {acc['prompt_len']} random tokens: last-position logits relative error "
         f"{acc['logit_rel_err']:.4f} (cosine {acc['logit_cosine']:.5f}), top-1 agreement {acc['top1_agreement']:.0%}; "
         f"{acc['greedy_tokens']} greedy tokens from each prompt with each model: {acc['greedy_agreement']:.0%} of "
         f"the positions agree, {acc['greedy_prefix_mean']:.1f} tokens on average before the first divergence. "
         f"Random weights give flat distributions (median top probability {acc['max_prob_median']:.4f}, median "
         f"top-1 margin {acc['top1_prob_margin_median']:.5f}), so small logit errors flip the argmax far more "
         "often than on a trained model: the agreement here is a floor, not what a real checkpoint shows.", "",
         "## Decode iteration (CUDA graph), every request at a context of "
         f"{dec[0]['ctx'] if dec else '-'} tokens", ""]
    sims = [k for k in (dec[0] if dec else {}) if k.startswith("sim: ")]
    L.append("| batch | bf16 ms | fp8 ms | fp8 / bf16 measured | " + " | ".join(s[5:] for s in sims) + " |")
    L.append("|---:|---:|---:|---:|" + "---:|" * len(sims))
    for r in dec:
        L.append(f"| {r['batch']} | {r['bf16_s'] * 1e3:.3f} | {r['fp8_s'] * 1e3:.3f} | {r['ratio']:.3f} | "
                 + " | ".join(f"{r[s]:.3f} ({(r[s] / r['ratio'] - 1):+.1%})" for s in sims) + " |")
    L += ["", "(Simulator columns: fp8 / bf16 of the cost model's GPU time for the same shape, and in brackets "
          "its error against the measured ratio.)", ""]
    if off:
        L += ["## Offline throughput", "",
              f"{args.requests} requests of {args.prompt_len} + {args.output_len} tokens at t=0, up to "
              f"{args.max_batch} in flight (`simulate_gpu`, CUDA graphs).", "",
              "| | bf16 | fp8 | fp8 / bf16 |", "|---|---:|---:|---:|",
              f"| output tok/s (measured) | {off['bf16']['tok_s']:,.0f} | {off['fp8']['tok_s']:,.0f} | "
              f"{off['fp8']['tok_s'] / off['bf16']['tok_s']:.3f} |",
              f"| TPOT p50 ms | {off['bf16']['tpot_p50_s'] * 1e3:.2f} | {off['fp8']['tpot_p50_s'] * 1e3:.2f} | |",
              f"| achieved / bound (summary.json) | {off['bf16']['achieved_over_bound']:.1%} | "
              f"{off['fp8']['achieved_over_bound']:.1%} | |"]
        meas = off["fp8"]["tok_s"] / off["bf16"]["tok_s"]
        for lab, r in sim_off.items():
            L.append(f"| simulator, {lab} | | | {r:.3f} ({r / meas - 1:+.1%}) |")
        L.append("")
    if gemm:
        L += ["## The GEMMs (one layer's, by row count)", "",
              "| linear | [k x n] | rows | bf16 us | fp8 GEMM us | quantise us | fp8 (GEMM + quantise) / bf16 |",
              "|---|---|---:|---:|---:|---:|---:|"]
        for g in gemm:
            if g["tokens"] in (1, 16, 64, 256, 1024, 8192):
                L.append(f"| {g['linear']} | {g['k']}x{g['n']} | {g['tokens']} | {g['bf16_s'] * 1e6:.1f} | "
                         f"{g['fp8_gemm_s'] * 1e6:.1f} | {g['quant_s'] * 1e6:.1f} | "
                         f"{(g['fp8_gemm_s'] + g['quant_s']) / g['bf16_s']:.3f} |")
        L.append("")
    path.write_text("\n".join(L) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "out"))
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, tiny shapes")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--scales", choices=["channel", "tensor"], default="channel")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--requests", type=int, default=384)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: accuracy,decode,gemm,offline")
    args = ap.parse_args(argv)
    import torch

    from bench_device import device_name, hardware_here
    from servesim.gpu_backend.model import LlamaModel
    from servesim.sim.specs import ModelSpec, apply_precision, load_hardware, load_model

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.fp8 = "fp8" if args.scales == "tensor" else "fp8-channel"
    args.batches = [int(b) for b in args.batches.split(",")]
    args.rows = list(ROWS)
    args.acc_prompts, args.acc_prompt_len, args.acc_tokens = 16, 128, 64
    hw_name = hardware_here("h200-sxm")
    work = Path(tempfile.mkdtemp(prefix="gpu_quant_"))
    if args.smoke:
        cfg_path = work / "tiny.json"
        cfg_path.write_text(json.dumps(TINY))
        model_ref = str(cfg_path)
        spec = ModelSpec.from_file(cfg_path, name="tiny")
        args.batches, args.ctx, args.reps = [1, 4], 64, 2
        args.rows = [1, 4, 16]
        args.requests, args.prompt_len, args.output_len, args.max_batch = 8, 32, 8, 4
        args.acc_prompts, args.acc_prompt_len, args.acc_tokens = 3, 16, 6
        dtype = torch.float32
    else:
        model_ref, spec, dtype = args.model, load_model(args.model), torch.bfloat16
    args.model_name = spec.name
    hw = load_hardware(hw_name)
    timer = Timer(dev)
    log(f"device {device_name()} -> {hw_name}; model {spec.name}; {args.fp8}")
    mb = LlamaModel(spec, None, dtype=dtype, device=dev, seed=0)
    mf = LlamaModel(apply_precision(spec, hw, args.fp8), mb.weights, dtype=dtype, device=dev)
    acc = accuracy(mb, mf, spec, dev, args) if "accuracy" not in skip else {}
    log(f"accuracy: {acc}")
    dec = decode_times({"bf16": mb, "fp8": mf}, spec, dev, args, timer) if "decode" not in skip else []
    bfc = f8c = None
    gemm = []
    quant_s = None
    if "gemm" not in skip:
        bfc, f8c, gemm = gemm_curves(mb, mf, spec, dev, args, timer)
        quant_s = float(sorted(g["quant_s"] for g in gemm if g["tokens"] == args.rows[0])[1])  # a typical linear
        import yaml

        (out / "gpu_quantization_gemm.yaml").write_text(yaml.safe_dump(
            {"model": spec.name, "hardware": hw_name, "device": device_name(), "gemm_times": bfc,
             "gemm_times_by_precision": {"fp8": f8c}, "act_quant_alone_s": quant_s}, sort_keys=False))
    del mb, mf
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    cms = sim_models(spec, hw_name, args.fp8, bfc, f8c, quant_s)
    sim_decode_ratios(cms, dec)
    off = offline(args, model_ref, hw_name, dev) if "offline" not in skip else {}
    gemm_cfg = {"gemm_times": bfc, "gemm_times_by_precision": {"fp8": f8c}} if bfc else None
    sim_off = sim_offline(args, model_ref, hw_name, gemm_cfg) if off else {}
    wall = time.perf_counter() - t0
    acc = acc or {k: float("nan") for k in ("logit_rel_err", "logit_cosine", "top1_agreement", "greedy_agreement",
                                            "greedy_prefix_mean", "top1_prob_margin_median", "max_prob_median")} | \
        {"prompts": 0, "prompt_len": 0, "greedy_tokens": 0}
    report(out / "gpu_quantization.md", args, device_name(), hw_name, acc, dec, gemm, off, sim_off, wall)
    rows = [{"what": "decode", **r} for r in dec] + [{"what": "gemm", **g} for g in gemm]
    rows += [{"what": f"offline {k}", **v} for k, v in off.items()]
    rows += [{"what": f"sim offline ratio: {k}", "ratio": v} for k, v in sim_off.items()]
    rows += [{"what": "accuracy", **acc}]
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    with open(out / "gpu_quantization.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    log(f"wrote {out / 'gpu_quantization.md'} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
