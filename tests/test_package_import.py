"""Importing servesim from the checkout's root leaves no top-level name of its folders
behind: the checkout's kernels/ folder must not shadow Hugging Face's `kernels`
distribution, which transformers >= 5 imports whenever it is installed (CI broke on it:
`cannot import name 'CUDAProperties' from 'kernels'`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, json, sys
before = importlib.util.find_spec("kernels")
import servesim, servesim.kernels
after = importlib.util.find_spec("kernels")
print(json.dumps({
    "before": before.origin if before else None,
    "after": after.origin if after else None,
    "ours": servesim.kernels.__file__,
    "root_on_path": any(p in ("", ".", %r) for p in sys.path),
}))
"""


def _probe(*argv: str) -> dict:
    out = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_checkout_root_is_taken_off_sys_path_by_import():
    seen = _probe("-c", PROBE % str(REPO))
    ours = str(REPO / "kernels" / "__init__.py")
    assert seen["before"] == ours  # the shadow this guards against is real: '' is the checkout's root
    assert Path(seen["ours"]).resolve() == Path(ours).resolve()  # servesim.kernels is still the folder
    assert seen["after"] != ours  # the top-level name is no longer the checkout's folder
    assert not seen["root_on_path"]


def test_a_top_level_import_made_before_servesim_is_forgotten():
    code = "import kernels, servesim, sys; print(sys.modules.get('kernels') is kernels, kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    same, path = out.stdout.split()
    assert Path(path).resolve() == (REPO / "kernels" / "__init__.py").resolve()  # the shadow was imported
    assert same == "False"  # and servesim dropped it, so the next `import kernels` looks again
