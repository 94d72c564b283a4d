"""The checkout's kernels/ folder imported under its bare name (the checkout's root on
sys.path, as `python -m pytest` from it puts it) hands the name to the installed `kernels`
distribution: Hugging Face's, which transformers >= 5 imports whenever it is installed (CI
broke on the shadow: `cannot import name 'CUDAProperties' from 'kernels'`)."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = REPO / "kernels" / "__init__.py"

PROBE = """
import importlib.util, json, sys
found = importlib.util.find_spec("kernels").origin
import kernels
import servesim.kernels
print(json.dumps({"found": found, "bare": kernels.__file__, "ours": servesim.kernels.__file__,
                  "cuda_properties": hasattr(kernels, "CUDAProperties")}))
"""


def _probe(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_bare_name_from_the_root_is_the_installed_distribution():
    if not _installed():
        pytest.skip("no `kernels` distribution installed: the bare name stays this folder")
    seen = _probe(PROBE)
    assert Path(seen["found"]).resolve() == OURS.resolve()  # the shadow is real: '' is the checkout's root
    assert Path(seen["bare"]).resolve() != OURS.resolve()  # but importing the name gives the installed one
    assert seen["cuda_properties"]  # Hugging Face's, what transformers imports from it
    assert Path(seen["ours"]).resolve() == OURS.resolve()  # servesim.kernels is still this folder


def test_transformers_builds_a_model_from_the_root():
    """What failed in CI: transformers importing `kernels` with the checkout's root on sys.path."""
    pytest.importorskip("transformers")
    code = ("import json, transformers\n"
            "cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, "
            "num_attention_heads=2, num_key_value_heads=1, vocab_size=64)\n"
            "m = transformers.LlamaForCausalLM(cfg)\n"
            "print(json.dumps({'params': sum(p.numel() for p in m.parameters())}))")
    assert _probe(code)["params"] > 0


def test_without_the_distribution_the_bare_name_is_this_folder():
    """With no other `kernels` anywhere on sys.path the folder stays itself (no error)."""
    code = ("import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p and 'dist-packages' not in p]\n"
            + PROBE.replace("import servesim.kernels\n", "").replace(', "ours": servesim.kernels.__file__', ""))
    seen = _probe(code)
    assert Path(seen["bare"]).resolve() == OURS.resolve() and not seen["cuda_properties"]
