"""What the hardware allows: memory fit and roofline bounds on serving throughput (`sim bounds`).

For a model x hardware x precision x TP x batch x prompt/output lengths, per replica of
``tp`` GPUs (every quantity per GPU, with the cost model's per-GPU shapes):

* **memory**: weights per GPU (the decoder linears in their precision with their scales,
  the rest bf16), the KV pool that `sim run` sizes next to them (sim/memory.py: the
  activation reserve, ``free_gpu_memory_fraction``), one request's KV (prompt + output,
  whole blocks), and the largest batch whose KV fits the pool.
* **decode roofline** at that batch, every request at the mean context of its decode
  (prompt + output/2): a step reads every weight once (linears and lm_head; the
  embedding is gathered, not read) and each request's KV, and writes one token's KV;
  ``t_step >= max(bytes / bandwidth, FLOPs / rate)``, tokens/s ``= batch / t_step``. The
  FLOPs: the linears at the precision's tensor-core rate (fp8, int8; bf16 for bf16 and
  int4 weight-only), lm_head and attention at the bf16 rate.
* **prefill FLOP bound**: the batch's prompts (every linear and the causal attention)
  over the rates, and at least one read of the weights; the time to first token of one
  request alone.
* **end-to-end output tokens/s** for the whole request, the batch kept in flight: at
  least ``output_len`` steps, each reading the weights, the KV reads of every decode step
  and the FLOPs of prompt and output, ``batch * output_len / max(bytes / B, FLOPs / F)``.
  Prefill and decode may share iterations (in-flight batching), so their work is summed
  before the max, not their times: a bound, never above what an engine can reach.

Every figure at the datasheet peaks (``peak_*`` of the hardware file: what physics
allows) and at the achievable rates the cost model uses. A claimed figure
(``--claim-tok-s``) is compared with the end-to-end bound: above the peak bound it is
impossible, between the two it needs more than the achievable rates, below it it is
possible. A batch whose weights or KV do not fit is impossible whatever its speed.

`run_bounds` is the same arithmetic over a finished run's requests, written into its
``summary.json`` (``bounds``): a simulated (or measured) throughput never exceeds it.
Bytes and FLOPs the bound leaves out (activations, norms, padding, the KV of earlier
chunks, recomputation, all-reduce) only make it looser.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .types import ConfigError

LINEARS = ("qkv", "o", "gate_up", "down")


# ---------------------------------------------------------------------------------------
# per-token work of a model on one GPU
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Work:
    """Bytes and FLOPs per GPU of one model at its precisions on `tp` GPUs."""

    weights_read: float  # bytes a step reads: every linear (quantised, scales) + lm_head
    kv_token: float  # KV bytes of one token (all layers)
    lin_flops: float  # FLOPs per token of the decoder linears (all layers)
    lm_flops: float  # FLOPs per sampled token of lm_head
    attn_flops: float  # FLOPs per (query, key) pair of attention (all layers)
    matmul: str  # the linears' tensor-core precision


def model_work(model, tp: int = 1) -> Work:
    from .memory import kv_bytes_per_block

    shapes = model.linear_shapes(tp)
    L, b, q = model.num_layers, model.dtype_bytes, model.quant
    # an MoE layer: a token's k experts (a step reads at least k of them, whatever its batch) and the router
    k = model.num_experts_per_tok if model.is_moe else 1
    per = {n: (k if n in ("gate_up", "down") else 1) for n in LINEARS}
    w = sum(L * q.weight_bytes(*shapes[n], b) * per[n] for n in LINEARS)
    K, V = shapes["lm_head"]
    w += K * V * b
    hg = model.num_heads // tp
    return Work(weights_read=float(w), kv_token=float(kv_bytes_per_block(model, 1, tp)),
                lin_flops=float(sum(L * 2 * shapes[n][0] * shapes[n][1] * per[n] for n in LINEARS)),
                lm_flops=2.0 * K * V, attn_flops=4.0 * L * model.head_dim * hg, matmul=q.matmul)


@dataclass(frozen=True)
class Rates:
    bandwidth: float  # bytes/s
    linear: float  # the linears' tensor-core rate
    bf16: float  # lm_head, attention

    @classmethod
    def of(cls, hw, matmul: str, peak: bool) -> Rates:
        lin = hw.matmul_rate(matmul, achievable=not peak)
        if lin is None:
            raise ConfigError(f"{hw.name} has no {matmul} tensor cores", "precision")
        return cls(hw.hbm_bytes_per_s if peak else hw.achievable_hbm_bytes_per_s, lin,
                   hw.peak_bf16_flops if peak else hw.achievable_bf16_flops)

    def flops_time(self, w: Work, lin_tokens: float, lm_tokens: float, attn_pairs: float) -> float:
        return lin_tokens * w.lin_flops / self.linear + (lm_tokens * w.lm_flops + attn_pairs * w.attn_flops) / self.bf16


# ---------------------------------------------------------------------------------------
# `sim bounds`
# ---------------------------------------------------------------------------------------


@dataclass
class Bounds:
    model: str
    hardware: str
    precision: str
    tp: int
    batch: int
    prompt_len: int
    output_len: int
    # memory (per GPU)
    hbm_gb: float
    weights_gb: float
    weights_fit: bool
    kv_per_request_gb: float
    kv_pool_gb: float
    kv_pool_tokens: int
    max_batch: int
    batch_fits: bool
    # decode step at the mean context (peak / achievable rates)
    decode_context: float
    decode_step_bytes_gb: float
    decode_step_gflop: float
    decode_step_s: float
    decode_step_s_achievable: float
    decode_tok_s: float
    decode_tok_s_achievable: float
    decode_flop_bound_tok_s: float
    decode_memory_bound_tok_s: float
    # prefill
    prefill_gflop: float
    prefill_s: float
    prefill_tok_s: float
    ttft_s: float
    # the whole request
    e2e_out_tok_s: float
    e2e_out_tok_s_achievable: float
    per_request_out_tok_s: float
    e2e_bound_by: str  # "memory" or "compute"

    def to_dict(self) -> dict:
        return asdict(self)


def _decode_step(w: Work, r: Rates, batch: int, ctx: float) -> tuple[float, float, float, float]:
    """(seconds, bytes, flops time, bytes time) of one decode step of `batch` requests at context `ctx`."""
    nbytes = w.weights_read + batch * (ctx + 1) * w.kv_token
    tf = r.flops_time(w, batch, batch, batch * (ctx + 1))
    tb = nbytes / r.bandwidth
    return max(tf, tb), nbytes, tf, tb


def _request_work(w: Work, P: float, O: float) -> tuple[float, float, float, float]:
    """(linear tokens, sampled tokens, attention pairs, KV tokens read) of one request of
    prompt P and output O with no prefix reuse (lower estimates: every decode step j = 1..O-1
    attends to at least P + j - 1 keys)."""
    dec = max(O - 1, 0)
    attn = P * (P + 1) / 2 + dec * P + dec * (dec - 1) / 2
    kv_read = dec * P + dec * (dec - 1) / 2
    return P + dec, O, attn, kv_read


def compute_bounds(model, hw, *, tp: int = 1, batch: int = 1, prompt_len: int = 1024, output_len: int = 128,
                   tokens_per_block: int = 32, free_gpu_memory_fraction: float = 0.9,
                   max_num_tokens: int = 8192, activation_reserve_bytes: float | None = None) -> Bounds:
    """The bounds of `model` (its precisions already applied) on `hw` (module doc)."""
    from .memory import default_activation_reserve_bytes, kv_bytes_per_block, kv_pool_blocks

    model.check_tp(tp, "--tp")
    w = model_work(model, tp)
    peak = Rates.of(hw, w.matmul, True)
    ach = Rates.of(hw, w.matmul, False)
    weights = model.weight_bytes / tp
    reserve = (activation_reserve_bytes if activation_reserve_bytes is not None
               else default_activation_reserve_bytes(model, max(max_num_tokens, batch), tp, max_batch_size=batch))
    try:
        blocks = kv_pool_blocks(model, hw, tokens_per_block, free_gpu_memory_fraction, reserve, tp=tp)
    except ConfigError:
        blocks = 0
    block_bytes = kv_bytes_per_block(model, tokens_per_block, tp)
    per_req_blocks = -(-(prompt_len + output_len) // tokens_per_block)
    max_batch = blocks // per_req_blocks
    P, O, B = float(prompt_len), float(output_len), batch
    ctx = P + O / 2
    step, step_bytes, tf, tb = _decode_step(w, peak, B, ctx)
    step_a = _decode_step(w, ach, B, ctx)[0]
    flops_step = B * (w.lin_flops + w.lm_flops) + B * (ctx + 1) * w.attn_flops
    # prefill: the batch's prompts in one go (at least one read of the weights)
    pre_attn = P * (P + 1) / 2
    pre_f = B * (P * w.lin_flops + w.lm_flops + pre_attn * w.attn_flops)
    pre_t = max(peak.flops_time(w, B * P, B, B * pre_attn), (w.weights_read + B * P * w.kv_token) / peak.bandwidth)
    ttft = max(peak.flops_time(w, P, 1, pre_attn), (w.weights_read + P * w.kv_token) / peak.bandwidth)
    # the whole request, `batch` of them in flight: >= O steps, each reading the weights
    lin_t, lm_t, attn_p, kv_r = _request_work(w, P, O)

    def e2e(r: Rates) -> tuple[float, str]:
        t_b = (O * w.weights_read + B * (kv_r + P + O) * w.kv_token) / r.bandwidth
        t_f = r.flops_time(w, B * lin_t, B * lm_t, B * attn_p)
        return (B * O / max(t_b, t_f) if max(t_b, t_f) > 0 else math.inf), ("memory" if t_b >= t_f else "compute")

    e2e_peak, by = e2e(peak)
    e2e_ach, _ = e2e(ach)
    return Bounds(
        model=model.name, hardware=hw.name, precision=model.precision_label, tp=tp, batch=B,
        prompt_len=prompt_len, output_len=output_len,
        hbm_gb=hw.hbm_capacity_bytes / 1e9, weights_gb=weights / 1e9, weights_fit=weights < hw.hbm_capacity_bytes,
        kv_per_request_gb=per_req_blocks * block_bytes / 1e9, kv_pool_gb=blocks * block_bytes / 1e9,
        kv_pool_tokens=blocks * tokens_per_block, max_batch=max_batch,
        batch_fits=weights < hw.hbm_capacity_bytes and B <= max_batch,
        decode_context=ctx, decode_step_bytes_gb=step_bytes / 1e9, decode_step_gflop=flops_step / 1e9,
        decode_step_s=step, decode_step_s_achievable=step_a, decode_tok_s=B / step,
        decode_tok_s_achievable=B / step_a, decode_flop_bound_tok_s=B / tf, decode_memory_bound_tok_s=B / tb,
        prefill_gflop=pre_f / 1e9, prefill_s=pre_t, prefill_tok_s=B * P / pre_t, ttft_s=ttft,
        e2e_out_tok_s=e2e_peak, e2e_out_tok_s_achievable=e2e_ach, per_request_out_tok_s=e2e_peak / B,
        e2e_bound_by=by)


def verdict(b: Bounds, claim: float) -> tuple[str, str]:
    """(kind, sentence) for a claimed output tokens/s: impossible / implausible / possible."""
    if not b.weights_fit:
        return "impossible", (f"impossible: the {b.precision} weights alone take {b.weights_gb:.1f} GB per GPU and "
                              f"{b.hardware} has {b.hbm_gb:.0f} GB (tp={b.tp})")
    if not b.batch_fits:
        return "impossible", (f"impossible at batch {b.batch}: its KV ({b.batch} x {b.kv_per_request_gb:.2f} GB) does "
                              f"not fit the {b.kv_pool_gb:.1f} GB KV pool left next to the weights (largest batch: "
                              f"{b.max_batch})")
    if claim > b.e2e_out_tok_s:
        return "impossible", (f"impossible: {claim:,.0f} tok/s is {claim / b.e2e_out_tok_s:.2f}x the bound of "
                              f"{b.e2e_out_tok_s:,.0f} tok/s at the datasheet peaks ({b.e2e_bound_by}-bound)")
    if claim > b.e2e_out_tok_s_achievable:
        return "implausible", (f"implausible: {claim:,.0f} tok/s is below the peak bound ({b.e2e_out_tok_s:,.0f}) but "
                               f"{claim / b.e2e_out_tok_s_achievable:.2f}x the bound at the achievable rates "
                               f"({b.e2e_out_tok_s_achievable:,.0f} tok/s): it needs more than a good kernel reaches")
    return "possible", (f"possible: {claim:,.0f} tok/s is {claim / b.e2e_out_tok_s_achievable:.0%} of the bound at the "
                        f"achievable rates ({b.e2e_out_tok_s_achievable:,.0f} tok/s; peak "
                        f"{b.e2e_out_tok_s:,.0f})")


def parse_claim(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        v = float(str(text).replace(",", "").replace("_", ""))
    except ValueError:
        v = math.nan
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(f"expected a positive number of output tokens per second, got {text!r}",
                          "command line: --claim-tok-s")
    return v


# ---------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    """The arguments of `sim bounds` (sim/cli.py registers the subcommand)."""
    p.add_argument("--model", required=True, help="bundled model name or config.json path")
    p.add_argument("--hardware", default="h100-sxm", help="bundled hardware name or hardware YAML")
    p.add_argument("--precision", default=None, help="weights: bf16, fp8, fp8-channel, int8, int4, int4-g64, ... "
                   "(default: the checkpoint's quantization_config, else bf16)")
    p.add_argument("--kv-dtype", default="auto", help="KV cache: bf16, fp8, int8 (default: the checkpoint's, else bf16)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs of one replica")
    p.add_argument("--batch", type=int, default=1, help="requests in flight")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--tokens-per-block", type=int, default=32)
    p.add_argument("--free-gpu-memory-fraction", type=float, default=0.9)
    p.add_argument("--max-num-tokens", type=int, default=8192, help="sizes the activation reserve, as in sim run")
    p.add_argument("--claim-tok-s", default=None, metavar="N",
                   help="a claimed output tokens/s (the whole batch's): possible, and by how much above the bound?")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")


def bounds_from_args(args) -> tuple[Bounds, float | None]:
    from pathlib import Path

    from .specs import apply_precision, load_hardware, load_model

    claim = parse_claim(args.claim_tok_s)
    problems = []
    for name in ("tp", "batch", "prompt_len", "output_len", "tokens_per_block", "max_num_tokens"):
        v = getattr(args, name)
        if v < 1:
            problems.append((f"command line: --{name.replace('_', '-')}", f"expected a positive integer, got {v}"))
    if not 0 < args.free_gpu_memory_fraction <= 1:
        problems.append(("command line: --free-gpu-memory-fraction", f"expected (0, 1], got "
                         f"{args.free_gpu_memory_fraction}"))
    if problems:
        raise ConfigError(problems)
    model = load_model(args.model, Path.cwd(), location="--model")
    hw = load_hardware(args.hardware, Path.cwd(), location="--hardware")
    model.check_tp(args.tp, "command line: --tp")
    model = apply_precision(model, hw, args.precision, args.kv_dtype, args.tp, "command line: --precision",
                            "command line: --kv-dtype")
    b = compute_bounds(model, hw, tp=args.tp, batch=args.batch, prompt_len=args.prompt_len,
                       output_len=args.output_len, tokens_per_block=args.tokens_per_block,
                       free_gpu_memory_fraction=args.free_gpu_memory_fraction, max_num_tokens=args.max_num_tokens)
    return b, claim


def print_bounds(b: Bounds, claim: float | None, console) -> None:
    from rich.table import Table

    def yes(ok: bool) -> str:
        return "[green]yes[/]" if ok else "[bold red]no[/]"

    t = Table(title=f"sim bounds: {b.model} on {b.hardware}" + (f" x{b.tp} (tp)" if b.tp > 1 else "")
              + f", {b.precision}, batch {b.batch}, prompt {b.prompt_len} + output {b.output_len} tokens",
              show_header=True)
    t.add_column("", justify="left")
    t.add_column("bound (datasheet peaks)", justify="right")
    t.add_column("at the achievable rates", justify="right")
    t.add_column("how", justify="left")
    t.add_row("weights per GPU", f"{b.weights_gb:.1f} GB of {b.hbm_gb:.0f} GB", "", f"fit: {yes(b.weights_fit)}")
    t.add_row("KV per request", f"{b.kv_per_request_gb * 1e3:.0f} MB", "", "prompt + output, whole blocks")
    t.add_row("KV pool", f"{b.kv_pool_gb:.1f} GB", "", f"{b.kv_pool_tokens:,} tokens, as sim run sizes it")
    t.add_row("largest batch that fits", f"{b.max_batch:,}", "", f"batch {b.batch} fits: {yes(b.batch_fits)}")
    t.add_row("decode step", f"{b.decode_step_s * 1e3:.3f} ms", f"{b.decode_step_s_achievable * 1e3:.3f} ms",
              f"{b.decode_step_bytes_gb:.2f} GB read, {b.decode_step_gflop:,.0f} GFLOP at context "
              f"{b.decode_context:,.0f}")
    t.add_row("decode tokens/s", f"{b.decode_tok_s:,.0f}", f"{b.decode_tok_s_achievable:,.0f}",
              f"memory bound {b.decode_memory_bound_tok_s:,.0f}, FLOP bound {b.decode_flop_bound_tok_s:,.0f}")
    t.add_row("prefill tokens/s", f"{b.prefill_tok_s:,.0f}", "", f"{b.prefill_gflop:,.0f} GFLOP for the batch's "
              f"prompts, {b.prefill_s * 1e3:.1f} ms; TTFT alone >= {b.ttft_s * 1e3:.1f} ms")
    t.add_row("output tokens/s, whole requests", f"{b.e2e_out_tok_s:,.0f}", f"{b.e2e_out_tok_s_achievable:,.0f}",
              f"{b.e2e_bound_by}-bound; {b.per_request_out_tok_s:,.1f} tok/s per request")
    console.print(t)
    if claim is not None:
        kind, text = verdict(b, claim)
        color = {"impossible": "bold red", "implausible": "yellow", "possible": "green"}[kind]
        console.print(f"claim {claim:,.0f} tok/s: [{color}]{text}[/]", soft_wrap=True)


def run_cli(args, console) -> int:
    """`sim bounds` (ConfigError propagates: the CLI prints it and exits 2)."""
    import json

    b, claim = bounds_from_args(args)
    if args.json:
        d = b.to_dict()
        if claim is not None:
            d["claim_tok_s"], (d["verdict"], d["verdict_text"]) = claim, verdict(b, claim)
        print(json.dumps(d, indent=2))
    else:
        print_bounds(b, claim, console)
    return 0


# ---------------------------------------------------------------------------------------
# the bounds of a run (summary.json)
# ---------------------------------------------------------------------------------------


class BoundSums:
    """What `run_bounds` needs of a run's finished requests, summed a table (or batch) at a
    time: their count, shortest prompt, and the token and attention totals. The terms are
    whole numbers, so the sums are exact (below 2**53) in any order of batches."""

    def __init__(self, k: int):
        self.k = k  # drafts per step (speculation), 0 without
        self.n = 0
        self.p_min = float("inf")
        self.n_out = self.attn = self.attn_dec = self.kv_read = self.lin_tokens = self.p_sum = self.o_sum = 0.0

    def add_table(self, requests) -> "BoundSums":
        import numpy as np

        from .metrics import _equals
        from .schemas import numpy_of

        fin = _equals(requests.column("status"), "finished")  # (no Python string per row)
        P = numpy_of(requests.column("prompt_len"))[fin].astype(np.float64)
        O = numpy_of(requests.column("output_len"))[fin].astype(np.float64)
        C = numpy_of(requests.column("cached_tokens"))[fin].astype(np.float64)
        if not len(P):
            return self
        k = self.k
        self.n += len(P)
        self.p_min = min(self.p_min, float(P.min()))
        self.n_out += float(O.sum())
        self.p_sum += float(P.sum())
        self.o_sum += float(O.sum())
        dec = np.maximum(O - 1, 0)
        new = P - C
        self.attn += float((new * C + new * (new + 1) / 2 + dec * P).sum())
        if k:
            self.kv_read += float((np.ceil(dec / (1 + k)) * P).sum())
        else:
            self.attn_dec += float((dec * (dec - 1) / 2).sum())
            self.kv_read += float((dec * P + dec * (dec - 1) / 2).sum())
        self.lin_tokens += float((new + dec).sum())
        return self


def run_bounds(setup, requests, summary: dict, sums: BoundSums | None = None) -> dict[str, Any]:
    """Bounds of a finished run (`setup`: sim/runner.py's Setup; `requests`: its requests
    table, or None with `sums`, its BoundSums (`run_bound_k(setup)` drafts) gathered batch
    by batch): the output tokens/s no engine can beat on these requests, and the decode
    roofline at the run's largest batch. ``achieved_over_bound``: the run's throughput
    over the peak bound (never above 1)."""
    import numpy as np

    cfg, model, hw = setup.cfg, setup.model, setup.hardware
    tp, R = cfg.cluster.tensor_parallel, cfg.cluster.replicas
    w = model_work(model, tp)
    pp = cfg.cluster.pipeline_parallel
    if pp > 1:  # the replica's pp stages share the work: per GPU, 1 / pp of it
        w = Work(w.weights_read / pp, w.kv_token / pp, w.lin_flops / pp, w.lm_flops / pp, w.attn_flops / pp,
                 w.matmul)
    k = run_bound_k(setup)
    if sums is None:
        sums = BoundSums(k).add_table(requests)
    n_out = sums.n_out
    tpb = cfg.kv_cache.tokens_per_block
    # tokens per step: at most one per request in the batch (1 + k with speculation); a
    # request that yields a token holds its prompt's blocks (shared ones with block reuse)
    cap = cfg.scheduler.max_batch_size
    if not cfg.kv_cache.enable_block_reuse and sums.n:
        cap = min(cap, max(setup.num_blocks // max(int(np.ceil(sums.p_min / tpb)), 1), 1))
    per_step = cap * (1 + k)
    attn = sums.attn if k else sums.attn + sums.attn_dec
    kv_read = sums.kv_read
    lin_tokens = sums.lin_tokens
    out: dict[str, Any] = {"precision": model.precision_label}

    def bound(r: Rates) -> float:
        t_b = (math.ceil(n_out / (R * per_step)) * w.weights_read + kv_read * w.kv_token / R) / r.bandwidth
        t_f = r.flops_time(w, lin_tokens, n_out, attn) / R
        t = max(t_b, t_f)
        return n_out / t if t > 0 else None

    peak, ach = Rates.of(hw, w.matmul, True), Rates.of(hw, w.matmul, False)
    out["output_tok_s"] = bound(peak)
    out["output_tok_s_achievable"] = bound(ach)
    got = summary.get("throughput_out_tok_s")
    out["achieved_over_bound"] = (got / out["output_tok_s"]) if got and out["output_tok_s"] else None
    # the decode roofline at the run's largest batch (mean lengths)
    if sums.n:
        mp, mo = sums.p_sum / sums.n, sums.o_sum / sums.n
        fit = setup.num_blocks // max(-(-int(round(mp + mo)) // tpb), 1)
        batch = max(min(cfg.scheduler.max_batch_size, fit), 1)
        step = _decode_step(w, peak, batch, mp + mo / 2)[0]
        out.update({"decode_batch": batch, "decode_tok_s": R * batch / step,
                    "decode_tok_s_achievable": R * batch / _decode_step(w, ach, batch, mp + mo / 2)[0],
                    "max_batch_fit": fit})
    from servesim.policies.parallelism import Layout

    from .memory import weight_bytes_per_gpu

    lay = Layout.of(cfg.cluster)
    out["weights_gb_per_gpu"] = (model.weight_bytes / tp if pp == 1 and lay.ep == 1  # as before S6
                                 else weight_bytes_per_gpu(model, lay)) / 1e9
    out["assumes"] = ("datasheet peaks; one token per request and step" + (f" (+{k} drafts)" if k else "")
                      + "; the run's prefix hits")
    return out


def run_bound_k(setup) -> int:
    """Draft tokens per step the run's bound allows for (speculation), 0 without."""
    sp = setup.cfg.speculative
    return max(sp.max_draft_len, sp.tree_nodes) if sp is not None and sp.max_draft_len else 0


__all__ = ["Bounds", "compute_bounds", "verdict", "run_bounds", "add_arguments", "run_cli", "parse_claim",
           "model_work"]
