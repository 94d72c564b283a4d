"""Tensor parallelism in the GPU backend, on CPUs: 2 processes over gloo (gpu_backend/tp.py).

The central checks: the logits of the model sharded over 2 ranks equal the unsharded
model's (fp32, prefill and decode steps through the paged KV cache; random weights and a
safetensors checkpoint the test writes; KV heads split and replicated; a vocabulary that
does not divide), and a whole `simulate_gpu` run at ``cluster.tensor_parallel: 2`` (rank 0
driving the engine, the other rank in lock step) emits exactly the greedy tokens of the
same run at 1, through decode graphs, piecewise graphs, swap preemption and prefix reuse.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

from servesim.gpu_backend.model import ContextChunkInput, DecodeInput, LlamaModel  # noqa: E402
from servesim.gpu_backend.tp import (ShardDims, free_tcp_address, init_tp, shard_dims, shard_weights,  # noqa: E402
                                     sharded_random_weights)
from servesim.gpu_backend.weights import ModelDims, random_weights, save_hf_checkpoint  # noqa: E402
from servesim.sim.config import load_experiment  # noqa: E402
from servesim.sim.runner import resolve  # noqa: E402
from servesim.sim.specs import ModelSpec  # noqa: E402
from servesim.sim.types import ConfigError  # noqa: E402

F32 = torch.float32
BLOCK = 4


def tiny(**kw) -> dict:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
           "intermediate_size": 128, "vocab_size": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "max_position_embeddings": 512, "tie_word_embeddings": False}
    cfg.update(kw)
    return cfg


# the models of the logits test: KV heads split (2 over 2 ranks), replicated (1 KV head on
# both ranks), and tied embeddings with a vocabulary that 2 does not divide (padded lm_head)
MODELS = {"split-kv": tiny(), "replicated-kv": tiny(num_key_value_heads=1, vocab_size=200),
          "tied-odd-vocab": tiny(vocab_size=251, tie_word_embeddings=True)}


def _steps(model, pool) -> list[torch.Tensor]:
    """A prefill of two chunks (one a second chunk over cached KV), then three decode
    steps of both requests beside a new chunk: every path of the paged KV cache."""
    a = list(range(1, 23))
    out = [model.step([ContextChunkInput(a[:14], 0, [0, 1, 2, 3]), ContextChunkInput(a[3:11], 0, [6, 7])], [],
                      pool)]
    out.append(model.step([ContextChunkInput(a[14:], 14, [0, 1, 2, 3, 4, 5])], [DecodeInput(9, 8, [6, 7, 8])],
                          pool))
    for i in range(3):
        out.append(model.step([ContextChunkInput([5 + i, 7], 2 * i, [10 + i, 11 + i][: 1 + (2 * i + 2 > BLOCK)])]
                              if i < 2 else [],
                              [DecodeInput(7 + i, 22 + i, [0, 1, 2, 3, 4, 5, 9]), DecodeInput(3, 9 + i, [6, 7, 8])],
                              pool))
    return out


def _rank(rank: int, addr: str, out_dir: str, ckpt: str) -> None:
    torch.set_num_threads(1)
    init_tp(rank, 2, addr, torch.device("cpu"))
    from servesim.gpu_backend.tp import TPLlamaModel

    res = {}
    try:
        for name, cfg in MODELS.items():
            m = TPLlamaModel(cfg, 2, rank, None, dtype=F32, device="cpu", seed=5)
            res[name] = _steps(m, m.make_kv_pool(16, BLOCK))
        m = TPLlamaModel(MODELS["split-kv"], 2, rank, ckpt, dtype=F32, device="cpu")
        res["checkpoint"] = _steps(m, m.make_kv_pool(16, BLOCK))
        res["kv_heads"] = m.kv_pool.num_kv_heads
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        from servesim.gpu_backend.tp import destroy_group

        destroy_group(torch.device("cpu"))


@pytest.fixture(scope="module")
def tp_logits(tmp_path_factory):
    import torch.multiprocessing as mp

    d = tmp_path_factory.mktemp("tp")
    ckpt = save_hf_checkpoint(random_weights(MODELS["split-kv"], seed=9, std=0.1), MODELS["split-kv"], d / "ckpt",
                              num_shards=2)
    mp.spawn(_rank, args=(free_tcp_address(), str(d), str(ckpt)), nprocs=2)
    return {r: torch.load(d / f"rank{r}.pt") for r in (0, 1)}, ckpt


def _ref(cfg, weights=None, seed=5):
    m = LlamaModel(cfg, weights, dtype=F32, device="cpu", seed=seed)
    return _steps(m, m.make_kv_pool(16, BLOCK))


@pytest.mark.parametrize("name", list(MODELS))
def test_tp2_logits_equal_tp1(tp_logits, name):
    ranks, _ = tp_logits
    ref = _ref(MODELS[name])
    for step, (r0, want) in enumerate(zip(ranks[0][name], ref)):
        assert r0.shape == want.shape
        torch.testing.assert_close(r0, want, rtol=1e-4, atol=1e-5, msg=f"{name} step {step}")
        torch.testing.assert_close(ranks[1][name][step], r0, rtol=0, atol=0)  # all-gathered: same on both ranks


def test_tp2_logits_from_a_sharded_checkpoint(tp_logits):
    ranks, ckpt = tp_logits
    ref = _ref(MODELS["split-kv"], weights=str(ckpt))
    for r0, want in zip(ranks[0]["checkpoint"], ref):
        torch.testing.assert_close(r0, want, rtol=1e-4, atol=1e-5)
    assert ranks[0]["kv_heads"] == ranks[1]["kv_heads"] == 1  # each rank's pool holds its KV head


# --------------------------------------------------------------------------------------
# shards (no processes)
# --------------------------------------------------------------------------------------


@st.composite
def layouts(draw):
    tp = draw(st.sampled_from([1, 2, 4, 8]))
    kv = draw(st.sampled_from([k for k in (1, 2, 4, 8, 16) if k % tp == 0 or tp % k == 0]))
    group = draw(st.integers(1, 4))
    heads = max(kv * group, tp)
    heads += (-heads) % tp
    heads += (-heads) % kv
    inter = tp * draw(st.integers(1, 12))
    vocab = draw(st.integers(tp, 300))
    return tp, ModelSpec(name="m", hidden_size=32, num_layers=1, num_heads=heads, num_kv_heads=kv, head_dim=4,
                         intermediate_size=inter, vocab_size=vocab)


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_shards_partition_the_model(layout):
    """Query heads, MLP features and vocabulary rows are split into disjoint ranges that
    cover the model; each rank's KV heads are exactly the ones its query heads read
    (GQA: query head j reads KV head j // (Hq / Hkv)); shapes match the cost model's."""
    tp, spec = layout
    shards = [ShardDims(spec, tp=tp, rank=r) for r in range(tp)]
    hd, group = spec.head_dim, spec.num_heads // spec.num_kv_heads
    for rows, total in ((lambda s: s.q_rows(), spec.q_size), (lambda s: s.inter_rows(), spec.intermediate_size),
                        (lambda s: s.vocab_rows(), spec.vocab_size)):
        covered = [i for s in shards for i in range(*rows(s))]
        assert covered == list(range(total))
    for s in shards:
        q0, q1 = s.q_rows()
        k0, k1 = s.kv_rows()
        assert {(q // hd) // group for q in range(q0, q1)} == set(range(k0 // hd, k1 // hd))
        assert k1 - k0 == s.kv_size == spec.kv_heads_per_gpu(tp) * hd
        shapes = spec.linear_shapes(tp)
        assert shapes["qkv"] == (spec.hidden_size, s.q_size + 2 * s.kv_size)
        assert shapes["gate_up"] == (spec.hidden_size, 2 * s.intermediate_size)
        assert shapes["lm_head"] == (spec.hidden_size, s.vocab_per_rank)
    assert sum(s.num_params() for s in shards) >= spec.params


@settings(max_examples=8, deadline=None)
@given(st.sampled_from([(2, 2), (2, 1), (4, 2), (4, 1)]), st.integers(0, 2**16))
def test_sharded_random_weights_are_slices_of_the_full_ones(tp_kv, seed):
    tp, kv = tp_kv
    cfg = tiny(num_key_value_heads=kv, vocab_size=250)
    full = random_weights(cfg, seed=seed)
    for r in range(tp):
        sd = shard_dims(cfg, tp, r)
        a, b = sharded_random_weights(sd, seed=seed), shard_weights(full, sd)
        for x, y in zip(a.tensors(), b.tensors()):
            assert torch.equal(x, y)


@st.composite
def messages(draw):
    from servesim.gpu_backend.tp import OP_NAMES

    op = draw(st.integers(0, len(OP_NAMES) - 1))
    ints = draw(st.lists(st.integers(-2**40, 2**40), max_size=40))
    tensors = []
    for _ in range(draw(st.integers(0, 9))):
        dt = draw(st.sampled_from([torch.int64, torch.int32]))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=2)))
        hi = 2**62 if dt == torch.int64 else 2**30
        n = int(torch.Size(shape).numel())
        vals = draw(st.lists(st.integers(-hi, hi), min_size=n, max_size=n))
        tensors.append(torch.tensor(vals, dtype=dt).reshape(shape))
    return op, ints, tensors


@settings(max_examples=80, deadline=None)
@given(messages())
def test_lockstep_messages_round_trip(msg):
    """Every message rank 0 can send arrives as sent: the op, the ints, and each tensor with
    its dtype, shape (0-, 1- and 2-D, empty ones too) and values (the payload buffers taken
    in the order `pack` made them, as the broadcasts deliver them)."""
    from servesim.gpu_backend.tp import decode_header, encode_header, pack, unpack

    op, ints, tensors = msg
    head = encode_header(op, ints, tensors)
    got_op, got_ints, shapes = decode_header(head.clone())
    payload = iter(pack(tensors))
    got = unpack(shapes, lambda flat: flat.copy_(next(payload)), "cpu")
    assert next(payload, None) is None  # every payload buffer consumed
    assert (got_op, got_ints) == (op, ints)
    assert len(got) == len(tensors)
    for a, b in zip(got, tensors):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_lockstep_refuses_what_it_cannot_carry():
    from servesim.gpu_backend.tp import HEADER, encode_header

    with pytest.raises(TypeError, match="int64 / int32"):
        encode_header(1, [], [torch.zeros(2)])
    with pytest.raises(ValueError, match="at most 2"):
        encode_header(1, [], [torch.zeros(1, 1, 1, dtype=torch.int64)])
    with pytest.raises(ValueError, match="header words"):
        encode_header(1, list(range(HEADER)), [])
    with pytest.raises(ValueError, match="unknown operation"):
        encode_header(99, [], [])


def test_shard_dims_refuse_a_layout_that_does_not_divide():
    with pytest.raises(ConfigError, match="cluster.tensor_parallel"):
        shard_dims(tiny(), 3, 0)
    with pytest.raises(ConfigError, match="KV heads"):
        shard_dims(tiny(num_attention_heads=12, num_key_value_heads=3), 2, 0)
    assert isinstance(shard_dims(tiny(), 2, 1), ModelDims)


# --------------------------------------------------------------------------------------
# a whole run, rank 0 driving the engine and rank 1 in lock step
# --------------------------------------------------------------------------------------

RUN = """\
name: tp
model: {model}
hardware: h100-sxm
seed: 7
kv_cache: {{pool_tokens: 128, tokens_per_block: 16}}
workload:
  prefix:
    kind: shared_system_prompt
    num_requests: 10
    arrival: {{kind: offline}}
    system_len: 40
    user_len: {{kind: uniform, low: 1, high: 30}}
    output_len: 12
    hash_block_size: 16
    vocab_size: 256
scheduler: {{max_batch_size: 6, max_num_tokens: 96, capacity: max_utilization, preemption: swap,
            enable_chunked_context: true}}
runtime: {{piecewise_graphs: true, overlap_scheduler: true}}
output: {{plots: false}}
variants:
  - name: tp1
    kv_cache: {{enable_block_reuse: true}}
  - name: tp2
    kv_cache: {{enable_block_reuse: true}}
    cluster: {{tensor_parallel: 2}}
"""


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tpm")
    f = d / "tiny.json"
    f.write_text(json.dumps(tiny()))
    return f


def _setups(path: Path, overrides=()) -> dict:
    exp = load_experiment(path, list(overrides))
    return {v.name: resolve(v.config, exp.base_dir) for v in exp.variants}


def test_tp2_run_emits_the_tokens_of_tp1(model_file):
    from servesim.gpu_backend.runner import simulate_gpu

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exp = model_file.parent / "run.yaml"
        exp.write_text(RUN.format(model=model_file.name))
        s = _setups(exp)
        a = simulate_gpu(s["tp1"], check_invariants=True)
        b = simulate_gpu(s["tp2"], check_invariants=True)
    finally:
        torch.set_num_threads(n)
    ta = {k: list(v) for k, v in a.tokens.items()}
    assert {k: list(v) for k, v in b.tokens.items()} == ta
    assert all(len(t) == 12 for t in ta.values())
    st_ = b.gpu_stats
    assert st_["tensor_parallel"] == 2 and st_["graph_iterations"] > 0 and st_["piecewise_iterations"] > 0
    assert st_["kv_pool_bytes"] * 2 == a.gpu_stats["kv_pool_bytes"]  # each rank: half the KV heads
    # every iteration and every block copy / swap reached the other rank
    req, it = b.requests.to_pandas(), b.iterations.to_pandas()
    assert req["preemptions"].sum() > 0 and it["ctx_cached_tokens"].sum() > 0
    # every device operation of rank 0 reached rank 1: each iteration's forward by the path
    # it ran (the warm-up's 3 eager steps), each swap out and back in, the block copies
    ops = st_["lockstep_ops"]
    assert ops["graph"] == st_["graph_iterations"] and ops["piecewise"] == st_["piecewise_iterations"]
    assert ops["forward"] == st_["eager_iterations"] + 3
    # (a request paused before its first decode recomputes instead of swapping)
    assert 0 < ops["to_host"] == ops["from_host"] <= int(req["preemptions"].sum())
    assert ops["capture_graph"] == ops["capture_piecewise"] == 0  # (no CUDA: nothing is captured)
    assert sum(ops.values()) == st_["lockstep_messages"]
    assert b.summary["num_iterations"] == a.summary["num_iterations"]


def test_tp_run_refusals(model_file, monkeypatch, capsys, tmp_path):
    from servesim.gpu_backend import runner as gr
    from servesim.sim.cli import main

    exp = model_file.parent / "bad.yaml"
    exp.write_text(RUN.format(model=model_file.name))
    assert main(["run", str(exp), "--backend", "gpu", "--out", str(tmp_path / "o"),
                 "--set", "cluster.tensor_parallel=3"]) == 2
    assert "cluster.tensor_parallel" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="tensor_parallel"):  # 4 heads over 3 GPUs
        _setups(exp, ["cluster.tensor_parallel=3"])
    spec = _setups(exp, ["speculative.proposer=ngram", "speculative.max_draft_len=2",
                         "runtime.overlap_scheduler=false"])["tp2"]
    with pytest.raises(ConfigError) as e:  # speculative decoding runs on one GPU
        gr._check_supported(spec)
    assert "cluster.tensor_parallel" in str(e.value) and "speculative" in str(e.value)
    s = _setups(exp)["tp2"]
    gr._check_supported(s)  # on a CPU: gloo ranks
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError) as e:
        gr._check_supported(s)
    assert "cluster.tensor_parallel" in str(e.value) and "1 GPU(s) are visible" in str(e.value)


def test_tp_bench_smoke(tmp_path, monkeypatch):
    """benchmarks/tp_bench.py --smoke: the TP=2 check passes, every table is written."""
    import csv
    import sys

    bench_dir = str(Path(__file__).resolve().parents[1] / "benchmarks")
    monkeypatch.syspath_prepend(bench_dir)  # (the spawned ranks import tp_bench from there too)
    import tp_bench
    from gpu_bench import bytes_read

    n = torch.get_num_threads()
    try:
        assert tp_bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(n)
    text = (tmp_path / "tp_bench.md").read_text()
    assert "**ok**" in text and "All-reduce by message size (TP=2" in text
    dec = list(csv.DictReader((tmp_path / "tp_decode.csv").open()))
    assert {(r["tp"], r["batch"]) for r in dec} == {("1", "1"), ("1", "4"), ("2", "1"), ("2", "4")}
    assert all(float(r["ms"]) > 0 and float(r["pred_gpu_ms"]) > 0 for r in dec)
    ar = list(csv.DictReader((tmp_path / "tp_allreduce.csv").open()))
    assert len(ar) >= 9 and all(float(r["model_us"]) > 0 and float(r["measured_us"]) > 0 for r in ar)
    # the bytes one GPU reads: at TP=1 exactly gpu_bench's decode bytes, at TP=2 about half
    from servesim.sim.specs import load_model

    m = load_model("llama-3.1-8b")
    assert tp_bench.bytes_per_gpu(m, 1, 16, 20000) == bytes_read(m, 16, 20000)
    assert tp_bench.bytes_per_gpu(m, 2, 16, 20000) < 0.55 * bytes_read(m, 16, 20000)
    assert "tp_bench" in sys.modules


# --------------------------------------------------------------------------------------
# calibration at tp > 1
# --------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.floats(2e-6, 60e-6), st.floats(0.2, 1.0), st.sampled_from([2, 4, 8]), st.sampled_from(["h200-sxm",
                                                                                              "h100-pcie"]))
def test_fit_allreduce_recovers_the_cost_models_terms(lat, eff, tp, hw_name):
    """All-reduce times priced by the cost model itself (its all-reduce term of a step over
    the step's 2 x layers all-reduces, NVLink or PCIe) are fitted back to the parameters
    that priced them, and the fitted model prices every message as measured."""
    from servesim.gpu_backend.tp import allreduce_sizes
    from servesim.sim.calibrate import fit_allreduce
    from servesim.sim.cost_model import RooflineConfig, RooflineCostModel
    from servesim.sim.specs import load_hardware, load_model
    from servesim.sim.types import IterationShape

    hw, m = load_hardware(hw_name), load_model("llama-3.1-8b")

    def per_allreduce(cfg: RooflineConfig, nbytes: int) -> float:
        t = nbytes // (m.hidden_size * m.dtype_bytes)
        cm = RooflineCostModel(m, hw, cfg, tp=tp, cuda_graphs=False)
        return cm.breakdown(IterationShape(n_decode=t, decode_kv_sum=t))["allreduce"] / (2 * m.num_layers)

    true = RooflineConfig(allreduce_latency_s=lat, allreduce_bandwidth_efficiency=eff)
    rows = [{"bytes": b, "seconds": per_allreduce(true, b)} for b in allreduce_sizes(m)]
    got = fit_allreduce(rows, hw, tp)
    assert got["allreduce_latency_s"] == pytest.approx(lat, rel=1e-3)
    assert got["allreduce_bandwidth_efficiency"] == pytest.approx(eff, rel=1e-3)
    fitted = RooflineConfig(**got)
    for r in rows:
        assert per_allreduce(fitted, r["bytes"]) == pytest.approx(r["seconds"], rel=1e-3)
    assert fit_allreduce(rows[:1], hw, tp) is None
    # a fixed part below the default steps' share goes to the step latency
    fixed = lat + 2 * (tp - 1) * true.collective_step_latency_s
    low = fit_allreduce([{"bytes": r["bytes"], "seconds": r["seconds"] - fixed + 1e-7} for r in rows], hw, tp)
    assert low["allreduce_latency_s"] == 0.0 and low["collective_step_latency_s"] > 0


def test_gemm_sweep_at_the_sharded_shapes():
    from servesim.gpu_backend.profiler import gemm_sweep
    from servesim.sim.specs import load_model

    m = load_model("llama-3.2-1b")
    rows = gemm_sweep(m, device="cpu", tokens=(1,), reps=1, tp=2)
    assert {r["linear"]: (r["k"], r["n"]) for r in rows} == {k: v for k, v in m.linear_shapes(2).items()
                                                              if k != "lm_head"}


def test_calibrate_from_a_tp2_grid(tmp_path, capsys):
    """`sim calibrate --from-grid G --tensor-parallel 2`: the all-reduce sweep beside the
    grid fits the cost model's all-reduce terms into the profile, whose tensor_parallel
    mapping keeps the sweep; without the sweep it is a ConfigError naming the flag."""
    import csv

    import yaml

    from servesim.gpu_backend.tp import allreduce_sizes
    from servesim.sim.calibrate import TP_PROFILE_KEY, load_profile
    from servesim.sim.cli import main
    from servesim.sim.specs import load_hardware, load_model

    src = Path(__file__).parents[1] / "benchmarks" / "results" / "calibration_h100.csv"
    grid = tmp_path / "g.grid.csv"
    grid.write_bytes(src.read_bytes())
    model = next(iter(csv.DictReader(grid.open())))["model"]
    out = tmp_path / "p.yaml"
    args = ["calibrate", "--model", model, "--hardware", "h100-sxm", "--from-grid", str(grid), "--out", str(out),
            "--tensor-parallel", "2"]
    assert main(args) == 2
    assert "--tensor-parallel" in capsys.readouterr().err
    hw = load_hardware("h100-sxm")
    sizes = allreduce_sizes(load_model(model))
    with open(grid.with_suffix(".allreduce.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["bytes", "seconds"])
        w.writeheader()
        w.writerows({"bytes": b, "seconds": 12e-6 + b / (hw.nvlink_bytes_per_s * 0.6)} for b in sizes)
    assert main(args) == 0
    doc = yaml.safe_load(out.read_text())
    assert doc[TP_PROFILE_KEY]["tp"] == 2 and doc[TP_PROFILE_KEY]["allreduce_bytes"] == sizes
    roof, _ = load_profile(out, load_model(model), hw)
    # one all-reduce's fixed part: the latency and 2 (tp - 1) ring steps
    assert roof.allreduce_latency_s + 2 * roof.collective_step_latency_s == pytest.approx(12e-6, rel=1e-3)
    assert roof.allreduce_bandwidth_efficiency == pytest.approx(0.6, rel=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_on_two_gpus_tp2_captures_nccl_in_graphs_and_matches_tp1(model_file):
    """On 2 GPUs (NCCL): the decode and piecewise graphs capture the all-reduces and
    all-gathers, and the TP=2 run emits the TP=1 run's greedy tokens (fp32 weights; the
    sharded GEMMs round differently, so most requests, not all: a near-tie may flip)."""
    from servesim.gpu_backend.runner import simulate_gpu
    from servesim.sim.specs import hardware_for_device

    exp = model_file.parent / "cuda.yaml"
    exp.write_text(RUN.format(model=model_file.name))
    s = _setups(exp, [f"hardware={hardware_for_device(torch.cuda.get_device_name())}"])
    a = simulate_gpu(s["tp1"], check_invariants=True, dtype=torch.float32)
    b = simulate_gpu(s["tp2"], check_invariants=True, dtype=torch.float32)
    assert b.gpu_stats["cuda_graphs_captured"] and b.gpu_stats["piecewise_graphs_captured"]
    assert b.gpu_stats["graph_iterations"] > 0
    ta, tb = ({k: list(v) for k, v in r.tokens.items()} for r in (a, b))
    assert sum(ta[k] == tb[k] for k in ta) >= 0.9 * len(ta)


def test_calibration_grid_at_tp2_on_cpu(model_file, monkeypatch):
    """`sim calibrate --backend gpu --tensor-parallel 2`'s measuring code on a CPU (gloo):
    every grid run starts a TP=2 group, the GEMM sweep times one rank's shard, and the
    all-reduce sweep times every message size over 2 ranks."""
    from servesim.gpu_backend import profiler, tp
    from servesim.gpu_backend.tp import allreduce_sizes
    from servesim.sim.specs import load_model

    monkeypatch.setattr(profiler, "gemm_sweep", (lambda sweep: lambda model, **kw: sweep(model, **{
        "tokens": (1, 16), "reps": 1, **kw}))(profiler.gemm_sweep))
    groups = []
    real = tp.tp_executor
    monkeypatch.setattr(tp, "tp_executor", lambda *a, **kw: groups.append(a[1]) or real(*a, **kw))
    monkeypatch.setattr(tp, "allreduce_sizes", lambda spec: allreduce_sizes(spec, (1, 64), (512,)))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_model(str(model_file))
        rows, env = profiler.measure_grid(model, model_ref=str(model_file), decode_points=[(2, 24, 6, True)],
                                          prefill_points=[(1, 40)], mixed_points=[], piecewise_points=[],
                                          served_points=[], power_points=[], prefix_points=[], tp=2,
                                          prompt_points=[], chunked_points=[], long_kv_sizes=False)
    finally:
        torch.set_num_threads(n)
    assert groups == [2, 2]  # both grid runs on 2 ranks
    assert {r["kind"] for r in rows} == {"decode", "prefill"} and all(r["time_s"] > 0 for r in rows)
    assert env["tensor_parallel"] == 2
    assert {(r["k"], r["n"]) for r in env["gemm"]} == {v for k, v in model.linear_shapes(2).items() if k != "lm_head"}
    assert [r["bytes"] for r in env["allreduce"]] == allreduce_sizes(model, (1, 64), (512,))
    assert all(r["seconds"] > 0 for r in env["allreduce"])
