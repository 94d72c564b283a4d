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
