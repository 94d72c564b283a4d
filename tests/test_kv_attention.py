"""Decode attention priced per KV dtype (sim/kv_attention.py, the cost model's
kv_dequant_elements_per_s), the tuning labels' inverse, and gpu_kv_fp8.py's CPU modes
(--replay, --rebuild-tuning) on the committed results."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # before the first import of a Triton kernel module (as in test_fp8_kv)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import given, settings
from hypothesis import strategies as st

from servesim.kernels.decode_attention import DecodeConfig, tuned_config, set_tuning
from servesim.sim import kv_attention
from servesim.sim.cost_model import RooflineConfig, RooflineCostModel
from servesim.sim.specs import apply_precision, load_hardware, load_model
from servesim.sim.types import IterationShape

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def _bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_kv_fp8
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return gpu_kv_fp8


# ------------------------------------------------------------------------------- labels
resolved = st.builds(
    DecodeConfig, max_splits=st.integers(1, 512), min_split_tokens=st.integers(1, 8192),
    block_n=st.sampled_from([16, 32, 64, 128, 256]), num_warps=st.sampled_from([1, 2, 4, 8]),
    num_stages=st.integers(0, 6), fused_reduce=st.booleans(), head_major=st.booleans(), use_dot=st.just(True),
    kv_math=st.sampled_from(["f16", "q"]))


@settings(max_examples=200, deadline=None)
@given(resolved)
def test_label_round_trips_on_resolved_fp8_configs(cfg):
    back = DecodeConfig.from_label(cfg.label(), fp8=True)
    assert back == cfg and back.label() == cfg.label()


@settings(max_examples=100, deadline=None)
@given(resolved)
def test_label_round_trips_on_resolved_16_bit_configs(cfg):
    from dataclasses import replace

    cfg = replace(cfg, kv_math=None)
    assert DecodeConfig.from_label(cfg.label()) == cfg


@pytest.mark.parametrize("bad", ["S1/T2/N3/w4", "S1/T2/N3/w4/st2/hm/fused", "X1/T2/N3/w4/st2", "S1/T2/N3/w4/stx",
                                 "S1/T2/N3/w4/st2/bogus", "S/T2/N3/w4/st2", "S1/T2/N3/w4/st2/hm/hm"])
def test_bad_labels_are_refused(bad):
    with pytest.raises(ValueError, match="decode attention label"):
        DecodeConfig.from_label(bad, fp8=True)


# ------------------------------------------------------------------------------- the fit
@settings(max_examples=60, deadline=None)
@given(fixed=st.floats(1e-6, 5e-5), slope=st.floats(1e-10, 5e-9), kv=st.sampled_from([1, 2, 8]),
       hd=st.sampled_from([64, 128]), sizes=st.lists(st.tuples(st.integers(1, 256), st.integers(64, 16384)),
                                                       min_size=2, max_size=8, unique_by=lambda t: t[0] * t[1]))
def test_fit_recovers_a_known_rate(fixed, slope, kv, hd, sizes):
    rows = [dict(kv_dtype=dt, batch=b, ctx=c, us=(fixed + slope * b * c) * 1e6) for b, c in sizes for dt in
            kv_attention.KV_DTYPES]
    a, s = kv_attention.fit_line(rows, "fp8")
    assert s == pytest.approx(slope, rel=1e-6) and a == pytest.approx(fixed, rel=1e-4, abs=1e-9)
    assert kv_attention.fit_dequant_rate(rows, kv, hd) == pytest.approx(2 * kv * hd / slope, rel=1e-6)


def test_calibration_table_errors_name_the_row_and_column(tmp_path):
    p = tmp_path / "k.csv"
    p.write_text("kv_dtype,batch,ctx,us,config,source\nfp8,1,1024,,x,y\n")
    with pytest.raises(ValueError, match=r"k.csv:2: missing us"):
        kv_attention.read_table(p)
    p.write_text("kv_dtype,batch,ctx,us,config,source\nint4,1,1024,3,x,y\n")
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        kv_attention.read_table(p)
    p.write_text("kv_dtype,batch,ctx,us,config,source\nfp8,1,1024,3,x,y\n")
    with pytest.raises(ValueError, match="needs >= 2 KV sizes"):
        kv_attention.fit_dequant_rate(kv_attention.read_table(p), 8, 128)


# ------------------------------------------------------------------------------- the cost model
HW = load_hardware("h200-sxm")
SPEC = load_model("llama-3.1-8b")
BF, F8 = apply_precision(SPEC, HW, "bf16", "bf16"), apply_precision(SPEC, HW, "bf16", "fp8")


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 256), ctx=st.integers(1, 32768), r1=st.floats(1e10, 1e14), r2=st.floats(1e10, 1e14))
def test_conversion_bound_leaves_bf16_alone_and_slows_fp8_monotonically(n, ctx, r1, r2):
    sh = IterationShape(n_decode=n, decode_kv_sum=n * ctx, graph=True, padded_decode=n)
    lo, hi = sorted((r1, r2))
    t = {r: RooflineCostModel(BF, HW, RooflineConfig(kv_dequant_elements_per_s=r)).gpu_time(sh) for r in (lo, hi)}
    base = RooflineCostModel(BF, HW, RooflineConfig()).gpu_time(sh)
    assert t[lo] == base and t[hi] == base  # a bf16 cache converts nothing
    f = {r: RooflineCostModel(F8, HW, RooflineConfig(kv_dequant_elements_per_s=r)).gpu_time(sh) for r in (lo, hi)}
    f0 = RooflineCostModel(F8, HW, RooflineConfig()).gpu_time(sh)
    assert f[lo] >= f[hi] >= f0  # a slower conversion never makes the step faster; bytes only is the floor
    bd = RooflineCostModel(F8, HW, RooflineConfig(kv_dequant_elements_per_s=lo)).breakdown(sh)["attn_decode_kv"]
    assert bd >= SPEC.num_layers * 2 * SPEC.num_kv_heads * SPEC.head_dim * n * ctx / lo * (1 - 1e-9)


# ------------------------------------------------------------------------------- a profile's kernel table
PROFILE = REPO / "profiles" / "h200-llama-3.1-8b.yaml"


def _kernel(grid="bf16", batches=(1, 16, 64, 256), **per):
    """A kernel table: per dtype (fixed, per-token) seconds at every batch (given, else bf16's defaults)."""
    base = {"bf16": ([8e-6, 1.3e-5, 1.3e-5, 1.9e-5], [2.1e-9, 1.0e-9, 1.08e-9, 1.08e-9]),
            "fp8": ([7.6e-6, 1.4e-5, 2.7e-5, 4.2e-5], [1.8e-9, 0.95e-9, 0.88e-9, 0.84e-9])}
    base.update(per)
    n = len(batches)
    return kv_attention.DecodeAttentionKernel(grid_kv_dtype=grid, batches=list(batches),
                                              fixed_s={k: v[0][:n] for k, v in base.items()},
                                              per_token_s={k: v[1][:n] for k, v in base.items()})


shapes = st.one_of(
    st.builds(lambda n, c, g: IterationShape(n_decode=n, decode_kv_sum=n * c, graph=g, padded_decode=n if g else 0),
              st.integers(1, 512), st.integers(1, 20000), st.booleans()),
    st.builds(lambda n, c, chunk, prior: IterationShape(n_decode=n, decode_kv_sum=n * c, ctx_new_tokens=(chunk,),
                                                        ctx_prior_tokens=(prior,), n_ctx_sampling=1),
              st.integers(0, 64), st.integers(1, 8000), st.integers(1, 2048), st.integers(0, 4096)),
    st.builds(lambda n, c, d: IterationShape(n_decode=n, decode_kv_sum=n * c, decode_draft_tokens=d * n,
                                             draft_steps=d), st.integers(1, 32), st.integers(1, 4000),
              st.integers(1, 4)))
configs = st.builds(lambda e, k, r, conv: RooflineConfig(bandwidth_efficiency=e, kv_bandwidth_efficiency=k,
                                                         linear_ridge_exponent=r, kv_dequant_elements_per_s=conv),
                    st.floats(0.3, 1.0), st.one_of(st.none(), st.floats(0.3, 1.1)),
                    st.one_of(st.none(), st.floats(1.5, 12)), st.one_of(st.none(), st.floats(1e11, 1e13)))


def _prices(spec, cfg, shape):
    cm = RooflineCostModel(spec, HW, cfg)
    return cm.price(shape), cm.breakdown(shape), cm.decode_affine(max(shape.n_decode, 1), shape.graph,
                                                                   shape.padded_decode)


@settings(max_examples=150, deadline=None)
@given(cfg=configs, shape=shapes, kv=st.sampled_from(["bf16", "fp8", "int8"]))
def test_a_kernel_table_leaves_the_grid_dtype_and_unmeasured_dtypes_priced_as_before(cfg, shape, kv):
    """Profiles without the table price as before -- the per-KV-token term is the old formula,
    exactly -- and a table changes nothing for its grid's own KV dtype nor for a dtype it did
    not measure (int8): bit-identical prices, breakdowns and affine forms."""
    spec = apply_precision(SPEC, HW, "bf16", kv)
    old = _prices(spec, cfg, shape)
    cm = RooflineCostModel(spec, HW, cfg)
    L, hd, b = SPEC.num_layers, SPEC.head_dim, spec.kv_elem_bytes
    Fa = HW.achievable_bf16_flops * cfg.flops_efficiency * cfg.attention_flops_efficiency
    Bkv = HW.achievable_hbm_bytes_per_s * (cfg.kv_bandwidth_efficiency or cfg.bandwidth_efficiency)
    conv = 2 * SPEC.num_kv_heads * hd / cfg.kv_dequant_elements_per_s if cfg.kv_dequant_elements_per_s and b == 1 \
        else 0.0
    per_kv = L * max(4.0 * hd * SPEC.num_heads / Fa, 2.0 * SPEC.num_kv_heads * hd * b / Bkv, conv)
    assert cm.decode_affine(4, False, 0)[1] == per_kv
    grid = {"bf16": "bf16", "fp8": "fp8", "int8": "bf16"}[kv]  # int8: a dtype the table did not measure
    assert _prices(spec, cfg.model_copy(update={"decode_attention_kernel": _kernel(grid)}), shape) == old


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 600), ctx=st.integers(1, 30000), cfg=configs, graph=st.booleans())
def test_an_fp8_step_pays_the_kernel_alone_difference_at_its_batch(n, ctx, cfg, graph):
    """With a bf16 grid's table an fp8-KV decode step costs the bf16 step plus, per layer,
    the fp8 - bf16 kernel lines interpolated at its batch (the per-token part never below the
    fp8 bytes at the achievable bandwidth); at a measured batch exactly that batch's lines."""
    k = _kernel("bf16")
    c = cfg.model_copy(update={"decode_attention_kernel": k, "kv_dequant_elements_per_s": None})
    sh = IterationShape(n_decode=n, decode_kv_sum=n * ctx, graph=graph, padded_decode=n if graph else 0)
    bf = RooflineCostModel(BF, HW, c)
    f8 = RooflineCostModel(F8, HW, c)
    assert bf.price(sh) == RooflineCostModel(BF, HW, cfg.model_copy(update={"kv_dequant_elements_per_s": None})
                                             ).price(sh)
    L = SPEC.num_layers
    df = L * (np.interp(n, k.batches, k.fixed_s["fp8"]) - np.interp(n, k.batches, k.fixed_s["bf16"]))
    ds = L * (np.interp(n, k.batches, k.per_token_s["fp8"]) - np.interp(n, k.batches, k.per_token_s["bf16"]))
    floor = L * 2 * SPEC.num_kv_heads * SPEC.head_dim / HW.achievable_hbm_bytes_per_s
    b_fix, b_kv = bf.decode_affine(n, graph, n if graph else 0)
    f_fix, f_kv = f8.decode_affine(n, graph, n if graph else 0)
    assert f_kv == pytest.approx(max(b_kv + ds, floor), rel=1e-12)
    plain = RooflineCostModel(F8, HW, c.model_copy(update={"decode_attention_kernel": None}))  # fp8's other terms
    kv = n * ctx
    assert f8.gpu_time(sh) == pytest.approx(plain.gpu_time(sh) - plain.decode_kv_rate(n) * kv + df + f_kv * kv,
                                            rel=1e-9, abs=1e-12)
    assert f8.price(sh) == pytest.approx(f_fix + f_kv * n * ctx, rel=1e-12)
    if n in k.batches:
        i = k.batches.index(n)
        assert df == pytest.approx(L * (k.fixed_s["fp8"][i] - k.fixed_s["bf16"][i]), rel=1e-12)


def test_kernel_fit_takes_each_batch_line_and_refuses_what_it_cannot_fit():
    rows = [dict(kv_dtype=dt, batch=B, ctx=c, us=(a + s * B * c) * 1e6) for dt, a, s in
            (("bf16", 1e-5, 1e-9), ("fp8", 2e-5, 8e-10)) for B in (16, 64) for c in (1024, 4096)]
    rows += [dict(kv_dtype="bf16", batch=256, ctx=1024, us=300.0), dict(kv_dtype="fp8", batch=256, ctx=1024, us=260.0)]
    k = kv_attention.DecodeAttentionKernel(**kv_attention.fit_kernel(rows, "bf16", "t"))
    assert k.batches == [16, 64]  # batch 256: one context only
    assert k.fixed_s["fp8"] == pytest.approx([2e-5, 2e-5]) and k.per_token_s["bf16"] == pytest.approx([1e-9, 1e-9])
    with pytest.raises(ValueError, match=">= 2 contexts"):
        kv_attention.fit_kernel(rows[-2:], "bf16")
    with pytest.raises(ValueError, match="strictly increasing"):
        _kernel(batches=(16, 16, 64, 256))
    with pytest.raises(ValueError, match="non-negative"):
        _kernel(fp8=([1e-5, -1.0, 1e-5, 1e-5], [1e-9] * 4))


def test_sim_calibrate_fits_the_kernel_table_into_the_profile(tmp_path):
    """`sim calibrate --from-grid G --kv-attention T`: the table fitted into the profile as
    the cost model reads it; the grid's own terms as without it."""
    from servesim.sim.calibrate import calibrate, load_profile

    rng = np.random.default_rng(0)
    grid = tmp_path / "g.csv"
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
    g_kv = RESULTS / "calibration_h200" / "decode_attention_kv.csv"
    plain = calibrate(SPEC, HW, grid, tmp_path / "a.yaml")
    doc = calibrate(SPEC, HW, grid, tmp_path / "b.yaml", kv_attention_table=g_kv)
    assert "decode_attention_kernel" not in plain["roofline"]
    k = doc["roofline"].pop("decode_attention_kernel")
    assert doc["roofline"] == plain["roofline"]  # the grid's fit does not see the table
    assert k["grid_kv_dtype"] == "bf16" and k["batches"] == [1, 16, 64, 256]
    assert k == kv_attention.fit_kernel(kv_attention.read_table(g_kv), "bf16", k["source"])
    assert doc["provenance"]["kv_attention"] == k["source"] == str(g_kv.relative_to(REPO))
    cfg, _ = load_profile(tmp_path / "b.yaml", BF, HW)
    assert cfg.decode_attention_kernel == kv_attention.DecodeAttentionKernel(**k)
    ka = doc["fit"]["kv_attention"]
    assert ka["grid_ns_per_token"] == pytest.approx(ka["kernel_ns_per_token"]["bf16"] + ka["remainder_ns_per_token"])


def test_the_shipped_h200_profile_carries_the_kernel_table_of_its_calibration():
    from servesim.sim.calibrate import load_profile

    cfg, _ = load_profile(PROFILE, BF, HW)
    k = cfg.decode_attention_kernel
    assert k is not None and k.grid_kv_dtype == "bf16"
    assert k.model_dump() == kv_attention.fit_kernel(kv_attention.read_table(REPO / k.source), "bf16", k.source)


# ------------------------------------------------------------------------------- gpu_kv_fp8's CPU modes
def test_replay_regenerates_the_committed_sim_columns(tmp_path):
    g = _bench()
    for f in ("gpu_kv_fp8.csv", "gpu_kv_fp8.md"):
        shutil.copy(RESULTS / f, tmp_path / f)
    cal = tmp_path / "kv.csv"  # written from the csv's kernel table: the committed calibration file's rows
    assert g.main(["--replay", str(tmp_path / "gpu_kv_fp8.csv"), "--kv-calibration", str(cal)]) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k != "source"} for r in rows]  # noqa: E731
    assert strip(kv_attention.read_table(cal)) == strip(kv_attention.read_table(g.KV_CALIBRATION))
    md = (tmp_path / "gpu_kv_fp8.md").read_text()
    drop = lambda t: [ln for ln in t.splitlines() if not ln.startswith("Simulator columns regenerated")]  # noqa: E731
    assert drop(md) == drop((RESULTS / "gpu_kv_fp8.md").read_text())  # (that line names the command run)
    with open(tmp_path / "gpu_kv_fp8.csv") as a, open(RESULTS / "gpu_kv_fp8.csv") as b:
        assert list(csv.DictReader(a)) == list(csv.DictReader(b))


def test_rebuilt_fp8_tuning_is_the_csv_chosen_configs(tmp_path):
    g = _bench()
    table = tmp_path / "h200.json"
    shipped = json.loads((REPO / "kernels" / "tuning" / "h200.json").read_text())
    shipped["entries"] = {k: v for k, v in shipped["entries"].items() if "-kv-" not in k}
    table.write_text(json.dumps(shipped))
    out = g.rebuild_tuning(RESULTS / "gpu_kv_fp8.csv", table, "llama-3.1-8b")
    assert out["entries"] == json.loads((REPO / "kernels" / "tuning" / "h200.json").read_text())["entries"]
    _, tune = g.read_results(RESULTS / "gpu_kv_fp8.csv")
    key = "bfloat16-kv-float8_e4m3fn/g4/kv8/d128/bs32/sm132"
    try:
        set_tuning(out)
        for r in tune:  # the table gives back, at each tuned batch, the config the call chose
            assert tuned_config(r["batch"], key).label() == r["fp8_chosen"]
    finally:
        set_tuning(None)
