"""The parts of a speculative drafting iteration timed apart on one GPU: is the
verification's unhidden piecewise launch serial GPU-side time, or host launch that the
drafter's GPU work could hide? And what does one of the drafter's graph steps cost back to
back, against a standalone one (what a calibration grid measures)?

For Llama-3.1-8B (target) and Llama-3.2-1B (drafter), random bf16 weights, at batch b in
{1, 8, 32} and k in {2, 4} (every request ~320 cached tokens, as in gpu_spec_decoding.py):

* the 8B's verification of 1 + k tokens per request, one context chunk each, through the
  piecewise graphs (the GPU backend's decode-only verification) and eagerly (beside
  context chunks with piecewise graphs off);
* the 1B drafter's decode step through its CUDA graph (with the argmax the drafter samples
  with), and the 8B's plain decode step through its graph;

each timed two ways: *standalone* (host clock from the launch to the sync: a calibration
grid point's launch-to-sync time) and *ahead* (CUDA events around the same launches queued
behind a GPU spin long enough for the host to launch all of it: what the pass costs the GPU
when the host has a head start, as after the drafter's steps). The drafter's step is also
timed as k back-to-back replays behind the spin (per step). ``standalone - ahead`` is the
part a head start hides; the simulator (sim/speculation.py `verify_segment`) takes the
piecewise verification's unhidden launch as serial (ahead ~ standalone) and the drafter's
steps at their GPU time. With --profile / --draft-profile the table sets the simulator's
parts beside the measurements.

Every pass's logits are checked against the eager forward (torch) before timing.

    python benchmarks/gpu_spec_split.py --out $OUT \\
        --profile profiles/h200-llama-3.1-8b.yaml --draft-profile profiles/h200-llama-3.2-1b.yaml  # one H200, ~2 min
    python benchmarks/gpu_spec_split.py --smoke --out DIR          # CPU, tiny models (~10 s)

Writes OUT/gpu_spec_split.md (the table, the command, the device) and OUT/gpu_spec_split.csv.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from gpu_spec_decoding import TINY, TINY_DRAFT  # noqa: E402

FIELDS = ["part", "batch", "k", "tokens", "standalone_ms", "ahead_ms", "hidden_ms", "sim_gpu_ms",
          "sim_standalone_ms", "sim_span_ms", "max_rel_logit_diff"]


def _sync(cuda: bool) -> None:
    import torch

    if cuda:
        torch.cuda.synchronize()


def standalone_s(call, reps: int, cuda: bool) -> float:
    """Median host seconds from the launch of ``call()`` to the sync after it."""
    out = []
    for _ in range(reps):
        _sync(cuda)
        t0 = time.perf_counter()
        call()
        _sync(cuda)
        out.append(time.perf_counter() - t0)
    return float(np.median(out))


def ahead_s(call, reps: int, cuda: bool, spin_cycles: int, times: int = 1) -> float:
    """Median GPU seconds of ``times`` calls launched behind a GPU spin (the host ahead of the
    GPU: nothing the host does delays it), per call; on a CPU the standalone wall time."""
    import torch

    if not cuda:
        return standalone_s(lambda: [call() for _ in range(times)], reps, cuda) / times
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(spin_cycles)
        a.record()
        for _ in range(times):
            call()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3 / times)
    return float(np.median(out))


def _rel(a, b) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"logits of shape {tuple(a.shape)} against the eager forward's {tuple(b.shape)}")
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def verify_meta(b: int, k: int, cached: int, block: int, vocab: int, device):
    """One verification: b requests, each a context chunk of 1 + k tokens after ``cached``
    tokens of KV (blocks of its own), its last position sampled."""
    from servesim.gpu_backend.model import ContextChunkInput, build_attn_metadata

    rng = np.random.default_rng(b * 10 + k)
    per = -(-(cached + k + 1) // block)
    chunks = [ContextChunkInput([int(t) for t in rng.integers(0, vocab, 1 + k)], cached,
                                list(range(r * per, (r + 1) * per))) for r in range(b)]
    return build_attn_metadata(chunks, [], block, device), per


def _cost_model(profile: str, model_name: str):
    """The calibrated cost model of ``model_name`` on the H200, without the scheduler's terms
    (the passes here are timed without the engine)."""
    from servesim.sim.calibrate import load_profile
    from servesim.sim.cost_model import RooflineCostModel
    from servesim.sim.specs import load_hardware, load_model

    model, hw = load_model(model_name), load_hardware("h200-sxm")
    roof, _ = load_profile(Path(profile), model, hw)
    roof = roof.model_copy(update=dict(scheduler_overhead_s=0.0, scheduler_overhead_per_request_s=0.0,
                                       scheduler_overhead_per_context_token_s=0.0))
    return RooflineCostModel(model, hw, roof, cuda_graphs=True)


def sim_parts(profile: str, model_name: str, b: int, k: int, cached: int,
              piecewise: bool) -> tuple[float, float, float]:
    """The simulator's (GPU seconds, standalone seconds without the scheduler, span after the
    drafter: `verify_segment`) of the same verification."""
    from servesim.policies.graph_padding import GraphPadding
    from servesim.sim.speculation import launch_and_gpu, verify_segment
    from servesim.sim.types import IterationShape

    cm = _cost_model(profile, model_name)
    T = b * (1 + k)
    vs = IterationShape(ctx_new_tokens=(1 + k,) * b, ctx_prior_tokens=(cached,) * b, n_ctx_sampling=T,
                        piecewise_tokens=GraphPadding([T]).padded(T) if piecewise else 0)
    (_, span), _ = verify_segment(cm, vs)
    return launch_and_gpu(cm, vs)[1], cm.price(vs), span


def sim_decode(profile: str, model_name: str, b: int, kv: int) -> tuple[float, float]:
    """The simulator's (GPU seconds, standalone seconds without the scheduler) of a graph decode step."""
    from servesim.sim.speculation import launch_and_gpu
    from servesim.sim.types import IterationShape

    cm = _cost_model(profile, model_name)
    s = IterationShape(n_decode=b, decode_kv_sum=b * (kv + 1), graph=True, padded_decode=b)
    _, gpu, _ = launch_and_gpu(cm, s)
    return gpu, cm.price(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models, few repetitions")
    ap.add_argument("--profile", help="the 8B's calibration profile (the simulator's parts beside)")
    ap.add_argument("--draft-profile", help="the 1B's calibration profile")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--ks", default="2,4")
    ap.add_argument("--cached", type=int, default=320)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--spin-cycles", type=int, default=40_000_000, help="GPU spin before each 'ahead' window "
                    "(~20-25 ms on an H200: longer than any pass's host launch here)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip the cases that would start after this")
    args = ap.parse_args()
    import torch

    from servesim.gpu_backend.graph_runner import GraphRunner
    from servesim.gpu_backend.model import LlamaModel
    from servesim.gpu_backend.piecewise_runner import PiecewiseRunner

    t_start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.smoke
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    batches = [int(x) for x in args.batches.split(",")]
    ks = [int(x) for x in args.ks.split(",")]
    reps = 3 if args.smoke else args.reps
    if args.smoke:
        batches, ks = [1, 4], [2]
    if cuda:
        from servesim.sim.specs import load_model

        tspec, dspec = load_model("llama-3.1-8b"), load_model("llama-3.2-1b")
    else:
        tspec, dspec = TINY, TINY_DRAFT
    block = 32 if cuda else 16
    target = LlamaModel(tspec, None, dtype=dtype, device=dev, seed=1)
    drafter = LlamaModel(dspec, None, dtype=dtype, device=dev, seed=2)
    vocab = target.dims.vocab_size
    per = -(-(args.cached + max(ks) + 1) // block)
    nblocks = max(batches) * per + 1
    tpool, dpool = target.make_kv_pool(nblocks, block), drafter.make_kv_pool(nblocks, block)
    for p in (tpool, dpool):
        p.kv.normal_(std=0.5)  # the cached prefixes: KV of earlier steps
    sizes = sorted({b * (1 + k) for b in batches for k in ks})
    pw = PiecewiseRunner(target, tpool, sizes)
    pw.capture()
    dg = GraphRunner(drafter, dpool, batches, per)
    tg = GraphRunner(target, tpool, batches, per)
    dg.capture()
    tg.capture()
    rows = []
    with torch.no_grad():
        for b in batches:
            if time.perf_counter() - t_start > args.budget_s:
                print(f"budget: batch {b} skipped", file=sys.stderr)
                continue
            # decode steps (the drafter's, with its argmax; the target's plain step)
            pos = torch.full((b,), args.cached, dtype=torch.int64, device=dev)
            bt = torch.arange(b * per, dtype=torch.int32, device=dev).view(b, per)
            seq = (pos + 1).to(torch.int32)
            slot = (bt[:, args.cached // block].to(torch.int64) * block + args.cached % block)
            ids = torch.randint(0, vocab, (b,), device=dev)
            for name, runner, model, pool, prof, mname in (
                    ("drafter (1B) graph step + argmax", dg, drafter, dpool, args.draft_profile, "llama-3.2-1b"),
                    ("target (8B) plain graph decode step", tg, target, tpool, args.profile, "llama-3.1-8b")):
                want = model.forward_decode(ids, pos, bt, seq, slot, pool)
                got = runner.run(ids, pos, bt, seq, slot)
                err = _rel(got, want)
                assert err < (3e-2 if cuda else 1e-4), f"{name} at batch {b}: logits off the eager forward by {err}"

                def step(r=runner):
                    return r.run(ids, pos, bt, seq, slot).argmax(dim=-1)

                st, ah = standalone_s(step, reps, cuda), ahead_s(step, reps, cuda, args.spin_cycles)
                rec = {"part": name, "batch": b, "k": "", "tokens": b, "standalone_ms": 1e3 * st,
                       "ahead_ms": 1e3 * ah, "hidden_ms": 1e3 * (st - ah), "max_rel_logit_diff": err}
                if runner is dg:
                    rec4 = dict(rec, part=name + ", 4 back to back (per step)", hidden_ms="",
                                standalone_ms="", ahead_ms=1e3 * ahead_s(step, reps, cuda, args.spin_cycles, 4))
                if prof and cuda:
                    g, p = sim_decode(prof, mname, b, args.cached)
                    rec.update(sim_gpu_ms=1e3 * g, sim_standalone_ms=1e3 * p, sim_span_ms=1e3 * g)
                rows.append(rec)
                if runner is dg:
                    rows.append(rec4)
            for k in ks:
                meta, _ = verify_meta(b, k, args.cached, block, vocab, dev)
                T = b * (1 + k)
                want = target.forward(meta.input_ids, meta.positions, tpool, meta)
                got = pw.run(meta.input_ids, meta.positions, meta, pw.padded_size(T))
                err = _rel(got, want)
                assert err < (3e-2 if cuda else 1e-4), f"verification b={b} k={k}: logits off the eager forward: {err}"

                def piecewise_pass(m=meta, t=T):
                    return pw.run(m.input_ids, m.positions, m, pw.padded_size(t))

                def eager_pass(m=meta):
                    return target.forward(m.input_ids, m.positions, tpool, m)

                for name, call, piecewise in (("target (8B) verification, piecewise graphs", piecewise_pass, True),
                                              ("target (8B) verification, eager", eager_pass, False)):
                    st, ah = standalone_s(call, reps, cuda), ahead_s(call, reps, cuda, args.spin_cycles)
                    rec = {"part": name, "batch": b, "k": k, "tokens": T, "standalone_ms": 1e3 * st,
                           "ahead_ms": 1e3 * ah, "hidden_ms": 1e3 * (st - ah), "max_rel_logit_diff": err}
                    if args.profile and cuda:
                        g, p, span = sim_parts(args.profile, "llama-3.1-8b", b, k, args.cached, piecewise)
                        rec.update(sim_gpu_ms=1e3 * g, sim_standalone_ms=1e3 * p, sim_span_ms=1e3 * span)
                    rows.append(rec)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "gpu_spec_split.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    device = torch.cuda.get_device_name() if cuda else "CPU (smoke: tiny models in place of the 8B and the 1B)"

    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else (str(v) if v != "" else "-")

    lines = ["# Speculative drafting iteration, its parts timed apart\n",
             f"Command: `python benchmarks/gpu_spec_split.py {' '.join(sys.argv[1:])}`; device {device}; "
             f"{args.cached} cached tokens per request, {reps} repetitions (medians); "
             f"{time.perf_counter() - t_start:.0f} s.\n",
             "standalone: host clock from the launch to the sync (a grid point's launch-to-sync time); ahead: "
             "CUDA events around the same launches queued behind a GPU spin (the host has a head start); hidden = "
             "standalone - ahead: what a head start (the drafter's GPU work) can hide. sim: the calibrated "
             "simulator's GPU time, standalone price (no scheduler) and span after the drafter (verify_segment).\n",
             "| part | batch | k | tokens | standalone ms | ahead ms | hidden ms | sim GPU ms | sim standalone ms "
             "| sim span ms | logits vs eager |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(k, "")) for k in FIELDS[:10]) +
                     f" | {r['max_rel_logit_diff']:.1e} |")
    text = "\n".join(lines) + "\n"
    (args.out / "gpu_spec_split.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
