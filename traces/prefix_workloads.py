"""Synthetic workloads whose prompts share prefixes (for KV-cache prefix reuse).

- :func:`shared_system_prompt` — every request = one shared system prompt + a unique
  user message.
- :func:`multi_turn` — conversations: turn ``k``'s prompt is turn ``k-1``'s prompt,
  then turn ``k-1``'s output, then a new user message.
- :func:`few_shot` — every request = one of ``K`` templates (few-shot examples), picked
  with Zipf popularity, + a unique question.

Content. Each generator draws actual token ids (uniform on ``[0, vocab_size)``, from its
own random stream) for every piece of text — system prompt, templates, user messages,
and the *outputs* of earlier turns, which become part of later prompts — so the prefix
structure is exact, including blocks that straddle two pieces of text. It then writes
either

- ``block_hashes`` (default, ``hash_block_size=16``): one id per 16-token block of the
  prompt, the last block partial when ``prompt_len`` is not a multiple of 16 (so
  ``len == ceil(prompt_len / 16)``). An id is a 63-bit digest of the block's tokens and
  length (:func:`servesim.traces.reuse_bound.content_block_hashes`), so equal content
  gives equal ids and different content different ids (up to 2**-63). This is ~16x
  smaller than the tokens and fine enough for any engine block size that is a
  multiple of 16; :mod:`~servesim.traces.reuse_bound` explains how other sizes are
  read (conservatively: a partially shared 16-token block counts as not shared);
- or ``prompt_tokens`` (``hash_block_size=None``): the token ids themselves — exact at
  any engine block size and usable by the GPU backend (keep ``vocab_size`` within the
  model's vocabulary), but one Python int per prompt token in memory.

The output tokens the simulator "generates" are not these: generation lengths are
forced, and a multi-turn workload assumes the model produces the drawn output tokens
(the usual assumption of trace replay).

Parameters. Lengths (``user_len``, ``output_len``, ...) take an int (constant), a
sequence of per-draw values, or a sampler ``f(n, rng) -> array of n ints`` (e.g.
``lambda n, r: synthetic.lognormal_lengths(n, 500, 0.8, r, hi=4096)``); arrivals take
None (all at t = 0), ``n`` sorted times, or a sampler ``f(n, rng)`` (e.g.
``lambda n, r: synthetic.poisson_arrivals(n, 2.0, r)``); durations (``think_time_s``) a
number or a sampler of seconds. ``rng`` is a ``numpy.random.Generator`` (or an int
seed); each kind of draw (arrivals, each length, content, ...) comes from its own
child stream (``rng.spawn``), so changing one distribution leaves the others' draws
alone. Rows come out in arrival order (ties: in generation order) with request_id
0..N-1, ready for :func:`servesim.traces.schema.validate_workload`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import numpy as np
import pandas as pd

from servesim.traces.reuse_bound import content_block_hashes
from servesim.traces.schema import make_workload

__all__ = ["shared_system_prompt", "multi_turn", "few_shot"]

Sampler = Callable[[int, np.random.Generator], np.ndarray]
LengthLike = Union[int, Sequence[int], np.ndarray, Sampler]
DurationLike = Union[float, Sequence[float], np.ndarray, Sampler]
ArrivalLike = Union[None, Sequence[float], np.ndarray, Sampler]

DEFAULT_HASH_BLOCK_SIZE = 16
DEFAULT_VOCAB_SIZE = 32_000


# ---------------------------------------------------------------------- draws


def _rng(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy.random.Generator or an int seed, got {type(rng).__name__}")


def _streams(rng: np.random.Generator | int, names: Sequence[str]) -> dict[str, np.random.Generator]:
    return dict(zip(names, _rng(rng).spawn(len(names))))


def _values(spec, n: int, rng: np.random.Generator, name: str) -> np.ndarray:
    if callable(spec):
        out = np.asarray(spec(n, rng))
    elif np.isscalar(spec):
        out = np.full(n, spec)
    else:
        out = np.asarray(spec)
    if out.shape != (n,):
        raise ValueError(f"{name}: expected {n} values, got shape {out.shape}")
    return out


def _lengths(spec: LengthLike, n: int, rng: np.random.Generator, name: str, min_value: int = 1) -> np.ndarray:
    out = _values(spec, n, rng, name)
    if n and (out.dtype.kind not in "iu" and not np.all(np.mod(out, 1) == 0)):
        raise ValueError(f"{name} must be integers")
    out = out.astype(np.int64)
    if n and out.min() < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {int(out.min())}")
    return out


def _durations(spec: DurationLike, n: int, rng: np.random.Generator, name: str) -> np.ndarray:
    out = _values(spec, n, rng, name).astype(np.float64)
    if n and not (np.isfinite(out).all() and out.min() >= 0):
        raise ValueError(f"{name} must be finite and >= 0")
    return out


def _arrivals(spec: ArrivalLike, n: int, rng: np.random.Generator, name: str = "arrival_s") -> np.ndarray:
    if spec is None:
        return np.zeros(n, dtype=np.float64)
    out = _values(spec, n, rng, name).astype(np.float64)
    if n and not np.isfinite(out).all():
        raise ValueError(f"{name} must be finite")
    if n > 1 and (np.diff(out) < 0).any():
        raise ValueError(f"{name} must be sorted (non-decreasing)")
    return out


def _check_int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def _check_common(hash_block_size: int | None, vocab_size: int) -> None:
    if hash_block_size is not None:
        _check_int("hash_block_size", hash_block_size, 1)
    _check_int("vocab_size", vocab_size, 2)


# ---------------------------------------------------------------------- encoding


class _Encoder:
    """Turns prompts (token arrays) into ``block_hashes`` or ``prompt_tokens`` cells.

    A prompt is ``head + tail`` where ``head`` is a shared token array whose full
    blocks were hashed once (:meth:`head`); only the tail is hashed per request."""

    def __init__(self, hash_block_size: int | None):
        self.H = hash_block_size
        self.cells: list[tuple[int, ...]] = []

    def head(self, tokens: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """(the head's tokens, the ids of its full blocks)"""
        if self.H is None:
            return tokens, []
        full = tokens.size // self.H * self.H
        return tokens, content_block_hashes(tokens[:full], self.H).tolist()

    def add(self, head: tuple[np.ndarray, list[int]], prompt_len: int, tail: np.ndarray | None = None) -> None:
        """Append the cell of the prompt ``(head tokens + tail)[:prompt_len]``."""
        tokens, head_ids = head
        if self.H is None:
            seq = tokens[:prompt_len] if tail is None else np.concatenate([tokens, tail])[:prompt_len]
            self.cells.append(tuple(seq.tolist()))
            return
        done = min(len(head_ids), prompt_len // self.H)  # reusable full head blocks
        start = done * self.H
        rest = tokens[start:prompt_len] if tail is None else np.concatenate([tokens[start:], tail])[: prompt_len - start]
        self.cells.append(tuple(head_ids[:done] + content_block_hashes(rest, self.H).tolist()))

    def frame(self, arrival: np.ndarray, prompt_len: np.ndarray, output_len: np.ndarray, order: np.ndarray) -> pd.DataFrame:
        cells = np.empty(len(self.cells), dtype=object)
        cells[:] = self.cells
        cells = cells[order]
        df = make_workload(arrival[order], prompt_len[order], output_len[order], hash_block_size=self.H)
        df["block_hashes" if self.H is not None else "prompt_tokens"] = cells  # tuples of Python ints already
        return df


def _before(x: np.ndarray, first: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Exclusive cumulative sum of ``x`` within each run (runs start at ``first[:-1]``)."""
    out = np.cumsum(x) - x
    out -= np.repeat(out[first[:-1]], counts)
    return out


def _order(arrival: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """Stable order by arrival, then by ``keys`` (first is most significant)."""
    return np.lexsort(tuple(reversed(keys)) + (arrival,)) if keys else np.argsort(arrival, kind="stable")


# ---------------------------------------------------------------------- generators


def shared_system_prompt(
    n: int,
    system_len: int,
    user_len: LengthLike,
    output_len: LengthLike,
    *,
    arrival_s: ArrivalLike = None,
    rng: np.random.Generator | int = 0,
    hash_block_size: int | None = DEFAULT_HASH_BLOCK_SIZE,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    shared_fraction: float = 1.0,
) -> pd.DataFrame:
    """``n`` requests, each the same ``system_len``-token system prompt followed by a
    unique ``user_len``-token message (``prompt_len = system_len + user_len``).

    With ``shared_fraction < 1`` only that share of requests (drawn at random, tenant
    ``"system"``) carries the system prompt; the others (tenant ``"oneoff"``) are unique
    prompts of the same length -- background load that competes for the cache.

    With ``prompt_tokens`` every request shares the first ``system_len // t`` engine
    blocks of ``t`` tokens. With ``block_hashes`` of ``H`` tokens they share the system
    prompt's ``system_len // H`` full hash blocks (the block straddling its end mixes
    in user tokens, so it differs per request), hence the first
    ``(system_len // H) * H // t`` engine blocks."""
    n = _check_int("n", n, 1)
    system_len = _check_int("system_len", system_len, 1)
    _check_common(hash_block_size, vocab_size)
    rs = _streams(rng, ("arrival", "user_len", "output_len", "content"))
    arrival = _arrivals(arrival_s, n, rs["arrival"])
    ulen = _lengths(user_len, n, rs["user_len"], "user_len")
    olen = _lengths(output_len, n, rs["output_len"], "output_len")
    content = rs["content"]
    if not 0 < shared_fraction <= 1:
        raise ValueError(f"shared_fraction must be in (0, 1], got {shared_fraction}")
    shared = (np.ones(n, dtype=bool) if shared_fraction >= 1
              else np.random.default_rng(rs["content"].integers(1 << 62)).random(n) < shared_fraction)
    enc = _Encoder(hash_block_size)
    head = enc.head(content.integers(0, vocab_size, size=system_len))
    plen = system_len + ulen
    for i in range(n):
        if shared[i]:
            enc.add(head, int(plen[i]), content.integers(0, vocab_size, size=int(ulen[i])))
        else:
            enc.add(enc.head(content.integers(0, vocab_size, size=0)), int(plen[i]),
                    content.integers(0, vocab_size, size=int(plen[i])))
    order = _order(arrival)
    df = enc.frame(arrival, plen, olen, order)
    if shared_fraction < 1:
        df["tenant"] = np.where(shared[order], "system", "oneoff")
    return df


def few_shot(
    n: int,
    num_templates: int,
    template_len: LengthLike,
    question_len: LengthLike,
    output_len: LengthLike,
    *,
    zipf_a: float = 1.0,
    arrival_s: ArrivalLike = None,
    rng: np.random.Generator | int = 0,
    hash_block_size: int | None = DEFAULT_HASH_BLOCK_SIZE,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    return_meta: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """``n`` requests, each one of ``num_templates`` templates (a few-shot prompt of
    ``template_len`` tokens, drawn once per template) followed by a unique
    ``question_len``-token question. Template ``k`` (0-based) is picked with probability
    ∝ ``(k + 1) ** -zipf_a`` (``zipf_a = 0``: uniform). With ``return_meta``, also a
    frame aligned with the rows: ``template`` (index) and ``template_len``."""
    n = _check_int("n", n, 1)
    num_templates = _check_int("num_templates", num_templates, 1)
    if not (np.isfinite(zipf_a) and zipf_a >= 0):
        raise ValueError(f"zipf_a must be a finite number >= 0, got {zipf_a}")
    _check_common(hash_block_size, vocab_size)
    rs = _streams(rng, ("arrival", "template_len", "question_len", "output_len", "template", "content"))
    arrival = _arrivals(arrival_s, n, rs["arrival"])
    tlen = _lengths(template_len, num_templates, rs["template_len"], "template_len")
    qlen = _lengths(question_len, n, rs["question_len"], "question_len")
    olen = _lengths(output_len, n, rs["output_len"], "output_len")
    weights = np.arange(1, num_templates + 1, dtype=np.float64) ** -float(zipf_a)
    pick = rs["template"].choice(num_templates, size=n, p=weights / weights.sum())
    content = rs["content"]
    enc = _Encoder(hash_block_size)
    heads = [enc.head(content.integers(0, vocab_size, size=int(L))) for L in tlen]
    plen = tlen[pick] + qlen
    for i in range(n):
        enc.add(heads[pick[i]], int(plen[i]), content.integers(0, vocab_size, size=int(qlen[i])))
    order = _order(arrival)
    df = enc.frame(arrival, plen, olen, order)
    if not return_meta:
        return df
    return df, pd.DataFrame({"template": pick[order].astype(np.int64), "template_len": tlen[pick][order]})


def multi_turn(
    num_conversations: int,
    turns: LengthLike,
    user_len: LengthLike,
    output_len: LengthLike,
    *,
    think_time_s: DurationLike = 0.0,
    arrival_s: ArrivalLike = None,
    system_len: int = 0,
    response_s_per_token: float = 0.0,
    rng: np.random.Generator | int = 0,
    hash_block_size: int | None = DEFAULT_HASH_BLOCK_SIZE,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    return_meta: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """``num_conversations`` chats of ``turns`` turns each (drawn per conversation).

    Turn ``k`` of a conversation sends ``prompt_k = prompt_{k-1} + output_{k-1} +
    user_k`` (``prompt_0 = system + user_0``; ``system_len`` tokens shared by *every*
    conversation, 0 for none), and generates ``output_k`` tokens; ``user_k`` and
    ``output_k`` are drawn per turn. So ``prompt_len_k = system_len + sum_{i<=k}
    user_len_i + sum_{i<k} output_len_i``, and each prompt starts with the whole
    previous prompt and the previous output.

    Arrivals are fixed in the workload (open loop): conversation ``c`` starts at
    ``arrival_s[c]`` and turn ``k + 1`` arrives ``think_time_s + response_s_per_token *
    output_len_k`` after turn ``k`` *arrived* (one think time drawn per gap;
    ``response_s_per_token`` is a rough estimate of the time to generate turn ``k``'s
    answer). The simulator does not wait for turn ``k`` to finish: if it is slower than
    that estimate, turn ``k + 1`` arrives before turn ``k``'s output is in the cache
    (and before it would exist in reality). Choose gaps longer than the expected
    response time to mimic a user who reads the answer first.

    With ``return_meta``, also a frame aligned with the rows: ``conversation``,
    ``turn`` (0-based), ``user_len``."""
    num_conversations = _check_int("num_conversations", num_conversations, 1)
    system_len = _check_int("system_len", system_len, 0)
    if not (np.isfinite(response_s_per_token) and response_s_per_token >= 0):
        raise ValueError(f"response_s_per_token must be a finite number >= 0, got {response_s_per_token}")
    _check_common(hash_block_size, vocab_size)
    rs = _streams(rng, ("arrival", "turns", "user_len", "output_len", "think_time", "content"))
    starts = _arrivals(arrival_s, num_conversations, rs["arrival"])
    nturns = _lengths(turns, num_conversations, rs["turns"], "turns")
    total = int(nturns.sum())
    ulen = _lengths(user_len, total, rs["user_len"], "user_len")
    olen = _lengths(output_len, total, rs["output_len"], "output_len")
    think = _durations(think_time_s, total, rs["think_time"], "think_time_s")  # one per turn; the last unused

    first = np.zeros(num_conversations + 1, dtype=np.int64)
    np.cumsum(nturns, out=first[1:])
    conv = np.repeat(np.arange(num_conversations, dtype=np.int64), nturns)
    turn = np.arange(total, dtype=np.int64) - first[conv]
    # within each conversation: prompt_k = system + sum_{i<=k} user_i + sum_{i<k} output_i
    plen = system_len + _before(ulen, first, nturns) + ulen + _before(olen, first, nturns)
    gap_before = _before(think + response_s_per_token * olen, first, nturns)  # gap k follows turn k
    arrival = starts[conv] + gap_before

    content = rs["content"]
    enc = _Encoder(hash_block_size)
    system = content.integers(0, vocab_size, size=system_len)
    for c in range(num_conversations):
        lo, hi = int(first[c]), int(first[c + 1])
        # the conversation's whole text: system, user_0, output_0, user_1, output_1, ...
        pieces = [system]
        for k in range(lo, hi):
            pieces.append(content.integers(0, vocab_size, size=int(ulen[k])))
            pieces.append(content.integers(0, vocab_size, size=int(olen[k])))
        head = enc.head(np.concatenate(pieces))
        for k in range(lo, hi):
            enc.add(head, int(plen[k]))
    order = _order(arrival, conv, turn)
    df = enc.frame(arrival, plen, olen, order)
    if not return_meta:
        return df
    return df, pd.DataFrame({"conversation": conv[order], "turn": turn[order], "user_len": ulen[order]})
