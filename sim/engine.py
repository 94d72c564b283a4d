"""The engine: one iteration = schedule, execute, apply.

It knows nothing about where time comes from. Each call of `step(now, horizon)` runs
either

* one *general* iteration (context chunks first, then every generation request, packed),
  handed to the executor, or
* a *decode stretch*: iterations in which only generation requests run and nothing is
  admitted, finishes or pauses. When the executor can price such iterations in closed
  form (`Executor.plan_decode_stretch` gives an affine price in the KV length), the stretch
  is advanced at once: its length, total duration, KV growth and token times follow from a
  few sums, and its per-iteration records are materialised later, vectorised
  (sim/records.py). A GPU executor plans none, so every iteration runs for real.

Time comes only from the executor (`execute`, `plan_decode_stretch`, `iteration_duration`,
`finish`); policies decide (admission, chunking, padding) and the engine applies.

Generation requests are kept as aggregates so that per-iteration work never loops over
the batch: each one's KV length is `off + it` (it grows by one a step), the pool's new
blocks per step come from a histogram of `(off - 1) mod tokens_per_block`, and finishes
come from a heap keyed by the iteration that emits the last token.
"""

from __future__ import annotations

import bisect
import heapq
import math
import operator
from array import array
from collections import deque
from dataclasses import dataclass

from servesim.policies.capacity import AdmitNeed, CapacityPolicy, PoolView, final_kv_tokens
from servesim.policies.chunking import ChunkPolicy, FillBudget
from servesim.policies.graph_padding import GraphPadding
from servesim.policies.eviction import EvictionPolicy, incremental
from servesim.policies.loading import PolicyError
from servesim.policies.ordering import WaitingOrder, WaitingView
from servesim.policies.preemption import PreemptionPolicy, RunningView
from servesim.policies.speculative import DraftPolicy, fit_draft_lens

from .kv_cache import BlockManager, blocks_for
from .prefix_cache import DEFAULT_PRIORITY, PrefixCache
from .records import IterationRecord, StretchRecord
from .types import ContextChunk, Executor, IterationShape, Phase, Request, ScheduledBatch

INF = float("inf")


@dataclass
class EngineConfig:
    max_batch_size: int
    max_num_tokens: int
    tokens_per_block: int
    num_blocks: int
    capacity: CapacityPolicy
    chunking: ChunkPolicy
    graph_padding: GraphPadding | None  # None: CUDA graphs off
    # token counts of the piecewise CUDA graphs for iterations with context chunks
    # (runtime.piecewise_graphs); None: such iterations run eagerly
    piecewise_padding: GraphPadding | None = None
    check_invariants: bool = False
    prefix_caching: bool = False  # reuse cached prompt blocks (needs request block keys)
    host_blocks: int = 0  # host offload tier size in blocks (0: none)
    offload_min_priority: int = DEFAULT_PRIORITY
    kv_block_bytes: int = 0  # bytes of one KV block (prices host<->GPU copies)
    swap_blocks: int = 0  # MAX_UTILIZATION preemption by swap: host blocks for paused requests (0: recompute)
    # Overlap scheduler (TensorRT-LLM): iteration n+1 is scheduled before n's results are
    # processed, so a request that emitted its last token at n still runs in n+1 (a
    # discarded token, its slot and KV held) and frees its capacity one step later.
    overlap: bool = False
    # speculative decoding (policies/speculative.py): draft tokens per generation request;
    # None: off. Iterations with drafts are stepped one by one (no closed-form stretches).
    speculation: DraftPolicy | None = None
    # the model's max_position_embeddings: a request whose KV would outgrow it is rejected
    max_positions: int | None = None
    order: WaitingOrder | None = None  # which waiting request to try next (None: FCFS)
    # which running request a pausing capacity policy pauses (None: the newest)
    victim: PreemptionPolicy | None = None
    # which cached prefix blocks are evicted (None: prioritised LRU)
    eviction: EvictionPolicy | None = None


class Engine:
    # decode stretches run through request finishes in one step while nothing can be
    # admitted (`_stretches_through_finishes`); False: one stretch a step (the same records)
    merge_stretches = True

    def __init__(self, cfg: EngineConfig, executor: Executor, replica: int = 0):
        self.cfg = cfg
        self.executor = executor
        self.replica = replica
        self._last_start = -INF  # the last iteration run: its start and end
        self._last_end = -INF
        self.needs_block_ids = executor.needs_block_ids
        # an executor whose stretch price depends only on the batch (`fixed_stretch_plans`,
        # the simulated one): each batch size's (graph size, fixed, per-KV price), kept
        self._plans: dict[int, tuple[int, float, float]] | None = (
            {} if executor.fixed_stretch_plans else None)
        self.kv = BlockManager(cfg.num_blocks, cfg.tokens_per_block)
        self.kv.reserving = cfg.capacity.reserves
        self.kv_view = PoolView(self.kv)  # what the capacity policy sees
        self.cache: PrefixCache | None = None
        if cfg.prefix_caching:
            self.cache = PrefixCache(self.kv, cfg.host_blocks, cfg.offload_min_priority,
                                     eviction=None if incremental(cfg.eviction) else cfg.eviction)
            self.kv.cache = self.cache
        self._ev0 = 0  # cache counters at the start of the current step
        self._off0 = 0
        self.swap_used = 0  # host blocks holding swapped-out requests
        self.pending_swap_out = 0  # blocks copied GPU -> host by pauses this iteration
        # ... and, when the executor needs block ids, whose and which (request id, block ids)
        self.pending_swap_out_ids: list[tuple[int, list[int]]] = []
        self.pending_swap_in: list[int] = []  # requests whose KV comes back this iteration
        self.num_swaps = 0
        self.tpb = cfg.tokens_per_block
        self.waiting: deque[Request] = deque()
        self.context: list[Request] = []  # admitted, context phase, admission order
        self.decoding: dict[int, Request] = {}  # generation phase, insertion order
        self.g = 0  # index of the next iteration
        # generation aggregates
        self.n_dec = 0
        self.off_sum = 0  # sum of (kv_after(it) - it) over generation requests
        # counts of (off - 1) mod tpb; an int64 array, so that a stretch's snapshot of it
        # (stretch_hist) is a copy of its bytes rather than a conversion of a list
        self.hist = array("q", bytes(8 * self.tpb))
        # max-heap (lazy) of (-off, seq, request) over generation requests: the longest decode KV
        # is its valid top + the iteration (entries of requests gone or since grown are dropped)
        self.off_heap: list[tuple[int, int, Request]] = []
        self._off_seq = 0
        self.finish_heap: list[tuple[int, int, Request]] = []
        self._admit_seq = 0
        self._moved: Request | None = None  # the waiting request the order policy last moved to the front
        self.recompute_chunking = FillBudget()
        # outputs
        self.rows: list[IterationRecord] = []  # general iterations
        self.stretches: list[StretchRecord] = []  # closed-form decode stretches
        self.stretch_hist: list[bytes] = []  # each stretch's block-residue histogram
        self.done: list[Request] = []  # finished or rejected, in completion order
        # a run streamed to disk (sim/stream.py): takes the records above every so often
        # (`done` then holds the requests finished since; num_done_flushed, those before)
        self.recorder = None
        self.num_done_flushed = 0
        self.done_tokens = 0  # prompt + output tokens of every request finished or rejected so far
        self.num_preemptions = 0
        # speculative decoding, per iteration with drafts: (iteration, requests with >= i
        # drafts, requests with >= i accepted) for i = 1..max_draft_len
        self.draft_positions: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []

    # ------------------------------------------------------------------ queries
    def enqueue(self, req: Request) -> None:
        req.replica = self.replica
        req.context_target = req.prompt_len
        self.waiting.append(req)

    def num_done(self) -> int:
        """Requests finished or rejected so far."""
        return self.num_done_flushed + len(self.done)

    def load(self) -> int:
        return len(self.waiting) + len(self.context) + self.n_dec

    def has_work(self) -> bool:
        return bool(self.waiting or self.context or self.n_dec)

    def n_active(self) -> int:
        return len(self.context) + self.n_dec

    # ------------------------------------------------------------------ helpers
    def _off(self, req: Request) -> int:
        return req.prompt_len + req.generated - req.gen_base_iter

    def _enter_generation(self, req: Request, it: int) -> None:
        """`req` emitted a token at iteration `it` and now generates one per iteration."""
        req.phase = Phase.GENERATION
        req.gen_base_iter = it + 1
        # the iteration after which it leaves: its last token's, one later with overlap
        req.finish_iter = it + req.output_len - req.generated + self.cfg.overlap
        off = self._off(req)
        self.n_dec += 1
        self.off_sum += off
        self.hist[(off - 1) % self.tpb] += 1
        self.decoding[req.request_id] = req
        self._push_off(req, off)
        heapq.heappush(self.finish_heap, (req.finish_iter, req.admit_seq, req))

    def _push_off(self, req: Request, off: int) -> None:
        self._off_seq += 1
        heapq.heappush(self.off_heap, (-off, self._off_seq, req))

    def _max_off(self) -> int:
        """The largest off over generation requests (0: none); the longest decode KV at
        iteration ``it`` is this + it."""
        h = self.off_heap
        dec = self.decoding
        while h:
            neg, _, r = h[0]
            if dec.get(r.request_id) is r and -neg == self._off(r):
                return -neg
            heapq.heappop(h)
        return 0

    def _leave_generation(self, req: Request, last_it: int) -> int:
        """Remove from the aggregates; returns its logical KV blocks after `last_it`."""
        off = self._off(req)
        self.n_dec -= 1
        self.off_sum -= off
        self.hist[(off - 1) % self.tpb] -= 1
        del self.decoding[req.request_id]
        # tokens stop at output_len: with overlap the last iteration's token is discarded
        last_emit = min(last_it, req.gen_base_iter - 1 + req.output_len - req.generated)
        req.generated += last_emit + 1 - req.gen_base_iter
        req.gen_base_iter = last_it + 1
        if self.cfg.speculation is None:  # (with speculation every step appended its own tokens)
            first, _ = req.spans[-1]
            req.spans[-1] = (first, last_emit - first + 1)
        return blocks_for(off + last_it, self.tpb)

    def _finish(self, req: Request, blocks: int) -> None:
        self.kv.release(req, blocks)
        req.phase = Phase.FINISHED
        self.done.append(req)
        self.done_tokens += req.prompt_len + req.output_len

    def _final_blocks(self, req: Request) -> int:
        """Blocks a request holds at its last step (with overlap, the discarded extra step
        writes one more token)."""
        return blocks_for(final_kv_tokens(req) + self.cfg.overlap, self.tpb)

    def _reject(self, req: Request, reason: str) -> None:
        """Never fits: the KV pool ("kv_pool"), a prompt over max_num_tokens without
        chunking ("token_budget"), or beyond the model's positions ("max_positions")."""
        req.phase = Phase.REJECTED
        req.reject_reason = reason
        self.done.append(req)
        self.done_tokens += req.prompt_len + req.output_len

    def never_fits(self, req: Request) -> str | None:
        """Why `req` can never run here (the reason it is rejected with), or None."""
        cfg = self.cfg
        if cfg.max_positions is not None and final_kv_tokens(req) > cfg.max_positions:
            return "max_positions"
        if self._final_blocks(req) > self.kv.total:
            return "kv_pool"
        if (req.preemptions == 0 and not req.transfer_in and req.prompt_len > cfg.max_num_tokens
                and not cfg.chunking.splits):
            return "token_budget"
        return None

    # ------------------------------------------------------------------ admission
    def _pick_next(self, cutoff: float) -> None:
        """Move the waiting request `cfg.order` picks (among those arrived) to the front."""
        waiting = self.waiting
        moved = self._moved
        if moved is not None:  # the last pick, not admitted (the pool was short): back in arrival order
            self._moved = None
            if waiting and waiting[0] is moved:
                waiting.popleft()
                waiting.insert(bisect.bisect_right(waiting, moved.arrival_s, key=_arrival_of), moved)
        n = len(waiting)  # the waiting requests are in arrival order: those arrived by cutoff lead
        while n and waiting[n - 1].arrival_s > cutoff:
            n -= 1
        if n < 2:
            return
        i = self.cfg.order.pick(_WaitingViews(waiting, n))
        try:
            i = operator.index(i)
        except TypeError:
            raise PolicyError(f"scheduler.order {self.cfg.order.name!r}: pick returned {i!r}, not an index") from None
        if not 0 <= i < n:
            raise PolicyError(f"scheduler.order {self.cfg.order.name!r}: pick returned {i}, outside the "
                              f"{n} waiting requests")
        if i:
            req = waiting[i]
            del waiting[i]
            waiting.appendleft(req)
            self._moved = req

    def _admit(self, now: float, cutoff: float = INF) -> bool:
        """Admit waiting requests (those that arrived by `cutoff`, or were preempted); True
        when one was held back by the cutoff."""
        cfg = self.cfg
        policy = cfg.capacity
        if not self.waiting:
            return False
        if not policy.admit_while_busy and self.n_active():
            return False
        kv = self.kv
        headroom = self.hist[(-self.g) % self.tpb] if self.n_dec else 0
        while self.waiting and len(self.context) + self.n_dec < cfg.max_batch_size:  # (n_active)
            if cfg.order is not None and not self.waiting[0].preemptions:
                self._pick_next(cutoff)
            req = self.waiting[0]
            if req.arrival_s > cutoff and not req.preemptions:
                return True
            reason = self.never_fits(req)
            if reason is not None:
                self.waiting.popleft()
                self._reject(req, reason)
                continue
            if req.swapped_blocks:
                if not self._swap_in(req, headroom):
                    break
                # it generates this iteration: the blocks the running decodes need now
                # include its own (stale, a later swap-in could take the room and the pause
                # that follows would send a request back out in the iteration that brought
                # it in)
                headroom = self.hist[(-self.g) % self.tpb] if self.n_dec else 0
                continue
            hits = []
            copy_src = None
            reused = 0
            if self.cache is not None and req.block_keys:
                tpb = self.tpb
                hits = self.cache.match(req.block_keys[:req.context_target // tpb], req.block_contents)
                reused = len(hits) * tpb
                if reused >= req.context_target:
                    # Every block matched, but the last prompt token must be computed (it
                    # gives the logits): partial reuse copies the last block's first
                    # tpb - 1 tokens into a private block (TensorRT-LLM's partial reuse).
                    copy_src = hits.pop()
                    reused = req.context_target - 1
            n_hit = len(hits)
            need = AdmitNeed(ctx_blocks=blocks_for(req.context_target, self.tpb) - n_hit,
                             final_blocks=self._final_blocks(req) - n_hit,
                             new_refs=PrefixCache.new_refs(hits) if hits else 0)
            if not policy.admits(self.kv_view, headroom, need):
                break
            self._reserve(req, need)
            self.waiting.popleft()
            if hits:
                self.cache.acquire(hits, now)  # before growing: hits must not be evicted
                req.nodes = list(hits)
                req.node_blocks = list(range(len(hits)))
                req.blocks = [n.block_id for n in hits]
            kv.grow(need.ctx_blocks)
            if copy_src is not None and (copy_src.on_host or copy_src.block_id < 0):
                # on the host (not worth onboarding for tpb - 1 tokens) or evicted by the
                # growth just now: recompute those tokens
                copy_src = None
                reused = n_hit * self.tpb
            if reused and req.preemptions == 0:
                req.cached_tokens = reused
            if copy_src is not None:
                # the copy is queued before anything can reuse the source block's id (an
                # executor runs pending copies before the iteration's writes)
                kv.sync(req, (n_hit + 1) * self.tpb)
                kv.pending_copies.append((copy_src.block_id, req.blocks[n_hit]))
                copy_src.last_used = now
            req.phase = Phase.CONTEXT
            req.context_done = reused
            req.admit_seq = self._admit_seq
            self._admit_seq += 1
            self.context.append(req)
        return False

    def _swap_in(self, req: Request, headroom: int) -> bool:
        """Bring a swapped-out request's KV back from the host; it resumes generating."""
        kv = self.kv
        n = req.swapped_blocks
        # n + 1: room for its own next block too, so the pause that follows admission in
        # the same iteration never picks the request it just brought back
        need = AdmitNeed(ctx_blocks=n + 1, final_blocks=self._final_blocks(req), new_refs=0)
        if not self.cfg.capacity.admits(self.kv_view, headroom, need):
            return False
        self._reserve(req, need)
        self.waiting.popleft()
        kv.grow(n)
        if req.transfer_in:  # its KV came over the link from a prefill replica (sim/disagg.py)
            req.transfer_in = False
        else:
            kv.pending_onboard += n
            if self.needs_block_ids:
                self.pending_swap_in.append(req.request_id)
            self.swap_used -= n
        req.swapped_blocks = 0
        req.admit_seq = self._admit_seq
        self._admit_seq += 1
        req.spans.append((self.g, 0))
        self._enter_generation(req, self.g - 1)
        return True

    def _reserve(self, req: Request, need: AdmitNeed) -> None:
        """Carry out an admission the capacity policy accepted: its reservation."""
        if self.cfg.capacity.reserves:
            self.kv.reserve(req, need.final_blocks)
            self.kv.reserved += need.new_refs

    def _pause_newest(self, it: int) -> None:
        """MAX_UTILIZATION: pause the victim policy's choice among the running requests (the
        newest by default); it recomputes (or swaps back) on resume."""
        if self.cfg.victim is not None:
            victim = self._choose_victim(it)
        else:
            victim = None
            for r in self.context:
                if victim is None or r.admit_seq > victim.admit_seq:
                    victim = r
            for r in self.decoding.values():
                if victim is None or r.admit_seq > victim.admit_seq:
                    victim = r
        assert victim is not None
        if victim.phase == Phase.GENERATION:
            blocks = self._leave_generation(victim, it - 1)
            if victim.generated >= victim.output_len:  # done (overlap: only its discarded step left)
                self._finish(victim, blocks)
                return
            if blocks <= self.cfg.swap_blocks - self.swap_used:
                # swap: its KV goes to host memory and comes back on resume (no recompute)
                victim.swapped_blocks = blocks
                self.swap_used += blocks
                self.pending_swap_out += blocks
                if self.needs_block_ids:  # the ids it holds now, before they are released
                    self.kv.sync(victim, blocks * self.tpb)
                    self.pending_swap_out_ids.append((victim.request_id, list(victim.blocks[:blocks])))
                self.num_swaps += 1
        else:
            self.context.remove(victim)
            blocks = blocks_for(victim.context_target, self.tpb)
        self.kv.release(victim, blocks)
        victim.phase = Phase.WAITING
        victim.preemptions += 1
        victim.context_target = victim.prompt_len + victim.generated
        victim.context_done = 0
        self.num_preemptions += 1
        self.waiting.appendleft(victim)

    def _choose_victim(self, it: int) -> Request:
        running = self.context + list(self.decoding.values())
        tpb = self.tpb
        views = []
        for r in running:
            if r.phase == Phase.GENERATION:
                gen = r.generated + (it - r.gen_base_iter)
                blocks = blocks_for(self._off(r) + it - 1, tpb)
                phase = "generation"
            else:
                gen = r.generated
                blocks = blocks_for(r.context_target, tpb)
                phase = "context"
            views.append(RunningView(r.request_id, r.arrival_s, r.prompt_len, r.output_len, r.priority, r.tenant,
                                     phase, gen, blocks, r.admit_seq, r.preemptions))
        i = self.cfg.victim.victim(views)
        if not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(running)):
            raise PolicyError(f"scheduler.preemption_victim {self.cfg.victim.name!r}: victim returned {i!r}, not "
                              f"an index into the {len(running)} running requests")
        return running[i]

    # ------------------------------------------------------------------ stepping
    def step(self, now: float, horizon: float = INF) -> float:
        """Run one general iteration or one decode stretch starting at `now` (then, while
        nothing can be admitted, the decode stretches that follow it up to the horizon:
        `_stretches_through_finishes`).

        Every iteration run here starts before `horizon` (the next arrival), so arrivals
        are always seen by the first iteration that starts after them. Returns the time
        at which the last iteration run ends.
        """
        rec = self.recorder
        if rec is not None and (len(self.rows) + len(self.stretches) >= rec.flush_records
                                or len(self.done) >= rec.flush_done):
            rec.flush(self)  # (between steps: every record so far is complete)
        self.kv.now = now
        if self.cache is not None:
            st = self.cache.stats
            self._ev0 = st.dropped + st.offloaded
            self._off0 = st.offloaded
        cutoff = now  # requests that arrived after it wait for a later iteration
        if self.context or self.n_dec:  # (with nothing to run, nothing was decided ahead)
            cutoff = self.executor.admits_arrivals_until(now, self._last_start, self._last_end)
        if self.waiting and self._admit(now, cutoff):
            horizon = now  # one iteration: the next decides on the arrivals held back
        if (self.context or self.n_dec == 0 or self.kv.pending_onboard or self.pending_swap_out
                or self.cfg.speculation is not None):
            if not (self.context or self.n_dec):
                return now
            end = self._general(now)
            if self.merge_stretches and self.cfg.speculation is None:  # (drafts: every iteration stepped)
                return self._stretches_through_finishes(now, end, horizon)
            return end
        end = self._stretch(now, horizon)
        if end is None:  # no closed form, or KV exhausted right now (a general iteration pauses someone)
            return self._general(now)
        if self.merge_stretches:
            return self._stretches_through_finishes(now, end, horizon)
        return end

    def _stretches_through_finishes(self, t: float, end: float, horizon: float) -> float:
        """More decode stretches after a stretch that ended at a request's finish, or after
        a general iteration, in the same step, while nothing can be admitted: nothing
        waits, no context runs and the next arrival (`horizon`) is not reached. Exactly what the driver's next steps would do
        (sim/driver.py `_replica_loop` runs steps back to back until one ends at or past
        the horizon): each stretch is priced from its own start, its finishes popped, its
        record kept (one StretchRecord each, so the records and token times are the same
        bytes); only the driver's per-step work is saved. A zero-length stretch ends it
        (the driver stops there too). Off: `merge_stretches = False`
        (tests/test_engine_merge.py compares the two)."""
        rec = self.recorder
        kv = self.kv
        cache = self.cache
        while (end < horizon and end != t and self.n_dec and not self.waiting and not self.context
               and not kv.pending_onboard and not self.pending_swap_out):
            # the prologue of step(end, horizon): with nothing waiting, no admission and no cutoff
            if rec is not None and (len(self.rows) + len(self.stretches) >= rec.flush_records
                                    or len(self.done) >= rec.flush_done):
                rec.flush(self)
            kv.now = end
            if cache is not None:
                st = cache.stats
                self._ev0 = st.dropped + st.offloaded
                self._off0 = st.offloaded
            nxt = self._stretch(end, horizon)
            if nxt is None:  # a general iteration next: the next step runs it
                break
            t, end = end, nxt
        return end

    def _general(self, now: float) -> float:
        cfg = self.cfg
        kv = self.kv
        tpb = self.tpb
        it = self.g
        if cfg.capacity.pauses_on_shortage:
            while self.n_dec and self.hist[(-it) % tpb] > kv.available:
                self._pause_newest(it)
        budget = cfg.max_num_tokens - self.n_dec
        drafts = self._draft_lens(it, budget) if cfg.speculation is not None and self.n_dec else None
        if drafts is not None:
            budget -= drafts[3]
        chunks: list[ContextChunk] = []
        for req in self.context:
            if budget <= 0:
                break
            remaining = req.context_target - req.context_done
            policy = self.recompute_chunking if req.preemptions else cfg.chunking
            n = policy.chunk(remaining, budget, tpb)
            if n <= 0:
                # a context that gets no tokens this iteration blocks the ones behind it
                # (head-of-line, as TensorRT-LLM's MicroBatchScheduler does without
                # chunking): overtaken forever, a long prompt would starve while the
                # running decodes never leave it the budget. With chunking this happens
                # only when less than one block of budget is left (a chunk that does not
                # finish a prompt is whole blocks); TensorRT-LLM would still let a later
                # prompt whose whole remainder fits pass, which can starve the first when
                # max_num_tokens < max_batch_size + tokens_per_block: here it waits.
                break
            chunks.append(ContextChunk(req, n, req.context_done, n == remaining))
            budget -= n
        n_dec = self.n_dec
        if not chunks and not n_dec:
            raise RuntimeError("engine has context requests but could schedule none (livelock)")
        kv.grow((self.hist[(-it) % tpb] if n_dec else 0) + (drafts[4] if drafts is not None else 0))
        padded = 0
        piecewise = 0
        if not chunks:
            if cfg.graph_padding is not None:
                padded = cfg.graph_padding.padded(n_dec)
        elif cfg.piecewise_padding is not None:
            piecewise = cfg.piecewise_padding.padded(n_dec + sum(c.num_tokens for c in chunks)
                                                     + (drafts[3] if drafts is not None else 0))
        onboards = kv.pending_onboard
        kv.pending_onboard = 0
        swap_out = self.pending_swap_out
        self.pending_swap_out = 0
        copies = kv.pending_copies
        if copies:
            kv.pending_copies = []
        shape = IterationShape(
            ctx_new_tokens=tuple([c.num_tokens for c in chunks]),
            ctx_prior_tokens=tuple([c.prior_tokens for c in chunks]),
            n_ctx_sampling=sum([c.is_last for c in chunks]),
            n_decode=n_dec,
            decode_kv_sum=self.off_sum + n_dec * it,
            decode_kv_max=self._max_off() + it if n_dec else 0,
            graph=padded > 0,
            padded_decode=padded,
            piecewise_tokens=piecewise,
            host_to_gpu_bytes=onboards * cfg.kv_block_bytes,
            gpu_to_host_bytes=swap_out * cfg.kv_block_bytes,
            decode_draft_tokens=drafts[3] if drafts is not None else 0,
            draft_steps=max(drafts[1], default=0) if drafts is not None else 0,
        )
        generation: list[Request] = []
        swap_out: list[tuple[int, list[int]]] = []
        swap_in: list[int] = []
        if self.needs_block_ids:
            swap_out, self.pending_swap_out_ids = self.pending_swap_out_ids, []
            swap_in, self.pending_swap_in = self.pending_swap_in, []
            generation = list(self.decoding.values())
            for c in chunks:
                kv.sync(c.request, c.prior_tokens + c.num_tokens)
            for j, r in enumerate(generation):
                kv.sync(r, r.kv_len_at(it) + 1 + (drafts[2][j] if drafts is not None else 0))
        used_during = kv.used  # blocks in use while the iteration runs (before releases)
        batch = ScheduledBatch(it, shape, chunks, generation, copies, swap_out, swap_in)
        if drafts is not None:
            batch.drafts = list(zip((r.request_id for r in drafts[0]), drafts[1]))
        result = self.executor.execute(batch)
        end = now + result.duration_s
        proposed = accepted = 0
        if drafts is not None:
            proposed, accepted = self._apply_drafts(it, drafts, result.accepted)
        ctx_tokens = 0
        for c in chunks:
            req = c.request
            ctx_tokens += c.num_tokens
            if req.first_scheduled_s != req.first_scheduled_s:  # NaN: first time
                req.first_scheduled_s = now
            req.context_done += c.num_tokens
            if c.is_last:
                self.context.remove(req)
                if self.cache is not None and req.block_keys:
                    self._cache_prompt_blocks(req, end)
                req.generated += 1
                req.spans.append((it, 1))
                if req.generated >= req.output_len and not cfg.overlap:
                    self._finish(req, blocks_for(req.context_target, tpb))
                else:
                    self._enter_generation(req, it)
        if self.finish_heap and self.finish_heap[0][0] <= it:
            self._pop_finishes(it)
        ev, off = self._cache_counters() if self.cache is not None else (0, 0)
        self.rows.append(IterationRecord(  # (positional, in the fields' order: a third of the keyword call's time)
            it,  # iteration
            now,  # start_s
            self.executor.iteration_duration(now, result),  # duration_s
            len(chunks),  # num_ctx_requests
            n_dec,  # num_gen_requests
            ctx_tokens,
            n_dec + shape.decode_draft_tokens,  # gen_tokens
            (padded - n_dec if padded else  # padded_tokens
             piecewise - n_dec - shape.decode_draft_tokens - ctx_tokens if piecewise else 0),
            used_during,  # kv_blocks_used
            kv.cached,  # kv_blocks_cached
            self.cache.host_used if self.cache else 0,  # kv_blocks_host
            ev,  # evictions
            off,  # offloads
            onboards,
            padded > 0 or piecewise > 0,  # graph
            shape.decode_kv_sum,  # decode_kv_tokens
            sum(shape.ctx_prior_tokens),  # ctx_cached_tokens
            proposed,  # draft_tokens_proposed
            accepted))  # draft_tokens_accepted
        self.g = it + 1
        if cfg.check_invariants:
            self.check_invariants()
        self._last_start, self._last_end = now, end
        return end

    def _draft_lens(self, it: int, budget: int):
        """Draft tokens of each generation request this iteration, fitted to the token
        budget and (MAX_UTILIZATION) to the free blocks: (requests, draft lengths, verified
        tokens each, their sum, extra KV blocks they write)."""
        spec = self.cfg.speculation
        tpb = self.tpb
        reqs = list(self.decoding.values())
        draft_len = spec.draft_len
        # tokens still to emit before this step: output_len - (generated + it - gen_base_iter)
        ks = [draft_len(r.output_len - r.generated - it + r.gen_base_iter) for r in reqs]
        ks = fit_draft_lens(ks, budget)
        verify = spec.verify_tokens
        vt = [verify(k) for k in ks]
        if sum(vt) > budget:
            vt = ks
        extra = 0
        for r, v in zip(reqs, vt):
            if v:
                kv_b = r.prompt_len + r.generated + it - r.gen_base_iter  # kv_len_at(it) + 1
                extra += (kv_b + v - 1) // tpb - (kv_b - 1) // tpb  # blocks_for(kv_b + v) - blocks_for(kv_b)
        if (extra and self.cfg.capacity.pauses_on_shortage
                and self.hist[(-it) % tpb] + extra > self.kv.available):
            ks = [0] * len(reqs)  # no room for the drafts' KV this step: plain decoding
            vt = ks
            extra = 0
        return reqs, ks, vt, sum(vt), extra

    def _apply_drafts(self, it: int, drafts, accepted: list[int]) -> tuple[int, int]:
        """The step's outcome: each request emits its accepted drafts and one token more;
        the KV of rejected drafts is rolled back. Returns (proposed, accepted) drafts."""
        reqs, ks, vt, _, _ = drafts
        if len(accepted) != len(reqs):
            raise RuntimeError(f"iteration {it}: the executor accepted drafts of {len(accepted)} requests, "
                               f"{len(reqs)} were proposed")
        tpb = self.tpb
        kv = self.kv
        hist = self.hist
        kmax = self.cfg.speculation.max_draft_len
        n_k = [0] * (kmax + 1)  # requests by draft length, and by accepted drafts
        n_a = [0] * (kmax + 1)
        rollback = 0
        gained = 0
        heap = self.finish_heap
        one = (it, 1)
        for r, k, v, a in zip(reqs, ks, vt, accepted):
            if a < 0 or a > k:
                raise RuntimeError(f"iteration {it}: request {r.request_id} accepted {a} of {k} drafts")
            n_k[k] += 1
            n_a[a] += 1
            if a:
                r.spans.extend([one] * (a + 1))
            else:
                r.spans.append(one)
            if v:
                kv_b = r.prompt_len + r.generated + it - r.gen_base_iter  # kv_len_at(it) + 1: KV without drafts
                keep = (kv_b + a - 1) // tpb + 1  # blocks_for(kv_b + a)
                rollback += (kv_b + v - 1) // tpb + 1 - keep
                if len(r.blocks) > keep:
                    kv.free_ids.extend(reversed(r.blocks[keep:]))
                    del r.blocks[keep:]
            if a:
                off = r.prompt_len + r.generated - r.gen_base_iter  # _off(r)
                hist[(off - 1) % tpb] -= 1
                hist[(off + a - 1) % tpb] += 1
                gained += a
                r.gen_base_iter -= a
                self._push_off(r, off + a)
                r.finish_iter -= a
                heapq.heappush(heap, (r.finish_iter, r.admit_seq, r))
        self.off_sum += gained
        kv.used -= rollback
        # requests with >= i + 1 drafts proposed / accepted, i = 0..kmax-1
        prop_pos = [0] * kmax
        acc_pos = [0] * kmax
        cp = ca = 0
        for i in range(kmax, 0, -1):
            cp += n_k[i]
            ca += n_a[i]
            prop_pos[i - 1] = cp
            acc_pos[i - 1] = ca
        self.draft_positions.append((it, tuple(prop_pos), tuple(acc_pos)))
        return sum(ks), gained

    def _cache_counters(self) -> tuple[int, int]:
        """Evictions and offloads since the step began."""
        if self.cache is None:
            return 0, 0
        st = self.cache.stats
        return st.dropped + st.offloaded - self._ev0, st.offloaded - self._off0

    def _cache_prompt_blocks(self, req: Request, now: float) -> None:
        """Offer the request's freshly computed full prompt blocks to the prefix cache."""
        tpb = self.tpb
        n_full = min(len(req.block_keys), req.prompt_len // tpb)
        start = len(req.nodes)
        if start >= n_full:
            return
        self.kv.sync(req, req.context_target)
        spec = req.retention
        keys = req.block_keys
        contents = req.block_contents
        if spec is None:
            prios = None
        else:
            prios = [spec.block_priority(i, tpb, req.prompt_len) for i in range(start, n_full)]
        # steps over keys another request cached meanwhile (those blocks stay private)
        new, idx = self.cache.insert_many(keys, req.blocks, start, n_full, prios, contents, req.tenant)
        req.nodes.extend(new)
        req.node_blocks.extend(idx)
        inserted = len(new)
        if self.kv.reserving:
            req.reserved_blocks -= inserted  # now counted as shared blocks in kv.reserved

    def _pop_finishes(self, last_it: int) -> None:
        heap = self.finish_heap
        while heap and heap[0][0] <= last_it:
            f, _, req = heapq.heappop(heap)
            if req.phase != Phase.GENERATION or req.finish_iter != f:
                continue  # stale entry of a paused request
            self._finish(req, self._leave_generation(req, f))

    def _next_finish(self) -> int:
        heap = self.finish_heap
        while heap:
            f, _, req = heap[0]
            if req.phase == Phase.GENERATION and req.finish_iter == f:
                return f
            heapq.heappop(heap)
        raise RuntimeError("generation requests but no finish scheduled")

    def _stretch(self, now: float, horizon: float) -> float | None:
        cfg = self.cfg
        tpb = self.tpb
        g0 = self.g
        n = self.n_dec
        plans = self._plans
        plan = plans.get(n) if plans is not None else None
        if plan is None:
            padded = cfg.graph_padding.padded(n) if cfg.graph_padding is not None else 0
            price = self.executor.plan_decode_stretch(n, padded)
            if price is None:
                return None
            plan = (padded, *price)
            if plans is not None:
                plans[n] = plan
        padded, fixed, per_kv = plan[0], plan[1], plan[2]
        kv0 = self.off_sum + n * g0
        heap = self.finish_heap  # the next finish: its top entry when current, else _next_finish
        top = heap[0] if heap else None
        K = (top[0] if top is not None and top[2].phase == Phase.GENERATION and top[2].finish_iter == top[0]
             else self._next_finish()) - g0 + 1
        if len(plan) > 3 and plan[3]:  # the split bound's line: on whichever line holds, cut where they cross
            fixed, per_kv, K = _stretch_line(fixed, per_kv, plan[3], plan[4], kv0, self._max_off() + g0, n, K)
        if horizon < INF:  # at least one: a horizon at `now` asks for exactly one
            K = min(K, max(1, _iterations_before(max(horizon - now, 0.0), fixed, per_kv, kv0, n)))
        hist = self.hist
        p0 = (-g0) % tpb
        if cfg.capacity.pauses_on_shortage:
            K = min(K, _kv_steps(self.kv.available, hist, p0, n, tpb))
            if K == 0:
                return None
        total = K * fixed + per_kv * (K * kv0 + n * K * (K - 1) / 2)
        full, part = divmod(K, tpb)
        # the last `part` iterations' new blocks: residues p0, p0 - 1, ... (mod tpb), whole
        # slices of the histogram (integers: the same sum as one by one)
        if part <= p0 + 1:
            new_blocks = full * n + sum(hist[p0 + 1 - part:p0 + 1])
        else:
            new_blocks = full * n + sum(hist[:p0 + 1]) + sum(hist[tpb - (part - p0 - 1):])
        kv = self.kv
        used0 = kv.used
        # Blocks the whole stretch needs are taken (evicting cached ones) at its start: no
        # lookup can happen inside a stretch, so reuse is unaffected; only the iteration an
        # eviction is recorded at moves to the stretch's first.
        kv.grow(new_blocks)
        cache = self.cache
        ev, off = self._cache_counters() if cache is not None else (0, 0)
        self.stretches.append(StretchRecord(g0, K, now, fixed, per_kv, kv0, n, used0, p0, padded, kv.cached,
                                            cache.host_used if cache else 0, ev, off))
        self.stretch_hist.append(hist.tobytes())
        self.g = g0 + K
        if self.finish_heap and self.finish_heap[0][0] <= g0 + K - 1:
            self._pop_finishes(g0 + K - 1)
        if cfg.check_invariants:
            self.check_invariants()
        self._last_start = now + (K - 1) * fixed + per_kv * ((K - 1) * kv0 + n * (K - 1) * (K - 2) / 2)
        self._last_end = now + total
        return self._last_end

    def finish(self) -> None:
        """The run is over (or idle): let the executor complete what is in flight, and
        record the ends it learnt only now (an overlapped GPU's iterations)."""
        ends = self.executor.finish()
        if not ends:
            return
        rows = self.rows
        for it, end in ends.items():
            k = bisect.bisect_left(rows, it, key=_iteration_of)
            if k == len(rows) or rows[k].iteration != it:
                raise RuntimeError(f"the executor reported the end of iteration {it}, which the engine did not run")
            rows[k] = rows[k]._replace(duration_s=max(end - rows[k].start_s, 0.0))

    # ------------------------------------------------------------------ checks
    def live(self) -> list[tuple[Request, int]]:
        """Every live request with its logical KV block count (after the last iteration)."""
        out = [(r, blocks_for(r.context_target, self.tpb)) for r in self.context]
        last = self.g - 1
        for r in self.decoding.values():
            out.append((r, blocks_for(self._off(r) + last, self.tpb)))
        return out

    def check_invariants(self) -> None:
        live = self.live()
        for req, n in live:
            self.kv.sync(req, n * self.tpb)
        self.kv.check(live)
        if self.cache is not None:
            for req, _ in live:  # a reused block holds exactly the request's tokens
                assert len(req.node_blocks) == len(req.nodes), "cache nodes without their block index"
                assert all(a < b for a, b in zip(req.node_blocks, req.node_blocks[1:])), "node indices unordered"
                for i, node in zip(req.node_blocks, req.nodes):
                    assert node.key == req.block_keys[i], "cached block with another key"
                    if req.block_contents is not None and node.content is not None:
                        assert node.content == req.block_contents[i], "cached block with other tokens"
        assert self.n_dec == len(self.decoding)
        assert self.n_active() <= self.cfg.max_batch_size, "more active requests than max_batch_size"
        if not self.cfg.capacity.pauses_on_shortage:
            assert self.kv.used <= self.kv.reserved, (
                f"{self.kv.used} KV blocks in use but {self.kv.reserved} reserved: a capacity policy that never "
                "pauses (pauses_on_shortage False) must reserve every block its requests will use, or the "
                "running requests outgrow the pool")


class _WaitingViews:
    """The first `n` waiting requests as read-only WaitingViews, each built when read."""

    __slots__ = ("_waiting", "_n")

    def __init__(self, waiting: deque, n: int):
        self._waiting = waiting
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        r = self._waiting[i]
        return WaitingView(r.request_id, r.arrival_s, r.prompt_len, r.output_len, r.priority, r.tenant, r.preemptions)

    def __iter__(self):
        for j in range(self._n):
            yield self[j]


def _arrival_of(r: Request) -> float:
    return r.arrival_s


def _iteration_of(r: IterationRecord) -> int:
    return r.iteration


def _stretch_line(f: float, a: float, d: float, e: float, kv0: int, L0: int, n: int,
                  K: int) -> tuple[float, float, int]:
    """A stretch's price on the line that holds: iteration k lasts f + max(a*kv, d*L + e*kv)
    with kv = kv0 + n*k (the KV sum) and L = L0 + k (the longest sequence). The first
    iterations' line -- the larger at k = 0 -- holds up to where they cross (their difference
    is affine in k): (fixed, per_kv, iterations) of that many iterations on it, the second
    written in the KV sum (d*(L0 + k) = d*L0 - d*kv0/n + d/n * kv)."""
    def split(k: int) -> bool:
        kv = kv0 + n * k
        return d * (L0 + k) + e * kv > a * kv

    b0 = split(0)
    if split(K - 1) != b0:
        slope = d + (e - a) * n  # the difference changes sign once
        k = max(1, min(K - 1, int(((a - e) * kv0 - d * L0) / slope))) if slope else K - 1
        while k > 1 and split(k - 1) != b0:
            k -= 1
        while k < K and split(k) == b0:
            k += 1
        K = k
    if b0:
        return f + d * L0 - d * kv0 / n, e + d / n, K
    return f, a, K


def _iterations_before(h: float, f: float, a: float, kv0: int, n: int) -> int:
    """How many iterations of a stretch start strictly before `h` seconds from now.

    Iteration k lasts f + a*(kv0 + n*k), so it starts at
    s(k) = k*f + a*(k*kv0 + n*k*(k-1)/2), written out below (this runs once a stretch).
    """
    A = a * n / 2
    B = f + a * kv0 - A
    if A > 0:
        k = int((-B + math.sqrt(B * B + 4 * A * h)) / (2 * A))
    elif B > 0:
        k = int(h / B)
    else:
        raise ValueError("decode iterations must take positive time")
    if k < 0:
        k = 0
    while k > 0 and k * f + a * (k * kv0 + n * k * (k - 1) / 2) >= h:
        k -= 1
    k1 = k + 1
    while k1 * f + a * (k1 * kv0 + n * k1 * (k1 - 1) / 2) < h:
        k1 += 1
    return k1


def _kv_steps(free: int, hist: list[int], p0: int, n: int, tpb: int) -> int:
    """Largest K such that the first K iterations' new blocks fit in `free`."""
    full = free // n
    left = free - full * n
    j = 0
    while True:
        h = hist[(p0 - j) % tpb]
        if h > left:
            return full * tpb + j
        left -= h
        j += 1
