"""The GPU backend end to end on a CPU (fp32, the kernels' torch references): a tiny Llama
driven by the real engine through `sim run --backend gpu`, `simulate_gpu`, the executor,
the graph runners (decode and piecewise, their padding paths) and the wall-clock driver.

The central check: greedy tokens of a request do not depend on how it was scheduled --
alone or batched, chunked context or not, CUDA-graph padding or not, piecewise graphs or
not, overlap scheduler or not, prefix reuse or not, preempted and recomputed or not.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from servesim.gpu_backend.executor import GpuExecutor, prompt_token_ids  # noqa: E402
from servesim.gpu_backend.graph_runner import GraphRunner  # noqa: E402
from servesim.gpu_backend.model import LlamaModel  # noqa: E402
from servesim.gpu_backend.piecewise_runner import PiecewiseRunner  # noqa: E402
from servesim.gpu_backend.runner import WEIGHTS_ENV, simulate_gpu  # noqa: E402
from servesim.gpu_backend.weights import random_weights, save_hf_checkpoint  # noqa: E402
from servesim.sim.cli import main  # noqa: E402
from servesim.sim.config import load_experiment  # noqa: E402
from servesim.sim.records import ITERATION_COLUMNS  # noqa: E402
from servesim.sim.runner import resolve  # noqa: E402
from servesim.sim.types import Request  # noqa: E402

TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "intermediate_size": 128, "vocab_size": 256, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": False,
}

# 20 requests with short lengths; a high arrival rate so the wall-clock run takes ~0.1 s
BASE = """\
name: tiny
model: {model}
hardware: h100-sxm
seed: 7
kv_cache: {{pool_tokens: 4096, tokens_per_block: 16}}
workload:
  synthetic:
    num_requests: 20
    arrival: {{kind: poisson, rate_req_s: 400}}
    prompt_len: {{kind: uniform, low: 3, high: 70}}
    output_len: {{kind: uniform, low: 6, high: 24}}
scheduler: {{max_batch_size: 8, max_num_tokens: 256}}
output: {{plots: false}}
"""

OFFLINE = "    workload: {synthetic: {arrival: {kind: offline}}}\n"  # same lengths, all at t=0
VARIANTS = """\
variants:
  - name: alone            # one request at a time: the reference
    scheduler: {max_batch_size: 1}
    runtime: {cuda_graphs: false}
  - name: batched
  - name: batched-offline
%(offline)s  - name: no-graphs
    runtime: {cuda_graphs: false}
%(offline)s  - name: chunked
    scheduler: {enable_chunked_context: true, max_num_tokens: 40}
%(offline)s  - name: overlap
    runtime: {overlap_scheduler: true}
  - name: overlap-chunked-nographs
    scheduler: {enable_chunked_context: true, max_num_tokens: 24}
    runtime: {overlap_scheduler: true, cuda_graphs: false}
%(offline)s  - name: preempt          # a pool of 8 blocks: max_utilization pauses and recomputes
    scheduler: {capacity: max_utilization}
    kv_cache: {pool_tokens: 128}
%(offline)s  - name: preempt-overlap
    scheduler: {capacity: max_utilization, enable_chunked_context: true, max_num_tokens: 48}
    kv_cache: {pool_tokens: 128}
    runtime: {overlap_scheduler: true}
%(offline)s  - name: swap             # paused requests' KV goes to the host and comes back
    scheduler: {capacity: max_utilization, preemption: swap}
    kv_cache: {pool_tokens: 128}
%(offline)s  - name: swap-overlap
    scheduler: {capacity: max_utilization, preemption: swap}
    kv_cache: {pool_tokens: 128}
    runtime: {overlap_scheduler: true}
%(offline)s""" % {"offline": OFFLINE}

PREFIX = """\
name: prefix
model: {model}
hardware: h100-sxm
seed: 3
kv_cache: {{pool_tokens: 2048, tokens_per_block: 16}}
workload:
  prefix:
    kind: shared_system_prompt
    num_requests: 16
    arrival: {{kind: poisson, rate_req_s: 300}}
    system_len: 40
    user_len: {{kind: uniform, low: 1, high: 30}}
    output_len: 8
    hash_block_size: {hbs}
    vocab_size: 256
scheduler: {{max_batch_size: 6, max_num_tokens: 256}}
output: {{plots: false}}
variants:
  - name: alone
    scheduler: {{max_batch_size: 1}}
  - name: reuse-off
  - name: reuse-on
    kv_cache: {{enable_block_reuse: true}}
  - name: reuse-on-chunked-overlap
    kv_cache: {{enable_block_reuse: true}}
    scheduler: {{enable_chunked_context: true, max_num_tokens: 24}}
    runtime: {{overlap_scheduler: true}}
"""


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices gain nothing from intra-op threads, and threads that spin while
    another process holds the cores slow a run down many times over."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The tiny model's config file and a checkpoint of it.

    The checkpoint's weights are drawn with a larger spread than the default random
    weights (std 0.02) so that greedy decisions have clear margins: token equality
    across schedules then does not hinge on fp32 rounding of near-ties."""
    d = tmp_path_factory.mktemp("tiny")
    cfg = d / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    ckpt = save_hf_checkpoint(random_weights(TINY, seed=11, std=0.3), TINY, d / "ckpt")
    return {"dir": d, "config": cfg, "ckpt": ckpt}


def _setups(path: Path, overrides=None) -> dict:
    exp = load_experiment(path, overrides or [])
    return {v.name: resolve(v.config, exp.base_dir) for v in exp.variants}


def _tokens(result) -> dict[int, list[int]]:
    return {rid: list(t) for rid, t in result.tokens.items()}


def _check_complete(result) -> None:
    req = result.requests.to_pandas()
    assert (req["status"] == "finished").all()
    toks = _tokens(result)
    for rid, n in zip(req["request_id"], req["output_len"]):
        assert len(toks[rid]) == n, (rid, len(toks[rid]), n)
    for times in req["token_times"]:
        assert np.all(np.diff(times) > 0), "token times must increase"


@pytest.fixture(scope="module")
def scheduling_runs(tiny) -> dict:
    path = tiny["dir"] / "sched.yaml"
    path.write_text(BASE.format(model=tiny["config"].name) + VARIANTS)
    return {name: simulate_gpu(s, weights=tiny["ckpt"], check_invariants=True)
            for name, s in _setups(path).items()}


# --------------------------------------------------------------------------------------
# the CLI
# --------------------------------------------------------------------------------------


def test_cli_gpu_backend_writes_the_sim_outputs(tiny, tmp_path, monkeypatch):
    exp = tmp_path / "exp.yaml"
    exp.write_text(BASE.format(model=tiny["config"]) + "variants:\n  - name: base\n  - name: overlap\n"
                   "    runtime: {overlap_scheduler: true}\n")
    monkeypatch.setenv(WEIGHTS_ENV, str(tiny["ckpt"]))
    assert main(["run", str(exp), "--backend", "gpu", "--out", str(tmp_path / "gpu")]) == 0
    assert main(["run", str(exp), "--out", str(tmp_path / "sim")]) == 0
    assert json.loads((tmp_path / "gpu" / "experiment.json").read_text())["backend"] == "gpu"
    for v in ("base", "overlap"):
        g, s = tmp_path / "gpu" / v, tmp_path / "sim" / v
        for f in ("requests.parquet", "iterations.parquet", "summary.json", "config.yaml"):
            assert (g / f).exists(), f
        sg, ss = json.loads((g / "summary.json").read_text()), json.loads((s / "summary.json").read_text())
        assert sg["backend"] == "gpu" and ss["backend"] == "sim"
        assert set(sg) == set(ss)
        assert sg["num_finished"] == sg["num_requests"] == 20
        rg, rs = pq.read_table(g / "requests.parquet"), pq.read_table(s / "requests.parquet")
        ig, is_ = pq.read_table(g / "iterations.parquet"), pq.read_table(s / "iterations.parquet")
        assert rg.schema.names == rs.schema.names
        # the GPU's table: the sim's columns, then the executor's host time per iteration
        assert ig.schema.names == is_.schema.names + ["host_prep_s", "host_exec_s"]
        assert set(ITERATION_COLUMNS) <= set(ig.schema.names)
        req = rg.to_pandas()
        assert [len(t) for t in req["token_times"]] == req["output_len"].tolist()
        assert (req["first_scheduled_s"] >= req["arrival_s"]).all()  # the wall clock waited for arrivals
        assert req["arrival_s"].max() > 0
        it = ig.to_pandas()
        assert (it["duration_s"] > 0).all()
        assert (it["host_prep_s"] > 0).all() and (it["host_prep_s"] <= it["host_exec_s"]).all()
        if v == "base":  # without overlap the executor's call is inside the engine step
            assert (it["host_exec_s"] <= it["duration_s"]).all()
        assert it["graph"].any() and not it["graph"].all()  # decode-only iterations ran padded
        assert (it.loc[it["graph"], "num_ctx_requests"] == 0).all()


def test_cli_errors_are_config_errors(tiny, tmp_path, capsys):
    exp = tmp_path / "exp.yaml"
    exp.write_text(BASE.format(model=tiny["config"]))
    # two replicas on the one-GPU backend
    assert main(["run", str(exp), "--backend", "gpu", "--out", str(tmp_path / "o"),
                 "--set", "cluster.replicas=2"]) == 2
    assert "cluster.replicas" in capsys.readouterr().err
    # a pool sized for an H100 does not belong in CPU memory
    assert main(["run", str(exp), "--backend", "gpu", "--out", str(tmp_path / "o"),
                 "--set", "model=llama-3.2-1b", "--set", "kv_cache.pool_tokens=null"]) == 2
    assert "kv_cache.pool_tokens" in capsys.readouterr().err
    # prompt tokens outside the model's vocabulary
    pre = tmp_path / "prefix.yaml"
    pre.write_text(PREFIX.format(model=tiny["config"], hbs="null"))
    assert main(["run", str(pre), "--backend", "gpu", "--out", str(tmp_path / "o"),
                 "--set", "workload.prefix.vocab_size=1000"]) == 2
    assert "vocabulary" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# same greedy tokens whatever the schedule
# --------------------------------------------------------------------------------------


def test_every_request_gets_its_output_len(scheduling_runs):
    for name, r in scheduling_runs.items():
        _check_complete(r)
        assert r.summary["backend"] == "gpu"


@pytest.mark.parametrize("variant", ["batched", "batched-offline", "no-graphs", "chunked", "overlap",
                                     "overlap-chunked-nographs", "preempt", "preempt-overlap", "swap",
                                     "swap-overlap"])
def test_tokens_do_not_depend_on_the_schedule(scheduling_runs, variant):
    ref = _tokens(scheduling_runs["alone"])
    got = _tokens(scheduling_runs[variant])
    assert got == ref


def test_tokens_match_greedy_decoding_without_a_kv_cache(tiny, scheduling_runs):
    """The independent oracle: each step recomputes the whole sequence (prompt and the
    tokens so far) in one context chunk on a fresh pool and takes the argmax."""
    from servesim.gpu_backend.model import ContextChunkInput
    from servesim.sim.runner import make_requests

    run = scheduling_runs["batched"]
    model = LlamaModel(TINY, tiny["ckpt"], dtype=torch.float32, device="cpu")
    pool = model.make_kv_pool(16, 16)
    got = _tokens(run)
    for req in make_requests(run.setup.workload):
        seq = prompt_token_ids(req, run.setup.cfg.seed, TINY["vocab_size"]).tolist()
        want = []
        for _ in range(req.output_len):
            logits = model.step([ContextChunkInput(seq, 0, list(range(-(-len(seq) // 16))))], [], pool)
            want.append(int(logits[0].argmax()))
            seq.append(want[-1])
        assert got[req.request_id] == want, req.request_id


def test_the_variants_exercise_what_they_claim(scheduling_runs):
    it = {k: r.iterations.to_pandas() for k, r in scheduling_runs.items()}
    assert (it["alone"]["num_gen_requests"] + it["alone"]["num_ctx_requests"]).max() == 1
    assert it["batched"]["num_gen_requests"].max() > 1
    assert scheduling_runs["batched"].gpu_stats["graph_iterations"] > 0
    off = it["batched-offline"]
    assert off["num_gen_requests"].max() == 8
    assert scheduling_runs["batched-offline"].gpu_stats["graph_iterations"] == off["graph"].sum() > 0
    assert (off["padded_tokens"] > 0).any()  # padding rows actually ran
    assert scheduling_runs["no-graphs"].gpu_stats["graph_iterations"] == 0
    assert (it["chunked"]["ctx_tokens"] <= 40).all()
    req = scheduling_runs["chunked"].requests.to_pandas()
    assert (req["prompt_len"] > 40).any()  # some prompts were split
    for k in ("preempt", "preempt-overlap"):
        assert scheduling_runs[k].summary["num_preemptions"] > 0, k
        assert scheduling_runs[k].summary["recomputed_tokens"] > 0, k
    for k in ("swap", "swap-overlap"):
        assert scheduling_runs[k].summary["num_swaps"] > 0, k
    assert scheduling_runs["overlap"].gpu_stats["overlap"]


def test_overlap_iterations_end_when_their_tokens_arrive(scheduling_runs):
    it = scheduling_runs["overlap"].iterations.to_pandas().sort_values("iteration")
    end = (it["start_s"] + it["duration_s"]).to_numpy()
    assert np.all(np.diff(end) > 0)
    assert np.all(np.diff(it["start_s"].to_numpy()) >= 0)


# --------------------------------------------------------------------------------------
# prefix reuse
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("hbs", ["null", "16"], ids=["prompt_tokens", "block_hashes"])
def test_prefix_reuse_gives_the_same_tokens(tiny, hbs):
    path = tiny["dir"] / f"prefix-{hbs}.yaml"
    path.write_text(PREFIX.format(model=tiny["config"].name, hbs=hbs))
    runs = {name: simulate_gpu(s, weights=tiny["ckpt"], check_invariants=True)
            for name, s in _setups(path).items()}
    ref = _tokens(runs["alone"])
    for name, r in runs.items():
        _check_complete(r)
        assert _tokens(r) == ref, name
    assert runs["reuse-off"].summary["prefix_hit_rate"] == 0
    assert runs["reuse-on"].summary["prefix_hit_rate"] > 0
    assert runs["reuse-on-chunked-overlap"].summary["prefix_hit_rate"] > 0


def test_partial_reuse_copies_the_block(tiny, tmp_path):
    """A prompt whose every block is cached recomputes its last token into a copy of the
    last cached block (block_copies): same prompt, same greedy tokens."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, 32).tolist()
    b = rng.integers(0, 256, 21).tolist()
    rows = [(0, a, 9), (1, b, 7), (2, a, 9), (3, a[:16] + b[:5], 6), (4, a, 9)]
    lines = ["request_id,arrival_s,prompt_len,output_len,prompt_tokens"]
    lines += [f"{i},0.0,{len(p)},{o},{' '.join(map(str, p))}" for i, p, o in rows]
    trace = tmp_path / "dup.csv"
    trace.write_text("\n".join(lines) + "\n")
    path = tmp_path / "dup.yaml"
    path.write_text(f"""\
name: dup
model: {tiny['config']}
hardware: h100-sxm
kv_cache: {{pool_tokens: 1024, tokens_per_block: 16, enable_block_reuse: true}}
workload: {{trace: {trace}}}
scheduler: {{max_batch_size: 1}}
output: {{plots: false}}
variants:
  - name: reuse
  - name: reuse-overlap
    runtime: {{overlap_scheduler: true}}
  - name: no-reuse
    kv_cache: {{enable_block_reuse: false}}
""")
    runs = {k: simulate_gpu(s, weights=tiny["ckpt"], check_invariants=True) for k, s in _setups(path).items()}
    off = _tokens(runs["no-reuse"])
    assert off[0] == off[2] == off[4]
    for k in ("reuse", "reuse-overlap"):
        assert _tokens(runs[k]) == off, k
        req = runs[k].requests.to_pandas().set_index("request_id")
        assert req.loc[2, "cached_tokens"] == 31 and req.loc[4, "cached_tokens"] == 31
        assert req.loc[3, "cached_tokens"] == 16


# --------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------


def test_prompt_token_ids():
    r = Request(5, 0.0, 40, 3)
    t = prompt_token_ids(r, seed=1, vocab_size=100)
    assert t.dtype == np.int64 and t.shape == (40,) and t.min() >= 0 and t.max() < 100
    assert np.array_equal(t, prompt_token_ids(Request(5, 1.0, 40, 9), seed=1, vocab_size=100))
    assert not np.array_equal(t, prompt_token_ids(Request(6, 0.0, 40, 3), seed=1, vocab_size=100))
    assert not np.array_equal(t, prompt_token_ids(r, seed=2, vocab_size=100))
    # block hashes: equal hashes, equal tokens, whatever the request
    h1 = prompt_token_ids(Request(1, 0, 40, 1, block_hashes=(7, 8, 9)), 0, 1000, hash_block_size=16)
    h2 = prompt_token_ids(Request(2, 0, 35, 1, block_hashes=(7, 8, 10)), 0, 1000, hash_block_size=16)
    assert np.array_equal(h1[:32], h2[:32]) and not np.array_equal(h1[32:35], h2[32:35])
    # given tokens are used as they are, and checked against the vocabulary
    given = tuple(range(10))
    assert prompt_token_ids(Request(1, 0, 10, 1, prompt_tokens=given), 0, 10).tolist() == list(given)
    with pytest.raises(ValueError):
        prompt_token_ids(Request(1, 0, 10, 1, prompt_tokens=given), 0, 9)


def test_graph_runner_padding_matches_unpadded_and_writes_nothing_extra():
    torch.manual_seed(0)
    model = LlamaModel(TINY, random_weights(TINY, seed=1, std=0.3), dtype=torch.float32, device="cpu")
    pool = model.make_kv_pool(16, 4)
    pool.kv.normal_()
    runner = GraphRunner(model, pool, [1, 2, 4, 8], max_blocks=4)
    assert not runner.use_graphs and runner.padded_size(3) == 4
    ids = torch.tensor([3, 4, 5])
    pos = torch.tensor([5, 0, 9])
    bt3 = torch.tensor([[1, 2, 0], [3, 0, 0], [4, 5, 6]], dtype=torch.int32)
    seq = (pos + 1).to(torch.int32)
    slots = torch.tensor([2 * 4 + 1, 3 * 4 + 0, 6 * 4 + 1])
    before = pool.kv.clone()
    want = model.forward_decode(ids, pos, bt3, seq, slots, pool)
    after_ref = pool.kv.clone()
    pool.kv.copy_(before)
    bt_w = torch.tensor([[1, 2, 0], [3, 0, 0], [4, 5, 6]], dtype=torch.int32)
    got = runner.run(ids, pos, bt_w, seq, slots)
    assert got.shape == (3, TINY["vocab_size"])
    torch.testing.assert_close(got, want)
    # the three real rows wrote their slots (to rounding: the padded GEMM has 4 rows);
    # the padding row wrote nothing
    written = torch.zeros(16 * 4, dtype=torch.bool)
    written[slots] = True
    written = written.view(16, 4)
    torch.testing.assert_close(pool.kv[:, :, written], after_ref[:, :, written])
    assert torch.equal(pool.kv[:, :, ~written], before[:, :, ~written])
    assert runner.eager_runs == 1


def test_executor_overlap_gathers_tokens_on_device(tiny):
    """Directly: the engine's batches through the executor, overlap on and off."""
    from servesim.policies.capacity import make_capacity_policy
    from servesim.policies.chunking import make_chunk_policy
    from servesim.policies.graph_padding import GraphPadding, capture_sizes
    from servesim.policies.routing import make_router
    from servesim.gpu_backend.driver import run_wallclock
    from servesim.sim.engine import Engine, EngineConfig

    out = {}
    for overlap in (False, True):
        model = LlamaModel(TINY, tiny["ckpt"], dtype=torch.float32, device="cpu")
        pad = GraphPadding(capture_sizes(4))
        ex = GpuExecutor(model, 64, 8, graph_sizes=pad.sizes, max_seq_len=128, overlap=overlap, seed=3)
        cfg = EngineConfig(max_batch_size=4, max_num_tokens=64, tokens_per_block=8, num_blocks=64,
                           capacity=make_capacity_policy("guaranteed_no_evict"),
                           chunking=make_chunk_policy(True, None), graph_padding=pad, check_invariants=True)
        eng = Engine(cfg, ex)
        reqs = [Request(i, 0.0, 10 + 7 * i, 5 + i) for i in range(6)]
        run_wallclock(reqs, [eng], make_router("round_robin"))
        assert not ex.in_flight
        out[overlap] = {i: ex.tokens(i) for i in range(6)}
        assert all(len(out[overlap][i]) == 5 + i for i in range(6))
        assert ex.graph_iterations > 0 and ex.eager_iterations > 0
    assert out[False] == out[True]


def test_alone_setup_is_a_single_request_workload(tiny, tmp_path):
    """Sanity check of the reference: a request run on its own (a one-row workload) gets
    the tokens it gets in the max_batch_size=1 run."""
    path = tmp_path / "one.yaml"
    path.write_text(BASE.format(model=tiny["config"])
                    + "variants:\n  - name: alone\n    scheduler: {max_batch_size: 1}\n")
    setup = _setups(path)["alone"]
    full = simulate_gpu(setup, weights=tiny["ckpt"])
    df = setup.workload.iloc[[3]].reset_index(drop=True)
    df["arrival_s"] = 0.0
    one = simulate_gpu(dataclasses.replace(setup, workload=df), weights=tiny["ckpt"])
    rid = int(df["request_id"][0])
    assert _tokens(one) == {rid: _tokens(full)[rid]}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_graphs_and_overlap(tiny, tmp_path):
    """On a GPU: CUDA graphs are captured and replayed, overlap runs, every request gets
    its tokens. fp32 weights; the Triton kernels' reductions differ from one batch shape
    to another, so token equality with the one-at-a-time run is required of most
    requests, not all (a near-tie may flip)."""
    path = tmp_path / "cuda.yaml"
    path.write_text(BASE.format(model=tiny["config"]) + VARIANTS)
    runs = {k: simulate_gpu(s, weights=tiny["ckpt"], check_invariants=True, dtype=torch.float32)
            for k, s in _setups(path).items()}
    ref = _tokens(runs["alone"])
    for k, r in runs.items():
        _check_complete(r)
        same = sum(_tokens(r)[i] == ref[i] for i in ref)
        assert same >= 0.9 * len(ref), (k, same)
    assert runs["batched-offline"].gpu_stats["cuda_graphs_captured"]
    assert runs["batched-offline"].gpu_stats["graph_iterations"] > 0
    assert runs["overlap"].gpu_stats["overlap"]


# --------------------------------------------------------------------------------------
# piecewise CUDA graphs for iterations with context chunks
# --------------------------------------------------------------------------------------

PW_BLOCK = 4
PW_SIZES = [8, 16, 24, 40, 64]


def _mixed_iteration(chunks, decodes, seed: int, num_blocks: int):
    """``ContextChunkInput`` / ``DecodeInput`` lists of one iteration: ``chunks`` as
    ``(prior tokens, new tokens, sample)``, ``decodes`` as KV lengths before the step; each
    request over blocks of its own drawn at random, tokens at random."""
    from servesim.gpu_backend.model import ContextChunkInput, DecodeInput

    rng = np.random.default_rng(seed)
    free = rng.permutation(num_blocks).tolist()

    def blocks(n_tokens):
        n = -(-n_tokens // PW_BLOCK)
        assert n <= len(free), "pool too small for the drawn iteration"
        return [free.pop() for _ in range(n)]

    ctx = [ContextChunkInput(rng.integers(0, TINY["vocab_size"], q).tolist(), prior, blocks(prior + q), sample)
           for prior, q, sample in chunks]
    dec = [DecodeInput(int(rng.integers(0, TINY["vocab_size"])), pos, blocks(pos + 1)) for pos in decodes]
    return ctx, dec


def _piecewise_vs_forward(model, pool, runner, ctx, dec, padded):
    """Logits of ``runner.run`` at ``padded`` tokens and of ``model.forward`` from the same
    pool contents, and the pool before, after the eager forward and after the runner."""
    from servesim.gpu_backend.model import build_attn_metadata

    meta = build_attn_metadata(ctx, dec, PW_BLOCK, model.device)
    before = pool.kv.clone()
    want = model.forward(meta.input_ids, meta.positions, pool, meta)
    after_eager = pool.kv.clone()
    pool.kv.copy_(before)
    got = runner.run(meta.input_ids, meta.positions, meta, padded)
    return meta, got, want, before, after_eager


def _written_mask(pool, slot_mapping) -> torch.Tensor:
    """[num_blocks, block_size] True at the slots an iteration writes."""
    written = torch.zeros(pool.num_blocks * pool.block_size, dtype=torch.bool, device=pool.kv.device)
    written[slot_mapping] = True
    return written.view(pool.num_blocks, pool.block_size)


@pytest.fixture(scope="module")
def pw_cpu():
    model = LlamaModel(TINY, random_weights(TINY, seed=1, std=0.3), dtype=torch.float32, device="cpu")
    pool = model.make_kv_pool(96, PW_BLOCK)
    pool.kv.normal_(generator=torch.Generator().manual_seed(0))  # cached prefixes: KV of earlier steps
    return model, pool, PiecewiseRunner(model, pool, PW_SIZES)


@settings(max_examples=30, deadline=None)
@given(chunks=st.lists(st.tuples(st.integers(0, 24), st.integers(1, 20), st.booleans()), min_size=1, max_size=3),
       decodes=st.lists(st.integers(0, 30), max_size=4), extra=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_piecewise_runner_matches_forward_and_padding_writes_nothing(pw_cpu, chunks, decodes, extra, seed):
    """Random mixed iterations (chunks over cached prefixes, sampling or not, and decodes)
    at every padded size that fits them: the runner's pieces, run eagerly on a CPU, give
    the eager forward's logits and KV writes; padding rows write nothing."""
    model, pool, runner = pw_cpu
    assert not runner.use_graphs and not runner.captured
    ctx, dec = _mixed_iteration(chunks, decodes, seed, pool.num_blocks)
    T = sum(q for _, q, _ in chunks) + len(decodes)
    fits = [s for s in PW_SIZES if s >= T]
    padded = fits[min(extra, len(fits) - 1)]
    assert runner.padded_size(T) == fits[0]
    runs = runner.eager_runs
    meta, got, want, before, after_eager = _piecewise_vs_forward(model, pool, runner, ctx, dec, padded)
    assert runner.eager_runs == runs + 1
    assert got.shape == want.shape == (meta.num_sampling, TINY["vocab_size"]) and got.dtype == torch.float32
    # fp32 on a CPU: a GEMM of more rows may take another BLAS blocking, so the real rows
    # round differently in the last bits (the H100's bf16 pieces matched exactly, section 10)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)
    written = _written_mask(pool, meta.slot_mapping)
    torch.testing.assert_close(pool.kv[:, :, written], after_eager[:, :, written], rtol=2e-4, atol=2e-4)
    assert torch.equal(pool.kv[:, :, ~written], before[:, :, ~written])
    # the padding rows ran as token 0 at position 0 with no KV slot
    assert (runner.slot_mapping[T:padded] == -1).all() and (runner.input_ids[T:padded] == 0).all()


def test_piecewise_runner_rejects_misuse(pw_cpu):
    from servesim.gpu_backend.model import build_attn_metadata
    model, pool, runner = pw_cpu
    ctx, dec = _mixed_iteration([(0, 20, True)], [3, 4], seed=1, num_blocks=pool.num_blocks)
    meta = build_attn_metadata(ctx, dec, PW_BLOCK)  # 22 tokens
    assert runner.padded_size(22) == 24
    for padded in (16, 30):  # below the token count; not a captured size
        with pytest.raises(ValueError, match="cannot run 22 tokens"):
            runner.run(meta.input_ids, meta.positions, meta, padded)
    with pytest.raises(ValueError, match="input ids"):
        runner.run(meta.input_ids[:-1], meta.positions, meta)
    big = build_attn_metadata(*_mixed_iteration([(0, 65, True)], [], seed=2, num_blocks=pool.num_blocks), PW_BLOCK)
    with pytest.raises(ValueError, match="exceed the largest captured size 64"):
        runner.run(big.input_ids, big.positions, big)
    with pytest.raises(ValueError, match="no token counts"):
        PiecewiseRunner(model, pool, [])
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        PiecewiseRunner(model, pool, [16], use_graphs=True)
    other = LlamaModel(dict(TINY, num_hidden_layers=3), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="does not fit the model"):
        PiecewiseRunner(other, pool, [16])


PIECEWISE_VARIANTS = """\
variants:
  - name: eager
    scheduler: {enable_chunked_context: true, max_num_tokens: 64}
  - name: piecewise        # up to 40 tokens; bigger iterations with context run eagerly
    scheduler: {enable_chunked_context: true, max_num_tokens: 64}
    runtime: {piecewise_graphs: true, piecewise_max_tokens: 40}
  - name: piecewise-overlap-offline
    scheduler: {enable_chunked_context: true, max_num_tokens: 64}
    runtime: {piecewise_graphs: true, piecewise_max_tokens: 40, overlap_scheduler: true}
    workload: {synthetic: {arrival: {kind: offline}}}
"""


def test_piecewise_graphs_give_the_same_tokens_and_record_their_padding(tiny, tmp_path):
    from servesim.policies.graph_padding import GraphPadding, token_capture_sizes

    path = tmp_path / "piecewise.yaml"
    path.write_text(BASE.format(model=tiny["config"]) + PIECEWISE_VARIANTS)
    runs = {k: simulate_gpu(s, weights=tiny["ckpt"], check_invariants=True) for k, s in _setups(path).items()}
    ref = _tokens(runs["eager"])
    pad = GraphPadding(token_capture_sizes(40))
    assert runs["eager"].gpu_stats["piecewise_iterations"] == 0
    for k in ("piecewise", "piecewise-overlap-offline"):
        r = runs[k]
        _check_complete(r)
        assert _tokens(r) == ref, k
        it = r.iterations.to_pandas()
        ctx = it[it["num_ctx_requests"] > 0]
        T = (ctx["ctx_tokens"] + ctx["num_gen_requests"]).to_numpy()
        small = T <= 40
        assert small.any() and (~small).any(), k  # both paths ran
        assert ctx["graph"].to_numpy().tolist() == small.tolist(), k
        want_pad = np.where(small, [pad.padded(int(t)) - int(t) if t <= 40 else 0 for t in T], 0)
        assert ctx["padded_tokens"].to_numpy().tolist() == want_pad.tolist(), k
        assert (want_pad > 0).any(), k  # padding rows actually ran
        st_ = r.gpu_stats
        assert st_["piecewise_iterations"] == int(small.sum()), k
        assert not st_["piecewise_graphs_captured"]  # a CPU runs the pieces eagerly
        assert st_["graph_iterations"] == int(it.loc[it["num_ctx_requests"] == 0, "graph"].sum()) > 0, k
        assert st_["iterations"] == len(it) == st_["graph_iterations"] + st_["piecewise_iterations"] \
            + st_["eager_iterations"], k


def test_executor_checks_the_piecewise_padding(tiny):
    """An engine that pads iterations with context for piecewise graphs needs an executor
    with a piecewise runner of the same sizes."""
    from servesim.gpu_backend.driver import run_wallclock
    from servesim.policies.capacity import make_capacity_policy
    from servesim.policies.chunking import make_chunk_policy
    from servesim.policies.graph_padding import GraphPadding
    from servesim.policies.routing import make_router
    from servesim.sim.engine import Engine, EngineConfig

    model = LlamaModel(TINY, tiny["ckpt"], dtype=torch.float32, device="cpu")
    for executor_sizes, error in ((None, "no piecewise runner"), ([52, 64], "different piecewise GraphPadding")):
        ex = GpuExecutor(model, 64, 8, piecewise_sizes=executor_sizes, max_seq_len=128)
        cfg = EngineConfig(max_batch_size=4, max_num_tokens=64, tokens_per_block=8, num_blocks=64,
                           capacity=make_capacity_policy("guaranteed_no_evict"),
                           chunking=make_chunk_policy(True, None), graph_padding=None,
                           piecewise_padding=GraphPadding([16, 32, 64]))
        with pytest.raises(RuntimeError, match=error):
            run_wallclock([Request(i, 0.0, 10 + 7 * i, 3) for i in range(3)], [Engine(cfg, ex)],
                          make_router("round_robin"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_piecewise_capture_matches_eager(tiny, tmp_path):
    """On a GPU: warm-up and capture write nothing to the KV cache; replayed pieces with
    eager attention between them give the eager forward's logits and KV writes (fp32;
    GEMMs of another row count may round differently); a GPU run with piecewise graphs
    captures them, runs its iterations with context through them and finishes."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = LlamaModel(TINY, tiny["ckpt"], dtype=torch.float32, device="cuda")
    pool = model.make_kv_pool(96, PW_BLOCK)
    pool.kv.normal_()
    runner = PiecewiseRunner(model, pool, PW_SIZES)
    before = pool.kv.clone()
    assert runner.capture() and runner.captured and runner.capture_s > 0
    assert sorted(runner.graphs) == PW_SIZES and all(len(g) == TINY["num_hidden_layers"] + 1
                                                     for g in runner.graphs.values())
    assert torch.equal(pool.kv, before)
    shapes = [([(0, 20, True)], []), ([(5, 7, True), (0, 9, False), (12, 3, True)], [4, 17, 30]),
              ([(24, 1, True)], [0]), ([(3, 20, True), (0, 20, True), (8, 20, True)], [1, 2, 3, 4])]
    for n, (chunks, decodes) in enumerate(shapes):
        ctx, dec = _mixed_iteration(chunks, decodes, seed=n, num_blocks=pool.num_blocks)
        T = sum(q for _, q, _ in chunks) + len(decodes)
        meta, got, want, before, after_eager = _piecewise_vs_forward(model, pool, runner, ctx, dec,
                                                                     runner.padded_size(T))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        written = _written_mask(pool, meta.slot_mapping)
        torch.testing.assert_close(pool.kv[:, :, written], after_eager[:, :, written], rtol=1e-4, atol=1e-4)
        assert torch.equal(pool.kv[:, :, ~written], before[:, :, ~written])
    assert runner.replays == len(shapes) and runner.eager_runs == 0

    path = tmp_path / "piecewise.yaml"
    path.write_text(BASE.format(model=tiny["config"]) + PIECEWISE_VARIANTS)
    runs = {k: simulate_gpu(s, weights=tiny["ckpt"], dtype=torch.float32) for k, s in _setups(path).items()}
    ref = _tokens(runs["eager"])
    for k in ("piecewise", "piecewise-overlap-offline"):
        _check_complete(runs[k])
        assert runs[k].gpu_stats["piecewise_graphs_captured"], k
        assert runs[k].gpu_stats["piecewise_iterations"] > 0, k
        same = sum(_tokens(runs[k])[i] == ref[i] for i in ref)
        assert same >= 0.9 * len(ref), (k, same)


def test_gpu_backend_refuses_another_gpus_hardware_spec():
    """A run or calibration on an H200 named h100-sxm would be recorded, and its profile
    fitted, as an H100's: a ConfigError naming both instead."""
    from servesim.gpu_backend.runner import check_device
    from servesim.sim.specs import load_hardware
    from servesim.sim.types import ConfigError

    h100, h200 = load_hardware("h100-sxm"), load_hardware("h200-sxm")
    check_device(h100, "NVIDIA H100 80GB HBM3")
    check_device(h200, "NVIDIA H200")
    with pytest.raises(ConfigError, match=r"NVIDIA H200.*h100-sxm.*H100"):
        check_device(h100, "NVIDIA H200")
    with pytest.raises(ConfigError, match="h200-sxm"):
        check_device(h200, "NVIDIA A100-SXM4-80GB")
    check_device(h100.model_copy(update={"device_names": []}), "anything")  # a spec that names none
    from servesim.sim.specs import hardware_for_device

    assert hardware_for_device("NVIDIA H200") == "h200-sxm"
    assert hardware_for_device("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert hardware_for_device("cpu") is None
