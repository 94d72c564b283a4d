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
