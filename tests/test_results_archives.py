"""GPU-call archives (benchmarks/results_io.py): one archive per device call with a
manifest, unpacked on demand into an ignored cache, checked against the manifest."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


def _results_io():
    spec = importlib.util.spec_from_file_location("results_io", REPO / "benchmarks" / "results_io.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rio = _results_io()


def _scratch(tmp_path: Path):
    """A scratch checkout with one archive of two files."""
    src = tmp_path / "src"
    (src / "run").mkdir(parents=True)
    (src / "run" / "a.txt").write_text("alpha\n")
    (src / "log.txt").write_text("log\n")
    store = rio.Results(tmp_path / "repo")
    store.pack("call-1", {"gpu_runs/run/a.txt": src / "run" / "a.txt", "log_1.txt": src / "log.txt"},
               {"command": "python benchmarks/gpu_fidelity.py --steps 2", "date": "2026-11-27 10:00", "device": "cpu"})
    return store


def test_pack_unpack_and_resolve(tmp_path):
    store = _scratch(tmp_path)
    man = json.loads((store.archives / "call-1.json").read_text())
    assert man["command"].endswith("--steps 2") and man["device"] == "cpu" and man["date"]
    assert set(man["members"]) == {"gpu_runs/run/a.txt", "log_1.txt"}
    assert all(len(m["sha256"]) == 64 for m in man["members"].values())
    d = store.path("gpu_runs")  # a folder: every archive with something under it is unpacked
    assert d == store.cache / "gpu_runs" and (d / "run" / "a.txt").read_text() == "alpha\n"
    assert store.path("benchmarks/results/log_1.txt").read_text() == "log\n"  # the provenance's spelling
    assert not store.path("gpu_runs_repeat").exists()
    with pytest.raises(rio.ArchiveError, match="not in the tree and in no archive"):
        store.require("gpu_runs_repeat")
    # the same archive packed again is byte-identical (no times, no owners)
    first = (store.archives / "call-1.tar.xz").read_bytes()
    store.pack("call-1", {"gpu_runs/run/a.txt": store.cache / "gpu_runs/run/a.txt",
                          "log_1.txt": store.cache / "log_1.txt"}, {k: man[k] for k in ("command", "date", "device")})
    assert (store.archives / "call-1.tar.xz").read_bytes() == first


def test_missing_and_corrupt_archives(tmp_path):
    store = _scratch(tmp_path)
    arc = store.archives / "call-1.tar.xz"
    good = arc.read_bytes()
    arc.write_bytes(good[:-40] + bytes(40))
    with pytest.raises(rio.ArchiveError, match=r"call-1.tar.xz: corrupt \(sha256"):
        rio.Results(store.repo).path("gpu_runs")
    assert rio.Results(store.repo).verify() == [f"{arc}: sha256 differs from call-1.json"]
    arc.unlink()
    with pytest.raises(rio.ArchiveError, match="call-1.tar.xz: missing"):
        rio.Results(store.repo).path("gpu_runs")
    arc.write_bytes(good)  # a member whose hash the manifest does not have
    man = json.loads((store.archives / "call-1.json").read_text())
    man["members"]["log_1.txt"]["sha256"] = "0" * 64
    (store.archives / "call-1.json").write_text(json.dumps(man))
    with pytest.raises(rio.ArchiveError, match="member log_1.txt does not match its sha256"):
        rio.Results(store.repo).path("log_1.txt")


def test_a_newer_call_supersedes_an_older_calls_run(tmp_path):
    store = _scratch(tmp_path)
    store.path("gpu_runs")
    new = tmp_path / "new.txt"
    new.write_text("beta\n")
    assert store.supersede({"gpu_runs/run"}, by="call-2") == ["call-1"]
    store.pack("call-2", {"gpu_runs/run/a.txt": new}, {"command": "x", "date": "", "device": "cpu"})
    store = rio.Results(store.repo)
    assert set(store.manifests()["call-1"]["members"]) == {"log_1.txt"}
    assert store.manifests()["call-1"]["superseded"] == {"call-2": ["gpu_runs/run/a.txt"]}
    assert store.path("gpu_runs/run/a.txt").read_text() == "beta\n" and store.verify() == []


def test_committed_archives_hold_what_the_tables_and_profiles_name():
    """Every committed archive matches its manifest's hash, and every profile's grid (its
    provenance) is a member of one; the archives' members are nowhere in the tree."""
    store = rio.RESULTS
    mans = store.manifests()
    assert len(mans) >= 14
    members = {m for man in mans.values() for m in man["members"]}
    for name, man in mans.items():
        assert rio.sha256_of(store.archives / man["archive"]) == man["sha256"], name
        # the command that made the call's files (gpu_fidelity.py, a sim run, a benchmark), where, when
        assert man["command"].strip() and man["device"] and man["date"], name
        assert "h200" in man["device"].lower() or "h100" in man["device"].lower(), name
    import yaml

    for prof in [*(REPO / "profiles").glob("*.yaml"), *store.tables.glob("calibration*/*.yaml"),
                 *store.tables.glob("features/*/profiles/*.yaml")]:
        src = yaml.load(prof.read_text(), Loader=yaml.CSafeLoader)["provenance"]["source"]
        assert store.rel(src) in members, prof
    tracked = subprocess.run(["git", "ls-files", "benchmarks/results"], cwd=REPO, capture_output=True,
                             text=True).stdout.split()
    if tracked:  # a git checkout
        assert not members & {store.rel(t) for t in tracked}
