"""Tests of servesim.traces.reuse_bound (engine block keys, reuse bound) and
servesim.traces.prefix_workloads (shared-prefix generators) and their YAML schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servesim.sim.types import ConfigError
from servesim.traces import prefix_workloads as pw
from servesim.traces import synthetic
from servesim.traces.fingerprint import workload_fingerprint
from servesim.traces.readers import DATA_DIR, read_mooncake, read_table
from servesim.traces.reuse_bound import (
    content_block_hashes,
    engine_block_keys,
    engine_block_keys_from_tokens,
    reuse_bound,
    reuse_from_keys,
    workload_engine_keys,
)
from servesim.traces.schema import make_workload, present_columns, validate_workload
from servesim.traces.spec import build_workload, parse_workload_config
from servesim.traces.writers import write_table

MOONCAKE = DATA_DIR / "mooncake_conversation_trace.jsonl"
HYP = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------- Mooncake reuse bound


@pytest.fixture(scope="module")
def mooncake_df():
    return read_mooncake(MOONCAKE)


@pytest.fixture(scope="module")
def mooncake_bounds(mooncake_df):
    return {t: reuse_bound(mooncake_df, t) for t in (16, 32, 64, 512)}


def test_mooncake_bound_at_512_matches_brute_force(mooncake_bounds):
    """Straight from the JSONL: request r reuses its leading full 512-token blocks whose
    id prefix (hash_ids[:j+1]) was a full-block prefix of an earlier request."""
    with MOONCAKE.open() as f:
        recs = [json.loads(line) for line in f if line.strip()]
    recs.sort(key=lambda r: r["timestamp"])  # stable: file order among equal times
    seen: set[tuple[int, ...]] = set()
    per, total = [], 0
    for r in recs:
        h, full = r["hash_ids"], r["input_length"] // 512
        k = 0
        while k < full and tuple(h[: k + 1]) in seen:
            k += 1
        per.append(k * 512)
        total += r["input_length"]
        seen.update(tuple(h[: j + 1]) for j in range(full))
    got = mooncake_bounds[512]
    assert got["per_request"].tolist() == per
    assert got["reused_tokens"] == sum(per) and got["total_tokens"] == total
    assert got["reuse_fraction"] == pytest.approx(sum(per) / total)
    assert 0.3 < got["reuse_fraction"] < 0.45  # the README's 36.6 % of blocks are reused


def test_mooncake_bound_at_finer_blocks(mooncake_df, mooncake_bounds):
    """For t dividing 512: a reused 512-block is 512/t reused t-blocks (those keys exist
    in the earlier request too), so r_t >= r_512. Beyond the full 512-blocks only the
    partial last block can add tokens, and only if an earlier request had the same
    chain *including that block's length* (then all of its whole t-blocks count): so
    r_t - r_512 is 0 or (L mod 512) // t * t, and non-zero only when every full
    512-block was reused. Finer blocks never reuse less: r_16 >= r_32 >= r_64."""
    L = mooncake_df["prompt_len"].to_numpy()
    r512 = mooncake_bounds[512]["per_request"]
    full512 = L // 512 * 512
    prev = None
    for t in (64, 32, 16):
        rt = mooncake_bounds[t]["per_request"]
        extra = rt - r512
        tail = L % 512 // t * t
        assert ((extra == 0) | (extra == tail)).all()
        assert (r512[extra > 0] == full512[extra > 0]).all()
        assert (rt % t == 0).all() and (rt <= L).all()
        if prev is not None:
            assert (rt >= prev).all()
        prev = rt
    assert mooncake_bounds[16]["reuse_fraction"] >= mooncake_bounds[512]["reuse_fraction"]


@pytest.mark.parametrize("t", [48, 512])
def test_reuse_bound_equals_the_definition_from_keys(mooncake_df, mooncake_bounds, t):
    """reuse_bound works on workload chains; reuse_from_keys on the engine keys the block
    manager uses. They must agree (48 does not divide 512: blocks straddle hash blocks)."""
    ek = workload_engine_keys(mooncake_df, t)
    assert ek.counts.tolist() == (mooncake_df["prompt_len"] // t).tolist()
    expect = mooncake_bounds[t]["per_request"] if t in mooncake_bounds else reuse_bound(mooncake_df, t)["per_request"]
    assert (reuse_from_keys(ek) == expect).all()


def test_workload_keys_equal_per_request_keys(mooncake_df):
    ek = workload_engine_keys(mooncake_df, 64)
    for i in (0, 1, 7, 500, len(mooncake_df) - 1):
        r = mooncake_df.iloc[i]
        assert ek.row(i).tolist() == engine_block_keys(r["block_hashes"], 512, int(r["prompt_len"]), 64)


# ---------------------------------------------------------------------- keys: oracle properties


def _lens(plen: int, H: int) -> list[int]:
    nb = -(-plen // H)
    return [H] * (nb - 1) + [plen - (nb - 1) * H]


@st.composite
def _hash_pair(draw):
    H = draw(st.integers(1, 8))
    t = draw(st.integers(1, 12))
    la = draw(st.integers(1, 70))
    ha = draw(st.lists(st.integers(0, 2), min_size=-(-la // H), max_size=-(-la // H)))
    if draw(st.booleans()):  # B: a copy of A with a tail cut, and maybe one id changed
        lb = draw(st.integers(1, la))
        hb = ha[: -(-lb // H)]
        if draw(st.booleans()):
            k = draw(st.integers(0, len(hb) - 1))
            hb = hb[:k] + [hb[k] + 1] + hb[k + 1 :]
    else:
        lb = draw(st.integers(1, 70))
        hb = draw(st.lists(st.integers(0, 2), min_size=-(-lb // H), max_size=-(-lb // H)))
    return H, t, (la, ha), (lb, hb)


@HYP
@given(_hash_pair())
def test_hash_keys_match_the_token_identity_rule(case):
    """Key j equal in A and B  <=>  every token in [0, (j+1) t) is shared, where a token
    is shared iff all workload blocks up to its own have equal ids and equal lengths."""
    H, t, (la, ha), (lb, hb) = case
    ka, kb = engine_block_keys(ha, H, la, t), engine_block_keys(hb, H, lb, t)
    assert len(ka) == la // t and len(kb) == lb // t
    lena, lenb = _lens(la, H), _lens(lb, H)

    def shared(m):  # tokens [0, m) identical under the rule
        return all(ha[b] == hb[b] and lena[b] == lenb[b] for b in range(-(-m // H)))

    for j in range(min(len(ka), len(kb))):
        assert (ka[j] == kb[j]) == shared((j + 1) * t), (j, ka, kb)
    # a key names a position too: no key of A equals a key of B at another position
    pos_a = {k: j for j, k in enumerate(ka)}
    assert len(pos_a) == len(ka)
    assert all(pos_a.get(k, j) == j for j, k in enumerate(kb))


@HYP
@given(
    st.integers(1, 9),
    st.lists(st.integers(0, 1), min_size=0, max_size=60),
    st.lists(st.integers(0, 1), min_size=0, max_size=60),
)
def test_token_keys_equal_iff_prefix_equal(t, a, b):
    ka, kb = engine_block_keys_from_tokens(a, t), engine_block_keys_from_tokens(np.array(b, dtype=np.int64), t)
    assert len(ka) == len(a) // t and len(kb) == len(b) // t
    for j in range(min(len(ka), len(kb))):
        assert (ka[j] == kb[j]) == (a[: (j + 1) * t] == b[: (j + 1) * t])


@HYP
@given(st.integers(1, 8), st.integers(1, 12), st.integers(1, 90), st.integers(0, 10**6), st.data())
def test_keys_are_a_pure_function_of_content(H, t, plen, seed, data):
    rng = np.random.default_rng(seed)
    hashes = rng.integers(-(2**63), 2**63 - 1, size=-(-plen // H)).tolist()
    keys = engine_block_keys(hashes, H, plen, t)
    assert keys == engine_block_keys(tuple(hashes), H, plen, t) == engine_block_keys(list(hashes), H, plen, t)
    # changing one block changes the keys of every engine block that reaches into it, and no earlier one
    b = data.draw(st.integers(0, len(hashes) - 1))
    changed = hashes[:b] + [hashes[b] ^ 1] + hashes[b + 1 :]
    keys2 = engine_block_keys(changed, H, plen, t)
    for j in range(len(keys)):
        assert (keys[j] == keys2[j]) == ((j + 1) * t <= b * H)
    tokens = rng.integers(0, 50, size=plen).tolist()
    tk = engine_block_keys_from_tokens(tokens, t)
    assert tk == engine_block_keys_from_tokens(np.array(tokens), t)
    p = data.draw(st.integers(0, plen - 1))
    tokens2 = tokens[:p] + [tokens[p] + 1] + tokens[p + 1 :]
    tk2 = engine_block_keys_from_tokens(tokens2, t)
    assert all((tk[j] == tk2[j]) == ((j + 1) * t <= p) for j in range(len(tk)))
    assert not set(tk) & set(keys)  # the two sources never share keys


def test_keys_are_stable_across_processes_and_versions():
    """Keys must not depend on PYTHONHASHSEED (no salted hash()), and the scheme is
    pinned: a change to it changes these values."""
    code = (
        "from servesim.traces.reuse_bound import engine_block_keys as k, engine_block_keys_from_tokens as kt, "
        "content_block_hashes as c; "
        "print(k((5, 7, 11), 4, 10, 3), kt(range(10), 4), c([1, 2, 3, 4, 5], 2).tolist())"
    )
    outs = set()
    for hs in ("0", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": hs}
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    assert len(outs) == 1
    here = f"{engine_block_keys((5, 7, 11), 4, 10, 3)} {engine_block_keys_from_tokens(range(10), 4)} {content_block_hashes([1, 2, 3, 4, 5], 2).tolist()}\n"
    assert outs == {here}
    assert engine_block_keys((5, 7, 11), 4, 10, 3)[0] == GOLDEN_FIRST_KEY


GOLDEN_FIRST_KEY = 12316912278026550614


def test_key_inputs_are_checked():
    with pytest.raises(ValueError, match=r"block_hashes has 2 entries, expected ceil\(prompt_len / 4\) = 3"):
        engine_block_keys((1, 2), 4, 10, 2)
    with pytest.raises(ValueError, match="tokens_per_block"):
        engine_block_keys((1,), 4, 3, 0)
    assert engine_block_keys((1,), 4, 3, 4) == []  # no full engine block
    assert engine_block_keys((2**70, -(2**70)), 1, 2, 1)[0] != engine_block_keys((2**70 + 1, 0), 1, 2, 1)[0]


def test_mixed_rows_use_tokens_then_hashes_then_nothing():
    toks = tuple(range(100, 108))
    df = make_workload(
        [0.0, 1.0, 2.0, 3.0],
        [8, 8, 8, 8],
        [1, 1, 1, 1],
        hash_block_size=4,
        block_hashes=[(1, 2), (1, 2), None, (1, 2)],
        prompt_tokens=[None, toks, toks, None],
    )
    validate_workload(df, "mixed")
    ek = workload_engine_keys(df, 2)
    assert ek.row(0).tolist() == engine_block_keys((1, 2), 4, 8, 2) == ek.row(3).tolist()
    assert ek.row(1).tolist() == engine_block_keys_from_tokens(toks, 2) == ek.row(2).tolist()
    res = reuse_bound(df, 2)
    assert res["per_request"].tolist() == [0, 0, 8, 8] and res["total_tokens"] == 32
    assert (reuse_from_keys(ek) == res["per_request"]).all()
    none = make_workload([0.0, 1.0], [5, 5], [1, 1])
    assert reuse_bound(none, 4)["reused_tokens"] == 0 and workload_engine_keys(none, 4).keys.size == 0


# ---------------------------------------------------------------------- multi-turn


def _tokens_of(df):
    return [np.array(v) for v in df["prompt_tokens"]]


@pytest.fixture(scope="module")
def chats():
    kw = dict(
        num_conversations=40,
        turns=lambda n, r: r.integers(4, 8, size=n),
        user_len=lambda n, r: synthetic.lognormal_lengths(n, 60, 0.8, r),
        output_len=lambda n, r: synthetic.uniform_lengths(n, 1, 120, r),
        think_time_s=lambda n, r: r.exponential(5.0, size=n),
        arrival_s=lambda n, r: synthetic.poisson_arrivals(n, 1.0, r),
        return_meta=True,
    )
    hashed = pw.multi_turn(**kw, rng=np.random.default_rng(3))
    tokens = pw.multi_turn(**kw, rng=np.random.default_rng(3), hash_block_size=None)
    return hashed, tokens


def test_multi_turn_structure(chats):
    (df, meta), (tdf, tmeta) = chats
    validate_workload(df, "chats")
    validate_workload(tdf, "chats")
    assert meta.equals(tmeta) and df[["arrival_s", "prompt_len", "output_len"]].equals(tdf[["arrival_s", "prompt_len", "output_len"]])
    # same content in both encodings: the block ids are the digests of the tokens
    for h, tok in zip(df["block_hashes"], _tokens_of(tdf)):
        assert list(h) == content_block_hashes(tok, 16).tolist()
    assert (np.diff(df["arrival_s"]) >= 0).all() and df["request_id"].tolist() == list(range(len(df)))
    toks = _tokens_of(tdf)
    for _, g in meta.groupby("conversation"):
        rows = g.index.to_numpy()
        assert g["turn"].tolist() == list(range(len(g)))  # turns in arrival order
        for prev, cur in zip(rows, rows[1:]):
            p, o = int(df["prompt_len"][prev]), int(df["output_len"][prev])
            assert df["prompt_len"][cur] == p + o + meta["user_len"][cur]
            assert df["arrival_s"][cur] >= df["arrival_s"][prev]
            assert (toks[cur][:p] == toks[prev]).all()  # starts with the whole previous prompt ...
        for a, b in zip(rows[1:], rows[2:]):
            # ... and the previous output: turn a's prompt up to its new user message
            # (turn a-1's prompt + output) comes back, token for token, in turn b
            upto = int(df["prompt_len"][a]) - int(meta["user_len"][a])
            for t in (1, 16):
                ka = engine_block_keys_from_tokens(toks[a][:upto], t)
                assert engine_block_keys_from_tokens(toks[b], t)[: len(ka)] == ka


def test_multi_turn_keys_extend_previous_turn(chats):
    (df, meta), _ = chats
    for t in (16, 32):
        ek = workload_engine_keys(df, t)
        for _, g in meta.groupby("conversation"):
            rows = g.index.to_numpy()
            for prev, cur in zip(rows, rows[1:]):
                # every full engine block of the previous prompt lies in full 16-blocks when t % 16 == 0
                kp = ek.row(prev)
                assert (ek.row(cur)[: kp.size] == kp).all()


@pytest.mark.parametrize("t", [16, 32, 64, 1, 24])
def test_multi_turn_reuse_is_exactly_the_previous_prompt(chats, t):
    """No system prompt: turn 0 reuses nothing; turn k reuses turn k-1's prompt — with
    prompt_tokens all of its whole t-blocks, with 16-token block_hashes only the whole
    t-blocks inside its full 16-blocks (its partial last block is not the same block
    in turn k, which extends it)."""
    (df, meta), (tdf, _) = chats
    prev_plen = np.zeros(len(df), dtype=np.int64)
    for _, g in meta.groupby("conversation"):
        rows = g.index.to_numpy()
        prev_plen[rows[1:]] = df["prompt_len"].to_numpy()[rows[:-1]]
    assert (reuse_bound(tdf, t)["per_request"] == prev_plen // t * t).all()
    assert (reuse_bound(df, t)["per_request"] == prev_plen // 16 * 16 // t * t).all()


def test_multi_turn_reuse_bound_is_high_with_four_turns():
    df = pw.multi_turn(
        100, 4, lambda n, r: r.integers(20, 200, size=n), lambda n, r: r.integers(20, 400, size=n),
        think_time_s=30.0, arrival_s=lambda n, r: synthetic.poisson_arrivals(n, 0.5, r), rng=0,
    )
    assert len(df) == 400
    for t in (16, 32, 64):
        assert reuse_bound(df, t)["reuse_fraction"] > 0.5
    single = pw.multi_turn(100, 1, 100, 100, rng=0)
    assert reuse_bound(single, 16)["reused_tokens"] == 0


def test_multi_turn_arrivals_and_system_prompt():
    df, meta = pw.multi_turn(
        3, 3, 10, lambda n, r: np.full(n, 5), think_time_s=[1.0, 2.0, 9.0, 1.0, 1.0, 9.0, 4.0, 4.0, 9.0],
        arrival_s=[0.0, 0.5, 0.5], system_len=40, response_s_per_token=0.1, rng=1, return_meta=True,
    )
    # gaps: think + 0.1 * 5; conversation c's turns at start_c + cumulative gaps
    want = {(0, 0): 0.0, (0, 1): 1.5, (0, 2): 4.0, (1, 0): 0.5, (1, 1): 2.0, (1, 2): 3.5, (2, 0): 0.5, (2, 1): 5.0, (2, 2): 9.5}
    got = {(c, k): a for c, k, a in zip(meta["conversation"], meta["turn"], df["arrival_s"])}
    assert got == pytest.approx(want)
    assert sorted(df["prompt_len"]) == [50] * 3 + [65] * 3 + [80] * 3  # 40 + 10; + 5 + 10; + 5 + 10
    per = reuse_bound(df, 8)["per_request"]
    # turn 0: the first request reuses nothing, later ones the system prompt's whole
    # 16-blocks (40 // 16 * 16 = 32 tokens); turn k: turn k-1's whole 16-blocks
    want = {0: 32, 1: 48, 2: 64}
    assert per.tolist() == [0] + [want[k] for k in meta["turn"][1:]]


# ---------------------------------------------------------------------- shared system prompt / few-shot


@pytest.mark.parametrize("H", [16, None])
def test_shared_system_prompt_shares_the_system_blocks(H):
    S, t = 1000, 8
    df = pw.shared_system_prompt(
        60, S, lambda n, r: r.integers(1, 300, size=n), 10, rng=5, hash_block_size=H,
        arrival_s=lambda n, r: synthetic.gamma_arrivals(n, 3.0, 2.0, r),
    )
    validate_workload(df, "ssp")
    shared = S // t if H is None else S // H * H // t  # 125 with tokens; 992 // 8 = 124 with 16-blocks
    assert shared == (125 if H is None else 124)
    ek = workload_engine_keys(df, t)
    first = ek.row(0)[:shared]
    nxt = set()
    for i in range(len(df)):
        row = ek.row(i)
        assert (row[:shared] == first).all()
        if row.size > shared:
            nxt.add(int(row[shared]))
    assert len(nxt) == sum(ek.row(i).size > shared for i in range(len(df)))  # unique beyond it
    per = reuse_bound(df, t)["per_request"]
    assert per[0] == 0 and (per[1:] == shared * t).all()


def test_few_shot_templates_and_popularity():
    K = 6
    df, meta = pw.few_shot(
        3000, K, lambda n, r: 16 * r.integers(6, 44, size=n), lambda n, r: r.integers(1, 50, size=n), 20,
        zipf_a=1.2, rng=2, return_meta=True,
    )
    validate_workload(df, "few_shot")
    counts = np.bincount(meta["template"], minlength=K)
    assert (np.diff(counts) < 0).all()  # template 0 most popular, then 1, ...
    for t in (16, 32):
        per = reuse_bound(df, t)["per_request"]
        seen = set()
        for i, (k, T) in enumerate(zip(meta["template"], meta["template_len"])):
            # whole 16-blocks of the template; the next 16-block holds 16 random question
            # tokens (or the question's end), which never repeat
            assert per[i] == (T // t * t if k in seen else 0)
            seen.add(k)
    # a template that ends inside a 16-block: at least its whole 16-blocks (more when
    # a question's first tokens happen to repeat an earlier one's: that *is* shared content)
    df, meta = pw.few_shot(500, 2, [639, 100], 10, 5, zipf_a=0.0, rng=1, return_meta=True)
    per = reuse_bound(df, 32)["per_request"]
    for k, T in ((0, 639), (1, 100)):
        rows = np.flatnonzero(meta["template"] == k)
        assert per[rows[0]] == 0 and (per[rows[1:]] >= T // 16 * 16 // 32 * 32).all()
        assert (per[rows[1:]] <= (T + 10) // 32 * 32).all()
    uniform = pw.few_shot(3000, K, 50, 5, 5, zipf_a=0.0, rng=2, return_meta=True)[1]
    assert np.bincount(uniform["template"]).min() > 3000 / K * 0.8


@HYP
@given(st.integers(1, 40), st.integers(1, 20), st.integers(0, 2**32), st.sampled_from(["ssp", "multi", "few"]))
def test_generators_respect_block_boundaries(H, L, seed, kind):
    """Valid tables (ceil(prompt_len / H) ids, partial last block) for any sizes, and the
    block ids are the content digests of the very prompts the token encoding writes."""
    lens = lambda n, r: r.integers(1, L + 1, size=n)  # noqa: E731
    make = {
        "ssp": lambda hb: pw.shared_system_prompt(5, L, lens, lens, rng=seed, hash_block_size=hb),
        "multi": lambda hb: pw.multi_turn(3, lens, lens, lens, system_len=L // 2, rng=seed, hash_block_size=hb),
        "few": lambda hb: pw.few_shot(6, 2, lens, lens, lens, rng=seed, hash_block_size=hb),
    }[kind]
    df, tdf = make(H), make(None)
    validate_workload(df, kind)
    validate_workload(tdf, kind)
    assert df.attrs["hash_block_size"] == H and "prompt_tokens" not in df.columns and "block_hashes" not in tdf.columns
    assert df["prompt_len"].equals(tdf["prompt_len"])
    for h, tok in zip(df["block_hashes"], tdf["prompt_tokens"]):
        assert list(h) == content_block_hashes(tok, H).tolist()
        assert all(0 <= x < 2**63 for x in h)
        assert all(0 <= x < pw.DEFAULT_VOCAB_SIZE for x in tok)


def test_generators_are_deterministic_and_streams_independent():
    a = pw.multi_turn(20, 3, 50, 50, think_time_s=1.0, rng=7)
    b = pw.multi_turn(20, 3, 50, 50, think_time_s=1.0, rng=np.random.default_rng(7))
    cols = present_columns(a)
    assert workload_fingerprint(a, cols) == workload_fingerprint(b, cols)
    assert workload_fingerprint(a, cols) != workload_fingerprint(pw.multi_turn(20, 3, 50, 50, think_time_s=1.0, rng=8), cols)
    s1 = pw.shared_system_prompt(30, 100, lambda n, r: r.integers(1, 90, size=n), 10, rng=1)
    s2 = pw.shared_system_prompt(30, 100, lambda n, r: r.integers(1, 90, size=n), lambda n, r: r.integers(1, 500, size=n), rng=1)
    assert s1["block_hashes"].equals(s2["block_hashes"]) and not s1["output_len"].equals(s2["output_len"])


def test_generator_argument_errors():
    with pytest.raises(ValueError, match="user_len must be >= 1"):
        pw.shared_system_prompt(3, 10, [1, 0, 2], 5)
    with pytest.raises(ValueError, match="user_len: expected 3 values"):
        pw.shared_system_prompt(3, 10, [1, 2], 5)
    with pytest.raises(ValueError, match="system_len"):
        pw.shared_system_prompt(3, 0, 5, 5)
    with pytest.raises(ValueError, match="sorted"):
        pw.few_shot(3, 2, 5, 5, 5, arrival_s=[0.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="think_time_s"):
        pw.multi_turn(2, 2, 5, 5, think_time_s=-1.0)
    with pytest.raises(ValueError, match="hash_block_size"):
        pw.multi_turn(2, 2, 5, 5, hash_block_size=0)


# ---------------------------------------------------------------------- writers round trip


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_table_round_trip_keeps_prefix_columns(tmp_path, ext):
    df = pw.multi_turn(10, 3, 40, 30, think_time_s=2.0, rng=4, hash_block_size=16)
    back = read_table(write_table(df, tmp_path / f"w.{ext}"))
    assert back.attrs["hash_block_size"] == 16
    assert back["block_hashes"].tolist() == df["block_hashes"].tolist()
    assert all(type(x) is int for h in back["block_hashes"] for x in h)
    cols = present_columns(df)
    assert workload_fingerprint(back, cols) == workload_fingerprint(df, cols)
    assert reuse_bound(back, 32)["per_request"].tolist() == reuse_bound(df, 32)["per_request"].tolist()
    tdf = pw.few_shot(10, 2, 40, 5, 5, rng=4, hash_block_size=None)
    tback = read_table(write_table(tdf, tmp_path / f"t.{ext}"))
    assert tback["prompt_tokens"].tolist() == tdf["prompt_tokens"].tolist()


# ---------------------------------------------------------------------- YAML schema


SPEC_YAML = """
multi_turn:
  prefix:
    kind: multi_turn
    num_conversations: 50
    arrival: {kind: poisson, rate_req_s: 0.5}
    turns: {kind: uniform, low: 2, high: 8}
    system_len: 100
    user_len: {kind: lognormal, mean: 200, sigma: 0.8, max: 2048}
    output_len: {kind: lognormal, mean: 300, sigma: 0.6, max: 1024}
    think_time_s: {kind: exponential, mean: 20}
    response_s_per_token: 0.02
shared_system_prompt:
  prefix:
    kind: shared_system_prompt
    num_requests: 200
    arrival: {kind: gamma, rate_req_s: 5, cv: 2}
    system_len: 2000
    user_len: {kind: empirical, trace: azure_conv, max: 1000}
    output_len: 50
few_shot:
  prefix:
    kind: few_shot
    num_requests: 300
    arrival: {kind: offline}
    num_templates: 20
    template_len: {kind: uniform, low: 500, high: 3000}
    question_len: {kind: zipf, a: 1.1, max: 200}
    output_len: 10
    hash_block_size: null
"""


@pytest.mark.parametrize("kind", ["multi_turn", "shared_system_prompt", "few_shot"])
def test_yaml_prefix_workloads_build(kind):
    data = yaml.safe_load(SPEC_YAML)[kind]
    cfg = parse_workload_config(data, "exp.yaml")
    assert cfg.prefix.kind == kind
    assert parse_workload_config(cfg.model_dump()) == cfg  # every default explicit, and valid
    df = build_workload(cfg, Path("."), seed=11)
    assert df.equals(build_workload(cfg, Path("."), seed=11))
    assert not df.equals(build_workload(cfg, Path("."), seed=12))
    if kind == "few_shot":
        assert "prompt_tokens" in df.columns and "block_hashes" not in df.columns
        assert (df["arrival_s"] == 0).all()
    else:
        assert df.attrs["hash_block_size"] == 16
    assert reuse_bound(df, 32)["reuse_fraction"] > 0.3
    # the usual transforms apply on top
    cut = build_workload(parse_workload_config({**data, "num_requests": 7, "rate_scale": 2.0, "max_prompt_len": 500}), ".", 11)
    assert len(cut) == 7 and cut["prompt_len"].max() <= 500
    validate_workload(cut, kind)


def test_yaml_prefix_errors_name_key_paths():
    base = yaml.safe_load(SPEC_YAML)["multi_turn"]
    p = base["prefix"]
    cases = {
        "exp.yaml: workload.prefix.turns": {**p, "turns": {"kind": "empirical", "trace": "azure_conv"}},
        "exp.yaml: workload.prefix.think_time_s": {**p, "think_time_s": -1},
        "exp.yaml: workload.prefix.think_time_s.mean": {**p, "think_time_s": {"kind": "exponential", "mean": 0}},
        "exp.yaml: workload.prefix.user_len.sigma": {**p, "user_len": {"kind": "lognormal", "mean": 5, "sigma": -1}},
        "exp.yaml: workload.prefix.num_requests": {**p, "num_requests": 5},
        "exp.yaml: workload.prefix.hash_block_size": {**p, "hash_block_size": 0},
        "exp.yaml: workload.prefix": {**p, "kind": "chat"},
    }
    for path, prefix in cases.items():
        with pytest.raises(ConfigError) as ce:
            parse_workload_config({"prefix": prefix}, "exp.yaml")
        assert [loc for loc, _ in ce.value.problems] == [path], (path, ce.value.problems)
    # a cross-check is reported at the key that breaks it (errors.KeyedError), not at workload
    for extra, key in (({"hash_block_size": 16}, "hash_block_size"), ({"arrival": {"kind": "offline"}}, "arrival"),
                       ({"trace": "azure_conv"}, "prefix"), ({"format": "table"}, "format")):
        with pytest.raises(ConfigError) as ce:
            parse_workload_config({**base, **extra}, "exp.yaml")
        assert [loc for loc, _ in ce.value.problems] == [f"exp.yaml: workload.{key}"], ce.value.problems


def test_prefix_stream_leaves_existing_streams_alone():
    four = [np.random.default_rng(s).random() for s in np.random.SeedSequence(5).spawn(4)]
    five = [np.random.default_rng(s).random() for s in np.random.SeedSequence(5).spawn(5)]
    assert four == five[:4]
