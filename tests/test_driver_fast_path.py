"""One replica is driven without SimPy (sim/driver.py): its delays advance the clock as
SimPy timeouts would. Same records, same token times, same end time as the SimPy
process it replaces, on random workloads and configurations."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_harness import assert_same_tables, run_engine
from test_engine import configs, workloads


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(max_n=40), configs(), st.booleans())
def test_one_replica_without_simpy_is_the_simpy_run(rows, cfg, spec):
    if spec:
        cfg = {**cfg, "spec": (2, 0.6, 1e-4)}
    a = run_engine(rows, **cfg)
    b = run_engine(rows, through_simpy=True, **cfg)
    assert_same_tables(a, b)
    for ra, rb in zip(sorted(a[0], key=lambda r: r.request_id), sorted(b[0], key=lambda r: r.request_id)):
        assert (ra.phase, ra.first_scheduled_s, ra.preemptions) == (rb.phase, rb.first_scheduled_s, rb.preemptions)


def test_simulate_pauses_the_garbage_collector_and_restores_it(tmp_path, monkeypatch):
    """runner.simulate runs with the cyclic collector off (sim/driver.py collector_paused)
    and leaves it as it found it, also when the run fails."""
    import gc

    import pytest

    from servesim.sim import runner, stream
    from servesim.sim.config import load_experiment

    exp_file = tmp_path / "e.yaml"
    exp_file.write_text("name: e\nmodel: llama-3.2-1b\nhardware: h100-sxm\n"
                        "workload: {synthetic: {num_requests: 300, prompt_len: 64, output_len: 32, "
                        "arrival: {kind: offline}}}\n")
    setup = runner.resolve_experiment(load_experiment(exp_file, []), exp_file)[0]
    seen = []
    real = stream.stream_run

    def spy(*a, **k):
        seen.append(gc.isenabled())
        return real(*a, **k)

    monkeypatch.setattr(stream, "stream_run", spy)
    was = gc.isenabled()
    try:
        for enabled in (True, False):
            gc.enable() if enabled else gc.disable()
            result = runner.simulate(setup, out_dir=tmp_path / f"run{enabled}")
            assert result.summary["num_finished"] == 300
            assert seen.pop() is False and gc.isenabled() == enabled
        gc.enable()
        (tmp_path / "file").write_text("")
        with pytest.raises(OSError):  # its output folder cannot be made
            runner.simulate(setup, out_dir=tmp_path / "file" / "x")
        assert seen == [False] and gc.isenabled()
    finally:
        gc.enable() if was else gc.disable()
