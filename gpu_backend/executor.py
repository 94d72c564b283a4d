"""The GPU executor: runs each `ScheduledBatch` of the engine on a real Llama model.

`GpuExecutor` implements the engine's `Executor` protocol (sim/types.py): it
``needs_block_ids`` (the engine hands it the requests and their KV block ids), plans no
closed-form decode stretch, and measures each iteration's wall time. One `execute(batch)`
runs the batch's swap-outs, block copies and swap-ins, packs the iteration (context
chunks first, then the generation requests; decode inputs gathered on the device from
per-slot token buffers), runs it through the CUDA-graph runner, the piecewise runner or
the eager forward, and samples. `prompt_token_ids` gives each request's prompt ids (its
own, derived from its block hashes, or seeded pseudo-random ones). With ``overlap=True``
(``runtime.overlap_scheduler``) `execute(n)` launches iteration n and waits for n-1
instead, so the host's work overlaps the GPU's; iterations' ends reach the engine by `finish()`.

The execute steps, prompt token ids and overlap mode in full: docs/gpu_backend.md.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Sequence
from typing import Callable

import numpy as np
import torch

from servesim.sim.types import Phase, Request, ScheduledBatch, StepResult

from ..traces.hashing import GOLDEN as _GOLDEN
from ..traces.hashing import splitmix64 as _mix64
from .graph_runner import GraphRunner
from .model import AttnMetadata, ContextChunkInput, DecodeInput, LlamaModel, Sampler
from .piecewise_runner import PiecewiseRunner
from .speculative import (DraftModel, GpuSpeculation, NgramIndex, controlled_emit, greedy_verify, race_sample,
                          rejection_verify, sampling_probs)

# --------------------------------------------------------------------------------------
# prompt token ids
# --------------------------------------------------------------------------------------

_SALT_REQ = np.uint64(0x5EED0F5E9E51D00D)
_SALT_HASH = np.uint64(0xB10C4A5B10C4A5B1)
_MASK64 = (1 << 64) - 1


def _u64(values: Sequence[int] | int) -> np.ndarray:
    if isinstance(values, (int, np.integer)):
        values = [values]
    return np.array([int(v) & _MASK64 for v in values], dtype=np.uint64)


def prompt_token_ids(req: Request, seed: int, vocab_size: int, hash_block_size: int | None = None) -> np.ndarray:
    """The prompt of ``req`` as int64 token ids in ``[0, vocab_size)`` (see the module doc).

    * ``req.prompt_tokens`` when given (ValueError if an id is outside the vocabulary);
    * else, with ``req.block_hashes`` at ``hash_block_size`` tokens a block: token ``j``
      of workload block ``b`` is ``mix(mix(seed, block_hashes[b]), j) mod vocab_size`` --
      a function of the block's hash (which digests its content and length) only;
    * else token at position ``p`` is ``mix(mix(seed, request_id), p) mod vocab_size``.

    Positions past the hashed blocks (a trace with fewer hashes than its prompt needs)
    fall back to the per-request rule.
    """
    n = int(req.prompt_len)
    if req.prompt_tokens is not None:
        toks = np.asarray(req.prompt_tokens, dtype=np.int64)
        if toks.shape != (n,):
            raise ValueError(f"request {req.request_id}: {toks.size} prompt_tokens for prompt_len {n}")
        if n and (int(toks.min()) < 0 or int(toks.max()) >= vocab_size):
            raise ValueError(f"request {req.request_id}: prompt token id outside the model's vocabulary "
                             f"[0, {vocab_size})")
        return toks
    vocab = np.uint64(vocab_size)
    s = _mix64(_u64(seed) ^ _SALT_REQ)
    pos = np.arange(n, dtype=np.uint64)
    out = np.empty(n, dtype=np.uint64)
    covered = 0
    if req.block_hashes is not None and hash_block_size:
        H = int(hash_block_size)
        covered = min(n, len(req.block_hashes) * H)
        if covered:
            hb = _mix64(_u64(req.block_hashes) ^ _SALT_HASH ^ s)
            b = np.arange(covered) // H
            j = (np.arange(covered) % H + 1).astype(np.uint64)
            out[:covered] = _mix64(hb[b] + j * _GOLDEN) % vocab
    if covered < n:
        r = _mix64(_u64(req.request_id) ^ s)
        out[covered:] = _mix64(r + (pos[covered:] + np.uint64(1)) * _GOLDEN) % vocab
    return out.astype(np.int64)


# --------------------------------------------------------------------------------------
# per-request state
# --------------------------------------------------------------------------------------


class _Seq:
    """The executor's state for one request (while it is live, and while paused)."""

    __slots__ = ("req", "prompt", "out", "slot", "blocks", "nb", "last_it", "swap", "dlen", "dswap", "ngram")

    def __init__(self, req: Request, prompt: np.ndarray, out: array):
        self.req = req
        self.prompt = prompt  # int64 [prompt_len]
        self.out = out  # generated token ids (host), shared with GpuExecutor.outputs
        self.slot = -1  # row of the block table / token buffer (-1: none)
        self.blocks: list[int] | None = None  # the engine's block list this slot mirrors
        self.nb = 0  # block ids of `blocks` copied into the slot's table row
        self.last_it = -1
        self.swap: torch.Tensor | None = None  # its KV blocks on the host while swapped out
        # speculative decoding: positions [0, dlen) of the drafter's KV hold its tokens; the
        # drafter's KV blocks on the host while swapped out; its n-gram index
        self.dlen = 0
        self.dswap: torch.Tensor | None = None
        self.ngram: NgramIndex | None = None


class _InFlight:
    """An iteration whose sampled tokens have not been read on the host yet."""

    __slots__ = ("iteration", "rids", "host", "event", "done_s")

    def __init__(self, iteration: int, rids: list[int], host: torch.Tensor, event, done_s: float | None):
        self.iteration = iteration
        self.rids = rids
        self.host = host  # sampled tokens: pinned host buffer (CUDA) or the tokens (CPU)
        self.event = event  # CUDA event after the device-to-host copy; None on a CPU
        self.done_s = done_s  # CPU: clock() when computed (synchronous); None on CUDA


def verify_sizes(graph_sizes: Sequence[int], max_draft_len: int) -> list[int]:
    """Token counts of the verification's piecewise graphs: a decode-only iteration of n
    requests with up to k drafts each has at most ``padded(n) * (1 + k)`` tokens, so the
    graph sizes times 1 + k cover every one of them."""
    return sorted({int(b) * (1 + int(max_draft_len)) for b in graph_sizes})


def _compile_attention_variants(model: LlamaModel, pool, block_size: int) -> None:
    """Compile every attention-kernel variant a run can meet (each decode split count,
    both prefill tile heights) now, so no iteration stalls on a Triton compilation."""
    from servesim.kernels import ops
    from servesim.kernels.decode_attention import MAX_SPLITS

    d = model.dims
    kc, vc = pool.k_cache(0), pool.v_cache(0)
    dev, dt, bs = model.device, model.dtype, block_size
    scale = d.head_dim ** -0.5
    bt = torch.zeros(2, 1, dtype=torch.int32, device=dev)  # block 0 only (never read back)
    sl = torch.full((2,), min(bs, 4), dtype=torch.int32, device=dev)
    q = torch.zeros(2, d.num_heads, d.head_dim, dtype=dt, device=dev)
    s = 1
    while s <= MAX_SPLITS:
        ops.paged_decode_attention(q, kc, vc, bt, sl, scale, num_splits=s)
        s *= 2
    for t in (4, 300):  # chunks of <= 256 tokens per sequence use 64-row tiles, longer 128
        qp = torch.zeros(t, d.num_heads, d.head_dim, dtype=dt, device=dev)
        cu = torch.tensor([0, t], dtype=torch.int32, device=dev)
        bt1 = torch.zeros(1, -(-t // bs), dtype=torch.int32, device=dev)
        ops.paged_prefill_attention(qp, kc, vc, bt1, cu, torch.tensor([t], dtype=torch.int32, device=dev), scale)


# --------------------------------------------------------------------------------------
# the executor
# --------------------------------------------------------------------------------------


class GpuExecutor:
    """Runs scheduled batches on ``model`` over a KV pool of ``num_blocks`` blocks.

    ``graph_sizes``: the padded batch sizes of the engine's ``GraphPadding`` (None: CUDA
    graphs off; the engine then never marks an iteration ``graph``). ``piecewise_sizes``:
    the padded token counts of the engine's piecewise ``GraphPadding`` (None: piecewise
    graphs off; the engine then never sets ``piecewise_tokens``). ``max_seq_len``: the
    longest KV length any request reaches (sizes the static block tables of the graphs;
    default the model's positions). ``overlap``: see the module docstring. ``seed`` seeds
    the synthetic prompt tokens and the sampler. ``hash_block_size``: tokens per workload
    block hash (for prompts given as ``block_hashes``). ``use_graphs``: capture CUDA graphs
    (default: on a CUDA device). ``clock``: time source for ``completed_s`` (the GPU driver
    sets it to its own wall clock: ``start_clock``). ``speculation``: speculative decoding
    (`speculative.GpuSpeculation`: the proposer, its drafter, the acceptance mode; not with
    ``overlap``); iterations with drafts run the drafter and verify the drafts
    (gpu_backend/speculative.py), decode-only ones through piecewise CUDA graphs of the
    verification's token counts when ``graph_sizes`` are given, else eagerly. ``kv_scales``:
    an fp8 pool's per-layer (key, value) scales (`calibrated_kv_scales`; default 1.0; a
    drafter's pool keeps 1.0).
    """

    needs_block_ids = True
    fixed_stretch_plans = False  # (plans no stretch: every iteration runs)
    # the runners it builds (gpu_backend/tp.py's executor builds ones that broadcast first)
    graph_runner_cls = GraphRunner
    piecewise_runner_cls = PiecewiseRunner

    def __init__(self, model: LlamaModel, num_blocks: int, tokens_per_block: int, *,
                 graph_sizes: Sequence[int] | None = None, piecewise_sizes: Sequence[int] | None = None,
                 max_seq_len: int | None = None,
                 overlap: bool = False, seed: int = 0, temperature: float = 0.0, top_p: float = 1.0,
                 hash_block_size: int | None = None, kv_dtype: torch.dtype | None = None,
                 use_graphs: bool | None = None, clock: Callable[[], float] | None = None,
                 speculation: GpuSpeculation | None = None,
                 kv_scales: tuple[Sequence[float], Sequence[float]] | None = None):
        self.model = model
        self.device = model.device
        self.cuda = self.device.type == "cuda"
        self.block_size = bs = int(tokens_per_block)
        ks, vs = kv_scales if kv_scales is not None else (None, None)
        self.kv_pool = model.make_kv_pool(int(num_blocks), bs, kv_dtype, k_scales=ks, v_scales=vs)
        self.vocab_size = model.dims.vocab_size
        self.seed = int(seed)
        self.hash_block_size = hash_block_size
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.sampler = Sampler(seed, self.device)
        # sampling parameters as device tensors when they are used (no per-step host copy)
        self._temp = self.temperature if self.temperature <= 0 else torch.tensor(self.temperature, device=self.device)
        self._top_p = self.top_p if self.top_p >= 1 else torch.tensor(self.top_p, device=self.device)
        self.overlap = bool(overlap)
        self.clock = clock or time.perf_counter
        max_seq_len = int(max_seq_len or model.max_positions)
        self.max_blocks = max(1, -(-max_seq_len // bs))
        self.graph_runner: GraphRunner | None = None
        if graph_sizes:
            self.graph_runner = self.graph_runner_cls(model, self.kv_pool, graph_sizes, self.max_blocks, use_graphs)
        self.piecewise_runner: PiecewiseRunner | None = None
        if piecewise_sizes:
            self.piecewise_runner = self.piecewise_runner_cls(model, self.kv_pool, piecewise_sizes, use_graphs)
        # speculative decoding
        self.spec = speculation
        self.drafter: DraftModel | None = None
        self.verify_runner: PiecewiseRunner | None = None
        self._acceptance = None
        if speculation is not None:
            if self.overlap:
                raise ValueError("speculative decoding needs the accepted tokens before the next step: "
                                 "not with the overlap scheduler")
            if speculation.drafter is not None:
                dm = speculation.drafter
                if dm.dims.vocab_size != self.vocab_size:
                    raise ValueError(f"the drafter's vocabulary ({dm.dims.vocab_size}) is not the target's "
                                     f"({self.vocab_size})")
                if dm.device != self.device:
                    raise ValueError(f"the drafter is on {dm.device}, the target on {self.device}")
                self.drafter = DraftModel(dm, int(num_blocks), bs, kv_dtype=kv_dtype, graph_sizes=graph_sizes,
                                          max_blocks=self.max_blocks, use_graphs=use_graphs)
            if graph_sizes:
                self.verify_runner = PiecewiseRunner(model, self.kv_pool,
                                                     verify_sizes(graph_sizes, speculation.max_draft_len), use_graphs)
            self._acceptance = speculation.acceptance_model()
        # blocks at the end of a request's list that a rollback of rejected drafts may change
        self._spec_tail = 0 if speculation is None else -(-speculation.max_draft_len // bs) + 1
        self.spec_iterations = 0  # iterations that verified drafts
        self.verify_graph_iterations = 0  # ... of those, through the verification's piecewise graphs
        self.drafts_proposed = 0
        self.drafts_accepted = 0
        # slot tables: row 0 is the padding slot (token 0, block table of zeros)
        self._cap = 0
        self._bt = np.zeros((0, self.max_blocks), dtype=np.int32)
        self._token_buf = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._free_slots: list[int] = []
        self._grow_slots(64)
        self._seqs: dict[int, _Seq] = {}
        self._pending: _InFlight | None = None
        # outputs
        self.outputs: dict[int, array] = {}  # request_id -> generated token ids
        self._out_len: dict[int, int] = {}  # request_id -> tokens it keeps (output_len)
        self.completed_s: dict[int, float] = {}  # iteration -> clock() when its tokens were on the host
        self._unreported: dict[int, float] = {}  # ... of those, overlapped ones the engine has not been told
        # per iteration: host seconds from execute() to the forward's launch (input
        # preparation), and execute()'s whole wall time (prep + GPU + sync, without overlap)
        self.prep_s: dict[int, float] = {}
        self.exec_s: dict[int, float] = {}
        self.graph_iterations = 0  # iterations run through the graph runner
        self.piecewise_iterations = 0  # iterations run through the piecewise runner
        self.eager_iterations = 0
        self.iterations = 0
        self.launch_s = 0.0  # host time in execute() up to the launch of the GPU work
        self.wait_s = 0.0  # host time blocked on the GPU (syncs and event waits)

    # ------------------------------------------------------------------ set-up
    def warmup(self) -> None:
        """Capture the CUDA graphs (decode and piecewise) and run a few eager shapes (Triton
        compilation) before the clock starts. Writes only to block 0, which every request
        overwrites before reading it (a request reads only KV positions that it, or the
        cached prefix it reuses, wrote), so the KV pool needs no reset."""
        if self.graph_runner is not None:
            self.graph_runner.capture()
        if self.piecewise_runner is not None:
            self.piecewise_runner.capture()
        if self.verify_runner is not None:
            self.verify_runner.capture()
        if self.drafter is not None:
            self.drafter.warmup()
            dm = self.drafter.model
            n = min(self.block_size + 1, dm.max_positions, self.block_size * self.max_blocks)
            dm.step([ContextChunkInput([0] * n, 0, [0] * -(-n // self.block_size))], [DecodeInput(0, 0, [0])],
                    self.drafter.pool)
            if self.cuda:
                _compile_attention_variants(dm, self.drafter.pool, self.block_size)
        bs = self.block_size
        n = min(bs + 1, self.model.max_positions, bs * self.max_blocks)
        zeros = [0] * self.max_blocks
        shapes = (([ContextChunkInput([0], 0, [0])], []),
                  ([ContextChunkInput([0] * n, 0, zeros[:-(-n // bs)])], [DecodeInput(0, 0, [0])]),
                  ([], [DecodeInput(0, 0, [0])] * 16))
        for chunks, decs in shapes:
            logits = self.model.step(chunks, decs, self.kv_pool)
            self.sampler(logits, self._temp, self._top_p)
        if self.cuda:
            _compile_attention_variants(self.model, self.kv_pool, self.block_size)
            torch.cuda.synchronize(self.device)

    def _grow_slots(self, cap: int) -> None:
        old = self._cap
        if cap <= old:
            return
        bt = np.zeros((cap, self._bt.shape[1]), dtype=np.int32)
        bt[:old] = self._bt
        self._bt = bt
        tb = torch.zeros(cap, dtype=torch.int64, device=self.device)
        if old:
            tb[:old].copy_(self._token_buf)
        self._token_buf = tb
        start = max(old, 1)  # slot 0 stays the padding slot
        self._free_slots.extend(range(cap - 1, start - 1, -1))
        self._cap = cap

    def _widen(self, width: int) -> None:
        if width <= self._bt.shape[1]:
            return
        bt = np.zeros((self._cap, max(width, 2 * self._bt.shape[1])), dtype=np.int32)
        bt[:, :self._bt.shape[1]] = self._bt
        self._bt = bt

    # ------------------------------------------------------------------ request state
    def _seq(self, req: Request, it: int) -> _Seq:
        rid = req.request_id
        st = self._seqs.get(rid)
        if st is None:
            out = self.outputs.get(rid)
            if out is None:
                out = self.outputs[rid] = array("q")
            st = self._seqs[rid] = _Seq(req, prompt_token_ids(req, self.seed, self.vocab_size,
                                                              self.hash_block_size), out)
            self._out_len[rid] = req.output_len
        if st.slot < 0:
            if not self._free_slots:
                self._grow_slots(2 * self._cap)
            st.slot = self._free_slots.pop()
            st.blocks = None
        blocks = req.blocks
        if st.blocks is not blocks or len(blocks) < st.nb:
            st.blocks = blocks
            st.nb = 0
        n = len(blocks)
        lo = st.nb
        if self._spec_tail and lo:
            # the engine rolls back the blocks of rejected drafts (deleting them from the
            # list's end) and appends others later: the tail may hold other ids at the same length
            lo = max(0, min(lo, n) - self._spec_tail)
        if n > lo:
            if n > self._bt.shape[1]:
                self._widen(n)
            self._bt[st.slot, lo:n] = blocks[lo:n]
            st.nb = n
        st.last_it = it
        return st

    def _context_tokens(self, st: _Seq, a: int, b: int) -> np.ndarray:
        """Tokens ``[a, b)`` of the request's context sequence (prompt, then generated)."""
        P = st.prompt.shape[0]
        if b <= P:
            return st.prompt[a:b]
        need = b - P
        if len(st.out) < need and self._pending is not None:
            self._collect()  # a recompute whose context includes a token still in flight
        if len(st.out) < need:
            raise RuntimeError(f"request {st.req.request_id}: context up to {b} tokens needs {need} generated "
                               f"tokens, only {len(st.out)} were sampled")
        gen = np.frombuffer(st.out[max(a - P, 0):need], dtype=np.int64)  # a copy of the slice
        return np.concatenate([st.prompt[a:], gen]) if a < P else gen

    def _cleanup(self, it: int) -> None:
        """Free the slots of requests that finished or were paused (seen at an earlier
        iteration and not scheduled now)."""
        for rid, st in list(self._seqs.items()):
            if st.last_it == it:
                continue
            ph = st.req.phase
            if ph == Phase.FINISHED or ph == Phase.REJECTED:
                if st.slot >= 0:
                    self._free_slots.append(st.slot)
                del self._seqs[rid]
            elif ph == Phase.WAITING and st.slot >= 0 and st.swap is None:  # paused: recomputes
                self._free_slots.append(st.slot)
                st.slot = -1
                st.blocks = None
                st.nb = 0
            # (a swapped-out request keeps its slot: token_buf[slot] holds its last token)

    # ------------------------------------------------------------------ transfers
    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        if not self.cuda:
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        ids = np.asarray(copies, dtype=np.int64).reshape(-1, 2)
        n = self.kv_pool.num_blocks
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            raise IndexError(f"block copy with an id outside [0, {n})")
        d = self._to_device(np.ascontiguousarray(ids.T).ravel())
        self.kv_pool.copy_blocks(d[:len(ids)], d[len(ids):])
        if self.drafter is not None:  # the drafter's KV of a request lives in the same block ids
            self.drafter.pool.copy_blocks(d[:len(ids)], d[len(ids):])

    def _swap_out(self, swap_out: list[tuple[int, list[int]]]) -> None:
        """Copy to the host the KV of requests the engine paused by swapping this iteration.

        The engine has already released their block ids (they may be reused by this very
        iteration); the copy is queued before the iteration's forward pass, so it reads
        the blocks before anything overwrites them."""
        for rid, blocks in swap_out:
            st = self._seqs.get(rid)
            if st is None or st.swap is not None:
                raise RuntimeError(f"request {rid}: swapped out but the executor "
                                   f"{'never ran it' if st is None else 'holds its swapped KV already'}")
            ids = self._to_device(np.asarray(blocks, dtype=np.int64))
            st.swap = self.kv_pool.to_host(ids, non_blocking=self.cuda)
            if self.drafter is not None:
                st.dswap = self.drafter.pool.to_host(ids, non_blocking=self.cuda)

    def _swap_in(self, st: _Seq) -> None:
        """Copy a swapped-in request's KV from the host into its new blocks (before the
        forward pass that reads them)."""
        n = st.swap.shape[2]
        blocks = st.req.blocks
        if len(blocks) < n:
            raise RuntimeError(f"request {st.req.request_id}: swapped in with {len(blocks)} blocks for {n}")
        ids = self._to_device(np.asarray(blocks[:n], dtype=np.int64))
        self.kv_pool.from_host(ids, st.swap, non_blocking=self.cuda)
        st.swap = None
        if st.dswap is not None:
            self.drafter.pool.from_host(ids, st.dswap, non_blocking=self.cuda)
            st.dswap = None

    # ------------------------------------------------------------------ execute
    def execute(self, batch: ScheduledBatch) -> StepResult:
        t_start = time.perf_counter()
        it = batch.iteration
        if batch.swap_out:
            self._swap_out(batch.swap_out)
        if batch.block_copies:
            self._copy_blocks(batch.block_copies)
        swap_in = set(batch.swap_in)
        chunks = batch.context
        gens = batch.generation
        N, B = len(chunks), len(gens)
        R = N + B
        if R == 0:
            raise ValueError(f"iteration {it}: empty batch")
        ks = self._draft_lens(batch)
        spec = ks is not None and bool(ks.any())  # drafts to verify (else a plain step)
        bs = self.block_size
        slots = np.empty(R, dtype=np.int64)
        held = np.empty(R, dtype=np.int64)  # blocks each row's request holds
        starts = np.empty(R, dtype=np.int64)
        qlens = np.empty(R, dtype=np.int64)
        ctx_ids: list[np.ndarray] = []
        sample_rows: list[int] = []
        rids: list[int] = []
        seqs: list[_Seq] = []
        for i, c in enumerate(chunks):
            st = self._seq(c.request, it)
            seqs.append(st)
            a, q = c.prior_tokens, c.num_tokens
            ctx_ids.append(self._context_tokens(st, a, a + q))
            slots[i] = st.slot
            held[i] = st.nb
            starts[i] = a
            qlens[i] = q
            if c.is_last:
                sample_rows.append(i)
                rids.append(c.request.request_id)
        for j, r in enumerate(gens):
            st = self._seq(r, it)
            seqs.append(st)
            if r.request_id in swap_in:
                if st.swap is None:
                    raise RuntimeError(f"iteration {it}: request {r.request_id} swapped in, but the executor "
                                       "holds no swapped KV for it")
                self._swap_in(st)
                swap_in.discard(r.request_id)
            k = N + j
            slots[k] = st.slot
            held[k] = st.nb
            starts[k] = r.kv_len_at(it)
            qlens[k] = 1 + int(ks[j]) if spec else 1
            rids.append(r.request_id)
        if swap_in:
            raise RuntimeError(f"iteration {it}: requests {sorted(swap_in)} swapped in but not scheduled")
        # -- per-token arrays (vectorised) ---------------------------------------------
        seq_lens = starts + qlens
        need_blocks = -(-seq_lens // bs)
        short = np.flatnonzero(need_blocks > held)
        if short.size:
            k = int(short[0])
            req = chunks[k].request if k < N else gens[k - N]
            raise RuntimeError(f"iteration {it}: request {req.request_id} needs {int(need_blocks[k])} KV blocks "
                               f"for {int(seq_lens[k])} tokens but holds {len(req.blocks)}")
        width = int(need_blocks.max())
        cu = np.zeros(R + 1, dtype=np.int64)
        np.cumsum(qlens, out=cu[1:])
        T = int(cu[-1])
        Tc = int(cu[N])
        tok_row = np.repeat(np.arange(R), qlens)
        positions = starts[tok_row] + np.arange(T, dtype=np.int64) - cu[:-1][tok_row]
        slot_mapping = (self._bt[slots[tok_row], positions // bs].astype(np.int64) * bs + positions % bs)
        bt = self._bt[slots, :width]
        ctx_flat = np.concatenate(ctx_ids) if ctx_ids else np.zeros(0, dtype=np.int64)
        if batch.shape.graph and (N or self.graph_runner is None):
            raise RuntimeError(f"iteration {it}: the engine scheduled a CUDA-graph iteration but the executor "
                               "has no graph runner (graph_sizes)" if not N else
                               f"iteration {it}: a CUDA-graph iteration with context chunks")
        piecewise = batch.shape.piecewise_tokens
        if piecewise:
            self._check_piecewise(it, N, T, piecewise)
        if spec:
            return self._execute_spec(batch, t_start, seqs, ks, slots, starts, seq_lens, cu, positions,
                                      slot_mapping, bt, ctx_flat, sample_rows, rids[:len(sample_rows)])
        dec_slots = slots[N:]
        sample_idx = np.concatenate([cu[1:][sample_rows] - 1, np.arange(Tc, T, dtype=np.int64)])
        sample_slots = np.concatenate([slots[sample_rows], dec_slots])
        S = int(sample_idx.shape[0])
        graph = batch.shape.graph and N == 0
        # -- host -> device: one int64 and one int32 copy ---------------------------------
        i64 = self._to_device(np.concatenate([ctx_flat, positions, slot_mapping, sample_idx, sample_slots, dec_slots]))
        i32 = self._to_device(np.concatenate([bt.ravel(), seq_lens.astype(np.int32), cu[:N + 1].astype(np.int32)]))
        d_ctx, d_pos, d_slot, d_sidx, d_sslots, d_dslots = i64.split([Tc, T, T, S, S, B])
        d_bt, d_seq, d_cu = i32.split([R * width, R, N + 1])
        d_bt = d_bt.view(R, width)
        dec_ids = self._token_buf.index_select(0, d_dslots)
        # -- forward ---------------------------------------------------------------------
        self.prep_s[it] = time.perf_counter() - t_start
        if graph:
            padded = batch.shape.padded_decode
            if self.graph_runner.padded_size(B) != padded:
                raise RuntimeError(f"iteration {it}: engine padded {B} requests to {padded}, the graph runner "
                                   f"to {self.graph_runner.padded_size(B)} (different GraphPadding sizes)")
            logits = self.graph_runner.run(dec_ids, d_pos, d_bt, d_seq, d_slot)
            self.graph_iterations += 1
        else:
            if Tc:
                input_ids = torch.cat([d_ctx, dec_ids]) if B else d_ctx
            else:
                input_ids = dec_ids
            meta = AttnMetadata(
                input_ids=input_ids, positions=d_pos, slot_mapping=d_slot, sample_indices=d_sidx,
                ctx_block_tables=d_bt[:N], ctx_cu_q_lens=d_cu, ctx_seq_lens=d_seq[:N],
                dec_block_tables=d_bt[N:], dec_seq_lens=d_seq[N:],
                num_context_tokens=Tc, num_context_chunks=N, num_decode=B,
                sampling_chunks=tuple(sample_rows), max_seq_len=int(seq_lens.max()))
            if piecewise:
                logits = self.piecewise_runner.run(input_ids, d_pos, meta, piecewise)
                self.piecewise_iterations += 1
            else:
                logits = self.model.forward(input_ids, d_pos, self.kv_pool, meta)
                self.eager_iterations += 1
        if self.drafter is not None and N:
            self._draft_prefill(chunks, seqs, d_ctx, d_pos, d_slot, d_bt, d_cu, d_seq, seq_lens)
        self.iterations += 1
        # -- sample; tokens stay on the device for the next iteration's decode inputs -----
        if S:
            tokens = self.sampler(logits, self._temp, self._top_p)
            self._token_buf.index_copy_(0, d_sslots, tokens)
        else:
            tokens = torch.zeros(0, dtype=torch.int64, device=self.device)
        if self.cuda:
            host = torch.empty(S, dtype=torch.int64, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            launched = _InFlight(it, rids, host, event, None)
        else:  # computed synchronously: the tokens are there now
            launched = _InFlight(it, rids, tokens, None, self.clock())
        if len(self._seqs) > R:
            self._cleanup(it)
        self.launch_s += time.perf_counter() - t_start
        # -- collect -----------------------------------------------------------------------
        if self.overlap:
            prev, self._pending = self._pending, launched
            if prev is not None:
                self._collect_one(prev)
            d = self.exec_s[it] = time.perf_counter() - t_start
            return StepResult(duration_s=d)
        if self._pending is not None:  # overlap switched off mid-run
            self._collect()
        if self.cuda:
            t = time.perf_counter()
            torch.cuda.synchronize(self.device)
            self.wait_s += time.perf_counter() - t
        toks = self._collect_one(launched)
        d = self.exec_s[it] = time.perf_counter() - t_start
        return StepResult(duration_s=d, tokens={rid: [t] for rid, t in zip(rids, toks)},
                          accepted=[0] * B if ks is not None else [])

    # ------------------------------------------------------------------ speculative decoding
    def _draft_lens(self, batch: ScheduledBatch) -> np.ndarray | None:
        """Drafts per generation request (``batch.drafts``, checked against the batch and the
        executor's speculation); None without drafts."""
        d = batch.drafts
        if not d:
            return None
        it = batch.iteration
        if self.spec is None:
            raise RuntimeError(f"iteration {it}: the engine proposed drafts but the executor runs no speculative "
                               "decoding (speculation)")
        gens = batch.generation
        if len(d) != len(gens) or any(rid != r.request_id for (rid, _), r in zip(d, gens)):
            raise RuntimeError(f"iteration {it}: batch.drafts does not follow batch.generation's requests")
        ks = np.fromiter((k for _, k in d), dtype=np.int64, count=len(d))
        if ks.min() < 0 or ks.max() > self.spec.max_draft_len:
            raise RuntimeError(f"iteration {it}: draft lengths outside [0, {self.spec.max_draft_len}]: "
                               f"{int(ks.min())}..{int(ks.max())}")
        return ks

    def _draft_prefill(self, chunks, seqs, d_ctx, d_pos, d_slot, d_bt, d_cu, d_seq, seq_lens) -> None:
        """The drafter's pass over the iteration's context chunks (its KV of their tokens)."""
        N = len(chunks)
        Tc = int(d_ctx.shape[0])
        self.drafter.prefill(d_ctx, d_pos[:Tc], d_slot[:Tc], d_bt[:N], d_cu[:N + 1], d_seq[:N],
                             int(seq_lens[:N].max()))
        for c, st in zip(chunks, seqs):
            st.dlen = c.prior_tokens + c.num_tokens

    def _draft_sample(self, logits: torch.Tensor):
        """A drafter step's tokens and, when the rejection rule needs it, its distribution."""
        if self.temperature <= 0:
            return logits.argmax(dim=-1), None
        q = sampling_probs(logits, self.temperature, self.top_p)
        return race_sample(q, self.sampler.generator), (q if self._acceptance is None else None)

    def _execute_spec(self, batch: ScheduledBatch, t_start: float, seqs: list[_Seq], ks: np.ndarray,
                      slots: np.ndarray, starts: np.ndarray, seq_lens: np.ndarray, cu: np.ndarray,
                      positions: np.ndarray, slot_mapping: np.ndarray, bt: np.ndarray, ctx_flat: np.ndarray,
                      sample_rows: list[int], ctx_rids: list[int]) -> StepResult:
        """An iteration whose generation requests carry drafts (gpu_backend/speculative.py):
        propose, verify the 1 + k positions of each in one target pass (each a context
        chunk over its cached KV; every position a sampling row), accept."""
        it = batch.iteration
        chunks, gens = batch.context, batch.generation
        N, B = len(chunks), len(gens)
        R = N + B
        T = int(cu[-1])
        Tc = int(cu[N])
        Tg = T - Tc
        width = bt.shape[1]
        dev = self.device
        kmax = int(ks.max())
        K1 = kmax + 1
        g1 = ks + 1
        cu_g = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(g1, out=cu_g[1:])
        grow = np.repeat(np.arange(B), g1)
        gidx = grow * K1 + (np.arange(Tg, dtype=np.int64) - cu_g[:-1][grow])  # into [B, 1 + kmax]
        # rows of the generation logits for each request's positions 0..kmax (clamped to its k)
        lrow = cu_g[:-1, None] + np.minimum(np.arange(K1)[None, :], ks[:, None])
        nc = len(sample_rows)
        sample_idx = np.concatenate([cu[1:][sample_rows] - 1, np.arange(Tc, T, dtype=np.int64)])
        S = int(sample_idx.shape[0])
        dec_slots = slots[N:]
        drafting = np.flatnonzero(ks)
        parts64 = [ctx_flat, positions, slot_mapping, sample_idx, slots[sample_rows], dec_slots, gidx,
                   lrow.ravel(), ks, drafting]
        sizes64 = [Tc, T, T, S, nc, B, Tg, B * K1, B, len(drafting)]
        if self._acceptance is not None:  # controlled: the accepted lengths are drawn now
            acc = self._acceptance.accepted([r.request_id for r in gens], ks.tolist())
            parts64.append(np.asarray(acc, dtype=np.int64))
            sizes64.append(B)
        gseqs = seqs[N:]
        if self.spec.proposer == "ngram":
            prop = np.zeros((B, kmax), dtype=np.int64)
            for j in drafting:
                st = gseqs[j]
                if st.ngram is None:
                    st.ngram = NgramIndex(self.spec.ngram_sizes)
                st.ngram.sync(st.prompt, st.out)
                prop[j, :ks[j]] = st.ngram.propose(int(ks[j]))
            parts64.append(prop.ravel())
            sizes64.append(B * kmax)
        i64 = self._to_device(np.concatenate(parts64))
        i32 = self._to_device(np.concatenate([bt.ravel(), seq_lens.astype(np.int32), cu.astype(np.int32)]))
        d64 = i64.split(sizes64)
        d_ctx, d_pos, d_slot, d_sidx, d_csl, d_dslots, d_gidx, d_lrow, d_ks, d_drafting = d64[:10]
        d_bt, d_seq, d_cu = i32.split([R * width, R, R + 1])
        d_bt = d_bt.view(R, width)
        self.prep_s[it] = time.perf_counter() - t_start
        # -- propose -----------------------------------------------------------------------
        q = None
        if self.drafter is not None:
            if N:
                self._draft_prefill(chunks, seqs, d_ctx, d_pos, d_slot, d_bt, d_cu, d_seq, seq_lens)
            kv = starts[N:][drafting]
            dl = np.fromiter((min(gseqs[j].dlen, int(starts[N + j])) for j in drafting), dtype=np.int64,
                             count=len(drafting))
            catch = np.concatenate([self._context_tokens(gseqs[j], int(a), int(b) + 1)
                                    for j, a, b in zip(drafting, dl, kv)])
            dd, extras = self.drafter.propose(self._bt, dec_slots[drafting], kv, dl, ks[drafting], catch,
                                              self._to_device, self._draft_sample)
            full = len(drafting) == B
            drafts = dd if full else torch.zeros(B, kmax, dtype=torch.int64, device=dev).index_copy_(
                0, d_drafting, dd)
            if extras[0][1] is not None:  # the drafter's distributions, for the rejection rule
                q = torch.zeros(B, kmax, self.vocab_size, dtype=torch.float32, device=dev)
                for j, (req, qj) in enumerate(extras):
                    rows = d_drafting if req is None else d_drafting.index_select(0, req)
                    q[:, j].index_copy_(0, rows, qj)
        else:
            drafts = d64[-1].view(B, kmax)
        # -- verify: every generation request is a chunk of 1 + k tokens over its KV ---------
        gen_in = torch.cat([self._token_buf.index_select(0, d_dslots)[:, None], drafts], dim=1)
        gen_ids = gen_in.reshape(-1).index_select(0, d_gidx)
        input_ids = torch.cat([d_ctx, gen_ids]) if Tc else gen_ids
        meta = AttnMetadata(
            input_ids=input_ids, positions=d_pos, slot_mapping=d_slot, sample_indices=d_sidx,
            ctx_block_tables=d_bt, ctx_cu_q_lens=d_cu, ctx_seq_lens=d_seq,
            dec_block_tables=d_bt[R:], dec_seq_lens=d_seq[R:],
            num_context_tokens=T, num_context_chunks=R, num_decode=0,
            sampling_chunks=tuple(sample_rows), max_seq_len=int(seq_lens.max()))
        vr = self.verify_runner
        if batch.shape.piecewise_tokens:
            logits = self.piecewise_runner.run(input_ids, d_pos, meta, batch.shape.piecewise_tokens)
            self.piecewise_iterations += 1
        elif N == 0 and batch.shape.graph and vr is not None and T <= vr.max_tokens:
            logits = vr.run(input_ids, d_pos, meta, vr.padded_size(T))
            self.verify_graph_iterations += 1
        else:
            logits = self.model.forward(input_ids, d_pos, self.kv_pool, meta)
            self.eager_iterations += 1
        self.iterations += 1
        self.spec_iterations += 1
        # -- accept ------------------------------------------------------------------------
        if nc:
            ctx_tok = self.sampler(logits[:nc], self._temp, self._top_p)
            self._token_buf.index_copy_(0, d_csl, ctx_tok)
        else:
            ctx_tok = torch.zeros(0, dtype=torch.int64, device=dev)
        glog = logits[nc:]
        rows = d_lrow.view(B, K1)
        if self._acceptance is not None:
            accepted = d64[10]
            emitted = controlled_emit(self.sampler(glog, self._temp, self._top_p)[rows], drafts, accepted)
        elif self.temperature <= 0:
            accepted, emitted = greedy_verify(glog.argmax(dim=-1)[rows], drafts, d_ks)
        else:
            p = sampling_probs(glog, self.temperature, self.top_p)[rows]
            accepted, emitted = rejection_verify(p, q, drafts, d_ks, self.sampler.generator)
        self._token_buf.index_copy_(0, d_dslots, emitted.gather(1, accepted[:, None]).squeeze(1))
        out = torch.cat([ctx_tok, emitted.reshape(-1), accepted])
        self.launch_s += time.perf_counter() - t_start
        if self.cuda:
            t = time.perf_counter()
            torch.cuda.synchronize(self.device)
            self.wait_s += time.perf_counter() - t
        vals = out.tolist()
        self.completed_s[it] = self.clock()
        # -- record --------------------------------------------------------------------------
        outs, limit = self.outputs, self._out_len
        tokens: dict[int, list[int]] = {}
        for rid, t in zip(ctx_rids, vals[:nc]):
            o = outs[rid]
            if len(o) < limit[rid]:
                o.append(t)
            tokens[rid] = [t]
        em = vals[nc:nc + B * K1]
        acc = vals[nc + B * K1:]
        drafter = self.drafter is not None
        for j, (r, st) in enumerate(zip(gens, gseqs)):
            a = acc[j]
            row = em[j * K1:j * K1 + a + 1]
            rid = r.request_id
            o = outs[rid]
            room = limit[rid] - len(o)
            if room > 0:
                o.extend(row[:room])
            tokens[rid] = row
            k = int(ks[j])
            if drafter and k:
                st.dlen = int(starts[N + j]) + min(a, k - 1) + 1
        self.drafts_proposed += int(ks.sum())
        self.drafts_accepted += sum(acc)
        if len(self._seqs) > R:
            self._cleanup(it)
        d = self.exec_s[it] = time.perf_counter() - t_start
        return StepResult(duration_s=d, tokens=tokens, accepted=acc)

    def admits_arrivals_until(self, now: float, last_start: float, last_end: float) -> float:
        """Every arrival so far: the engine steps on the wall clock, so with overlap the
        decision for iteration n+1 really is made while n runs."""
        return now

    def plan_decode_stretch(self, n_decode: int, padded_decode: int) -> None:
        return None  # every iteration runs for real

    def iteration_duration(self, start_s: float, result: StepResult) -> float:
        """Until now on the driver's clock (the engine's bookkeeping included); with
        overlap the iteration is still running: its end comes with `finish()`."""
        return result.duration_s if self.overlap else self.clock() - start_s

    def start_clock(self, clock: Callable[[], float]) -> None:
        self.clock = clock

    def finish(self) -> dict[int, float]:
        """Collect the iteration in flight; the ends of overlapped iterations not yet reported."""
        self.flush()
        out, self._unreported = self._unreported, {}
        return out

    def _check_piecewise(self, it: int, n_chunks: int, n_tokens: int, padded: int) -> None:
        """RuntimeError unless the piecewise runner can run this iteration at ``padded`` tokens."""
        pr = self.piecewise_runner
        if pr is None:
            raise RuntimeError(f"iteration {it}: the engine scheduled a piecewise-graph iteration but the executor "
                               "has no piecewise runner (piecewise_sizes)")
        if n_chunks == 0:
            raise RuntimeError(f"iteration {it}: the engine scheduled a piecewise-graph iteration without a "
                               "context chunk")
        mine = pr.padded_size(n_tokens) if n_tokens <= pr.max_tokens else None
        if mine != padded:
            raise RuntimeError(f"iteration {it}: engine padded {n_tokens} tokens to {padded}, the piecewise runner "
                               f"to {mine if mine is not None else 'none (beyond its largest size)'} "
                               "(different piecewise GraphPadding sizes)")

    # ------------------------------------------------------------------ collection
    def _collect_one(self, f: _InFlight) -> list[int]:
        if f.event is not None:
            t = time.perf_counter()
            f.event.synchronize()
            self.wait_s += time.perf_counter() - t
        toks = f.host.tolist()
        outs = self.outputs
        limit = self._out_len
        for rid, t in zip(f.rids, toks):
            o = outs[rid]
            if len(o) < limit[rid]:  # the overlap scheduler's extra step: discarded
                o.append(t)
        done = self.completed_s[f.iteration] = self.clock() if f.done_s is None else f.done_s
        if self.overlap:
            self._unreported[f.iteration] = done
        return toks

    def _collect(self) -> None:
        f, self._pending = self._pending, None
        if f is not None:
            self._collect_one(f)

    def flush(self) -> None:
        """Wait for the iteration still in flight (overlap mode) and record its tokens."""
        self._collect()

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def tokens(self, request_id: int) -> list[int]:
        """Generated token ids of a request (after `flush()` in overlap mode)."""
        return list(self.outputs.get(request_id, ()))

    def stats(self) -> dict:
        gr, pr = self.graph_runner, self.piecewise_runner
        return {
            "device": str(self.device),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "iterations": self.iterations,
            "graph_iterations": self.graph_iterations,
            "eager_iterations": self.eager_iterations,
            "cuda_graphs_captured": bool(gr is not None and gr.captured),
            "piecewise_iterations": self.piecewise_iterations,
            "piecewise_graphs_captured": bool(pr is not None and pr.captured),
            "overlap": self.overlap,
            "kv_pool_bytes": self.kv_pool.nbytes,
            **({"kv_scales": {"k": list(self.kv_pool.k_scales), "v": list(self.kv_pool.v_scales)}}
               if self.kv_pool.is_fp8 else {}),
            # host seconds spent preparing and launching iterations, and blocked on the GPU:
            # with overlap, launch_s is the host work hidden behind the GPU's (except what
            # exceeds it); without, every iteration pays launch_s + its GPU time
            "launch_s": self.launch_s,
            "wait_s": self.wait_s,
            **({} if self.spec is None else self._spec_stats()),
        }

    def _spec_stats(self) -> dict:
        dr, vr = self.drafter, self.verify_runner
        return {
            "speculation": {
                "proposer": self.spec.proposer, "acceptance": self.spec.acceptance,
                "max_draft_len": self.spec.max_draft_len,
                "iterations": self.spec_iterations,  # iterations that verified drafts
                "verify_graph_iterations": self.verify_graph_iterations,
                "verify_graphs_captured": bool(vr is not None and vr.captured),
                "drafts_proposed": self.drafts_proposed, "drafts_accepted": self.drafts_accepted,
                "drafter_steps": dr.steps if dr is not None else 0,
                "drafter_graph_steps": dr.graph_steps if dr is not None else 0,
                "drafter_graphs_captured": bool(dr is not None and dr.runner is not None and dr.runner.captured),
                "drafter_kv_pool_bytes": dr.pool.nbytes if dr is not None else 0,
            }}

