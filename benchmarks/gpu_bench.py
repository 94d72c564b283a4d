"""GPU backend benchmark: correctness first, then speed against measured ceilings and
baselines, all in one device call. Writes its tables to OUT/gpu_bench.md.

    # on the GPU machine (one ~9-minute call; see benchmarks/results/gpu_bench.md)
    python benchmarks/gpu_bench.py --out $OUT --budget-s 540
    # issue S10's call (sections 1, 15, 16, 17, 4, 14: tune the small-M GEMMs, the fused
    # qkv + RoPE + KV write and the fused attention merge, install them, then the decode
    # iterations; ~5 minutes on an H200; OUT/h200_tuning.json replaces kernels/tuning/h200.json;
    # the decode-attention table of section 12 is the committed one -- add 12 to remake it)
    python3 benchmarks/gpu_bench.py --sections s10 --out $OUT --budget-s 540
    # anywhere, a CPU smoke test of every section on a tiny model
    python benchmarks/gpu_bench.py --smoke --out /tmp/gpu_bench

Sections, in the order they run (the most important results first; each checks its results
against a reference before timing, and each is skipped when the remaining time budget is
too small for it):
 1. ceilings: device-to-device copy bandwidth (bytes read + written) and bf16 matmul rate;
 2. kernels vs their torch references on random bf16 inputs, then achieved bytes/s as a
    fraction of the copy bandwidth;
 3. the model's logits vs transformers' LlamaForCausalLM with the same weights;
12. (S10; not in the default --sections) decode attention autotune: candidate launch configs
    (tiles, warps, pipelining stages, split bounds, fused reduce, program order) of both
    models' shapes at batch 1-256 x context 1k-8k, each checked against the torch reference
    before it is timed; the best per batch written to OUT/decode_attention_tuning.json
    (`SERVESIM_DECODE_TUNING=...` or kernels/tuning/ makes the executor use it) and installed
    for section 4; every timing in OUT/decode_attention_tuning.csv;
15. (S10; not in the default --sections) small-M GEMM autotune: the Triton GEMM of
    kernels/gemv.py (rmsnorm / silu_mul fused into its prologue, split-K in one kernel) vs
    the unfused cuBLAS path for every decode linear of both models at M = 1..64, each
    candidate checked against the torch reference first; the winners (or cuBLAS) written as
    the tuning table's ``gemv_entries`` merged with the installed decode-attention entries
    to OUT/h200_tuning.json (a replacement for kernels/tuning/h200.json) and installed for
    the sections after it; every timing in OUT/gemv_tuning.csv;
16. (S10; not in the default --sections) a layer's attention input in one kernel: residual
    add + rmsnorm, the qkv GEMM, RoPE and the KV-cache write (`ops.rms_norm_qkv_rope`'s
    fused path) vs the current path (section 15's choice, then the rope kernel) and the
    cuBLAS path, both models at M = 1..64, each candidate checked against its torch
    reference first; installed (``gemv_entries``, prologue ``rms_rope``) only where it
    beats both by 3%; OUT/h200_tuning.json rewritten; timings in OUT/qkv_rope_tuning.csv;
17. (S10; not in the default --sections) decode attention's fused reduce (the last split
    merges all heads of its group in one tile) at 1-4x the installed split bound vs the
    installed config and SDPA over a padded contiguous cache, batch 1-256 x context 1k/4k,
    each checked against the torch reference first; a batch's row replaced only where the
    fused config beats the installed one by 3%; OUT/h200_tuning.json rewritten; timings in
    OUT/attention_merge.csv;
 4. decode iterations of Llama-3.2-1B and Llama-3.1-8B (random weights, real shapes; batch
    1/16/64/256 x context 1k/4k) over a paged cache with lengths +-50%, CUDA graphs, vs the
    roofline (bytes read / copy bandwidth) and vs issue S10's plain-PyTorch baseline (cuBLAS
    `x @ W` with weights [in, out], F.rms_norm, SDPA over a contiguous cache, one graph,
    argmax) in its equal-length and its mixed-length-padded form; the baseline is first
    checked to compute our model's function on our KV (OUT/decode_grid.csv);
 5. (with 4) a calibration grid (prefill chunks x cached tokens, decode batch x KV) for the
    simulator's calibrated cost model (S4), written to OUT/calibration.csv;
14. (S10, with 4; not in the default --sections) torch.profiler of ours and of the baseline
    at a few of section 4's points: kernel time vs graph wall time per kernel kind, top
    kernels (OUT/profile_s10.csv); the decode GEMMs alone in both weight layouts
    (OUT/gemm_layouts.csv);
 8. a torch.profiler profile of Llama-3.2-1B decode at batch 1 (graph replays and the eager
    step): top kernels per iteration, kernel time vs the graph's wall time (the gaps), the
    GEMMs' achieved bytes/s vs the copy bandwidth, and the time over the roofline by part;
 9. eager iterations mixing one context chunk (64-2k tokens) with 32 decodes (Llama-3.1-8B):
    wall time vs the host's launch time and the GPU's kernel time, and a count of host-device
    synchronisations inside one (torch.cuda.set_sync_debug_mode) -- how the simulator
    should combine host and GPU time for such iterations (fidelity.md);
10. (not in the default --sections: its own device call, ~150 s) iterations with context
    chunks as piecewise CUDA graphs (`PiecewiseRunner`) vs eager, both models: the captured
    pieces' logits vs the eager forward on random mixed iterations first, then capture time
    and graph memory, and wall / host / GPU time of one chunk (16-2k tokens) alone or beside
    32 decodes of ~1k tokens (OUT/piecewise_iterations.csv):
        python benchmarks/gpu_bench.py --out $OUT --sections 10 --budget-s 200
11. (not in the default --sections) paged decode attention over sequences of equal vs
    unequal lengths (same total KV) for every split count: the stragglers a batch leaves
    when it runs one program per (sequence, kv head) (OUT/decode_splits.csv):
        python benchmarks/gpu_bench.py --out $OUT --sections 1,11 --budget-s 200
18. (S7; not in the default --sections) fp8 weights beside bf16 (Llama-3.1-8B, random weights,
    e4m3 with per-channel scales through ``torch._scaled_mm``): each fp8 linear checked against
    its fp32 reference, then logits and greedy agreement vs bf16, the CUDA-graph decode
    iteration at batch 1/16/64/256 x context 1k beside the simulator's ratios, and the GEMMs
    by row count, through benchmarks/gpu_quantization.py's functions (OUT/fp8_weights.csv):
        python benchmarks/gpu_bench.py --out $OUT --sections 18 --budget-s 120
 7. offline throughput vs Hugging Face `generate` with a static cache on 1,000 Azure-trace
    requests (fewer when the budget stops HF early: ours then runs the same ones);
 6. (not in the default --sections; the GPU runs have their own script now) end to end:
    `sim run experiments/ifb_vs_static.yaml --backend gpu` (small), the same requests
    replayed on the simulator, and `sim compare` (OUT/runs.tar.gz).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing (servesim/__init__.py)
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_device import hardware_here  # noqa: E402
from servesim.sim.specs import load_model  # noqa: E402

LOG = io.StringIO()
MD: list[str] = []


def log(*a) -> None:
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.write(s + "\n")


def md(s: str = "") -> None:
    MD.append(s)
    print(s, flush=True)


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, need_s: float, what: str) -> bool:
        if self.left() < need_s:
            md(f"\n*{what}: skipped, {self.left():.0f} s of the budget left (needs ~{need_s:.0f} s)*")
            return False
        return True


# ---------------------------------------------------------------------------------- timing
def timer(dev: torch.device):
    if dev.type == "cuda":
        def run(fn, reps: int = 20, warmup: int = 3) -> float:
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            return float(np.median(times))
    else:
        def run(fn, reps: int = 3, warmup: int = 1) -> float:
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return float(np.median(times))
    return run


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    ref = ref.double()
    if torch.isnan(out).any():
        return float("nan")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def graphed(fn, dev):
    """Capture fn in a CUDA graph (on CUDA); returns a replay callable."""
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


# ---------------------------------------------------------------------------------- 1
def ceilings(dev, smoke: bool) -> dict:
    t = timer(dev)
    n = (1 << 20) if smoke else (1 << 30)  # bytes per buffer
    a = torch.empty(n // 2, dtype=torch.bfloat16, device=dev).normal_()
    b = torch.empty_like(a)
    copy_s = t(lambda: b.copy_(a), reps=10 if not smoke else 3)
    copy_bw = 2 * n / copy_s
    m = 512 if smoke else 8192
    x = torch.randn(m, m, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32, device=dev)
    y = torch.randn_like(x)
    mm_s = t(lambda: x @ y, reps=10 if not smoke else 3)
    mm = 2 * m ** 3 / mm_s
    md("\n## 1. Ceilings measured in this run\n")
    md("| what | measured |\n|---|---|")
    md(f"| device copy (read + write) | {copy_bw / 1e12:.2f} TB/s |")
    md(f"| {m}^3 matmul ({'bf16' if dev.type == 'cuda' else 'fp32'}) | {mm / 1e12:.0f} TFLOP/s |")
    return {"copy_bw": copy_bw, "matmul": mm}


# ---------------------------------------------------------------------------------- 2
def kernels(dev, dtype, ceil, smoke: bool) -> None:
    from servesim.kernels import ops

    t = timer(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    impl = "triton" if dev.type == "cuda" else "torch"

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device=dev, dtype=torch.float32).to(dt)

    rows = []
    # rms_norm (fused residual add)
    for T, H in ([(64, 128)] if smoke else [(4096, 4096), (16384, 4096)]):
        x, r, w = rnd(T, H), rnd(T, H), rnd(H)
        o, h = ops.rms_norm(x, w, 1e-5, r, impl=impl)
        ro, rh = ops.rms_norm(x, w, 1e-5, r, impl="torch")
        err = max(rel_err(o, ro), rel_err(h, rh))
        s = t(lambda: ops.rms_norm(x, w, 1e-5, r, impl=impl))
        rows.append(("rms_norm + residual", f"T={T} H={H}", err, 4 * T * H * x.element_size() / s, s))
    # silu_mul
    for T, I in ([(64, 256)] if smoke else [(4096, 14336), (16384, 8192)]):
        gu = rnd(T, 2 * I)
        o = ops.silu_mul(gu, impl=impl)
        err = rel_err(o, ops.silu_mul(gu, impl="torch"))
        s = t(lambda: ops.silu_mul(gu, impl=impl))
        rows.append(("silu_mul", f"T={T} I={I}", err, 3 * T * I * gu.element_size() / s, s))
    # rope + KV write
    D, Hq, Hkv, bs = 128, 32, 8, 16
    for T in ([64] if smoke else [4096, 16384]):
        nb = T // bs + 8
        q, k, v = rnd(T, Hq, D), rnd(T, Hkv, D), rnd(T, Hkv, D)
        pos = torch.randint(0, 8192, (T,), generator=g, device=dev)
        cs = torch.randn(8192, D, generator=g, device=dev)
        kc = torch.zeros(nb, bs, Hkv, D, dtype=dtype, device=dev)
        vc = torch.zeros_like(kc)
        slots = torch.randperm(nb * bs, generator=g, device=dev)[:T]
        kc2, vc2 = kc.clone(), vc.clone()
        qo, ko = ops.rope_kv_write(q, k, v, pos, cs, kc, vc, slots, impl=impl)
        qr, kr = ops.rope_kv_write(q, k, v, pos, cs, kc2, vc2, slots, impl="torch")
        err = max(rel_err(qo, qr), rel_err(kc, kc2), rel_err(vc, vc2))
        s = t(lambda: ops.rope_kv_write(q, k, v, pos, cs, kc, vc, slots, impl=impl))
        nbytes = (2 * q.numel() + 3 * k.numel() + 2 * v.numel()) * q.element_size()
        rows.append(("rope + KV write", f"T={T} Hq={Hq} Hkv={Hkv}", err, nbytes / s, s))
    # paged decode attention, GQA 4, mixed lengths
    for B, ctx in ([(4, 100)] if smoke else [(8, 8192), (64, 4096), (256, 2048), (128, 8192)]):
        lens = torch.randint(ctx // 2, ctx * 3 // 2 + 1, (B,), generator=g, device=dev).to(torch.int32)
        mb = int(math.ceil(int(lens.max()) / bs))
        nb = B * mb
        kc, vc = rnd(nb, bs, Hkv, D), rnd(nb, bs, Hkv, D)
        bt = torch.randperm(nb, generator=g, device=dev).to(torch.int32).view(B, mb)
        q = rnd(B, Hq, D)
        o = ops.paged_decode_attention(q, kc, vc, bt, lens, D ** -0.5, impl=impl)
        err = rel_err(o, ops.paged_decode_attention(q, kc, vc, bt, lens, D ** -0.5, impl="torch"))
        s = t(lambda: ops.paged_decode_attention(q, kc, vc, bt, lens, D ** -0.5, impl=impl))
        nbytes = int(lens.sum()) * 2 * Hkv * D * q.element_size() + 2 * q.numel() * q.element_size()
        rows.append(("paged decode attention", f"B={B} ctx~{ctx} (mixed)", err, nbytes / s, s))
        del kc, vc
    # paged prefill attention over cached tokens: FLOP-bound, report TFLOP/s
    prow = []
    for n_seq, new, cached in ([(2, 32, 16)] if smoke else [(1, 4096, 0), (8, 512, 0), (4, 512, 2048)]):
        total = new + cached
        mb = int(math.ceil(total / bs))
        nb = n_seq * mb
        kc, vc = rnd(nb, bs, Hkv, D), rnd(nb, bs, Hkv, D)
        bt = torch.randperm(nb, generator=g, device=dev).to(torch.int32).view(n_seq, mb)
        q = rnd(n_seq * new, Hq, D)
        cu = torch.arange(0, n_seq + 1, device=dev, dtype=torch.int32) * new
        sl = torch.full((n_seq,), total, device=dev, dtype=torch.int32)
        o = ops.paged_prefill_attention(q, kc, vc, bt, cu, sl, D ** -0.5, impl=impl)
        err = rel_err(o, ops.paged_prefill_attention(q, kc, vc, bt, cu, sl, D ** -0.5, impl="torch"))
        s = t(lambda: ops.paged_prefill_attention(q, kc, vc, bt, cu, sl, D ** -0.5, impl=impl))
        flops = n_seq * 4 * D * Hq * (new * cached + new * (new + 1) / 2)
        prow.append((f"{n_seq} x {new} new over {cached} cached", err, flops / s, s))
    md("\n## 2. Kernels (random inputs, checked against the torch reference first)\n")
    md("| kernel | shape | rel. error vs reference | time | achieved | of copy bandwidth |")
    md("|---|---|---|---|---|---|")
    for name, shape, err, bw, s in rows:
        md(f"| {name} | {shape} | {err:.1e} | {s * 1e6:.1f} us | {bw / 1e12:.2f} TB/s | "
           f"{bw / ceil['copy_bw']:.0%} |")
    md("\n| paged prefill attention (causal, GQA 4, D 128) | rel. error | time | TFLOP/s | of matmul rate |")
    md("|---|---|---|---|---|")
    for shape, err, fl, s in prow:
        md(f"| {shape} | {err:.1e} | {s * 1e3:.2f} ms | {fl / 1e12:.0f} | {fl / ceil['matmul']:.0%} |")


# ---------------------------------------------------------------------------------- 3
def vs_hf(dev, dtype, smoke: bool) -> None:
    from transformers import LlamaForCausalLM

    from servesim.gpu_backend.model import LlamaModel
    from servesim.gpu_backend.weights import random_weights, save_hf_checkpoint

    cfg = json.loads((REPO / "sim" / "data" / "models" / "llama-3.2-1b.json").read_text())
    cfg = dict(cfg, num_hidden_layers=2)
    if smoke:
        cfg.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, vocab_size=256)
    w = random_weights(cfg, seed=1, dtype=torch.float32, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_checkpoint(w, cfg, tmp, num_shards=2)
        hf = LlamaForCausalLM.from_pretrained(tmp, torch_dtype=dtype).to(dev).eval()
        ours = LlamaModel(cfg, tmp, dtype=dtype, device=dev)
    ours.make_kv_pool(64, 16)
    blocks = list(range(20))  # 320 slots: the prompt and the 32 generated tokens
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg["vocab_size"], (1, 200), generator=g)
    with torch.no_grad():
        ref = hf(prompt.to(dev)).logits[0].float()
        # ours, one chunk over the whole prompt, logits for every position via 200 chunks
        # is wasteful: compare the last position and a 32-step greedy continuation
        out = ours.step([(prompt[0].tolist(), 0, blocks, True)], [])[0]
        err = rel_err(out, ref[-1])
        hf_gen = hf.generate(prompt.to(dev), max_new_tokens=32, do_sample=False, min_new_tokens=32)[0, 200:].tolist()
        mine = [int(out.argmax())]
        for i in range(31):
            pos = 200 + i
            lg = ours.step([], [(mine[-1], pos, blocks)])[0]
            mine.append(int(lg.argmax()))
    agree = sum(a == b for a, b in zip(mine, hf_gen))
    md("\n## 3. Model vs transformers LlamaForCausalLM (same weights, "
       f"{'fp32 tiny' if smoke else 'bf16, Llama-3.2-1B shapes, 2 layers'})\n")
    md(f"last-position logits rel. error {err:.2e}; greedy tokens agreeing over 32 steps: {agree}/32 "
       "(bf16 rounding can flip near-ties; CI checks token identity over 64 steps in fp32)")


# ---------------------------------------------------------------------------------- 4, 5
def plain_weights(model) -> dict:
    """Our model's weights laid out for the plain-PyTorch baseline: every linear ``[in, out]``
    (contiguous copies, so the step is ``x @ W``), norms and embedding shared."""
    w = model.weights
    return dict(layers=[dict(qkv=lw.qkv.t().contiguous(), o=lw.o.t().contiguous(),
                             gu=lw.gate_up.t().contiguous(), down=lw.down.t().contiguous(),
                             n1=lw.input_norm, n2=lw.post_norm) for lw in w.layers],
                embed=w.embed, head=w.lm_head.t().contiguous(), final_norm=w.final_norm)


PLAIN_FORMS = ("gqa", "grouped")


def plain_torch_decode(spec, pw: dict, lens, dev, dtype, *, padded: bool, form: str = "gqa", cos_sin=None,
                       ids=None, kv=None, logits: bool = False, seed: int = 3):
    """The best a careful engineer gets from torch alone (issue S10's baseline): cuBLAS
    ``x @ W`` with weights stored [in, out] (``pw``, `plain_weights`), ``F.rms_norm``, RoPE
    (HF's rotate-half form, q's and k's heads in one pass),
    the new token's K/V written into a contiguous cache ``[layers][batch, kv_heads, ctx,
    head_dim]``, ``F.scaled_dot_product_attention``, argmax at the end; the caller captures
    the whole step in one CUDA graph.

    ``padded``: sequences of lengths ``lens`` (their new token at position ``lens[b]``) in
    one cache padded to the longest, with a boolean attention mask; else every sequence has
    ``lens[0]`` cached tokens (the equal-length form: no mask). ``form``: ``"gqa"`` is
    ``sdpa(q [B, Hq, 1, D], K, V, enable_gqa=True)``; ``"grouped"`` puts a kv head's
    ``Hq / Hkv`` query heads on the query-length axis, ``sdpa(q [B, Hkv, G, D], K, V)`` (the
    same attention: query head h uses kv head h // G). ``cos_sin``: the rotary table (our
    model's, so both compute the same function); ``kv(layer) -> (K, V)``: the first positions
    of the caches (the rest random). ``logits``: return fp32 logits instead of token ids."""
    import torch.nn.functional as F

    d = spec
    L, H, Hq, Hkv, D, I = (d.num_layers, d.hidden_size, d.num_heads, d.num_kv_heads, d.head_dim,
                           d.intermediate_size)
    G = Hq // Hkv
    eps = float(getattr(d, "rms_norm_eps", 1e-5))
    B = int(lens.numel())
    g = torch.Generator(device=dev).manual_seed(seed)
    lens = lens.to(dev)
    if not padded:
        lens = torch.full_like(lens, int(lens[0]))
    Lc = int(lens.max()) + 1
    if padded:  # the masked cache's length a multiple of 16 (SDPA's kernels want the mask's rows aligned)
        Lc = -(-Lc // 16) * 16
    caches = []
    for i in range(L):
        # drawn in the cache's dtype directly: no fp32 temporary
        kc = torch.empty(B, Hkv, Lc, D, device=dev, dtype=dtype).normal_(generator=g)
        vc = torch.empty(B, Hkv, Lc, D, device=dev, dtype=dtype).normal_(generator=g)
        if kv is not None:
            k0, v0 = kv(i)
            kc[:, :, : k0.shape[2]] = k0
            vc[:, :, : v0.shape[2]] = v0
        caches.append((kc, vc))
    pos = lens.to(torch.int64)
    mask = (torch.arange(Lc, device=dev)[None, :] <= pos[:, None]).view(B, 1, 1, Lc) if padded else None
    if ids is None:
        ids = torch.randint(0, d.vocab_size, (B,), generator=g, device=dev)
    if cos_sin is None:
        inv = 1.0 / (float(getattr(d, "rope_theta", 10000.0)) ** (torch.arange(0, D, 2, device=dev).float() / D))
        ang = pos[:, None].float() * inv[None, :]
        cs = torch.cat([ang.cos(), ang.sin()], -1)
    else:
        cs = cos_sin[pos].float()
    cos = torch.cat([cs[:, : D // 2]] * 2, -1).to(dtype)[:, None, :]  # [B, 1, D]
    sin = torch.cat([cs[:, D // 2:]] * 2, -1).to(dtype)[:, None, :]
    bidx = torch.arange(B, device=dev)
    layers, emb, head, fnorm = pw["layers"], pw["embed"], pw["head"], pw["final_norm"]

    def rope(x):  # HF's rotate_half form
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def attend(q, kc, vc):
        if form == "gqa":
            return F.scaled_dot_product_attention(q.view(B, Hq, 1, D), kc, vc, attn_mask=mask, enable_gqa=True)
        return F.scaled_dot_product_attention(q.view(B, Hkv, G, D), kc, vc, attn_mask=mask)

    if form not in PLAIN_FORMS:
        raise ValueError(f"form must be one of {PLAIN_FORMS}, got {form!r}")

    def step():
        h = emb[ids]
        for i, p in enumerate(layers):
            kc, vc = caches[i]
            x = F.rms_norm(h, (H,), p["n1"], eps)
            qkv = x @ p["qkv"]
            # q's and k's heads rotated in one pass (5 kernels a layer, not 10): adjacent in qkv
            qk = rope(qkv[:, : (Hq + Hkv) * D].view(B, Hq + Hkv, D))
            q, k, v = qk[:, :Hq], qk[:, Hq:], qkv[:, (Hq + Hkv) * D:]
            kc[bidx, :, pos] = k
            vc[bidx, :, pos] = v.view(B, Hkv, D)
            h = h + attend(q, kc, vc).reshape(B, Hq * D) @ p["o"]
            x = F.rms_norm(h, (H,), p["n2"], eps)
            gu = x @ p["gu"]
            h = h + (F.silu(gu[:, :I]) * gu[:, I:]) @ p["down"]
        out = F.rms_norm(h, (H,), fnorm, eps) @ head
        return out.float() if logits else out.argmax(-1)

    return step


TINY_CFG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=128, vocab_size=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                max_position_embeddings=4096, tie_word_embeddings=False)


def model_cfg_spec(name: str, smoke: bool):
    """(HF config dict, ModelSpec) of a model, or of the tiny smoke model."""
    if smoke:
        from servesim.sim.specs import ModelSpec
        return dict(TINY_CFG), ModelSpec.from_hf_config(dict(TINY_CFG, model_type="llama"), "tiny")
    return json.loads((REPO / "sim" / "data" / "models" / f"{name}.json").read_text()), load_model(name)


def tiny_json(work: Path) -> Path:
    """The tiny smoke model as a config file for `sim run` (model: <path>)."""
    path = work / "tiny.json"
    path.write_text(json.dumps(dict(TINY_CFG, model_type="llama")))
    return path


def free_memory(dev) -> None:
    import gc
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def decode_setup(model, spec, lens, dev, g, bs: int = 16):
    """One decode iteration over a paged cache holding exactly the blocks each sequence needs
    (its cached tokens and the new one), placed at random; block tables padded with block 0.
    Returns (step, seq_lens, pool); the pool is also attached to the model."""
    p = paged_decode_inputs(model, spec, lens, dev, g, bs)
    return p["step"], p["seq"], p["pool"]


def paged_decode_inputs(model, spec, lens, dev, g, bs: int = 16, ids=None, argmax: bool = False) -> dict:
    """`decode_setup`'s iteration, with its inputs: dict(step, seq, pool, bt, pos, ids).
    ``argmax``: the step returns token ids (as the baseline does; greedy sampling's argmax,
    `greedy_argmax`) instead of logits."""
    from servesim.gpu_backend.model import greedy_argmax

    B = lens.numel()
    lens = lens.to(dev)
    nblk = (lens.to(torch.int64) + bs) // bs  # ceil((len + 1) / bs)
    total, mb = int(nblk.sum()), int(nblk.max())
    pool = model.make_kv_pool(total, bs)
    bt = torch.zeros(B, mb, dtype=torch.int32, device=dev)
    bt[torch.arange(mb, device=dev)[None, :] < nblk[:, None]] = \
        torch.randperm(total, generator=g, device=dev).to(torch.int32)
    pos = lens.to(torch.int64)
    slot = bt[torch.arange(B, device=dev), pos // bs].to(torch.int64) * bs + pos % bs
    seq = (lens + 1).to(torch.int32)
    if ids is None:
        ids = torch.randint(0, spec.vocab_size, (B,), generator=g, device=dev)

    def logits():
        return model.forward_decode(ids, pos, bt, seq, slot, pool)

    def step():
        return greedy_argmax(logits()) if argmax else logits()

    return dict(step=step, logits=logits, seq=seq, pool=pool, bt=bt, pos=pos, ids=ids)


def pool_as_contiguous(pool, bt, n_tokens: int):
    """``kv(layer) -> (K, V)`` reading a paged pool into the baseline's contiguous layout
    ``[B, Hkv, n_tokens, D]`` (the first ``n_tokens`` positions of each block table row)."""
    def kv(layer):
        out = []
        for c in (pool.k_caches[layer], pool.v_caches[layer]):
            x = c[bt.long()]  # [B, blocks, bs, Hkv, D]
            out.append(x.flatten(1, 2)[:, :n_tokens].permute(0, 2, 1, 3).contiguous())
        return out
    return kv


def bytes_read(spec, batch: int, kv_tokens: int) -> int:
    """Bytes a decode step must read: every weight once (an untied embedding table only the
    ``batch`` rows it gathers) and the KV of ``kv_tokens`` tokens."""
    emb = spec.embedding_params * spec.dtype_bytes
    w = spec.weight_bytes - (emb - batch * spec.hidden_size * spec.dtype_bytes if not spec.tie_word_embeddings else 0)
    return int(w + kv_tokens * spec.kv_bytes_per_token)


S10_GRID = ((1, 1024), (16, 1024), (64, 1024), (256, 1024), (1, 4096), (16, 4096), (64, 4096), (256, 4096))
S10_PROFILE = {"llama-3.2-1b": ((1, 1024), (256, 1024), (64, 4096)),
               "llama-3.1-8b": ((1, 1024), (256, 1024), (64, 4096))}
S10_BLOCK = 32  # tokens per KV block: the serving runs' (kv_cache.tokens_per_block)
# logits' relative error, ours vs the baseline on the same weights and KV: bf16 rounding through every layer
# (RoPE in fp32 vs bf16, fused vs separate residual add + RMSNorm, other attention kernels) stays well under;
# a baseline that computed something else (a wrong head grouping, mask or KV position) is off by ~1
CHECK_TOL = 0.15


def _check_plain(model, spec, pw, ours: dict, lens, dev, dtype, padded: bool) -> list[tuple]:
    """The baseline computes our model's function: its logits on our pool's KV (read into
    its contiguous cache) and our ids, both SDPA forms, vs ours. Raises if off."""
    ref = ours["logits"]().float()  # ours (writes the new token's KV: rewritten identically below)
    rows = []
    n_tok = int(lens.max()) + 1
    for form in PLAIN_FORMS:
        fn = plain_torch_decode(spec, pw, lens, dev, dtype, padded=padded, form=form, cos_sin=model.cos_sin,
                                ids=ours["ids"], kv=pool_as_contiguous(ours["pool"], ours["bt"], n_tok), logits=True)
        got = fn()
        err = rel_err(got, ref)
        agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
        rows.append((form, err, agree))
        if not err <= CHECK_TOL:
            raise AssertionError(f"plain-PyTorch baseline ({'padded' if padded else 'equal'}, {form}) differs from "
                                 f"our model on the same weights and KV: logits rel. error {err:.2e}")
        del fn, got
    return rows


def _roof_share(spec, B, kv_tokens, bw, s) -> float:
    return bytes_read(spec, B, kv_tokens) / bw / s


def decode_grid(dev, dtype, ceil, budget: Budget, smoke: bool, calib: list[dict], out: Path | None = None,
                work: Path | None = None, profile: bool = False, only_profile: bool = False,
                prefill: bool = False) -> None:
    """Section 4 (S10): graphed decode iterations of both models, ours (paged pool, lengths
    +-50%, the tuned decode-attention configs if section 12 ran, and the default ones; and
    the same batch with every length equal to the mean) against the plain-PyTorch baseline
    in its equal-length form (every sequence at the mean length: the same KV) and its
    mixed-length form (the same lengths, padded to the longest, masked), each in both SDPA
    forms, the faster reported. Before any timing, at one point per model, the baseline's
    logits on our pool's KV are checked against ours. ``profile``: section 14 at the
    points of S10_PROFILE (torch.profiler: kernel time vs graph wall time, per kernel)."""
    from servesim.gpu_backend.model import LlamaModel
    from servesim.kernels import decode_attention as da
    from servesim.kernels.gemv import GEMV_ENTRIES

    t = timer(dev)
    cuda = dev.type == "cuda"
    reps = 20 if not smoke else 2
    models = ["llama-3.2-1b", "llama-3.1-8b"] if not smoke else ["tiny"]
    grid = S10_GRID if not smoke else ((1, 32), (4, 64))
    prof_points = S10_PROFILE if not smoke else {"tiny": ((4, 64),)}
    bs = S10_BLOCK if not smoke else 16
    tuned = da.get_tuning()
    rows, checks, prof_rows, gemm_rows, gemm_md = [], [], [], [], []
    if not only_profile:
        md("\n## 4. Decode iterations vs roofline and an honest plain-PyTorch baseline (random weights, real "
           "shapes)\n")
        md(f"One graphed decode iteration (argmax included) per point. **Ours**: the paged pool of {bs}-token blocks "
           "(placed at random), lengths uniform in +-50% of the context; decode attention with the configs of "
           + (f"the tuning table installed ({tuned.get('made_by', '?')}, on {tuned.get('device', '?')})" if tuned
              else "*no tuning table (section 12 not run): the default configs*")
           + (f"; its small-M GEMM rows from {tuned['gemv_made_by']}" if tuned and tuned.get("gemv_made_by") else "")
           + (f"; its fused qkv + RoPE + KV-write rows from {tuned['qkv_rope_made_by']}"
              if tuned and tuned.get("qkv_rope_made_by") else "")
           + (f"; its fused-merge attention rows from {tuned['attention_merge_made_by']}"
              if tuned and tuned.get("attention_merge_made_by") else "")
           + ", and with the default attention configs; *ours, cuBLAS linears*: with every linear on cuBLAS after "
           "its own rmsnorm / silu_mul kernel and the RoPE + KV write its own kernel (the `gemv_entries` of "
           "sections 15-16 off; '-' without them); *ours, equal* is the same batch with every length at the mean. "
           "**Plain PyTorch** (issue S10's baseline, the same weights re-laid [in, out]): cuBLAS `x @ W`, "
           "`F.rms_norm`, RoPE, the new K/V written into a contiguous `[batch, kv_heads, ctx, head_dim]` cache, "
           "`F.scaled_dot_product_attention`, argmax, one CUDA graph; *equal*: every sequence at the mean length "
           "(the same KV bytes as ours, no mask); *padded*: our lengths, the cache padded to the longest, a "
           "boolean mask. Each in both SDPA forms (`gqa`: `enable_gqa=True` on [B, Hq, 1, D] queries; `grouped`: "
           "a kv head's query heads as the query-length axis, [B, Hkv, G, D]), the faster shown. **Share** = "
           "(bytes read: weights once -- of an untied embedding only the gathered rows -- and the useful KV) / "
           "copy bandwidth / time; for *padded* the useful KV is ours. ratio = baseline time / ours.\n")
    try:  # the tables of what was measured are written also when a check failed
        for name in models:
            if not budget.allows(45 if not only_profile else 20, f"decode grid {name}"):
                break
            cfg, spec = model_cfg_spec(name, smoke)
            model = LlamaModel(cfg, None, dtype=dtype, device=dev, seed=0)
            pw = plain_weights(model)
            g = torch.Generator(device=dev).manual_seed(1)
            kv_tok = spec.kv_bytes_per_token
            free = (torch.cuda.mem_get_info(dev)[0] if cuda else 64e9) - 3e9
            points = prof_points.get(name, ()) if only_profile else grid
            checked = False
            for B, ctx in points:
                if budget.left() < 20:
                    md(f"\n*{name} {B} x {ctx} and later points: skipped, {budget.left():.0f} s of the budget left*")
                    break
                lens = torch.randint(ctx // 2, ctx * 3 // 2 + 1, (B,), generator=g, device=dev).to(torch.int32)
                L_eq = int(round(float(lens.float().mean())))
                eq = torch.full_like(lens, L_eq)
                kv_mixed, kv_eq = int(lens.sum()) + B, B * (L_eq + 1)
                Lmax = int(lens.max()) + 1
                need = max(kv_mixed, B * Lmax) * kv_tok
                r = dict(model=name, batch=B, ctx=ctx, kv_tokens=kv_mixed, kv_tokens_equal=kv_eq, longest=Lmax - 1)
                if need > free:
                    r["note"] = f"skipped: KV {need / 1e9:.0f} GB > {free / 1e9:.0f} GB free"
                    rows.append(r)
                    continue
                try:
                    with torch.no_grad():
                        # ours, mixed lengths: tuned, then default attention configs
                        o = paged_decode_inputs(model, spec, lens, dev, g, bs, argmax=True)
                        if not checked and (B >= 4 or smoke):
                            o["pool"].kv.normal_(generator=g)
                            checks += [(name, B, ctx, "padded", *c) for c in
                                       _check_plain(model, spec, pw, o, lens, dev, dtype, padded=True)]
                        r["ours_s"] = t(graphed(o["step"], dev), reps=reps)
                        if cuda:
                            r.update(programmatic_launch_point(o, dev, t, reps))
                        if tuned:
                            da.set_tuning({**tuned, "entries": {}})  # default attention, the same linears
                            try:
                                r["ours_default_s"] = t(graphed(o["step"], dev), reps=reps)
                            finally:
                                da.set_tuning(tuned)
                        else:
                            r["ours_default_s"] = r["ours_s"]
                        if tuned and tuned.get(GEMV_ENTRIES):
                            da.set_tuning({**tuned, GEMV_ENTRIES: {}})  # every linear unfused, on cuBLAS
                            try:
                                r["ours_cublas_s"] = t(graphed(o["step"], dev), reps=reps)
                            finally:
                                da.set_tuning(tuned)
                        r["ours_eager_s"] = t(o["step"], reps=5 if not smoke else 1)
                        if profile and (B, ctx) in prof_points.get(name, ()):
                            prof_rows += profile_step(o["step"], dev, work, name, B, ctx, "ours", r["ours_s"])
                        model.kv_pool = None
                        o = None
                        free_memory(dev)
                        if not only_profile:
                            # ours, equal lengths
                            o = paged_decode_inputs(model, spec, eq, dev, g, bs, argmax=True)
                            if not checked and (B >= 4 or smoke):
                                o["pool"].kv.normal_(generator=g)
                                checks += [(name, B, ctx, "equal", *c) for c in
                                           _check_plain(model, spec, pw, o, eq, dev, dtype, padded=False)]
                                checked = True
                            r["ours_equal_s"] = t(graphed(o["step"], dev), reps=reps)
                            model.kv_pool = None
                            o = None
                            free_memory(dev)
                        # the baseline, both forms, equal and padded
                        for padded, key in ((False, "plain_equal"), (True, "plain_padded")):
                            if only_profile and not padded:
                                continue
                            best = None
                            for form in PLAIN_FORMS:  # one cache at a time: each can take half the memory
                                fn = plain_torch_decode(spec, pw, lens if padded else eq, dev, dtype, padded=padded,
                                                        form=form, cos_sin=model.cos_sin)
                                s = t(graphed(fn, dev), reps=reps)
                                r[f"{key}_{form}_s"] = s
                                if best is None or s < best[0]:
                                    best = (s, form)
                                fn = None
                                free_memory(dev)
                            r[f"{key}_s"], r[f"{key}_form"] = best
                            if profile and padded and (B, ctx) in prof_points.get(name, ()):
                                fn = plain_torch_decode(spec, pw, lens, dev, dtype, padded=True, form=best[1],
                                                        cos_sin=model.cos_sin)
                                prof_rows += profile_step(fn, dev, work, name, B, ctx, f"plain padded ({best[1]})",
                                                          best[0])
                                fn = None
                                free_memory(dev)
                except torch.OutOfMemoryError as e:
                    r["note"] = "out of memory: " + str(e).splitlines()[0][:100]
                except AssertionError:
                    raise  # the baseline does not compute our model's function: nothing here is comparable
                except Exception as e:  # noqa: BLE001 - keep the other points; the log has the traceback
                    log(traceback.format_exc())
                    r["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                model.kv_pool = None
                o = fn = None
                free_memory(dev)
                rows.append(r)
                if "ours_s" in r:
                    for gflag, key in ((True, "ours_s"), (False, "ours_eager_s")):
                        if key in r:
                            calib.append(dict(model=name, kind="decode", n_decode=B, kv_sum=kv_mixed, ctx_tokens=0,
                                              ctx_prior=0, graph=gflag, time_s=r[key]))
            if prefill and budget.allows(20, f"prefill grid {name}"):  # section 5: the calibration's prefill points
                prefill_grid(model, spec, name, dev, t, calib, smoke, ceil)
            model = pw = None
            free_memory(dev)
            if profile and budget.left() > 15:
                g_rows, g_md = gemm_layouts(spec, name, dev, dtype, ceil, smoke)
                gemm_rows += g_rows
                gemm_md += g_md
    finally:
        if not only_profile:
            _grid_tables(rows, checks, ceil, smoke, out)
        if profile:
            _profile_tables(prof_rows, out)
            for line in gemm_md:
                md(line)
            if out is not None and gemm_rows:
                import pandas as pd
                pd.DataFrame(gemm_rows).to_csv(out / "gemm_layouts.csv", index=False)


def programmatic_launch_point(o: dict, dev, t, reps: int) -> dict:
    """Section 4's *ours, PDL* column: the same iteration captured with programmatic dependent
    launch (kernels/_common.py `PDL`: the decode-path Triton kernels launched with ``launch_pdl``,
    each waiting on its predecessor with ``griddepcontrol.wait``, the GEMM's first weight tile
    loaded before the wait), its logits checked bit for bit against the plain launch's first,
    then timed. Returns ``ours_pdl_s`` (only when identical), ``pdl_identical`` / ``pdl_note``."""
    from servesim.kernels import _gdc
    from servesim.kernels._common import programmatic_launch

    if not _gdc.AVAILABLE:
        return {"pdl_note": "this Triton has no grid dependency control"}
    outs, res = {}, {}
    try:
        for on in (False, True):
            holder = {}

            def f():
                holder["y"] = o["logits"]()

            with programmatic_launch(on):
                rep = graphed(f, dev)
            rep()
            torch.cuda.synchronize()
            outs[on] = holder["y"].clone()
            if on:
                res["pdl_identical"] = bool(torch.equal(outs[False], outs[True]))
                if res["pdl_identical"]:
                    res["ours_pdl_s"] = t(rep, reps=reps)
                else:
                    res["pdl_note"] = f"logits differ: rel. error {rel_err(outs[True], outs[False]):.1e}"
            rep = None
    except Exception as e:  # noqa: BLE001 -- a failed capture is a result of the table, not the end of the run
        res["pdl_note"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
    return res


def _grid_tables(rows: list[dict], checks: list[tuple], ceil, smoke: bool, out: Path | None) -> None:
    bw = ceil["copy_bw"]
    md("\n**Check before timing** (one point per model): the baseline's logits on our pool's KV and our ids vs "
       f"our model's (fails above {CHECK_TOL:g} relative error).\n")
    md("| model | batch | context | baseline | SDPA form | logits rel. error | argmax agree |\n|---|---|---|---|---|---|---|")
    for name, B, ctx, kind, form, err, agree in checks:
        md(f"| {name} | {B} | {ctx} | {kind} | {form} | {err:.1e} | {agree:.0%} |")
    md("\n| model | batch | context | ours | share | ours, PDL | share | ours, default attn | ours, cuBLAS linears | "
       "ours, equal lengths | plain, equal | share | plain, padded | share | ours vs plain equal | ours vs plain padded |")
    md("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    specs = {}
    for r in rows:
        name, B, ctx = r["model"], r["batch"], r["ctx"]
        if "ours_s" not in r:
            md(f"| {name} | {B} | {ctx} | *{r.get('note', 'not run')}* |" + " |" * 13)
            continue
        spec = specs.setdefault(name, model_cfg_spec(name, smoke)[1])
        kv_m = r["kv_tokens"]

        def ms(key):
            return f"{r[key] * 1e3:.2f} ms" if key in r else "-"

        def sh(key, kv):
            return f"{_roof_share(spec, B, kv, bw, r[key]):.0%}" if key in r else "-"

        kv_e = r["kv_tokens_equal"]
        pe = f"{ms('plain_equal_s')} ({r.get('plain_equal_form', '-')})" if "plain_equal_s" in r else "-"
        pp = f"{ms('plain_padded_s')} ({r.get('plain_padded_form', '-')})" if "plain_padded_s" in r else "-"
        ve = f"**{r['plain_equal_s'] / r['ours_s']:.2f}x**" if "plain_equal_s" in r else "-"
        vp = f"**{r['plain_padded_s'] / r['ours_s']:.2f}x**" if "plain_padded_s" in r else "-"
        pdl = ms("ours_pdl_s") if "ours_pdl_s" in r else (f"*{r['pdl_note']}*" if "pdl_note" in r else "-")
        md(f"| {name} | {B} | {ctx} | {ms('ours_s')} | {sh('ours_s', kv_m)} | {pdl} | {sh('ours_pdl_s', kv_m)} | "
           f"{ms('ours_default_s')} | "
           f"{ms('ours_cublas_s')} | {ms('ours_equal_s')} | {pe} | {sh('plain_equal_s', kv_e)} | {pp} | {sh('plain_padded_s', kv_m)} | "
           f"{ve} | {vp} |")
    done = [r for r in rows if "plain_equal_s" in r and "plain_padded_s" in r]
    if done:
        ve = min(r["plain_equal_s"] / r["ours_s"] for r in done)
        vp = min(r["plain_padded_s"] / r["ours_s"] for r in done)
        md(f"\nAcross the {len(done)} points: ours vs plain equal >= **{ve:.2f}x** (target >= 1.00x), vs plain "
           f"padded >= **{vp:.2f}x** (target >= 1.10x).")
        for name, lo, what in (("llama-3.1-8b", 16, "from batch 16 up (target >= 85%)"),
                               ("llama-3.2-1b", 1, "at batch 1 (target >= 65%)")):
            pts = [r for r in done if r["model"] == name and (r["batch"] >= lo if lo > 1 else r["batch"] == 1)]
            if pts:
                spec = specs[name]
                shares = [_roof_share(spec, r["batch"], r["kv_tokens"], bw, r["ours_s"]) for r in pts]
                md(f"{name} share of roofline {what}: {min(shares):.0%}-{max(shares):.0%}.")
                pd_ = [_roof_share(spec, r["batch"], r["kv_tokens"], bw, r["ours_pdl_s"]) for r in pts if "ours_pdl_s" in r]
                if pd_:
                    md(f"{name} share of roofline {what}, with programmatic dependent launch: {min(pd_):.0%}-{max(pd_):.0%}.")
        pdl = [r for r in done if "ours_pdl_s" in r]
        if pdl:
            sp = [r["ours_s"] / r["ours_pdl_s"] for r in pdl]
            md(f"Programmatic dependent launch (*ours, PDL*; logits bit-identical at {len(pdl)} of {len(done)} points, "
               f"the others not timed): {min(sp):.2f}x-{max(sp):.2f}x the plain launch's speed; vs plain equal >= "
               f"**{min(r['plain_equal_s'] / r['ours_pdl_s'] for r in pdl):.2f}x**, vs plain padded >= "
               f"**{min(r['plain_padded_s'] / r['ours_pdl_s'] for r in pdl):.2f}x**.")
    if out is not None:
        import pandas as pd
        pd.DataFrame(rows).to_csv(out / "decode_grid.csv", index=False)


def prefill_grid(model, spec, name, dev, t, calib, smoke, ceil) -> None:
    bs = 16
    grid = ([(32, 0, 1), (16, 32, 2)] if smoke else
            [(256, 0, 1), (1024, 0, 1), (4096, 0, 1), (8192, 0, 1), (512, 2048, 1), (2048, 4096, 1),
             (512, 0, 8)])
    md(f"\n| {name} prefill (eager) | time | TFLOP/s (linears + attention) | of matmul rate |\n|---|---|---|---|")
    for new, prior, n_seq in grid:
        total = new + prior
        mb = int(math.ceil(total / bs))
        pool = model.make_kv_pool(n_seq * mb + 1, bs)
        chunks = []
        for s in range(n_seq):
            blocks = list(range(s * mb, (s + 1) * mb))
            chunks.append(([1] * new, prior, blocks, True))
        with torch.no_grad():
            s_ = t(lambda: model.step(chunks, []), reps=5 if not smoke else 2)
        del pool
        model.kv_pool = None
        tokens = new * n_seq
        fl = 2 * (spec.params - spec.embedding_params) * tokens + n_seq * 4 * spec.head_dim * spec.num_heads * \
            spec.num_layers * (new * prior + new * (new + 1) / 2)
        md(f"| {n_seq} x {new} new over {prior} cached | {s_ * 1e3:.2f} ms | {fl / s_ / 1e12:.0f} | "
           f"{fl / s_ / ceil['matmul']:.0%} |")
        calib.append(dict(model=name, kind="prefill", n_decode=0, kv_sum=0, ctx_tokens=tokens,
                          ctx_prior=prior * n_seq, n_chunks=n_seq, chunk_tokens=new, graph=False, time_s=s_))


# ---------------------------------------------------------------------------------- 6
def end_to_end(out: Path, work: Path, smoke: bool, budget: Budget) -> None:
    md("\n## 6. End to end: the same requests on the GPU and on the simulator\n")
    runs = work / "runs"
    # this device's hardware spec (the GPU backend refuses another card's; the sim replays the same card)
    common = ["--set", "workload.num_requests=" + ("12" if smoke else "400"), "--set", "output.plots=true",
              "--set", f"hardware={hardware_here()}"]
    if smoke:
        tiny = tiny_json(work)
        common += ["--set", f"model={tiny}", "--set", "kv_cache.pool_tokens=20000",
                   "--set", "workload.max_prompt_len=200", "--set", "workload.max_output_len=20"]
    only = "online-ifb-guaranteed,offline-ifb-guaranteed,offline-static"
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the subprocess needs the memory this process cached
    for backend in ("gpu", "sim"):
        cmd = [sys.executable, "-m", "servesim.sim.cli", "run", "experiments/ifb_vs_static.yaml", "--backend",
               backend, "--only", only, "--out", str(runs / backend), *common]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                           timeout=max(30, budget.left() - 20), env={**os.environ, "COLUMNS": "200"})
        log(p.stdout[-6000:], p.stderr[-4000:])
        md(f"`sim run experiments/ifb_vs_static.yaml --backend {backend} --only {only} "
           f"{' '.join(common)}` ({time.perf_counter() - t0:.0f} s, exit {p.returncode})\n")
        md("```\n" + "\n".join(line for line in p.stdout.splitlines() if "│" in line or "┃" in line) + "\n```")
        if p.returncode != 0:
            return
    for v in only.split(","):
        p = subprocess.run([sys.executable, "-m", "servesim.sim.cli", "compare", str(runs / "gpu" / v),
                            str(runs / "sim" / v), "--out", str(runs / f"compare-{v}")], cwd=REPO,
                           capture_output=True, text=True, env={**os.environ, "COLUMNS": "160"})
        md(f"\n`sim compare` GPU (A) vs roofline sim (B), {v}:\n```\n{p.stdout[-3500:]}\n```")
    with tarfile.open(out / "runs.tar.gz", "w:gz") as tf:
        tf.add(runs, arcname="runs")


# ---------------------------------------------------------------------------------- 7
def vs_hf_generate(work: Path, dev, dtype, smoke: bool, budget: Budget) -> None:
    """Offline throughput: our engine vs HF generate (static cache) on the same requests.

    HF runs the requests in trace order (the naive baseline: no sorting by length), in
    batches each padded to its longest prompt and run to its longest output. When the time
    budget stops it early, ours runs exactly the requests HF completed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from servesim.traces.readers import read_trace

    n = 16 if smoke else 1000
    df = read_trace(REPO / "traces" / "data" / "AzureLLMInferenceTrace_conv.csv").head(n)
    n = len(df)
    cap_p, cap_o = (100, 16) if smoke else (2048, 512)
    plen = np.minimum(df["prompt_len"].to_numpy(), cap_p)
    olen = np.minimum(df["output_len"].to_numpy(), cap_o)
    cfg = json.loads((REPO / "sim" / "data" / "models" / "llama-3.2-1b.json").read_text())
    if smoke:
        cfg.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, vocab_size=256, num_hidden_layers=2)
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)}))
    hf = hf.to(dtype=dtype, device=dev).eval()
    batch = 8 if smoke else 128

    def reserve(hf_s: float) -> float:
        # ours on the same requests: start-up (weights, Triton, graph capture) + ~1/3 of HF's time
        return 45 + hf_s / 3

    hf_s, last_s, done, sizes, stop = 0.0, 0.0, 0, [], ""
    with torch.no_grad():
        while done < n:
            if budget.left() < last_s + reserve(hf_s + last_s):
                stop = f"HF stopped after {done} requests: {budget.left():.0f} s of the budget left"
                break
            j = min(done + batch, n)
            P, O = int(plen[done:j].max()), int(olen[done:j].max())
            ids = torch.randint(0, cfg["vocab_size"], (j - done, P), device=dev)
            t0 = time.perf_counter()
            try:
                hf.generate(ids, max_new_tokens=O, min_new_tokens=O, do_sample=False,
                            cache_implementation="static", pad_token_id=0)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            except torch.OutOfMemoryError:
                if batch == 1:
                    raise
                batch //= 2  # retry the same requests in smaller batches
                ids = None
                free_memory(dev)
                log(f"HF generate: out of memory, batches of {batch} from request {done}")
                continue
            last_s = time.perf_counter() - t0
            hf_s += last_s
            sizes.append(j - done)
            done = j
    del hf
    free_memory(dev)  # the subprocess needs the memory this process cached
    md("\n## 7. Offline throughput vs Hugging Face `generate` (static cache)\n")
    m = done
    if m == 0:
        md(f"*no request compared: {stop}*")
        return
    # ours: exactly the requests HF ran (the first m, in trace order), offline, through sim run --backend gpu
    table = work / "hf_reqs.csv"
    import pandas as pd
    pd.DataFrame({"request_id": np.arange(m), "arrival_s": np.zeros(m), "prompt_len": plen[:m],
                  "output_len": olen[:m]}).to_csv(table, index=False)
    exp = work / "hf_cmp.yaml"
    model = "llama-3.2-1b"
    extra = "kv_cache: {pool_tokens: 1048576}\n"
    if smoke:
        model = str(tiny_json(work))
        extra = "kv_cache: {pool_tokens: 20000}\n"
    exp.write_text(f"name: vs_hf\nmodel: {model}\nhardware: {hardware_here()}\nworkload: {{trace: {table}}}\n"
                   f"scheduler: {{max_batch_size: 256, max_num_tokens: 8192}}\noutput: {{plots: false}}\n{extra}")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "servesim.sim.cli", "run", str(exp), "--backend", "gpu",
                        "--out", str(work / "vs_hf")], cwd=REPO, capture_output=True, text=True,
                       timeout=max(60, budget.left() + 20))
    log(p.stdout[-3000:], p.stderr[-3000:])
    summary = work / "vs_hf" / "base" / "summary.json"
    if p.returncode != 0 or not summary.exists():
        raise RuntimeError(f"sim run --backend gpu exited {p.returncode}:\n{p.stderr[-2500:]}")
    ours = json.loads(summary.read_text())
    ours_tok_s = ours["throughput_out_tok_s"]
    out_tok = int(olen[:m].sum())
    hf_tok_s = out_tok / hf_s
    if len(set(sizes[:-1])) <= 1:  # one batch size (the last batch may be smaller)
        sz_txt = f"{sizes[0]}" + (f" (the last of {sizes[-1]})" if sizes[-1] != sizes[0] else "")
    else:  # smaller after running out of memory
        sz_txt = f"{', '.join(map(str, sizes))} (smaller after running out of memory)"
    md(f"Compared on **{m} requests**: the first {m} of {n} Azure-conversation requests, in trace order"
       + (f" ({stop})" if stop else "") + f"; prompts capped at {cap_p} and outputs at {cap_o} tokens "
       f"({out_tok:,} output tokens). {'Tiny model' if smoke else 'Llama-3.2-1B shapes'}, random weights, "
       f"{str(dtype).replace('torch.', '')}. "
       f"HF: batches of {sz_txt} in trace order, each padded to its longest prompt and run to its longest output "
       f"({hf_s:.0f} s); tokens/s counts each request's own output tokens. Ours: `sim run --backend gpu` on the "
       f"same requests, all arriving at 0 ({time.perf_counter() - t0:.0f} s with start-up).\n")
    md("| engine | requests | output tokens/s | ratio |\n|---|---|---|---|")
    md(f"| HF generate, static cache | {m} | {hf_tok_s:,.0f} | 1.00x |")
    fin, nreq = int(ours.get("num_finished", m)), int(ours.get("num_requests", m))
    md(f"| servesim --backend gpu (in-flight batching, paged KV, graphs) | "
       f"{fin if fin == nreq == m else f'{fin} finished of {nreq}'} | {ours_tok_s:,.0f} | "
       f"{ours_tok_s / hf_tok_s:.2f}x |")


# ---------------------------------------------------------------------------------- 8
def short_kernel_name(name: str, width: int = 60) -> str:
    """A kernel's name without `void`, namespaces' noise, template and call arguments."""
    n = name.replace("(anonymous namespace)::", "").strip()
    if n.startswith("void "):
        n = n[5:]
    for ch in "<(":
        i = n.find(ch)
        if i > 0:
            n = n[:i]
    for prefix in ("at::native::", "at::cuda::"):
        n = n.replace(prefix, "")
    n = n.replace("|", "/")
    return n if len(n) <= width else n[: width - 3] + "..."


def kernel_class(name: str, cuda: bool) -> str:
    n = name.lower()
    if cuda:
        if "splitkreduce" in n:
            return "GEMM (split-K reduce)"
        if re.search(r"gemm|gemv|nvjet|xmma|cutlass|cublas", n):
            return "GEMM (split-K reduce)" if "reduce" in n else "GEMM"
    elif n in ("aten::mm", "aten::addmm"):
        return "GEMM"
    if "attn" in n or "attention" in n or "decode_split" in n or "decode_reduce" in n:
        return "attention"
    if "norm" in n:
        return "rms_norm"
    if "rope" in n:
        return "rope + KV write"
    if "silu" in n:
        return "silu_mul"
    return "other"


def profiled_kernels(prof, cuda: bool, trace: Path) -> list[tuple[str, float, float]]:
    """(name, start us, duration us) of every GPU kernel, memcpy and memset in the profile, by start
    time (from its Chrome trace, which holds graph replays' kernels where this torch records
    them); on CPU, every op with its self CPU time (aten ops stand in for kernels)."""
    if cuda:
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
        ks = [(str(e.get("name", "?")), float(e.get("ts", 0.0)), float(e.get("dur", 0.0))) for e in events
              if e.get("ph") == "X" and str(e.get("cat", "")).lower() in ("kernel", "gpu_memcpy", "gpu_memset")]
    else:
        ks = [(e.name, float(e.time_range.start), float(e.self_cpu_time_total)) for e in prof.events()
              if e.self_cpu_time_total > 0]
    return sorted(ks, key=lambda k: k[1])


def profile_decode(dev, dtype, ceil, work: Path, smoke: bool) -> None:
    """Where the time of a batch-1 decode iteration goes: kernels, their bounds, the gaps."""
    from torch.profiler import ProfilerActivity, profile

    from servesim.gpu_backend.model import LlamaModel

    cuda = dev.type == "cuda"
    name = "llama-3.2-1b"
    cfg, spec = model_cfg_spec(name, smoke)
    model = LlamaModel(cfg, None, dtype=dtype, device=dev, seed=0)
    ctx = 64 if smoke else 1024
    g = torch.Generator(device=dev).manual_seed(1)
    lens = torch.full((1,), ctx, dtype=torch.int32, device=dev)
    step, seq, pool = decode_setup(model, spec, lens, dev, g)
    t = timer(dev)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    runs: dict[str, tuple[list, int]] = {}
    with torch.no_grad():
        replay = graphed(step, dev)
        wall_g = t(replay, reps=100 if cuda else 3)
        wall_e = t(step, reps=20 if cuda else 3)
        for label, fn, n in (("graph", replay, 20 if cuda else 2), ("eager", step, 5 if cuda else 2)):
            for _ in range(3):
                fn()
            sync()
            with profile(activities=acts) as prof:
                for _ in range(n):
                    fn()
                sync()
            runs[label] = (profiled_kernels(prof, cuda, work / f"profile_{label}.json"), n)
    kv_tok = spec.kv_bytes_per_token
    bw = ceil["copy_bw"]
    kv_bytes = int(seq.sum()) * kv_tok
    roof = (spec.weight_bytes + kv_bytes) / bw
    us = 1e6
    wall = wall_g * us  # per iteration, timed without the profiler
    what = "kernel" if cuda else "op"
    md(f"\n## 8. Profile of {'Llama-3.2-1B' if not smoke else 'the tiny model'} decode at batch 1 "
       f"(context {ctx}, paged cache)\n")
    md(f"Timed without the profiler: graph {wall:.0f} us per iteration, eager {wall_e * us:.0f} us; roofline "
       f"(weights {spec.weight_bytes / 1e9:.2f} GB + KV {kv_bytes / 1e6:.1f} MB) / copy bandwidth = "
       f"{roof * us:.0f} us, so the graph runs at {roof / wall_g:.0%} of the roofline.")
    ks, n = runs["graph"]
    src = "graph"
    if not cuda:
        md("\n*CPU smoke: no CUDA graph (the graph step is the eager step) and no GPU kernels: aten ops by "
           "self CPU time stand in for kernels.*")
    elif ks:
        md(f"\nPer-kernel times: torch.profiler (CUDA activities) over {n} graph replays; this torch "
           "records the kernels inside the graph.")
    else:
        ks, n = runs["eager"]
        src = "eager"
        md(f"\nPer-kernel times: the graph replays showed no kernel events in this torch's profiler, so they "
           f"come from {n} eager steps (the same kernels, launched one by one); the iteration's total is "
           "the graph's wall time above.")
    if not ks:
        md("*the profiler recorded no kernels*")
        return
    per: dict[str, list] = {}
    for k_name, _, dur in ks:
        e = per.setdefault(k_name, [0, 0.0])
        e[0] += 1
        e[1] += dur
    k_sum = sum(v[1] for v in per.values()) / n
    md(f"\n| {what} | class | per iteration | us per iteration | share of iteration |\n|---|---|---|---|---|")
    top = sorted(per.items(), key=lambda kv: -kv[1][1])
    for k_name, (cnt, tot) in top[:15]:
        md(f"| `{short_kernel_name(k_name)}` | {kernel_class(k_name, cuda)} | {cnt / n:g} | {tot / n:.1f} | "
           f"{tot / n / wall:.1%} |")
    if len(top) > 15:
        rest = sum(v[1] for _, v in top[15:]) / n
        md(f"| {len(top) - 15} other {what}s | | {sum(v[0] for _, v in top[15:]) / n:g} | {rest:.1f} | "
           f"{rest / wall:.1%} |")
    md(f"| **all {what}s** | | {len(ks) / n:g} | {k_sum:.1f} | {k_sum / wall:.1%} |")
    md(f"| **gaps: graph wall time - {what}s** | | | {wall - k_sum:.1f} | {(wall - k_sum) / wall:.1%} |")
    # gaps seen in the trace: between consecutive kernels of one replay
    per_it = len(ks) // n
    if src == "graph" and cuda and per_it * n == len(ks) and per_it > 1:
        gaps, spans = [], []
        for i in range(n):
            it = ks[i * per_it:(i + 1) * per_it]
            gaps += [it[j + 1][1] - (it[j][1] + it[j][2]) for j in range(per_it - 1)]
            spans.append(it[-1][1] + it[-1][2] - it[0][1])
        md(f"\nIn the trace, one replay spans {np.median(spans):.0f} us from its first kernel's start to its last "
           f"kernel's end; between its {per_it} kernels: median gap {np.median(gaps):.2f} us, "
           f"{sum(gaps) / n:.0f} us per iteration in all.")
    ke, ne = runs["eager"]
    e_sum = sum(k[2] for k in ke) / ne
    md(f"\nEager step: {what}s {e_sum:.0f} us of {wall_e * us:.0f} us wall ({len(ke) / ne:g} {what}s per "
       "iteration): the rest is host time (Python, dispatch, launches), which the graph removes.")

    # GEMMs: weight bytes / kernel time, per GEMM where the kernels map onto the model's linears in order
    w = model.weights
    linears: list[tuple[str, torch.Tensor]] = []
    for lw in w.layers:
        linears += [("qkv", lw.qkv), ("o", lw.o), ("gate_up", lw.gate_up), ("down", lw.down)]
    linears.append(("lm_head", w.lm_head))
    calls: list[list] = []  # [name, us] per GEMM call, split-K reductions added to their GEMM
    for k_name, _, dur in ks:
        c = kernel_class(k_name, cuda)
        if c == "GEMM":
            calls.append([k_name, dur])
        elif c == "GEMM (split-K reduce)" and calls:
            calls[-1][1] += dur
    gemm_bytes = sum(x.numel() * x.element_size() for _, x in linears)
    gemm_us = sum(c[1] for c in calls) / n
    md(f"\n| GEMM | {what}(s) | per iteration | weight MB per call | us per call | achieved | "
       "of copy bandwidth |\n|---|---|---|---|---|---|---|")
    if len(calls) == n * len(linears):
        for kind in ("qkv", "o", "gate_up", "down", "lm_head"):
            idx = [i for i, (k, _) in enumerate(linears) if k == kind]
            durs = [calls[r * len(linears) + i][1] for r in range(n) for i in idx]
            names = sorted({short_kernel_name(calls[r * len(linears) + i][0], 40) for r in range(n) for i in idx})
            b = linears[idx[0]][1].numel() * linears[idx[0]][1].element_size()
            d = float(np.mean(durs))
            md(f"| {kind} {tuple(linears[idx[0]][1].shape)} | {', '.join(f'`{x}`' for x in names[:2])}"
               f"{' ...' if len(names) > 2 else ''} | {len(idx)} | {b / 1e6:.1f} | {d:.1f} | "
               f"{b / d * us / 1e12:.2f} TB/s | {b / d * us / bw:.0%} |")
    else:
        md(f"| *{len(calls) / n:g} GEMM {what}s per iteration found, {len(linears)} linears expected: "
           "per-GEMM attribution skipped* | | | | | | |")
    if gemm_us > 0:
        md(f"| **all GEMMs** | | {len(calls) / n:g} | {gemm_bytes / 1e6:.1f} in all | {gemm_us:.1f} in all | "
           f"{gemm_bytes / gemm_us * us / 1e12:.2f} TB/s | {gemm_bytes / gemm_us * us / bw:.0%} |")

    # where the time over the roofline goes
    cls_us: dict[str, float] = {}
    for k_name, _, dur in ks:
        c = kernel_class(k_name, cuda)
        c = "GEMM" if c.startswith("GEMM") else c
        cls_us[c] = cls_us.get(c, 0.0) + dur / n
    bounds = {"GEMM": gemm_bytes / bw * us, "attention": kv_bytes / bw * us}
    parts = [(c, cls_us[c], bounds.get(c, 0.0)) for c in sorted(cls_us, key=lambda c: -cls_us[c])]
    parts.append(("gaps between " + what + "s", wall - k_sum, 0.0))
    over = wall - roof * us
    md(f"\n| part of the iteration | us | bound at copy bandwidth | over its bound | share of the {over:.0f} us "
       "over the roofline |\n|---|---|---|---|---|")
    for c, t_us, b_us in parts:
        md(f"| {c} | {t_us:.1f} | {b_us:.1f} | {t_us - b_us:.1f} | {(t_us - b_us) / over:.0%} |"
           if over > 0 else f"| {c} | {t_us:.1f} | {b_us:.1f} | {t_us - b_us:.1f} | - |")
    md(f"| **iteration** | {wall:.1f} | {roof * us:.1f} (roofline) | {over:.1f} | |")
    worst = max(parts, key=lambda p: p[1] - p[2])
    md(f"\nLargest term over its bound: {worst[0]}, {worst[1] - worst[2]:.0f} us of the {over:.0f} us. "
       + (f"The GEMMs read their {gemm_bytes / 1e9:.2f} GB of weights at "
          f"{gemm_bytes / gemm_us * us / bw:.0%} of the copy bandwidth; " if gemm_us > 0 else "")
       + f"{what}s other than GEMMs take {k_sum - cls_us.get('GEMM', 0.0):.0f} us, the gaps between "
       f"{what}s {wall - k_sum:.0f} us ({src} profile).")
    del replay, step, pool, model
    free_memory(dev)


# ---------------------------------------------------------------------------------- 9
MIXED_CHUNKS = (16, 64, 256, 1024, 4096)


def mixed_profile(dev, dtype, smoke: bool, out: Path, work: Path) -> None:
    """Eager iterations with one context chunk, alone or beside 32 decodes of ~1k tokens
    (what an online run's arrivals cost): wall time vs the host's issue time and the GPU's
    kernel time; then every host-device synchronisation of a short real engine run, by
    where it happens. Rows also go to OUT/mixed_iterations.csv."""
    import warnings

    import pandas as pd

    from servesim.gpu_backend.model import ContextChunkInput, DecodeInput, LlamaModel, build_attn_metadata

    md("\n## 9. Eager mixed iterations: where the time goes\n")
    md("One context chunk alone or beside 32 decodes of ~1k tokens, no CUDA graph. wall = issue to tokens on the "
       "host (median of 10); host = time to issue the iteration (metadata packing + every launch; median, and "
       "the spread min-max); GPU = sum of its kernels (torch.profiler). If launches overlapped the GPU's work "
       "perfectly, wall = max(host, GPU); host + GPU is the other extreme: overlap = (host + GPU - wall) / "
       "min(host, GPU). syncs: implicit host-device synchronisations inside one iteration "
       "(torch.cuda.set_sync_debug_mode).\n")
    md("| model | chunk | decodes | wall | host (min-max) | GPU kernels | max(host, GPU) | host + GPU | overlap | syncs |")
    md("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    bs = 16
    for name in (("llama-3.2-1b",) if smoke else ("llama-3.2-1b", "llama-3.1-8b")):
        cfg, spec = model_cfg_spec(name, smoke)
        model = LlamaModel(cfg, None, dtype=dtype, device=dev, seed=0)
        ctx = 64 if smoke else 1024
        for n_dec in (0, 4 if smoke else 32):
            for chunk in ((16, 48) if smoke else MIXED_CHUNKS):
                need = n_dec * (-(-(ctx + 2) // bs)) + -(-chunk // bs) + 1
                pool = model.make_kv_pool(need, bs)
                nxt = iter(range(1, need))
                dec_blocks = [[next(nxt) for _ in range(-(-(ctx + 2) // bs))] for _ in range(n_dec)]
                chunk_blocks = [next(nxt) for _ in range(-(-chunk // bs))]
                g = torch.Generator().manual_seed(chunk)
                toks = torch.randint(0, spec.vocab_size, (chunk,), generator=g).tolist()

                def issue():
                    meta = build_attn_metadata([ContextChunkInput(toks, 0, chunk_blocks)],
                                               [DecodeInput(1, ctx, b) for b in dec_blocks], bs, dev)
                    logits = model.forward(meta.input_ids, meta.positions, pool, meta)
                    return logits.argmax(-1).to("cpu", non_blocking=True)  # what the executor does

                def sync():
                    if dev.type == "cuda":
                        torch.cuda.synchronize()

                with torch.no_grad():
                    tm = _time_issue(issue, sync, 3 if smoke else 10)
                    wall, host = tm["wall_s"], tm["host_s"]
                    syncs = -1
                    if dev.type == "cuda":
                        with warnings.catch_warnings(record=True) as caught:
                            warnings.simplefilter("always")
                            torch.cuda.set_sync_debug_mode("warn")
                            try:
                                issue()
                            finally:
                                torch.cuda.set_sync_debug_mode("default")
                        sync()
                        syncs = sum("synchroniz" in str(w.message).lower() for w in caught)
                    from torch.profiler import ProfilerActivity, profile

                    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
                    with profile(activities=acts) as prof:
                        issue()
                        sync()
                    gpu = float("nan")
                    if dev.type == "cuda":
                        try:  # kernel and memcpy events (device type CUDA); durations in us
                            ks = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
                            gpu = sum(getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0)
                                      for e in ks) / 1e6
                        except Exception as exc:  # noqa: BLE001 - a profiler API difference must not lose the row
                            log(f"section 9: no kernel times ({exc})")
                lo, hi = tm["host_min_s"], tm["host_max_s"]
                ov = (host + gpu - wall) / min(host, gpu) if gpu == gpu and min(host, gpu) > 0 else float("nan")
                rows.append(dict(model=name, chunk=chunk, decodes=n_dec, kv_len=ctx, wall_s=wall, host_s=host,
                                 host_min_s=lo, host_max_s=hi, gpu_s=gpu, syncs=syncs, overlap=ov))
                md(f"| {name} | {chunk} | {n_dec} | {wall * 1e3:.2f} ms | {host * 1e3:.2f} ({lo * 1e3:.2f}-"
                   f"{hi * 1e3:.2f}) ms | {gpu * 1e3:.2f} ms | {max(host, gpu) * 1e3:.2f} ms | "
                   f"{(host + gpu) * 1e3:.2f} ms | {ov:.2f} | {syncs if syncs >= 0 else '-'} |")
                pool = None
        model = None
        free_memory(dev)
    pd.DataFrame(rows).to_csv(out / "mixed_iterations.csv", index=False)
    sync_audit(dev, smoke, work)


def sync_audit(dev, smoke: bool, work: Path) -> None:
    """Every synchronisation of a short real GPU engine run (1B, online, graphs on), by the
    line that caused it: the executor's one wait per iteration is expected; any other is
    time the host cannot overlap with the GPU."""
    import warnings
    from collections import Counter

    from servesim.sim.cli import main as sim_main

    if dev.type != "cuda":
        return
    args = ["run", "experiments/fidelity.yaml", "--backend", "gpu", "--only", "1b-online-low",
            "--set", "workload.num_requests=60", "--set", f"hardware={hardware_here()}", "--out", str(work / "sync_audit")]
    buf = io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with contextlib.redirect_stdout(buf):
                rc = sim_main(args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    import pandas as pd

    n_it = len(pd.read_parquet(work / "sync_audit" / "1b-online-low" / "iterations.parquet"))
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower())
    md(f"\nSynchronisations in `sim {' '.join(args[:-2])}` (exit {rc}, {n_it} iterations), by source line:\n")
    md("| where | count | per iteration |")
    md("|---|---|---|")
    for k, v in where.most_common(12):
        md(f"| {k} | {v} | {v / max(n_it, 1):.2f} |")


# ---------------------------------------------------------------------------------- 10
PIECEWISE_CHUNKS = (16, 64, 256, 1024, 2048)
PIECEWISE_TOL = 5e-2  # logits' relative error (bf16): GEMMs of another row count round differently


def _random_mixed(rng, max_tokens: int, max_prior: int, vocab: int):
    """A random mixed iteration of at most ``max_tokens`` tokens: 1-3 context chunks over
    cached prefixes (the second one not sampling) and 0-32 decodes. Returns
    ``(chunks as (tokens, prior, sample), decode KV lengths)``."""
    n_dec = int(rng.integers(0, min(32, max_tokens // 8) + 1))
    n_ctx = int(rng.integers(1, 4))
    new = max(n_ctx, max_tokens - n_dec - int(rng.integers(0, max_tokens // 4 + 1)))
    cuts = np.sort(rng.choice(np.arange(1, new), n_ctx - 1, replace=False)) if n_ctx > 1 else np.zeros(0, int)
    q_lens = np.diff(np.concatenate([[0], cuts, [new]]))
    chunks = [(rng.integers(0, vocab, int(q)).tolist(), int(rng.integers(0, max_prior + 1)), i != 1)
              for i, q in enumerate(q_lens)]
    return chunks, rng.integers(1, max_prior + 1, n_dec).tolist()


def _blocks_needed(chunks, decodes, bs: int) -> int:
    return sum(-(-(p + len(t)) // bs) for t, p, _ in chunks) + sum(-(-(x + 1) // bs) for x in decodes)


def _place(chunks, decodes, bs: int, blocks):
    """`ContextChunkInput` / `DecodeInput` lists over blocks taken from the iterator ``blocks``."""
    from servesim.gpu_backend.model import ContextChunkInput, DecodeInput

    def take(n_tok):
        return [next(blocks) for _ in range(-(-n_tok // bs))]

    return ([ContextChunkInput(t, prior, take(prior + len(t)), sample) for t, prior, sample in chunks],
            [DecodeInput(1, pos, take(pos + 1)) for pos in decodes])


def _time_issue(issue, sync, reps: int) -> dict:
    """Median wall (issue to sync) and host-issue time of ``reps`` calls after 3 warm-ups,
    with the host time's min and max."""
    for _ in range(3):
        issue()
    sync()
    walls, hosts = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        issue()
        t1 = time.perf_counter()
        sync()
        walls.append(time.perf_counter() - t0)
        hosts.append(t1 - t0)
    return dict(wall_s=float(np.median(walls)), host_s=float(np.median(hosts)), host_min_s=min(hosts),
                host_max_s=max(hosts))


def piecewise_bench(dev, dtype, smoke: bool, out: Path, work: Path) -> None:
    """Iterations with context chunks, eager vs piecewise CUDA graphs (`PiecewiseRunner`),
    per model: (1) capture, its time and the memory the graphs hold; (2) correctness,
    before any timing -- the captured pieces' logits vs the eager forward on random mixed
    iterations (several chunks over cached prefixes + decodes), raising if off; (3) one
    chunk alone or beside 32 decodes of ~1k tokens: wall, host-issue and GPU-kernel time of
    both paths. Rows also go to OUT/piecewise_iterations.csv. The tables are written even
    when a check fails."""
    import pandas as pd
    from torch.profiler import ProfilerActivity, profile

    from servesim.gpu_backend.model import LlamaModel, build_attn_metadata
    from servesim.gpu_backend.piecewise_runner import PiecewiseRunner
    from servesim.policies.graph_padding import token_capture_sizes

    cuda = dev.type == "cuda"
    bs, ctx, reps = 16, (64 if smoke else 1024), (3 if smoke else 10)
    chunks_grid, decs_grid = ((16, 48), (0, 4)) if smoke else (PIECEWISE_CHUNKS, (0, 32))
    max_prior = 40 if smoke else 1500
    sizes = token_capture_sizes(max(chunks_grid) + max(decs_grid))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def gpu_time(issue, label: str) -> float:
        """Kernels, copies and memsets of one issued iteration (the profile's Chrome trace holds
        the kernels of graph replays too); NaN on a CPU."""
        if not cuda:
            return float("nan")
        with profile(activities=acts) as prof:
            issue()
            sync()
        ks = profiled_kernels(prof, cuda, work / f"piecewise_{label}.json")
        return sum(k[2] for k in ks) / 1e6 if ks else float("nan")

    checks, costs, rows = [], [], []

    def one_model(name: str) -> None:
        cfg, spec = model_cfg_spec(name, smoke)
        model = LlamaModel(cfg, None, dtype=dtype, device=dev, seed=0)
        rng = np.random.default_rng(0)
        batches = [_random_mixed(rng, int(rng.integers(sizes[-1] // 8, sizes[-1] + 1)), max_prior, spec.vocab_size)
                   for _ in range(4)]
        timing_blocks = max(decs_grid) * -(-(ctx + 2) // bs) + -(-max(chunks_grid) // bs)
        pool = model.make_kv_pool(max([_blocks_needed(c, d, bs) for c, d in batches] + [timing_blocks]) + 1, bs)
        pool.kv.normal_()  # cached prefixes and decode contexts: random KV
        metas = []
        for n, (c, d) in enumerate(batches):  # each iteration over blocks of the pool drawn at random
            blocks = iter(np.random.default_rng(n).permutation(pool.num_blocks).tolist())
            metas.append(build_attn_metadata(*_place(c, d, bs, blocks), bs, dev))
        with torch.no_grad():
            model.forward(metas[0].input_ids, metas[0].positions, pool, metas[0])  # compiles the Triton kernels
            sync()
            free_memory(dev)
            # (1) capture
            held0 = torch.cuda.memory_reserved(dev) if cuda else 0
            runner = PiecewiseRunner(model, pool, sizes)
            runner.capture()
            free_memory(dev)
            held = torch.cuda.memory_reserved(dev) - held0 if cuda else float("nan")
            costs.append((name, len(sizes), len(sizes) * runner.num_pieces, runner.captured, runner.capture_s,
                          runner.static_bytes, held))
            # (2) both paths on each iteration in turn (the iterations' blocks overlap; each
            # path rewrites only its iteration's new tokens, so both read the same KV)
            for m, (c, d) in zip(metas, batches):
                ref = model.forward(m.input_ids, m.positions, pool, m)
                got = runner.run(m.input_ids, m.positions, m)
                err, diff = rel_err(got, ref), float((got - ref).abs().max())
                agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
                P = runner.padded_size(m.num_tokens)
                checks.append((name, len(c), len(d), m.num_tokens, P, diff, err, agree))
                if not err <= PIECEWISE_TOL:  # NaN fails too
                    raise RuntimeError(f"{name}: piecewise logits differ from the eager forward's: relative error "
                                       f"{err:.2e} (max abs {diff:.3g}) on {len(c)} chunks + {len(d)} decodes, "
                                       f"{m.num_tokens} tokens at {P}")
            # (3) one chunk alone or beside decodes, as in section 9, through both paths
            for n_dec in decs_grid:
                for chunk in chunks_grid:
                    g = torch.Generator().manual_seed(chunk)
                    toks = torch.randint(0, spec.vocab_size, (chunk,), generator=g).tolist()
                    ctx_in, dec_in = _place([(toks, 0, True)], [ctx] * n_dec, bs, iter(range(1, pool.num_blocks)))

                    def eager():
                        m = build_attn_metadata(ctx_in, dec_in, bs, dev)
                        return model.forward(m.input_ids, m.positions, pool, m)

                    def piecewise():
                        m = build_attn_metadata(ctx_in, dec_in, bs, dev)
                        return runner.run(m.input_ids, m.positions, m)

                    row = dict(model=name, chunk=chunk, decodes=n_dec, kv_len=ctx, tokens=chunk + n_dec,
                               padded=runner.padded_size(chunk + n_dec), captured=runner.captured)
                    for label, fwd in (("eager", eager), ("piecewise", piecewise)):
                        def issue():
                            return fwd().argmax(-1).to("cpu", non_blocking=True)  # what the executor does

                        t = _time_issue(issue, sync, reps)
                        t["gpu_s"] = gpu_time(issue, label)
                        row.update({f"{label}_{k}": v for k, v in t.items()})
                    rows.append(row)

    md("\n## 10. Piecewise CUDA graphs for iterations with context chunks\n")
    md(f"`PiecewiseRunner` with the engine's token sizes up to {sizes[-1]} tokens ({len(sizes)} sizes, "
       f"`token_capture_sizes({sizes[-1]})`): per padded size P, L + 1 captured pieces (embedding, every layer's "
       "token-wise work: rmsnorm, qkv GEMM, rope + KV write, o GEMM, rmsnorm, gate_up, silu_mul, down) with each "
       "layer's attention launched eagerly between them on the real rows; the sampled rows' logits eager. "
       "Random weights, real shapes, paged cache of 16-token blocks."
       + (" *CPU smoke: nothing is captured, the pieces run eagerly at the padded size.*" if not cuda else ""))
    try:
        for name in (("llama-3.2-1b",) if smoke else ("llama-3.2-1b", "llama-3.1-8b")):
            one_model(name)
            free_memory(dev)  # the model, its pool and its graphs went with one_model's frame
    finally:  # what was measured is written, also when a check failed
        md(f"\n**Correctness** (checked before any timing; fails above {PIECEWISE_TOL:.0e} relative error): "
           "logits of the captured pieces vs `LlamaModel.forward` on the same random mixed iterations and pool.\n")
        md("| model | chunks | decodes | tokens | padded to | max abs diff | rel. error | argmax agree |")
        md("|---|---|---|---|---|---|---|---|")
        for name, nc, nd, T, P, diff, err, agree in checks:
            md(f"| {name} | {nc} | {nd} | {T} | {P} | {diff:.3g} | {err:.1e} | {agree:.0%} |")
        md("\n**Capture**: warm-up of every size on a side stream, then every piece, largest size first, into "
           "one shared graph pool. Graph memory: what the caching allocator holds more after the capture than "
           "before it (the graph pool, cuBLAS workspaces), the static buffers apart.\n")
        md("| model | sizes | graphs | captured | capture time | static buffers | graph memory |")
        md("|---|---|---|---|---|---|---|")
        for name, ns, ng, cap, cap_s, static, held in costs:
            md(f"| {name} | {ns} | {ng} | {'yes' if cap else 'no'} | {cap_s:.1f} s | {static / 1e6:.1f} MB | "
               + (f"{held / 1e6:.0f} MB |" if held == held else "- |"))

        def ms(x):
            return f"{x * 1e3:.2f} ms" if x == x else "-"

        def host(r, p):
            return (f"{r[p + '_host_s'] * 1e3:.2f} ({r[p + '_host_min_s'] * 1e3:.2f}-"
                    f"{r[p + '_host_max_s'] * 1e3:.2f}) ms")

        md(f"\n**Timing**: one context chunk alone or beside {max(decs_grid)} decodes of ~{ctx} tokens, through "
           f"both paths. wall = issue to tokens on the host (median of {reps}); host = time to issue the "
           "iteration (metadata packing + launches or replays; median, and min-max); GPU = sum of its kernels "
           "and copies (torch.profiler). padded = the piecewise size P.\n")
        md("| model | chunk | decodes | padded | eager wall | eager host (min-max) | eager GPU | piecewise wall | "
           "piecewise host (min-max) | piecewise GPU | eager / piecewise wall |")
        md("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            md(f"| {r['model']} | {r['chunk']} | {r['decodes']} | {r['padded']} | {ms(r['eager_wall_s'])} | "
               f"{host(r, 'eager')} | {ms(r['eager_gpu_s'])} | {ms(r['piecewise_wall_s'])} | "
               f"{host(r, 'piecewise')} | {ms(r['piecewise_gpu_s'])} | "
               f"{r['eager_wall_s'] / r['piecewise_wall_s']:.2f}x |")
        pd.DataFrame(rows).to_csv(out / "piecewise_iterations.csv", index=False)


# ---------------------------------------------------------------------------------- 12
ATTN_TILES = ((64, 4, 0), (64, 4, 2), (32, 4, 3), (32, 2, 4), (128, 4, 2), (128, 8, 3), (64, 8, 4))
ATTN_BATCHES = (1, 4, 16, 64, 256)
ATTN_CTXS = (1024, 2048, 4096, 8192)
ATTN_MIN_TOKENS = (64, 256)
ATTN_TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-4}


def _attn_case(B, ctx, hq, hkv, D, bs, dtype, dev, seed, layers):
    """Random q and paged K/V of ``layers`` independent layers (disjoint random blocks of one
    pool, so timing ``layers`` calls in a row reads cold KV as a model does), lengths
    uniform in +-50% of ``ctx``."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(ctx // 2, 1), ctx * 3 // 2 + 1, (B,), generator=g)
    nblk = (lens + bs - 1) // bs
    nb, width = int(nblk.sum()), int(nblk.max())
    kc = torch.empty(layers * nb + 1, bs, hkv, D, dtype=dtype, device=dev).normal_()
    vc = torch.empty_like(kc).normal_()
    perm = (torch.randperm(layers * nb, generator=g) + 1).to(torch.int32)
    used = torch.arange(width)[None, :] < nblk[:, None]
    bts = []
    for r in range(layers):
        bt = torch.zeros(B, width, dtype=torch.int32)
        bt[used] = perm[r * nb:(r + 1) * nb]
        bts.append(bt.to(dev))
    q = torch.randn(B, hq, D, generator=g).to(dtype=dtype, device=dev)
    return dict(q=q, kc=kc, vc=vc, bts=bts, sl=lens.to(torch.int32).to(dev), lens=lens, width=width)


def _split_bounds(B, hkv, sms, smoke) -> tuple[int, ...]:
    if smoke:
        return (1, 4)
    s = tuple(p for p in (1, 2, 4, 8, 16, 32, 64) if sms // 4 <= B * hkv * p <= 32 * sms)
    return s or (1,)


def _tile_config(tile, **kw):
    """A candidate's DecodeConfig: ``tile`` = (tokens per tile, warps, stages[, dot dtype])."""
    from servesim.kernels import decode_attention as da

    return da.DecodeConfig(block_n=tile[0], num_warps=tile[1], num_stages=tile[2],
                           kv_math=tile[3] if len(tile) > 3 else None, fused_reduce=False, head_major=False, **kw)


def time_layers(t, dev, c: dict, kc, vc, cfg, scale: float, kv_scale: float, reps: int) -> tuple[float, object]:
    """Seconds per layer of ``cfg`` on case ``c`` (one call per layer's block table, as one
    CUDA-graph replay), and the first layer's output of the replay."""
    from servesim.kernels import decode_attention as da

    R = len(c["bts"])
    outs = [None] * R

    def run():
        for r in range(R):
            outs[r] = da.paged_decode_attention_triton(c["q"], kc, vc, c["bts"][r], c["sl"], scale, config=cfg,
                                                      k_scale=kv_scale, v_scale=kv_scale)

    rep = graphed(run, dev)
    s = t(rep, reps=reps, warmup=1) / R
    del rep
    return s, outs[0]


def tune_decode_attention(dev, dtype, hq: int, hkv: int, D: int, bs: int, *, tiles, batches, ctxs, mins,
                          top_tiles: int, top_combos: int, tol: float, deadline: float, smoke: bool, name: str = "",
                          kv_dtype=None, kv_scale: float = 1.0) -> dict:
    """Section 12's search for one attention shape (q ``dtype``, ``hq`` / ``hkv`` heads of
    ``D``, ``bs``-token blocks) over a cache of ``kv_dtype`` (default q's; an fp8 cache holds
    e4m3 of the random values at ``kv_scale``, and ``kc`` / ``vc`` of the case keep the
    dequantised values in q's dtype): candidate configs on random mixed-length batches, each
    checked against the torch reference first and its CUDA-graph output again after timing;
    phase 1 the ``tiles`` ((tokens, warps, stages[, dot dtype])) and the default at the
    default split bounds, 2a split bounds (max splits x ``mins``) for the best ``top_tiles``,
    2b the fused reduce and the head-major order for each batch's best ``top_combos``; per
    batch the config best over ``ctxs``. Candidates resolve against the default config:
    the installed table's entries for this key are left out while it runs. Returns key,
    entries, picks, times ((B, ctx) -> {config: s}), defaults, cases, refs (the torch
    reference outputs), rejected, records."""
    from dataclasses import replace

    from servesim.kernels import decode_attention as da
    from servesim.kernels._common import num_sms
    from servesim.kernels.reference import kv_quantize, paged_decode_attention_ref

    cuda = dev.type == "cuda"
    t = timer(dev)
    sms = num_sms(dev)
    reps = 5 if cuda else 1
    group, scale = hq // hkv, D ** -0.5
    fp8 = kv_dtype is not None and kv_dtype != dtype
    ks = kv_scale if fp8 else 1.0
    elem = 1 if fp8 else torch.empty((), dtype=dtype).element_size()
    key = da.tuning_key(dtype, group, hkv, D, bs, sms, kv_dtype)
    installed = da.get_tuning()
    if installed is not None and key in installed.get("entries", {}):
        da.set_tuning({**installed, "entries": {k: v for k, v in installed["entries"].items() if k != key}})
    cases, refs, times, defaults, records, rejected = {}, {}, {}, {}, [], []
    bad: set = set()  # compile keys that failed to compile or to check

    def over() -> bool:
        return time.monotonic() > deadline

    def case(B, ctx):
        if (B, ctx) not in cases:
            kv_bytes = B * ctx * 2 * hkv * D * elem
            layers = 1 if smoke else max(2, min(64, math.ceil(4 * 60e6 / kv_bytes)))
            c = _attn_case(B, ctx, hq, hkv, D, bs, dtype, dev, seed=B * 7919 + ctx, layers=layers)
            if fp8:
                c["kt"], c["vt"] = kv_quantize(c["kc"], kv_dtype, ks), kv_quantize(c["vc"], kv_dtype, ks)
                c["kc"], c["vc"] = ((x.float() * ks).to(dtype) for x in (c["kt"], c["vt"]))  # the same values
            else:
                c["kt"], c["vt"] = c["kc"], c["vc"]
            refs[(B, ctx)] = paged_decode_attention_ref(c["q"], c["kt"], c["vt"], c["bts"][0], c["sl"], scale,
                                                        None, ks, ks)
            defaults[(B, ctx)] = da.resolve_config(B, hkv, c["width"] * bs, D, group, bs, dtype, sms, None,
                                                   kv_dtype)
            cases[(B, ctx)] = c
        return cases[(B, ctx)]

    def measure(B, ctx, cfg):
        """Seconds per call of ``cfg`` (resolved) at (B, ctx), or None if rejected."""
        c = case(B, ctx)
        full = da.resolve_config(B, hkv, c["width"] * bs, D, group, bs, dtype, sms, cfg, kv_dtype)
        tt = times.setdefault((B, ctx), {})
        if full in tt:
            return tt[full]
        if full.compile_key() in bad:
            return None
        ref = refs[(B, ctx)]
        try:
            o = da.paged_decode_attention_triton(c["q"], c["kt"], c["vt"], c["bts"][0], c["sl"], scale, config=full,
                                                 k_scale=ks, v_scale=ks)
            err = rel_err(o, ref)
            if not err <= tol:  # NaN fails too
                raise AssertionError(f"rel. error {err:.2e} vs the torch reference (> {tol:.0e})")
            s, o2 = time_layers(t, dev, c, c["kt"], c["vt"], full, scale, ks, reps)
            err2 = rel_err(o2, ref)
            if not err2 <= tol:
                raise AssertionError(f"rel. error {err2:.2e} after graph replays (> {tol:.0e})")
        except Exception as e:  # noqa: BLE001 - a variant that does not compile or check is left out
            bad.add(full.compile_key())
            rejected.append((name, B, ctx, full.label(), f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
            log(f"decode attention tuning: {name} B={B} ctx={ctx} {full.label()} rejected: {e}")
            return None
        tt[full] = s
        records.append(dict(model=name, batch=B, ctx=ctx, config=full.label(), us=s * 1e6,
                            kv_mb=_attn_bytes(c, hkv, D, dtype, elem) / 1e6, **full.to_dict()))
        return s

    try:
        grid = [(B, ctx) for B in batches for ctx in ctxs]
        # phase 1: tiles at the default split bounds
        tile_t: dict = {}
        for tile in (None, *tiles):  # None: the default config, always measured first
            if tile is not None and over():
                break
            got = [measure(B, ctx, da.DecodeConfig() if tile is None else _tile_config(tile)) for B, ctx in grid]
            if tile is None:
                if any(x is None for x in got):
                    raise AssertionError(f"{name}: the default decode-attention config failed its check")
                d0 = da.resolve_config(1, hkv, bs, D, group, bs, dtype, sms, None, kv_dtype)
                tile = (d0.block_n, d0.num_warps, d0.num_stages) + ((d0.kv_math,) if fp8 else ())
            if all(x is not None for x in got):
                tile_t[tile] = got
        best_shape = [min(v[i] for v in tile_t.values()) for i in range(len(grid))]
        score = {k: _geomean([x / b for x, b in zip(v, best_shape)]) for k, v in tile_t.items()}
        top = sorted(score, key=score.get)[:top_tiles]
        # phase 2a: split bounds for the best tiles
        for tile in top:
            for B in batches:
                for S in _split_bounds(B, hkv, sms, smoke):
                    for T in mins:
                        if over():
                            break
                        for ctx in ctxs:
                            measure(B, ctx, _tile_config(tile, max_splits=S, min_split_tokens=T))
        # phase 2b: fused reduce and program order for each batch's best combos
        for B in batches:
            for cfg in _rank(times, B, ctxs)[:top_combos]:
                for fused, hm in ((True, False), (False, True), (True, True)):
                    if over():
                        break
                    for ctx in ctxs:
                        measure(B, ctx, replace(cfg, fused_reduce=fused, head_major=hm))
    finally:
        da.set_tuning(installed)
    picks = {}
    for B in batches:
        ranked = _rank(times, B, ctxs)
        if ranked:
            picks[B] = ranked[0]
    return dict(key=key, entries=[dict(batch=B, config=c.to_dict()) for B, c in picks.items()], picks=picks,
                times=times, defaults=defaults, cases=cases, refs=refs, rejected=rejected, records=records)


def attention_tuning(dev, dtype, ceil, smoke: bool, out: Path, allow_s: float) -> dict | None:
    """Section 12: decode attention autotune. For each model's attention shapes, times
    candidate `DecodeConfig`s (tiles x warps x pipelining stages, split bounds, fused reduce,
    program order) on random mixed-length batches -- every one checked against the torch
    reference first, and its CUDA-graph output again after timing (`tune_decode_attention`)
    -- picks per batch size the config best over the context lengths (the batch is all a
    decode graph knows), and writes OUT/decode_attention_tuning.json (installed in this
    process, so section 4 runs with it) and OUT/decode_attention_tuning.csv. Returns the table."""
    import pandas as pd

    from servesim.kernels import decode_attention as da
    from servesim.kernels._common import num_sms

    deadline = time.monotonic() + allow_s
    cuda = dev.type == "cuda"
    sms = num_sms(dev)
    bs = S10_BLOCK if not smoke else 16
    if smoke:
        shapes = {"tiny": (4, 2, 16)}
        tiles, batches, ctxs, mins, top_tiles, top_combos = ((16, 4, 0), (32, 2, 0)), (1, 4), (48,), (16,), 1, 1
    else:
        shapes = {n: (s.num_heads, s.num_kv_heads, s.head_dim) for n in ("llama-3.2-1b", "llama-3.1-8b")
                  for s in [load_model(n)]}
        tiles, batches, ctxs, mins, top_tiles, top_combos = ATTN_TILES, ATTN_BATCHES, ATTN_CTXS, ATTN_MIN_TOKENS, 2, 2
    tol = ATTN_TOL[dtype]
    da.set_tuning(None)  # candidates and "default" resolve against the default config
    reps = 5 if cuda else 1
    bw = ceil["copy_bw"]
    records, rejected = [], []
    table = dict(version=da.TUNING_VERSION, device=torch.cuda.get_device_name() if cuda else "cpu", sms=sms,
                 torch=torch.__version__, triton=_triton_version(), dtype=str(dtype).replace("torch.", ""),
                 made_by="python benchmarks/gpu_bench.py --sections 12 (" + time.strftime("%Y-%m-%d %H:%M") + ")",
                 entries={}, measurements=[])
    summary = []

    def over() -> bool:
        return time.monotonic() > deadline

    for name, (hq, hkv, D) in shapes.items():
        r = tune_decode_attention(dev, dtype, hq, hkv, D, bs, tiles=tiles, batches=batches, ctxs=ctxs, mins=mins,
                                  top_tiles=top_tiles, top_combos=top_combos, tol=tol, deadline=deadline,
                                  smoke=smoke, name=name)
        rejected += r["rejected"]
        records += [dict(rec, of_copy_bw=rec["kv_mb"] * 1e6 / bw / (rec["us"] * 1e-6)) for rec in r["records"]]
        times = r["times"]
        for B, pick in r["picks"].items():
            for ctx in ctxs:
                tt = times.get((B, ctx), {})
                c = r["cases"][(B, ctx)]
                dflt = r["defaults"][(B, ctx)]
                best = min(tt, key=tt.get)
                nbytes = _attn_bytes(c, hkv, D, dtype)
                row = dict(model=name, batch=B, ctx=ctx, kv_mb=nbytes / 1e6, default_us=tt[dflt] * 1e6,
                           best_us=tt[best] * 1e6, best=best.label(), chosen_us=tt[pick] * 1e6, chosen=pick.label(),
                           candidates=len(tt))
                for k in ("default", "best", "chosen"):
                    row[f"{k}_of_copy_bw"] = nbytes / bw / (row[f"{k}_us"] * 1e-6)
                summary.append(row)
                table["measurements"].append({k: row[k] for k in ("model", "batch", "ctx", "default_us", "best_us",
                                                                  "chosen_us", "best", "chosen")})
        table["entries"][r["key"]] = r["entries"]
        r["cases"].clear()
        r["refs"].clear()
        free_memory(dev)

    (out / "decode_attention_tuning.json").write_text(json.dumps(table, indent=1) + "\n")
    pd.DataFrame(records).to_csv(out / "decode_attention_tuning.csv", index=False)
    da.set_tuning(table)
    md("\n## 12. Decode attention: autotune at start-up\n")
    tile_txt = ", ".join(f"{a}/{b}/{c or 'd'}" for a, b, c in tiles)
    md(f"Paged decode attention of each model's shapes ({', '.join(f'{n}: Hq {a}, Hkv {b}, D {c}' for n, (a, b, c) in shapes.items())}"
       f"; {bs}-token blocks at random places), batches of random lengths in +-50% of the context; each config "
       f"timed as CUDA-graph replays of one call per layer over as many layers as keep the KV several times the L2 "
       f"(cold KV, as in a model), median of {reps}. Every candidate was checked against the torch reference "
       f"(`paged_decode_attention_ref`, rel. error <= {tol:.0e}) before it was timed, and its graph's output again "
       "after. Candidates: tiles x warps x pipelining stages "
       f"({tile_txt}) at the default split bounds; for the best "
       f"{top_tiles}, split bounds (max splits x min tokens per split {mins}); for each batch's best "
       f"{top_combos}, the fused reduce and the head-major program order. **chosen** = the config written to "
       "OUT/decode_attention_tuning.json for that batch (the best over its context lengths: a decode graph knows "
       "its batch, not its lengths); installed for section 4. Share = (KV + q + out bytes) / copy bandwidth / "
       "time.\n")
    md("| model | batch | context | KV MB | default | share | best | share | best config | chosen | share | "
       "chosen config | candidates |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in summary:
        md(f"| {r['model']} | {r['batch']} | {r['ctx']} | {r['kv_mb']:.0f} | {r['default_us']:.1f} us | "
           f"{r['default_of_copy_bw']:.0%} | {r['best_us']:.1f} us | {r['best_of_copy_bw']:.0%} | `{r['best']}` | "
           f"{r['chosen_us']:.1f} us | {r['chosen_of_copy_bw']:.0%} | `{r['chosen']}` | {r['candidates']} |")
    big = [r for r in summary if r["batch"] >= 64 and r["ctx"] >= 2048]
    if big:
        lo = min(r["chosen_of_copy_bw"] for r in big)
        md(f"\nFrom 64 x 2k up ({len(big)} points): chosen configs at {lo:.0%}-"
           f"{max(r['chosen_of_copy_bw'] for r in big):.0%} of copy bandwidth (target >= 85%); default "
           f"{min(r['default_of_copy_bw'] for r in big):.0%}-{max(r['default_of_copy_bw'] for r in big):.0%}.")
    md("\nConfig labels: S max splits / T min tokens per split / N tile tokens / w warps / st pipelining stages "
       "(d: Triton's default) / fused: one kernel (the last split merges) / hm: head-major program order.")
    if rejected:
        md(f"\n**{len(rejected)} candidate(s) left out** (did not compile, or did not match the reference):\n")
        md("| model | batch | context | config | why |\n|---|---|---|---|---|")
        for name, B, ctx, lab, why in rejected[:20]:
            md(f"| {name} | {B} | {ctx} | `{lab}` | {why} |")
    if over():
        md(f"\n*The tuning's time allowance ({allow_s:.0f} s) ran out: later candidates were not timed.*")
    return table


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "-"


def _attn_bytes(c: dict, hkv: int, D: int, dtype, kv_elem: int | None = None) -> int:
    """KV (``kv_elem`` bytes an element, default q's) + q + out bytes of a case."""
    e = torch.empty((), dtype=dtype).element_size()
    return int(c["lens"].sum()) * 2 * hkv * D * (kv_elem or e) + 2 * c["q"].numel() * e


def _geomean(xs) -> float:
    xs = [x for x in xs if x == x]
    return float(math.exp(sum(math.log(x) for x in xs) / len(xs))) if xs else float("nan")


def _rank(times: dict, B: int, ctxs) -> list:
    """Configs measured at every context of batch B, best first (geometric mean of their
    time over the best time at each context)."""
    per = [times.get((B, c), {}) for c in ctxs]
    if not per or not all(per):
        return []
    common = set(per[0]).intersection(*per[1:])
    best = [min(p.values()) for p in per]
    return sorted(common, key=lambda cfg: (_geomean([p[cfg] / b for p, b in zip(per, best)]), cfg.label()))


# ---------------------------------------------------------------------------------- 15
GEMV_MS = (1, 16, 64, 4, 2, 8, 32)  # section 4's batch sizes first (a deadline cuts the others)
GEMV_TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3, torch.float32: 1e-4}
GEMV_WIN = 0.97  # the Triton GEMM must beat the cuBLAS path by 3% to be installed


def decode_linears(spec) -> list[tuple[str, str, int, int, int]]:
    """(name, prologue, N, K, count per step) of a decode step's linears, as the model runs
    them: rmsnorm before qkv / gate_up / lm_head, silu_mul before down."""
    d = spec
    return [("qkv", "rms", d.q_size + 2 * d.kv_size, d.hidden_size, d.num_layers),
            ("o", "none", d.hidden_size, d.q_size, d.num_layers),
            ("gate_up", "rms", 2 * d.intermediate_size, d.hidden_size, d.num_layers),
            ("down", "silu", d.hidden_size, d.intermediate_size, d.num_layers),
            ("lm_head", "rms", d.vocab_size, d.hidden_size, 1)]


def gemv_tuning(dev, dtype, ceil, smoke: bool, out: Path, allow_s: float) -> dict | None:
    """Section 15: the small-M Triton GEMM (kernels/gemv.py, with the rmsnorm / silu_mul
    before it in its prologue) vs the unfused cuBLAS path (the norm or activation kernel, then
    ``F.linear``) for every decode linear of both models at M = 1..64: each candidate checked
    against the torch reference first (and its graph's output again after), then timed as
    CUDA-graph replays over copies of the weight that keep it out of L2. Per (linear, M) the
    winner goes into the decode tuning table's ``gemv_entries`` (null: cuBLAS), merged with
    the installed decode-attention entries and installed for the rest of the run; written to
    OUT/h200_tuning.json (a replacement for kernels/tuning/h200.json) and its timings to
    OUT/gemv_tuning.csv. Returns the table."""
    import pandas as pd
    import torch.nn.functional as F

    from servesim.kernels import decode_attention as da
    from servesim.kernels import gemv as gm
    from servesim.kernels import ops
    from servesim.kernels._common import num_sms
    from servesim.kernels.reference import linear_ref, rms_norm_linear_ref, silu_mul_linear_ref

    deadline = time.monotonic() + allow_s
    cuda = dev.type == "cuda"
    t = timer(dev)
    sms = num_sms(dev)
    bw = ceil["copy_bw"]
    e = torch.empty((), dtype=dtype).element_size()
    tol = GEMV_TOL[dtype]
    names = ["tiny"] if smoke else ["llama-3.2-1b", "llama-3.1-8b"]
    Ms = (1, 4) if smoke else GEMV_MS
    reps = 10 if cuda else 1
    eps = 1e-5
    base_table = da.get_tuning()
    entries: dict = {}
    records, rejected, bad = [], [], set()

    def unfused(pro, x, w, nw, res):
        if pro == "rms":
            return F.linear(ops.rms_norm(x, nw, eps, res)[0], w)
        if pro == "silu":
            return F.linear(ops.silu_mul(x), w)
        return F.linear(x, w)

    def fused(pro, x, w, nw, res, cfg):
        if pro == "rms":
            return gm.gemv_triton(x, w, cfg, prologue="rms", norm_weight=nw, eps=eps, residual=res)[0]
        return gm.gemv_triton(x, w, cfg, prologue=pro)[0]

    def reference(pro, x, w, nw, res):
        if pro == "rms":
            return rms_norm_linear_ref(x, nw, eps, w, res)[0]
        if pro == "silu":
            return silu_mul_linear_ref(x, w)
        return linear_ref(x, w)

    def time_calls(fn, ws):
        outs = [None] * len(ws)

        def run():
            for i, w in enumerate(ws):
                outs[i] = fn(w)

        rep = graphed(run, dev)
        s = t(rep, reps=reps, warmup=1) / len(ws)
        del rep
        return s, outs[0]

    stopped = False
    for name in names:
        spec = model_cfg_spec(name, smoke)[1]
        for kind, pro, N, K, count in decode_linears(spec):
            key = gm.gemv_key(dtype, pro, N, K, sms)
            if key in entries:  # the same problem as an earlier linear (tied shapes): tuned once
                continue
            nbytes = N * K * e
            R = 1 if smoke else max(1, min(32, math.ceil(240e6 / nbytes)))
            g = torch.Generator(device=dev).manual_seed(N * 31 + K)
            ws = [torch.randn(N, K, device=dev, dtype=dtype, generator=g) * K ** -0.5 for _ in range(R)]
            nw = torch.rand(K, device=dev, dtype=dtype, generator=g) + 0.5
            rows = []
            for M in Ms:
                if time.monotonic() > deadline:
                    stopped = True
                    break
                x = torch.randn(M, 2 * K if pro == "silu" else K, device=dev, dtype=dtype, generator=g)
                res = torch.randn(M, K, device=dev, dtype=dtype, generator=g) if pro == "rms" else None
                ref = reference(pro, x, ws[0], nw, res)
                base_s, base_out = time_calls(lambda w: unfused(pro, x, w, nw, res), ws)
                base_err = rel_err(base_out, ref)
                rec = dict(model=name, linear=kind, prologue=pro, n=N, k=K, M=M, per_step=count, mb=nbytes / 1e6,
                           config="cublas", us=base_s * 1e6, of_copy_bw=nbytes / base_s / bw, rel_err=base_err)
                records.append(rec)
                best = (base_s, None)
                for cfg in gm.candidates(M, N, K, sms)[:2 if smoke else None]:
                    if cfg.compile_key() + (pro, gm.block_m(M, cfg.use_dot)) in bad:
                        continue
                    try:
                        y = fused(pro, x, ws[0], nw, res, cfg)
                        err = rel_err(y, ref)
                        if not err <= tol:
                            raise AssertionError(f"rel. error {err:.2e} vs the torch reference (> {tol:.0e})")
                        s_, y2 = time_calls(lambda w, cfg=cfg: fused(pro, x, w, nw, res, cfg), ws)
                        err2 = rel_err(y2, ref)
                        if not err2 <= tol:
                            raise AssertionError(f"rel. error {err2:.2e} after graph replays (> {tol:.0e})")
                    except Exception as ex:  # noqa: BLE001 - a variant that fails is left out; cuBLAS stays
                        bad.add(cfg.compile_key() + (pro, gm.block_m(M, cfg.use_dot)))
                        rejected.append((name, kind, M, cfg.label(), f"{type(ex).__name__}: "
                                         f"{str(ex).splitlines()[0][:160] if str(ex) else ''}"))
                        log(f"section 15: {name} {kind} M={M} {cfg.label()} rejected: {ex}")
                        continue
                    records.append(dict(rec, config=cfg.label(), us=s_ * 1e6, of_copy_bw=nbytes / s_ / bw,
                                        rel_err=err2))
                    if s_ < best[0]:
                        best = (s_, cfg)
                win = best[1] if best[1] is not None and best[0] < GEMV_WIN * base_s else None
                if win is not None and pro == "rms":  # the first layer's norm has no residual: its variant too
                    try:
                        err = rel_err(fused(pro, x, ws[0], nw, None, win), reference(pro, x, ws[0], nw, None))
                        if not err <= tol:
                            raise AssertionError(f"rel. error {err:.2e} without a residual (> {tol:.0e})")
                    except Exception as ex:  # noqa: BLE001 - then cuBLAS for this shape
                        rejected.append((name, kind, M, win.label(), f"no residual: {type(ex).__name__}: "
                                         f"{str(ex).splitlines()[0][:160] if str(ex) else ''}"))
                        win = None
                rows.append(dict(m=M, config=None if win is None else win.to_dict(), us=round(best[0] * 1e6, 2),
                                 cublas_us=round(base_s * 1e6, 2)))
            if rows:
                entries[key] = sorted(rows, key=lambda r: r["m"])
            ws = None
            free_memory(dev)
            if stopped:
                break
        if stopped:
            break
    table = dict(base_table) if base_table else _base_table(dev, dtype)
    # the fused qkv + rope rows (section 16's) are not this section's: they stay
    keep = {k: v for k, v in ((base_table or {}).get(gm.GEMV_ENTRIES) or {}).items() if f"/{ops.QKV_ROPE}/" in k}
    table[gm.GEMV_ENTRIES] = {**keep, **entries}
    install_table(table, out, "gemv_made_by", "15")
    pd.DataFrame(records).to_csv(out / "gemv_tuning.csv", index=False)

    md("\n## 15. Small-M GEMM (Triton, fused prologue) vs cuBLAS: autotune of the decode linears\n")
    md("Every decode linear of each model at M rows: **cuBLAS** = the unfused path the model ran before (the "
       "rmsnorm kernel -- fused residual add -- or silu_mul, then `F.linear`); **Triton** = `kernels/gemv.py` "
       "with that op in its prologue (one kernel; split-K summed by the last split, no reduce kernel). Each "
       f"candidate checked against the torch reference (rel. error <= {tol:.0e}) before and after timing; times are "
       "CUDA-graph replays over copies of the weight (cold L2), median of 10. **installed** = the config written to "
       "OUT/h200_tuning.json's `gemv_entries` (Triton only where it beats cuBLAS by 3%) and used by the model from "
       "here on. Share = weight bytes / copy bandwidth / time.\n")
    df = pd.DataFrame(records)
    if df.empty:
        md("*nothing measured*")
        return table
    md("| model | linear (N x K) | M | cuBLAS path | share | best Triton | share | best config | installed | "
       "candidates |\n|---|---|---|---|---|---|---|---|---|---|")
    gain = {}
    for (name, kind, M), x in df.groupby(["model", "linear", "M"], sort=False):
        cb = x[x.config == "cublas"].iloc[0]
        tr = x[x.config != "cublas"]
        if len(tr):
            b = tr.loc[tr.us.idxmin()]
            bt = f"{b.us:.1f} us | {b.of_copy_bw:.0%} | `{b.config}`"
            chosen = min(cb.us, b.us) if b.us < GEMV_WIN * cb.us else cb.us
        else:
            bt, chosen = "- | - | -", cb.us
        inst = "Triton" if chosen < cb.us else "cuBLAS"
        g_ = gain.setdefault((name, M), [0.0, 0.0])
        g_[0] += cb.us * cb.per_step
        g_[1] += chosen * cb.per_step
        md(f"| {name} | {kind} ({cb.n} x {cb.k}) | {M} | {cb.us:.1f} us | {cb.of_copy_bw:.0%} | {bt} | {inst} | "
           f"{len(tr)} |")
    md("\n**A step's linears (with their norm / activation)**, each times its count per step: "
       + "; ".join(f"{n} M={M}: {a / 1e3:.2f} ms -> {b / 1e3:.2f} ms ({a / b:.2f}x)"
                   for (n, M), (a, b) in gain.items()))
    if rejected:
        md(f"\n**{len(rejected)} candidate(s) left out** (did not compile, or did not match the reference):\n")
        md("| model | linear | M | config | why |\n|---|---|---|---|---|")
        for r in rejected[:20]:
            md("| " + " | ".join(str(v) for v in r[:3]) + f" | `{r[3]}` | {r[4]} |")
    if stopped:
        md(f"\n*The tuning's time allowance ({allow_s:.0f} s) ran out: the shapes after the last one shown were "
           "not tuned (cuBLAS for them).*")
    return table


# ---------------------------------------------------------------------------------- 16, 17: fused kernels
TUNING_OUT = "h200_tuning.json"  # the tuning table sections 15-17 write (a replacement for kernels/tuning/h200.json)
S10_FUSED_S = 75  # the time allowance of section 16 and of section 17 (s), each


def install_table(table: dict, out: Path, made_by_key: str, section: str) -> Path:
    """Check ``table`` (decode attention and small-M GEMM entries), install it in this process
    (and for the `sim run` subprocesses of later sections) and write it to OUT/h200_tuning.json,
    ``made_by_key`` naming this section's command."""
    from servesim.kernels import decode_attention as da
    from servesim.kernels import gemv as gm

    table = dict(table)
    table[made_by_key] = (f"python benchmarks/gpu_bench.py --sections {section} (" + time.strftime("%Y-%m-%d %H:%M")
                          + f"; torch {torch.__version__}, triton {_triton_version()})")
    table.setdefault("made_by", table[made_by_key])
    gm.check_entries(table.get(gm.GEMV_ENTRIES) or {})
    da.set_tuning(table)  # (checks the attention entries)
    path = out / TUNING_OUT
    path.write_text(json.dumps(table, indent=1) + "\n")
    os.environ[da.TUNING_ENV] = str(path)
    return path


def _base_table(dev, dtype) -> dict:
    """The installed tuning table (a copy), or an empty one for this device."""
    from servesim.kernels import decode_attention as da
    from servesim.kernels._common import num_sms

    t = da.get_tuning()
    if t:
        return json.loads(json.dumps(t))
    return dict(version=da.TUNING_VERSION, device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                sms=num_sms(dev), torch=torch.__version__, triton=_triton_version(),
                dtype=str(dtype).replace("torch.", ""), entries={})


def qkv_rope_tuning(dev, dtype, ceil, smoke: bool, out: Path, allow_s: float) -> dict | None:
    """Section 16: a layer's attention input in one kernel -- residual add + rmsnorm, the qkv
    GEMM, rotary on q and k, k and v written into the paged cache (`ops.rms_norm_qkv_rope`'s
    fused path: kernels/gemv.py with the rms prologue and the rope epilogue) -- against the
    *current* path (whatever the installed table runs: section 15's choice for the rms + qkv
    GEMM, then the rope_kv_write kernel) and the *cuBLAS* path (the rmsnorm kernel, F.linear,
    rope_kv_write) for both models at M = 1..64. Every candidate checked against
    `rms_norm_qkv_rope_ref` (q and the written cache rows) before it is timed and again after;
    times are CUDA-graph replays over copies of the weight (cold L2). The fused config is
    written to the table's ``gemv_entries`` (prologue ``rms_rope``) only where it beats both
    paths by 3%; else the row keeps what was installed. OUT/h200_tuning.json rewritten and
    installed; timings in OUT/qkv_rope_tuning.csv."""
    import pandas as pd
    import torch.nn.functional as F

    from servesim.gpu_backend.rope import build_cos_sin_cache
    from servesim.kernels import gemv as gm
    from servesim.kernels import ops
    from servesim.kernels._common import num_sms
    from servesim.kernels.reference import rms_norm_qkv_rope_ref

    deadline = time.monotonic() + allow_s
    cuda = dev.type == "cuda"
    t = timer(dev)
    sms = num_sms(dev)
    bw = ceil["copy_bw"]
    e = torch.empty((), dtype=dtype).element_size()
    tol = GEMV_TOL[dtype]
    names = ["tiny"] if smoke else ["llama-3.2-1b", "llama-3.1-8b"]
    Ms = (1, 4) if smoke else GEMV_MS
    reps = 10 if cuda else 1
    eps = 1e-5
    bs = S10_BLOCK if not smoke else 16
    table = _base_table(dev, dtype)
    entries = table.setdefault(gm.GEMV_ENTRIES, {})
    records, summary, rejected, bad = [], [], [], set()
    stopped = False
    impl = "auto" if cuda else "triton"  # (the smoke: Triton's interpreter)

    def time_calls(fn, ws):
        outs = [None] * len(ws)

        def run():
            for i, w in enumerate(ws):
                outs[i] = fn(w)

        rep = graphed(run, dev)
        s = t(rep, reps=reps, warmup=1) / len(ws)
        del rep
        return s, outs[0]

    for name in names:
        spec = model_cfg_spec(name, smoke)[1]
        hq, hkv, D, H, L = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size, spec.num_layers
        N = (hq + 2 * hkv) * D
        key = gm.gemv_key(dtype, ops.QKV_ROPE, N, H, sms)
        nbytes = N * H * e
        R = 2 if smoke else max(2, min(32, math.ceil(240e6 / nbytes)))  # >= 2: the after-replay check sees two weights
        g = torch.Generator(device=dev).manual_seed(N * 17 + H)
        ws = [torch.randn(N, H, device=dev, dtype=dtype, generator=g) * H ** -0.5 for _ in range(R)]
        nw = torch.rand(H, device=dev, dtype=dtype, generator=g) + 0.5
        cs = build_cos_sin_cache(D, 8192, device=dev)
        blocks = max(Ms) // bs + 2
        kc = torch.randn(blocks, bs, hkv, D, device=dev, dtype=dtype, generator=g)
        vc = torch.randn_like(kc)
        old_rows = {int(r["m"]): r for r in entries.get(key, [])}
        rows = []
        for M in Ms:
            if time.monotonic() > deadline:
                stopped = True
                break
            x = torch.randn(M, H, device=dev, dtype=dtype, generator=g)
            res = torch.randn(M, H, device=dev, dtype=dtype, generator=g)
            pos = torch.randint(0, 8192, (M,), device=dev, generator=g)
            slots = torch.randperm(blocks * bs, device=dev, generator=g)[:M]
            kr, vr = kc.clone(), vc.clone()
            qr, _ = rms_norm_qkv_rope_ref(x, nw, eps, ws[0], res, pos, cs, kr, vr, slots, hq, hkv)
            # after the graph replays over every weight the cache rows hold the LAST weight's k and v
            # (q is the first call's output): their own reference
            kl, vl = kc.clone(), vc.clone()
            rms_norm_qkv_rope_ref(x, nw, eps, ws[-1], res, pos, cs, kl, vl, slots, hq, hkv)
            flat = lambda c: c.view(-1, hkv, D)[slots]  # noqa: E731 - the rows this call writes

            def errors(q, last: bool = False):
                k_ref, v_ref = (kl, vl) if last else (kr, vr)
                return max(rel_err(q, qr), rel_err(flat(kc), flat(k_ref)), rel_err(flat(vc), flat(v_ref)))

            def wipe():  # a path that does not write its rows fails its check
                kc.view(-1, hkv, D)[slots] = 0
                vc.view(-1, hkv, D)[slots] = 0

            def cublas(w):
                xn, _ = ops.rms_norm(x, nw, eps, res, impl=impl)
                q, k, v = F.linear(xn, w).split([hq * D, hkv * D, hkv * D], dim=-1)
                return ops.rope_kv_write(q.view(M, hq, D), k.view(M, hkv, D), v.view(M, hkv, D), pos, cs, kc, vc,
                                         slots, impl=impl)[0]

            def current(w):
                return ops.rms_norm_qkv_rope(x, nw, eps, w, res, pos, cs, kc, vc, slots, hq, hkv, impl=impl)[0]

            def fused(w, cfg):
                return ops.rms_norm_qkv_rope(x, nw, eps, w, res, pos, cs, kc, vc, slots, hq, hkv, impl=impl,
                                             config=cfg)[0]

            rec = dict(model=name, M=M, n=N, k=H, per_step=L, mb=nbytes / 1e6)
            base = {}
            for label, fn in (("cublas", cublas), ("current", current)):
                wipe()
                err = errors(fn(ws[0]))
                if not err <= tol:
                    raise AssertionError(f"section 16 {name} M={M}: the {label} path's rel. error {err:.2e} vs "
                                         f"the reference (> {tol:.0e})")
                s_, _ = time_calls(fn, ws)
                base[label] = s_
                records.append(dict(rec, config=label, us=s_ * 1e6, of_copy_bw=nbytes / s_ / bw, rel_err=err))
            cur_cfg = gm.tuned_config(M, N, H, dtype, dev, ops.QKV_ROPE)
            best = (math.inf, None)
            n_cand = 0
            for cfg in gm.candidates(M, N, H, sms)[:2 if smoke else None]:
                ck = cfg.compile_key() + (gm.block_m(M, cfg.use_dot),)
                if ck in bad:
                    continue
                try:
                    wipe()
                    err = errors(fused(ws[0], cfg))
                    if not err <= tol:
                        raise AssertionError(f"rel. error {err:.2e} vs the torch reference (> {tol:.0e})")
                    s_, q2 = time_calls(lambda w, cfg=cfg: fused(w, cfg), ws)
                    err2 = errors(q2, last=True)
                    if not err2 <= tol:
                        raise AssertionError(f"rel. error {err2:.2e} after graph replays (> {tol:.0e})")
                except Exception as ex:  # noqa: BLE001 - a variant that fails is left out
                    bad.add(ck)
                    rejected.append((name, M, cfg.label(), f"{type(ex).__name__}: "
                                     f"{str(ex).splitlines()[0][:160] if str(ex) else ''}"))
                    log(f"section 16: {name} M={M} {cfg.label()} rejected: {ex}")
                    continue
                n_cand += 1
                records.append(dict(rec, config=cfg.label(), us=s_ * 1e6, of_copy_bw=nbytes / s_ / bw, rel_err=err2))
                if s_ < best[0]:
                    best = (s_, cfg)
            ref_s = min(base.values())
            win = best[1] is not None and best[0] < GEMV_WIN * ref_s
            if win:
                pick, pick_s = best[1], best[0]
            else:  # what was installed stays (the current path)
                pick, pick_s = cur_cfg, base["current"]
            rows.append(dict(m=M, config=None if pick is None else pick.to_dict(), us=round(pick_s * 1e6, 2),
                             cublas_us=round(base["cublas"] * 1e6, 2), current_us=round(base["current"] * 1e6, 2)))
            summary.append(dict(model=name, M=M, N=N, K=H, L=L, mb=nbytes / 1e6, cublas=base["cublas"],
                                current=base["current"], best=best[0], best_cfg=best[1], installed=pick,
                                installed_s=pick_s, changed=win, candidates=n_cand))
        if rows:
            # tuned rows replace the old ones of their M; the others (a deadline) stay as they were
            merged = {**old_rows, **{r["m"]: r for r in rows}}
            entries[key] = [merged[m] for m in sorted(merged)]
        ws = None
        free_memory(dev)
        if stopped:
            break
    install_table(table, out, "qkv_rope_made_by", "16")
    pd.DataFrame(records).to_csv(out / "qkv_rope_tuning.csv", index=False)

    md("\n## 16. A layer's attention input in one kernel: rmsnorm + qkv GEMM + RoPE + KV-cache write\n")
    md("Per model and M rows: **cuBLAS path** = the rmsnorm kernel (fused residual add), `F.linear`, the "
       "rope_kv_write kernel; **current** = what the installed table ran before this section (section 15's "
       "choice for rmsnorm + qkv, then rope_kv_write; or an earlier fused row); **fused** = `ops.rms_norm_qkv_rope` "
       "with a kernels/gemv.py config (the rms prologue, the rotary + KV-write epilogue: one kernel, nothing but "
       "q and the cache rows stored). Every path and candidate checked against `rms_norm_qkv_rope_ref` (q and the "
       f"written cache rows, rel. error <= {tol:.0e}) before timing, the candidates again after; CUDA-graph replays "
       f"over copies of the weight (cold L2), median of {reps}. **installed** = the row written to "
       f"OUT/{TUNING_OUT}'s `gemv_entries` (fused only where it beats both paths by 3%). Share = weight bytes / "
       "copy bandwidth / time.\n")
    md("| model | M | cuBLAS path | current | best fused | share | best config | installed | per step | "
       "candidates |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in summary:
        b = (f"{r['best'] * 1e6:.1f} us | {r['mb'] * 1e6 / bw / r['best']:.0%} | `{r['best_cfg'].label()}`"
             if r["best_cfg"] is not None else "- | - | -")
        inst = ("fused `" + r["installed"].label() + "`" + (" (new)" if r["changed"] else " (kept)")
                if r["installed"] is not None else "unfused")
        save = (min(r["cublas"], r["current"]) - r["installed_s"]) * r["L"] * 1e6
        md(f"| {r['model']} | {r['M']} | {r['cublas'] * 1e6:.1f} us | {r['current'] * 1e6:.1f} us | {b} | {inst} | "
           f"{save:+.0f} us | {r['candidates']} |")
    md("\n*per step*: the installed row's time saved over the faster of the two unfused paths, times the layers.")
    if rejected:
        md(f"\n**{len(rejected)} candidate(s) left out**:\n\n| model | M | config | why |\n|---|---|---|---|")
        for r in rejected[:20]:
            md(f"| {r[0]} | {r[1]} | `{r[2]}` | {r[3]} |")
    if stopped:
        md(f"\n*The time allowance ({allow_s:.0f} s) ran out: the rows after the last one shown were not tuned.*")
    return table


ATTN_MERGE_CTXS = (1024, 4096)  # section 4's contexts


def attention_merge_tuning(dev, dtype, ceil, smoke: bool, out: Path, allow_s: float) -> dict | None:
    """Section 17: the decode attention's fused reduce (the last split merges every head of its
    group in one tile) vs the *current* config (the installed table's: mostly the separate
    reduce kernel) and the *plain* path (`F.scaled_dot_product_attention`, `enable_gqa`, over
    a contiguous cache padded to the longest, masked), per model and batch 1-256 at the
    contexts of section 4 (lengths +-50%, cold KV: one call per layer over several layers).
    Candidates: the current config with the fused reduce at its split bound and at 2x / 4x
    (more splits are cheap when no second kernel merges them), its tile and half of it (so a
    sequence can use more splits), its minimum split length and 64 tokens;
    each checked against the torch reference before it is timed and again after. A batch's
    row is replaced by the best candidate (geometric mean over the contexts) only where it
    beats the current config by 3%. OUT/h200_tuning.json rewritten and installed; timings
    in OUT/attention_merge.csv."""
    import pandas as pd
    import torch.nn.functional as F
    from dataclasses import replace

    from servesim.kernels import decode_attention as da
    from servesim.kernels._common import num_sms
    from servesim.kernels.reference import paged_decode_attention_ref

    deadline = time.monotonic() + allow_s
    cuda = dev.type == "cuda"
    t = timer(dev)
    sms = num_sms(dev)
    bs = S10_BLOCK if not smoke else 16
    if smoke:
        shapes = {"tiny": (4, 2, 16)}
        batches, ctxs, mins = (1, 4), (48,), (16,)
    else:
        shapes = {n: (s.num_heads, s.num_kv_heads, s.head_dim) for n in ("llama-3.2-1b", "llama-3.1-8b")
                  for s in [load_model(n)]}
        batches, ctxs, mins = ATTN_BATCHES, ATTN_MERGE_CTXS, (64,)
    tol = ATTN_TOL[dtype]
    reps = 5 if cuda else 1
    bw = ceil["copy_bw"]
    table = _base_table(dev, dtype)
    records, summary, rejected = [], [], []
    stopped = False
    f = da.paged_decode_attention_triton

    def time_layers(fn, R):
        outs = [None] * R

        def run():
            for r in range(R):
                outs[r] = fn(r)

        rep = graphed(run, dev)
        s = t(rep, reps=reps, warmup=1) / R
        del rep
        return s, outs[0]

    for name, (hq, hkv, D) in shapes.items():
        group = hq // hkv
        key = da.tuning_key(dtype, group, hkv, D, bs, sms)
        scale = D ** -0.5
        new_rows = {}
        for B in batches:
            if time.monotonic() > deadline:
                stopped = True
                break
            per_ctx = []  # (ctx, {label: seconds}, plain seconds)
            cands: list = []
            cur = None
            for ctx in ctxs:
                kv_bytes = B * ctx * 2 * hkv * D * torch.empty((), dtype=dtype).element_size()
                layers = 1 if smoke else max(2, min(64, math.ceil(4 * 60e6 / kv_bytes)))
                c = _attn_case(B, ctx, hq, hkv, D, bs, dtype, dev, seed=B * 7919 + ctx + 1, layers=layers)
                R = len(c["bts"])
                ref = paged_decode_attention_ref(c["q"], c["kc"], c["vc"], c["bts"][0], c["sl"], scale)
                width = c["width"] * bs
                if cur is None:  # the installed config of this batch (at its first context's width)
                    cur = da.resolve_config(B, hkv, width, D, group, bs, dtype, sms, None)
                    seen = set()
                    # (half the tile: twice the splits a sequence can use -- batch 1 ran 64 programs on 132 SMs)
                    tiles = sorted({cur.block_n, max(16, cur.block_n // 2)}, reverse=True)
                    for S in (cur.max_splits, 2 * cur.max_splits, 4 * cur.max_splits):
                        for T in (cur.min_split_tokens, *mins):
                            for bn in tiles:
                                cfg = replace(cur, fused_reduce=True, max_splits=min(S, 2 * da.MAX_SPLITS),
                                              min_split_tokens=T, block_n=bn)
                                if cfg != cur and cfg not in seen:
                                    seen.add(cfg)
                                    cands.append(cfg)
                times = {}
                for cfg in [cur, *cands]:
                    try:
                        o = f(c["q"], c["kc"], c["vc"], c["bts"][0], c["sl"], scale, config=cfg)
                        err = rel_err(o, ref)
                        if not err <= tol:
                            raise AssertionError(f"rel. error {err:.2e} vs the torch reference (> {tol:.0e})")
                        s_, o2 = time_layers(lambda r, cfg=cfg: f(c["q"], c["kc"], c["vc"], c["bts"][r], c["sl"],
                                                                  scale, config=cfg), R)
                        err2 = rel_err(o2, ref)
                        if not err2 <= tol:
                            raise AssertionError(f"rel. error {err2:.2e} after graph replays (> {tol:.0e})")
                    except Exception as ex:  # noqa: BLE001 - left out (the current config must pass)
                        if cfg == cur:
                            raise AssertionError(f"section 17 {name} B={B} ctx={ctx}: the installed config "
                                                 f"{cfg.label()} failed: {ex}") from ex
                        rejected.append((name, B, ctx, cfg.label(), f"{type(ex).__name__}: "
                                         f"{str(ex).splitlines()[0][:160] if str(ex) else ''}"))
                        continue
                    times[cfg] = s_
                    records.append(dict(model=name, batch=B, ctx=ctx, config=cfg.label(), current=cfg == cur,
                                        us=s_ * 1e6, of_copy_bw=_attn_bytes(c, hkv, D, dtype) / bw / s_))
                # the plain path: SDPA over a contiguous copy of each layer's KV, padded to the longest
                Lm = int(c["lens"].max())
                mask = (torch.arange(Lm, device=dev)[None, :] < c["sl"][:, None].to(dev))[:, None, None, :]
                kv = []
                for r in range(R):
                    idx = c["bts"][r].long()  # [B, width] blocks -> [B, width * bs] tokens
                    k_ = c["kc"][idx].flatten(1, 2)[:, :Lm].transpose(1, 2).contiguous()
                    v_ = c["vc"][idx].flatten(1, 2)[:, :Lm].transpose(1, 2).contiguous()
                    kv.append((k_, v_))
                q4 = c["q"][:, :, None, :]

                def plain(r):
                    return F.scaled_dot_product_attention(q4, kv[r][0], kv[r][1], attn_mask=mask, scale=scale,
                                                          enable_gqa=True)[:, :, 0]

                err = rel_err(plain(0), ref)
                if not err <= tol:
                    raise AssertionError(f"section 17 {name} B={B} ctx={ctx}: the plain SDPA path's rel. error "
                                         f"{err:.2e} (> {tol:.0e})")
                plain_s, _ = time_layers(plain, R)
                records.append(dict(model=name, batch=B, ctx=ctx, config="sdpa-padded", current=False,
                                    us=plain_s * 1e6, of_copy_bw=_attn_bytes(c, hkv, D, dtype) / bw / plain_s))
                per_ctx.append((ctx, times, plain_s, _attn_bytes(c, hkv, D, dtype)))
                kv = c = None
                free_memory(dev)
            if len(per_ctx) < len(ctxs):
                break
            common = [cfg for cfg in cands if all(cfg in p[1] for p in per_ctx)]
            ratio = {cfg: _geomean([p[1][cfg] / p[1][cur] for p in per_ctx]) for cfg in common}
            best = min(common, key=lambda k: (ratio[k], k.label())) if common else None
            win = best is not None and ratio[best] < GEMV_WIN
            if win:
                new_rows[B] = best
            for ctx, times, plain_s, nbytes in per_ctx:
                pick = best if win else cur
                summary.append(dict(model=name, batch=B, ctx=ctx, cur=cur, cur_s=times[cur],
                                    best=best, best_s=times.get(best, math.nan), plain_s=plain_s, pick=pick,
                                    pick_s=times[pick], changed=win, nbytes=nbytes, candidates=len(times) - 1))
        if new_rows:
            rows = {int(r["batch"]): r for r in table["entries"].get(key, [])}
            for B, cfg in new_rows.items():
                rows[B] = dict(batch=B, config=cfg.to_dict())
            table["entries"][key] = [rows[b] for b in sorted(rows)]
        if stopped:
            break
    install_table(table, out, "attention_merge_made_by", "17")
    pd.DataFrame(records).to_csv(out / "attention_merge.csv", index=False)

    md("\n## 17. Decode attention: the fused reduce merging all heads of a group at once\n")
    md("Per model, batch and context (lengths +-50%, cold KV: one call per layer over several layers): "
       "**current** = the installed table's config; **fused** = the best of the candidates (the current config "
       "with the fused reduce -- the last split merges every head of its group in one tile, no second kernel -- at "
       f"its split bound and 2x / 4x, its tile and half of it, minimum split lengths its own and {tuple(mins)}); "
       "**plain** = "
       "`F.scaled_dot_product_attention(enable_gqa=True)` over a contiguous cache padded to the longest, masked. "
       f"Each checked against the torch reference (rel. error <= {tol:.0e}) before timing and again after; "
       f"CUDA-graph replays, median of {reps}. **installed**: a batch's row replaced by the best fused config only "
       "where it beats the current one by 3% (geometric mean over the contexts). Share = (KV + q + out bytes) / "
       "copy bandwidth / time.\n")
    md("| model | batch | context | current | share | config | best fused | share | config | plain (SDPA) | "
       "installed | candidates |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in summary:
        bf = (f"{r['best_s'] * 1e6:.1f} us | {r['nbytes'] / bw / r['best_s']:.0%} | `{r['best'].label()}`"
              if r["best"] is not None else "- | - | -")
        md(f"| {r['model']} | {r['batch']} | {r['ctx']} | {r['cur_s'] * 1e6:.1f} us | "
           f"{r['nbytes'] / bw / r['cur_s']:.0%} | `{r['cur'].label()}` | {bf} | {r['plain_s'] * 1e6:.1f} us | "
           f"{'fused (new)' if r['changed'] else 'current'} | {r['candidates']} |")
    if rejected:
        md(f"\n**{len(rejected)} candidate(s) left out**:\n\n| model | batch | context | config | why |\n"
           "|---|---|---|---|---|")
        for r in rejected[:20]:
            md("| " + " | ".join(str(v) for v in r[:3]) + f" | `{r[3]}` | {r[4]} |")
    if stopped:
        md(f"\n*The time allowance ({allow_s:.0f} s) ran out: the batches after the last one shown were not tried.*")
    return table


# ---------------------------------------------------------------------------------- 14
def s10_class(name: str, cuda: bool) -> str:
    """`kernel_class`, with the baseline's kernels named too (SDPA, index_put, elementwise)."""
    c = kernel_class(name, cuda)
    if c != "other":
        return c
    n = name.lower()
    if any(x in n for x in ("fmha", "flash", "sdpa", "efficient_attention", "cudnn", "softmax")):
        return "attention"
    if "index_put" in n or "indexput" in n or "scatter" in n:
        return "KV write (index_put)"
    if "argmax" in n or "reduce_kernel" in n:
        return "argmax / reductions"
    if "elementwise" in n or "vectorized" in n or "cat" in n or "copy" in n:
        return "elementwise / copies"
    return "other"


def profile_step(step, dev, work: Path | None, name: str, B: int, ctx: int, engine: str, wall_s: float) -> list[dict]:
    """Section 14, one engine at one point: torch.profiler over replays of ``step``'s CUDA
    graph; per kernel its launches and time per iteration, beside the iteration's wall time
    (timed without the profiler). On a CPU, aten ops by self time stand in for kernels."""
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    n = 10 if cuda else 1
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    rep = graphed(step, dev)
    for _ in range(3):
        rep()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        for _ in range(n):
            rep()
        if cuda:
            torch.cuda.synchronize()
    trace = Path(work or tempfile.gettempdir()) / f"prof_{name}_{B}_{ctx}_{re.sub(r'[^a-z]+', '_', engine)}.json"
    ks = profiled_kernels(prof, cuda, trace)
    per: dict = {}
    for k_name, _, dur in ks:
        key = short_kernel_name(k_name)
        e = per.setdefault(key, [0, 0.0, s10_class(k_name, cuda)])
        e[0] += 1
        e[1] += dur
    del rep
    return [dict(model=name, batch=B, ctx=ctx, engine=engine, kernel=k, kind=c, per_iteration=cnt / n,
                 us=tot / n, wall_us=wall_s * 1e6, share_of_wall=tot / n / (wall_s * 1e6))
            for k, (cnt, tot, c) in sorted(per.items(), key=lambda kv: -kv[1][1])]


def _profile_tables(rows: list[dict], out: Path | None) -> None:
    import pandas as pd

    md("\n## 14. Profile: kernel time vs graph wall time, ours and the plain-PyTorch baseline\n")
    md("torch.profiler (CUDA activities) over 10 replays of each point's CUDA graph (the kernels inside the graph "
       "are recorded), per iteration; wall = the graph's replay time measured without the profiler (section 4). "
       "gaps = wall - all kernels (launch latency inside the graph, idle SMs between kernels). The per-kernel "
       "rows are in OUT/profile_s10.csv.\n")
    if not rows:
        md("*no profile was taken*")
        return
    df = pd.DataFrame(rows)
    if out is not None:
        df.to_csv(out / "profile_s10.csv", index=False)
    for (name, B, ctx), pt in df.groupby(["model", "batch", "ctx"], sort=False):
        engines = list(dict.fromkeys(pt["engine"]))
        md(f"\n**{name}, batch {B} x context {ctx}**\n")
        md("| kind | " + " | ".join(f"{e}: us / iteration (launches)" for e in engines) + " |")
        md("|---" * (1 + len(engines)) + "|")
        kinds = list(dict.fromkeys(pt.sort_values("us", ascending=False)["kind"]))
        for kd in kinds:
            cells = []
            for e in engines:
                x = pt[(pt.engine == e) & (pt.kind == kd)]
                cells.append(f"{x.us.sum():.1f} ({x.per_iteration.sum():g})" if len(x) else "-")
            md(f"| {kd} | " + " | ".join(cells) + " |")
        tot, gaps = [], []
        for e in engines:
            x = pt[pt.engine == e]
            wall = float(x.wall_us.iloc[0])
            tot.append(f"{x.us.sum():.1f} of {wall:.1f} wall ({x.us.sum() / wall:.0%})")
            gaps.append(f"{wall - x.us.sum():.1f} ({(wall - x.us.sum()) / wall:.0%})")
        md("| **all kernels** | " + " | ".join(tot) + " |")
        md("| **gaps** | " + " | ".join(gaps) + " |")
        ours = pt[pt.engine == engines[0]].sort_values("us", ascending=False).head(6)
        md(f"\nTop kernels of {engines[0]}: " + "; ".join(
            f"`{r.kernel}` {r.us:.1f} us ({r.per_iteration:g}x, {r.share_of_wall:.0%})" for r in ours.itertuples()))


def gemm_layouts(spec, name: str, dev, dtype, ceil, smoke: bool) -> tuple[list[dict], list[str]]:
    """Section 14: the decode GEMMs alone, in our weights' layout (``F.linear(x, W)``,
    W [out, in]) and the baseline's (``x @ W``, W [in, out]), per row count M: time per call
    (CUDA-graph replays over copies of the weight that keep it out of L2) and achieved
    bytes/s vs the copy bandwidth. Returns the rows (OUT/gemm_layouts.csv) and the table's
    markdown lines."""
    import pandas as pd
    import torch.nn.functional as F

    t = timer(dev)
    d = spec
    shapes = dict(qkv=(d.hidden_size, d.q_size + 2 * d.kv_size), o=(d.q_size, d.hidden_size),
                  gate_up=(d.hidden_size, 2 * d.intermediate_size), down=(d.intermediate_size, d.hidden_size),
                  lm_head=(d.hidden_size, d.vocab_size))
    count = dict(qkv=d.num_layers, o=d.num_layers, gate_up=d.num_layers, down=d.num_layers, lm_head=1)
    Ms = (1, 16, 64, 256) if not smoke else (1, 4)
    bw = ceil["copy_bw"]
    e = torch.empty((), dtype=dtype).element_size()
    rows = []
    for kind, (k, n) in shapes.items():
        nbytes = k * n * e
        R = 1 if smoke else max(1, min(32, math.ceil(240e6 / nbytes)))
        w_oi = [torch.randn(n, k, device=dev, dtype=dtype) * 0.02 for _ in range(R)]
        w_io = [torch.randn(k, n, device=dev, dtype=dtype) * 0.02 for _ in range(R)]
        for M in Ms:
            x = torch.randn(M, k, device=dev, dtype=dtype)
            s_oi = t(graphed(lambda: [F.linear(x, w) for w in w_oi], dev), reps=10 if not smoke else 1) / R
            s_io = t(graphed(lambda: [x @ w for w in w_io], dev), reps=10 if not smoke else 1) / R
            rows.append(dict(model=name, linear=kind, k=k, n=n, M=M, per_step=count[kind], mb=nbytes / 1e6,
                             linear_out_in_us=s_oi * 1e6, matmul_in_out_us=s_io * 1e6,
                             linear_out_in_of_bw=nbytes / s_oi / bw, matmul_in_out_of_bw=nbytes / s_io / bw))
        w_oi = w_io = None
        free_memory(dev)
    df = pd.DataFrame(rows)
    lines = [f"\n**{name}: the decode GEMMs alone, weights [out, in] (`F.linear`, ours) vs [in, out] (`x @ W`, "
             "the baseline)**: us per call (share of copy bandwidth); the last row is a step's GEMMs, each linear "
             "times its count per step.\n"]
    lines.append("| linear (in x out) | MB | " + " | ".join(f"M={M}: ours layout | M={M}: [in, out]" for M in Ms) + " |")
    lines.append("|---|---|" + "---|---|" * len(Ms))
    for kind in shapes:
        x = df[df.linear == kind]
        cells = []
        for M in Ms:
            r = x[x.M == M].iloc[0]
            cells += [f"{r.linear_out_in_us:.1f} ({r.linear_out_in_of_bw:.0%})",
                      f"{r.matmul_in_out_us:.1f} ({r.matmul_in_out_of_bw:.0%})"]
        lines.append(f"| {kind} ({shapes[kind][0]} x {shapes[kind][1]}) | {x.mb.iloc[0]:.1f} | " + " | ".join(cells) + " |")
    cells = []
    for M in Ms:
        x = df[df.M == M]
        a = float((x.linear_out_in_us * x.per_step).sum())
        b = float((x.matmul_in_out_us * x.per_step).sum())
        cells += [f"{a / 1e3:.2f} ms", f"{b / 1e3:.2f} ms"]
    lines.append("| **a step's GEMMs** | | " + " | ".join(cells) + " |")
    return rows, lines


# ---------------------------------------------------------------------------------- main
# ---------------------------------------------------------------------------------- 11
def decode_splits(dev, dtype, ceil, smoke: bool, out: Path) -> None:
    """Paged decode attention over sequences of equal vs unequal lengths (the same total KV),
    for every split count: a batch whose one (sequence, kv head) program per SM already
    fills the GPU (no split) leaves the longest sequences running alone at the end. Checks
    each split count against the torch reference first. Rows also in
    OUT/decode_splits.csv."""
    import pandas as pd

    from servesim.kernels import ops
    from servesim.kernels.decode_attention import choose_num_splits

    t = timer(dev)
    rng = np.random.default_rng(0)
    bs = 16
    bound = 256 if smoke else 8192  # the block table's width x block size (a run's longest request)
    mean = 64 if smoke else 1024
    shapes = [("llama-3.2-1b", 32, 8, 64), ("llama-3.1-8b", 32, 8, 128)]
    batches = (4, 32) if smoke else (8, 16, 32, 64, 128, 256)
    splits = (1, 2, 4) if smoke else (1, 2, 4, 8, 16, 32)
    rows, worst = [], 0.0
    for name, hq, hkv, D in shapes:
        for B in batches:
            for dist in ("equal", "unequal"):
                if dist == "equal":
                    lens = np.full(B, mean)
                else:  # lognormal (sigma 1, like conversation prompts), scaled to the same total
                    x = rng.lognormal(0.0, 1.0, B)
                    lens = np.clip(np.round(x / x.mean() * mean), 1, bound).astype(np.int64)
                nblk = [-(-int(n) // bs) for n in lens]
                total = sum(nblk)
                kc = torch.randn(total + 1, bs, hkv, D, dtype=dtype, device=dev)
                vc = torch.randn_like(kc)
                perm = torch.randperm(total, generator=torch.Generator().manual_seed(B)) + 1
                bt = torch.zeros(B, bound // bs, dtype=torch.int32)
                o = 0
                for i, k in enumerate(nblk):
                    bt[i, :k] = perm[o:o + k].to(torch.int32)
                    o += k
                bt = bt.to(dev)
                sl = torch.tensor(lens, dtype=torch.int32, device=dev)
                q = torch.randn(B, hq, D, dtype=dtype, device=dev)
                ref = ops.paged_decode_attention(q, kc, vc, bt, sl, D ** -0.5, impl="torch")
                kv_bytes = 2 * int(lens.sum()) * hkv * D * q.element_size()
                auto = choose_num_splits(B, hkv, bound)
                row = dict(model=name, batch=B, lengths=dist, max_len=int(lens.max()), kv_tokens=int(lens.sum()),
                           auto_splits=auto, roofline_us=kv_bytes / ceil["copy_bw"] * 1e6)
                for sp in sorted(set(splits) | {auto}):
                    out_ = ops.paged_decode_attention(q, kc, vc, bt, sl, D ** -0.5, num_splits=sp)
                    err = rel_err(out_, ref)
                    worst = max(worst, err)
                    if not err < 2e-2:
                        raise AssertionError(f"decode attention {name} B={B} {dist} splits={sp}: rel. error {err}")
                    fn = graphed(lambda sp=sp: ops.paged_decode_attention(q, kc, vc, bt, sl, D ** -0.5,
                                                                          num_splits=sp), dev)
                    row[f"s{sp}_us"] = t(fn, reps=3 if smoke else 20) * 1e6
                rows.append(row)
                del kc, vc
    df = pd.DataFrame(rows)
    df.to_csv(out / "decode_splits.csv", index=False)
    md("\n## 11. Decode attention: equal vs unequal sequence lengths, by split count\n")
    md(f"One layer's paged decode attention (CUDA-graph replay, median of 20), batch B of sequences of {mean} "
       f"tokens on average: all equal, or lognormal (sigma 1) with the same total; block table {bound} tokens "
       "wide (a run's longest request, as in the decode graphs). Every split count was checked against the "
       f"torch reference first (worst rel. error {worst:.1e}). auto = `choose_num_splits`. roofline = KV bytes "
       "/ copy bandwidth (bytes read + written per second).\n")
    head = "| model | B | lengths | longest | auto | " + " | ".join(f"{sp} split{'s' * (sp > 1)}" for sp in splits) \
        + " | best / auto | roofline |"
    md(head)
    md("|---" * (6 + len(splits)) + "|---|")
    for r in rows:
        ts = [r[f"s{sp}_us"] for sp in splits]
        auto_us = r["s%d_us" % r["auto_splits"]]
        md(f"| {r['model']} | {r['batch']} | {r['lengths']} | {r['max_len']} | {r['auto_splits']} | "
           + " | ".join(f"{x:.1f} us" for x in ts)
           + f" | {min(ts) / auto_us:.2f} | {r['roofline_us']:.1f} us |")


def fp8_weights(dev, dtype, smoke: bool, out: Path) -> None:
    """fp8 weights (e4m3, per-channel scales, inputs quantised per token, ``torch._scaled_mm``)
    beside bf16, Llama-3.1-8B with random weights: benchmarks/gpu_quantization.py's steps 1-3
    (its functions, not a copy): every decoder linear's fp8 GEMM checked against its plain
    fp32 reference (`weights.fp8_linear_ref`) first, then the logits / greedy tokens of the fp8
    model vs the bf16 one, the CUDA-graph decode iteration at batch 1-256 x context 1k with
    the simulator's ratios for the same shapes, and the GEMMs by row count
    (OUT/fp8_weights.csv). gpu_quantization.py adds the offline run and is the committed
    table's command."""
    import argparse as _ap

    import gpu_quantization as gq
    import pandas as pd

    from servesim.gpu_backend.model import LlamaModel
    from servesim.gpu_backend.weights import fp8_linear, fp8_linear_ref
    from servesim.sim.specs import apply_precision, load_hardware

    hw_name = hardware_here()
    hw = load_hardware(hw_name)
    if not hw.matmul_rate("fp8"):
        md(f"\n## 18. fp8 weights vs bf16\n\n{hw_name} has no fp8 tensor cores: skipped.")
        return
    _, spec = model_cfg_spec("llama-3.1-8b", smoke)
    fp8 = "fp8-channel"
    args = _ap.Namespace(batches=[1, 4] if smoke else [1, 16, 64, 256], ctx=64 if smoke else 1024,
                         reps=2 if smoke else 30, rows=[1, 4, 16] if smoke else list(gq.ROWS),
                         acc_prompts=3 if smoke else 16, acc_prompt_len=16 if smoke else 128,
                         acc_tokens=6 if smoke else 64)
    mb = LlamaModel(spec, None, dtype=dtype, device=dev, seed=0)
    mf = LlamaModel(apply_precision(spec, hw, fp8), mb.weights, dtype=dtype, device=dev)
    # correctness before timing: each fp8 linear against its dequantised fp32 reference
    g = torch.Generator(device="cpu").manual_seed(3)
    worst = 0.0
    for name in ("qkv", "o", "gate_up", "down"):
        w = getattr(mf.weights.layers[0], name)
        for rows in (1, 64):
            x = torch.randn(rows, w.shape[1], generator=g).to(dev, dtype)
            worst = max(worst, rel_err(fp8_linear(x, w), fp8_linear_ref(x, w)))
    if worst > 2e-2:
        raise RuntimeError(f"fp8 GEMM vs its fp32 reference: rel. error {worst:.2e} > 2e-2 -- nothing timed")
    acc = gq.accuracy(mb, mf, spec, dev, args)
    timer_ = gq.Timer(dev)
    dec = gq.decode_times({"bf16": mb, "fp8": mf}, spec, dev, args, timer_)
    bfc, f8c, gemm = gq.gemm_curves(mb, mf, spec, dev, args, timer_)
    del mb, mf
    free_memory(dev)
    gq.sim_decode_ratios(gq.sim_models(spec, hw_name, fp8, bfc, f8c, None), dec)
    md("\n## 18. fp8 weights vs bf16\n")
    md(f"{spec.name}, random weights; fp8 ({fp8}): the decoder linears in e4m3 with per-channel scales, inputs "
       "quantised per token, `torch._scaled_mm` (benchmarks/gpu_quantization.py's functions). Every fp8 linear "
       f"first checked against its dequantised fp32 reference: worst rel. error {worst:.1e}. On random weights "
       f"the fp8 model's last-position logits differ from bf16's by {acc['logit_rel_err']:.3f} (relative; cosine "
       f"{acc['logit_cosine']:.4f}), top-1 agreement {acc['top1_agreement']:.0%}, greedy tokens agree at "
       f"{acc['greedy_agreement']:.0%} of {acc['greedy_tokens']} positions (random weights: flat distributions, "
       "a floor, not a trained checkpoint's agreement).\n")
    sims = [k for k in dec[0] if k.startswith("sim: ")]
    md(f"| batch x context | bf16 ms | fp8 ms | fp8 / bf16 | " + " | ".join(k[5:] for k in sims) + " |")
    md("|---:|---:|---:|---:|" + "---:|" * len(sims))
    for r in dec:
        md(f"| {r['batch']} x {r['ctx']} | {r['bf16_s'] * 1e3:.3f} | {r['fp8_s'] * 1e3:.3f} | {r['ratio']:.3f} | "
           + " | ".join(f"{r[k]:.3f} ({r[k] / r['ratio'] - 1:+.1%})" for k in sims) + " |")
    md("\n| linear | rows | bf16 us | fp8 GEMM us | quantise us | fp8 GEMM / bf16 |\n|---|---:|---:|---:|---:|---:|")
    for r in gemm:
        if r["tokens"] in (1, 4, 16, 64, 256, 1024):
            md(f"| {r['linear']} | {r['tokens']} | {r['bf16_s'] * 1e6:.1f} | {r['fp8_gemm_s'] * 1e6:.1f} | "
               f"{r['quant_s'] * 1e6:.1f} | {r['fp8_gemm_s'] / r['bf16_s']:.3f} |")
    pd.DataFrame([{"what": "decode", **r} for r in dec] + [{"what": "gemm", **r} for r in gemm]
                 + [{"what": "accuracy", "fp8_gemm_max_rel_err": worst, **acc}]).to_csv(out / "fp8_weights.csv",
                                                                                        index=False)


S10_SECTIONS = "1,15,16,17,4,14"
S10_TUNING_S = 150  # section 12's time allowance (s)
S10_GEMV_S = 150  # section 15's time allowance (s)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=470)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device there is")
    ap.add_argument("--sections", default="1,2,3,4,5,8,9,7",
                    help="comma-separated; they run in the order 1,2,3,12,15,16,17,4,5,14,8,9,10,11,18,7,6 (6, 10, "
                         f"11, 12, 14-18 are not defaults); 's10' = {S10_SECTIONS} (issue S10's device call)")
    args = ap.parse_args()
    out = Path(args.out)  # only the final files go here (the device tool returns <= 8 files)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_bench_"))
    budget = Budget(args.budget_s)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    secs = set(args.sections.replace("s10", S10_SECTIONS).split(","))
    if args.smoke and dev.type != "cuda":
        # section 12 runs the Triton kernels in the interpreter (before any kernel module is imported)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    md("# GPU backend benchmark\n")
    info = (f"device: {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'} (hardware spec "
            f"{hardware_here()}); torch {torch.__version__}")
    try:
        import triton
        info += f"; triton {triton.__version__}"
    except ImportError:
        pass
    md(info + f"; {time.strftime('%Y-%m-%d %H:%M')}; dtype {dtype}")
    calib: list[dict] = []
    ceil = {"copy_bw": 3.0e12, "matmul": 790e12}
    steps = [("1", "ceilings", 15, lambda: ceil.update(ceilings(dev, args.smoke))),
             ("2", "kernels", 60, lambda: kernels(dev, dtype, ceil, args.smoke)),
             ("3", "model vs HF", 40, lambda: vs_hf(dev, dtype, args.smoke)),
             ("12", "decode attention tuning", 60,
              lambda: attention_tuning(dev, dtype, ceil, args.smoke, out,
                                       allow_s=S10_TUNING_S if args.smoke else min(S10_TUNING_S, budget.left() - 150))),
             ("15", "small-M GEMM tuning", 40,
              lambda: gemv_tuning(dev, dtype, ceil, args.smoke, out,
                                  allow_s=S10_GEMV_S if args.smoke else min(S10_GEMV_S, budget.left() - 150))),
             ("16", "fused qkv + rope tuning", 20,
              lambda: qkv_rope_tuning(dev, dtype, ceil, args.smoke, out,
                                      allow_s=S10_FUSED_S if args.smoke else min(S10_FUSED_S, budget.left() - 150))),
             ("17", "fused attention merge tuning", 20,
              lambda: attention_merge_tuning(dev, dtype, ceil, args.smoke, out, allow_s=S10_FUSED_S if args.smoke
                                             else min(S10_FUSED_S, budget.left() - 150))),
             ("4", "decode grid", 90, lambda: decode_grid(dev, dtype, ceil, budget, args.smoke, calib, out=out, work=work,
                                                          profile="14" in secs, prefill="5" in secs)),
             ("14", "decode profile (S10)", 40,
              lambda: None if "4" in secs else decode_grid(dev, dtype, ceil, budget, args.smoke, calib, out=out,
                                                           work=work, profile=True, only_profile=True)),
             ("8", "decode profile", 30, lambda: profile_decode(dev, dtype, ceil, work, args.smoke)),
             ("9", "mixed iterations", 90, lambda: mixed_profile(dev, dtype, args.smoke, out, work)),
             ("10", "piecewise graphs", 100, lambda: piecewise_bench(dev, dtype, args.smoke, out, work)),
             ("11", "decode splits", 60, lambda: decode_splits(dev, dtype, ceil, args.smoke, out)),
             ("18", "fp8 weights vs bf16", 40, lambda: fp8_weights(dev, dtype, args.smoke, out)),
             ("7", "vs HF generate", 80, lambda: vs_hf_generate(work, dev, dtype, args.smoke, budget)),
             ("6", "end to end", 120, lambda: end_to_end(out, work, args.smoke, budget))]
    for key, what, need, fn in steps:
        if key not in secs or not budget.allows(need, what):
            continue
        t0 = time.perf_counter()
        try:
            fn()
        except Exception:  # keep going: one broken section must not lose the others
            md(f"\n*{what} failed:*\n```\n{traceback.format_exc()[-3000:]}\n```")
        log(f"[{what}: {time.perf_counter() - t0:.0f} s, {budget.left():.0f} s left]")
        (out / "gpu_bench.md").write_text("\n".join(MD) + "\n")
        if calib:
            import pandas as pd
            pd.DataFrame(calib).to_csv(out / "calibration.csv", index=False)
    (out / "gpu_bench.md").write_text("\n".join(MD) + "\n")
    (out / "log.txt").write_text(LOG.getvalue())
    fit_out(out)


def fit_out(out: Path, max_files: int = 8) -> None:
    """The device tool returns at most ``max_files`` files from OUT: past that, the CSV tables
    go into one OUT/tables.tar.gz."""
    files = [f for f in out.rglob("*") if f.is_file()]
    if len(files) <= max_files:
        return
    csvs = sorted(f for f in out.glob("*.csv"))
    with tarfile.open(out / "tables.tar.gz", "w:gz") as tf:
        for f in csvs:
            tf.add(f, arcname=f.name)
    for f in csvs:
        f.unlink()
    log(f"{len(files)} files in {out}: the {len(csvs)} CSV tables are in tables.tar.gz")


if __name__ == "__main__":
    main()
