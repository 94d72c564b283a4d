"""User policies loaded by name (policies/loading.py) and the waiting-order family."""

from __future__ import annotations

import pytest

from servesim.policies.capacity import make_capacity_policy
from servesim.policies.chunking import make_chunk_policy
from servesim.policies.loading import PolicyRef, load_policy, protocol_members
from servesim.policies.ordering import WaitingOrder, make_order
from servesim.policies.routing import Router, make_router
from servesim.sim.driver import run_simulation
from servesim.sim.engine import Engine, EngineConfig
from servesim.sim.records import iteration_arrays, request_arrays
from servesim.sim.types import ConfigError, Phase, Request

from engine_harness import AffineCost, SimExec


ROWS = [(0.0, 30, 4), (0.0, 20, 4), (0.0, 10, 4), (0.0, 5, 4)]


def _first_token_order(order, priorities=None):
    reqs = [Request(i, a, p, o, priority=(priorities or [0] * len(ROWS))[i]) for i, (a, p, o) in enumerate(ROWS)]
    cfg = EngineConfig(max_batch_size=1, max_num_tokens=64, tokens_per_block=4, num_blocks=64,
                       capacity=make_capacity_policy("guaranteed_no_evict"),
                       chunking=make_chunk_policy(False, None), graph_padding=None, check_invariants=True,
                       kv_block_bytes=1 << 20, order=order)
    eng = Engine(cfg, SimExec(AffineCost(), False))
    run_simulation(reqs, [eng], make_router("round_robin"))
    assert all(r.phase == Phase.FINISHED for r in reqs)
    first = request_arrays(reqs, [iteration_arrays(eng)]).table.column("first_token_s").to_numpy()
    return sorted(range(len(reqs)), key=lambda i: first[i])


def test_orders_pick_the_next_waiting_request():
    assert _first_token_order(None) == [0, 1, 2, 3]
    assert _first_token_order(make_order("fcfs")) == [0, 1, 2, 3]
    # all arrive at t=0 into a one-request batch: admission follows the policy
    assert _first_token_order(make_order("shortest_prompt_first")) == [3, 2, 1, 0]
    assert _first_token_order(make_order("priority"), [0, 1, 5, 3]) == [2, 3, 1, 0]


def test_builtin_and_user_policies_load(tmp_path):
    assert load_policy("least_loaded", "router").make().name == "least_loaded"
    (tmp_path / "mine.py").write_text(
        "class Sjf:\n    name = 'sjf'\n    def __init__(self, slack=0):\n        self.slack = slack\n"
        "    def pick(self, waiting):\n        return min(range(len(waiting)), key=lambda i: waiting[i].prompt_len)\n"
        "class NoPick:\n    name = 'x'\n")
    p = load_policy({"class": "mine:Sjf", "args": {"slack": 3}}, "order", base_dir=tmp_path).make()
    assert p.slack == 3 and _first_token_order(p) == [3, 2, 1, 0]
    cases = [("nosuch_mod_xyz:X", "not found"), ("mine:Nope", "no attribute"),
             (PolicyRef(class_="mine:Sjf", args={"bogus": 1}), "does not take args"),
             ("mine:NoPick", "missing pick")]
    for value, msg in cases:
        with pytest.raises(ConfigError, match=msg) as e:
            load_policy(value, "order", base_dir=tmp_path)
        assert e.value.problems[0][0] == "scheduler.order"


def test_protocol_members():
    assert protocol_members(Router) == ["name", "route"]
    assert protocol_members(WaitingOrder) == ["name", "pick"]
