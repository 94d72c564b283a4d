"""`sim check-policy`: every built-in passes; the broken example policies are caught, shrunk,
and the reproducer it writes reproduces the violation (sim/check_policy.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from servesim.policies.loading import FAMILIES, builtin_names
from servesim.sim.check_policy import check_policy, reproduce
from servesim.sim.cli import main

EXAMPLES = Path(__file__).parents[1] / "examples" / "policies"


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "draft"] + ["draft"])
def test_every_builtin_passes(family):
    for name in builtin_names(family):
        args = {"chunk_size": 64} if (family, name) == ("chunking", "fixed") else None
        rep = check_policy(name, family, args, examples=4, seed=1)
        assert rep.violation is None, (name, rep.violation)
        assert rep.examples == 4


def test_example_policies_pass():
    sjf = check_policy("sjf.py:ShortestJobFirst", "order", {"max_overtakes": 8}, base_dir=EXAMPLES, examples=8)
    assert sjf.violation is None and sjf.max_overtakes_seen <= 16
    lfu = check_policy("lfu.py:LfuPinned", None, {"pin_tenant": "t0", "pin_blocks": 2}, base_dir=EXAMPLES, examples=6)
    assert lfu.family == "eviction" and lfu.violation is None


@pytest.fixture
def broken(tmp_path, monkeypatch):
    shutil.copy(EXAMPLES / "broken.py", tmp_path / "broken.py")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_cli_catches_the_pool_overcommitting_policy(broken, capsys):
    assert main(["check-policy", "broken:OverCommit", "--examples", "30"]) == 1
    out = capsys.readouterr().out
    with capsys.disabled():  # the shrunk reproducer, in the test log (.ci/run)
        print("\n" + out)
    assert "violation" in out and "engine_invariants" in out and "reserved" in out
    yaml_file = broken / "check-policy-failure.yaml"
    text = yaml_file.read_text()
    assert "capacity: broken.py:OverCommit" in text and text in out  # printed whole
    assert (broken / "check-policy-failure.csv").is_file()
    # shrunk: a single short request is enough
    assert sum(1 for _ in (broken / "check-policy-failure.csv").open()) <= 3
    # the file reproduces it, and runs as an experiment
    assert main(["check-policy", "--reproduce", str(yaml_file)]) == 1
    assert "engine_invariants" in capsys.readouterr().out


def test_cli_catches_the_starving_policy(broken, capsys):
    out_file = broken / "starve.yaml"
    assert main(["check-policy", "broken:Lifo", "--examples", "60", "--out", str(out_file)]) == 1
    out = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + out)
    assert "no_starvation" in out and "overtaken by" in out
    [(name, v)] = reproduce(out_file)
    assert v is not None and v.invariant == "no_starvation"
    # the same workload with FCFS keeps every invariant
    fcfs = broken / "fcfs.yaml"
    fcfs.write_text(out_file.read_text().replace("order: broken.py:Lifo", "order: fcfs"))
    [(_, v)] = reproduce(fcfs)
    assert v is None


def test_cli_passes_and_refuses(broken, capsys):
    assert main(["check-policy", "fcfs", "--examples", "3"]) == 0
    assert "every invariant held" in capsys.readouterr().out
    (broken / "half.py").write_text("class NoPick:\n    name = 'x'\n    def pik(self, waiting):\n        return 0\n")
    assert main(["check-policy", "half:NoPick", "--family", "order"]) == 2
    err = capsys.readouterr().err
    assert "missing pick" in err and "scheduler.order" in err
    assert main(["check-policy", "nosuch_module_q:X", "--family", "order"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["check-policy", "broken:Lifo", "--args", "[1]"]) == 2
    assert not (broken / "check-policy-failure.yaml").exists()


def test_onboarding_into_a_full_host_tier():
    """Found by check-policy (a LIFO order with swap preemption and a host tier): acquiring
    host blocks while the GPU pool must evict into a full host tier raised 'host tier full
    of pinned blocks'."""
    from servesim.sim.kv_cache import BlockManager
    from servesim.sim.prefix_cache import PrefixCache
    from servesim.sim.types import Request

    kv = BlockManager(2, 1)
    cache = PrefixCache(kv, host_blocks=1, offload_min_priority=0)
    kv.cache = cache
    r = Request(0, 0.0, 2, 1)
    kv.grow(2)
    kv.sync(r, 2)
    nodes, _ = cache.insert_many((10, 11), r.blocks, 0, 2)
    r.nodes, r.node_blocks = nodes, [0, 1]
    kv.release(r, 2)  # both cached
    kv.grow(1)  # evicts one to the host tier (full now)
    kv.used -= 1
    kv.free_ids.append(kv.free_ids.pop())
    host = [n for n in cache.nodes.values() if n.on_host]
    assert len(host) == 1 and cache.host_used == 1
    kv.grow(1)  # the GPU holds one cached block and one used: no free block
    cache.acquire(host, 0.0)  # onboarding evicts the other cached block to the (full) host tier
    assert not host[0].on_host and host[0].block_id >= 0
    cache.check()
