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

The independent check (column "shipped profile") needs a shipped profile with fp8 GEMM
curves of its own: one H200 device call makes both that calibration and a new measurement,

    python benchmarks/gpu_fidelity.py --out $OUT/fid --models 8b --steps 1 --budget-s 400 && \
        python benchmarks/gpu_quantization.py --out $OUT/quant --requests 256

then, on any machine: `python benchmarks/fidelity_h200.py --install fid/fidelity_gpu.tar.gz
--name CALL` (the grid with its .gemm-fp8.csv archived, profiles/h200-llama-3.1-8b.yaml
refitted with `gemm_times_by_precision.fp8`), the three files of quant/ copied into
benchmarks/results/, and this script with --write-results (its last block into README.md).
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


BF16_ONLY = "the profile's bf16 curves x the roofline's fp8 / bf16 ratio (a profile without fp8 curves)"
SHIPPED = ("shipped profile: its own bf16 and fp8 GEMM curves (`sim calibrate --backend gpu`'s GEMM sweep, "
           "not this measurement's GEMM timings)")


def profile_fp8_call(profile: Path = None) -> str | None:
    """The grid the profile's fp8 GEMM curves were fitted from (its provenance's source), or
    None when the profile carries no fp8 curves (`gemm_times_by_precision.fp8`)."""
    from servesim.sim.yamlio import safe_load

    doc = safe_load((profile or PROFILE).read_text())
    if not ((doc["roofline"].get("gemm_times_by_precision") or {}).get("fp8")):
        return None
    return str((doc.get("provenance") or {}).get("source", "?"))


def measured_on(results: Path) -> str:
    """"one NVIDIA H200, 2026-12-02": the device and date gpu_quantization.md's first line names."""
    import re

    head = (results / "gpu_quantization.md").read_text() if (results / "gpu_quantization.md").is_file() else ""
    m = re.search(r"` on (.+?) \(hardware spec [^)]*\).*?, (\d{4}-\d\d-\d\d) \d\d:\d\d;", head)
    return f"one {m.group(1)}, {m.group(2)}" if m else "device and date not recorded"


def cost_configs(results: Path) -> dict[str, dict | None]:
    """label -> the cost_model.roofline settings of that simulator column (None: the column
    cannot be priced -- the shipped profile carries no fp8 GEMM curves)."""
    import yaml

    from servesim.sim.yamlio import safe_load

    g = yaml.safe_load((results / "gpu_quantization_gemm.yaml").read_text())
    base = safe_load(PROFILE.read_text())["roofline"]
    curves = {"gemm_times": g["gemm_times"], "gemm_times_by_precision": g["gemm_times_by_precision"]}
    bf16_only = {k: v for k, v in base.items() if k != "gemm_times_by_precision"}
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
        BF16_ONLY: {**bf16_only, "act_quant_fused": False},
        SHIPPED: {**base, "act_quant_fused": False} if profile_fp8_call() is not None else None,
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
        if c is None:
            continue
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
        if c is None:
            continue
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


def err(sim: float | None, meas: float, flag: bool = True) -> str:
    """A simulated ratio and its error against the measured one ("-": not priced)."""
    if sim is None:
        return "-"
    e = sim / meas - 1
    return f"{sim:.3f} ({e:+.1%}{'' if abs(e) <= TOL or not flag else ' MISS'})"


def cell_name(r: dict) -> str:
    return f"batch {r['batch']}" if r["what"] == "decode" else "offline"


def column_stats(rows: list[dict], lab: str) -> tuple[int, int, float, list[str]]:
    """(cells, cells that miss TOL, the worst |error|, the missing cells' names) of a column."""
    mine = [r for r in rows if r["model"] == lab]
    bad = [cell_name(r) for r in mine if abs(r["rel_err"]) > TOL]
    return len(mine), len(bad), max((abs(r["rel_err"]) for r in mine), default=0.0), bad


def readme_block(dec: list[dict], dr: dict, orat: dict, meas_off: float, labs: list[str]) -> list[str]:
    """The README's fp8 table (README.md, "### fp8 on one H200"): measured, roofline (S1),
    calibrated with the call's curves (S3), the shipped profile's own curves."""
    roof, cal = labs[0], labs[2]
    L = ["| | measured | roofline | calibrated (profile + the run's bf16 and fp8 GEMM curves) | shipped profile "
         "(its own fp8 curves, from its calibration) |", "|---|---:|---:|---:|---:|"]
    for j, r in enumerate(dec):
        m = r["fp8_s"] / r["bf16_s"]
        what = f"decode, batch {r['batch']}" + (f", context {r['ctx'] // 1024}k" if j == 0 else "")
        L.append(f"| {what} | {m:.3f} | " + " | ".join(
            err(dr[lab][j][2] if lab in dr else None, m, flag=False) for lab in (roof, cal, SHIPPED)) + " |")
    L.append(f"| offline output tok/s, {OFFLINE['requests']} x ({OFFLINE['prompt_len']} + {OFFLINE['output_len']}) "
             f"| {meas_off:.3f} | " + " | ".join(err(orat.get(lab), meas_off, flag=False)
                                                 for lab in (roof, cal, SHIPPED)) + " |")
    return L


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
    S = {lab: f"S{i + 1}" for i, lab in enumerate(labs)}
    fp8_src = profile_fp8_call()
    L = ["# fp8 / bf16 on one H200: measured vs simulated, per shape", "",
         "`python benchmarks/quantization_fidelity.py --write-results` (no GPU: it reads the archived "
         f"measurements of `python benchmarks/gpu_quantization.py --requests 256`, {measured_on(results)}, "
         "`gpu_quantization.csv` / `gpu_quantization_gemm.yaml`, and prices the same shapes). Llama-3.1-8B, fp8 "
         "weights with per-channel scales (`fp8-channel`), inputs quantised per token by a kernel of their own; "
         f"KV cache bf16. A cell misses when the simulated ratio is more than {TOL:.0%} off the measured one.", "",
         "Columns:", ""]
    for lab in labs:
        L.append(f"- **{S[lab]}**: {lab}" + ("" if cfgs[lab] is not None else
                                              f" -- not priced: `{PROFILE.relative_to(REPO)}` carries no fp8 GEMM "
                                              "curves (`gemm_times_by_precision.fp8`)"))
    L += ["", "## Decode iteration (CUDA graph), context 1,024: fp8 / bf16 of the GPU time", "",
          "| batch | bf16 ms | fp8 ms | measured | " + " | ".join(S[lab] for lab in labs) + " |",
          "|---:|---:|---:|---:|" + "---:|" * len(labs)]
    rows = []
    for j, r in enumerate(dec):
        m = r["fp8_s"] / r["bf16_s"]
        L.append(f"| {r['batch']} | {r['bf16_s'] * 1e3:.3f} | {r['fp8_s'] * 1e3:.3f} | {m:.3f} | "
                 + " | ".join(err(dr[lab][j][2] if lab in dr else None, m) for lab in labs) + " |")
        for lab in dr:
            tb, tf, q = dr[lab][j]
            rows.append({"what": "decode", "batch": r["batch"], "ctx": r["ctx"], "model": lab,
                         "measured_ratio": m, "sim_ratio": q, "rel_err": q / m - 1,
                         "measured_bf16_s": r["bf16_s"], "measured_fp8_s": r["fp8_s"],
                         "sim_bf16_s": tb, "sim_fp8_s": tf})
    L += ["", "Simulated bf16 decode (GPU time, ms): "
          + "; ".join(f"{S[lab]} " + ", ".join(f"{x[0] * 1e3:.2f}" for x in dr[lab]) for lab in dr)
          + " (measured " + ", ".join(f"{r['bf16_s'] * 1e3:.2f}" for r in dec) + ").", ""]
    L += ["## Offline throughput: fp8 / bf16 output tokens/s", "",
          f"{OFFLINE['requests']} requests of {OFFLINE['prompt_len']} + {OFFLINE['output_len']} tokens at t=0, up to "
          f"{OFFLINE['max_batch']} in flight; measured {off['bf16']:,.0f} (bf16) and {off['fp8']:,.0f} (fp8) tok/s.",
          "", "| measured | " + " | ".join(S[lab] for lab in labs) + " |",
          "|---:|" + "---:|" * len(labs),
          f"| {meas_off:.3f} | " + " | ".join(err(orat.get(lab), meas_off) for lab in labs) + " |", ""]
    for lab in orat:
        rows.append({"what": "offline", "model": lab, "measured_ratio": meas_off, "sim_ratio": orat[lab],
                     "rel_err": orat[lab] / meas_off - 1})
    resid = quant_residual(dec, gemm)
    alone = [sum(x["quant_s"] for x in gemm if x["tokens"] == r["batch"]) * 1e6 for r in dec
             if sum(x["tokens"] == r["batch"] for x in gemm) == 4]
    L += ["## What the decode deltas leave for the quantisation kernels", "",
          "Per decoder layer: the measured fp8 - bf16 decode time, the four GEMMs' isolated fp8 - bf16 "
          "(`_scaled_mm` of a quantised input vs `F.linear`, the same timing method for both, so its fixed cost "
          "cancels), and the rest, which is all a layer's four quantisation kernels can cost inside the graph "
          + (f"(their isolated time: {min(alone):.0f}-{max(alone):.0f} us a layer)." if alone else "."), "",
          "| batch | measured fp8 - bf16 us/layer | GEMMs fp8 - bf16 us/layer | left for 4 quantisation kernels us |",
          "|---:|---:|---:|---:|"]
    for b, dm, dg, left in resid:
        L.append(f"| {b} | {dm:+.1f} | {dg:+.1f} | {left:+.1f} |")
    big = [x["fp8_s"] / x["bf16_s"] for x in gemm if x["tokens"] >= 1024]
    bf16_only = [r for r in rows if r["model"] == BF16_ONLY]
    L += ["", "## Why the roofline misses", "",
          "The roofline prices an fp8 linear at half the bf16 weight bytes (and twice the tensor-core rate), so "
          "at decode sizes, where every linear is bound by its weight reads, it predicts fp8 at "
          f"~{dr[labs[0]][0][2]:.2f}x bf16. "
          "cuBLASLt's fp8 kernels (`torch._scaled_mm`) do not stream the weights at that rate below a few hundred "
          "rows -- one layer's GEMMs at one row, fp8 GEMM / bf16 GEMM (isolated, same method): "
          + ", ".join(f"{x['linear']} {x['fp8_s'] / x['bf16_s']:.2f}" for x in gemm if x["tokens"] == 1)
          + " -- and the lm_head, norms, attention and KV reads (bf16 in both) are the same in both models"
          + (f"; from 1,024 rows the fp8 GEMMs take {min(big):.2f}-{max(big):.2f}x bf16" if big else "")
          + ". Only measured fp8 curves (`gemm_times_by_precision`) carry that; a profile without them prices fp8 "
          f"as its bf16 curves times the roofline ratio ({S[BF16_ONLY]}: "
          + ", ".join(f"{r['rel_err']:+.1%}" for r in bf16_only) + ").", ""]
    L += ["## Verdict", ""]
    for lab in labs:
        if cfgs[lab] is None:
            L.append(f"- {S[lab]}: not priced (the shipped profile carries no fp8 GEMM curves)")
            continue
        n, nbad, worst, bad = column_stats(rows, lab)
        L.append(f"- {S[lab]}: {nbad} of {n} cells miss {TOL:.0%} (worst {worst:.1%})"
                 + (": " + ", ".join(bad) if bad else ""))
    s3, s4 = labs[2], labs[3]
    n3, b3, w3, m3 = column_stats(rows, s3)
    n4, b4, w4, m4 = column_stats(rows, s4)
    floor_us = 4 * safe_profile_roofline()["layer_latency_s"] / 11 * 1e6
    lefts = [x[3] for x in resid]
    L += ["", f"The quantisation pass: the decode deltas leave {min(lefts):+.1f} to {max(lefts):+.1f} us a layer for "
          f"its four kernels inside the graph; {S[s3]} prices them at their bytes, {S[s4]} adds the profile's "
          f"per-kernel floor ({floor_us:.1f} us a layer). {S[s3]}: {n3 - b3} of {n3} cells within {TOL:.0%} "
          f"(worst {w3:.1%}); {S[s4]}: {n4 - b4} of {n4} (worst {w4:.1%})"
          + (f", missing at {', '.join(m4)}" if m4 else "") + "."]
    if fp8_src is None:
        L += ["", "Not an independent check yet: S3-S5 price with the GEMM curves of the same device call as the "
              f"measured ratios, and the shipped profile (`{PROFILE.relative_to(REPO)}`) carries no fp8 GEMM "
              f"curves, so {S[SHIPPED]} is '-'. A calibration call that sweeps them (`benchmarks/gpu_fidelity.py` "
              "step 1, `--gemm-precisions fp8`), installed, fills it."]
    else:
        n7, b7, w7, m7 = column_stats(rows, SHIPPED)
        L += ["", f"Independent check ({S[SHIPPED]}): the shipped profile's own fp8 GEMM curves, fitted from "
              f"`{fp8_src}` (the calibration's own sweep, not the GEMM timings of this measurement), give {n7 - b7} of {n7} cells within "
              f"{TOL:.0%} (worst {w7:.1%})" + (f", missing at {', '.join(m7)}" if m7 else "") + "."]
    block = readme_block(dec, dr, orat, meas_off, labs)
    L += ["", "## The README's table", "", "README.md (\"### fp8 on one H200\") shows this block as printed here:", "",
          *block, "", f"({sum(len(column_stats(rows, lab)[3]) for lab in dr)} missing cells in all; "
          f"{time.perf_counter() - t0:.0f} s.)", ""]
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


def safe_profile_roofline() -> dict:
    from servesim.sim.yamlio import safe_load

    return safe_load(PROFILE.read_text())["roofline"]


if __name__ == "__main__":
    sys.exit(main())
