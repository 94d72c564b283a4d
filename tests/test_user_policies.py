"""Policies users write: loaded from the experiment file through the same path as every
built-in, recorded in config.yaml, clear errors, the same class on both backends, and the
shipped examples (examples/policies/)."""

from __future__ import annotations

import importlib
import re
import sys
import textwrap
import types
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servesim.policies.eviction import CachedBlockView, PrioritizedLru
from servesim.policies.loading import FAMILIES, load_policy
from servesim.sim.check_policy import _Base, _ipc_bytes, example_strategy
from servesim.sim.cli import main
from servesim.sim.config import load_experiment
from servesim.sim.runner import resolve, simulate

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples" / "policies"

EXP = """\
name: mine
model: llama-3.2-1b
hardware: h100-sxm
output: {{plots: false, timeline: false}}
workload:
  synthetic:
    num_requests: 60
    arrival: {{kind: poisson, rate_req_s: 400}}
    prompt_len: {{kind: uniform, low: 5, high: 300}}
    output_len: {{kind: uniform, low: 2, high: 40}}
scheduler: {{max_batch_size: 2}}
variants:
{variants}
"""

MINE = """\
class Longest:
    name = "longest"
    def __init__(self, by="prompt_len"):
        self.by = by
        self.calls = 0
    def pick(self, waiting):
        self.calls += 1
        return max(range(len(waiting)), key=lambda i: (getattr(waiting[i], self.by), -i))

class NoPick:
    name = "nopick"

class BadSig:
    name = "badsig"
    def pick(self):
        return 0
"""


def _first_order(result) -> list[int]:
    t = result.requests.to_pandas().sort_values(["first_scheduled_s", "request_id"])
    return t.request_id.tolist()


def test_user_policy_from_the_experiment_folder_and_recorded(tmp_path, capsys):
    (tmp_path / "mine.py").write_text(MINE)
    exp = tmp_path / "e.yaml"
    exp.write_text(EXP.format(variants="  - name: default\n  - name: longest\n"
                              "    scheduler: {order: {class: mine:Longest, args: {by: output_len}}}\n"))
    assert main(["run", str(exp), "--out", str(tmp_path / "out")]) == 0
    rec = yaml.safe_load((tmp_path / "out" / "longest" / "config.yaml").read_text())["policies"]
    assert set(rec) == {FAMILIES[f].key for f in ("capacity", "order", "chunking", "preemption", "eviction", "router")}
    assert rec["scheduler.order"]["class"] == "mine:Longest"
    assert rec["scheduler.order"]["args"] == {"by": "output_len"}
    assert rec["scheduler.order"]["file"] == str((tmp_path / "mine.py").resolve())
    import hashlib
    assert rec["scheduler.order"]["sha256"] == hashlib.sha256((tmp_path / "mine.py").read_bytes()).hexdigest()
    # built-ins are recorded the same way, by class and source hash
    d = yaml.safe_load((tmp_path / "out" / "default" / "config.yaml").read_text())["policies"]
    assert d["scheduler.order"]["class"] == "servesim.policies.ordering:Fcfs"
    assert d["scheduler.order"]["builtin"] == "fcfs" and len(d["scheduler.order"]["sha256"]) == 64
    # the policy decided: two at a time, the longest outputs first among those waiting
    res = {v.name: simulate(resolve(v.config, tmp_path)) for v in load_experiment(exp).variants}
    assert _first_order(res["default"]) != _first_order(res["longest"])


def test_a_changed_policy_file_is_reloaded(tmp_path):
    (tmp_path / "mine2.py").write_text(MINE)
    a = load_policy("mine2:Longest", "order", base_dir=tmp_path)
    (tmp_path / "mine2.py").write_text(MINE.replace('"longest"', '"longest-v2"'))
    b = load_policy("mine2:Longest", "order", base_dir=tmp_path)
    assert a.make().name == "longest" and b.make().name == "longest-v2" and a.sha256 != b.sha256


def test_errors_name_the_key(tmp_path, capsys):
    (tmp_path / "mine.py").write_text(MINE)
    exp = tmp_path / "e.yaml"
    exp.write_text(EXP.format(variants=(
        "  - name: a\n    scheduler: {order: nosuch_policy_mod:X}\n"
        "  - name: b\n    scheduler: {order: mine:NoPick}\n"
        "  - name: c\n    scheduler: {order: {class: mine:Longest, args: {speed: 2}}}\n"
        "  - name: d\n    scheduler: {order: mine:BadSig}\n"
        "  - name: e\n    kv_cache: {eviction: mine:Longest, enable_block_reuse: true}\n")))
    assert main(["validate", str(exp)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert re.search(r"variants\[0\] \(a\): scheduler.order: module 'nosuch_policy_mod' not found", err)
    assert re.search(r"variants\[1\] \(b\): scheduler.order: mine:NoPick does not satisfy WaitingOrder: missing pick", err)
    assert re.search(r"variants\[2\] \(c\): scheduler.order: mine:Longest does not take args \['speed'\]", err)
    assert re.search(r"variants\[3\] \(d\): scheduler.order: mine:BadSig.pick must take \(waiting\)", err)
    assert re.search(r"variants\[4\] \(e\): kv_cache.eviction: mine:Longest does not satisfy EvictionPolicy: "
                     r"missing evict", err)
    # and sim run refuses the same, before running anything
    assert main(["run", str(exp), "--out", str(tmp_path / "o")]) == 2
    capsys.readouterr()
    exp.write_text(EXP.format(variants="  - name: f\n    scheduler: {order: sjf}\n"))
    assert main(["validate", str(exp)]) == 2
    assert re.search(r"variants\[0\].scheduler.order: not a built-in order policy", capsys.readouterr().err)


def test_fresh_instances_per_run_and_byte_identical(tmp_path):
    (tmp_path / "mine.py").write_text(MINE)
    exp = tmp_path / "e.yaml"
    exp.write_text(EXP.format(variants="  - name: longest\n    scheduler: {order: mine:Longest}\n"))
    setup = resolve(load_experiment(exp).variants[0].config, tmp_path)
    a, b = simulate(setup), simulate(setup)
    assert _ipc_bytes(a.requests) == _ipc_bytes(b.requests) and _ipc_bytes(a.iterations) == _ipc_bytes(b.iterations)


def test_builtins_by_name_or_class_are_the_same_run(tmp_path):
    exp = tmp_path / "e.yaml"
    exp.write_text(EXP.format(variants=(
        "  - name: names\n    scheduler: {order: priority, capacity: max_utilization}\n"
        "  - name: classes\n    scheduler: {order: {class: servesim.policies.ordering:Priority, args: {max_overtakes: 8}},"
        " capacity: 'servesim.policies.capacity:MaxUtilization'}\n")))
    a, b = (simulate(resolve(v.config, tmp_path)) for v in load_experiment(exp).variants)
    assert _ipc_bytes(a.requests) == _ipc_bytes(b.requests)


class GenericLru(PrioritizedLru):
    """The built-in's decision through the generic path (views of every candidate)."""


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(example_strategy("eviction", "prioritized_lru"), st.lists(st.integers(0, 100), min_size=2, max_size=2))
def test_default_eviction_heaps_equal_its_reference(ex, prios):
    """The prefix cache's heaps compute exactly PrioritizedLru.evict (retention priorities
    without durations)."""
    settings_, work = ex
    settings_["kv_cache"]["retention"] = {"token_ranges": [{"start": 0, "end": 32, "priority": prios[0]}],
                                          "decode_priority": prios[1]}
    base = _Base(ROOT)
    runs = []
    for value in ("prioritized_lru", "test_user_policies:GenericLru"):
        settings_["kv_cache"]["eviction"] = value
        r = simulate(base.setup(settings_, work), check_invariants=True)
        runs.append((_ipc_bytes(r.requests), _ipc_bytes(r.iterations)))
    assert runs[0] == runs[1]


def test_lfu_pinned_prefers_unpinned_and_unpopular():
    c = [CachedBlockView(1, 0, "system", 35, 0.0, 9), CachedBlockView(2, 3, "x", 35, 1.0, 0),
         CachedBlockView(3, 1, "x", 35, 0.5, 0), CachedBlockView(4, 0, "x", 35, 0.1, 5)]
    mod = _load_example("lfu")
    p = mod.LfuPinned(pin_tenant="system", pin_blocks=2)
    assert p.evict(c, 2, 2.0) == [2, 1]  # hits 0, older release first
    assert p.evict(c, 4, 2.0)[-1] == 0  # the pinned block only when nothing else is left
    assert mod.LfuPinned().evict(c, 1, 2.0) == [2]


def _load_example(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sjf_example_from_its_file_cuts_the_median_ttft():
    exp = load_experiment(ROOT / "experiments" / "user_policies.yaml")
    res = {v.name: simulate(resolve(v.config, exp.base_dir)) for v in exp.variants}
    assert res["sjf"].summary["ttft_s"]["p50"] < 0.8 * res["fcfs"].summary["ttft_s"]["p50"]
    assert res["sjf"].summary["num_finished"] == res["fcfs"].summary["num_finished"]


@pytest.mark.parametrize("module", ["capacity", "chunking", "ordering", "preemption", "eviction", "speculative"])
def test_each_protocols_worked_example_satisfies_it(module, tmp_path):
    doc = importlib.import_module(f"servesim.policies.{module}").__doc__
    m = re.search(r"\n\n    class (\w+):\n(.*?)(?:\n\S|\Z)", doc, re.S)
    assert m, f"policies/{module}.py has no worked example"
    code = textwrap.dedent("    class " + m.group(1) + ":\n" + m.group(2))
    (tmp_path / f"doc_{module}.py").write_text(code)
    family = {"ordering": "order", "speculative": "draft"}.get(module, module)
    p = load_policy(f"doc_{module}:{m.group(1)}", family, base_dir=tmp_path)
    assert p.make().name


def test_router_example_against_the_cluster_interface():
    routing = pytest.importorskip("servesim.policies.routing")
    if not hasattr(routing, "ReplicaView"):
        pytest.skip("needs the cluster router interface (ReplicaView) of policies/routing.py")
    exp = load_experiment(EXAMPLES / "router.yaml", ["workload.prefix.num_conversations=40"])
    for v in exp.variants:
        r = simulate(resolve(v.config, exp.base_dir))
        assert r.summary["num_finished"] > 0


def test_same_policy_class_on_the_gpu_backend(tmp_path):
    """--backend gpu builds its engine from the same loaded policies: offline, one request
    at a time, the admission order of a GPU run is the simulator's."""
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    import json

    from servesim.gpu_backend.runner import simulate_gpu

    tiny = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "intermediate_size": 128, "vocab_size": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 512, "tie_word_embeddings": False}
    (tmp_path / "tiny.json").write_text(json.dumps(tiny))
    exp = tmp_path / "e.yaml"
    exp.write_text(f"""\
name: g
model: tiny.json
hardware: h100-sxm
kv_cache: {{pool_tokens: 2048, tokens_per_block: 16}}
scheduler: {{max_batch_size: 1, max_num_tokens: 256,
            order: {{class: {EXAMPLES / 'sjf.py'}:ShortestJobFirst, args: {{max_overtakes: 3}}}}}}
runtime: {{cuda_graphs: false}}
output: {{plots: false}}
workload:
  synthetic:
    num_requests: 10
    arrival: {{kind: offline}}
    prompt_len: {{kind: uniform, low: 3, high: 60}}
    output_len: {{kind: uniform, low: 2, high: 12}}
""")
    setup = resolve(load_experiment(exp).variants[0].config, tmp_path)
    sim, gpu = simulate(setup), simulate_gpu(setup, device="cpu")
    order = _first_order(sim)
    assert _first_order(gpu) == order
    t = sim.requests.to_pandas().set_index("request_id")
    sizes = (t.prompt_len + t.output_len)[order].tolist()
    assert sizes != sorted(sizes, reverse=True)  # not what FCFS would give by chance: SJF with aging
