"""servesim: an LLM-serving simulator with a real-GPU execution mode.

The repository's top-level folders (sim/, policies/, traces/, gpu_backend/, kernels/)
are installed as sub-packages of this distribution (servesim.sim, ...) through
`[tool.setuptools.package-dir]`. When this package is imported straight from a source
checkout (no install: e.g. a GPU machine that only has the working tree), the checkout's
root is added to the package path so that the same imports resolve to those folders.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

_root = _Path(__file__).resolve().parent.parent
if (_root / "sim" / "engine.py").is_file() and (_root / "pyproject.toml").is_file():
    __path__.append(str(_root))  # noqa: F821  (package __path__)
