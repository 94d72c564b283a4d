"""Speculative decoding on the GPU backend: proposers that run for real, and exact verification.

`GpuExecutor` (executor.py) runs an iteration whose generation requests carry drafts
(``ScheduledBatch.drafts``: k per request) as follows:

1. **Propose.** ``draft_model``: a second `LlamaModel` (the drafter) with its own KV pool
   of the target's block count and block size, addressed by the *same* block ids the
   engine gives each request (`DraftModel`). It runs its own prefill of every context
   chunk (every iteration, drafting or not), and per drafting request k autoregressive
   decode steps: the first step catches up on the tokens the drafter has not seen yet
   (the request's context sequence from ``dlen``, the drafter's KV length for it, through
   its last sampled token at position ``kv_len``: one token, two after a step that
   accepted every draft, more after steps without drafts), each later step consumes the
   previous draft. Every step is a batch of *decode rows* (one row per new token, position
   ``p`` attending to ``0..p``; the rows of one request see each other's KV because a
   layer writes the KV of all rows before its attention), so it runs through a CUDA-graph
   `GraphRunner` of the drafter when one is captured. ``ngram``: prompt lookup on the
   host (`NgramIndex`): the most recent earlier occurrence of the request's last n tokens
   (n = 3, 2, 1) in its prompt and generated tokens, and the k tokens that followed it
   (padded with the last of them when fewer; the last token k times when nothing matches).
2. **Verify.** The target computes the 1 + k positions ``kv_len .. kv_len + k`` of each
   drafting request (its last sampled token, then the k drafts) in one forward pass, as a
   context chunk of 1 + k tokens over its ``kv_len`` cached tokens (paged prefill
   attention); every one of those positions is a sampling row.
3. **Accept.** ``natural``: greedy (temperature 0) accepts the longest prefix of drafts
   equal to the target's argmax at the preceding positions and emits those plus the
   target's token after them (`greedy_verify`); with a temperature, the rejection rule
   that preserves the target's distribution (`rejection_verify`: draft x is accepted with
   probability min(1, p(x) / q(x)); at the first rejection a token is drawn from
   normalize(max(0, p - q)); after k acceptances a bonus token from p; an n-gram's q is
   one-hot). ``controlled`` (random weights make natural acceptance meaningless): the
   same draft and verify work runs, but position i is accepted with probability alpha_i
   given the earlier ones (`servesim.sim.speculation.AcceptanceModel`, seeded as the
   simulator seeds it, so a GPU run and its simulated replay of the same schedule accept
   the same drafts); the emitted tokens are the drafts up to the accepted length and the
   target's token at the position after them.

The engine then emits ``accepted + 1`` tokens per request and rolls back the KV blocks of
the rejected drafts. KV written at rejected positions (the target's and the drafter's) is
never read: it lies past the request's new KV length, and is overwritten later.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .graph_runner import GraphRunner
from .kv_pool import KVPool
from .model import AttnMetadata, LlamaModel

PROPOSERS = ("draft_model", "ngram")
ACCEPTANCE = ("natural", "controlled")


@dataclass
class GpuSpeculation:
    """Speculative decoding of a `GpuExecutor`.

    ``proposer``: ``draft_model`` (``drafter`` is the draft `LlamaModel`, on the target's
    device, with the target's vocabulary) or ``ngram``. ``max_draft_len``: the engine's k.
    ``acceptance``: ``natural`` or ``controlled`` (``alpha``, one rate per position, the
    last one for later positions, or ``beta`` (a, b) per request; drawn with ``seed``).
    ``ngram_sizes``: the n-gram lengths tried, longest first.
    """

    proposer: str
    max_draft_len: int
    acceptance: str = "controlled"
    alpha: Sequence[float] | None = (0.7,)
    beta: tuple[float, float] | None = None
    seed: int = 0
    drafter: LlamaModel | None = None
    ngram_sizes: tuple[int, ...] = (3, 2, 1)

    def __post_init__(self) -> None:
        if self.proposer not in PROPOSERS:
            raise ValueError(f"the gpu backend runs the proposers {', '.join(PROPOSERS)}, not {self.proposer!r}")
        if self.acceptance not in ACCEPTANCE:
            raise ValueError(f"acceptance must be one of {', '.join(ACCEPTANCE)}, not {self.acceptance!r}")
        if self.max_draft_len < 1:
            raise ValueError(f"max_draft_len must be at least 1, got {self.max_draft_len}")
        if (self.proposer == "draft_model") != (self.drafter is not None):
            raise ValueError("proposer draft_model needs a drafter model (and only it takes one)")
        if self.acceptance == "controlled" and self.alpha is None and self.beta is None:
            raise ValueError("controlled acceptance needs alpha or beta")
        if not self.ngram_sizes or min(self.ngram_sizes) < 1:
            raise ValueError(f"ngram_sizes must be positive, got {self.ngram_sizes}")
        self.ngram_sizes = tuple(sorted({int(n) for n in self.ngram_sizes}, reverse=True))

    def acceptance_model(self):
        """The seeded acceptance draws of controlled mode (None: natural)."""
        if self.acceptance != "controlled":
            return None
        from servesim.sim.speculation import AcceptanceModel

        alpha = None if self.beta is not None else list(self.alpha)
        return AcceptanceModel(alpha, self.beta, seed=self.seed)


# --------------------------------------------------------------------------------------
# distributions and acceptance
# --------------------------------------------------------------------------------------


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """The distribution ``[..., V]`` (fp32, normalised) that `model.sample_tokens` draws
    from at ``temperature > 0`` and ``top_p``: the softmax of ``logits / temperature``
    restricted to the smallest set of most likely tokens whose mass reaches ``top_p``."""
    probs = torch.softmax(logits.float() / float(temperature), dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def race_sample(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A token per row drawn in proportion to the non-negative ``weights [..., V]`` (need not
    be normalised): the exponential race ``argmax(w / E)``, no host sync."""
    e = torch.empty_like(weights).exponential_(1.0, generator=generator)
    return (weights / e).argmax(dim=-1)


def _valid(ks: torch.Tensor, K: int) -> torch.Tensor:
    return torch.arange(K, device=ks.device)[None, :] < ks[:, None]


def greedy_verify(target: torch.Tensor, drafts: torch.Tensor, ks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy acceptance. ``target [B, K+1]``: the target's argmax at the request's
    positions ``kv_len .. kv_len + K``; ``drafts [B, K]``; ``ks [B]`` drafts per row (<= K).
    Returns ``(accepted [B], emitted [B, K+1])``: the longest prefix of drafts equal to the
    target's tokens before them, and the tokens to emit (the first ``accepted + 1`` of
    ``emitted``: the accepted drafts, which are the target's own tokens, and the target's
    token after them)."""
    K = drafts.shape[1]
    ok = (drafts == target[:, :K]) & _valid(ks, K)
    return ok.long().cumprod(dim=1).sum(dim=1), target


def rejection_verify(p: torch.Tensor, q: torch.Tensor | None, drafts: torch.Tensor, ks: torch.Tensor,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): the emitted tokens
    are distributed exactly as the target's autoregressive samples.

    ``p [B, K+1, V]``: the target's distribution at positions ``kv_len .. kv_len + K`` (row
    i conditioned on the drafts before it); ``q [B, K, V]``: the drafter's distribution each
    draft was drawn from (None: the drafts are deterministic, q one-hot, as an n-gram
    lookup's); ``drafts [B, K]``; ``ks [B]``. Draft i (0-based) is accepted with probability
    min(1, p_i(x) / q_i(x)) while the ones before it were; at the first rejection the next
    token is drawn from normalize(max(0, p_i - q_i)), after ``ks`` acceptances from
    ``p_ks``. Returns ``(accepted [B], emitted [B, K+1])`` as `greedy_verify`."""
    B, K1, V = p.shape
    K = K1 - 1
    dev = p.device
    rows = torch.arange(B, device=dev)
    if K:
        d = drafts[:, :, None]
        pd = p[:, :K].gather(2, d).squeeze(2)
        qd = torch.ones_like(pd) if q is None else q.gather(2, d).squeeze(2)
        u = torch.rand((B, K), generator=generator, device=dev)
        ok = (u * qd < pd) & _valid(ks, K)  # P(u < p/q) = min(1, p/q) for u ~ U[0, 1)
        a = ok.long().cumprod(dim=1).sum(dim=1)
    else:
        a = torch.zeros(B, dtype=torch.long, device=dev)
    pa = p[rows, a]
    if K:
        ai = a.clamp(max=K - 1)
        qa = (torch.nn.functional.one_hot(drafts[rows, ai], V).to(pa.dtype) if q is None else q[rows, ai])
        rejected = (a < ks)[:, None]
        resid = torch.where(rejected, (pa - qa).clamp_min(0.0), pa)
        # p == q on the rejected position (possible only by rounding): the residual is empty
        resid = torch.where(resid.sum(dim=1, keepdim=True) > 0, resid, pa)
    else:
        resid = pa
    tok = race_sample(resid, generator)
    emitted = torch.cat([drafts, torch.zeros(B, 1, dtype=drafts.dtype, device=dev)], dim=1)
    emitted[rows, a] = tok
    return a, emitted


def controlled_emit(target: torch.Tensor, drafts: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
    """Controlled acceptance: ``emitted [B, K+1]`` holds the drafts before ``accepted`` and
    the target's token (``target [B, K+1]``, sampled at every position) at ``accepted``."""
    B, K = drafts.shape
    pos = torch.arange(K + 1, device=drafts.device)[None, :]
    padded = torch.cat([drafts, target[:, K:]], dim=1)
    return torch.where(pos < accepted[:, None], padded, target)


# --------------------------------------------------------------------------------------
# n-gram lookup
# --------------------------------------------------------------------------------------


class NgramIndex:
    """Prompt lookup over one request's tokens (prompt, then generated), indexed as they
    come: for each n, the n-grams seen so far that have a token after them, each mapped to
    the index following its most recent occurrence."""

    __slots__ = ("tokens", "sizes", "maps", "indexed")

    def __init__(self, sizes: Sequence[int] = (3, 2, 1)):
        self.tokens: list[int] = []
        self.sizes = tuple(sizes)
        self.maps: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.indexed = {n: 0 for n in self.sizes}  # windows h[i:i+n] indexed, i < indexed[n]

    def sync(self, prompt: np.ndarray, generated: Sequence[int]) -> None:
        """Bring the token list up to ``prompt + generated`` (only appends)."""
        have = len(self.tokens)
        P = len(prompt)
        if have < P:
            self.tokens.extend(int(t) for t in prompt[have:])
            have = P
        g = have - P
        if g < len(generated):
            self.tokens.extend(int(t) for t in generated[g:])

    def _index(self) -> None:
        h = self.tokens
        L = len(h)
        for n in self.sizes:
            m = self.maps[n]
            i = self.indexed[n]
            last = L - 1 - n  # windows with a token after them that is not the query's own end
            while i <= last:
                m[tuple(h[i:i + n])] = i + n
                i += 1
            self.indexed[n] = i

    def propose(self, k: int) -> list[int]:
        """k draft tokens: what followed the most recent earlier occurrence of the last n
        tokens (longest n first), padded with its last token; the last token k times when
        nothing matches."""
        h = self.tokens
        L = len(h)
        if not L:
            return [0] * k
        self._index()
        for n in self.sizes:
            if L <= n:
                continue
            j = self.maps[n].get(tuple(h[L - n:]))
            if j is not None:
                out = h[j:j + k]
                return out + [out[-1]] * (k - len(out))
        return [h[-1]] * k


# --------------------------------------------------------------------------------------
# the draft model
# --------------------------------------------------------------------------------------


class DraftModel:
    """The drafter of ``proposer: draft_model``: ``model`` over its own KV pool of
    ``num_blocks`` blocks of ``block_size`` tokens, addressed by the target's block ids.
    ``graph_sizes``: batch sizes of the target's decode graphs (None: no graphs); the
    drafter captures graphs for those and twice those rows (a first step that catches up
    two tokens per request), eager beyond."""

    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, *, kv_dtype: torch.dtype | None = None,
                 graph_sizes: Sequence[int] | None = None, max_blocks: int = 1, use_graphs: bool | None = None):
        self.model = model
        self.device = model.device
        self.block_size = int(block_size)
        self.pool: KVPool = model.make_kv_pool(int(num_blocks), self.block_size, kv_dtype)
        self.runner: GraphRunner | None = None
        if graph_sizes:
            sizes = sorted({int(s) for s in graph_sizes} | {2 * int(s) for s in graph_sizes})
            self.runner = GraphRunner(model, self.pool, sizes, max_blocks, use_graphs)
        self.steps = 0  # decode steps run
        self.graph_steps = 0  # ... of those, through the graph runner
        self.prefills = 0

    def warmup(self) -> None:
        if self.runner is not None:
            self.runner.capture()

    # ------------------------------------------------------------------ prefill
    def prefill(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                block_tables: torch.Tensor, cu_q_lens: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int) -> None:
        """The drafter's pass over the iteration's context chunks (the target's device
        tensors for them: the same tokens, positions, slots and block tables); samples
        nothing (the layers only: their KV writes are what the drafter keeps)."""
        n_chunks = int(seq_lens.shape[0])
        m, pool = self.model, self.pool
        if max_seq_len > m.max_positions:
            raise ValueError(f"draft model: a sequence reaches {max_seq_len} tokens, beyond its rope table's "
                             f"{m.max_positions} positions")
        meta = AttnMetadata(
            input_ids=input_ids, positions=positions, slot_mapping=slot_mapping, sample_indices=positions[:0],
            ctx_block_tables=block_tables, ctx_cu_q_lens=cu_q_lens, ctx_seq_lens=seq_lens,
            dec_block_tables=block_tables[:0], dec_seq_lens=seq_lens[:0],
            num_context_tokens=int(input_ids.shape[0]), num_context_chunks=n_chunks, num_decode=0,
            sampling_chunks=(), max_seq_len=int(max_seq_len))
        with torch.no_grad():
            m._run_layers(input_ids, positions, slot_mapping, pool, lambda layer, q: m._attention(layer, q, pool, meta))
        self.prefills += 1

    # ------------------------------------------------------------------ decode steps
    def _step(self, ids, pos, bt, seq, slot) -> torch.Tensor:
        self.steps += 1
        r = self.runner
        n = int(ids.shape[0])
        if r is not None and n <= r.max_batch and bt.shape[1] <= r.max_blocks:
            self.graph_steps += 1
            return r.run(ids, pos, bt, seq, slot)
        return self.model.forward_decode(ids, pos, bt, seq, slot, self.pool)

    def propose(self, block_table: np.ndarray, slots: np.ndarray, kv_lens: np.ndarray, dlens: np.ndarray,
                ks: np.ndarray, catch_up: np.ndarray, to_device, sample) -> tuple[torch.Tensor, list]:
        """Drafts ``[n, max(ks)]`` (device int64) for ``n`` drafting requests, and each
        step's output of ``sample`` (``(tokens, extra)`` from logits; the extras, e.g. the
        drafter's distributions, come back per step as ``(request rows, extra)``).

        Request ``r`` (row ``slots[r]`` of ``block_table``) has ``kv_lens[r]`` tokens in the
        target's KV, ``dlens[r] <= kv_lens[r]`` in the drafter's, ``ks[r] >= 1`` drafts to
        make; ``catch_up`` holds, request after request, its context tokens
        ``dlens[r] .. kv_lens[r]`` (the last one its last sampled token). ``to_device``
        moves a numpy array to the device (pinned, non-blocking on CUDA)."""
        n = len(slots)
        kmax = int(ks.max())
        bs = self.block_size
        c = kv_lens + 1 - dlens
        if n == 0 or c.min() < 1:
            raise RuntimeError("draft model: a request's drafter KV is ahead of its target KV")
        width = int((-(-(kv_lens + ks) // bs)).max())
        # step 1: the catch-up rows; steps 2..kmax: one row per request with ks >= j
        rows1 = np.repeat(np.arange(n), c)
        cu = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(c, out=cu[1:])
        pos1 = dlens[rows1] + np.arange(int(cu[-1]), dtype=np.int64) - cu[:-1][rows1]
        step_rows = [rows1] + [np.flatnonzero(ks >= j) for j in range(2, kmax + 1)]
        step_pos = [pos1] + [kv_lens[r] + (j - 1) for j, r in zip(range(2, kmax + 1), step_rows[1:])]
        i64 = [np.asarray(catch_up, dtype=np.int64), cu[1:] - 1]
        i32 = []
        sizes64 = [len(catch_up), n]
        sizes32 = []
        for j, (r, p) in enumerate(zip(step_rows, step_pos)):
            s = slots[r]
            slot_map = block_table[s, p // bs].astype(np.int64) * bs + p % bs
            i64 += [p, slot_map] + ([r.astype(np.int64)] if j else [])
            sizes64 += [len(p), len(p)] + ([len(r)] if j else [])
            i32 += [block_table[s, :width].ravel(), (p + 1).astype(np.int32)]
            sizes32 += [len(r) * width, len(r)]
        d64 = to_device(np.concatenate(i64)).split(sizes64)
        d32 = to_device(np.concatenate(i32)).split(sizes32)
        drafts = torch.zeros(n, kmax, dtype=torch.int64, device=self.device)
        extras = []
        ids, last1 = d64[0], d64[1]
        k64 = 2
        for j in range(kmax):
            pos, slot = d64[k64], d64[k64 + 1]
            if j:
                req = d64[k64 + 2]
                ids = drafts[:, j - 1].index_select(0, req)
                k64 += 3
            else:
                req = None
                k64 += 2
            nr = int(pos.shape[0])
            bt = d32[2 * j].view(nr, width)
            logits = self._step(ids, pos, bt, d32[2 * j + 1], slot)
            if req is None:
                logits = logits.index_select(0, last1)
            tok, extra = sample(logits)
            if req is None:
                drafts[:, 0] = tok
            else:
                drafts[:, j].index_copy_(0, req, tok)
            extras.append((req, extra))
        return drafts, extras
