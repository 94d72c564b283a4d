"""Speculative decoding in the engine and the simulator (S5): draft tokens counted in the
token budget, their KV reserved and rolled back, output lengths exact, and the special
cases that must reduce to plain decoding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servesim.policies.speculative import fit_draft_lens, make_draft_policy
from servesim.sim.speculation import AcceptanceModel
from servesim.sim.types import Phase

from engine_harness import run_engine
from test_engine import _check_run, configs, workloads


def _no_overlap(cfg):
    return {**cfg, "overlap": False}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(max_n=20), configs(), st.integers(1, 6), st.floats(0, 1), st.booleans())
def test_invariants_with_drafts(rows, cfg, k, alpha, stepwise):
    """Every invariant of plain decoding holds with drafts: token budget (drafts counted),
    batch size, no KV leak, exact output lengths, every request finishes."""
    cfg = _no_overlap(cfg)
    reqs, engines, it, req = run_engine(rows, stepwise=stepwise, spec=(k, alpha, 1e-5), **cfg)
    _check_run(rows, cfg, reqs, engines, it, req, strict_times=False)
    prop = it.column("draft_tokens_proposed").to_numpy()
    acc = it.column("draft_tokens_accepted").to_numpy()
    assert np.all(acc <= prop) and np.all(acc >= 0)
    n_gen = it.column("num_gen_requests").to_numpy()
    assert np.all(it.column("gen_tokens").to_numpy() == n_gen + prop)
    assert np.all(prop <= k * n_gen)


def test_zero_acceptance_is_plain_decoding_plus_verification():
    rows = [(0.001 * i, 10 + 3 * i, 12 + i) for i in range(12)]
    plain = run_engine(rows, max_batch=8, max_tokens=128, blocks=400, stepwise=True)
    spec = run_engine(rows, max_batch=8, max_tokens=128, blocks=400, stepwise=True, spec=(3, 0.0, 0.0))
    pa_, sa = plain[2], spec[2]
    assert pa_.num_rows == sa.num_rows  # one token a step: as many steps
    for c in ("num_ctx_requests", "num_gen_requests", "ctx_tokens"):
        assert np.array_equal(pa_[c].to_numpy(), sa[c].to_numpy()), c
    assert sa["draft_tokens_accepted"].to_numpy().sum() == 0 and sa["draft_tokens_proposed"].to_numpy().sum() > 0
    # every iteration costs at least the plain one: verification is not free
    assert np.all(sa["duration_s"].to_numpy() >= pa_["duration_s"].to_numpy() - 1e-15)
    for a, b in zip(plain[0], spec[0]):
        assert a.output_len == b.output_len and b.phase == Phase.FINISHED


def test_k_zero_is_plain_decoding_exactly():
    assert make_draft_policy("draft_model", 0) is None  # k = 0: speculation off
    rows = [(0.0, 20, 30)] * 5
    a = run_engine(rows, spec=None)
    b = run_engine(rows, spec=(0, 0.9, 0.0))
    assert a[2].equals(b[2]) and a[3].table.to_pandas().equals(b[3].table.to_pandas())


def test_full_acceptance_emits_k_plus_one_a_step():
    rows = [(0.0, 8, 41)]  # one request: the first token from the context, then 40 by decoding
    reqs, engines, it, req = run_engine(rows, max_tokens=64, blocks=100, spec=(4, 1.0, 0.0), graphs=False)
    gen_steps = int((it["num_gen_requests"].to_numpy() > 0).sum())
    assert gen_steps == 8  # 40 tokens, 5 a step
    times = req.token_times
    assert len(times) == 41 and np.all(np.diff(times) >= 0)
    assert len(np.unique(times)) == 1 + gen_steps  # the tokens of one step share its end time


def test_acceptance_model_is_sequential_and_seeded():
    m = AcceptanceModel([1.0, 0.0, 1.0], seed=3)
    assert m.accepted([1, 2], [3, 3]) == [1, 1]  # stops at the first rejection
    a = AcceptanceModel([0.6], seed=7).accepted(list(range(2000)), [4] * 2000)
    b = AcceptanceModel([0.6], seed=7).accepted(list(range(2000)), [4] * 2000)
    assert a == b
    # E[accepted] = sum_i 0.6^i, i = 1..4
    assert abs(np.mean(a) - sum(0.6 ** i for i in range(1, 5))) < 0.08
    with pytest.raises(ValueError):
        AcceptanceModel([1.2])


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.integers(0, 6), max_size=12), min_size=1, max_size=30),
       st.one_of(st.lists(st.floats(0, 1), min_size=1, max_size=5), st.none()),
       st.integers(0, 2 ** 31), st.integers(1, 64))
def test_acceptance_draws_are_the_generators_stream(steps, alpha, seed, block):
    """Drawing uniforms ahead in blocks (of any size) changes no outcome: every step's
    accepted counts are those of one ``rng.random((n, max(ks)))`` draw per drafting step in
    order, the leading successes of ``u < alpha_i`` (or the request's Beta draw)."""
    beta = None if alpha is not None else (2.0, 3.0)
    m = AcceptanceModel(alpha, beta, seed=seed)
    m._BLOCK = block
    ref = np.random.default_rng([seed, 0x5BEC])
    for j, ks in enumerate(steps):
        rids = [(j * 7 + i) % 5 for i in range(len(ks))]  # requests recur across steps
        got = m.accepted(rids, ks)
        if not ks or max(ks) == 0:
            assert got == [0] * len(ks)
            continue
        kmax = max(ks)
        u = ref.random((len(ks), kmax))
        if alpha is not None:
            a = np.asarray(alpha + [alpha[-1]] * kmax)[:kmax]
            ok = u < a
        else:
            ok = u < np.array([np.random.default_rng([r, 0xBE7A]).beta(2.0, 3.0) for r in rids])[:, None]
        ok &= np.arange(kmax) < np.asarray(ks)[:, None]
        assert got == np.cumprod(ok, axis=1).sum(axis=1).tolist()


@given(st.lists(st.integers(0, 8), max_size=20), st.integers(0, 60))
def test_fit_draft_lens(ks, budget):
    out = fit_draft_lens(ks, budget)
    assert len(out) == len(ks) and all(0 <= o <= k for o, k in zip(out, ks))
    assert sum(out) <= max(budget, 0) or sum(out) == sum(ks) <= budget
    assert sum(out) == min(sum(ks), max(budget, 0))


BASE = """name: s
model: llama-3.1-8b
hardware: h200-sxm
workload: {synthetic: {num_requests: 6, prompt_len: 64, output_len: 16, arrival: {kind: offline}}}
scheduler: {max_batch_size: 4, max_num_tokens: 256}
output: {plots: false, timeline: false}
"""


def _sim(tmp_path, extra: str, *cmd):
    import subprocess
    import sys

    f = tmp_path / "s.yaml"
    f.write_text(BASE + extra)
    return subprocess.run([sys.executable, "-m", "servesim.sim.cli", *cmd, str(f), *(
        ["--out", str(tmp_path / "out")] if cmd[0] == "run" else [])], capture_output=True, text=True)


@pytest.mark.parametrize("extra, key, words", [
    ("speculative: {draft_model: llama-2-7b}\n", "speculative.draft_model", "vocabulary"),
    ("speculative: {proposer: ngram, max_draft_len: 300}\n", "speculative", "max_num_tokens"),
    ("speculative: {proposer: ngram, max_draft_len: -1}\n", "speculative.max_draft_len", "greater than"),
    ("speculative: {proposer: ngram, acceptance: 1.5}\n", "speculative", "[0, 1]"),
    ("speculative: {proposer: ngram}\nruntime: {overlap_scheduler: true}\n", "speculative", "overlap"),
    ("speculative: {proposer: draft_model}\n", "speculative", "needs draft_model"),
    ("speculative: {proposer: ngram, acceptance: {run: nowhere}}\n", "speculative.acceptance", "nowhere"),
])
def test_bad_speculative_settings_are_clear_errors(tmp_path, extra, key, words):
    r = _sim(tmp_path, extra, "run")
    assert r.returncode == 2, r.stderr
    assert key in r.stderr and words in r.stderr and "Traceback" not in r.stderr


def test_acceptance_measured_by_a_run_is_replayed(tmp_path):
    """A run's per-position acceptance, read back as the acceptance of another run: a
    table of the wrong shape (a run without drafts) is refused by name."""
    r = _sim(tmp_path, "speculative: {proposer: ngram, max_draft_len: 3, acceptance: [0.9, 0.6, 0.3]}\n", "run")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "out" / "base"
    import json

    s = json.loads((run / "summary.json").read_text())
    assert 0 < s["spec_acceptance_rate"] < 1 and len(s["spec_acceptance_by_position"]) == 3
    from servesim.sim.schemas import read_run_table
    from servesim.sim.speculation import alpha_from_run

    alpha = alpha_from_run(read_run_table(run / "iterations.parquet", "iterations"), 3)
    assert len(alpha) == 3 and alpha[0] > alpha[2]
    plain = tmp_path / "plain"
    r2 = _sim(tmp_path, "", "run")
    assert r2.returncode == 0
    (tmp_path / "out").rename(plain)
    r3 = _sim(tmp_path, f"speculative: {{proposer: ngram, acceptance: {{run: {plain / 'base'}}}}}\n", "run")
    assert r3.returncode == 2 and "draft_proposed_by_position" in r3.stderr
