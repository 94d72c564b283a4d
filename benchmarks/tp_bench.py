"""Tensor parallelism on the GPU backend (issue S6b), in one device call: NCCL all-reduce time by
message size beside the cost model's all-reduce term, and decode iterations of Llama-3.1-8B
(real shapes, random weights; with two GPUs also the 70B-shaped Llama-3.1-70B at TP=2, where
one GPU's shard fits) at TP=1 and, with two or more GPUs, TP=2 -- ms per iteration, share of
the roofline, TP=2/TP=1 speedup, and the simulator's predicted time beside each.

    # one H200 (the TP=1 half, Llama-3.1-8B only; ~1.5 minutes):
    NCCL_NVLS_ENABLE=0 python3 benchmarks/tp_bench.py --out $OUT
    # two H200s (both halves; TP=2 is the default with two GPUs):
    NCCL_NVLS_ENABLE=0 python3 benchmarks/tp_bench.py --out $OUT
    # anywhere: tiny shapes, gloo, 2 CPU processes (tests/test_gpu_tp.py runs it)
    python benchmarks/tp_bench.py --smoke --out /tmp/tp_bench

What is measured, in order (correctness first):

1. ceilings: device-to-device copy bandwidth (bytes read + written) on GPU 0, this run;
2. a check: the logits of one prefill and one decode step of the TP=2 model (rank 0)
   equal the TP=1 model's on the same random weights (`gpu_backend/tp.py`), before any
   timing (bf16 on GPUs: relative error <= 5e-2, argmax agreement shown; fp32 on a CPU:
   1e-5); a failed check is reported in the table and makes the exit status 1;
3. all-reduce (``torch.distributed.all_reduce`` of bf16 tensors, NCCL; gloo in the smoke
   run) of the sizes one layer's all-reduce has in a decode step (batch x hidden x 2 bytes,
   batch 1-256) and in a prefill step (512-8192 tokens): the median of 20 calls, each
   between a barrier and two CUDA events (`tp.time_allreduce`), beside the cost model's term for that message
   (`all-reduce model`: `cost_model.allreduce_seconds` if the cost model has it, else
   ``allreduce_latency_s + 2 (tp-1)/tp * bytes / (nvlink_bytes_per_s *
   allreduce_bandwidth_efficiency)`` from its `RooflineConfig`: the table says which);
4. decode iterations: the executor's decode path (`GraphRunner`, a CUDA graph per batch
   with the collectives captured inside; `TPGraphRunner` on every rank at TP=2) over a paged
   KV cache with lengths uniform in +-50% of the context, batch 1/16/64/256 x context
   1k/4k. Share = bytes one GPU reads (its weights -- of the replicated embedding only the
   gathered rows, of the vocab-parallel lm_head its rows -- and its KV heads' cache) / copy
   bandwidth / time. Predicted: `RooflineCostModel(..., tp=...)` (the hardware spec of the
   GPU, or ``--hardware``; with ``--profile`` a calibrated one) pricing the same decode-only
   graph iteration's GPU time (`gpu_time`) and whole price (`price`, host terms included).

Writes OUT/tp_bench.md, OUT/tp_allreduce.csv, OUT/tp_decode.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing (servesim/__init__.py)
sys.path.insert(0, str(REPO / "benchmarks"))

# NVLink multicast stays off (the device rules: it can take the host's shared GPUs down)
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from servesim.gpu_backend.tp import DECODE_BATCHES, PREFILL_TOKENS  # noqa: E402

MODEL = "llama-3.1-8b"
BIG_MODEL = "llama-3.1-70b"  # 70B-shaped: at TP=2 only (141 GB of bf16 weights do not fit one H200)
GRID = ((1, 1024), (16, 1024), (64, 1024), (256, 1024), (1, 4096), (16, 4096), (64, 4096), (256, 4096))
SMOKE_GRID = ((1, 32), (4, 64))
BLOCK = 32  # tokens per KV block (the serving runs' kv_cache.tokens_per_block)
SMOKE_CFG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=250, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=4096, tie_word_embeddings=False, model_type="llama")


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def model_cfg(smoke: bool, name: str = MODEL) -> dict:
    if smoke:
        return dict(SMOKE_CFG)
    return json.loads((REPO / "sim" / "data" / "models" / f"{name}.json").read_text())


def spec_of(cfg: dict):
    from servesim.gpu_backend.weights import ModelDims

    return ModelDims.from_spec(cfg).spec


# ---------------------------------------------------------------------------------- timing
def timed(fn, dev: torch.device, reps: int, warmup: int = 3, sync=None) -> float:
    """Median seconds of ``fn`` (CUDA events; the host clock on a CPU). ``sync``: called
    before each timed call (a barrier across the ranks)."""
    for _ in range(warmup):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    out = []
    for _ in range(reps):
        if sync is not None:
            sync()
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return float(np.median(out))


def copy_bandwidth(dev: torch.device, smoke: bool) -> float:
    n = (1 << 22) if smoke else (1 << 30)  # bytes per buffer
    a = torch.empty(n // 2, dtype=torch.bfloat16, device=dev).normal_()
    b = torch.empty_like(a)
    s = timed(lambda: b.copy_(a), dev, reps=10)
    return 2 * n / s


# ---------------------------------------------------------------------------------- the simulator's terms
def allreduce_model(spec, hw, tp: int):
    """(seconds(bytes), description) of the cost model's price of one all-reduce, from
    sim/cost_model.py as it is: a function ``allreduce_seconds(hw, tp, bytes)`` if it has
    one; else its ``breakdown(shape)["allreduce"]`` of a step of ``bytes / (hidden x
    dtype bytes)`` tokens over the step's ``2 x layers`` all-reduces; else the formula of
    its `RooflineConfig` fields."""
    from servesim.sim import cost_model as cm
    from servesim.sim.types import IterationShape

    fn = getattr(cm, "allreduce_seconds", None)  # a function the cost-model engineer may add
    if callable(fn):
        try:
            fn(hw, tp, 8192)
            return (lambda nbytes: float(fn(hw, tp, nbytes))), "cost_model.allreduce_seconds(hw, tp, bytes)"
        except Exception:  # noqa: BLE001 - another signature: the next way
            pass
    try:
        m = cm.RooflineCostModel(spec, hw, tp=tp, cuda_graphs=False)
        per_row = spec.hidden_size * spec.dtype_bytes

        def price(nbytes: int) -> float:
            t = max(1, round(nbytes / per_row))
            return float(m.breakdown(IterationShape(n_decode=t, decode_kv_sum=t))["allreduce"]) / (2 * spec.num_layers)

        if price(8192) > 0 or tp == 1:
            return price, ("RooflineCostModel(tp).breakdown(step)['allreduce'] / (2 x layers), the step's tokens = "
                           "bytes / (hidden x 2)")
    except Exception:  # noqa: BLE001 - the formula below
        pass
    cfg = cm.RooflineConfig()
    lat = float(getattr(cfg, "allreduce_latency_s", 10e-6)) + 2 * (tp - 1) * float(
        getattr(cfg, "collective_step_latency_s", 0.0))
    eff = float(getattr(cfg, "allreduce_bandwidth_efficiency", 0.8))
    bw = float(getattr(hw, "link_bytes_per_s", None) or hw.nvlink_bytes_per_s)

    def formula(nbytes: int) -> float:
        return lat + 2.0 * (tp - 1) / tp * nbytes / (bw * eff) if tp > 1 else 0.0

    return formula, (f"RooflineConfig: {lat * 1e6:.1f} us fixed + 2(tp-1)/tp x bytes / "
                     f"(link {bw / 1e9:.0f} GB/s x allreduce_bandwidth_efficiency {eff})")


def predicted(spec, hw, tp: int, B: int, kv_sum: int, profile: Path | None) -> tuple[float, float]:
    """(GPU time, whole price) of a decode-only graph iteration, per the cost model."""
    from servesim.sim.cost_model import RooflineCostModel
    from servesim.sim.types import IterationShape

    cfg = None
    if profile is not None:
        from servesim.sim.calibrate import load_profile

        cfg, _ = load_profile(profile, spec, hw)
    m = RooflineCostModel(spec, hw, cfg, tp=tp, cuda_graphs=True)
    shape = IterationShape(n_decode=B, decode_kv_sum=kv_sum, graph=True, padded_decode=B)
    return float(m.gpu_time(shape)), float(m.price(shape))


def bytes_per_gpu(spec, tp: int, B: int, kv_tokens: int) -> int:
    """Bytes one of ``tp`` GPUs reads in a decode step: its linears' weights, its lm_head rows,
    the embedding rows it gathers, the norms, and its KV heads' share of the cache."""
    sh = spec.linear_shapes(tp)
    b = spec.dtype_bytes
    lin = sum(k * n for name, (k, n) in sh.items() if name != "lm_head") * spec.num_layers * b
    k, v = sh["lm_head"]
    norms = (2 * spec.num_layers + 1) * spec.hidden_size * b
    emb = B * spec.hidden_size * b
    kv = kv_tokens * spec.kv_bytes_per_token * spec.kv_heads_per_gpu(tp) // spec.num_kv_heads
    return int(lin + k * v * b + norms + emb + kv)


# ---------------------------------------------------------------------------------- one rank's work
def _lens(B: int, ctx: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(ctx // 2, ctx * 3 // 2 + 1, (B,), generator=g).to(torch.int32)


def _decode_inputs(lens: torch.Tensor, bs: int, dev, seed: int, vocab: int):
    """A decode step over a paged cache holding exactly the blocks each sequence needs,
    placed at random (the same on every rank: drawn on the host)."""
    g = torch.Generator().manual_seed(seed)
    B = lens.numel()
    nblk = (lens.to(torch.int64) + bs) // bs
    total, mb = int(nblk.sum()), int(nblk.max())
    bt = torch.zeros(B, mb, dtype=torch.int32)
    bt[torch.arange(mb)[None, :] < nblk[:, None]] = torch.randperm(total, generator=g).to(torch.int32)
    pos = lens.to(torch.int64)
    slot = bt[torch.arange(B), pos // bs].to(torch.int64) * bs + pos % bs
    ids = torch.randint(0, vocab, (B,), generator=g)
    seq = (lens + 1).to(torch.int32)
    return total, [t.to(dev) for t in (ids, pos, bt, seq, slot)]


def _check_steps(model, dev) -> list[torch.Tensor]:
    """One prefill of two chunks, then a decode step of both (the correctness check)."""
    from servesim.gpu_backend.model import ContextChunkInput, DecodeInput

    pool = model.make_kv_pool(16, 16)
    a = list(range(3, 40))
    out = [model.step([ContextChunkInput(a, 0, [0, 1, 2]), ContextChunkInput(a[:20], 0, [4, 5])], [], pool)]
    out.append(model.step([], [DecodeInput(7, 37, [0, 1, 2]), DecodeInput(9, 20, [4, 5])], pool))
    model.kv_pool = None
    return [o.float().cpu() for o in out]


def rank_work(rank: int, tp: int, smoke: bool, models: list[str], grid, reps: int, ar_sizes: list[int], addr: str,
              out_dir: str) -> dict:
    """Everything one rank measures: the all-reduces, then per model the check's logits and
    the decode grid. TP=1: rank 0 only, no process group. Every skip is agreed by all
    ranks (a rank alone skipping a point would leave the others in a collective).
    Returns (and on rank 0 writes) its results."""
    from servesim.gpu_backend.graph_runner import GraphRunner
    from servesim.gpu_backend.model import LlamaModel

    cuda = torch.cuda.is_available() and not smoke
    dev = torch.device(f"cuda:{rank}" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        torch.set_num_threads(1)
    res: dict = {"tp": tp, "ar": [], "models": {}}
    barrier = None

    def agree(ok: bool) -> bool:  # True on every rank iff True on all of them
        if tp == 1:
            return ok
        flag = torch.tensor([int(ok)], dtype=torch.int32, device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    if tp > 1:
        import torch.distributed as dist

        from servesim.gpu_backend.tp import TPGraphRunner, TPLlamaModel, init_tp, time_allreduce

        init_tp(rank, tp, addr, dev)
        barrier = dist.barrier
    try:
        with torch.no_grad():
            if tp > 1:  # all-reduce by message size
                res["ar"] = time_allreduce(ar_sizes, dev, reps)
            for name in models:
                cfg = model_cfg(smoke, name)
                t0 = time.perf_counter()
                if tp > 1:
                    model = TPLlamaModel(cfg, tp, rank, None, dtype=dtype, device=dev, seed=0)
                    runner_cls = TPGraphRunner
                else:
                    model = LlamaModel(cfg, None, dtype=dtype, device=dev, seed=0)
                    runner_cls = GraphRunner
                mres = res["models"][name] = {"build_s": time.perf_counter() - t0, "decode": []}
                mres["check"] = _check_steps(model, dev)
                free = (torch.cuda.mem_get_info(dev)[0] if cuda else 8e9) - 6e9
                kv_tok = model.dims.num_layers * 2 * model.dims.num_kv_heads * model.dims.head_dim * \
                    torch.empty((), dtype=dtype).element_size()
                for i, (B, ctx) in enumerate(grid):
                    lens = _lens(B, ctx, 100 + i)
                    kv_sum = int(lens.sum()) + B
                    need = (kv_sum + B * BLOCK) * kv_tok
                    row = {"batch": B, "ctx": ctx, "kv_tokens": kv_sum}
                    if not agree(need <= free):
                        row["note"] = f"skipped: KV {need / 1e9:.0f} GB > {free / 1e9:.0f} GB free on one GPU"
                        mres["decode"].append(row)
                        continue
                    runner = pool = inputs = None
                    try:
                        bs = BLOCK if not smoke else 16
                        try:
                            total, inputs = _decode_inputs(lens, bs, dev, 200 + i, model.dims.vocab_size)
                            pool = model.make_kv_pool(total, bs)
                            ok = True
                        except torch.OutOfMemoryError as e:
                            row["note"] = "out of memory: " + str(e).splitlines()[0][:100]
                            ok = False
                        if agree(ok):
                            runner = runner_cls(model, pool, [B], inputs[2].shape[1])
                            runner.capture()
                            row["graph"] = bool(runner.captured)
                            row["seconds"] = timed(lambda: runner.run(*inputs), dev, reps=reps, sync=barrier)
                        elif ok:
                            row["note"] = "skipped: another rank ran out of memory"
                    finally:
                        runner = pool = inputs = None
                        model.kv_pool = None
                        if cuda:
                            torch.cuda.empty_cache()
                    mres["decode"].append(row)
                model = None
                if cuda:
                    torch.cuda.empty_cache()
    finally:
        if tp > 1:
            from servesim.gpu_backend.tp import destroy_group

            model = runner = None  # (graphs holding NCCL collectives go before the communicator)
            destroy_group(dev)
    if rank == 0:
        torch.save(res, Path(out_dir) / f"tp{tp}.pt")
    return res


def _spawned(rank: int, tp: int, smoke: bool, models, grid, reps: int, ar_sizes, addr: str, out_dir: str) -> None:
    try:
        rank_work(rank, tp, smoke, models, grid, reps, ar_sizes, addr, out_dir)
    except Exception:
        traceback.print_exc()
        raise


def run_tp(tp: int, smoke: bool, models, grid, reps: int, ar_sizes, work: Path) -> dict:
    if tp == 1:
        return rank_work(0, 1, smoke, models, grid, reps, ar_sizes, "", str(work))
    import torch.multiprocessing as mp

    from servesim.gpu_backend.tp import free_tcp_address

    mp.spawn(_spawned, args=(tp, smoke, models, grid, reps, ar_sizes, free_tcp_address(), str(work)), nprocs=tp)
    return torch.load(work / f"tp{tp}.pt")


# ---------------------------------------------------------------------------------- tables
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def fits(name: str, smoke: bool, tp: int) -> bool:
    """The model's weights (one GPU's shard) fit in 90% of GPU 0's memory, with room left."""
    if smoke or not torch.cuda.is_available():
        return True
    from servesim.gpu_backend.tp import shard_dims

    cfg = model_cfg(smoke, name)
    n = shard_dims(cfg, tp, 0).num_params() if tp > 1 else spec_of(cfg).params
    return n * 2 < 0.9 * torch.cuda.get_device_properties(0).total_memory - 16e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "out" / "tp_bench"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, gloo, 2 CPU processes")
    ap.add_argument("--tp", type=int, default=None, help="the TP size beside TP=1 (default: 2 when >= 2 GPUs)")
    ap.add_argument("--models", default=f"{MODEL},{BIG_MODEL}",
                    help="bundled models (each where its weights fit one GPU's memory at that TP: the 70B at TP=2 "
                         "only); the all-reduce sweep has the first one's message sizes")
    ap.add_argument("--hardware", default=None, help="hardware spec of the prediction (default: this GPU's)")
    ap.add_argument("--profile", default=None, help="calibration profile for the prediction of the first model")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    smoke = args.smoke
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available() and not smoke
    n_gpus = torch.cuda.device_count() if cuda else 0
    tp2 = args.tp if args.tp is not None else (2 if smoke or n_gpus >= 2 else None)
    if tp2 is not None and cuda and n_gpus < tp2:
        print(f"--tp {tp2}: {n_gpus} GPU(s) visible", file=sys.stderr)
        return 2
    models = ["tiny"] if smoke else [m.strip() for m in args.models.split(",") if m.strip()]
    grid = SMOKE_GRID if smoke else GRID
    reps = args.reps or (3 if smoke else 20)
    specs = {m: spec_of(model_cfg(smoke, m)) for m in models}
    from servesim.gpu_backend.tp import allreduce_sizes

    spec = specs[models[0]]
    h = spec.hidden_size
    ar_sizes = allreduce_sizes(spec, DECODE_BATCHES, PREFILL_TOKENS if not smoke else (64, 512))
    from servesim.sim.specs import load_hardware

    if args.hardware:
        hw = load_hardware(args.hardware)
    elif cuda:
        from bench_device import hardware_here

        hw = load_hardware(hardware_here())
    else:
        hw = load_hardware("h200-sxm")
    profile = Path(args.profile) if args.profile else None
    dev0 = torch.device("cuda:0" if cuda else "cpu")
    bw = copy_bandwidth(dev0, smoke)
    tps = [1] + ([tp2] if tp2 is not None else [])
    runs = {tp: [m for m in models if fits(m, smoke, tp)] for tp in tps}
    lines = ["# Tensor parallelism on the GPU backend (benchmarks/tp_bench.py)", ""]
    dname = torch.cuda.get_device_name(0) if cuda else "CPU (smoke: tiny model, fp32, gloo)"
    lines += [f"Device: {n_gpus if cuda else 'no'} x {dname}; torch {torch.__version__}; models "
              + "; ".join(f"TP={tp}: {', '.join(ms) or 'none'}" for tp, ms in runs.items())
              + f" (random weights, real shapes); hardware spec of the predictions: {hw.name}"
              f"{f', profile {profile} ({models[0]})' if profile else ''}. "
              f"NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}.", "",
              f"Copy bandwidth (read + write) on GPU 0: **{bw / 1e12:.2f} TB/s**" if cuda else
              f"Copy bandwidth (host): {bw / 1e9:.1f} GB/s", ""]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {tp: run_tp(tp, smoke, runs[tp], grid, reps, ar_sizes, work) for tp in tps}
    # -- the check -----------------------------------------------------------------------
    ok = True
    if tp2 is not None:
        lines += [f"## Check: TP={tp2} logits vs TP=1 (same random weights), before any timing", ""]
        for m in runs[tp2]:
            if m not in results[1]["models"]:
                lines.append(f"- {m}: no TP=1 reference (its weights do not fit one GPU)")
                continue
            a_, b_ = results[tp2]["models"][m]["check"], results[1]["models"][m]["check"]
            errs = [rel_err(a, b) for a, b in zip(a_, b_)]
            agree = [float((a.argmax(-1) == b.argmax(-1)).float().mean()) for a, b in zip(a_, b_)]
            tol = 5e-2 if cuda else 1e-5  # bf16: partial sums rounded before the all-reduce
            good = max(errs) <= tol
            ok &= good
            lines.append(f"- {m}: prefill step rel. error {errs[0]:.1e}, argmax agreement {agree[0]:.0%}; decode "
                         f"step {errs[1]:.1e}, {agree[1]:.0%} (tolerance {tol:g}): **{'ok' if good else 'FAILED'}**")
        lines.append("")
    # -- all-reduce ----------------------------------------------------------------------
    import pandas as pd

    ar_rows = []
    if tp2 is not None:
        price, how = allreduce_model(spec, hw, tp2)
        for r in results[tp2]["ar"]:
            n = r["bytes"]
            rows_ = n // (2 * h)
            what = " / ".join([f"decode batch {rows_}"] * (rows_ in DECODE_BATCHES)
                              + [f"prefill {rows_} tokens"] * (rows_ not in DECODE_BATCHES or rows_ >= 512))
            p = price(n)
            ar_rows.append({"tp": tp2, "bytes": n, "step": what, "measured_us": r["seconds"] * 1e6,
                            "model_us": p * 1e6, "model_over_measured": p / r["seconds"],
                            "bus_gb_s": 2 * (tp2 - 1) / tp2 * n / r["seconds"] / 1e9})
        lines += [f"## All-reduce by message size (TP={tp2}, {models[0]}'s hidden size)", "",
                  f"Model: {how}. bus GB/s = 2(tp-1)/tp x bytes / time.", "",
                  "| message | bytes | measured us | model us | model / measured | bus GB/s |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['step']} | {r['bytes']} | {r['measured_us']:.1f} | {r['model_us']:.1f} | "
                  f"{r['model_over_measured']:.2f} | {r['bus_gb_s']:.1f} |" for r in ar_rows]
        lines.append("")
    else:
        lines += ["## All-reduce", "", "*Not measured: one GPU visible (the TP=2 half needs two).*", ""]
    pd.DataFrame(ar_rows).to_csv(out / "tp_allreduce.csv", index=False)
    # -- decode --------------------------------------------------------------------------
    rows = []
    for tp, res in results.items():
        for m, mres in res["models"].items():
            for r in mres["decode"]:
                row = {"model": m, "tp": tp, **r}
                gpu_s, price_s = predicted(specs[m], hw, tp, r["batch"], r["kv_tokens"],
                                           profile if m == models[0] else None)
                row.update(pred_gpu_ms=gpu_s * 1e3, pred_price_ms=price_s * 1e3)
                if "seconds" in r:
                    row["ms"] = r["seconds"] * 1e3
                    row["roofline_share"] = bytes_per_gpu(specs[m], tp, r["batch"], r["kv_tokens"]) / bw / r["seconds"]
                    row["pred_gpu_err"] = gpu_s / r["seconds"] - 1
                rows.append(row)
    df = pd.DataFrame(rows)
    if tp2 is not None and len(df):
        key = ["model", "batch", "ctx"]
        one = df[df.tp == 1].set_index(key)
        for col, src in (("speedup", "ms"), ("pred_speedup", "pred_gpu_ms")):
            if src in df:
                base = one[src] if src in one else pd.Series(dtype=float)
                df.loc[df.tp == tp2, col] = [base.get(k, np.nan) / v for k, v in
                                             zip(df[df.tp == tp2][key].itertuples(index=False, name=None),
                                                 df.loc[df.tp == tp2, src])]
    df.to_csv(out / "tp_decode.csv", index=False)
    lines += ["## Decode iterations (CUDA graph per batch, paged KV, lengths +-50%)", "",
              "ms: measured per iteration (rank 0's CUDA events; all ranks replay in step). share: bytes one GPU "
              "reads / copy bandwidth / time. predicted: the cost model's GPU time of the iteration (its whole "
              "price with host terms in the CSV). speedup: TP=1 ms / TP=N ms (measured; predicted).", "",
              "| model | tp | batch | ctx | ms | share of roofline | predicted ms | pred. err | speedup | "
              "pred. speedup | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return "" if v is None or (isinstance(v, float) and v != v) else format(v, fmt)

    for r in df.to_dict("records"):
        note = r.get("note") if isinstance(r.get("note"), str) else ""
        if cuda and r.get("graph") is False:
            note += " (eager: the graph capture failed)"
        lines.append(f"| {r['model']} | {r['tp']} | {r['batch']} | {r['ctx']} | {f(r.get('ms'), '.3f')} | "
                     f"{f(r.get('roofline_share'), '.0%')} | {f(r.get('pred_gpu_ms'), '.3f')} | "
                     f"{f(r.get('pred_gpu_err'), '+.1%')} | {f(r.get('speedup'), '.2f')} | "
                     f"{f(r.get('pred_speedup'), '.2f')} | {note} |")
    lines += ["", "Model build (random weights): " + "; ".join(
        f"{m} TP={tp} {mres['build_s']:.1f} s" for tp, res in results.items() for m, mres in res["models"].items())
        + f". Whole run {time.perf_counter() - t_start:.0f} s."]
    text = "\n".join(lines) + "\n"
    (out / "tp_bench.md").write_text(text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
