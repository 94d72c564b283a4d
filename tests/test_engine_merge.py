"""Decode stretches run through request finishes (and follow a general iteration) in one
engine step while nothing can be admitted (sim/engine.py `_stretches_through_finishes`):
the same records, token times and end state as one iteration or stretch a step, on random
workloads and configurations (prefix caching, several replicas and speculative decoding
included); and it does save steps. The plans the engine keeps per
batch size are the executor's, asked each time."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servesim.sim.engine import Engine

from engine_harness import assert_same_tables, run_engine
from test_engine import configs, workloads
from test_prefix_cache import shared_prefix_workload


def _same_runs(a, b):
    assert_same_tables(a, b)
    for ea, eb in zip(a[1], b[1]):  # the closed-form stretches themselves, one record each
        assert ea.stretches == eb.stretches and ea.stretch_hist == eb.stretch_hist
        assert ea.rows == eb.rows and ea.g == eb.g and ea.kv.used == eb.kv.used
    for ra, rb in zip(sorted(a[0], key=lambda r: r.request_id), sorted(b[0], key=lambda r: r.request_id)):
        assert (ra.phase, ra.first_scheduled_s, ra.preemptions, ra.spans) == (
            rb.phase, rb.first_scheduled_s, rb.preemptions, rb.spans)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(max_n=40), configs(), st.sampled_from([1, 2]), st.booleans(), st.booleans())
def test_stretches_through_finishes_are_the_stepped_run(rows, cfg, replicas, simpy, spec):
    if spec:  # (drafted iterations are stepped one by one: nothing merges)
        cfg = {**cfg, "spec": (2, 0.6, 1e-4)}
    a = run_engine(rows, replicas=replicas, through_simpy=simpy, **cfg)
    b = run_engine(rows, replicas=replicas, through_simpy=simpy, merge_stretches=False, **cfg)
    _same_runs(a, b)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(max_n=40), configs(), st.booleans())
def test_kept_stretch_plans_are_the_executors_every_time(rows, cfg, merge):
    """The engine's plan per batch size (Executor.fixed_stretch_plans) against asking the
    executor for every stretch: the same runs."""
    a = run_engine(rows, merge_stretches=merge, **cfg)
    b = run_engine(rows, merge_stretches=merge, fixed_plans=False, **cfg)
    assert a[1][0]._plans is not None and b[1][0]._plans is None
    _same_runs(a, b)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.sampled_from(["guaranteed_no_evict", "max_utilization"]), st.integers(12, 80),
       st.sampled_from([0, 8]))
def test_stretches_through_finishes_with_prefix_caching(data, capacity, blocks, host_blocks):
    rows, keys, contents = data.draw(shared_prefix_workload(4))
    cfg = dict(capacity=capacity, max_batch=6, max_tokens=128, tpb=4, blocks=blocks, graphs=False,
               reuse=True, host_blocks=host_blocks, keys=keys, contents=contents)
    _same_runs(run_engine(rows, **cfg), run_engine(rows, merge_stretches=False, **cfg))


def test_merging_saves_steps(monkeypatch):
    """Offline: every request waits from the start, so the batch drains through finishes
    with nothing left to admit -- one step instead of one per distinct finish."""
    steps = []
    real = Engine.step

    def counted(self, now, horizon=float("inf")):
        steps.append(self.merge_stretches)
        return real(self, now, horizon)

    monkeypatch.setattr(Engine, "step", counted)
    rows = [(0.0, 16, o) for o in range(1, 9)]  # 8 requests, 8 different finishes
    a = run_engine(rows, max_batch=8, max_tokens=256, blocks=256)
    b = run_engine(rows, max_batch=8, max_tokens=256, blocks=256, merge_stretches=False)
    _same_runs(a, b)
    merged, stepped = steps.count(True), steps.count(False)
    assert len(a[1][0].stretches) == len(b[1][0].stretches) >= 7
    assert merged < stepped and merged <= stepped - 6, (merged, stepped)
