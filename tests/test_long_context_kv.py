"""Decode attention at long contexts (sim/kv_attention.py `fit_long`, `long_context_delta`;
the cost model's ``decode_attention_long``): the kernel's per-token slope at long minus at short
contexts, per batch, fitted from the calibration's kv-long table."""

from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servesim.sim import kv_attention
from servesim.sim.cost_model import RooflineConfig, RooflineCostModel
from servesim.sim.specs import apply_precision, load_hardware, load_model
from servesim.sim.types import IterationShape

HW = load_hardware("h200-sxm")
SPEC = load_model("llama-3.1-8b")
BATCHES = [1, 8, 16, 24, 32, 40, 48, 64]


def _long(long, short=None, dtype="bf16", batches=BATCHES):
    return kv_attention.LongContextKernel(kv_dtype=dtype, batches=list(batches),
                                          short_per_token_s=list(short or [1.1e-9] * len(batches)),
                                          long_per_token_s=list(long))


per_tokens = st.lists(st.floats(0.5e-9, 4e-9), min_size=len(BATCHES), max_size=len(BATCHES))
configs = st.builds(lambda e, k: RooflineConfig(bandwidth_efficiency=e, kv_bandwidth_efficiency=k),
                    st.floats(0.3, 1.0), st.one_of(st.none(), st.floats(0.3, 1.1)))
decode_shapes = st.builds(lambda n, c, g: IterationShape(n_decode=n, decode_kv_sum=n * c, graph=g,
                                                         padded_decode=n if g else 0),
                          st.integers(1, 256), st.integers(1, 40000), st.booleans())
mixed_shapes = st.builds(lambda n, c, chunk, prior: IterationShape(n_decode=n, decode_kv_sum=n * c,
                                                                   ctx_new_tokens=(chunk,), ctx_prior_tokens=(prior,),
                                                                   n_ctx_sampling=1),
                         st.integers(1, 64), st.integers(1, 20000), st.integers(1, 8192), st.integers(0, 16384))


@settings(max_examples=150, deadline=None)
@given(long=per_tokens, short=per_tokens, n=st.integers(1, 300))
def test_delta_is_the_long_minus_short_slope_interpolated_in_the_batch(long, short, n):
    L = SPEC.num_layers
    d = kv_attention.long_context_delta(_long(long, short), "bf16", L)
    i = BATCHES.index(24)
    assert d(24) == pytest.approx(L * (long[i] - short[i]), rel=1e-9, abs=1e-20)
    lo, hi = min(L * (a - b) for a, b in zip(long, short)), max(L * (a - b) for a, b in zip(long, short))
    assert lo - 1e-18 <= d(n) <= hi + 1e-18  # between the measured batches' values, the nearest beyond them
    assert kv_attention.long_context_delta(_long(long, long), "bf16", L)(n) == 0  # no long-context effect
    assert kv_attention.long_context_delta(_long(long, short), "fp8", L) is None  # another dtype's table
    assert kv_attention.long_context_delta(None, "bf16", L) is None


@settings(max_examples=150, deadline=None)
@given(long=per_tokens, short=per_tokens, cfg=configs, shape=st.one_of(decode_shapes, mixed_shapes),
       extra=st.integers(1, 50000))
def test_the_long_context_term_is_monotone_affine_and_floored_at_the_kv_bytes(long, short, cfg, shape, extra):
    """With the table: more cached tokens never cost less, a decode-only step is still exactly
    decode_affine's fixed + per-token x KV (the engine's closed-form stretches), the fixed part
    is untouched, the per-token rate is the fitted one plus the delta at the batch but never
    below the KV bytes at the achievable bandwidth, and a batch whose long-context slope
    exceeds its short one costs more than without the table."""
    plain = RooflineCostModel(SPEC, HW, cfg)
    k = _long(long, short)
    cm = RooflineCostModel(SPEC, HW, cfg.model_copy(update={"decode_attention_long": k}))
    p = cm.price(shape)
    assert cm.price(replace(shape, decode_kv_sum=shape.decode_kv_sum + extra)) >= p
    nd = shape.padded_decode if shape.graph else shape.n_decode
    floor = SPEC.num_layers * 2 * SPEC.num_kv_heads * SPEC.head_dim * 2 / HW.achievable_hbm_bytes_per_s
    d = kv_attention.long_context_delta(k, "bf16", SPEC.num_layers)(nd)
    if not shape.ctx_new_tokens:
        fixed, per_kv = cm.decode_affine(shape.n_decode, shape.graph, shape.padded_decode)
        assert p == pytest.approx(fixed + per_kv * shape.decode_kv_sum, rel=1e-12)
        f0, k0 = plain.decode_affine(shape.n_decode, shape.graph, shape.padded_decode)
        assert fixed == f0
        assert per_kv == pytest.approx(max(k0 + d, floor), rel=1e-12)
    if d >= 0:
        assert p >= plain.price(shape) * (1 - 1e-12)
    bd = cm.breakdown(shape)
    assert sum(bd.values()) == pytest.approx(p, rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(shape=st.one_of(decode_shapes, mixed_shapes), kv=st.sampled_from(["fp8", "int8"]))
def test_a_table_of_another_dtype_changes_nothing(shape, kv):
    spec = apply_precision(SPEC, HW, "bf16", kv)
    cfg = RooflineConfig()
    assert RooflineCostModel(spec, HW, cfg.model_copy(update={"decode_attention_long": _long([1e-9] * 8)})
                             ).price(shape) == RooflineCostModel(spec, HW, cfg).price(shape)


def test_fit_long_recovers_each_batch_slope_and_refuses_what_it_cannot_fit():
    """Per batch the short (<= 2k) and long (>= 8k) slopes of known piecewise lines; rows of
    another dtype ignored; a batch without two contexts of each left out."""
    def t(B, c):  # one layer: a kink at 4k tokens a request, steeper beyond at batch 24 only
        s_long = 2.0e-9 if B == 24 else 0.9e-9
        return 1e-5 + 1.1e-9 * B * min(c, 4096) + s_long * B * max(c - 4096, 0)
    rows = [dict(kv_dtype="bf16", batch=B, ctx=c, us=t(B, c) * 1e6) for B in BATCHES for c in (1024, 2048, 8192, 16384)]
    rows += [dict(kv_dtype="fp8", batch=16, ctx=4096, us=9.0), dict(kv_dtype="bf16", batch=128, ctx=1024, us=50.0)]
    k = kv_attention.LongContextKernel(**kv_attention.fit_long(rows, "bf16", "t"))
    assert k.batches == BATCHES
    assert k.short_per_token_s == pytest.approx([1.1e-9] * len(BATCHES), rel=1e-6)
    assert k.long_per_token_s == pytest.approx([2.0e-9 if B == 24 else 0.9e-9 for B in BATCHES], rel=1e-6)
    assert kv_attention.fit_long(rows, "int8") is None
    d = kv_attention.long_context_delta(k, "bf16", 32)
    assert d(24) == pytest.approx(32 * 0.9e-9, rel=1e-5) and d(32) == pytest.approx(-32 * 0.2e-9, rel=1e-5)
    with pytest.raises(ValueError, match="no batch measured"):
        kv_attention.fit_long([r for r in rows if r["ctx"] <= 2048], "bf16")
    with pytest.raises(ValueError, match="strictly increasing"):
        _long([1e-9] * 3, batches=(8, 8, 16))


def test_sim_calibrate_reads_the_kv_long_table_beside_the_grid(tmp_path):
    """A grid with a `.kv-long.csv` beside it: the table fitted into ``decode_attention_long``
    (the grid's own terms unchanged), recorded in the provenance, read back by load_profile."""
    from servesim.sim.calibrate import LONG_KV_SUFFIX, calibrate, load_profile

    rng = np.random.default_rng(0)
    grid = tmp_path / "g.grid.csv"
    rows = []
    for n in (1, 4, 16, 64):
        for kv in (512, 2048, 8192):
            t = 5e-3 + n * 2e-5 + n * kv * 32 * 1.3e-9
            rows.append(dict(kind="decode", model="llama-3.1-8b", n_decode=n, kv_sum=n * kv, ctx_tokens=0,
                             ctx_prior=0, n_chunks=0, chunk_tokens=0, graph=True, padded=n,
                             time_s=t * (1 + 0.01 * rng.standard_normal()), run=""))
    for c in (256, 1024, 4096):
        rows.append(dict(kind="prefill", model="llama-3.1-8b", n_decode=0, kv_sum=0, ctx_tokens=c, ctx_prior=0,
                         n_chunks=1, chunk_tokens=c, graph=False, padded=0, time_s=0.02 + c * 1e-5, run=""))
    with open(grid, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plain = calibrate(SPEC, HW, grid, tmp_path / "a.yaml")
    long_rows = [dict(kv_dtype="bf16", batch=B, ctx=c, us=(1e-5 + (2e-9 if B == 24 and c > 4096 else 1.1e-9) * B * c)
                      * 1e6, config="S2/T256/N64/w4/st2/hm", source="t") for B in BATCHES for c in (1024, 2048, 8192, 16384)]
    kv_attention.write_table(grid.with_suffix(LONG_KV_SUFFIX), long_rows)
    doc = calibrate(SPEC, HW, grid, tmp_path / "b.yaml")
    k = doc["roofline"].pop("decode_attention_long")
    assert doc["roofline"] == plain["roofline"]
    assert k["batches"] == BATCHES and doc["provenance"]["kv_attention_long"] == k["source"]
    cfg, _ = load_profile(tmp_path / "b.yaml", SPEC, HW)
    assert cfg.decode_attention_long == kv_attention.LongContextKernel(**k)
    cm = RooflineCostModel(SPEC, HW, cfg)
    assert cm.decode_kv_rate(24) > cm.decode_kv_rate(32)


# ------------------------------------------------------------------------ the split bound
from servesim.kernels import tuning_table  # noqa: E402

TABLE = tuning_table.table_for_device(HW.device_names, HW.num_sms)
ROWS = kv_attention.tuned_rows(TABLE, 4, 8, 128, "bf16")


def test_the_h200_tuning_table_is_found_and_its_split_bounds_are_the_kernels():
    """The simulator reads the table the GPU runs (kernels/tuning/h200.json: its device name and
    SM count) and the split bound at a batch is the tuned row nearest in log2 (ties to the larger),
    scaled to keep the programs (what long_context_h200.md's table lists for the run's batches)."""
    assert TABLE is not None and TABLE["path"].endswith("h200.json")
    assert tuning_table.table_for_device(["A100"], HW.num_sms) is None  # another device: none
    assert tuning_table.table_for_device(HW.device_names, 114) is None  # another SM count: none
    got = [tuning_table.split_bound(ROWS, b)[0] for b in (1, 2, 4, 8, 16, 24, 32, 40, 48, 64, 128, 256)]
    assert got == [32, 32, 16, 8, 4, 2, 16, 16, 8, 8, 2, 1]
    # another block size's key: the table's own (bs32)
    assert kv_attention.tuned_rows(TABLE, 4, 8, 128, "bf16", block_size=16) == ROWS
    assert kv_attention.tuned_rows(TABLE, 4, 8, 128, "int8") is None
    assert kv_attention.tuned_rows(None, 4, 8, 128, "bf16") is None


PER_SM = [20e-9, 15e-9, 16e-9, 17e-9, 15e-9, 15e-9, 15e-9, 15e-9]  # per BATCHES


def _with_sm(long, per_sm=PER_SM):
    return _long(long).model_copy(update={"per_sm_token_s": list(per_sm)})


def test_the_split_bound_against_a_hand_computation():
    """The SM holding the longest sequence's program walks it (longest / splits) and its share
    of the others ((n x kv_heads x splits / SMs - 1) programs of the mean length) at the
    batch's per-SM-token rate. Hand numbers on the H200 (132 SMs, 8 KV heads, 32 layers)."""
    sb = kv_attention.SplitBound.of(_with_sm([1e-9] * 8), ROWS, 8, HW.num_sms, 32)
    d, e = sb.rates(24, 24)  # 2 splits: 384 programs, 384 / 132 - 1 = 1.909 others beside
    assert d == pytest.approx(32 * 17e-9 / 2, rel=1e-12)
    assert e == pytest.approx(32 * 17e-9 * (384 / 132 - 1) / (24 * 2), rel=1e-12)
    d, e = sb.rates(20, 24)  # 20 requests in the padded-24 graph: its 2 splits, 320 programs that work
    assert (d, e) == pytest.approx((32 * 17e-9 / 2, 32 * 17e-9 * (320 / 132 - 1) / 40), rel=1e-12)
    assert sb.rate(28) == pytest.approx(16e-9, rel=1e-12)  # linear in the batch between 24 and 32
    r2 = 20e-9 - 5e-9 / 7  # batch 2: between batch 1's and 8's; 32 splits, 512 programs
    assert sb.rates(2, 2) == pytest.approx((32 * r2 / 32, 32 * r2 * (512 / 132 - 1) / (2 * 32)), rel=1e-12)
    assert sb.rates(1, 1)[1] == 32 * 20e-9 * (256 / 132 - 1) / 32  # 256 programs: ~2 an SM
    assert kv_attention.sm_load(240_000, 16_800, 24, 8, 2, 132) == pytest.approx(
        8_400 + (384 / 132 - 1) * 5_000, rel=1e-12)
    assert kv_attention.sm_load(24 * 10_000, 10_000, 24, 8, 2, 132) == pytest.approx(8 * 240_000 / 132, rel=1e-12)
    assert kv_attention.SplitBound.of(None, ROWS, 8, HW.num_sms, 32) is None
    assert kv_attention.SplitBound.of(_with_sm([1e-9] * 8), None, 8, HW.num_sms, 32) is None
    assert kv_attention.SplitBound.of(_long([1e-9] * 8), ROWS, 8, HW.num_sms, 32) is None  # an older profile
    # the cost model: a padded-24 decode step of 24 requests, KV sum 240k, the longest 16.8k
    cm = RooflineCostModel(SPEC, HW, RooflineConfig(decode_attention_long=_with_sm([1e-9] * 8)), cuda_graphs=True)
    sh = IterationShape(n_decode=24, decode_kv_sum=240_000, graph=True, padded_decode=24)
    fixed, per_kv = cm.decode_affine(24, True, 24)
    d, e = cm.decode_split(24, True, 24)
    split = 32 * 17e-9 * (16_800 / 2 + (384 / 132 - 1) * 5_000)
    assert d * 16_800 + e * 240_000 == pytest.approx(split, rel=1e-12)
    assert split > per_kv * 240_000  # the split bound sets this one
    assert cm.price(replace(sh, decode_kv_max=16_800)) == pytest.approx(fixed + split, rel=1e-12)
    assert cm.price(sh) == pytest.approx(fixed + per_kv * 240_000, rel=1e-12)  # the longest unknown: the KV sum's
    # no long-context kernel in the profile: no split bound
    assert RooflineCostModel(SPEC, HW, RooflineConfig()).decode_split(24, False, 0) == (0.0, 0.0)


def test_fit_split_rate_recovers_each_batchs_rate_from_the_lengths_drawn():
    """Rows of known per-batch rates over `sm_load` (an intercept beside): each batch's rate;
    rows without the lengths or a split label: none."""
    rows = []
    for B, r in zip(BATCHES, PER_SM):
        s = tuning_table.split_bound(ROWS, B)[0]
        for c in (8192, 16384):
            kv_sum, kv_max = int(B * c * 0.97), int(c * 1.4)
            us = 12.0 + 1e6 * r * kv_attention.sm_load(kv_sum, kv_max, B, 8, s, 132)
            rows.append(dict(kv_dtype="bf16", batch=B, ctx=c, us=us, config=f"S{s}/T64/N64", kv_sum=kv_sum,
                             kv_max=kv_max))
    assert kv_attention.fit_split_rate(rows, BATCHES, 8, 132) == pytest.approx(PER_SM, rel=1e-6)
    assert kv_attention.fit_split_rate([{**r, "config": ""} for r in rows], BATCHES, 8, 132) is None
    assert kv_attention.fit_split_rate([{k: v for k, v in r.items() if k != "kv_max"} for r in rows],
                                       BATCHES, 8, 132) is None


def test_archived_sweeps_get_the_lengths_their_generator_drew():
    """A kv-long table from before the sweep recorded its lengths: replayed from its seeded
    generator (uniform in +-50% of each context), deterministic; recorded ones kept."""
    pytest.importorskip("torch")
    from servesim.gpu_backend.kv_attention_sweep import LONG_SIZES, sweep_lengths
    from servesim.sim.calibrate import with_sweep_lengths

    got = sweep_lengths(LONG_SIZES, 32, 128)
    assert got == sweep_lengths(LONG_SIZES, 32, 128)
    for (B, c), (tot, mx) in zip(LONG_SIZES, got):
        assert B * (c // 2) <= tot <= B * (c + c // 2) and c // 2 <= mx <= c + c // 2 and mx * B >= tot
    rows = [dict(kv_dtype="bf16", batch=B, ctx=c, us=1.0) for B, c in LONG_SIZES]
    filled = with_sweep_lengths(rows, SPEC)
    assert [(r["kv_sum"], r["kv_max"]) for r in filled] == got
    assert with_sweep_lengths(filled, SPEC) == filled


@settings(max_examples=150, deadline=None)
@given(long=per_tokens, shape=st.one_of(decode_shapes, mixed_shapes), mx=st.integers(0, 60000),
       more=st.integers(1, 30000))
def test_the_split_bound_is_monotone_and_only_ever_raises_the_price(long, shape, mx, more):
    """The price never falls with the longest sequence, never is below the price without it
    (decode_kv_max 0: unknown), equals it while the split bound's line is below the KV sum's,
    is decode_affine's fixed + the larger line for a decode-only step, and the breakdown still
    sums to it."""
    cm = RooflineCostModel(SPEC, HW, RooflineConfig(decode_attention_long=_with_sm(long)), cuda_graphs=True)
    s = replace(shape, decode_kv_max=mx)
    p0, p = cm.price(shape), cm.price(s)
    assert p >= p0 * (1 - 1e-12)
    assert cm.price(replace(s, decode_kv_max=mx + more)) >= p * (1 - 1e-12)
    nd = shape.padded_decode if shape.graph else shape.n_decode
    d, e = cm.decode_split(shape.n_decode, shape.graph, shape.padded_decode)
    assert d > 0 and e >= 0
    line = d * mx + e * shape.decode_kv_sum
    if line <= cm.decode_kv_rate(nd) * shape.decode_kv_sum:
        assert p == p0
    if not shape.ctx_new_tokens:
        fixed, per_kv = cm.decode_affine(shape.n_decode, shape.graph, shape.padded_decode)
        assert p == pytest.approx(fixed + max(per_kv * shape.decode_kv_sum, line), rel=1e-12)
    assert sum(cm.breakdown(s).values()) == pytest.approx(p, rel=1e-9)


def _split_cost(split):
    """The engine harness's affine cost with a split bound's line (seconds per longest token)."""
    from engine_harness import AffineCost

    c = AffineCost()
    c.split = split
    return c


@settings(max_examples=80, deadline=None)
@given(rows=st.lists(st.tuples(st.floats(0, 0.2), st.integers(1, 120), st.integers(1, 80)), min_size=1,
                     max_size=16),
       split=st.sampled_from([(3e-7, 0.0), (9e-7, 1e-7), (3e-6, 2e-7)]), graphs=st.booleans(), tpb=st.sampled_from([1, 4, 16]),
       max_batch=st.integers(1, 10))
def test_closed_form_stretches_on_the_split_line_equal_stepping(rows, split, graphs, tpb, max_batch):
    """With a split bound's line the engine's closed-form stretches (on whichever line holds,
    cut where they cross) give the iterations stepping one by one gives."""
    from engine_harness import run_engine

    rows = sorted(rows)
    kw = dict(max_batch=max_batch, max_tokens=256, tpb=tpb, blocks=4000 // tpb, graphs=graphs)
    a = run_engine(rows, cost=_split_cost(split), **kw)
    b = run_engine(rows, cost=_split_cost(split), stepwise=True, **kw)
    ita, itb = a[2], b[2]
    assert ita.num_rows == itb.num_rows
    for col in ("num_gen_requests", "ctx_tokens", "decode_kv_tokens"):
        assert np.array_equal(ita.column(col).to_numpy(), itb.column(col).to_numpy()), col
    np.testing.assert_allclose(ita.column("duration_s").to_numpy(), itb.column("duration_s").to_numpy(), rtol=1e-9)
    np.testing.assert_allclose(a[3].token_times, b[3].token_times, rtol=1e-9, atol=1e-12)
    plain = run_engine(rows, **kw)[2].column("duration_s").to_numpy()
    assert ita.column("duration_s").to_numpy().sum() >= plain.sum() * (1 - 1e-12) or ita.num_rows != len(plain)
