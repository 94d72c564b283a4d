"""Calibration profile files: a small YAML with the time fit's residuals in a sidecar
Parquet (servesim-profile/3), the conversion of servesim-profile/2 files (residuals
inline) to it, and the YAML loader."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from servesim.sim import yamlio
from servesim.sim.calibrate import (INLINE_RESIDUALS_SCHEMA, PROFILE_SCHEMA, convert_profile, load_profile,
                                    load_residuals, main, residuals_path)
from servesim.sim.specs import load_hardware, load_model
from servesim.sim.types import ConfigError

REPO = Path(__file__).parents[1]
# every profile a table or an experiment reads (the shipped ones and the other calls')
SHIPPED = sorted([*(REPO / "profiles").glob("*.yaml"), *(REPO / "benchmarks" / "results").glob("calibration*/*.yaml"),
                  *(REPO / "benchmarks" / "results").glob("features/*/profiles/*.yaml")])


def _spec(doc: dict):
    return load_model(doc["model"]), load_hardware(doc["hardware"])


def test_the_c_loader_when_there_is_one():
    # the duplicate-key refusing loader is built on libyaml's C loader where PyYAML has it
    assert issubclass(yamlio.SafeLoader, getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    with pytest.raises(yamlio.DuplicateKeyError) as de:
        yamlio.safe_load("a: 1\nb: 2\na: 3\n")
    assert de.value.duplicates[0][0] == 3 and "'a'" in de.value.duplicates[0][1]
    doc = {"a": [1, 2.5e-07, 0.1 + 0.2], "b": {"c": "x", "d": [{"e": 1}]}, "f": True}
    text = yamlio.dump_readable(doc)
    assert yamlio.safe_load(text) == doc and "a: [1, 2.5e-07, 0.30000000000000004]" in text


def test_every_shipped_profile_is_small_with_its_residuals_beside_it():
    assert len(SHIPPED) >= 17
    for p in SHIPPED:
        doc = yamlio.safe_load(p.read_text())
        assert doc["schema"] == PROFILE_SCHEMA, p
        assert p.stat().st_size < 60_000, p  # 0.8 MB with the residuals inline
        ref = doc["fit"]["residuals"]
        assert ref["file"] == residuals_path(p).name and residuals_path(p).is_file(), p
        res = load_residuals(p)
        assert list(res.columns) == ["kind", "measured_s", "predicted_s"] and len(res) == ref["rows"] \
            == doc["fit"]["points"], p
        load_profile(p, *_spec(doc))


def test_loading_a_shipped_profile_is_fast():
    """Loading reads the YAML only (not the residuals); was ~1.4-3 s with them inline."""
    p = REPO / "profiles" / "h100-llama-3.2-1b.yaml"
    model, hw = load_model("llama-3.2-1b"), load_hardware("h100-sxm")
    load_profile(p, model, hw)  # imports warm
    t0 = time.perf_counter()
    load_profile(p, model, hw)
    assert time.perf_counter() - t0 < 0.3


def _as_schema_2(profile: Path, out: Path) -> Path:
    """The servesim-profile/2 file of a /3 profile: its residuals inline, as profiles were."""
    doc = yamlio.safe_load(profile.read_text())
    doc["schema"] = INLINE_RESIDUALS_SCHEMA
    doc["fit"]["residuals"] = load_residuals(profile).to_dict("records")
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def test_old_profiles_convert_to_the_same_model(tmp_path, capsys):
    """A servesim-profile/2 file is refused with the command that converts it; converted,
    it loads to exactly the RooflineConfig and power model it had, residuals in the sidecar."""
    for p in (REPO / "profiles").glob("*.yaml"):
        doc = yamlio.safe_load(p.read_text())
        spec = _spec(doc)
        old = _as_schema_2(p, tmp_path / p.name)
        assert old.stat().st_size > 10 * p.stat().st_size
        with pytest.raises(ConfigError, match=r"older version 'servesim-profile/2'.*servesim\.sim\.calibrate convert"):
            load_profile(old, *spec)
        assert main(["convert", str(old)]) == 0 and "converted" in capsys.readouterr().out
        assert load_profile(old, *spec) == load_profile(p, *spec)
        assert load_residuals(old).equals(load_residuals(p))
        again = yamlio.safe_load(old.read_text())
        assert {k: v for k, v in again.items() if k != "fit"} == {k: v for k, v in doc.items() if k != "fit"}
    with pytest.raises(ConfigError, match="not a servesim-profile/2 profile"):
        convert_profile(REPO / "profiles" / "h100-llama-3.1-8b.yaml", tmp_path / "x.yaml")


def test_unknown_schema_and_missing_residuals(tmp_path):
    model, hw = load_model("llama-3.1-8b"), load_hardware("h100-sxm")
    doc = yamlio.safe_load((REPO / "profiles" / "h100-llama-3.1-8b.yaml").read_text())
    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump({**doc, "schema": "servesim-profile/9"}))
    with pytest.raises(ConfigError, match="incompatible version.*servesim-profile/9"):
        load_profile(bad, model, hw)
    bad.write_text(yaml.safe_dump(doc))  # a copy without its sidecar still loads; its residuals do not
    assert load_profile(bad, model, hw)[0] == load_profile(REPO / "profiles" / "h100-llama-3.1-8b.yaml", model, hw)[0]
    with pytest.raises(ConfigError, match="residuals file h100-llama-3.1-8b.residuals.parquet is missing"):
        load_residuals(bad)
