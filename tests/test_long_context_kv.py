"""Decode attention at long contexts (sim/kv_attention.py `fit_long`, `long_context_excess`;
the cost model's ``decode_attention_long``): the per-token excess of the kernel at a batch over
its best, fitted from the calibration's kv-long table."""

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


def _long(per_token, fixed=None, dtype="bf16", batches=BATCHES):
    n = len(batches)
    return kv_attention.DecodeAttentionKernel(
        grid_kv_dtype=dtype, batches=list(batches), fixed_s={dtype: list(fixed or [1e-5] * n)},
        per_token_s={dtype: list(per_token)})


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
@given(per=per_tokens, n=st.integers(1, 300))
def test_excess_is_nonnegative_and_zero_at_the_kernels_best_batch(per, n):
    ex = kv_attention.long_context_excess(_long(per), "bf16", SPEC.num_layers)
    assert ex(n) >= 0
    best = BATCHES[int(np.argmin(per))]
    assert ex(best) == 0
    i = BATCHES.index(24)
    assert ex(24) == pytest.approx(SPEC.num_layers * (per[i] - min(per)), rel=1e-12)
    assert kv_attention.long_context_excess(_long(per), "fp8", SPEC.num_layers) is None  # another dtype's table
    assert kv_attention.long_context_excess(None, "bf16", SPEC.num_layers) is None


@settings(max_examples=150, deadline=None)
@given(per=per_tokens, cfg=configs, shape=st.one_of(decode_shapes, mixed_shapes), extra=st.integers(1, 50000))
def test_the_long_context_term_never_lowers_a_price_and_keeps_it_monotone_and_affine(per, cfg, shape, extra):
    """With the table: a price is never below the price without it, grows with the decode KV
    (more cached tokens never cost less), and a decode-only step is still exactly
    decode_affine's fixed + per-token x KV (the engine's closed-form stretches)."""
    plain = RooflineCostModel(SPEC, HW, cfg)
    cm = RooflineCostModel(SPEC, HW, cfg.model_copy(update={"decode_attention_long": _long(per)}))
    p = cm.price(shape)
    assert p >= plain.price(shape) * (1 - 1e-12)
    more = replace(shape, decode_kv_sum=shape.decode_kv_sum + extra)
    assert cm.price(more) >= p
    if not shape.ctx_new_tokens:
        fixed, per_kv = cm.decode_affine(shape.n_decode, shape.graph, shape.padded_decode)
        assert p == pytest.approx(fixed + per_kv * shape.decode_kv_sum, rel=1e-12)
        f0, k0 = plain.decode_affine(shape.n_decode, shape.graph, shape.padded_decode)
        nd = shape.padded_decode if shape.graph else shape.n_decode
        assert fixed == f0  # the term is per cached token only
        assert per_kv == pytest.approx(k0 + cm._kv_long(nd), rel=1e-12)
    bd = cm.breakdown(shape)
    assert sum(bd.values()) == pytest.approx(p, rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(shape=st.one_of(decode_shapes, mixed_shapes), kv=st.sampled_from(["fp8", "int8"]))
def test_a_table_of_another_dtype_changes_nothing(shape, kv):
    spec = apply_precision(SPEC, HW, "bf16", kv)
    cfg = RooflineConfig()
    assert RooflineCostModel(spec, HW, cfg.model_copy(update={"decode_attention_long": _long([1e-9] * 8)})
                             ).price(shape) == RooflineCostModel(spec, HW, cfg).price(shape)


def test_fit_long_recovers_each_batch_line_and_ignores_other_dtypes():
    lines = {B: (1e-5 + B * 1e-7, (2.0e-9 if B == 24 else 1.1e-9)) for B in BATCHES}
    rows = [dict(kv_dtype="bf16", batch=B, ctx=c, us=(a + s * B * c) * 1e6)
            for B, (a, s) in lines.items() for c in (4096, 8192, 16384)]
    rows.append(dict(kv_dtype="fp8", batch=16, ctx=4096, us=9.0))
    k = kv_attention.DecodeAttentionKernel(**kv_attention.fit_long(rows, "bf16", "t"))
    assert k.batches == BATCHES and set(k.per_token_s) == {"bf16"}
    assert k.per_token_s["bf16"] == pytest.approx([lines[B][1] for B in BATCHES], rel=1e-6)
    assert k.fixed_s["bf16"] == pytest.approx([lines[B][0] for B in BATCHES], rel=1e-6)
    assert kv_attention.fit_long(rows, "int8") is None
    ex = kv_attention.long_context_excess(k, "bf16", 32)
    assert ex(24) == pytest.approx(32 * 0.9e-9, rel=1e-6) and ex(32) == pytest.approx(0, abs=1e-15)


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
    long_rows = [dict(kv_dtype="bf16", batch=B, ctx=c, us=(1e-5 + (2e-9 if B == 24 else 1.1e-9) * B * c) * 1e6,
                      config="S2/T256/N64/w4/st2/hm", source="t") for B in BATCHES for c in (4096, 16384)]
    kv_attention.write_table(grid.with_suffix(LONG_KV_SUFFIX), long_rows)
    doc = calibrate(SPEC, HW, grid, tmp_path / "b.yaml")
    k = doc["roofline"].pop("decode_attention_long")
    assert doc["roofline"] == plain["roofline"]
    assert k["batches"] == BATCHES and doc["provenance"]["kv_attention_long"] == k["source"]
    cfg, _ = load_profile(tmp_path / "b.yaml", SPEC, HW)
    assert cfg.decode_attention_long == kv_attention.DecodeAttentionKernel(**k)
    cm = RooflineCostModel(SPEC, HW, cfg)
    assert cm.decode_kv_rate(24) > cm.decode_kv_rate(32)
