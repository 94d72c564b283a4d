"""Prefix-cache keys at engine granularity, and the reuse bound of a workload.

A workload describes prompt content in one of two ways (see :mod:`servesim.traces.schema`):

- ``prompt_tokens``: the token ids themselves;
- ``block_hashes``: one id per ``H = df.attrs["hash_block_size"]``-token block of the
  prompt (the last block may be partial, ``len == ceil(prompt_len / H)``). An id names
  the *content* of its block; two equal ids at the same position mean the same tokens
  *given the same preceding blocks* (Mooncake's ids are prefix ids, ours content ids:
  both read correctly under the rule below).

The engine's KV cache works on blocks of ``t = tokens_per_block`` tokens, which may
differ from ``H`` (Mooncake uses 512, engines 16-64). This module maps a request to
the *chain keys* of its full engine blocks (``prompt_len // t`` of them): equal keys at
block ``j`` mean the whole prefix ``[0, (j + 1) t)`` is the same (up to 64-bit hash
collisions), so a cache keyed by them can hand the block over.

Token identity under ``block_hashes`` (conservative, exactly what is implemented)
    Token ``i`` lies in workload block ``b = i // H``. Its identity is the *workload
    chain* up to ``b`` — the sequence ``(id_0, len_0), ..., (id_b, len_b)`` where
    ``len_k`` is the number of tokens of block ``k`` (``H`` for a full block,
    ``prompt_len - k H`` for a partial last one) — plus its position ``i``. So two
    requests share token ``i`` iff every workload block up to and including ``i``'s
    block has the same id *and the same length* in both. Consequences: equal ids after
    a divergence never match (the chain differs); a partial last block is shared only
    with a request whose block at that position has the same id and the same length
    (a block cut short by ``cap_lengths`` keeps its id but not its length, so it no
    longer matches the full block); and when ``t < H`` no token of a block is shared
    unless the whole block is — the workload cannot tell where inside a block two
    prompts diverge.

Token identity under ``prompt_tokens``
    The token id and its position: two requests share ``[0, m)`` iff their first ``m``
    token ids are equal.

Keys
    Engine block ``j`` (tokens ``[j t, (j + 1) t)``) gets a content value ``c_j``:
    for tokens, a 64-bit digest of its ``t`` ids; for block hashes, a digest of the
    workload chain of its last token's block ``b_hi = ((j + 1) t - 1) // H`` (which
    determines every earlier block too) and of ``j``. Its key is a hash chain
    ``R_j = P * R_{j-1} + c_j (mod 2**64)``, ``R_{-1} = seed``, ``key_j =
    fmix64(R_j)``: a function of the previous key (``fmix64`` is a bijection, so
    ``R_{j-1}`` and ``key_{j-1}`` determine each other) and of block ``j``'s content.
    The two sources use different seeds and salts, so a key from ``prompt_tokens``
    never equals one from ``block_hashes``. Everything is fixed-width numpy ``uint64``
    arithmetic with fixed constants (``fmix64`` is MurmurHash3's 64-bit finaliser),
    so keys are the same in every process and on every platform — no use of Python's
    salted ``hash()``. The chain is evaluated for many blocks at once as a prefix sum
    (``R_j = P**j (P seed + sum_{i<=j} c_i P**-i)``, ``P`` odd hence invertible
    mod 2**64), which is what makes the Mooncake trace take well under a second.

Keys are Python ints in ``[0, 2**64)`` from the per-request functions, ``uint64`` arrays
from :func:`workload_engine_keys` (the fast path for a whole workload).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from servesim.traces.schema import HASH_BLOCK_SIZE

__all__ = [
    "EngineKeys",
    "engine_block_keys",
    "engine_block_keys_from_tokens",
    "workload_engine_keys",
    "reuse_bound",
    "content_block_hashes",
]

_U64 = np.uint64
_MASK = (1 << 64) - 1
_P = 0x9E3779B97F4A7C15  # odd: invertible mod 2**64
_Q = pow(_P, -1, 1 << 64)
_M1 = _U64(0xFF51AFD7ED558CCD)
_M2 = _U64(0xC4CEB9FE1A85EC53)
_S33 = _U64(33)
# seeds and salts (arbitrary fixed odd constants); distinct per domain
_SEED_WORKLOAD = 0x243F6A8885A308D3  # chain over workload blocks
_SEED_ENGINE_H = 0x13198A2E03707345  # engine chain, block_hashes source
_SEED_ENGINE_T = 0xA4093822299F31D1  # engine chain, prompt_tokens source
_SALT_ID = _U64(0x082EFA98EC4E6C89)
_SALT_LEN = _U64(0x452821E638D01377)
_SALT_POS = _U64(0xBE5466CF34E90C6D)
_SALT_TOK = _U64(0xC0AC29B7C97C50DD)
_SALT_CONTENT = _U64(0x3F84D5B5B5470917)


def _fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (a bijection on uint64), elementwise."""
    x = x ^ (x >> _S33)
    x = x * _M1
    x = x ^ (x >> _S33)
    x = x * _M2
    return x ^ (x >> _S33)


class _Powers:
    """Cached tables base**0 .. base**(n-1) mod 2**64."""

    def __init__(self, base: int):
        self.base = base
        self.table = np.ones(1, dtype=_U64)

    def get(self, n: int) -> np.ndarray:
        if self.table.size < n:
            size = max(n, 2 * self.table.size)
            t = np.full(size, self.base, dtype=_U64)
            t[0] = 1
            self.table = np.cumprod(t, dtype=_U64)
        return self.table[:n]


_PPOW = _Powers(_P)
_QPOW = _Powers(_Q)


def _local_index(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets with a leading 0, position of each element inside its segment)."""
    offsets = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    total = int(offsets[-1])
    local = np.arange(total, dtype=np.int64) - np.repeat(offsets[:-1], counts)
    return offsets, local


def _poly_chain(c: np.ndarray, counts: np.ndarray, seed: int) -> np.ndarray:
    """Per segment (``counts`` consecutive elements of ``c``): ``R_j = P R_{j-1} + c_j``
    with ``R_{-1} = seed``, all mod 2**64, returned as ``fmix64(R)``."""
    if c.size == 0:
        return np.zeros(0, dtype=_U64)
    offsets, local = _local_index(counts)
    n = int(counts.max())
    cs = np.cumsum(c * _QPOW.get(n)[local], dtype=_U64)
    before = np.zeros(counts.size, dtype=_U64)
    nz = offsets[:-1] > 0
    before[nz] = cs[offsets[:-1][nz] - 1]
    s = cs - np.repeat(before, counts) + _U64((_P * seed) & _MASK)
    return _fmix64(_PPOW.get(n)[local] * s)


def _ints_to_u64(make_iter: Callable[[], Iterable[int]], count: int) -> np.ndarray:
    """Python ints (from ``make_iter()``, called again if the fast path fails) -> uint64.
    Ints in the int64 range map by two's complement; any other int to a blake2b digest
    of its bytes, so distinct ints stay distinct up to hash collisions."""
    try:
        return np.fromiter(make_iter(), dtype=np.int64, count=count).view(_U64)
    except (OverflowError, ValueError, TypeError):
        pass
    out = np.empty(count, dtype=_U64)
    for k, x in enumerate(make_iter()):
        x = int(x)
        if -(1 << 63) <= x < (1 << 63):
            out[k] = x & _MASK
        else:
            raw = x.to_bytes((x.bit_length() + 8) // 8, "little", signed=True)
            out[k] = int.from_bytes(hashlib.blake2b(raw, digest_size=8, person=b"servesim-bigint").digest(), "little")
    return out


def _check_t(tokens_per_block: int) -> int:
    if isinstance(tokens_per_block, bool) or not isinstance(tokens_per_block, (int, np.integer)) or tokens_per_block < 1:
        raise ValueError(f"tokens_per_block must be a positive integer, got {tokens_per_block!r}")
    return int(tokens_per_block)


# ---------------------------------------------------------------------- batched core


def _keys_from_hashes(rows: Sequence[Sequence[int]], plens: np.ndarray, H: int, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Engine keys (concatenated) and counts for rows of block hashes."""
    plens = np.asarray(plens, dtype=np.int64)
    nb = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    want = -(-plens // H)
    if (nb != want).any():
        i = int(np.flatnonzero(nb != want)[0])
        raise ValueError(
            f"block_hashes has {int(nb[i])} entries, expected ceil(prompt_len / {H}) = {int(want[i])} "
            f"(prompt_len {int(plens[i])})"
        )
    ne = plens // t
    if nb.sum() == 0 or ne.sum() == 0:
        return np.zeros(0, dtype=_U64), ne
    ids = _ints_to_u64(lambda: itertools.chain.from_iterable(rows), int(nb.sum()))
    woff, wlocal = _local_index(nb)
    # length of every workload block: H, except the last of each row
    blen = np.full(ids.size, H, dtype=np.int64)
    last = woff[1:][nb > 0] - 1
    blen[last] = plens[nb > 0] - (nb[nb > 0] - 1) * H
    d = _fmix64(_fmix64(ids ^ _SALT_ID) ^ (blen.astype(_U64) * _SALT_LEN))
    chain = _poly_chain(d, nb, _SEED_WORKLOAD)
    # engine block j of row r: the chain of workload block b_hi, and j
    _, elocal = _local_index(ne)
    b_hi = ((elocal + 1) * t - 1) // H
    c = _fmix64(chain[np.repeat(woff[:-1], ne) + b_hi] ^ _fmix64(elocal.astype(_U64) ^ _SALT_POS))
    return _poly_chain(c, ne, _SEED_ENGINE_H), ne


def _keys_from_tokens(rows: Sequence[Sequence[int]], t: int) -> tuple[np.ndarray, np.ndarray]:
    """Engine keys (concatenated) and counts for rows of token ids."""
    lens = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    ne = lens // t
    if ne.sum() == 0:
        return np.zeros(0, dtype=_U64), ne
    used = ne * t
    if (used == lens).all():
        flat = lambda: itertools.chain.from_iterable(rows)  # noqa: E731
    else:
        flat = lambda: itertools.chain.from_iterable(itertools.islice(r, int(u)) for r, u in zip(rows, used))  # noqa: E731
    tok = _fmix64(_ints_to_u64(flat, int(used.sum())) ^ _SALT_TOK).reshape(-1, t)
    # digest of each block's t tokens: sum_k f(x_k) P**(t-1-k), then mixed
    c = _fmix64((tok * _PPOW.get(t)[::-1]).sum(axis=1, dtype=_U64) ^ _SALT_CONTENT)
    return _poly_chain(c, ne, _SEED_ENGINE_T), ne


# ---------------------------------------------------------------------- public API


def engine_block_keys(
    block_hashes: Sequence[int], hash_block_size: int, prompt_len: int, tokens_per_block: int
) -> list[int]:
    """Chain keys of the request's full engine blocks (``prompt_len // tokens_per_block``
    of them) from its workload ``block_hashes`` (``ceil(prompt_len / hash_block_size)``
    ids). See the module docstring for the exact sharing rule."""
    t = _check_t(tokens_per_block)
    H = _check_t(hash_block_size)
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
    keys, _ = _keys_from_hashes([tuple(block_hashes)], np.array([prompt_len]), H, t)
    return keys.tolist()


def engine_block_keys_from_tokens(tokens: Sequence[int] | np.ndarray, tokens_per_block: int) -> list[int]:
    """Chain keys of the full engine blocks (``len(tokens) // tokens_per_block``) of a
    prompt given as token ids."""
    t = _check_t(tokens_per_block)
    if isinstance(tokens, np.ndarray):
        tokens = tokens.tolist()
    keys, _ = _keys_from_tokens([tokens], t)
    return keys.tolist()


class EngineKeys(NamedTuple):
    """The engine keys of every request of a workload, in CSR form: request ``i``'s keys
    are ``keys[offsets[i]:offsets[i + 1]]`` (``uint64``; empty for a request with no
    prefix information)."""

    keys: np.ndarray
    offsets: np.ndarray
    tokens_per_block: int

    def row(self, i: int) -> np.ndarray:
        return self.keys[self.offsets[i] : self.offsets[i + 1]]

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)


def workload_engine_keys(df: pd.DataFrame, tokens_per_block: int) -> EngineKeys:
    """Engine keys of every row of a workload table, vectorised (the same values as
    :func:`engine_block_keys` / :func:`engine_block_keys_from_tokens` row by row).

    Per row, ``prompt_tokens`` is used when present (it is exact), else
    ``block_hashes``; a row with neither (no column, or None) gets no keys."""
    t = _check_t(tokens_per_block)
    n = len(df)
    plen = df["prompt_len"].to_numpy(dtype=np.int64)
    tok_col = df["prompt_tokens"].to_numpy(dtype=object) if "prompt_tokens" in df.columns else np.full(n, None, object)
    has_tok = np.fromiter((v is not None for v in tok_col), dtype=bool, count=n)
    if "block_hashes" in df.columns:
        h_col = df["block_hashes"].to_numpy(dtype=object)
        has_h = np.fromiter((v is not None for v in h_col), dtype=bool, count=n) & ~has_tok
    else:
        h_col, has_h = None, np.zeros(n, dtype=bool)
    counts = np.zeros(n, dtype=np.int64)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (rows, counts, keys)
    if has_tok.any():
        rows = np.flatnonzero(has_tok)
        keys, ne = _keys_from_tokens(tok_col[rows].tolist(), t)
        parts.append((rows, ne, keys))
    if has_h.any():
        H = df.attrs.get(HASH_BLOCK_SIZE)
        if H is None:
            raise ValueError(f"a block_hashes column needs df.attrs[{HASH_BLOCK_SIZE!r}]")
        rows = np.flatnonzero(has_h)
        keys, ne = _keys_from_hashes(h_col[rows].tolist(), plen[rows], int(H), t)
        parts.append((rows, ne, keys))
    for rows, ne, _ in parts:
        counts[rows] = ne
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    out = np.empty(int(offsets[-1]), dtype=_U64)
    for rows, ne, keys in parts:
        if len(parts) == 1 and rows.size == n:
            out = keys
            break
        _, local = _local_index(ne)
        out[np.repeat(offsets[rows], ne) + local] = keys
    return EngineKeys(out, offsets, t)


def reuse_bound(df: pd.DataFrame, tokens_per_block: int) -> dict[str, Any]:
    """Upper bound on prefix reuse with an unlimited cache of ``tokens_per_block``-token
    blocks: request ``i`` can reuse its leading full engine blocks whose key appeared
    in any *earlier* row (rows are in arrival order; ties keep row order) — every block
    of every earlier request stays cached and every request arrives after the previous
    ones finished prefill. (A real engine also recomputes at least the last prompt
    token; this bound does not.)

    Returns ``reuse_fraction`` (reused / total), ``reused_tokens``, ``total_tokens``
    (sum of ``prompt_len``, rows without prefix information included),
    ``per_request`` (int64 reusable tokens per row) and ``tokens_per_block``."""
    ek = workload_engine_keys(df, tokens_per_block)
    t = ek.tokens_per_block
    n = len(df)
    counts = ek.counts
    per_request = np.zeros(n, dtype=np.int64)
    if ek.keys.size:
        req = np.repeat(np.arange(n, dtype=np.int64), counts)
        codes, _ = pd.factorize(ek.keys)  # codes numbered in order of first appearance
        prev_max = np.empty_like(codes)
        prev_max[0] = -1
        np.maximum.accumulate(codes[:-1], out=prev_max[1:])
        first_req = req[codes > prev_max]  # indexed by code
        seen = first_req[codes] < req
        _, local = _local_index(counts)
        miss = np.where(seen, np.iinfo(np.int64).max, local)
        nz = np.flatnonzero(counts)
        first_miss = np.minimum.reduceat(miss, ek.offsets[nz])
        per_request[nz] = np.minimum(first_miss, counts[nz]) * t
    total = int(df["prompt_len"].to_numpy(dtype=np.int64).sum())
    reused = int(per_request.sum())
    return {
        "tokens_per_block": t,
        "reuse_fraction": reused / total if total else 0.0,
        "reused_tokens": reused,
        "total_tokens": total,
        "per_request": per_request,
    }


def content_block_hashes(tokens: np.ndarray, hash_block_size: int) -> np.ndarray:
    """Workload block ids of a token sequence: one non-negative 63-bit id per
    ``hash_block_size``-token block (the last may be partial), a digest of the block's
    tokens *and its length* only — not of earlier blocks (the reuse rule above brings
    the prefix in). Deterministic across processes. ``tokens`` are ints >= 0."""
    H = _check_t(hash_block_size)
    tokens = np.asarray(tokens, dtype=np.int64)
    nb = -(-tokens.size // H)
    if nb == 0:
        return np.zeros(0, dtype=np.int64)
    padded = np.full(nb * H, -1, dtype=np.int64)  # -1 marks "past the end": length is in the digest
    padded[: tokens.size] = tokens
    f = _fmix64(padded.view(_U64) ^ _SALT_TOK).reshape(nb, H)
    h = _fmix64((f * _PPOW.get(H)[::-1]).sum(axis=1, dtype=_U64) ^ _SALT_CONTENT)
    return (h >> _U64(1)).view(np.int64)
