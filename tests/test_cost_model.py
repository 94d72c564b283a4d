"""Roofline cost model: sanity against hand calculations, shape properties, the affine
decode contract, and config validation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from servesim.sim.cost_model import GPU_TERMS, LINEARS, GemmCurve, RooflineConfig, RooflineCostModel
from servesim.sim.specs import load_hardware, load_model
from servesim.sim.types import IterationShape

M8 = load_model("llama-3.1-8b")
M1 = load_model("llama-3.2-1b")
M70 = load_model("llama-3.1-70b")
H100 = load_hardware("h100-sxm")


def decode(n, kv_each, graph=False, padded=0):
    return IterationShape(n_decode=n, decode_kv_sum=n * kv_each, graph=graph, padded_decode=padded)


def prefill(*chunks, prior=None, sampling=None, n_decode=0, kv_sum=0):
    prior = prior or (0,) * len(chunks)
    return IterationShape(
        ctx_new_tokens=tuple(chunks),
        ctx_prior_tokens=tuple(prior),
        n_ctx_sampling=len(chunks) if sampling is None else sampling,
        n_decode=n_decode,
        decode_kv_sum=kv_sum,
    )


def close(a, b, rel=1e-12):
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-18)


# --- hand calculations -------------------------------------------------------------------


def test_decode_batch1_is_weight_read():
    cm = RooflineCostModel(M8, H100)
    shape = decode(1, 1024, graph=True, padded=1)
    gpu = cm.gpu_time(shape)
    # All weights but the embedding table (only gathered) are read once per step.
    assert gpu == pytest.approx(M8.weight_bytes / 3.0e12, rel=0.08)
    assert 5.0e-3 < gpu < 5.5e-3
    assert cm.price(shape) == pytest.approx(gpu + 40e-6 + 300e-6 + 1e-6, rel=1e-9)


def test_prefill_8k_is_compute_bound():
    cm = RooflineCostModel(M8, H100)
    T = 8192
    bd = cm.breakdown(prefill(T))
    for k in ("qkv", "o", "gate_up", "down"):
        cf, w, ca = cm._lin[k]
        assert cf * T > w + ca * T  # every linear is compute-bound
    linear = 2 * (M8.params - 2 * M8.embedding_params) * T / 790e12
    attn = 4 * 128 * 32 * 32 * (T * (T + 1) / 2) / 790e12
    assert sum(bd[k] for k in ("qkv", "o", "gate_up", "down")) == pytest.approx(linear, rel=1e-3)
    assert bd["attn_prefill"] == pytest.approx(attn, rel=1e-9)
    total = cm.price(prefill(T))
    assert linear + attn < total < 1.15 * (linear + attn)
    assert total == pytest.approx(2 * M8.params * T / 790e12 + attn, rel=0.1)


def test_lm_head_only_on_sampling_tokens():
    cm = RooflineCostModel(M8, H100)
    long_chunk = cm.breakdown(prefill(4096, sampling=1))
    short_chunk = cm.breakdown(prefill(16, sampling=1))
    no_sample = cm.breakdown(prefill(4096, sampling=0))
    assert long_chunk["lm_head"] == short_chunk["lm_head"] > 0
    assert no_sample["lm_head"] == 0 and no_sample["sampler"] == 0
    # A chunk that does not finish its prompt is cheaper exactly by the lm_head + sampler.
    d = cm.price(prefill(4096, sampling=1)) - cm.price(prefill(4096, sampling=0))
    assert d == pytest.approx(long_chunk["lm_head"] + long_chunk["sampler"], rel=1e-9)
    # Generation tokens all sample.
    assert cm.breakdown(decode(8, 100))["lm_head"] == cm.breakdown(prefill(1, 1, 1, 1, 1, 1, 1, 1))["lm_head"]


def test_prefill_attention_counts_prior_tokens():
    cm = RooflineCostModel(M8, H100, RooflineConfig(prefill_attention_rows=0))  # the FLOP/byte roofline alone
    a = cm.breakdown(prefill(512, prior=(0,)))["attn_prefill"]
    b = cm.breakdown(prefill(512, prior=(8192,)))["attn_prefill"]
    assert b > a
    pairs = 512 * 8192 + 512 * 513 / 2
    assert b == pytest.approx(max(cm._ap_f * pairs, cm._ap_new * 512 + cm._ap_prior * 8192), rel=1e-12)


def test_decode_attention_memory_bound_with_gqa():
    cm = RooflineCostModel(M8, H100)
    per_kv_bytes = M8.kv_bytes_per_token / 3.0e12
    assert cm.decode_affine(4, False, 0)[1] == pytest.approx(per_kv_bytes, rel=1e-12)


def test_empty_iteration_costs_nothing():
    cm = RooflineCostModel(M8, H100)
    assert cm.price(IterationShape()) == 0.0
    assert cm.decode_affine(0, False, 0) == (0.0, 0.0)


# --- host side -----------------------------------------------------------------------------


def test_overlap_scheduler_hides_host_work_under_the_gpu():
    """With the overlap scheduler an iteration costs max(gpu_rest, host launch + scheduler)
    + the decode KV term: the host's whole work hides where the GPU is slower, and shows
    past the GPU's where it is not (an eager 1B decode step is host-bound)."""
    a = RooflineCostModel(M8, H100, overlap_scheduler=False)
    b = RooflineCostModel(M8, H100, overlap_scheduler=True)
    for s in (decode(16, 1000, graph=True, padded=16), prefill(1000, 200, n_decode=3, kv_sum=900)):
        n_req = len(s.ctx_new_tokens) + s.n_decode
        sched = 300e-6 + 1e-6 * n_req
        bd = a.breakdown(s)
        assert bd["scheduler"] == pytest.approx(sched)
        gpu_kv = bd["attn_decode_kv"]
        gpu_rest = sum(bd[k] for k in GPU_TERMS) - gpu_kv
        host = (a.cfg.host_overhead_graph_s if s.graph else a.host_overhead_eager_s + a.cfg.host_overhead_context_s)
        assert b.price(s) == pytest.approx(max(gpu_rest, host + sched) + gpu_kv, rel=1e-9)
        assert b.price(s) < a.price(s)
        assert sum(b.breakdown(s).values()) == pytest.approx(b.price(s), rel=1e-9)
    # host-bound: an eager 1B decode step of one request costs its host work
    c = RooflineCostModel(M1, H100, overlap_scheduler=True)
    s = decode(1, 512)
    bd = c.breakdown(s)
    assert c.price(s) == pytest.approx(c.host_overhead_eager_s + 300e-6 + 1e-6 + bd["attn_decode_kv"], rel=1e-9)
    assert bd["host_launch"] > 0 and bd["scheduler"] > 0


def test_eager_costs_more_than_graph_for_small_decode():
    cm = RooflineCostModel(M1, H100)
    eager, graph = cm.price(decode(1, 512)), cm.price(decode(1, 512, graph=True, padded=1))
    assert eager > graph
    # 1B decode is launch-bound when eager: the launch overhead shows through.
    assert cm.breakdown(decode(1, 512))["host_launch"] > 0
    assert cm.host_overhead_eager_s == pytest.approx(300e-6 + 16 * 60e-6)


def test_eager_overlap_switch():
    cfg = RooflineConfig(eager_launch_overlaps_gpu=False, host_overhead_eager_s=2e-3)
    add = RooflineCostModel(M8, H100, cfg)
    ovl = RooflineCostModel(M8, H100, RooflineConfig(host_overhead_eager_s=2e-3))
    s = decode(8, 2000)
    assert add.price(s) - ovl.price(s) == pytest.approx(2e-3, rel=1e-9)  # 8B decode GPU > 2 ms


def test_context_launch_overlap_and_kv_bandwidth():
    """context_launch_overlap moves an eager context iteration between max(gpu, host) (1)
    and gpu + host (0), leaving decode-only iterations alone; kv_bandwidth_efficiency
    prices only decode attention's KV reads."""
    host = 20e-3
    s = prefill(64, sampling=1)
    lo = RooflineCostModel(M8, H100, RooflineConfig(host_overhead_eager_s=host, context_launch_overlap=0.0))
    hi = RooflineCostModel(M8, H100, RooflineConfig(host_overhead_eager_s=host, context_launch_overlap=1.0))
    gpu = hi.gpu_time(s)
    assert gpu < host
    assert lo.price(s) - hi.price(s) == pytest.approx(gpu, rel=1e-9)
    d = decode(8, 2000)
    assert lo.price(d) == hi.price(d)
    slow_kv = RooflineCostModel(M8, H100, RooflineConfig(kv_bandwidth_efficiency=0.5))
    base = RooflineCostModel(M8, H100)
    assert slow_kv.breakdown(d)["attn_decode_kv"] == pytest.approx(2 * base.breakdown(d)["attn_decode_kv"])
    assert slow_kv.breakdown(d)["qkv"] == base.breakdown(d)["qkv"]


def test_host_overhead_context_only_in_eager_context_iterations():
    """host_overhead_context_s lengthens the launch of an eager iteration with context
    chunks (host-bound: by exactly that much) and of nothing else."""
    base = RooflineCostModel(M8, H100, RooflineConfig(host_overhead_eager_s=20e-3))
    more = RooflineCostModel(M8, H100, RooflineConfig(host_overhead_eager_s=20e-3, host_overhead_context_s=4e-3))
    s = prefill(64, sampling=1)
    assert more.gpu_time(s) < 20e-3  # host-bound
    assert more.price(s) - base.price(s) == pytest.approx(4e-3, rel=1e-9)
    assert more.breakdown(s)["host_launch"] - base.breakdown(s)["host_launch"] == pytest.approx(4e-3, rel=1e-9)
    for d in (decode(8, 2000), decode(8, 2000, graph=True, padded=8)):
        assert more.price(d) == base.price(d)
    big = prefill(8192, sampling=1)  # GPU-bound: the launches hide under the GPU work either way
    assert more.price(big) == pytest.approx(base.price(big), rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(ctx=st.integers(0, 3000), n=st.integers(0, 256), kv=st.integers(1, 4000), extra=st.floats(1e-5, 5e-3),
       overlap=st.booleans(), graph=st.booleans())
def test_eager_decode_launch_only_beside_generation_requests(ctx, n, kv, extra, overlap, graph):
    """host_overhead_eager_decode_s is the decode attention's launches of an eager iteration:
    an eager iteration with generation requests pays it (all of it when nothing hides the
    launches), one of context chunks alone (a prompt, a drafter's pass over one) and every
    CUDA-graph or piecewise iteration does not."""
    if ctx == 0 and n == 0:
        n = 1
    cfg = RooflineConfig(host_overhead_eager_s=5e-3, host_overhead_context_s=1e-3, host_overhead_piecewise_s=3e-3,
                         eager_launch_overlaps_gpu=overlap)
    base = RooflineCostModel(M8, H100, cfg)
    more = RooflineCostModel(M8, H100, RooflineConfig(**{**cfg.model_dump(), "host_overhead_eager_decode_s": extra}))
    s = prefill(ctx, sampling=1, n_decode=n, kv_sum=n * kv) if ctx else decode(n, kv, graph=graph,
                                                                                 padded=n if graph else 0)
    d = more.price(s) - base.price(s)
    if (ctx and n == 0) or (not ctx and graph):
        assert d == 0
    elif not overlap:
        assert d == pytest.approx(extra, rel=1e-9)
    else:
        assert 0 <= d <= extra * (1 + 1e-9)
    if ctx:
        pw = IterationShape(**{**{f: getattr(s, f) for f in s.__slots__}, "piecewise_tokens": ctx + n})
        assert more.price(pw) == base.price(pw)
    assert sum(more.breakdown(s).values()) == pytest.approx(more.price(s), rel=1e-9)


def test_piecewise_graphs_pad_token_work_and_cut_launches():
    """A piecewise-graph iteration: the token-wise terms at the padded count, attention and
    the sampled rows at the real ones, and its own (smaller) launch overhead."""
    cfg = RooflineConfig(host_overhead_eager_s=20e-3, host_overhead_context_s=4e-3, host_overhead_piecewise_s=10e-3)
    cm = RooflineCostModel(M8, H100, cfg)
    s = prefill(100, 20, prior=(500, 0), sampling=1, n_decode=12, kv_sum=12 * 900)
    T = 132
    pw = IterationShape(**{**{f: getattr(s, f) for f in s.__slots__}, "piecewise_tokens": 160})
    exact = IterationShape(**{**{f: getattr(s, f) for f in s.__slots__}, "piecewise_tokens": T})
    eager, b_pw, b_exact = cm.breakdown(s), cm.breakdown(pw), cm.breakdown(exact)
    for k in ("qkv", "o", "gate_up", "down", "elementwise"):
        assert b_exact[k] == pytest.approx(eager[k], rel=1e-12)
        assert b_pw[k] > b_exact[k]
    for k in ("attn_prefill", "attn_decode", "attn_decode_kv", "lm_head", "sampler"):
        assert b_pw[k] == eager[k]
    # host-bound either way: the piecewise launch replaces the eager one
    assert cm.gpu_time(pw) < 10e-3
    assert cm.price(s) - cm.price(exact) == pytest.approx(eager["host_launch"] - b_exact["host_launch"], rel=1e-9)
    assert b_exact["host_launch"] < eager["host_launch"]
    # decodes beside the chunks add their attention launches, to piecewise iterations only
    dec_cfg = RooflineConfig(**{**cfg.model_dump(), "host_overhead_piecewise_decode_s": 2e-3})
    cm_dec = RooflineCostModel(M8, H100, dec_cfg)
    assert cm_dec.price(exact) - cm.price(exact) == pytest.approx(2e-3, rel=1e-9)
    assert cm_dec.price(s) == cm.price(s)
    alone = prefill(100, sampling=1)
    alone_pw = IterationShape(**{**{f: getattr(alone, f) for f in alone.__slots__}, "piecewise_tokens": 128})
    assert cm_dec.price(alone_pw) == cm.price(alone_pw)
    # the default piecewise overhead scales with the layers, below the eager default
    d = RooflineCostModel(M1, H100)
    small = prefill(16, sampling=1)
    small_pw = IterationShape(**{**{f: getattr(small, f) for f in small.__slots__}, "piecewise_tokens": 16})
    assert d.breakdown(small_pw)["host_launch"] < d.breakdown(small)["host_launch"]
    # decode-only iterations ignore the field (they are full graphs or eager)
    dec = decode(8, 2000, graph=True, padded=8)
    assert cm.price(dec) == cm.price(IterationShape(**{**{f: getattr(dec, f) for f in dec.__slots__},
                                                       "piecewise_tokens": 64}))


def test_kernel_floor_is_per_layer_and_gpu_side():
    """layer_latency_s adds num_layers x itself of GPU time to every iteration with tokens
    (graph, eager, piecewise, prefill alike), nothing to an empty one, and keeps a decode
    step affine in its KV length."""
    base = RooflineCostModel(M1, H100, RooflineConfig(host_overhead_eager_s=1e-4))
    floor = RooflineCostModel(M1, H100, RooflineConfig(host_overhead_eager_s=1e-4, layer_latency_s=25e-6))
    extra = M1.num_layers * 25e-6
    shapes = [IterationShape(n_decode=8, decode_kv_sum=8000, graph=True, padded_decode=8),
              IterationShape(ctx_new_tokens=(2048,), ctx_prior_tokens=(0,), n_ctx_sampling=1),
              IterationShape(ctx_new_tokens=(100,), ctx_prior_tokens=(50,), n_ctx_sampling=1, n_decode=3,
                             decode_kv_sum=900, piecewise_tokens=112)]
    for s in shapes:
        assert floor.gpu_time(s) - base.gpu_time(s) == pytest.approx(extra, rel=1e-9)
        assert floor.breakdown(s)["kernel_floor"] == pytest.approx(extra)
        # a GPU-bound iteration gets all of it (the 2048-token prefill is, with 0.1 ms of launches)
    assert floor.price(shapes[1]) - base.price(shapes[1]) == pytest.approx(extra, rel=1e-6)
    assert floor.price(IterationShape()) == 0.0
    fixed, per_kv = floor.decode_affine(8, True, 8)
    assert floor.price(shapes[0]) == pytest.approx(fixed + per_kv * 8000)


def test_linear_ridge_exponent_smooths_the_max():
    """With p, a linear layer takes (flops^p + bytes^p)^(1/p): 2^(1/p) x the max at its ridge
    point, the max far from it (a decode step's weight read, a long prefill's FLOPs)."""
    cm = RooflineCostModel(M8, H100, RooflineConfig(linear_ridge_exponent=3.0))
    assert cm._lin_time(1.0, 1.0) == pytest.approx(2 ** (1 / 3))
    assert cm._lin_time(1.0, 0.01) == pytest.approx(1.0, rel=1e-5)
    assert cm._lin_time(0.0, 0.0) == 0.0
    pure = RooflineCostModel(M8, H100)
    for s in (IterationShape(n_decode=1, decode_kv_sum=1000, graph=True, padded_decode=1),
              IterationShape(ctx_new_tokens=(8192,), ctx_prior_tokens=(0,), n_ctx_sampling=1)):
        assert cm.gpu_time(s) == pytest.approx(pure.gpu_time(s), rel=0.01)  # far from the ridge
    # a 256-token chunk sits at an H100's ridge: its linears take up to 2^(1/3) x longer
    mid = IterationShape(ctx_new_tokens=(256,), ctx_prior_tokens=(0,), n_ctx_sampling=1)
    assert 1.1 * pure.gpu_time(mid) < cm.gpu_time(mid) < 2 ** (1 / 3) * pure.gpu_time(mid)
    assert sum(cm.breakdown(mid).values()) == pytest.approx(cm.price(mid))


def test_tensor_parallel_splits_work_and_adds_allreduce():
    one = RooflineCostModel(M70, load_hardware("h200-sxm"), tp=1)
    four = RooflineCostModel(M70, load_hardware("h200-sxm"), tp=4)
    s = prefill(4096)
    b1, b4 = one.breakdown(s), four.breakdown(s)
    assert b4["gate_up"] == pytest.approx(b1["gate_up"] / 4, rel=1e-9)
    assert b1["allreduce"] == 0 and b4["allreduce"] > 0
    assert four.price(s) < one.price(s)
    assert four.decode_affine(8, True, 8)[1] == pytest.approx(one.decode_affine(8, True, 8)[1] / 4, rel=1e-12)


def test_config_validation():
    with pytest.raises(ValidationError):
        RooflineConfig(flops_eff=0.5)
    with pytest.raises(ValidationError):
        RooflineConfig(flops_efficiency=0)
    cfg = RooflineConfig(flops_efficiency=0.5)
    assert RooflineCostModel(M8, H100, cfg).price(prefill(8192)) > RooflineCostModel(M8, H100).price(prefill(8192))


# --- properties ----------------------------------------------------------------------------

VARIANTS = [
    dict(),
    dict(overlap_scheduler=True),
    dict(cfg=RooflineConfig(eager_launch_overlaps_gpu=False)),
    dict(cfg=RooflineConfig(flops_efficiency=0.6, bandwidth_efficiency=0.7, attention_flops_efficiency=0.5)),
    dict(cfg=RooflineConfig(kv_bandwidth_efficiency=0.6, context_launch_overlap=0.3, host_overhead_eager_s=0.02,
                            host_overhead_context_s=0.005)),
    dict(cfg=RooflineConfig(layer_latency_s=30e-6, bandwidth_efficiency=0.9, linear_ridge_exponent=2.5)),
]
def staircase(model, tokens=(1, 8, *range(16, 2049, 16), *range(2112, 4097, 64))) -> dict:
    """GEMM curves shaped like cuBLAS's: a floor, then a step per 128-row tile."""
    out = {}
    for k, (K, N) in model.linear_shapes(1).items():
        if k in LINEARS:
            w = 2e-12 * K * N
            out[k] = GemmCurve(k=K, n=N, tokens=list(tokens), seconds=[w * (10 + -(-t // 128)) for t in tokens])
    return out


MODELS = [
    RooflineCostModel(M8, H100, **kw) for kw in VARIANTS
] + [
    RooflineCostModel(M1, H100),
    RooflineCostModel(M8, H100, RooflineConfig(gemm_times=staircase(M8), linear_ridge_exponent=3.0)),
    RooflineCostModel(M70, H100, tp=4),
    RooflineCostModel(M70, H100, tp=2, overlap_scheduler=True),
]

model_idx = st.integers(0, len(MODELS) - 1)


@st.composite
def gen_shapes(draw):
    n = draw(st.integers(1, 512))
    graph = draw(st.booleans())
    padded = n + draw(st.integers(0, 64)) if graph else 0
    kv = draw(st.integers(n, n * 32768))
    return IterationShape(n_decode=n, decode_kv_sum=kv, graph=graph, padded_decode=padded)


@st.composite
def mixed_shapes(draw):
    k = draw(st.integers(0, 4))
    new = tuple(draw(st.integers(1, 8192)) for _ in range(k))
    prior = tuple(draw(st.integers(0, 32768)) for _ in range(k))
    n = draw(st.integers(0, 256))
    kv = draw(st.integers(n, n * 32768)) if n else 0
    T = sum(new) + n
    piecewise = T + draw(st.integers(0, 256)) if k and draw(st.booleans()) else 0
    return IterationShape(
        ctx_new_tokens=new,
        ctx_prior_tokens=prior,
        n_ctx_sampling=draw(st.integers(0, k)),
        n_decode=n,
        decode_kv_sum=kv,
        piecewise_tokens=piecewise,
    )


@settings(max_examples=300, deadline=None)
@given(model_idx, gen_shapes())
def test_decode_affine_identity(i, shape):
    cm = MODELS[i]
    fixed, per_kv = cm.decode_affine(shape.n_decode, shape.graph, shape.padded_decode)
    p = cm.price(shape)
    assert close(p, fixed + per_kv * shape.decode_kv_sum)
    # The general (term-by-term) path agrees, and is affine in decode_kv_sum by itself.
    assert close(sum(cm.breakdown(shape).values()), p)
    zero = IterationShape(n_decode=shape.n_decode, graph=shape.graph, padded_decode=shape.padded_decode)
    assert close(sum(cm.breakdown(zero).values()), fixed)
    bd = cm.breakdown(shape)
    assert close(bd["attn_decode_kv"], per_kv * shape.decode_kv_sum)


@settings(max_examples=300, deadline=None)
@given(model_idx, mixed_shapes())
def test_breakdown_sums_to_price(i, shape):
    cm = MODELS[i]
    bd = cm.breakdown(shape)
    assert all(v >= 0 for v in bd.values())
    assert close(sum(bd.values()), cm.price(shape))


@settings(max_examples=200, deadline=None)
@given(model_idx, mixed_shapes(), st.integers(0, 2), st.integers(1, 4096))
def test_monotonic(i, shape, which, extra):
    """More work never costs less, with the same launch mode (a piecewise iteration keeps
    its padded size unless the extra tokens outgrow it)."""
    cm = MODELS[i]
    p = cm.price(shape)
    f = {k: getattr(shape, k) for k in shape.__slots__}
    if which == 0 and shape.ctx_new_tokens:  # more new tokens in a chunk
        f["ctx_new_tokens"] = (shape.ctx_new_tokens[0] + extra,) + shape.ctx_new_tokens[1:]
    elif which == 1 and shape.ctx_new_tokens:  # more prior (cached) tokens
        f["ctx_prior_tokens"] = (shape.ctx_prior_tokens[0] + extra,) + shape.ctx_prior_tokens[1:]
    else:  # more generation requests, more KV
        f["n_decode"] += 1
        f["decode_kv_sum"] += extra
    bigger = IterationShape(**f)
    if bigger.piecewise_tokens:
        bigger.piecewise_tokens = max(bigger.piecewise_tokens, bigger.num_tokens)
    assert cm.price(bigger) >= p
    if shape.n_decode:
        more_kv = IterationShape(**{**{k: getattr(shape, k) for k in shape.__slots__},
                                    "decode_kv_sum": shape.decode_kv_sum + extra})
        assert cm.price(more_kv) > p


@settings(max_examples=200, deadline=None)
@given(model_idx, gen_shapes(), st.integers(1, 64))
def test_decode_monotonic_in_batch_and_padding(i, shape, extra):
    cm = MODELS[i]
    n, kv = shape.n_decode, shape.decode_kv_sum
    for graph in (False, True):
        base = cm.price(IterationShape(n_decode=n, decode_kv_sum=kv, graph=graph, padded_decode=n if graph else 0))
        more = cm.price(
            IterationShape(n_decode=n + extra, decode_kv_sum=kv + extra, graph=graph, padded_decode=n + extra if graph else 0)
        )
        assert more >= base
    # Padding a graph never makes it cheaper than running it at the true batch size.
    exact = cm.price(IterationShape(n_decode=n, decode_kv_sum=kv, graph=True, padded_decode=n))
    padded = cm.price(IterationShape(n_decode=n, decode_kv_sum=kv, graph=True, padded_decode=n + extra))
    assert padded >= exact
    assert cm.breakdown(IterationShape(n_decode=n, decode_kv_sum=kv, graph=True, padded_decode=n + extra))[
        "lm_head"
    ] >= cm.breakdown(IterationShape(n_decode=n, decode_kv_sum=kv, graph=True, padded_decode=n))["lm_head"]


def test_padded_zero_means_unpadded():
    cm = MODELS[0]
    a = cm.price(IterationShape(n_decode=7, decode_kv_sum=700, graph=True, padded_decode=0))
    b = cm.price(IterationShape(n_decode=7, decode_kv_sum=700, graph=True, padded_decode=7))
    assert a == b


def test_gpu_terms_listed():
    bd = MODELS[0].breakdown(prefill(100, n_decode=2, kv_sum=300))
    assert set(GPU_TERMS) <= set(bd)


def test_graph_shape_without_cuda_graphs_is_an_error():
    cm = RooflineCostModel(M8, H100, cuda_graphs=False)
    assert cm.price(decode(4, 100)) > 0
    with pytest.raises(ValueError):
        cm.price(decode(4, 100, graph=True, padded=4))
    with pytest.raises(ValueError):
        cm.decode_affine(4, True, 8)


def test_model_spec_hashable_and_comparable():
    assert hash(M8) == hash(load_model("llama-3.1-8b")) and M8 == load_model("llama-3.1-8b")
    assert M8 != M1


def test_measured_gemm_curves_price_the_linears():
    """A GEMM curve replaces max(FLOPs, bytes) for its linear: one that is the roofline
    reproduces every price; a staircase prices a tile's worth of rows alike; between
    measured row counts it interpolates, beyond the last it scales with the rows; a
    curve of another shape (tensor parallelism splits the weights) is not used."""
    F, B, b = H100.achievable_bf16_flops, H100.achievable_hbm_bytes_per_s, M8.dtype_bytes
    toks = list(range(1, 9001))
    roof = {k: GemmCurve(k=K, n=N, tokens=toks, seconds=[max(2 * t * K * N / F, (K * N + t * (K + N)) * b / B)
                                                            for t in toks])
            for k, (K, N) in M8.linear_shapes(1).items() if k in LINEARS}
    base, same = RooflineCostModel(M8, H100), RooflineCostModel(M8, H100, RooflineConfig(gemm_times=roof))
    for s in (decode(16, 1000, graph=True, padded=16), prefill(400, n_decode=5, kv_sum=3000),
              prefill(8000, prior=(100,))):
        assert close(base.price(s), same.price(s))
    cm = RooflineCostModel(M8, H100, RooflineConfig(gemm_times=staircase(M8)))
    L = M8.num_layers
    gu = cm.breakdown(prefill(400))["gate_up"]
    assert gu == pytest.approx(cm.breakdown(prefill(510))["gate_up"], rel=0.02)  # 4 tiles each
    assert cm.breakdown(prefill(380))["gate_up"] < gu  # 3 tiles
    last = staircase(M8)["gate_up"]
    assert cm.breakdown(prefill(8192))["gate_up"] == pytest.approx(L * last.seconds[-1] * 8192 / last.tokens[-1])
    assert RooflineCostModel(M8, H100, RooflineConfig(gemm_times=staircase(M8)), tp=2)._curves == {}


def test_gemm_curve_validation():
    ok = dict(k=8, n=8, tokens=[1, 16], seconds=[1e-6, 2e-6])
    GemmCurve(**ok)
    for bad, msg in ((dict(tokens=[16, 1]), "strictly increasing"), (dict(tokens=[0, 16]), ">= 1"),
                     (dict(seconds=[1e-6]), "2 token counts but 1 times"), (dict(seconds=[0.0, 1e-6]), "positive")):
        with pytest.raises(ValidationError, match=msg):
            GemmCurve(**{**ok, **bad})
    with pytest.raises(ValidationError, match="gemm_times.mlp"):
        RooflineConfig(gemm_times={"mlp": ok})


def test_prefill_attention_longest_program_bound():
    """A short chunk over a long cached prefix has too few attention programs to fill the
    GPU: its attention costs at least its last program's walk over the whole KV on one SM,
    linear in the prefix -- and never less than the FLOP/byte roofline."""
    cfg = RooflineConfig(prefill_attention_rows=128, prefill_attention_program_speed=0.4)
    cm = RooflineCostModel(M1, H100, cfg)
    off = RooflineCostModel(M1, H100, cfg.model_copy(update={"prefill_attention_rows": 0}))
    no_sms = RooflineCostModel(M1, H100.model_copy(update={"num_sms": None}), cfg)
    Fa = H100.achievable_bf16_flops * cfg.flops_efficiency * cfg.attention_flops_efficiency
    per_row_key = M1.num_layers * 4.0 * M1.head_dim / (Fa / H100.num_sms * 0.4)
    times = []
    for p in (0, 2000, 4000, 6000):
        s = prefill(600, prior=(p,))
        attn, roof = cm.breakdown(s)["attn_prefill"], off.breakdown(s)["attn_prefill"]
        assert attn == pytest.approx(max(roof, per_row_key * 128 * (600 + p)), rel=1e-9)
        assert attn >= roof and no_sms.breakdown(s)["attn_prefill"] == pytest.approx(roof)
        assert sum(cm.breakdown(s).values()) == pytest.approx(cm.price(s), rel=1e-9)
        times.append(attn)
    assert times[3] > times[2] > times[1]  # the bound binds over a long prefix
    assert times[3] - times[2] == pytest.approx(times[2] - times[1], rel=1e-9)  # linear in the prefix
    # short chunks (average <= 2 x rows tokens): the kernel's half-height tile
    s = prefill(200, prior=(8000,))
    assert cm.breakdown(s)["attn_prefill"] == pytest.approx(per_row_key * 64 * 8200, rel=1e-9)
