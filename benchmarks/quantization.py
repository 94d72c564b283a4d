"""Quantization in the simulator (S7): what each weight / KV-cache precision buys, per model
and GPU. Writes quantization.md and quantization.csv into benchmarks/out/
(benchmarks/results/ with --write-results).

    python benchmarks/quantization.py [--write-results]   # ~1 minute on 2 cores

Three tables:

1. **memory**: weights per GPU, the KV pool `sim run` sizes next to them (90% of what the
   weights and the activation reserve leave) and the requests of 1,024 + 512 tokens that
   fit at once, for Llama-2-13B, Llama-3.1-8B and Llama-3.1-70B on one H100 and one H200.
2. **throughput and latency**: every variant of experiments/quantization.yaml on each
   model x GPU -- at batch 1 (a lone request: TTFT, TPOT, end-to-end) and at the batch
   that fills memory (every request offered at t=0: output tokens/s, the concurrency
   reached, and the run's own bound from `summary.json`: achieved / bound).
3. **`sim bounds` on published-style claims**: one possible, one above the roofline, one
   that does not fit.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from results_io import RESULTS as STORE  # noqa: E402
from results_io import add_write_results  # noqa: E402

MODELS = ("llama-2-13b", "llama-3.1-8b", "llama-3.1-70b")
HARDWARE = ("h100-sxm", "h200-sxm")
PRECISIONS = (("bf16", "bf16"), ("fp8", "bf16"), ("fp8", "fp8"), ("int8", "bf16"), ("int4-g128", "bf16"),
              ("int4-g128", "int8"))
PROMPT, OUTPUT = 1024, 512  # experiments/quantization.yaml's lengths
EXPERIMENT = REPO / "experiments" / "quantization.yaml"
CLAIMS = [  # (what, bounds arguments, claimed output tok/s)
    ("Llama-3.1-8B fp8 on one H100, 64 users, 1k prompt / 512 output: 8,000 tok/s",
     dict(model="llama-3.1-8b", hardware="h100-sxm", precision="fp8", batch=64, prompt_len=1024, output_len=512),
     8_000),
    ("Llama-2-13B on one H100, batch 1: 200 tok/s",
     dict(model="llama-2-13b", hardware="h100-sxm", precision="bf16", batch=1, prompt_len=128, output_len=128), 200),
    ("Llama-3.1-70B bf16 on one 80 GB H100: 30 tok/s",
     dict(model="llama-3.1-70b", hardware="h100-sxm", precision="bf16", batch=1, prompt_len=512, output_len=256), 30),
]


def label(prec: str, kv: str) -> str:
    return prec if kv == "bf16" else f"{prec} + kv {kv}"


def memory_rows() -> list[dict]:
    from servesim.sim.bounds import compute_bounds
    from servesim.sim.memory import default_activation_reserve_bytes
    from servesim.sim.specs import apply_precision, load_hardware, load_model

    rows = []
    for m in MODELS:
        for h in HARDWARE:
            hw = load_hardware(h)
            for prec, kv in PRECISIONS:
                model = apply_precision(load_model(m), hw, prec, kv)
                # the activation reserve of the experiment's fill variants (8,192 tokens, 2,048 rows of logits)
                reserve = default_activation_reserve_bytes(model, 8192, 1, max_batch_size=2048)
                b = compute_bounds(model, hw, batch=1, prompt_len=PROMPT, output_len=OUTPUT,
                                   activation_reserve_bytes=reserve)
                rows.append({"model": m, "hardware": h, "precision": label(prec, kv), "weights_gb": b.weights_gb,
                             "fits": b.weights_fit and b.max_batch > 0, "kv_pool_gb": b.kv_pool_gb,
                             "kv_pool_tokens": b.kv_pool_tokens, "max_concurrency": b.max_batch,
                             "decode_bound_b1_tok_s": b.decode_tok_s})
    return rows


def run_rows() -> list[dict]:
    import numpy as np

    from servesim.sim.config import load_experiment
    from servesim.sim.runner import resolve, simulate
    from servesim.sim.types import ConfigError

    rows = []
    for m in MODELS:
        for h in HARDWARE:
            exp = load_experiment(EXPERIMENT, [f"model={m}", f"hardware={h}", "output.plots=false",
                                               "output.timeline=false"])
            for v in exp.variants:
                row = {"model": m, "hardware": h, "variant": v.name}
                try:
                    setup = resolve(v.config, exp.base_dir)
                except ConfigError as e:
                    row["error"] = e.problems[0][1]
                    rows.append(row)
                    continue
                res = simulate(setup)
                s = res.summary
                its = res.iterations
                conc = np.asarray(its.column("num_gen_requests")) + np.asarray(its.column("num_ctx_requests"))
                row.update({"precision": setup.model.precision_label, "tok_s": s["throughput_out_tok_s"],
                            "ttft_p50_s": s["ttft_s"]["p50"], "tpot_p50_s": s["tpot_s"]["p50"],
                            "e2e_p50_s": s["e2e_s"]["p50"], "bound_tok_s": s["bounds"]["output_tok_s"],
                            "achieved_over_bound": s["bounds"]["achieved_over_bound"],
                            "kv_pool_blocks": setup.num_blocks, "concurrency_max": int(conc.max())})
                rows.append(row)
    return rows


def claim_rows() -> list[dict]:
    from servesim.sim.bounds import compute_bounds, verdict
    from servesim.sim.specs import apply_precision, load_hardware, load_model

    out = []
    for what, a, claim in CLAIMS:
        hw = load_hardware(a["hardware"])
        model = apply_precision(load_model(a["model"]), hw, a["precision"])
        b = compute_bounds(model, hw, batch=a["batch"], prompt_len=a["prompt_len"], output_len=a["output_len"])
        kind, text = verdict(b, claim)
        cmd = (f"sim bounds --model {a['model']} --hardware {a['hardware']} --precision {a['precision']} "
               f"--batch {a['batch']} --prompt-len {a['prompt_len']} --output-len {a['output_len']} "
               f"--claim-tok-s {claim}")
        out.append({"claim": what, "command": cmd, "verdict": kind, "text": text, "bound": b.e2e_out_tok_s})
    return out


def fmt(v, spec: str = "{:,.0f}") -> str:
    return "-" if v is None else spec.format(v)


def markdown(mem: list[dict], runs: list[dict], claims: list[dict], wall: float) -> str:
    L = ["# Quantization in the simulator (S7)", "",
         "Made by `python benchmarks/quantization.py --write-results` "
         f"({wall:.0f} s on 2 CPU cores); the runs are `sim run experiments/quantization.yaml --set model=M "
         "--set hardware=H`, the pure roofline cost model on the hardware files' achievable rates (no calibrated "
         "profile: none was measured for fp8, int8 or int4 GEMMs), one GPU, no tensor parallelism.", "",
         "Precisions: the decoder linears' weights (fp8: e4m3, per-tensor scales, activations quantised per token "
         "too, W8A8; int8: SmoothQuant W8A8, per-channel; int4-g128: weight-only, groups of 128, dequantised to "
         "bf16 inside the GEMM); embeddings, norms and lm_head stay bf16. KV cache bf16, fp8 or int8 (1 byte an "
         "element).", "",
         f"## Memory: weights, KV pool and the requests of {PROMPT} + {OUTPUT} tokens that fit", "",
         "KV pool: 90% of what the weights and the fill variants' activation reserve (8,192 tokens, 2,048 rows of "
         "fp32 logits) leave, as `sim run` sizes it; max concurrency: the requests whose prompt + output blocks "
         "fit in it at once.", "",
         "| model | GPU | precision | weights GB | KV pool GB | KV pool tokens | max concurrency | "
         "decode bound at batch 1, tok/s |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in mem:
        if not r["fits"]:
            L.append(f"| {r['model']} | {r['hardware']} | {r['precision']} | {r['weights_gb']:.1f} | does not fit | "
                     f"- | 0 | - |")
        else:
            L.append(f"| {r['model']} | {r['hardware']} | {r['precision']} | {r['weights_gb']:.1f} | "
                     f"{r['kv_pool_gb']:.1f} | {r['kv_pool_tokens']:,} | {r['max_concurrency']:,} | "
                     f"{r['decode_bound_b1_tok_s']:,.0f} |")
    L += ["", "(Decode bound: the weights plus one request's KV read per token at the datasheet bandwidth, "
          "`sim bounds`.)", "",
          "## Throughput and latency per precision", "",
          "Batch 1: one request every 20 s, each alone on the GPU (TTFT: its prefill; TPOT: its decode step). "
          "Fill: 4,000 requests at t=0, as many in flight as the KV pool holds (guaranteed_no_evict reserves "
          "prompt + output). *Bound*: the run's own `summary.json` bound on output tok/s (datasheet peaks, "
          "sim/bounds.py `run_bounds`).", "",
          "| model | GPU | variant | precision | batch-1 TTFT ms | batch-1 TPOT ms | batch-1 E2E s | "
          "fill out tok/s | fill in flight | fill TPOT ms | fill / bound | vs bf16 fill |",
          "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["model"], r["hardware"], r["variant"]): r for r in runs}
    names = []
    for r in runs:
        base = r["variant"].rsplit("-", 1)[0]
        if base not in names:
            names.append(base)
    for m in MODELS:
        for h in HARDWARE:
            ref = by.get((m, h, "bf16-fill"), {})
            for n in names:
                b1, fl = by.get((m, h, f"{n}-batch1"), {}), by.get((m, h, f"{n}-fill"), {})
                if not b1 and not fl:
                    continue
                err = fl.get("error") or b1.get("error")
                if err and "tok_s" not in fl:
                    why = "does not fit" if "weights" in err or "no room" in err else err
                    L.append(f"| {m} | {h} | {n} | | {why} | | | | | | | |")
                    continue
                rel = (fl["tok_s"] / ref["tok_s"]) if fl.get("tok_s") and ref.get("tok_s") else None
                L.append(f"| {m} | {h} | {n} | {fl.get('precision', b1.get('precision', ''))} | "
                         f"{fmt(b1.get('ttft_p50_s') and b1['ttft_p50_s'] * 1e3, '{:.1f}')} | "
                         f"{fmt(b1.get('tpot_p50_s') and b1['tpot_p50_s'] * 1e3, '{:.2f}')} | "
                         f"{fmt(b1.get('e2e_p50_s'), '{:.2f}')} | {fmt(fl.get('tok_s'))} | "
                         f"{fmt(fl.get('concurrency_max'))} | "
                         f"{fmt(fl.get('tpot_p50_s') and fl['tpot_p50_s'] * 1e3, '{:.1f}')} | "
                         f"{fmt(fl.get('achieved_over_bound'), '{:.0%}')} | {fmt(rel, '{:.2f}x')} |")
    L += ["", "## `sim bounds` on published-style claims", "",
          "| claim | verdict | bound tok/s | command |", "|---|---|---:|---|"]
    for c in claims:
        L.append(f"| {c['claim']} | **{c['text']}** | {c['bound']:,.0f} | `{c['command']}` |")
    L += ["", "What the model leaves out: the int4 dequantisation rate (4e13 weights/s) and its 64-row tile are "
          "estimates, not measurements; int8 tensor-core rates are the fp8 ones (the same tensor cores), not "
          "measured; without calibrated per-precision GEMM curves the linears are priced by the roofline; "
          "KV-cache scales (one per layer and tensor) are not counted.", ""]
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_write_results(ap)
    args = ap.parse_args()
    dest = STORE.out_dir(args.write_results)
    t0 = time.perf_counter()
    mem = memory_rows()
    runs = run_rows()
    claims = claim_rows()
    wall = time.perf_counter() - t0
    (dest / "quantization.md").write_text(markdown(mem, runs, claims, wall))
    buf = io.StringIO(newline="")
    keys: list[str] = []
    for r in runs:
        keys.extend(k for k in r if k not in keys)
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(runs)
    (dest / "quantization.csv").write_text(buf.getvalue())
    print(f"wrote {dest / 'quantization.md'} and quantization.csv ({wall:.0f} s)")


if __name__ == "__main__":
    main()
