"""Disaggregated serving in the SimPy driver: a prefill pool, a decode pool, a KV link.

A request arrives at a prefill replica (``cluster.router`` picks it), which runs its prompt
and emits its first token (TTFT is the prefill pool's). Its prompt's KV then moves to a
decode replica (``cluster.disaggregation.decode_router`` picks it when the transfer
starts) over the link (sim/link.py: latency, then processor sharing with the transfers in
flight). The decode replica admits it only once the KV has arrived -- as a request whose
KV is already in place (the engine's swap-in path, without a host copy) -- and generates
the rest of its tokens there.

Simplifications, stated: the prefill replica frees the request's KV blocks when its first
token is out (a real engine holds them until the transfer is done; here the blocks are
counted once, on the decode side, from the transfer's end); the bytes moved are the
prompt's KV blocks in the model's KV dtype; a request that emits a single token never
leaves its prefill replica.

Causality. Replicas meet only at arrivals, at transfer starts (a prefill iteration's end)
and at transfer ends. A prefill replica therefore steps one iteration per SimPy event; a
decode replica steps back to back up to the earliest moment anything could still reach it
-- the next arrival, the end of any prefill iteration in flight (plus the link latency),
or the earliest possible end of a transfer in flight to it -- which is a lower bound
because a transfer that joins later only slows the others down.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import simpy

from .cluster import Dispatch, ReplicaHandle
from .engine import INF, Engine
from .kv_cache import blocks_for
from .link import PSLink, Transfer
from .types import Phase, Request


def _proxy(r: Request) -> Request:
    """The prefill pool's copy of a request: its prompt and one output token."""
    p = Request(r.request_id, r.arrival_s, r.prompt_len, 1, r.priority, r.tenant, r.slo_ttft_s, r.slo_tpot_s,
                r.block_hashes, r.prompt_tokens)
    p.block_keys = r.block_keys
    p.block_contents = r.block_contents
    p.retention = r.retention
    return p


def run_disaggregated(requests: Sequence[Request], prefill: Sequence[Engine], decode: Sequence[Engine],
                      router, decode_router, bandwidth_bytes_s: float, latency_s: float,
                      kv_bytes_per_token: float) -> dict:
    """Run to completion. Engines' `replica` numbers index the run's replicas (prefill pool
    first). Returns link statistics; the requests carry their records (first token from
    their prefill replica, `kv_transfer_s`, `prefill_replica`)."""
    env = simpy.Environment()
    times = np.fromiter((r.arrival_s for r in requests), dtype=np.float64, count=len(requests))
    if len(times) > 1 and np.any(np.diff(times) < 0):
        raise ValueError("requests must be sorted by arrival time")
    phandles = [ReplicaHandle(e, i) for i, e in enumerate(prefill)]
    dhandles = [ReplicaHandle(e, i) for i, e in enumerate(decode)]
    pdispatch = Dispatch(phandles, prefill, router)
    ddispatch = Dispatch(dhandles, decode, decode_router)
    state = {"ptr": 0, "pending": 0}  # pending: requests routed to prefill that will need the decode pool
    busy_end = [-INF] * len(prefill)  # end of each prefill replica's iteration in flight (-INF: none)
    seen = [0] * len(prefill)  # of each prefill engine's done list, handed over already
    origin: dict[int, Request] = {}  # request id -> the request (for proxies)
    prefill_preempt: dict[int, int] = {}
    wake: list[simpy.Event | None] = [None] * len(decode)
    dests: dict[int, int] = {}  # request id -> decode pool index

    def next_arrival() -> float:
        return float(times[state["ptr"]]) if state["ptr"] < len(times) else INF

    def all_done() -> bool:
        return state["ptr"] >= len(times) and state["pending"] == 0

    def wake_decode(j: int) -> None:
        ev = wake[j]
        if ev is not None and not ev.triggered:
            ev.succeed()

    def deliver(now: float) -> None:
        ptr = state["ptr"]
        while ptr < len(times) and times[ptr] <= now:
            r = requests[ptr]
            ptr += 1
            if r.output_len > 1 and not ddispatch.any_fits(_decode_view(r)):
                r.phase = Phase.REJECTED  # no decode replica can ever hold it: not prefilled in vain
                r.reject_reason = "kv_pool"
                continue
            if r.output_len > 1:
                p = _proxy(r)
                origin[r.request_id] = r
                state["pending"] += 1
            else:
                p = r  # one token: it never leaves the prefill pool
            pdispatch.choose(p).enqueue(p)
        state["ptr"] = ptr

    def _decode_view(r: Request) -> Request:
        r.transfer_in = True  # how it will arrive (fits are judged on that)
        r.generated = 1
        return r

    def on_transfer_done(t: Transfer) -> None:
        r = t.payload
        r.kv_transfer_s = env.now - t.start_s
        dhandles[t.dest].enqueue(r)
        state["pending"] -= 1
        wake_decode(t.dest)
        if all_done():
            for j in range(len(decode)):
                wake_decode(j)

    link = PSLink(env, bandwidth_bytes_s, latency_s, on_transfer_done)

    def hand_over(i: int) -> None:
        """The requests prefill replica i finished (or rejected) leave it."""
        e = prefill[i]
        done = e.done
        for p in done[seen[i]:]:
            r = origin.pop(p.request_id, None)
            if r is None:
                continue  # a one-token request: its record is its own
            if p.phase == Phase.REJECTED:
                r.phase = Phase.REJECTED
                r.reject_reason = p.reject_reason
                r.replica = p.replica
                state["pending"] -= 1
                continue
            it = p.spans[0][0]
            r.first_token_at = (e.replica, it)
            r.prefill_replica = e.replica
            r.first_scheduled_s = p.first_scheduled_s
            r.cached_tokens = p.cached_tokens
            prefill_preempt[r.request_id] = p.preemptions
            _decode_view(r)
            r.phase = Phase.WAITING
            h = ddispatch.choose(r)
            tpb = decode[h.index].tpb
            r.swapped_blocks = blocks_for(r.prompt_len, tpb)
            dests[r.request_id] = h.index
            link.start(r.swapped_blocks * tpb * kv_bytes_per_token, h.index, r)
        seen[i] = len(done)
        if all_done():
            for j in range(len(decode)):
                wake_decode(j)

    def prefill_process(i: int, e: Engine):
        while True:
            now = env.now
            deliver(now)
            if not e.has_work():
                if state["ptr"] >= len(times):
                    return
                yield env.timeout(next_arrival() - now)
                continue
            end = e.step(now, now)  # one iteration: its end is when its prompts' KV can leave
            if end > now:
                busy_end[i] = end
                yield env.timeout(end - now)
                busy_end[i] = -INF
            elif e.has_work() and not e.context and not e.n_dec:
                raise RuntimeError(f"replica {e.replica}: waiting requests can never be admitted")
            hand_over(i)

    def bound(j: int) -> float:
        """Nothing can reach decode replica j before this time."""
        b = next_arrival()
        for i, t in enumerate(busy_end):
            if t > -INF:
                b = min(b, t)
            elif prefill[i].has_work():
                b = min(b, env.now)
        return min(b + latency_s, link.lower_bound(j))

    def decode_process(j: int, e: Engine):
        while True:
            now = env.now
            if not e.has_work():
                if all_done():
                    return
                wake[j] = env.event()
                yield wake[j]
                wake[j] = None
                continue
            horizon = bound(j)
            t = now
            while True:
                end = e.step(t, horizon)
                if end >= horizon or end == t or not e.has_work():
                    break
                t = end
            if end > now:
                yield env.timeout(end - now)
            elif e.has_work() and not e.context and not e.n_dec:
                raise RuntimeError(f"replica {e.replica}: a request whose KV arrived can never be admitted")

    procs = [env.process(prefill_process(i, e)) for i, e in enumerate(prefill)]
    procs += [env.process(decode_process(j, e)) for j, e in enumerate(decode)]
    env.run(until=simpy.AllOf(env, procs))
    for e in (*prefill, *decode):
        e.finish()
    for r in requests:
        r.preemptions += prefill_preempt.get(r.request_id, 0)
        if r.phase == Phase.REJECTED:
            r.transfer_in = False
            r.generated = 0
    return {"transfers": link.completed, "bytes": link.bytes_moved, "max_concurrent": link.max_concurrent,
            "duration_s": env.now}
