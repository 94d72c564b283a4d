"""Same outputs before and after a speed change: run the shipped experiments (and the
sim_speed workload) with `sim run`, keep their files, and compare them with a kept set.

A run's files must be identical except what is not a function of config and seed: the
summary's `wall_s` and config.yaml's `code_version` (and where the source tree is: policy
files are compared by their path inside it, and their sha256). Parquet tables are compared as
Arrow tables (schema with its metadata, then every column's values, exactly; NaN equal
to NaN), summary.json as parsed JSON (key order too), config.yaml as YAML.

    python benchmarks/outputs_identical.py save DIR      # before the change (e.g. on the base commit)
    python benchmarks/outputs_identical.py check DIR     # after it: exit 1 on the first difference
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

EXPERIMENTS = ["experiments/ifb_vs_static.yaml", "experiments/chunked_prefill.yaml",
               "experiments/kv_offload.yaml", "experiments/retention_priority.yaml"]

SIM_SPEED = """\
name: sim_speed_x1
model: llama-2-7b
hardware: h100-sxm
workload:
  trace: azure_conv
  arrival: {kind: poisson, rate_req_s: 6.45}
scheduler: {capacity: guaranteed_no_evict, max_batch_size: 256, max_num_tokens: 8192}
output: {plots: false, timeline: false}
"""

VOLATILE_SUMMARY = ("wall_s",)  # not a function of config and seed
VOLATILE_CONFIG = ("code_version",)


def run_all(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        speed = Path(tmp) / "sim_speed_x1.yaml"
        speed.write_text(SIM_SPEED)
        for exp in [*EXPERIMENTS, str(speed)]:
            name = Path(exp).stem
            out = dest / name
            if out.exists():
                shutil.rmtree(out)
            cmd = [sys.executable, "-m", "servesim.sim.cli", "run", exp, "--out", str(out), "--set",
                   "output.plots=false"]
            env = {**os.environ, "COLUMNS": "200"}
            r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
            if r.returncode != 0:
                raise SystemExit(f"{exp}: sim run failed\n{r.stdout}\n{r.stderr}")
            print(f"{exp}: -> {out}", file=sys.stderr)


def _same_value(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def compare_tables(a: Path, b: Path) -> str | None:
    import numpy as np
    import pyarrow.parquet as pq

    ta, tb = pq.read_table(a), pq.read_table(b)
    if not ta.schema.equals(tb.schema, check_metadata=True):
        return f"schemas differ:\n{ta.schema}\nvs\n{tb.schema}"
    if ta.num_rows != tb.num_rows:
        return f"{ta.num_rows} rows vs {tb.num_rows}"
    for name in ta.column_names:
        ca, cb = ta.column(name).combine_chunks(), tb.column(name).combine_chunks()
        if ca.equals(cb):
            continue
        # floats with NaNs: Arrow's equals is exact but NaN != NaN
        try:
            xa, xb = ca.to_numpy(zero_copy_only=False), cb.to_numpy(zero_copy_only=False)
            if xa.dtype.kind == "f" and np.array_equal(xa, xb, equal_nan=True):
                continue
        except (TypeError, ValueError):
            pass
        return f"column {name} differs"
    return None


def _csv_without_wall(path: Path) -> list[dict]:
    import csv

    with path.open(newline="") as f:
        return [{k: v for k, v in row.items() if k not in VOLATILE_SUMMARY} for row in csv.DictReader(f)]


def compare_runs(kept: Path, new: Path) -> list[str]:
    import yaml

    problems = []
    kept_files = sorted(p.relative_to(kept) for p in kept.rglob("*") if p.is_file())
    new_files = sorted(p.relative_to(new) for p in new.rglob("*") if p.is_file())
    if kept_files != new_files:
        problems.append(f"different files: {sorted(set(kept_files) ^ set(new_files))}")
    for rel in kept_files:
        a, b = kept / rel, new / rel
        if not b.is_file():
            continue
        if rel.suffix == ".parquet":
            why = compare_tables(a, b)
        elif rel.name == "summary.json":
            ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
            for k in VOLATILE_SUMMARY:
                ja.pop(k, None)
                jb.pop(k, None)
            why = None if _same_value(ja, jb) else "summary differs: " + ", ".join(
                k for k in dict.fromkeys([*ja, *jb]) if not _same_value(ja.get(k), jb.get(k)))
        elif rel.name == "config.yaml":
            ya, yb = yaml.safe_load(a.read_text()), yaml.safe_load(b.read_text())
            for k in VOLATILE_CONFIG:
                ya.pop(k, None)
                yb.pop(k, None)
            for y in (ya, yb):  # a policy's source file: its path inside the tree (the kept
                for prov in (y.get("policies") or {}).values():  # run may come from another checkout)
                    if isinstance(prov, dict) and isinstance(prov.get("file"), str):
                        prov["file"] = _in_tree(prov["file"])
            why = None if ya == yb else "config.yaml differs: " + ", ".join(
                k for k in dict.fromkeys([*ya, *yb]) if ya.get(k) != yb.get(k))
        elif rel.name == "experiment.json":  # the run's index: it names the experiment file's path
            ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
            ja.pop("source", None)
            jb.pop("source", None)
            why = None if ja == jb else "experiment.json differs"
        elif rel.name == "comparison.csv":  # summary rows with wall_s: compared without it
            why = None if _csv_without_wall(a) == _csv_without_wall(b) else "comparison.csv differs"
        else:
            why = None if a.read_bytes() == b.read_bytes() else "bytes differ"
        if why:
            problems.append(f"{rel}: {why}")
    return problems


def _in_tree(path: str) -> str:
    """A policy file's path from the tree's top folder on (policies/..., or the path itself)."""
    parts = Path(path).parts
    return str(Path(*parts[parts.index("policies"):])) if "policies" in parts else path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["save", "check"])
    ap.add_argument("dir", help="the kept outputs (save: written; check: compared with)")
    args = ap.parse_args()
    kept = Path(args.dir)
    if args.mode == "save":
        run_all(kept)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        run_all(Path(tmp))
        problems = compare_runs(kept, Path(tmp))
    for p in problems:
        print(f"DIFFERENT: {p}")
    if not problems:
        print(f"identical: {len(EXPERIMENTS) + 1} runs ({', '.join(Path(e).stem for e in EXPERIMENTS)}, "
              "sim_speed_x1) match the kept outputs")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
