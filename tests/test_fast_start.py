"""Fast start: the bundled trace's binary copy is the CSV's table, and `sim run` imports
no plotting, fitting or GPU code."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from servesim.traces import bundle, readers

REPO = Path(__file__).resolve().parents[1]
CSV = "AzureLLMInferenceTrace_conv.csv"


def _from_csv(path: Path):
    saved = readers.BUNDLED_BINARY.pop(CSV)
    try:
        return readers.read_azure(path)
    finally:
        readers.BUNDLED_BINARY[CSV] = saved


def test_binary_copy_is_the_csv():
    """The shipped .npz gives the very table (values and dtypes) the shipped CSV does, and
    was made from this CSV (its recorded sha256)."""
    path = readers.DATA_DIR / CSV
    copy = readers.DATA_DIR / readers.BUNDLED_BINARY[CSV]
    with np.load(copy, allow_pickle=False) as z:
        assert str(z["source_sha256"]) == hashlib.sha256(path.read_bytes()).hexdigest(), \
            "traces/data/azure_conv.npz is stale: run python -m servesim.traces.bundle"
    fast = readers.bundled_binary(path)
    assert fast is not None
    slow = _from_csv(path)
    assert fast.equals(slow) and list(fast.dtypes) == list(slow.dtypes) and fast.attrs == slow.attrs
    assert len(fast) == 19_366
    assert readers.read_trace(path).equals(slow)  # what a run reads


def test_binary_copy_ignored_when_the_csv_changes(tmp_path, monkeypatch):
    """An edited CSV is read as it is: the copy stands only for the file it was made from."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(readers.DATA_DIR / CSV, data / CSV)
    monkeypatch.setattr(readers, "DATA_DIR", data.resolve())
    bundle.write_binary(CSV)
    assert readers.bundled_binary(data / CSV) is not None
    lines = (data / CSV).read_text().splitlines()
    head, first = lines[0], lines[1].split(",")
    first[1] = "3"  # the first request's prompt: 3 tokens
    (data / CSV).write_text("\n".join([head, ",".join(first), *lines[2:]]))
    assert readers.bundled_binary(data / CSV) is None
    df = readers.read_azure(data / CSV)
    assert int(df["prompt_len"].iat[0]) == 3
    (data / readers.BUNDLED_BINARY[CSV]).write_bytes(b"not an npz")  # a corrupt copy: the CSV
    assert readers.read_azure(data / CSV).equals(df)
    other = tmp_path / CSV  # a file of that name elsewhere is not the bundled one
    shutil.copy(readers.DATA_DIR / CSV, other)
    assert readers.bundled_binary(other) is None


def test_sim_run_imports_no_plotting_fitting_or_gpu_code(tmp_path):
    """What `sim run` imports to run the whole Azure trace with plots off: none of
    matplotlib, scipy, torch, triton, the GPU backend, the plots or the calibrator."""
    exp = tmp_path / "e.yaml"
    exp.write_text("name: e\nmodel: llama-3.2-1b\nhardware: h100-sxm\n"
                   "workload: {trace: azure_conv, num_requests: 50}\noutput: {plots: false, timeline: false}\n")
    code = ("import sys\n"
            f"sys.argv = ['sim', 'run', {str(exp)!r}, '--out', {str(tmp_path / 'out')!r}]\n"
            "from servesim.sim import cli\n"
            "assert cli.main(sys.argv[1:]) == 0\n"
            "bad = [m for m in ('matplotlib', 'scipy', 'torch', 'triton', 'servesim.gpu_backend',\n"
            "       'servesim.sim.plots', 'servesim.sim.calibrate') if m in sys.modules]\n"
            "print('IMPORTED', bad)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "IMPORTED []" in r.stdout, r.stdout
    assert (tmp_path / "out" / "base" / "requests.parquet").is_file()
