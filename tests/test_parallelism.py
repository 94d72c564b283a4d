"""S6 parallelism in the cost model: tensor, pipeline and expert parallel, MoE models,
per-GPU memory, layout checks and their errors (ConfigError, exit 2, naming the key)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servesim.policies.parallelism import Layout, layout_problems, layouts_for
from servesim.sim.cli import main
from servesim.sim.cost_model import GPU_TERMS, RooflineConfig, RooflineCostModel
from servesim.sim.memory import (default_activation_reserve_bytes, kv_bytes_per_block, kv_pool_blocks,
                                 per_gpu_memory_bytes, split_weight_bytes, weight_bytes_per_gpu)
from servesim.sim.pipeline import PipelineCostModel, make_layout_cost_model
from servesim.sim.specs import apply_precision, bundled_models, load_hardware, load_model
from servesim.sim.types import ConfigError, IterationShape

MODELS = {n: load_model(n) for n in ("llama-3.1-70b", "llama-2-70b", "llama-3.1-8b", "llama-3.2-1b",
                                     "mixtral-8x7b-v0.1", "qwen3-30b-a3b")}
HW = {n: load_hardware(n) for n in ("h100-sxm", "h200-sxm", "a100-80gb-sxm", "h100-pcie")}
H100 = HW["h100-sxm"]
MIX, QWEN, M70 = MODELS["mixtral-8x7b-v0.1"], MODELS["qwen3-30b-a3b"], MODELS["llama-3.1-70b"]

shapes = st.builds(
    lambda chunks, n, kv, graph: IterationShape(
        ctx_new_tokens=tuple(c for c, _ in chunks), ctx_prior_tokens=tuple(p for _, p in chunks),
        n_ctx_sampling=len(chunks), n_decode=n, decode_kv_sum=n * kv, graph=graph and not chunks and n > 0,
        padded_decode=n if graph and not chunks and n > 0 else 0),
    st.lists(st.tuples(st.integers(1, 3000), st.integers(0, 4000)), max_size=4), st.integers(0, 300),
    st.integers(1, 5000), st.booleans()).filter(lambda s: s.num_tokens > 0)


# --- models ----------------------------------------------------------------------------


def test_bundled_moe_and_70b_models():
    assert {"mixtral-8x7b-v0.1", "qwen3-30b-a3b", "llama-3.1-70b", "llama-2-70b"} <= set(bundled_models())
    assert (MIX.num_experts, MIX.num_experts_per_tok, MIX.moe_intermediate_size) == (8, 2, 14336)
    assert (QWEN.num_experts, QWEN.num_experts_per_tok, QWEN.moe_intermediate_size, QWEN.head_dim) == (128, 8, 768, 128)
    # published sizes: Mixtral 46.7B parameters (12.9B active), Qwen3-30B-A3B 30.5B (3.3B active)
    assert MIX.params == 46_702_792_704 and QWEN.params == 30_532_122_624
    assert MIX.flops_per_token / 2 == pytest.approx(12.9e9, rel=0.02)
    assert (QWEN.flops_per_token / 2 + QWEN.embedding_params) == pytest.approx(3.3e9, rel=0.03)


@pytest.mark.parametrize("edit,key", [({"num_experts_per_tok": 129}, "num_experts_per_tok"),
                                      ({"decoder_sparse_step": 2}, "decoder_sparse_step"),
                                      ({"mlp_only_layers": [0, 1]}, "mlp_only_layers"),
                                      ({"num_experts": 0}, "num_experts")])
def test_bad_moe_configs_name_the_key(edit, key):
    from servesim.sim.specs import MODELS_DIR, ModelSpec
    import json

    cfg = {**json.loads((MODELS_DIR / "qwen3-30b-a3b.json").read_text()), **edit}
    with pytest.raises(ConfigError) as e:
        ModelSpec.from_hf_config(cfg, "x", source="x.json")
    assert f"x.json: {key}" in [loc for loc, _ in e.value.problems]


# --- invariants ------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["llama-3.1-8b", "llama-3.2-1b", "qwen3-30b-a3b", "mixtral-8x7b-v0.1"]),
       st.sampled_from(list(HW)), shapes, st.booleans())
def test_trivial_layout_prices_exactly_as_before(name, hw, shape, overlap):
    """tp = pp = ep = 1: the layout's cost model is the single-GPU roofline, price for price."""
    m, h = MODELS[name], HW[hw]
    a = make_layout_cost_model(m, h, None, Layout(), overlap_scheduler=overlap)
    b = RooflineCostModel(m, h, overlap_scheduler=overlap)
    assert a.price(shape) == b.price(shape)
    assert a.decode_affine(7, True, 8) == b.decode_affine(7, True, 8)
    assert split_weight_bytes(m, 1, 1, 1) == m.weight_bytes == weight_bytes_per_gpu(m, Layout())


def _valid(m, tp, ep=1):
    return not layout_problems(m, H100, Layout(tp, 1, ep))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(list(MODELS)), st.sampled_from([2, 4, 8]), st.sampled_from([1, 2, 4, 8]), shapes)
def test_sharding_conserves_flops_weights_and_kv(name, tp, ep, shape):
    """Summed over the tp GPUs, a sharded iteration's FLOPs and weight and KV bytes are
    the unsharded model's plus the replicated KV heads (tp > KV heads) and the padded
    vocabulary; the router is computed by every GPU for the tokens it holds."""
    m = MODELS[name]
    ep = ep if m.is_moe else 1
    if ep > tp or not _valid(m, tp, ep):
        return
    one = RooflineCostModel(m, H100).work(shape)
    many = RooflineCostModel(m, H100, tp=tp, ep=ep).work(shape)
    hd, L, d = m.head_dim, m.num_layers, m.hidden_size
    rep_heads = tp * m.kv_heads_per_gpu(tp) - m.num_kv_heads  # KV heads held twice or more
    T = shape.num_tokens
    extra = {k: [0.0, 0.0, 0.0] for k in one}
    extra["qkv"][0] = L * 2.0 * d * 2 * rep_heads * hd * T
    extra["qkv"][1] = L * float(d * 2 * rep_heads * hd * m.dtype_bytes)
    S = shape.n_ctx_sampling + shape.n_decode
    Vp = -(-m.vocab_size // tp) * tp - m.vocab_size
    extra["lm_head"][0] = 2.0 * d * Vp * S
    extra["lm_head"][1] = float(d * Vp * m.dtype_bytes) if S else 0.0
    kv_tok = L * 2.0 * rep_heads * hd * m.kv_elem_bytes
    extra["attn_prefill"][2] = kv_tok * sum(c + p for c, p in zip(shape.ctx_new_tokens, shape.ctx_prior_tokens))
    extra["attn_decode"][2] = kv_tok * (shape.decode_kv_sum + shape.n_decode) if shape.n_decode else 0.0
    for k in one:
        if k == "router":
            continue
        for i in range(3):  # FLOPs, weight bytes, KV bytes
            assert tp * many[k][i] == pytest.approx(one[k][i] + extra[k][i], rel=1e-9, abs=1e-6), (k, i)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(list(MODELS)), st.sampled_from(list(HW)), st.sampled_from([1, 2, 4, 8]),
       st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2, 4, 8]), st.integers(64, 65536),
       st.sampled_from([16, 32, 64]), st.floats(0.5, 1.0), st.sampled_from(["bf16", "fp8"]))
def test_per_gpu_memory_never_exceeds_the_hardware(name, hw, tp, pp, ep, max_tokens, tpb, frac, prec):
    m, h = MODELS[name], HW[hw]
    lay = Layout(tp, pp, ep if m.is_moe else 1)
    if layout_problems(m, h, lay):
        return
    try:
        m = apply_precision(m, h, prec, "auto", tp)
        reserve = default_activation_reserve_bytes(m, max_tokens, tp, max_batch_size=256, layout=lay)
        blocks = kv_pool_blocks(m, h, tpb, frac, reserve, tp=tp, layout=lay)
    except ConfigError:
        return
    assert per_gpu_memory_bytes(m, lay, tpb, blocks, reserve) <= h.hbm_capacity_bytes
    # and the pool of one more GPU's worth of sharding is at least as large (weights shrink)
    assert blocks >= 1


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["llama-3.1-70b", "llama-3.1-8b", "mixtral-8x7b-v0.1"]), st.sampled_from([2, 4, 8]),
       st.sampled_from([1, 2, 4]), st.integers(1, 600), st.integers(1, 4000), st.booleans(), st.booleans())
def test_pipeline_decode_is_affine_and_bounds_the_period(name, pp, tp, n, kv_each, graph, overlap):
    m = MODELS[name]
    lay = Layout(tp, pp, 1)
    if layout_problems(m, H100, lay):
        return
    cm = PipelineCostModel(m, H100, None, lay, overlap_scheduler=overlap)
    padded = n + (n % 3) if graph else 0
    fixed, per = cm.decode_affine(n, graph, padded)
    for kv in (n * kv_each, n * kv_each * 3 + 7):
        s = IterationShape(n_decode=n, decode_kv_sum=kv, graph=graph, padded_decode=padded)
        assert cm.price(s) == fixed + per * kv
        r, c, busy, _, _ = cm._bounds(cm.split(s))
        tok = pp * per + 1e-15  # a micro-batch's KV is its share to within one token (integer split)
        assert cm.price(s) >= max(r, c) - tok  # never below the steady-state period
        if n % pp == 0 and (not graph or padded % pp == 0):  # even micro-batches: exactly the period
            host = 0.0 if overlap else cm._sched(s)
            exact = max(max(r, c), cm._sched(s)) if overlap else max(r, c) + host
            assert cm.price(s) == pytest.approx(exact, rel=1e-9, abs=tok)
        assert sum(cm.breakdown(s).values()) == pytest.approx(cm.price(s), rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(shapes, st.sampled_from([2, 3, 4, 8]))
def test_micro_batches_partition_the_iteration(shape, m):
    cm = PipelineCostModel(M70, H100, None, Layout(2, 4, 1, micro_batches=m))
    mbs = cm.split(shape)
    assert len(mbs) == max(1, min(m, len(shape.ctx_new_tokens) + shape.n_decode))
    assert sorted(c for mb in mbs for c in mb.ctx_new_tokens) == sorted(shape.ctx_new_tokens)
    assert sum(mb.n_decode for mb in mbs) == shape.n_decode
    assert sum(mb.decode_kv_sum for mb in mbs) == shape.decode_kv_sum
    assert sum(mb.n_ctx_sampling for mb in mbs) == shape.n_ctx_sampling
    assert sum(cm.breakdown(shape).values()) == pytest.approx(cm.price(shape), rel=1e-9)


def test_pipeline_bubble_and_throughput():
    """Fewer requests than stages leave stages idle; pp equal micro-batches keep them busy;
    every request of the iteration advances once a period (ITL = period, throughput =
    requests / period)."""
    cm = PipelineCostModel(M70, H100, None, Layout(2, 4, 1))
    one = IterationShape(n_decode=1, decode_kv_sum=1000, graph=True, padded_decode=1)
    full = IterationShape(n_decode=256, decode_kv_sum=256 * 1000, graph=True, padded_decode=256)
    assert cm.bubble_fraction(one) > 0.7  # one micro-batch: 3 of 4 stages idle
    assert cm.bubble_fraction(full) < 0.05
    tp8 = RooflineCostModel(M70, H100, tp=8)
    # 8 GPUs either way: the pipeline beats tensor parallelism at a full batch only if its
    # stages are busy; alone, a request crosses every stage (and its transfers) in turn
    assert cm.price(one) > tp8.price(one)
    assert cm.breakdown(one)["pipeline_bubble"] > 0


def test_moe_reads_the_experts_it_hits():
    cm = RooflineCostModel(MIX, H100, tp=2)
    e = cm._moe
    assert e.hits(1) == pytest.approx(8 * 2 / 8)  # one token: its 2 experts
    assert e.hits(1) < e.hits(4) < e.hits(64) <= 8 and e.hits(200) == pytest.approx(8, rel=1e-9)
    w1 = cm.work(IterationShape(n_decode=1, decode_kv_sum=100))["experts"][1]
    w64 = cm.work(IterationShape(n_decode=64, decode_kv_sum=6400))["experts"][1]
    per_expert = MIX.num_layers * 3 * MIX.hidden_size * MIX.moe_intermediate_size * 2 / 2  # bf16, tp 2
    assert w1 == pytest.approx(2 * per_expert) and w64 == pytest.approx(8 * per_expert, rel=1e-3)
    # expert parallelism: all-to-all instead of the second all-reduce; imbalance slows it
    s = IterationShape(ctx_new_tokens=(4096,), ctx_prior_tokens=(0,), n_ctx_sampling=1)
    ep = RooflineCostModel(MIX, H100, tp=4, ep=4)
    bd_tp, bd_ep = RooflineCostModel(MIX, H100, tp=4).breakdown(s), ep.breakdown(s)
    assert bd_tp["alltoall"] == 0 < bd_ep["alltoall"]
    assert bd_ep["allreduce"] == pytest.approx(bd_tp["allreduce"] / 2)
    slow = RooflineCostModel(MIX, H100, RooflineConfig(moe_load_imbalance=1.5), tp=4, ep=4)
    assert slow.breakdown(s)["experts"] == pytest.approx(1.5 * bd_ep["experts"], rel=0.02)
    assert sum(bd_ep.values()) == pytest.approx(ep.price(s), rel=1e-12)
    assert set(bd_ep) == set(GPU_TERMS) | {"host_launch", "scheduler"}


def test_allreduce_is_a_ring_over_the_link():
    s = IterationShape(ctx_new_tokens=(2048,), ctx_prior_tokens=(0,), n_ctx_sampling=1)
    cfg = RooflineConfig()
    for tp in (2, 4, 8):
        ar = RooflineCostModel(M70, H100, tp=tp).breakdown(s)["allreduce"]
        L, d = M70.num_layers, M70.hidden_size
        ring = 2 * L * (cfg.allreduce_latency_s + 2 * (tp - 1) * cfg.collective_step_latency_s
                        + 2 * (tp - 1) / tp * 2048 * d * 2 / (450e9 * cfg.allreduce_bandwidth_efficiency))
        assert ar == pytest.approx(ring, rel=1e-9)
        pcie = RooflineCostModel(M70, HW["h100-pcie"], tp=tp).breakdown(s)["allreduce"]
        assert pcie > 5 * ar  # 64 GB/s of PCIe against 450 GB/s of NVLink


def test_layouts_for_lists_only_valid_layouts():
    lays = layouts_for(M70, H100, 8)
    assert {lay.label() for lay in lays} == {"tp8", "tp4-pp2", "tp2-pp4", "tp1-pp8"}
    assert {lay.label() for lay in layouts_for(MIX, H100, 4, expert_parallel=True)} == {"tp4-ep2", "tp4-ep4",
                                                                                        "tp2-pp2-ep2"}
    assert all(not layout_problems(MIX, H100, lay) for lay in layouts_for(MIX, H100, 8))


# --- bad input: exit 2, naming the key --------------------------------------------------

EXP = """\
name: par
model: {model}
hardware: {hw}
workload: {{synthetic: {{num_requests: 4, arrival: {{kind: offline}}, prompt_len: {{kind: constant, value: 64}},
           output_len: {{kind: constant, value: 4}}}}}}
cluster: {cluster}
output: {{plots: false, timeline: false}}
"""


@pytest.mark.parametrize("model,hw,cluster,key,words", [
    ("llama-3.1-70b", "h100-sxm", "{tensor_parallel: 3}", "cluster.tensor_parallel", "64 attention heads"),
    ("llama-3.1-70b", "h100-sxm", "{tensor_parallel: 16}", "cluster.tensor_parallel", "gpus_per_node 8"),
    ("llama-3.1-70b", "h100-sxm", "{tensor_parallel: 2, pipeline_parallel: 3}", "cluster.pipeline_parallel",
     "80 layers"),
    ("llama-3.1-70b", "h100-sxm", "{tensor_parallel: 4, expert_parallel: 2}", "cluster.expert_parallel", "dense"),
    ("mixtral-8x7b-v0.1", "h100-sxm", "{tensor_parallel: 6}", "cluster.tensor_parallel", "KV heads"),
    ("mixtral-8x7b-v0.1", "h100-sxm", "{tensor_parallel: 2, expert_parallel: 4}", "cluster.expert_parallel",
     "divide tensor_parallel"),
    ("qwen3-30b-a3b", "h100-sxm", "{tensor_parallel: 8, pipeline_parallel: 2}", "cluster.pipeline_parallel",
     None),
    ("llama-3.1-70b", "h100-sxm", "{tensor_parallel: 1}", "model", "141.1 GB"),
    ("mixtral-8x7b-v0.1", "a100-80gb-sxm", "{tensor_parallel: 1, pipeline_parallel: 1}", "model", "93.4 GB"),
])
def test_bad_layouts_exit_2_naming_the_key(tmp_path, capsys, model, hw, cluster, key, words):
    p = tmp_path / "par.yaml"
    p.write_text(EXP.format(model=model, hw=hw, cluster=cluster))
    if words is None:  # 16 GPUs with a network between servers: valid
        assert main(["validate", str(p)]) == 0
        return
    assert main(["validate", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"{key}" in err and words in err and "Traceback" not in err, err


def test_a_model_too_big_even_sharded_says_what_it_needs(tmp_path, capsys):
    p = tmp_path / "par.yaml"
    p.write_text(EXP.format(model="llama-3.1-70b", hw="a100-80gb-sxm", cluster="{pipeline_parallel: 1}"))
    assert main(["validate", str(p), "--set", "model_precision=bf16"]) == 2
    err = capsys.readouterr().err
    assert "141.1 GB" in err and "80.0 GB" in err
    # split in two it fits (70.6 GB a GPU); on 60 GB GPUs it does not, and the error says why
    assert main(["validate", str(p), "--set", "cluster.tensor_parallel=2"]) == 0
    with pytest.raises(ConfigError, match=r"needs 70\.6 GB of weights per GPU \(tp=2\).*at least 3 GPUs"):
        kv_pool_blocks(M70, load_hardware("h100-sxm").model_copy(update={"hbm_capacity_bytes": 60e9}), 32, 0.9,
                       1e9, layout=Layout(2, 1, 1))


@pytest.mark.parametrize("model,cluster,key", [("mixtral-8x7b-v0.1", "{tensor_parallel: 2}", "model"),
                                               ("llama-3.2-1b", "{pipeline_parallel: 2}", "cluster.pipeline_parallel")])
def test_gpu_backend_refuses_moe_and_pipelines(tmp_path, capsys, model, cluster, key):
    p = tmp_path / "par.yaml"
    p.write_text(EXP.format(model=model, hw="h100-sxm", cluster=cluster))
    assert main(["run", str(p), "--backend", "gpu", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert key in err and "gpu backend" in err and "Traceback" not in err


def test_pipeline_and_moe_runs_end_to_end(tmp_path, capsys):
    """A pp x tp run and an expert-parallel MoE run simulate; the pipeline's iterations
    are its periods, so its throughput is requests x tokens over their sum."""
    import json

    p = tmp_path / "par.yaml"
    p.write_text(EXP.format(model="llama-3.1-70b", hw="h100-sxm", cluster="{tensor_parallel: 2, pipeline_parallel: 2}")
                 .replace("num_requests: 4", "num_requests: 40"))
    out = tmp_path / "out"
    assert main(["run", str(p), "--out", str(out)]) == 0
    s = json.loads((out / "base" / "summary.json").read_text())
    assert s["num_requests"] == 40 and s["throughput_out_tok_s"] > 0
    assert s["bounds"]["achieved_over_bound"] <= 1.0
    q = tmp_path / "moe.yaml"
    q.write_text(EXP.format(model="mixtral-8x7b-v0.1", hw="h100-sxm", cluster="{tensor_parallel: 4, expert_parallel: 4}"))
    assert main(["run", str(q), "--out", str(tmp_path / "moe")]) == 0
    s = json.loads((tmp_path / "moe" / "base" / "summary.json").read_text())
    assert s["bounds"]["achieved_over_bound"] <= 1.0


def test_gemm_curves_price_only_the_shape_they_measured():
    """A profile's GEMM curve prices a linear at the per-GPU [k, n] it was measured at: a
    tp=1 curve does not price tp=2's halved GEMM (roofline there), a curve of tp=2's shape
    does; an MoE model's expert curve is matched at the expert's per-GPU shape."""
    from servesim.sim.cost_model import GemmCurve

    def curve(k, n):
        return GemmCurve(k=k, n=n, tokens=[1, 4096], seconds=[1e-3, 2e-3])

    s = IterationShape(ctx_new_tokens=(2048,), ctx_prior_tokens=(0,), n_ctx_sampling=1)
    K1, N1 = M70.linear_shapes(1)["gate_up"]
    K2, N2 = M70.linear_shapes(2)["gate_up"]
    at1 = RooflineConfig(gemm_times={"gate_up": curve(K1, N1)})
    at2 = RooflineConfig(gemm_times={"gate_up": curve(K2, N2)})
    roof = RooflineCostModel(M70, H100, tp=2).breakdown(s)["gate_up"]
    assert RooflineCostModel(M70, H100, at1, tp=2).breakdown(s)["gate_up"] == roof
    assert RooflineCostModel(M70, H100, at2, tp=2).breakdown(s)["gate_up"] == pytest.approx(
        M70.num_layers * (1e-3 + 1e-3 * 2047 / 4095))
    # Mixtral at tp=4, ep=2: each expert split over 2 GPUs
    d, ie = MIX.hidden_size, MIX.moe_intermediate_size // 2
    ex = RooflineConfig(gemm_times={"gate_up": curve(d, 2 * ie), "down": curve(ie, d)})
    plain = RooflineCostModel(MIX, H100, tp=4, ep=2).breakdown(s)["experts"]
    cal = RooflineCostModel(MIX, H100, ex, tp=4, ep=2)
    assert set(cal._moe.curves) == {"gate_up", "down"} and cal.breakdown(s)["experts"] != plain
    assert not RooflineCostModel(MIX, H100, ex, tp=4, ep=4)._moe.curves  # other shapes: the roofline


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(["llama-3.1-70b", "mixtral-8x7b-v0.1", "qwen3-30b-a3b", "llama-3.1-8b"]),
       st.sampled_from(["h100-sxm", "h200-sxm", "a100-80gb-sxm"]), st.sampled_from([1, 2, 4, 8]),
       st.sampled_from([1, 2, 4]), st.sampled_from([1, 2, 4]), st.sampled_from([2048, 8192, 32768]))
def test_runs_size_the_kv_pool_within_every_gpu(tmp_path_factory, name, hw, tp, pp, ep, max_tokens):
    """Through the run's own resolution (sim/runner.py): a layout is refused with a
    ConfigError, or every GPU of the replica holds its weights, reserve and KV pool."""
    from servesim.sim.config import load_experiment
    from servesim.sim.runner import resolve

    m = MODELS[name]
    ep = ep if m.is_moe else 1
    p = tmp_path_factory.mktemp("mem") / "m.yaml"
    p.write_text(EXP.format(model=name, hw=hw, cluster=f"{{tensor_parallel: {tp}, pipeline_parallel: {pp}, "
                            f"expert_parallel: {ep}}}") + f"scheduler: {{max_num_tokens: {max_tokens}}}\n")
    try:
        setup = resolve(load_experiment(p).variants[0].config, p.parent)
    except ConfigError:
        return
    lay = Layout(tp, pp, ep)
    reserve = default_activation_reserve_bytes(setup.model, max_tokens, tp, max_batch_size=256, layout=lay)
    assert per_gpu_memory_bytes(setup.model, lay, 32, setup.num_blocks, reserve) <= HW[hw].hbm_capacity_bytes
