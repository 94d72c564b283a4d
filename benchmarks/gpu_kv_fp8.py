"""fp8 KV cache against bf16 on one GPU: the decode iteration, beside the simulator's ratio (S7).

Llama-3.1-8B, random bf16 weights (seeded), one model and two KV pools of the same blocks --
bf16 and e4m3 (`kv_cache.dtype: fp8`: per-tensor scales, written by the RoPE + KV-write
kernel, read by the paged decode attention kernel) -- filled with the same random keys and
values. One call measures:

0. **the decode attention's fp8 tuning** (``--skip tuning`` to leave it out; ``--tuning-s``
   its allowance): section 12's autotune (gpu_bench.tune_decode_attention) over fp8 candidates,
   each checked against the torch reference first; installed for the steps below and written
   as OUT/tuning/h200.json (the shipped table plus the fp8 entries: copy it into
   kernels/tuning/), with the kernel's own fp8 / bf16 time beside the bf16 cache's;
1. **decode iteration time** (CUDA-graph replay of ``forward_decode``, median of ``--reps``)
   at batch x context shapes, bf16 KV vs fp8 KV, and the simulator's fp8 / bf16 ratio of the
   same shapes: the roofline and the shipped profile of this GPU (bytes only, with the fp8
   conversion rate, and with its kernel table: sim/kv_attention.py);
2. **accuracy**: last-position logits of a few prompts (prefill through the prefill
   attention kernel, then decode steps through the decode kernel) with a bf16 pool and fp8
   pools of unit and of calibrated scales (`LlamaModel.calibrate_kv_scales`): relative
   error, cosine and top-1 agreement, stated as measured (random weights);
3. **the quantisation kernel of the fp8 linears timed back to back** (``--skip quant`` to
   leave it out): ``kernels.ops.quant_fp8_rowwise`` at decode row counts, ``reps`` calls
   between two events behind a spin kernel (the calibration's GEMM-sweep method,
   gpu_backend/profiler.py) beside one call timed alone as a graph replay (what
   gpu_quantization.py measured): the in-graph cost the cost model's
   ``act_quant_latency_s`` stands for (benchmarks/results/quantization_fidelity.md).

    python benchmarks/gpu_kv_fp8.py --out $OUT            # one device call (~2 min on an H200)
    python benchmarks/gpu_kv_fp8.py --smoke --out DIR     # CPU, tiny model (~20 s)
    python benchmarks/gpu_kv_fp8.py --replay benchmarks/results/gpu_kv_fp8.csv   # CPU: the sim columns again
    python benchmarks/gpu_kv_fp8.py --rebuild-tuning benchmarks/results/gpu_kv_fp8.csv  # CPU: h200.json's fp8 entries

Writes OUT/gpu_kv_fp8.md (the tables, the command, the device), OUT/gpu_kv_fp8.csv and
OUT/gpu_kv_fp8_files.tar.xz (the rest: tuning/h200.json, decode_attention_kv.csv -- the
kernel-alone table as a calibration file, sim/kv_attention.py): three files, the device
tool returns a few only. The simulator's columns price the fp8 decode attention with the
conversion rate fitted from that kernel table (not from the decode steps they are checked
against); `--replay` regenerates them from a committed csv.
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

BLOCK = 32  # tokens per KV block: the serving runs' (gpu_bench.S10_BLOCK), which the shipped tuning is keyed by
SHAPES = ((1, 1024), (16, 1024), (64, 1024), (256, 1024), (16, 4096), (64, 4096), (16, 16384))


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- fp8 tuning
# (tokens per tile, warps, stages, dot dtype): byte-sized tiles (128 / 256 fp8 tokens = 64 / 128 bf16 ones) in
# fp16, and a few in q's dtype (bf16; N64/w4/st2 is the shipped bf16 pick), 13 compilations with the default
TUNE_TILES = (*((n, w, st, "f16") for n in (128, 256) for w in (4, 8) for st in (2, 3)),
              (64, 4, 2, "f16"), (64, 4, 2, "q"), (128, 4, 2, "q"), (256, 8, 3, "q"))
TUNE_BATCHES = (1, 16, 64, 256)
TUNE_CTXS = (1024, 4096)
TUNE_MIN_TOKENS = (128, 512)  # an fp8 token is half a bf16 one: twice section 12's (64, 256)
TUNE_TOL = 2e-2  # bf16 queries: the reference in fp32 on the same e4m3 cache
FP8_SCALE = 4.0 / 448  # the tuning cases' KV scales (N(0, 1) values: ~ +-4 sigma -> +-448)


def fp8_tuning(spec, dev, bs: int, smoke: bool, allow_s: float) -> tuple[dict, list[dict], list[str]]:
    """The decode attention's tuning for an fp8 cache under bf16 queries: section 12's
    search (`gpu_bench.tune_decode_attention`) over the fp8 candidates -- tiles sized in
    bytes, fp16 or q-dtype dots, split bounds, fused reduce / program order -- every
    candidate checked against the torch reference on the same e4m3 cache before it is timed
    and its CUDA-graph output again after; per batch the config best over the contexts.
    Also times the bf16 cache of the same (dequantised) values with the installed (shipped)
    bf16 config: the kernel's own fp8 / bf16 ratio. Returns (entries of the fp8 tuning key,
    rows, rejected)."""
    import gpu_bench as gb
    import torch

    from servesim.kernels import decode_attention as da
    from servesim.kernels._common import num_sms

    qdt = torch.bfloat16 if dev.type == "cuda" else torch.float16  # (the interpreter has no bf16)
    hq, hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    group, sms, scale = hq // hkv, num_sms(dev), spec.head_dim ** -0.5
    tiles, batches, ctxs, mins, top_tiles, top_combos = TUNE_TILES, TUNE_BATCHES, TUNE_CTXS, TUNE_MIN_TOKENS, 2, 2
    if smoke:
        tiles, batches, ctxs, mins, top_tiles, top_combos = ((32, 4, 0, "f16"), (16, 2, 0, "q")), (1, 4), (48,), (16,), 1, 1
    r = gb.tune_decode_attention(dev, qdt, hq, hkv, D, bs, tiles=tiles, batches=batches, ctxs=ctxs, mins=mins,
                                 top_tiles=top_tiles, top_combos=top_combos, tol=TUNE_TOL,
                                 deadline=time.monotonic() + allow_s, smoke=smoke, name=spec.name,
                                 kv_dtype=torch.float8_e4m3fn, kv_scale=FP8_SCALE)
    t = gb.timer(dev)
    reps = 5 if dev.type == "cuda" else 1
    rows = []
    for B, pick in r["picks"].items():
        for ctx in ctxs:
            c, tt = r["cases"][(B, ctx)], r["times"][(B, ctx)]
            # the bf16 cache (the same dequantised e4m3 values) with its installed config
            cfg = da.resolve_config(B, hkv, c["width"] * bs, D, group, bs, qdt, sms, None, qdt)
            s, o = gb.time_layers(t, dev, c, c["kc"], c["vc"], cfg, scale, 1.0, reps)
            err = gb.rel_err(o, r["refs"][(B, ctx)])
            if not err <= TUNE_TOL:
                raise AssertionError(f"fp8 tuning: the bf16 cache's output B={B} ctx={ctx}: rel. error {err:.2e}")
            dflt = r["defaults"][(B, ctx)]
            rows.append(dict(batch=B, ctx=ctx, kv_mb_fp8=int(c["lens"].sum()) * 2 * hkv * D / 1e6, bf16_us=s * 1e6,
                             bf16_config=cfg.label(), fp8_default_us=tt[dflt] * 1e6, fp8_default=dflt.label(),
                             fp8_chosen_us=tt[pick] * 1e6, fp8_chosen=pick.label(), candidates=len(tt)))
            x = rows[-1]
            log(f"fp8 tuning B={B} ctx={ctx}: bf16 {x['bf16_us']:.1f} us, fp8 default {x['fp8_default_us']:.1f} us, "
                f"chosen {x['fp8_chosen_us']:.1f} us ({x['fp8_chosen']})")
    rejected = [f"B={B} ctx={ctx} {lab}: {why}" for _, B, ctx, lab, why in r["rejected"]]
    r["cases"].clear()
    r["refs"].clear()
    gb.free_memory(dev)
    return {r["key"]: r["entries"]}, rows, rejected


def install_tuning(entries: dict, rows: list[dict], out: Path, dev) -> Path:
    """The installed table (the shipped one of this GPU, if any) with the fp8 entries added;
    installed in this process and written to OUT/tuning/<the shipped file's name> (to be
    copied into kernels/tuning/)."""
    import copy

    import torch

    from servesim.kernels import decode_attention as da
    from servesim.kernels._common import num_sms

    shipped = da._tuning_for_this_device()
    base = copy.deepcopy(da.get_tuning() or {})
    if not base:
        base = dict(version=da.TUNING_VERSION, device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                    sms=num_sms(dev), entries={}, measurements=[])
    base.setdefault("entries", {}).update(entries)
    base["fp8_made_by"] = "python benchmarks/gpu_kv_fp8.py (" + time.strftime("%Y-%m-%d %H:%M") + ")"
    base["fp8_measurements"] = rows
    da.set_tuning(base)
    path = out / "tuning" / (shipped.name if shipped is not None else "decode_attention_tuning.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(base, indent=1) + "\n")
    return path


def decode_rows(model, spec, dev, shapes, reps: int, timer, graphed) -> tuple[list[dict], dict]:
    """Per shape: bf16-KV and fp8-KV decode iteration seconds (the same random KV in both)."""
    import torch

    from servesim.gpu_backend.kv_pool import KVPool

    bs = BLOCK
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


def accuracy(model, spec, dev, n: int, P: int, steps: int) -> dict:
    """Logits with a bf16 pool and with fp8 pools of unit and of calibrated scales: prefill of
    n prompts of P tokens, then `steps` decode steps fed the same tokens (so all see the same
    inputs). The calibration (`LlamaModel.calibrate_kv_scales`) prefills other prompts."""
    import torch

    from servesim.gpu_backend.kv_pool import KVPool

    g = torch.Generator(device="cpu").manual_seed(1)
    prompts = torch.randint(0, spec.vocab_size, (n, P), generator=g).tolist()
    fed = torch.randint(0, spec.vocab_size, (steps, n), generator=g).tolist()
    calib = torch.randint(0, spec.vocab_size, (max(n // 2, 1), P), generator=g).tolist()
    ks, vs = model.calibrate_kv_scales(calib, BLOCK)
    per = -(-(P + steps + 1) // BLOCK)
    tables = [list(range(i * per, (i + 1) * per)) for i in range(n)]
    F8 = torch.float8_e4m3fn
    pools = {"bf16": dict(dtype=model.dtype), "fp8 unit scales": dict(dtype=F8),
             "fp8 calibrated scales": dict(dtype=F8, k_scales=ks, v_scales=vs)}
    out = {}
    for name, kw in pools.items():
        pool = KVPool(spec.num_layers, n * per, BLOCK, spec.num_kv_heads, spec.head_dim, device=dev, **kw)
        lg = [model.step([(p, 0, t, True) for p, t in zip(prompts, tables)], [], pool).float()]
        for j in range(steps):
            lg.append(model.step([], [(fed[j][i], P + j, tables[i]) for i in range(n)], pool).float())
        out[name] = torch.cat(lg)
        del pool
    a = out["bf16"]
    res = {"prompts": n, "prompt_len": P, "decode_steps": steps, "calibration_prompts": len(calib),
           "k_scales": [min(ks), max(ks)], "v_scales": [min(vs), max(vs)]}
    for name in list(pools)[1:]:
        b = out[name]
        res[name] = {"logit_rel_err": float((b - a).norm() / a.norm()),
                     "logit_cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()),
                     "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}
    return res


def quant_times(spec, dev, rows, reps: int, timer, graphed) -> list[dict]:
    """The fp8 linears' input quantisation kernel at each row count: back to back (the
    calibration sweep's method) and alone (one graph replay between events)."""
    import torch

    from servesim.gpu_backend.profiler import back_to_back_seconds
    from servesim.kernels import ops

    out = []
    cuda = dev.type == "cuda"
    for K in sorted({spec.hidden_size, spec.intermediate_size}):
        for T in rows:
            xs = [torch.randn(T, K, device=dev, dtype=torch.bfloat16 if cuda else torch.float32) for _ in range(8)]
            ops.quant_fp8_rowwise(xs[0])
            best = back_to_back_seconds(lambda r: ops.quant_fp8_rowwise(xs[(r - 1) % len(xs)]), reps, 3, cuda,
                                        spin_cycles=2_000_000)
            alone = timer(graphed(lambda: ops.quant_fp8_rowwise(xs[0]), dev), reps=reps)
            out.append({"k": K, "tokens": T, "back_to_back_s": best, "alone_s": alone,
                        "bytes": T * K * 3 + 4 * T})
            log(f"quant K={K} T={T}: back to back {best * 1e6:.2f} us, alone {alone * 1e6:.2f} us")
    return out


KV_CALIBRATION = REPO / "benchmarks" / "results" / "calibration_h200" / "decode_attention_kv.csv"
CALL = "20261203-1022-h200-sxm"  # the device call whose kernel table the committed calibration file holds


def kernel_calibration(tune_rows: list[dict], source: str) -> list[dict]:
    """The kernel-alone table (section 0's rows) as decode attention calibration rows
    (sim/kv_attention.py): the bf16 cache with its installed config, the fp8 one with the
    chosen (tuned) config, per batch x context."""
    out = []
    for r in tune_rows:
        out.append(dict(kv_dtype="bf16", batch=r["batch"], ctx=r["ctx"], us=r["bf16_us"], config=r["bf16_config"],
                        source=source))
        out.append(dict(kv_dtype="fp8", batch=r["batch"], ctx=r["ctx"], us=r["fp8_chosen_us"],
                        config=r["fp8_chosen"], source=source))
    return out


def sim_ratios(spec, hw_name: str, rows: list[dict], kv_cal: list[dict] | None = None) -> tuple[list[str], dict]:
    """Adds, per row, the simulator's fp8-KV / bf16-KV decode GPU-time ratio: the roofline,
    bytes only and with the fp8 kernel's conversion rate fitted from ``kv_cal`` (the kernel
    alone per KV dtype, sim/kv_attention.py); and (when shipped for this model and GPU) the
    calibrated profile, bytes only, with that conversion rate, and with its kernel table
    (`decode_attention_kernel`, as `sim calibrate` fitted it into the profile; fitted here
    from ``kv_cal`` for a profile without one). Returns (the columns, the fit)."""
    from servesim.sim import kv_attention
    from servesim.sim.calibrate import load_profile
    from servesim.sim.cost_model import RooflineConfig, RooflineCostModel
    from servesim.sim.specs import apply_precision, load_hardware
    from servesim.sim.types import IterationShape

    hw = load_hardware(hw_name)
    bf, f8 = apply_precision(spec, hw, "bf16", "bf16"), apply_precision(spec, hw, "bf16", "fp8")
    fit = {}
    if kv_cal:
        fit["kv_dequant_elements_per_s"] = kv_attention.fit_dequant_rate(kv_cal, spec.num_kv_heads, spec.head_dim)
        for dt in kv_attention.KV_DTYPES:
            fit[f"{dt}_fixed_s"], fit[f"{dt}_s_per_token"] = kv_attention.fit_line(kv_cal, dt)
    bytes_only = {"kv_dequant_elements_per_s": None, "decode_attention_kernel": None}
    models = {"sim roofline (bytes only)": RooflineConfig()}
    if fit:
        models["sim roofline + conversion rate"] = RooflineConfig(
            kv_dequant_elements_per_s=fit["kv_dequant_elements_per_s"])
    prof = REPO / "profiles" / f"{hw_name.split('-')[0]}-{spec.name}.yaml"
    if prof.is_file():
        try:
            pc = load_profile(prof, bf, hw)[0]
            models[f"sim {prof.name} (bytes only)"] = pc.model_copy(update=bytes_only)
            if fit:
                models[f"sim {prof.name} + conversion rate"] = pc.model_copy(
                    update={**bytes_only, "kv_dequant_elements_per_s": fit["kv_dequant_elements_per_s"]})
            kernel = pc.decode_attention_kernel
            if kernel is None and kv_cal:
                kernel = kv_attention.DecodeAttentionKernel(**kv_attention.fit_kernel(kv_cal, bf.kv_dtype))
            if kernel is not None:
                fit["kernel_table"] = (kernel.source or "fitted here") if pc.decode_attention_kernel else "fitted here"
                models[f"sim {prof.name} + kernel table"] = pc.model_copy(
                    update={**bytes_only, "decode_attention_kernel": kernel})
        except Exception as e:  # noqa: BLE001 - a profile of another model (smoke)
            log(f"profile {prof.name} not used: {e}")
    for r in rows:
        sh = IterationShape(n_decode=r["batch"], decode_kv_sum=r["batch"] * (r["ctx"] + 1), graph=True,
                            padded_decode=r["batch"])
        for lab, c in models.items():
            r[lab] = RooflineCostModel(f8, hw, c).gpu_time(sh) / RooflineCostModel(bf, hw, c).gpu_time(sh)
    return list(models), fit


def decode_section(dec: list[dict], sims: list[str], fit: dict) -> list[str]:
    """The decode-step table with the simulator's columns, the kernel-alone fit they use, and
    the must-show count per column (what `--replay` regenerates)."""
    L = ["| batch | context | bf16 KV ms | fp8 KV ms | fp8 / bf16 measured | " + " | ".join(sims) + " |",
         "|---:|---:|---:|---:|---:|" + "---:|" * len(sims)]
    for r in dec:
        L.append(f"| {r['batch']} | {r['ctx']} | {r['bf16_kv_s'] * 1e3:.3f} | {r['fp8_kv_s'] * 1e3:.3f} | "
                 f"{r['ratio']:.3f} | " + " | ".join(f"{r[s]:.3f} ({r[s] / r['ratio'] - 1:+.1%})" for s in sims)
                 + " |")
    for r in dec:
        if r.get("error"):
            L.append(f"\nbatch {r['batch']}, context {r['ctx']}: {r['error']}")
    L += ["", "(Simulator columns: fp8-KV / bf16-KV of the cost model's GPU time for the same shape; in brackets "
          "its error against the measured ratio. *bytes only*: decode attention priced as its KV bytes over the KV "
          "bandwidth, whatever the dtype; *+ conversion rate*: the larger of that and the KV elements over "
          "`kv_dequant_elements_per_s`, fitted from the decode attention kernel alone per KV dtype; *+ kernel "
          "table*: the profile's `decode_attention_kernel` (`sim calibrate --kv-attention`): its fitted per-token "
          "term stays its bf16 grid's, and the fp8 step pays the kernel-alone fp8 - bf16 difference at its batch "
          "(sim/kv_attention.py). Both from the kernel table below, not from these steps: the steps are the "
          "held-out test.)", ""]
    if fit:
        L += [f"Kernel-alone fit (sim/kv_attention.py, one layer): bf16 {fit['bf16_fixed_s'] * 1e6:.1f} us + "
              f"{fit['bf16_s_per_token'] * 1e9:.3f} ns / cached token, fp8 {fit['fp8_fixed_s'] * 1e6:.1f} us + "
              f"{fit['fp8_s_per_token'] * 1e9:.3f} ns / token (x{fit['fp8_s_per_token'] / fit['bf16_s_per_token']:.2f}"
              f" of bf16's for half the bytes): kv_dequant_elements_per_s = "
              f"{fit['kv_dequant_elements_per_s']:.3g}.", ""]
    if fit and fit.get("kernel_table"):
        L += [f"Kernel table of the profile: per measured batch, one layer's line per KV dtype (from "
              f"`{fit['kernel_table']}`).", ""]
    for sname in sims:
        errs = [abs(r[sname] / r["ratio"] - 1) for r in dec if r["ratio"] == r["ratio"]]
        if errs:
            L.append(f"{sname}: within 5% of the measured ratio at {sum(e <= 0.05 for e in errs)} of {len(errs)} "
                     f"shapes (worst {max(errs):.1%}).")
    L.append("")
    return L


def report(path: Path, argv, dev_name, hw, dec, sims, acc, quant, wall, tune_rows=(), rejected=(),
           table_path=None, fit=None) -> None:
    import torch

    L = ["# fp8 KV cache vs bf16 on one GPU: the decode iteration, and the simulator's ratio", "",
         f"`python benchmarks/gpu_kv_fp8.py {' '.join(argv)}` on {dev_name} (hardware spec {hw}), torch "
         f"{torch.__version__}, {platform.node()}, {time.strftime('%Y-%m-%d %H:%M')}; {wall:.0f} s.", "",
         "Model weights bf16 (random); the KV pool bf16 or e4m3 with per-tensor scales 1.0 (the same random "
         f"keys and values in both; {BLOCK}-token blocks), written by the RoPE + KV-write kernel, read by the paged "
         "decode attention kernel with the installed tuning (the shipped table's bf16 entries; the fp8 entries "
         "tuned below in this run" + (")" if tune_rows else ": not run here, the byte-sized defaults)")
         + ". Decode iteration: CUDA-graph replay of `forward_decode`, every request at the context shown.",
         ""]
    L += decode_section(dec, sims, fit)
    if tune_rows:
        L += ["## The decode attention kernel alone: fp8 tuning, and fp8 / bf16", "",
              "Paged decode attention of the model's shapes on random mixed-length batches (+-50% of the context), "
              "as CUDA-graph replays over several layers' KV (cold, as in a model); the bf16 cache holds the same "
              "(dequantised e4m3) values with its installed config; the fp8 default is the byte-sized default "
              "config; **chosen**: the tuned fp8 entry for that batch (best over the contexts), written to "
              f"`{table_path.name if table_path else '-'}` (to be copied into `kernels/tuning/`). Every candidate "
              f"was checked against the torch reference (rel. error <= {TUNE_TOL:.0e}) before timing and after.", "",
              "| batch | context | fp8 KV MB | bf16 us | bf16 config | fp8 default us | fp8 chosen us | "
              "fp8 / bf16 | chosen config | candidates |", "|---:|---:|---:|---:|---|---:|---:|---:|---|---:|"]
        for r in tune_rows:
            L.append(f"| {r['batch']} | {r['ctx']} | {r['kv_mb_fp8']:.0f} | {r['bf16_us']:.1f} | `{r['bf16_config']}` | "
                     f"{r['fp8_default_us']:.1f} | {r['fp8_chosen_us']:.1f} | {r['fp8_chosen_us'] / r['bf16_us']:.3f} | "
                     f"`{r['fp8_chosen']}` | {r['candidates']} |")
    if rejected:
        L += ["", f"{len(rejected)} fp8 tuning candidate(s) rejected (compile or check): " + "; ".join(rejected[:8])]
    if tune_rows:
        L += ["", "Labels: S max splits / T min tokens per split / N tile tokens / w warps / st stages / fused / hm "
              "(head-major) / f16 (the fp8 cache's dots in fp16).", ""]
    if acc:
        L += ["## Accuracy (random weights: not a real model)", "",
              f"{acc['prompts']} prompts of {acc['prompt_len']} tokens, prefill then {acc['decode_steps']} decode "
              f"steps fed the same tokens, last-position logits against the bf16 KV cache's. Calibrated scales: "
              f"per layer, amax x 2 / 448 of the keys / values of {acc['calibration_prompts']} other prompts' "
              f"prefill (k {acc['k_scales'][0]:.3g}..{acc['k_scales'][1]:.3g}, v {acc['v_scales'][0]:.3g}.."
              f"{acc['v_scales'][1]:.3g}).", "",
              "| KV cache | logit rel. error | cosine | top-1 agreement |", "|---|---:|---:|---:|"]
        for k, v in acc.items():
            if isinstance(v, dict):
                L.append(f"| {k} | {v['logit_rel_err']:.4f} | {v['logit_cosine']:.5f} | {v['top1_agreement']:.0%} |")
        L += ["", "(A random model's logits are near-flat and its residual stream chaotic over many layers: small "
              "KV perturbations move them far more than a trained model's; read these as the kernels agreeing, "
              "not as a quality figure.)", ""]
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
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: tuning,accuracy,quant")
    ap.add_argument("--tuning-s", type=float, default=60.0, help="the fp8 tuning's time allowance (s)")
    ap.add_argument("--replay", metavar="CSV", help="no GPU: regenerate the simulator's columns of a committed "
                    "table from its csv (the md beside it, OUT ignored)")
    ap.add_argument("--kv-calibration", default=str(KV_CALIBRATION),
                    help="--replay: the decode attention kernel's calibration file (sim/kv_attention.py)")
    ap.add_argument("--hardware", default="h200-sxm", help="--replay: the hardware spec of the measurements")
    ap.add_argument("--rebuild-tuning", metavar="CSV", help="no GPU: write the fp8 decode-attention entries of "
                    "kernels/tuning/h200.json from a call's csv (its chosen labels)")
    args = ap.parse_args(argv)
    if args.rebuild_tuning:
        rebuild_tuning(Path(args.rebuild_tuning), REPO / "kernels" / "tuning" / "h200.json", args.model)
        return 0
    if args.replay:
        c = Path(args.replay)
        return replay(c, c.with_suffix(".md"), Path(args.kv_calibration), args.model, args.hardware, argv)
    import torch

    if args.smoke and not torch.cuda.is_available():  # the tuning's kernels in Triton's interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")

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
    tune_rows, rejected, table_path = [], [], None
    if "tuning" not in skip:
        t1 = time.perf_counter()
        try:  # one device call: a failed tuning is reported, the timings still run (default fp8 configs)
            entries, tune_rows, rejected = fp8_tuning(spec, dev, BLOCK if not args.smoke else 16, args.smoke,
                                                      args.tuning_s)
            table_path = install_tuning(entries, tune_rows, out, dev)
            log(f"fp8 tuning: {time.perf_counter() - t1:.0f} s, wrote {table_path}")
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            rejected = [f"the fp8 tuning failed: {type(e).__name__}: {str(e)[:300]}"]
            log(rejected[0])
    dec, pools = decode_rows(model, spec, dev, shapes, args.reps, timer, graphed)
    del pools
    acc = {}
    if "accuracy" not in skip:
        try:
            acc = accuracy(model, spec, dev, *acc_n)
        except Exception as e:  # noqa: BLE001 - reported, the rest still runs
            log(f"accuracy failed: {type(e).__name__}: {e}")
    if acc:
        log(f"accuracy: {acc}")
    quant = quant_times(spec, dev, rows, args.reps, timer, graphed) if "quant" not in skip else []
    kv_cal = kernel_calibration(tune_rows, f"python benchmarks/gpu_kv_fp8.py {' '.join(argv)} on {device_name()} "
                                f"({time.strftime('%Y-%m-%d %H:%M')}): the kernel-alone table")
    if kv_cal:
        from servesim.sim import kv_attention

        kv_attention.write_table(out / "decode_attention_kv.csv", kv_cal)
    try:
        sims, fit = sim_ratios(spec, hw_name, dec, kv_cal or None)
    except ValueError as e:  # a smoke's or a cut-short tuning's table too small to fit
        log(f"kv fit not used: {e}")
        sims, fit = sim_ratios(spec, hw_name, dec)
    wall = time.perf_counter() - t0
    report(out / "gpu_kv_fp8.md", argv, device_name(), hw_name, dec, sims, acc, quant, wall, tune_rows, rejected,
           table_path, fit)
    rec = [{"what": "decode", **r} for r in dec] + [{"what": "quant", **q} for q in quant]
    rec += [{"what": "tuning", **r} for r in tune_rows]
    rec += [{"what": f"accuracy {k}", **v} for k, v in acc.items() if isinstance(v, dict)]
    keys: list[str] = []
    for r in rec:
        keys.extend(k for k in r if k not in keys)
    with open(out / "gpu_kv_fp8.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rec)
    pack(out)
    log(f"wrote {out / 'gpu_kv_fp8.md'} ({wall:.0f} s)")
    return 0


KEEP = ("gpu_kv_fp8.md", "gpu_kv_fp8.csv")
PACK = "gpu_kv_fp8_files.tar.xz"


def pack(out: Path) -> Path | None:
    """Everything under ``out`` but the table and the csv into one archive (the tuning table,
    the calibration file): the device tool returns a few files only, so a call writes three."""
    import tarfile

    rest = sorted(p for p in out.rglob("*") if p.is_file() and p.name not in (*KEEP, PACK))
    if not rest:
        return None
    with tarfile.open(out / PACK, "w:xz") as tf:
        for p in rest:
            tf.add(p, arcname=str(p.relative_to(out)))
    for p in rest:
        p.unlink()
    for d in sorted((d for d in out.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
        if not any(d.iterdir()):
            d.rmdir()
    return out / PACK


def _num(v: str):
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f


def read_results(path: Path) -> tuple[list[dict], list[dict]]:
    """The decode-step rows and the kernel-alone rows of a gpu_kv_fp8.csv."""
    with open(path, newline="") as fh:
        rec = list(csv.DictReader(fh))
    keep = lambda r, ks: {k: _num(r[k]) for k in ks}  # noqa: E731
    dec = [keep(r, ("batch", "ctx", "bf16_kv_s", "fp8_kv_s", "ratio")) for r in rec if r["what"] == "decode"]
    tune = [keep(r, ("batch", "ctx", "kv_mb_fp8", "bf16_us", "bf16_config", "fp8_default_us", "fp8_default",
                     "fp8_chosen_us", "fp8_chosen", "candidates")) for r in rec if r["what"] == "tuning"]
    return dec, tune


def _rel(p: Path) -> str:
    p = Path(p).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def rebuild_tuning(csv_path: Path, table_path: Path, model: str, block: int = BLOCK, sms: int = 132) -> dict:
    """The fp8 entries of a device call's tuning table rebuilt from its csv (the chosen config's
    label per batch, `DecodeConfig.from_label`) into the shipped table ``table_path`` (its
    other entries untouched), when the call's table did not come back."""
    import torch

    from servesim.kernels import decode_attention as da
    from servesim.sim.specs import load_model

    spec = load_model(model)
    _, tune = read_results(csv_path)
    picks: dict[int, str] = {}
    for r in tune:
        if picks.setdefault(r["batch"], r["fp8_chosen"]) != r["fp8_chosen"]:
            raise ValueError(f"{csv_path}: batch {r['batch']} has two chosen fp8 configs")
    if not picks:
        raise ValueError(f"{csv_path}: no tuning rows")
    key = da.tuning_key(torch.bfloat16, spec.num_heads // spec.num_kv_heads, spec.num_kv_heads, spec.head_dim,
                        block, sms, torch.float8_e4m3fn)
    table = json.loads(table_path.read_text())
    table.setdefault("entries", {})[key] = [dict(batch=b, config=da.DecodeConfig.from_label(lab, fp8=True).to_dict())
                                            for b, lab in sorted(picks.items())]
    table["fp8_made_by"] = (f"python benchmarks/gpu_kv_fp8.py --out /root/out/kv --tuning-s 50 (call {CALL}, "
                            f"2026-12-03 10:22); its table did not come back (the device tool's file limit): the "
                            f"entries rebuilt from the chosen labels of {csv_path.name} by `python "
                            f"benchmarks/gpu_kv_fp8.py --rebuild-tuning {_rel(csv_path)}`")
    table["fp8_measurements"] = tune
    da.set_tuning(table)  # checks it
    da.set_tuning(None)
    table_path.write_text(json.dumps(table, indent=1) + "\n")
    return table


def replay(csv_path: Path, md_path: Path, kv_cal_path: Path, model: str, hw_name: str, argv) -> int:
    """The simulator's columns of a committed table regenerated on a CPU from its csv (the
    measured columns as they were; the kernel calibration file ``kv_cal_path``, written from
    the csv's kernel table when missing), spliced into ``md_path`` in place of its decode
    table; the csv's sim columns rewritten."""
    from servesim.sim import kv_attention
    from servesim.sim.specs import load_model

    dec, tune = read_results(csv_path)
    if not kv_cal_path.is_file():
        kv_attention.write_table(kv_cal_path, kernel_calibration(
            tune, f"benchmarks/gpu_kv_fp8.py's kernel-alone table of call {CALL} ({csv_path.name}; raw files "
                  f"benchmarks/results/archives/{CALL}.tar.xz, members kv/*)"))
    kv_cal = kv_attention.read_table(kv_cal_path)
    sims, fit = sim_ratios(load_model(model), hw_name, dec, kv_cal)
    text = md_path.read_text()
    a = text.index("| batch | context | bf16 KV ms")
    b = text.index("## The decode attention kernel alone")
    head = text[:a]
    note = (f"Simulator columns regenerated on a CPU from the measurements: `python benchmarks/gpu_kv_fp8.py "
            f"{' '.join(argv)}` (the kernel calibration: `{_rel(kv_cal_path)}`).\n\n")
    if "Simulator columns regenerated" in head:
        head = head[:head.index("Simulator columns regenerated")]
    md_path.write_text(head + note + "\n".join(decode_section(dec, sims, fit)) + "\n" + text[b:])
    with open(csv_path, newline="") as fh:
        rec = list(csv.DictReader(fh))
    sim_rows = {(r["batch"], r["ctx"]): r for r in dec}
    keys = [k for k in rec[0] if not k.startswith("sim ")]
    keys = keys[:keys.index("ratio") + 1] + sims + keys[keys.index("ratio") + 1:]
    for r in rec:
        for k in [k for k in r if k.startswith("sim ")]:
            del r[k]
        if r["what"] == "decode":
            r.update({s: sim_rows[(int(r["batch"]), int(r["ctx"]))][s] for s in sims})
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rec)
    for s in sims:
        errs = [abs(r[s] / r["ratio"] - 1) for r in dec]
        log(f"{s}: {sum(e <= 0.05 for e in errs)} of {len(errs)} within 5% (worst {max(errs):.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
