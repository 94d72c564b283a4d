"""Prefix-cache keys at engine granularity, and the reuse bound of a workload.

A workload describes prompt content in one of two ways (see :mod:`servesim.traces.schema`):

- ``prompt_tokens``: the token ids themselves;
- ``block_hashes``: one id per ``H = df.attrs["hash_block_size"]``-token block of the
  prompt (the last block may be partial, ``len == ceil(prompt_len / H)``). Two equal ids
  at the same position mean the same tokens *given the same preceding blocks*
  (Mooncake's ids are prefix ids, :mod:`~servesim.traces.prefix_workloads` writes
  content ids; the rule below reads both correctly).

The engine's KV cache works on blocks of ``t = tokens_per_block`` tokens, which may
differ from ``H`` (Mooncake uses 512, engines 16-64). This module maps a request to the
*chain keys* of its full engine blocks (``prompt_len // t`` of them): equal keys at
block ``j`` mean the whole prefix ``[0, (j + 1) t)`` is the same (up to 64-bit hash
collisions), so a cache keyed by them can hand the block over.

Token identity under ``block_hashes`` (conservative; exactly what is implemented)
    Token ``i`` lies in workload block ``b = i // H``. Its identity is its position and
    the *workload chain* up to ``b``: the sequence ``(id_0, len_0), ..., (id_b, len_b)``
    where ``len_k`` is the number of tokens of block ``k`` (``H`` for a full block,
    ``prompt_len - k H`` for a partial last one). Two requests share token ``i`` iff
    every workload block up to and including ``i``'s has the same id *and the same
    length* in both. Hence: equal ids after a divergence never match (the chain
    differs); a partial last block is shared only with a request whose block there has
    the same id and the same length (a block cut short by ``cap_lengths`` keeps its id
    but not its length, so it no longer matches the full block); and when ``t < H``, no
    token of a workload block is shared unless the whole block is, since the workload
    cannot say where inside a block two prompts diverge.

Token identity under ``prompt_tokens``
    The token id and its position: two requests share ``[0, m)`` iff their first ``m``
    ids are equal.

Keys
    Engine block ``j`` (tokens ``[j t, (j + 1) t)``) gets a content value ``c_j``: for
    tokens, a 64-bit digest of its ``t`` ids; for block hashes, a digest of ``j`` and of
    the workload chain of the block ``b_hi = ((j + 1) t - 1) // H`` holding its last
    token (that chain fixes every token before it). The key is a hash chain:
    ``R_j = P R_{j-1} + c_j (mod 2**64)``, ``R_{-1} = seed``, ``key_j = fmix64(R_j)``
    — a function of the previous key (``fmix64`` is a bijection, so ``key_{j-1}`` and
    ``R_{j-1}`` determine each other) and of block ``j``'s content. The two sources
    use different seeds and salts, so a key from ``prompt_tokens`` never equals one
    from ``block_hashes``. Everything is fixed-width numpy ``uint64`` arithmetic with
    fixed constants (``fmix64`` is MurmurHash3's 64-bit finaliser), so keys are the same
    in every process and on every platform: Python's salted ``hash()`` is never used.
    The chain is evaluated for many blocks at once as a prefix sum,
    ``R_j = P**j (P seed + sum_{i<=j} c_i P**-i)`` (``P`` is odd, hence invertible
    mod 2**64).

Keys are Python ints in ``[0, 2**64)`` from the per-request functions and ``uint64``
arrays from :func:`workload_engine_keys` (the fast path for a whole workload: the
Mooncake trace's 4.5 M 32-token blocks take a fraction of a second).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from servesim.traces.schema import HASH_BLOCK_SIZE

from .hashing import GOLDEN, MASK64, fmix64, ints_to_u64
from .hashing import U64 as _U64

__all__ = [
    "EngineKeys",
    "engine_block_keys",
    "engine_block_keys_from_tokens",
    "workload_engine_keys",
    "reuse_from_keys",
    "reuse_bound",
    "content_block_hashes",
]

_P = int(GOLDEN)  # odd: invertible mod 2**64
_Q = pow(_P, -1, 1 << 64)
# seeds and salts: arbitrary fixed constants, distinct per domain
_SEED_WORKLOAD = 0x243F6A8885A308D3  # chain over workload blocks
_SEED_ENGINE_H = 0x13198A2E03707345  # engine chain, block_hashes source
_SEED_ENGINE_T = 0xA4093822299F31D1  # engine chain, prompt_tokens source
_SALT_ID = _U64(0x082EFA98EC4E6C89)
_SALT_LEN = _U64(0x452821E638D01377)
_SALT_POS = _U64(0xBE5466CF34E90C6D)
_SALT_TOK = _U64(0xC0AC29B7C97C50DD)
_SALT_CONTENT = _U64(0x3F84D5B5B5470917)


# ---------------------------------------------------------------------- primitives


class _Powers:
    """Cached tables ``base**0 .. base**(n-1) mod 2**64``."""

    def __init__(self, base: int):
        self.base = base
        self.table = np.ones(1, dtype=_U64)

    def get(self, n: int) -> np.ndarray:
        if self.table.size < n:
            t = np.full(max(n, 2 * self.table.size), self.base, dtype=_U64)
            t[0] = 1
            self.table = np.cumprod(t, dtype=_U64)
        return self.table[:n]


_PPOW = _Powers(_P)
_QPOW = _Powers(_Q)


class _Segments:
    """Consecutive runs of a flat array: run ``r`` has ``counts[r]`` elements starting at
    ``offsets[r]``; per element, its run (``seg``) and position in it (``local``)."""

    def __init__(self, counts: np.ndarray):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.offsets = np.zeros(self.counts.size + 1, dtype=np.int64)
        np.cumsum(self.counts, out=self.offsets[1:])
        self.seg = np.repeat(np.arange(self.counts.size, dtype=np.int64), self.counts)
        self.local = np.arange(self.seg.size, dtype=np.int64)
        self.local -= self.offsets[self.seg]

    @property
    def total(self) -> int:
        return int(self.offsets[-1])


def _poly_chain(c: np.ndarray, segs: _Segments, seed: int) -> np.ndarray:
    """Per run of ``c``: ``R_j = P R_{j-1} + c_j``, ``R_{-1} = seed`` (mod 2**64); returns
    ``fmix64(R)``. Uses ``R_j = P**j (P seed + sum_{i<=j} c_i P**-i)``."""
    if c.size == 0:
        return np.zeros(0, dtype=_U64)
    n = int(segs.counts.max())
    cs = c * _QPOW.get(n)[segs.local]
    np.cumsum(cs, out=cs)
    starts = segs.offsets[:-1]
    before = np.zeros(segs.counts.size, dtype=_U64)  # the cumsum just before each run
    nz = (starts > 0) & (segs.counts > 0)
    before[nz] = cs[starts[nz] - 1]
    cs -= before[segs.seg]
    cs += _U64((_P * seed) & MASK64)
    cs *= _PPOW.get(n)[segs.local]
    return fmix64(cs)


def _positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


# ---------------------------------------------------------------------- batched core


def _workload_chain(rows: Sequence[Sequence[int]], plens: np.ndarray, H: int) -> tuple[np.ndarray, _Segments]:
    """Chain id of every workload block of every row (identity of the prefix up to and
    including that block: ids and lengths), and the rows' segments."""
    nb = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    want = -(-plens // H)
    if (nb != want).any():
        i = int(np.flatnonzero(nb != want)[0])
        raise ValueError(
            f"block_hashes has {int(nb[i])} entries, expected ceil(prompt_len / {H}) = {int(want[i])} "
            f"(prompt_len {int(plens[i])})"
        )
    segs = _Segments(nb)
    ids = ints_to_u64(lambda: itertools.chain.from_iterable(rows), segs.total)
    blen = np.full(ids.size, H, dtype=np.int64)  # H, except the last block of each row
    has = nb > 0
    blen[segs.offsets[1:][has] - 1] = plens[has] - (nb[has] - 1) * H
    d = fmix64(ids ^ _SALT_ID)
    d ^= blen.view(_U64) * _SALT_LEN
    return _poly_chain(fmix64(d), segs, _SEED_WORKLOAD), segs


def _keys_from_hashes(rows: Sequence[Sequence[int]], plens: np.ndarray, H: int, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Engine keys (concatenated) and their count per row, from block hashes."""
    plens = np.asarray(plens, dtype=np.int64)
    chain, wsegs = _workload_chain(rows, plens, H)
    ne = plens // t
    if ne.sum() == 0:
        return np.zeros(0, dtype=_U64), ne
    esegs = _Segments(ne)
    j = esegs.local
    b_hi = ((j + 1) * t - 1) // H
    c = fmix64(j.view(_U64) ^ _SALT_POS)
    c ^= chain[wsegs.offsets[:-1][esegs.seg] + b_hi]
    return _poly_chain(fmix64(c), esegs, _SEED_ENGINE_H), ne


def _keys_from_tokens(rows: Sequence[Sequence[int]], t: int) -> tuple[np.ndarray, np.ndarray]:
    """Engine keys (concatenated) and their count per row, from token ids."""
    lens = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    ne = lens // t
    if ne.sum() == 0:
        return np.zeros(0, dtype=_U64), ne
    used = ne * t
    if (used == lens).all():
        flat = lambda: itertools.chain.from_iterable(rows)  # noqa: E731
    else:
        flat = lambda: itertools.chain.from_iterable(itertools.islice(r, int(u)) for r, u in zip(rows, used))  # noqa: E731
    tok = fmix64(ints_to_u64(flat, int(used.sum())) ^ _SALT_TOK).reshape(-1, t)
    tok *= _PPOW.get(t)[::-1]  # digest of a block's tokens: sum_k f(x_k) P**(t-1-k), mixed
    c = fmix64(tok.sum(axis=1, dtype=_U64) ^ _SALT_CONTENT)
    return _poly_chain(c, _Segments(ne), _SEED_ENGINE_T), ne


# ---------------------------------------------------------------------- per request


def engine_block_keys(
    block_hashes: Sequence[int], hash_block_size: int, prompt_len: int, tokens_per_block: int
) -> list[int]:
    """Chain keys of the request's full engine blocks (``prompt_len // tokens_per_block``
    of them) from its workload ``block_hashes`` (``ceil(prompt_len / hash_block_size)``
    ids). See the module docstring for the exact sharing rule."""
    t = _positive_int("tokens_per_block", tokens_per_block)
    H = _positive_int("hash_block_size", hash_block_size)
    prompt_len = _positive_int("prompt_len", prompt_len)
    keys, _ = _keys_from_hashes([tuple(block_hashes)], np.array([prompt_len]), H, t)
    return keys.tolist()


def engine_block_keys_from_tokens(tokens: Sequence[int] | np.ndarray, tokens_per_block: int) -> list[int]:
    """Chain keys of the full engine blocks (``len(tokens) // tokens_per_block`` of
    them) of a prompt given as token ids."""
    t = _positive_int("tokens_per_block", tokens_per_block)
    if isinstance(tokens, np.ndarray):
        tokens = tokens.tolist()
    keys, _ = _keys_from_tokens([tokens], t)
    return keys.tolist()


def content_block_hashes(tokens: Sequence[int] | np.ndarray, hash_block_size: int) -> np.ndarray:
    """Workload block ids (int64, non-negative, 63 bits) of a token sequence: one per
    ``hash_block_size``-token block, the last possibly partial. An id digests the block's
    tokens and its length only, not earlier blocks (the reuse rule brings the prefix
    in). Deterministic across processes. Token ids must be >= 0."""
    H = _positive_int("hash_block_size", hash_block_size)
    tokens = np.asarray(tokens, dtype=np.int64)
    nb = -(-tokens.size // H)
    if nb == 0:
        return np.zeros(0, dtype=np.int64)
    padded = np.full(nb * H, -1, dtype=np.int64)  # -1 past the end: the length is in the digest
    padded[: tokens.size] = tokens
    f = fmix64(padded.view(_U64) ^ _SALT_TOK).reshape(nb, H)
    f *= _PPOW.get(H)[::-1]
    h = fmix64(f.sum(axis=1, dtype=_U64) ^ _SALT_CONTENT)
    return (h >> _U64(1)).view(np.int64)


# ---------------------------------------------------------------------- whole workload


class EngineKeys(NamedTuple):
    """The engine keys of every request of a workload in CSR form: request ``i``'s keys
    are ``keys[offsets[i]:offsets[i + 1]]`` (``uint64``; none for a request without
    prefix information)."""

    keys: np.ndarray
    offsets: np.ndarray
    tokens_per_block: int

    def row(self, i: int) -> np.ndarray:
        return self.keys[self.offsets[i] : self.offsets[i + 1]]

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)


def _sources(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(prompt_tokens column, rows using it, block_hashes column, rows using it): per row,
    ``prompt_tokens`` when present (exact), else ``block_hashes``, else nothing."""
    n = len(df)
    none = np.full(n, None, dtype=object)
    tok = df["prompt_tokens"].to_numpy(dtype=object) if "prompt_tokens" in df.columns else none
    hsh = df["block_hashes"].to_numpy(dtype=object) if "block_hashes" in df.columns else none
    use_tok = np.fromiter((v is not None for v in tok), dtype=bool, count=n)
    use_h = np.fromiter((v is not None for v in hsh), dtype=bool, count=n) & ~use_tok
    if use_h.any() and df.attrs.get(HASH_BLOCK_SIZE) is None:
        raise ValueError(f"a block_hashes column needs df.attrs[{HASH_BLOCK_SIZE!r}]")
    return tok, np.flatnonzero(use_tok), hsh, np.flatnonzero(use_h)


def _merge_rows(n: int, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """CSR (values, offsets) over ``n`` rows from parts ``(rows, counts, values)``."""
    counts = np.zeros(n, dtype=np.int64)
    for rows, cnt, _ in parts:
        counts[rows] = cnt
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    if len(parts) == 1 and parts[0][0].size == n:
        return parts[0][2], offsets
    out = np.empty(int(offsets[-1]), dtype=_U64)
    for rows, cnt, vals in parts:
        s = _Segments(cnt)
        out[offsets[rows][s.seg] + s.local] = vals
    return out, offsets


def workload_engine_keys(df: pd.DataFrame, tokens_per_block: int) -> EngineKeys:
    """Engine keys of every row of a workload table, vectorised: row ``i`` gets the
    same keys as :func:`engine_block_keys_from_tokens` on its ``prompt_tokens`` when it
    has them, else :func:`engine_block_keys` on its ``block_hashes``; a row with neither
    gets none."""
    t = _positive_int("tokens_per_block", tokens_per_block)
    plen = df["prompt_len"].to_numpy(dtype=np.int64)
    tok, rows_t, hsh, rows_h = _sources(df)
    parts = []
    if rows_t.size:
        keys, ne = _keys_from_tokens(tok[rows_t].tolist(), t)
        parts.append((rows_t, ne, keys))
    if rows_h.size:
        keys, ne = _keys_from_hashes(hsh[rows_h].tolist(), plen[rows_h], int(df.attrs[HASH_BLOCK_SIZE]), t)
        parts.append((rows_h, ne, keys))
    keys, offsets = _merge_rows(len(df), parts)
    return EngineKeys(keys, offsets, t)


def _leading_seen(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per row of a CSR whose rows are in time order: how many of the row's leading
    values each appeared in some earlier row."""
    n = offsets.size - 1
    counts = np.diff(offsets)
    out = np.zeros(n, dtype=np.int64)
    if values.size == 0:
        return out
    segs = _Segments(counts)
    codes, _ = pd.factorize(values)  # codes are numbered in order of first appearance
    prev_max = np.empty_like(codes)
    prev_max[0] = -1
    np.maximum.accumulate(codes[:-1], out=prev_max[1:])
    first_row = segs.seg[codes > prev_max]  # by code: the row where it first appeared
    seen = first_row[codes] < segs.seg
    miss = np.where(seen, np.iinfo(np.int64).max, segs.local)
    nz = np.flatnonzero(counts)
    out[nz] = np.minimum(np.minimum.reduceat(miss, offsets[nz]), counts[nz])
    return out


def reuse_from_keys(keys: EngineKeys) -> np.ndarray:
    """Reusable prompt tokens per request, straight from the definition: the leading
    engine blocks whose key appeared in an earlier request, times ``tokens_per_block``."""
    return _leading_seen(keys.keys, keys.offsets) * keys.tokens_per_block


def reuse_bound(df: pd.DataFrame, tokens_per_block: int) -> dict[str, Any]:
    """Upper bound on prefix reuse with an unlimited cache of ``tokens_per_block``-token
    blocks: request ``i`` can reuse its leading full engine blocks whose key (see the
    module docstring) appeared in any *earlier* row — rows are in arrival order, ties
    in row order; every block of every earlier request stays cached and is ready when
    the request arrives. (A real engine also recomputes at least the last prompt token;
    this bound does not.)

    Returns ``reuse_fraction`` (``reused_tokens / total_tokens``), ``reused_tokens``,
    ``total_tokens`` (sum of ``prompt_len``, rows without prefix information included),
    ``per_request`` (int64 reusable tokens per row) and ``tokens_per_block``.

    Computed without building engine keys for ``block_hashes`` rows, so it is an
    independent check of them (the tests compare it with :func:`reuse_from_keys`).
    Engine block ``j`` of request ``r`` has the same key as in an earlier request ``e``
    iff ``e`` holds ``r``'s workload chain up to the block ``b`` of ``j``'s last
    token: that chain fixes ``e``'s tokens up to ``b H + len_b``, which is at least
    ``(j + 1) t``. And chains are prefix-closed. So if ``r``'s first ``k`` workload
    chain ids appeared earlier (and the next did not), ``r`` can reuse
    ``floor(min(k H, prompt_len) / t)`` engine blocks. ``prompt_tokens`` rows use their
    engine keys directly."""
    t = _positive_int("tokens_per_block", tokens_per_block)
    n = len(df)
    plen = df["prompt_len"].to_numpy(dtype=np.int64)
    tok, rows_t, hsh, rows_h = _sources(df)
    parts = []
    if rows_t.size:
        keys, ne = _keys_from_tokens(tok[rows_t].tolist(), t)
        parts.append((rows_t, ne, keys))
    if rows_h.size:
        H = int(df.attrs[HASH_BLOCK_SIZE])
        chain, wsegs = _workload_chain(hsh[rows_h].tolist(), plen[rows_h], H)
        parts.append((rows_h, wsegs.counts, chain))
    values, offsets = _merge_rows(n, parts)
    lead = _leading_seen(values, offsets)  # engine blocks (token rows), workload blocks (hash rows)
    per_request = lead * t
    if rows_h.size:
        H = int(df.attrs[HASH_BLOCK_SIZE])
        per_request[rows_h] = np.minimum(lead[rows_h] * H, plen[rows_h]) // t * t
    total = int(plen.sum())
    reused = int(per_request.sum())
    return {
        "tokens_per_block": t,
        "reuse_fraction": reused / total if total else 0.0,
        "reused_tokens": reused,
        "total_tokens": total,
        "per_request": per_request,
    }
