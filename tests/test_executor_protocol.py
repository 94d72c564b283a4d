"""The executor protocol (sim/types.py `Executor`) is the engine's only source of time:
the engine never probes an executor for capabilities or calls a cost model, and what an
executor declares is what the engine does."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from servesim.sim.types import DecodePrice, StepResult

import engine_harness as h

REPO = Path(__file__).resolve().parents[1]


def test_engine_probes_nothing_and_prices_nothing():
    src = (REPO / "sim" / "engine.py").read_text()
    tree = ast.parse(src)
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not calls & {"getattr", "hasattr"}, "capability probe in the engine"
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not attrs & {"cost_model", "decode_affine", "price", "cost"}, "the engine reaches for a cost model"
    drv = ast.parse((REPO / "gpu_backend" / "driver.py").read_text())
    assert not {n.func.id for n in ast.walk(drv) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)} \
        & {"getattr", "hasattr"}
    assert "rows" not in {n.attr for n in ast.walk(drv) if isinstance(n, ast.Attribute) and
                          isinstance(n.ctx, ast.Store)}


class CountingExecutor(h.SimExecutor):
    """A simulated executor that counts what the engine asked of it."""

    def __init__(self, cost, plan: bool):
        super().__init__(cost)
        self.plan = plan
        self.executed = 0
        self.planned = 0

    def execute(self, batch):
        self.executed += 1
        return super().execute(batch)

    def plan_decode_stretch(self, n_decode, padded_decode):
        self.planned += 1
        return super().plan_decode_stretch(n_decode, padded_decode) if self.plan else None


def _run(ex):
    rows = [(0.0, 10 + i, 40 + 3 * i) for i in range(6)]
    reqs = [h.Request(i, a, p, o) for i, (a, p, o) in enumerate(rows)]
    cfg = h.EngineConfig(max_batch_size=8, max_num_tokens=64, tokens_per_block=4, num_blocks=200,
                         capacity=h.make_capacity_policy("guaranteed_no_evict"),
                         chunking=h.make_chunk_policy(False, None), graph_padding=None, check_invariants=True)
    e = h.Engine(cfg, ex)
    h.run_simulation(reqs, [e], h.make_router("round_robin"))
    its = [h.iteration_arrays(e)]
    return e, h.iterations_table(its), h.request_arrays(reqs, its)


def test_a_declared_closed_form_is_used_and_agrees_with_stepping():
    closed = CountingExecutor(h.AffineCost(), plan=True)
    stepped = CountingExecutor(h.AffineCost(), plan=False)
    ec, itc, rc = _run(closed)
    es, its, rs = _run(stepped)
    assert ec.stretches and not es.stretches
    assert closed.executed < stepped.executed == its.num_rows  # stretches were not executed one by one
    assert itc.num_rows == its.num_rows
    for c in ("num_gen_requests", "gen_tokens", "kv_blocks_used", "decode_kv_tokens"):
        assert np.array_equal(itc[c].to_numpy(), its[c].to_numpy()), c
    np.testing.assert_allclose(itc["duration_s"].to_numpy(), its["duration_s"].to_numpy(), rtol=1e-9)
    np.testing.assert_allclose(rc.token_times, rs.token_times, rtol=1e-9)


class LateEnds(h.SimExecutor):
    """Reports every iteration's end only at finish() (as an overlapped GPU does)."""

    def __init__(self, cost):
        super().__init__(cost)
        self.ends = {}
        self.prices = {}

    def plan_decode_stretch(self, n_decode, padded_decode):
        return None

    def execute(self, batch):
        r = super().execute(batch)
        self.ends[batch.iteration] = self.prices[batch.iteration] = r.duration_s
        return r

    def iteration_duration(self, start_s, result: StepResult) -> float:
        return 0.0  # unknown yet

    def finish(self):
        out, self.ends = {k: 10.0 * k + v for k, v in self.ends.items()}, {}
        return out


def test_ends_known_late_are_recorded_by_the_engine():
    ex = LateEnds(h.AffineCost())
    e, it, _ = _run(ex)
    start = it["start_s"].to_numpy()
    dur = it["duration_s"].to_numpy()
    k = it["iteration"].to_numpy()
    price = np.array([ex.prices[i] for i in k])
    assert (dur > 0).all()  # iteration_duration said 0: every end came from finish()
    np.testing.assert_allclose(dur, np.maximum(10.0 * k + price - start, 0.0), rtol=1e-12)


def test_decode_price_is_named_and_its_split_line_defaults_to_none():
    p = DecodePrice(1e-3, 2e-7)
    fixed, per_kv, per_longest, split_per_kv = p
    assert (fixed, per_kv, per_longest, split_per_kv) == (p.fixed_s, p.per_kv_token_s, 0.0, 0.0)
    assert DecodePrice(1e-3, 2e-7, 5e-7, 1e-8)[2:] == (5e-7, 1e-8)
