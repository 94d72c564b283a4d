import os
import sys
from pathlib import Path

# engine_harness.py and other shared test helpers live beside the tests
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("MPLBACKEND", "Agg")
# One intra-op thread for torch and OpenBLAS, here and in every process a test starts (CLI
# runs, grid worker processes, notebook kernels, benchmark smokes): the tests' matrices are
# tiny, and on a busy machine (CI: 2 cores shared with other jobs) threads that spin while
# another process holds the cores made torch-on-CPU tests 3-6x slower (the GPU-measuring
# path of sim calibrate: 45 s with the default, 8 s with one thread, back to back). Set
# before numpy or torch is imported (this file is imported first); a value already set is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib  # noqa: E402
import io  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def calibration_fit(tmp_path_factory):
    """`sim calibrate --model MODEL --from-grid GRID`, run once per session for each
    (model, grid, extra arguments): a fit of a full shipped grid takes 10-40 s (scipy's
    solver prices every grid row ~650 times), so tests that need the same fit share it.
    Returns ``fit(model, grid, *args) -> (exit code, profile path, what the command
    printed)``; the profile lies in a session folder and must not be modified."""
    done: dict = {}

    def fit(model: str, grid, *args: str):
        key = (model, str(Path(grid).resolve()), args)
        if key not in done:
            from servesim.sim.cli import main

            out = tmp_path_factory.mktemp("calibration") / f"{Path(grid).name.split('.')[0]}.yaml"
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                rc = main(["calibrate", "--model", model, "--from-grid", str(grid), "--out", str(out), *args])
            done[key] = (rc, out, printed.getvalue())
        return done[key]

    return fit
