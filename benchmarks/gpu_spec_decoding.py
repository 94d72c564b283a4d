"""Speculative decoding measured on one GPU beside the simulator's replay of the same runs.

Llama-3.1-8B target and Llama-3.2-1B drafter (random weights, bf16) on the machine's GPU
(an H200: the hardware spec is picked from the device), controlled acceptance (the real
drafting and verification run; position i is accepted with probability alpha given the
earlier ones, drawn as the simulator draws it), alpha in {0.5, 0.7, 0.9}, k in {2, 4},
batch in {1, 8, 32}: offline, every batch slot busy, prompts of 256 tokens, 128 output
tokens, each case beside plain decoding at the same batch. Every GPU run is then replayed
on the simulator (``workload: {replay: RUN}``, the GPU run's own config otherwise: roofline
cost model, or the calibration profiles given with --profile / --draft-profile), and the
speedups are set side by side:

* TPOT speedup = plain TPOT p50 / speculative TPOT p50,
* throughput speedup = speculative / plain output tokens per second,

each from runs of the same requests on the same GPU (or the same simulated one).

    python benchmarks/gpu_spec_decoding.py --out $OUT                # one device call (~5-8 min)
    python benchmarks/gpu_spec_decoding.py --smoke --out DIR          # CPU, tiny shapes (~20 s)

Writes OUT/gpu_spec_decoding.md (the table, the command, the device), OUT/gpu_spec_decoding.csv
(one row per run) and OUT/gpu_spec_decoding_runs.tar.gz (the GPU runs, runs/<case>/, run
folders as `sim run` writes them: three files in OUT, as a device call brings back). All three
are rewritten after every case, so a call cut short keeps what it measured; --budget-s
skips the cases that would start after it.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "intermediate_size": 128, "vocab_size": 256, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False,
}
TINY_DRAFT = dict(TINY, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=64)

FIELDS = ["case", "proposer", "alpha", "k", "batch", "requests", "gpu_tpot_p50_s", "gpu_tok_s", "gpu_iterations",
          "gpu_acceptance", "gpu_tokens_per_step", "sim_tpot_p50_s", "sim_tok_s", "sim_iterations", "sim_acceptance",
          "same_acceptances", "gpu_wall_s"]


def _csv_list(s: str, conv=float) -> list:
    return [conv(x) for x in s.split(",") if x.strip()]


def run_config(args, batch: int, spec: dict | None, hardware: str) -> dict:
    """The GPU run's config (a RunConfig dict)."""
    n = max(args.min_requests, args.waves * batch)
    pool = max(4096, batch * (args.prompt_len + args.output_len + 64) * 2)
    return {
        "seed": args.seed, "model": args.model, "hardware": hardware,
        "kv_cache": {"pool_tokens": pool, "tokens_per_block": args.tokens_per_block},
        "workload": {"synthetic": {"num_requests": n, "prompt_len": args.prompt_len, "output_len": args.output_len,
                                   "arrival": {"kind": "offline"}}},
        "scheduler": {"max_batch_size": batch, "max_num_tokens": max(2048, batch * args.prompt_len)},
        "speculative": spec,
        "output": {"plots": False, "timeline": False},
    }


def sim_replay(gpu_cfg: dict, run_dir: Path, profile: str | None, draft_profile: str | None) -> dict:
    """The simulator on the GPU run's config, replaying its requests."""
    from servesim.sim.config import RunConfig
    from servesim.sim.runner import resolve, simulate

    d = json.loads(json.dumps(gpu_cfg))
    d["workload"] = {"replay": str(run_dir)}
    if profile:
        d["cost_model"] = {"kind": "calibrated", "profile": str(Path(profile).resolve())}
    if draft_profile and d.get("speculative") and d["speculative"].get("proposer") == "draft_model":
        d["speculative"]["draft_profile"] = str(Path(draft_profile).resolve())
    res = simulate(resolve(RunConfig.model_validate(d), REPO))
    return {"summary": res.summary, "accepted": res.iterations.column("draft_tokens_accepted").to_pylist(),
            "iterations": res.iterations}


def metrics(summary: dict) -> dict:
    return {"tpot": summary["tpot_s"]["p50"], "tok_s": summary["throughput_out_tok_s"],
            "iters": summary["num_iterations"], "acc": summary.get("spec_acceptance_rate"),
            "tps": summary.get("spec_tokens_per_step")}


def _ratio(a, b):
    return a / b if a and b else float("nan")


def write_page(out: Path, rows: list[dict], plain: dict, info: dict) -> None:
    """The table (speculative rows beside their batch's plain run) and the CSV."""
    with open(out / "gpu_spec_decoding.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows + [plain[b] for b in sorted(plain)]:
            w.writerow({k: r.get(k) for k in FIELDS})
    lines = [
        "# Speculative decoding: GPU against the simulator",
        "",
        f"Command: `{info['command']}`  ",
        f"Device: {info['device']}; hardware spec {info['hardware']}; target {info['model']}, drafter "
        f"{info['draft_model']} (random weights, {info['dtype']}); {info['date']}.  ",
        f"Workload: offline, prompts {info['prompt_len']} / outputs {info['output_len']} tokens, "
        f"max(batch x {info['waves']}, {info['min_requests']}) requests; controlled acceptance "
        "(real drafting and verification, acceptance drawn per position as the simulator draws it).  ",
        f"Simulator: the same requests replayed on the GPU run's config ({info['cost_model']}).",
        "",
        "Speedup: plain TPOT p50 / speculative TPOT p50 (TPOT), speculative / plain output tokens/s "
        "(tput), each against plain decoding at the same batch on the same GPU (or simulated GPU). "
        "`same acc.`: the simulator accepted the same drafts in every iteration (the same schedule).",
        "",
        "| proposer | alpha | k | batch | GPU TPOT p50 ms (plain -> spec) | sim TPOT p50 ms (plain -> spec) "
        "| GPU TPOT speedup | sim TPOT speedup | diff | GPU tput speedup | sim tput speedup | diff "
        "| acceptance | tokens/step | same acc. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    diffs = []
    for r in rows:
        p = plain.get(r["batch"])
        if p is None:
            continue
        gt = _ratio(p["gpu_tpot_p50_s"], r["gpu_tpot_p50_s"])
        st = _ratio(p["sim_tpot_p50_s"], r["sim_tpot_p50_s"])
        gr = _ratio(r["gpu_tok_s"], p["gpu_tok_s"])
        sr = _ratio(r["sim_tok_s"], p["sim_tok_s"])
        dt, dr = (st / gt - 1) * 100, (sr / gr - 1) * 100
        diffs += [abs(dt), abs(dr)]
        lines.append(
            f"| {r['proposer']} | {r['alpha']:g} | {r['k']} | {r['batch']} "
            f"| {p['gpu_tpot_p50_s'] * 1e3:.2f} -> {r['gpu_tpot_p50_s'] * 1e3:.2f} "
            f"| {p['sim_tpot_p50_s'] * 1e3:.2f} -> {r['sim_tpot_p50_s'] * 1e3:.2f} "
            f"| {gt:.2f}x | {st:.2f}x | {dt:+.1f}% | {gr:.2f}x | {sr:.2f}x | {dr:+.1f}% "
            f"| {r['gpu_acceptance']:.3f} | {r['gpu_tokens_per_step']:.2f} "
            f"| {'yes' if r['same_acceptances'] else 'no'} |")
    if diffs:
        within = sum(d <= 5 for d in diffs)
        lines += ["", f"Mean |sim/GPU - 1| of the speedups: {sum(diffs) / len(diffs):.1f}%; "
                      f"{within} of {len(diffs)} within 5%."]
    lines += ["", "Plain decoding (the baselines):", "",
              "| batch | requests | GPU TPOT p50 ms | sim TPOT p50 ms | GPU tok/s | sim tok/s |",
              "|---|---|---|---|---|---|"]
    for b in sorted(plain):
        p = plain[b]
        lines.append(f"| {b} | {p['requests']} | {p['gpu_tpot_p50_s'] * 1e3:.2f} | {p['sim_tpot_p50_s'] * 1e3:.2f} "
                     f"| {p['gpu_tok_s']:.0f} | {p['sim_tok_s']:.0f} |")
    if info.get("skipped"):
        lines += ["", f"Skipped (over --budget-s {info['budget_s']:g} s): {', '.join(info['skipped'])}."]
    lines.append("")
    (out / "gpu_spec_decoding.md").write_text("\n".join(lines))


def pack(runs: Path, out: Path) -> None:
    """The GPU runs into OUT/gpu_spec_decoding_runs.tar.gz (written aside, then renamed)."""
    tmp = out / ".gpu_spec_decoding_runs.tar.gz.partial"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(runs, arcname="runs")
    tmp.replace(out / "gpu_spec_decoding_runs.tar.gz")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (the device call's $OUT)")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU, a 2 x 2 x 2 grid")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--draft-model", default="llama-3.2-1b")
    ap.add_argument("--proposers", default="draft_model", help="draft_model and/or ngram, comma-separated")
    ap.add_argument("--alphas", default="0.5,0.7,0.9")
    ap.add_argument("--ks", default="2,4")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--waves", type=int, default=2, help="requests = max(batch x waves, --min-requests)")
    ap.add_argument("--min-requests", type=int, default=4)
    ap.add_argument("--tokens-per-block", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default=None, help="the target's calibration profile for the replays "
                    "(default: the roofline cost model)")
    ap.add_argument("--draft-profile", default=None, help="the drafter's calibration profile for the replays")
    ap.add_argument("--budget-s", type=float, default=540.0, help="start no case after this many seconds")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_spec_decoding_"))  # the runs (packed into OUT) and smoke models
    try:
        return _main(args, ap, argv, out, work, t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _main(args, ap, argv, out: Path, work: Path, t0: float) -> int:
    import torch

    from bench_device import device_name, hardware_here
    from servesim.gpu_backend.runner import simulate_gpu
    from servesim.sim.config import RunConfig
    from servesim.sim.runner import resolve, write_run

    if args.smoke:
        models = work / "models"
        models.mkdir(exist_ok=True)
        (models / "tiny.json").write_text(json.dumps(TINY))
        (models / "tiny-draft.json").write_text(json.dumps(TINY_DRAFT))
        args.model = str((models / "tiny.json").resolve())
        args.draft_model = str((models / "tiny-draft.json").resolve())
        if args.alphas == ap.get_default("alphas"):
            args.alphas = "0.5,0.9"
        if args.batches == ap.get_default("batches"):
            args.batches = "1,4"
        args.prompt_len = min(args.prompt_len, 24)
        args.output_len = min(args.output_len, 16)
        args.tokens_per_block = min(args.tokens_per_block, 16)
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on a CPU", file=sys.stderr)
        return 2
    hardware = hardware_here("h200-sxm")
    alphas, ks = _csv_list(args.alphas), _csv_list(args.ks, int)
    batches, proposers = _csv_list(args.batches, int), [p.strip() for p in args.proposers.split(",") if p.strip()]
    dtype = "bf16" if torch.cuda.is_available() else "fp32"
    info = {"command": "python benchmarks/gpu_spec_decoding.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "device": device_name(), "hardware": hardware, "model": Path(args.model).name,
            "draft_model": Path(args.draft_model).name, "dtype": dtype, "date": time.strftime("%Y-%m-%d"),
            "prompt_len": args.prompt_len, "output_len": args.output_len, "waves": args.waves,
            "min_requests": args.min_requests, "budget_s": args.budget_s, "skipped": [],
            "cost_model": (f"calibrated profile {Path(args.profile).name}" if args.profile else "roofline cost model")
            + (f", drafter profile {Path(args.draft_profile).name}" if args.draft_profile else "")}
    cache: dict = {}  # the models, built once for every run
    rows: list[dict] = []
    plain: dict[int, dict] = {}

    def one(case: str, batch: int, spec: dict | None) -> dict | None:
        if time.perf_counter() - t0 > args.budget_s:
            info["skipped"].append(case)
            return None
        cfg = run_config(args, batch, spec, hardware)
        t = time.perf_counter()
        res = simulate_gpu(resolve(RunConfig.model_validate(cfg), REPO), model_cache=cache)
        wall = time.perf_counter() - t
        run_dir = work / "runs" / case
        write_run(res, run_dir, "gpu_spec_decoding", case)
        pack(work / "runs", out)
        sim = sim_replay(cfg, run_dir, args.profile, args.draft_profile)
        g, s = metrics(res.summary), metrics(sim["summary"])
        gacc = res.iterations.column("draft_tokens_accepted").to_pylist()
        row = {"case": case, "proposer": spec["proposer"] if spec else "plain",
               "alpha": spec["acceptance"] if spec else None, "k": spec["max_draft_len"] if spec else 0,
               "batch": batch, "requests": res.summary["num_requests"], "gpu_tpot_p50_s": g["tpot"],
               "gpu_tok_s": g["tok_s"], "gpu_iterations": g["iters"], "gpu_acceptance": g["acc"],
               "gpu_tokens_per_step": g["tps"], "sim_tpot_p50_s": s["tpot"], "sim_tok_s": s["tok_s"],
               "sim_iterations": s["iters"], "sim_acceptance": s["acc"], "same_acceptances": gacc == sim["accepted"],
               "gpu_wall_s": round(wall, 2)}
        print(f"[{time.perf_counter() - t0:6.1f} s] {case}: GPU TPOT p50 {g['tpot'] * 1e3:.2f} ms, "
              f"{g['tok_s']:.0f} tok/s; sim {s['tpot'] * 1e3:.2f} ms, {s['tok_s']:.0f} tok/s", flush=True)
        return row

    for batch in batches:
        r = one(f"plain-b{batch}", batch, None)
        if r is None:
            continue
        plain[batch] = r
        write_page(out, rows, plain, info)
        for proposer in proposers:
            for k in ks:
                for alpha in alphas:
                    spec = {"proposer": proposer, "max_draft_len": k, "acceptance": alpha,
                            "gpu_acceptance": "controlled"}
                    if proposer == "draft_model":
                        spec["draft_model"] = args.draft_model
                    r = one(f"{proposer}-a{alpha:g}-k{k}-b{batch}", batch, spec)
                    if r is not None:
                        rows.append(r)
                        write_page(out, rows, plain, info)
    write_page(out, rows, plain, info)
    print(f"wrote {out / 'gpu_spec_decoding.md'} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
