"""servesim: an LLM-serving simulator with a real-GPU execution mode.

The repository's top-level folders (sim/, policies/, traces/, gpu_backend/, kernels/)
are installed as sub-packages of this distribution (servesim.sim, ...) through
`[tool.setuptools.package-dir]`. When this package is imported straight from a source
checkout (no install: e.g. a GPU machine that only has the working tree), the checkout's
root is added to the package path so that the same imports resolve to those folders.

Those folders are never top-level modules: with the checkout's root on ``sys.path``
(``python -m ...`` run from it, or a script that put it there to find this package), its
``kernels/`` folder would shadow Hugging Face's ``kernels`` distribution, which
transformers >= 5 imports whenever it is installed (``ImportError: cannot import name
'CUDAProperties' from 'kernels'``). So importing servesim takes the checkout's root off
``sys.path`` once this package has been found through it.
"""

import os as _os
import sys as _sys
from pathlib import Path as _Path

__version__ = "0.1.0"

_root = _Path(__file__).resolve().parent.parent
if (_root / "sim" / "engine.py").is_file() and (_root / "pyproject.toml").is_file():
    __path__.append(str(_root))  # noqa: F821  (package __path__)

    def _is_root(entry: str) -> bool:
        try:
            return _Path(entry or _os.getcwd()).resolve() == _root
        except OSError:
            return False

    _sys.path[:] = [p for p in _sys.path if not _is_root(p)]
    _shadow = _sys.modules.get("kernels")
    if _shadow is not None and _Path(getattr(_shadow, "__file__", "") or "/").resolve().parent == _root / "kernels":
        del _sys.modules["kernels"]  # imported as a top-level name before servesim was
