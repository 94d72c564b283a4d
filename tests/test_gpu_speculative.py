"""Speculative decoding on the GPU backend (S5), on a CPU (fp32, the kernels' torch
references): tiny random Llamas driven by the real engine through `GpuExecutor`, the
draft-model and n-gram proposers running for real (gpu_backend/speculative.py).

The central check: greedy speculative decoding emits exactly the tokens plain decoding
emits, whatever the proposer, k, the schedule (batching, chunked context, CUDA-graph
padding, preemption) and however many drafts are accepted. Beside it: controlled
acceptance draws what the simulator draws, the rejection rule keeps the target's
distribution, output lengths are exact and no KV block leaks (the engine checks its pool
after every step), and a GPU-backend run writes the per-position draft columns.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from servesim.gpu_backend.driver import run_wallclock  # noqa: E402
from servesim.gpu_backend.executor import GpuExecutor  # noqa: E402
from servesim.gpu_backend.model import LlamaModel  # noqa: E402
from servesim.gpu_backend.speculative import (GpuSpeculation, NgramIndex, greedy_verify,  # noqa: E402
                                              rejection_verify, sampling_probs)
from servesim.gpu_backend.weights import random_weights  # noqa: E402
from servesim.policies.capacity import make_capacity_policy  # noqa: E402
from servesim.policies.chunking import make_chunk_policy  # noqa: E402
from servesim.policies.graph_padding import GraphPadding, capture_sizes  # noqa: E402
from servesim.policies.routing import make_router  # noqa: E402
from servesim.policies.speculative import make_draft_policy  # noqa: E402
from servesim.sim.engine import Engine, EngineConfig  # noqa: E402
from servesim.sim.types import ConfigError, Request  # noqa: E402

REPO = Path(__file__).parents[1]

TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "intermediate_size": 128, "vocab_size": 256, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": False,
}
# a drafter of other shapes (the target's vocabulary)
SMALL = dict(TINY, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             intermediate_size=64)
BS = 8  # tokens per KV block


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# weights with a large spread (clear greedy margins: equality does not hinge on fp32 rounding)
W = random_weights(TINY, seed=11, std=0.3)


def _noisy(w, seed: int, eps: float):
    """A copy of ``w`` with noise: a drafter that agrees with the target often, not always."""
    g = torch.Generator().manual_seed(seed)
    out = random_weights(TINY, seed=seed, std=0.3)
    for name in ("embed", "lm_head", "final_norm"):
        setattr(out, name, getattr(w, name) + eps * torch.randn(getattr(w, name).shape, generator=g))
    for lo, li in zip(out.layers, w.layers):
        for name in ("input_norm", "qkv", "o", "post_norm", "gate_up", "down"):
            setattr(lo, name, getattr(li, name) + eps * torch.randn(getattr(li, name).shape, generator=g))
    return out


DRAFTERS = {
    "copy": lambda dev="cpu": LlamaModel(TINY, W, dtype=torch.float32, device=dev),  # every draft accepted
    "noisy": lambda dev="cpu": LlamaModel(TINY, _noisy(W, 5, 0.01), dtype=torch.float32, device=dev),  # some
    "small": lambda dev="cpu": LlamaModel(SMALL, random_weights(SMALL, seed=4, std=0.3), dtype=torch.float32,
                                          device=dev),  # another shape: almost none
}


def _run(reqs: list[tuple[int, int, tuple | None]], *, proposer: str | None = None, k: int = 0,
         drafter: str = "noisy", acceptance: str = "natural", alpha=(0.6,), max_batch: int = 4,
         max_tokens: int = 64, chunked: bool = True, graphs: bool = True, capacity: str = "guaranteed_no_evict",
         blocks: int = 64, temperature: float = 0.0, seed: int = 3, device: str = "cpu",
         use_graphs: bool | None = None):
    """The requests ``(prompt_len, output_len, prompt_tokens or None)``, all at t = 0, through
    the engine (invariants checked every step) and a `GpuExecutor`. Returns (tokens per
    request, engine, executor)."""
    model = LlamaModel(TINY, W, dtype=torch.float32, device=device)
    pad = GraphPadding(capture_sizes(max_batch)) if graphs else None
    spec = None
    if proposer is not None:
        spec = GpuSpeculation(proposer, k, acceptance=acceptance, alpha=list(alpha), seed=seed,
                              drafter=DRAFTERS[drafter](device) if proposer == "draft_model" else None)
    ex = GpuExecutor(model, blocks, BS, graph_sizes=pad.sizes if pad else None, max_seq_len=256, seed=seed,
                     temperature=temperature, speculation=spec, use_graphs=use_graphs)
    ex.warmup()
    cfg = EngineConfig(max_batch_size=max_batch, max_num_tokens=max_tokens, tokens_per_block=BS, num_blocks=blocks,
                       capacity=make_capacity_policy(capacity), chunking=make_chunk_policy(chunked, None),
                       graph_padding=pad, check_invariants=True,
                       speculation=make_draft_policy(proposer, k) if proposer else None)
    eng = Engine(cfg, ex)
    rs = [Request(i, 0.0, p, o, prompt_tokens=t) for i, (p, o, t) in enumerate(reqs)]
    run_wallclock(rs, [eng], make_router("round_robin"))
    out = {i: ex.tokens(i) for i in range(len(reqs))}
    for i, (p, o, _) in enumerate(reqs):
        assert rs[i].phase.name == "FINISHED"
        assert len(out[i]) == o, (i, len(out[i]), o)  # exact output lengths
    assert eng.kv.used == 0  # every block released (the engine checked the pool after every step)
    return out, eng, ex


# --------------------------------------------------------------------------------------
# (a) greedy speculative decoding is plain decoding
# --------------------------------------------------------------------------------------


@st.composite
def workloads(draw):
    n = draw(st.integers(1, 5))
    reqs = []
    for _ in range(n):
        p = draw(st.integers(1, 40))
        o = draw(st.integers(1, 14))
        toks = None
        if draw(st.booleans()):  # a repetitive prompt: n-gram lookup finds matches
            pat = draw(st.lists(st.integers(0, 255), min_size=1, max_size=4))
            toks = tuple((pat * p)[:p])
        reqs.append((p, o, toks))
    return reqs


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(workloads(), st.integers(1, 4), st.booleans(), st.integers(12, 64), st.booleans(), st.booleans(),
       st.sampled_from(sorted(DRAFTERS)))
def test_greedy_speculative_decoding_emits_the_plain_tokens(reqs, max_batch, chunked, max_tokens, graphs,
                                                            preempt, drafter):
    """For draft-model and n-gram proposers, k in {1, 3}, natural acceptance: token for
    token what plain decoding emits (and the same lengths; no KV leaked, every step's pool
    checked). ``preempt``: MAX_UTILIZATION over a small pool (pauses, recomputes, drafts
    dropped on a shortage)."""
    kw = dict(max_batch=max_batch, chunked=chunked, max_tokens=max(max_tokens, 48 if not chunked else 0),
              graphs=graphs)
    if preempt:
        kw.update(capacity="max_utilization", blocks=8 + max_batch)
    plain, _, _ = _run(reqs, **kw)
    for proposer in ("draft_model", "ngram"):
        for k in (1, 3):
            out, eng, ex = _run(reqs, proposer=proposer, k=k, drafter=drafter, **kw)
            assert out == plain, (proposer, k)
            assert ex.drafts_accepted <= ex.drafts_proposed
    # controlled acceptance of a drafter that is the target: whatever is accepted, the
    # drafts are the target's greedy tokens (partial acceptance, rollbacks, catch-ups)
    out, _, _ = _run(reqs, proposer="draft_model", k=3, drafter="copy", acceptance="controlled", alpha=(0.6,), **kw)
    assert out == plain


def test_every_path_of_verification_is_exercised():
    """The drafters and workloads of the property do what they are there for: a copy of the
    target accepts every draft, a noisy one some, an n-gram lookup on repetitive text some;
    decode-only verification runs through the piecewise runner (graph_sizes given), mixed
    iterations eagerly; the drafter steps through its graph runner."""
    reqs = [(30, 20, tuple([1, 2, 3] * 10)), (17, 25, None), (5, 12, None)]
    plain, _, _ = _run(reqs)
    seen = {}
    for proposer, drafter in (("draft_model", "copy"), ("draft_model", "noisy"), ("ngram", "noisy")):
        out, eng, ex = _run(reqs, proposer=proposer, k=3, drafter=drafter)
        assert out == plain
        seen[(proposer, drafter)] = ex.drafts_accepted / ex.drafts_proposed
        s = ex.stats()["speculation"]
        assert s["verify_graph_iterations"] > 0 and ex.eager_iterations > 0
        if proposer == "draft_model":
            assert s["drafter_graph_steps"] > 0 and s["drafter_steps"] >= s["iterations"]
    assert seen[("draft_model", "copy")] == 1.0
    assert 0.1 < seen[("draft_model", "noisy")] < 0.95
    assert seen[("ngram", "noisy")] > 0


def test_with_piecewise_graphs_and_swap_preemption():
    """Iterations with context chunks and drafts through the piecewise runner (its token
    count counts the drafts); swap preemption moves the drafter's KV too."""
    from servesim.policies.graph_padding import token_capture_sizes

    reqs = [(20 + 5 * i, 18, None) for i in range(5)]
    plain, _, _ = _run(reqs, max_batch=3)
    for proposer in ("draft_model", "ngram"):
        model = LlamaModel(TINY, W, dtype=torch.float32, device="cpu")
        pw = GraphPadding(token_capture_sizes(64))
        pad = GraphPadding(capture_sizes(3))
        spec = GpuSpeculation(proposer, 2, acceptance="natural",
                              drafter=DRAFTERS["noisy"]() if proposer == "draft_model" else None)
        ex = GpuExecutor(model, 14, BS, graph_sizes=pad.sizes, piecewise_sizes=pw.sizes, max_seq_len=256, seed=3,
                         speculation=spec)
        cfg = EngineConfig(max_batch_size=3, max_num_tokens=64, tokens_per_block=BS, num_blocks=14,
                           capacity=make_capacity_policy("max_utilization"), chunking=make_chunk_policy(True, None),
                           graph_padding=pad, piecewise_padding=pw, check_invariants=True, swap_blocks=40,
                           speculation=make_draft_policy(proposer, 2))
        eng = Engine(cfg, ex)
        run_wallclock([Request(i, 0.0, p, o) for i, (p, o, _) in enumerate(reqs)], [eng], make_router("round_robin"))
        assert {i: ex.tokens(i) for i in range(len(reqs))} == plain
        assert eng.num_swaps > 0 and ex.piecewise_iterations > 0 and ex.spec_iterations > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_speculative_graphs_match_eager():
    """On a GPU (fp32, the Triton kernels): the captured verification and drafter graphs
    give the tokens of the same runs without graphs, and greedy speculative decoding the
    tokens of plain decoding; controlled mode runs with the graphs captured."""
    reqs = [(30, 20, tuple([1, 2, 3] * 10)), (17, 25, None), (5, 12, None), (40, 9, None)]
    plain, _, _ = _run(reqs, device="cuda")
    for proposer in ("draft_model", "ngram"):
        eager, _, _ = _run(reqs, proposer=proposer, k=3, device="cuda", use_graphs=False)
        out, _, ex = _run(reqs, proposer=proposer, k=3, device="cuda")
        s = ex.stats()["speculation"]
        assert s["verify_graphs_captured"] and s["verify_graph_iterations"] > 0
        if proposer == "draft_model":
            assert s["drafter_graphs_captured"] and s["drafter_graph_steps"] > 0
        assert out == eager == plain, proposer
        _, _, ex = _run(reqs, proposer=proposer, k=3, device="cuda", acceptance="controlled", alpha=(0.7,))
        assert ex.drafts_accepted > 0


# --------------------------------------------------------------------------------------
# (b) controlled acceptance
# --------------------------------------------------------------------------------------


def test_controlled_acceptance_rate_is_alpha():
    """Each position accepted with probability alpha_i given the ones before it: measured
    per position from what the engine recorded."""
    alpha = (0.7, 0.5, 0.8)
    reqs = [(8 + i, 80, None) for i in range(16)]
    for proposer in ("draft_model", "ngram"):
        _, eng, ex = _run(reqs, proposer=proposer, k=3, acceptance="controlled", alpha=alpha, max_batch=6,
                          seed=1, drafter="small")
        P = np.sum([p for _, p, _ in eng.draft_positions], axis=0)
        A = np.sum([a for _, _, a in eng.draft_positions], axis=0)
        m = A / P  # marginal: alpha_1, alpha_1 alpha_2, ...
        assert P[0] > 500
        assert abs(m[0] - alpha[0]) < 0.06, m
        assert abs(m[1] / m[0] - alpha[1]) < 0.08, m
        assert abs(m[2] / m[1] - alpha[2]) < 0.1, m


def test_controlled_extremes_and_tokens():
    """alpha 0: every draft rejected, the target's own token emitted at the first position
    -- plain decoding; alpha 1 with a drafter that is the target: its drafts are the
    target's greedy tokens -- plain decoding again, k + 1 tokens a step."""
    reqs = [(12, 17, None), (30, 9, None), (3, 20, None)]
    plain, _, _ = _run(reqs)
    out, _, ex = _run(reqs, proposer="draft_model", k=3, acceptance="controlled", alpha=(0.0,), drafter="small")
    assert out == plain and ex.drafts_accepted == 0 and ex.drafts_proposed > 0
    out, _, ex = _run(reqs, proposer="draft_model", k=3, acceptance="controlled", alpha=(1.0,), drafter="copy")
    assert out == plain and ex.drafts_accepted == ex.drafts_proposed


def test_controlled_mode_emits_the_drafts_then_the_targets_token():
    """With alpha 1 every step emits its k drafts as proposed, then the target's token: an
    n-gram lookup over the tokens before the step reproduces each step's first k tokens."""
    prompt = (1, 2, 3) * 4 + (9,)
    k, n_out = 3, 13  # the context's token, then 3 steps of k + 1
    out, _, _ = _run([(len(prompt), n_out, prompt)], proposer="ngram", k=k, acceptance="controlled", alpha=(1.0,))
    toks = out[0]
    plain, _, _ = _run([(len(prompt), n_out, prompt)])
    assert toks[0] == plain[0][0]  # the context phase's token is the target's
    for start in range(1, n_out, k + 1):
        idx = NgramIndex()
        idx.sync(np.array(prompt), toks[:start])
        assert toks[start:start + k] == idx.propose(k), start


def test_gpu_controlled_run_accepts_what_the_simulator_accepts(tmp_path):
    """A GPU-backend run (on a CPU) in controlled mode and the simulator on the same config
    draw the same acceptances for the same schedule (one seed scheme), and the GPU run
    writes the per-position draft columns and the acceptance summary."""
    import pyarrow.parquet as pq

    from servesim.sim.cli import main

    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    (tmp_path / "small.json").write_text(json.dumps(SMALL))
    exp = tmp_path / "exp.yaml"
    exp.write_text("""\
name: spec
model: tiny.json
hardware: h100-sxm
seed: 7
kv_cache: {pool_tokens: 2048, tokens_per_block: 16}
workload:
  synthetic:
    num_requests: 8
    arrival: {kind: offline}
    prompt_len: {kind: uniform, low: 3, high: 40}
    output_len: {kind: uniform, low: 6, high: 30}
scheduler: {max_batch_size: 4, max_num_tokens: 256}
speculative: {proposer: draft_model, draft_model: small.json, max_draft_len: 3, acceptance: [0.8, 0.6]}
output: {plots: false, timeline: false}
variants:
  - name: draft
  - name: ngram
    speculative: {proposer: ngram, draft_model: null}
  - name: natural
    speculative: {gpu_acceptance: natural}
""")
    assert main(["run", str(exp), "--backend", "gpu", "--out", str(tmp_path / "gpu")]) == 0
    assert main(["run", str(exp), "--out", str(tmp_path / "sim")]) == 0
    for v in ("draft", "ngram", "natural"):
        g = pq.read_table(tmp_path / "gpu" / v / "iterations.parquet")
        prop = g.column("draft_proposed_by_position").to_pylist()
        acc = g.column("draft_accepted_by_position").to_pylist()
        assert sum(map(len, prop)) > 0
        assert np.all(np.sum([p for p in prop if p], axis=0) >= np.sum([a for a in acc if a], axis=0))
        sg = json.loads((tmp_path / "gpu" / v / "summary.json").read_text())
        assert sg["backend"] == "gpu" and sg["num_finished"] == 8
        assert sg["spec_acceptance_rate"] is not None
        if v != "natural":
            s = pq.read_table(tmp_path / "sim" / v / "iterations.parquet")
            for c in ("draft_tokens_proposed", "draft_tokens_accepted", "draft_accepted_by_position",
                      "num_gen_requests", "ctx_tokens"):
                assert g.column(c).to_pylist() == s.column(c).to_pylist(), (v, c)
            assert sg["spec_acceptance_rate"] == json.loads((tmp_path / "sim" / v / "summary.json")
                                                            .read_text())["spec_acceptance_rate"]
    # natural acceptance of a random drafter: next to nothing accepted, the lengths still exact
    r = pq.read_table(tmp_path / "gpu" / "natural" / "requests.parquet").to_pandas()
    assert (r["status"] == "finished").all()


def test_gpu_backend_refuses_heads():
    from servesim.gpu_backend.runner import simulate_gpu
    from servesim.sim.config import RunConfig
    from servesim.sim.runner import resolve

    cfg = RunConfig.model_validate({
        "model": "llama-3.2-1b", "workload": {"synthetic": {"num_requests": 2, "prompt_len": 8, "output_len": 4,
                                                          "arrival": {"kind": "offline"}}},
        "speculative": {"proposer": "medusa", "max_draft_len": 2}, "kv_cache": {"pool_tokens": 1024}})
    with pytest.raises(ConfigError, match="speculative.proposer"):
        simulate_gpu(resolve(cfg, REPO))
    with pytest.raises(ValueError, match="overlap"):
        GpuExecutor(LlamaModel(TINY, W, dtype=torch.float32, device="cpu"), 8, BS, overlap=True,
                    speculation=GpuSpeculation("ngram", 2))


# --------------------------------------------------------------------------------------
# (c) the rejection rule keeps the target's distribution
# --------------------------------------------------------------------------------------


def _chain(seed: int, V: int, sharp: float) -> torch.Tensor:
    """A random Markov chain over V tokens: rows P[prev] (a distribution over the next)."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(V, V, generator=g, dtype=torch.float64), dim=1).float()


def _speculate(Pt: torch.Tensor, Pd: torch.Tensor | None, k: int, n_seq: int, length: int, seed: int,
               ngram_next=None) -> torch.Tensor:
    """``n_seq`` sequences of ``length`` tokens after token 0 from the target chain ``Pt``,
    generated by speculative steps (``k`` drafts from chain ``Pd``, or deterministic drafts
    ``ngram_next[prev]`` with q one-hot) verified by `rejection_verify`."""
    g = torch.Generator().manual_seed(seed)
    V = Pt.shape[0]
    seqs = [[] for _ in range(n_seq)]
    prev = torch.zeros(n_seq, dtype=torch.long)
    rows = torch.arange(n_seq)
    while min(len(s) for s in seqs) < length:
        drafts = torch.empty(n_seq, k, dtype=torch.long)
        q = None if Pd is None else torch.empty(n_seq, k, V)
        x = prev
        for j in range(k):
            if Pd is None:
                x = ngram_next[x]
            else:
                q[:, j] = Pd[x]
                x = torch.multinomial(Pd[x], 1, generator=g).squeeze(1)
            drafts[:, j] = x
        ctx = torch.cat([prev[:, None], drafts], dim=1)  # the target's row j follows token ctx[:, j]
        p = Pt[ctx]  # [n, k+1, V]
        ks = torch.full((n_seq,), k, dtype=torch.long)
        a, emitted = rejection_verify(p, q, drafts, ks, g)
        em = emitted.tolist()
        for i, (s, ai) in enumerate(zip(seqs, a.tolist())):
            s.extend(em[i][:ai + 1])
        prev = emitted[rows, a]
    return torch.tensor([s[:length] for s in seqs])


def _chi2(seqs: torch.Tensor, Pt: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of the sequences' first three tokens against the chain's law."""
    V = Pt.shape[0]
    x1, x2, x3 = seqs[:, 0], seqs[:, 1], seqs[:, 2]
    obs = torch.bincount((x1 * V + x2) * V + x3, minlength=V ** 3).double()
    p = (Pt[0][:, None, None] * Pt[:, :, None] * Pt[None, :, :]).double().reshape(-1)
    exp = p * seqs.shape[0]
    keep = exp > 5
    return float((((obs - exp) ** 2) / exp)[keep].sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("k", [1, 3])
def test_rejection_sampling_keeps_the_target_distribution(k):
    """Tokens of speculative steps (drafts from another chain, or deterministic n-gram-like
    drafts with q one-hot) have the target chain's joint law of three tokens; drafts taken
    as they come (always accepted) do not -- the test has power. Fixed seeds: the statistic
    is a fixed number, far inside (or outside) the bound."""
    V = 4
    Pt, Pd = _chain(1, V, 1.5), _chain(2, V, 1.5)
    n = 12000
    bound = lambda df: df + 6 * np.sqrt(2 * df)  # noqa: E731  mean + 6 sd of chi2(df)
    stat, df = _chi2(_speculate(Pt, Pd, k, n, 3, seed=10 + k), Pt)
    assert stat < bound(df), (stat, df)
    nxt = torch.tensor([1, 2, 3, 0])
    stat, df = _chi2(_speculate(Pt, None, k, n, 3, seed=20 + k, ngram_next=nxt), Pt)
    assert stat < bound(df), (stat, df)
    # power: the drafter's own chain is far from the target's
    drafts_only = _speculate(Pd, Pd, k, n, 3, seed=30 + k)
    stat, df = _chi2(drafts_only, Pt)
    assert stat > 10 * bound(df)


def test_rejection_verify_edge_cases():
    V = 5
    p = torch.zeros(2, 3, V)
    p[:, :, 1] = 1.0  # the target is sure of token 1 everywhere
    drafts = torch.tensor([[1, 1], [1, 3]])
    ks = torch.tensor([2, 2])
    a, em = rejection_verify(p, None, drafts, ks, torch.Generator().manual_seed(0))
    assert a.tolist() == [2, 1] and em[0].tolist() == [1, 1, 1] and em[1, :2].tolist() == [1, 1]
    # fewer drafts than the row's width: positions past k are never accepted
    a, em = rejection_verify(p, None, drafts, torch.tensor([1, 0]), torch.Generator().manual_seed(0))
    assert a.tolist() == [1, 0] and em[0, 1] == 1 and em[1, 0] == 1
    # greedy
    t = torch.tensor([[4, 2, 0], [4, 2, 0]])
    a, em = greedy_verify(t, torch.tensor([[4, 2], [4, 1]]), torch.tensor([2, 2]))
    assert a.tolist() == [2, 1] and em is t
    probs = sampling_probs(torch.tensor([[2.0, 1.0, 0.0, -5.0]]), 1.0, 0.7)
    assert probs[0, 2:].sum() == 0 and abs(float(probs.sum()) - 1) < 1e-6


def test_sampling_with_temperature_end_to_end():
    """Natural acceptance at temperature 0.8 (rejection rule with the drafter's
    distributions; n-gram with one-hot q): exact lengths, pool intact, and the same run
    twice gives the same tokens (seeded)."""
    reqs = [(10, 15, None), (26, 11, (7, 8) * 13), (4, 20, None)]
    for proposer in ("draft_model", "ngram"):
        a, _, ex = _run(reqs, proposer=proposer, k=3, temperature=0.8, drafter="noisy")
        b, _, _ = _run(reqs, proposer=proposer, k=3, temperature=0.8, drafter="noisy")
        assert a == b and ex.drafts_proposed > 0


def test_ngram_index():
    idx = NgramIndex((3, 2, 1))
    idx.sync(np.array([5, 6, 7, 8, 5, 6, 7]), [])
    assert idx.propose(3) == [8, 5, 6]  # after the earlier (5, 6, 7)
    idx.sync(np.array([5, 6, 7, 8, 5, 6, 7]), [9])
    assert idx.propose(2) == [9, 9]  # (6, 7, 9): no 3- or 2-gram match; 1-gram 9 unseen -> last token
    idx = NgramIndex((2, 1))
    idx.sync(np.array([1, 2, 1, 2]), [])
    assert idx.propose(4) == [1, 2, 2, 2]  # (1, 2) last seen at 0: follows 1, 2, then padded
    assert NgramIndex().propose(2) == [0, 0]


# --------------------------------------------------------------------------------------
# the device benchmark's CPU smoke
# --------------------------------------------------------------------------------------


def test_gpu_spec_decoding_benchmark_smoke(tmp_path):
    p = subprocess.run([sys.executable, "benchmarks/gpu_spec_decoding.py", "--smoke", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    page = (tmp_path / "gpu_spec_decoding.md").read_text()
    assert "| proposer | alpha | k | batch |" in page
    rows = [line for line in page.splitlines() if line.startswith("| draft_model")]
    assert len(rows) == 2 * 2 * 2  # the smoke grid: 2 alphas x 2 ks x 2 batches
    csv = (tmp_path / "gpu_spec_decoding.csv").read_text().splitlines()
    assert len(csv) == 1 + 8 + 2  # header, speculative cases, plain baselines
    assert "no" not in {r.split("|")[-2].strip() for r in rows}  # the replays accepted what the GPU did
    # three files (a device call brings back few): the runs packed, each a run folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_spec_decoding.csv", "gpu_spec_decoding.md",
                                                         "gpu_spec_decoding_runs.tar.gz"]
    import tarfile

    with tarfile.open(tmp_path / "gpu_spec_decoding_runs.tar.gz") as tar:
        names = tar.getnames()
    assert sum(n.endswith("/iterations.parquet") for n in names) == 10


def test_gpu_spec_split_benchmark_smoke(tmp_path):
    """benchmarks/gpu_spec_split.py on a CPU (tiny models, pieces run eagerly): every part
    checked against the eager forward and timed both ways, one row each."""
    p = subprocess.run([sys.executable, "benchmarks/gpu_spec_split.py", "--smoke", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    page = (tmp_path / "gpu_spec_split.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| drafter") or line.startswith("| target")]
    assert len(rows) == 2 * (3 + 2)  # 2 batches x (drafter step, its back-to-back steps, plain step; 2 verifications)
    csv = (tmp_path / "gpu_spec_split.csv").read_text().splitlines()
    assert len(csv) == 1 + len(rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_spec_split.csv", "gpu_spec_split.md"]
