"""fp8 / bf16 on one H200: the GPU's measured ratios beside the simulator's, per shape (S7).

Reads the archived measurements of ``benchmarks/gpu_quantization.py`` (one H200 device
call, 2026-12-02: ``benchmarks/results/gpu_quantization.csv`` -- decode iterations at batch
1 / 16 / 64 / 256 x context 1,024 as CUDA-graph replays, the offline run of 256 requests of
512 + 256 tokens -- and ``gpu_quantization_gemm.yaml``, the same call's GEMM curves) and
prices the same shapes with the cost model, no GPU needed:

* **roofline** (the hardware file's rates): fp8 linears at twice the bf16 tensor-core rate
  and half the weight bytes, the input quantisation fused into the kernel before (nothing
  but a 1-byte read) or a kernel of its own per linear (its bytes + the default floor);
* **calibrated**: the shipped profile of this GPU (``profiles/h200-llama-3.1-8b.yaml``: its
  fitted floors, bandwidths and host terms) with the call's own GEMM curves
  (``gemm_times`` bf16, ``gemm_times_by_precision.fp8``: cuBLASLt's fp8 kernels at decode
  sizes, not 2x bf16 -- at one row an fp8 GEMM takes 0.83-1.46x the bf16 one), the quantisation kernel before
  each linear priced as its own pass over the bf16 input (its bytes at the profile's
  bandwidth; ``act_quant_latency_s: 0``, the default), or those bytes plus the profile's
  per-kernel floor (``act_quant_latency_s: null``: ``layer_latency_s / 11``).

Why not the isolated quantisation time the call measured (7.6-9.3 us at every row count
up to 512, where its bytes grow 500x)? That flat part is the cost of timing one kernel by
itself -- a graph replay between two events with a synchronisation -- which the GEMM
curves measured the same way carry too (it cancels in the fp8 - bf16 difference) but a
kernel inside the forward's graph does not pay: the measured decode deltas leave 0-2 us a
quantisation kernel (table 3). Pricing it at the isolated time was the previous table's
+18% (gpu_quantization.md, last column).

    python benchmarks/quantization_fidelity.py                  # prints the tables
    python benchmarks/quantization_fidelity.py --write-results  # benchmarks/results/quantization_fidelity.md

Writes quantization_fidelity.md and .csv (benchmarks/out/ by default).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]  # this checkout's servesim, then the benchmarks

MODEL, HW, FP8 = "llama-3.1-8b", "h200-sxm", "fp8-channel"
PROFILE = REPO / "profiles" / "h200-llama-3.1-8b.yaml"
# the archived call's offline run: `python benchmarks/gpu_quantization.py --requests 256`
OFFLINE = {"requests": 256, "prompt_len": 512, "output_len": 256, "max_batch": 128}
TOL = 0.05


def load_measurements(results: Path) -> tuple[list[dict], dict, dict]:
    """(decode rows, offline {bf16, fp8: tok/s}, the per-linear GEMM rows) from the CSV."""
    dec, off, gemm = [], {}, []
    with open(results / "gpu_quantization.csv") as fh:
        for r in csv.DictReader(fh):
            if r["what"] == "decode":
                dec.append({"batch": int(r["batch"]), "ctx": int(r["ctx"]), "bf16_s": float(r["bf16_s"]),
                            "fp8_s": float(r["fp8_s"])})
            elif r["what"] in ("offline bf16", "offline fp8"):
                off[r["what"].split()[1]] = float(r["tok_s"])
            elif r["what"] == "gemm":
                gemm.append({"linear": r["linear"], "k": int(r["k"]), "n": int(r["n"]), "tokens": int(r["tokens"]),
                             "bf16_s": float(r["bf16_s"]), "fp8_s": float(r["fp8_gemm_s"]),
                             "quant_s": float(r["quant_s"])})
    if not dec or set(off) != {"bf16", "fp8"}:
        raise SystemExit(f"{results / 'gpu_quantization.csv'}: no decode or offline rows")
    return dec, off, gemm


def cost_configs(results: Path) -> dict[str, dict]:
    """label -> the cost_model.roofline settings of that simulator column."""
    import yaml

    from servesim.sim.yamlio import safe_load

    g = yaml.safe_load((results / "gpu_quantization_gemm.yaml").read_text())
    base = safe_load(PROFILE.read_text())["roofline"]
    curves = {"gemm_times": g["gemm_times"], "gemm_times_by_precision": g["gemm_times_by_precision"]}
    return {
        "roofline, quantisation fused": {},
        "roofline, a quantisation kernel per linear": {"act_quant_fused": False},
        "calibrated: profile + the call's GEMM curves, a quantisation pass per linear at its bytes "
        "(act_quant_latency_s 0, the default)":
            {**base, **curves, "act_quant_fused": False},
        "calibrated: the same, the pass at its bytes + the profile's per-kernel floor (act_quant_latency_s null: "
        "layer_latency_s / 11)":
            {**base, **curves, "act_quant_fused": False, "act_quant_latency_s": None},
        "(previous table: the same at the isolated quantisation time)":
            {**base, **curves, "act_quant_fused": False,
             "act_quant_latency_s": g.get("act_quant_latency_s", g.get("act_quant_alone_s"))},
    }


def decode_ratios(cfgs: dict[str, dict], dec: list[dict]) -> dict[str, list[tuple[float, float, float]]]:
    """label -> per decode row (sim bf16 s, sim fp8 s, fp8 / bf16): GPU time of the shape."""
    from servesim.sim.cost_model import RooflineConfig, RooflineCostModel
    from servesim.sim.specs import apply_precision, load_hardware, load_model

    spec, hw = load_model(MODEL), load_hardware(HW)
    bf, f8 = apply_precision(spec, hw, "bf16"), apply_precision(spec, hw, FP8)
    from servesim.sim.types import IterationShape

    out = {}
    for lab, c in cfgs.items():
        rc = RooflineConfig(**c)
        cb, cf = RooflineCostModel(bf, hw, rc), RooflineCostModel(f8, hw, rc)
        rows = []
        for r in dec:
            B, ctx = r["batch"], r["ctx"]
            sh = IterationShape(n_decode=B, decode_kv_sum=B * (ctx + 1), graph=True, padded_decode=B)
            tb, tf = cb.gpu_time(sh), cf.gpu_time(sh)
            rows.append((tb, tf, tf / tb))
        out[lab] = rows
    return out


def offline_ratios(cfgs: dict[str, dict]) -> dict[str, float]:
    """label -> the simulated offline run's fp8 / bf16 output tokens/s (the GPU run's config)."""
    from gpu_quantization import run_config

    from servesim.sim.config import RunConfig
    from servesim.sim.runner import resolve, simulate

    args = argparse.Namespace(**OFFLINE)
    out = {}
    for lab, c in cfgs.items():
        tok = {}
        for name, prec in (("bf16", None), ("fp8", FP8)):
            d = run_config(args, MODEL, HW, prec)
            d["cost_model"] = {"roofline": c}
            tok[name] = simulate(resolve(RunConfig.model_validate(d), REPO)).summary["throughput_out_tok_s"]
        out[lab] = tok["fp8"] / tok["bf16"]
    return out


def quant_residual(dec: list[dict], gemm: list[dict]) -> list[tuple[int, float, float, float]]:
    """Per decode batch: (batch, measured fp8 - bf16 per layer us, the four GEMMs' isolated
    fp8 - bf16 at that row count us, what is left for a layer's four quantisation kernels us)."""
    from servesim.sim.specs import load_model

    L = load_model(MODEL).num_layers
    out = []
    for r in dec:
        g = [x for x in gemm if x["tokens"] == r["batch"]]
        if len(g) != 4:
            continue
        d_meas = (r["fp8_s"] - r["bf16_s"]) / L * 1e6
        d_gemm = sum(x["fp8_s"] - x["bf16_s"] for x in g) * 1e6
        out.append((r["batch"], d_meas, d_gemm, d_meas - d_gemm))
    return out


def err(sim: float, meas: float) -> str:
    e = sim / meas - 1
    return f"{sim:.3f} ({e:+.1%}{'' if abs(e) <= TOL else ' MISS'})"


def main(argv: list[str] | None = None) -> int:
    from results_io import Results, add_write_results

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_write_results(ap)
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/out, or benchmarks/results "
                    "with --write-results)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = Results(REPO)
    results = REPO / "benchmarks" / "results"
    out = Path(args.out) if args.out else (results if args.write_results else REPO / "benchmarks" / "out")
    out.mkdir(parents=True, exist_ok=True)
    dec, off, gemm = load_measurements(results)
    cfgs = cost_configs(results)
    dr = decode_ratios(cfgs, dec)
    orat = offline_ratios(cfgs)
    meas_off = off["fp8"] / off["bf16"]
    labs = list(cfgs)
    L = ["# fp8 / bf16 on one H200: measured vs simulated, per shape", "",
         "`python benchmarks/quantization_fidelity.py --write-results` (no GPU: it reads the archived "
         "measurements of `python benchmarks/gpu_quantization.py --requests 256`, one H200, 2026-12-02, "
         "`gpu_quantization.csv` / `gpu_quantization_gemm.yaml`, and prices the same shapes). Llama-3.1-8B, fp8 "
         "weights with per-channel scales (`fp8-channel`), inputs quantised per token by a kernel of their own; "
         f"KV cache bf16. A cell misses when the simulated ratio is more than {TOL:.0%} off the measured one.", "",
         "Columns:", ""]
    for i, lab in enumerate(labs):
        L.append(f"- **S{i + 1}**: {lab}")
    L += ["", "## Decode iteration (CUDA graph), context 1,024: fp8 / bf16 of the GPU time", "",
          "| batch | bf16 ms | fp8 ms | measured | " + " | ".join(f"S{i + 1}" for i in range(len(labs))) + " |",
          "|---:|---:|---:|---:|" + "---:|" * len(labs)]
    rows = []
    for j, r in enumerate(dec):
        m = r["fp8_s"] / r["bf16_s"]
        L.append(f"| {r['batch']} | {r['bf16_s'] * 1e3:.3f} | {r['fp8_s'] * 1e3:.3f} | {m:.3f} | "
                 + " | ".join(err(dr[lab][j][2], m) for lab in labs) + " |")
        for lab in labs:
            tb, tf, q = dr[lab][j]
            rows.append({"what": "decode", "batch": r["batch"], "ctx": r["ctx"], "model": lab,
                         "measured_ratio": m, "sim_ratio": q, "rel_err": q / m - 1,
                         "measured_bf16_s": r["bf16_s"], "measured_fp8_s": r["fp8_s"],
                         "sim_bf16_s": tb, "sim_fp8_s": tf})
    L += ["", "Simulated bf16 decode (GPU time, ms): "
          + "; ".join(f"S{i + 1} " + ", ".join(f"{x[0] * 1e3:.2f}" for x in dr[lab]) for i, lab in enumerate(labs))
          + " (measured " + ", ".join(f"{r['bf16_s'] * 1e3:.2f}" for r in dec) + ").", ""]
    L += ["## Offline throughput: fp8 / bf16 output tokens/s", "",
          f"{OFFLINE['requests']} requests of {OFFLINE['prompt_len']} + {OFFLINE['output_len']} tokens at t=0, up to "
          f"{OFFLINE['max_batch']} in flight; measured {off['bf16']:,.0f} (bf16) and {off['fp8']:,.0f} (fp8) tok/s.",
          "", "| measured | " + " | ".join(f"S{i + 1}" for i in range(len(labs))) + " |",
          "|---:|" + "---:|" * len(labs),
          f"| {meas_off:.3f} | " + " | ".join(err(orat[lab], meas_off) for lab in labs) + " |", ""]
    for lab in labs:
        rows.append({"what": "offline", "model": lab, "measured_ratio": meas_off, "sim_ratio": orat[lab],
                     "rel_err": orat[lab] / meas_off - 1})
    L += ["## What the decode deltas leave for the quantisation kernels", "",
          "Per decoder layer: the measured fp8 - bf16 decode time, the four GEMMs' isolated fp8 - bf16 "
          "(`_scaled_mm` of a quantised input vs `F.linear`, the same timing method for both, so its fixed cost "
          "cancels), and the rest, which is all a layer's four quantisation kernels can cost inside the graph "
          "(their isolated time: 30-37 us a layer).", "",
          "| batch | measured fp8 - bf16 us/layer | GEMMs fp8 - bf16 us/layer | left for 4 quantisation kernels us |",
          "|---:|---:|---:|---:|"]
    for b, dm, dg, left in quant_residual(dec, gemm):
        L.append(f"| {b} | {dm:+.1f} | {dg:+.1f} | {left:+.1f} |")
    L += ["", "## Why the roofline misses", "",
          "The roofline prices an fp8 linear at half the bf16 weight bytes (and twice the tensor-core rate), so "
          "at decode sizes, where every linear is bound by its weight reads, it predicts fp8 at ~0.54x bf16. "
          "cuBLASLt's fp8 kernels (`torch._scaled_mm`) do not stream the weights at that rate below a few hundred "
          "rows -- one layer's GEMMs at one row, fp8 GEMM / bf16 GEMM (isolated, same method): "
          + ", ".join(f"{x['linear']} {x['fp8_s'] / x['bf16_s']:.2f}" for x in gemm if x["tokens"] == 1)
          + " -- and the lm_head, norms, attention and KV reads (bf16 in both) are the same in both models; "
          "past ~1,000 rows the fp8 GEMMs reach 0.59-0.68x bf16. Only measured fp8 curves "
          "(`gemm_times_by_precision`, S3-S5) carry that; a bf16-only profile prices fp8 as its bf16 curves "
          "times the roofline ratio (the previous table's -38%..-3%).", ""]
    misses = [(lab, r) for lab in labs for r in rows if r["model"] == lab and abs(r["rel_err"]) > TOL]
    L += ["", "## Verdict", ""]
    for i, lab in enumerate(labs):
        bad = [r for r in rows if r["model"] == lab and abs(r["rel_err"]) > TOL]
        worst = max((abs(r["rel_err"]) for r in rows if r["model"] == lab), default=0.0)
        L.append(f"- S{i + 1}: {len(bad)} of {sum(r['model'] == lab for r in rows)} cells miss {TOL:.0%} "
                 f"(worst {worst:.1%})" + (": " + ", ".join(
                     f"{'batch ' + str(r['batch']) if r['what'] == 'decode' else 'offline'}" for r in bad)
                     if bad else ""))
    L += ["", "Not an independent check: the choice between S3 and S4 (the quantisation pass with or without "
          "a fixed latency) is the one the decode deltas above support, and they come from the same call. "
          "`benchmarks/gpu_kv_fp8.py` times the quantisation kernel back to back (the calibration sweep's "
          "method) to test it on its own; until then S4 is the conservative column, and it misses at batch 16.",
          "", f"({len(misses)} missing cells in all; {time.perf_counter() - t0:.0f} s.)", ""]
    (out / "quantization_fidelity.md").write_text("\n".join(L))
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    with open(out / "quantization_fidelity.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print("\n".join(L))
    del res
    return 0


if __name__ == "__main__":
    sys.exit(main())
