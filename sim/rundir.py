"""Run folders: where `sim run` writes, and how a finished run is told from an unfinished one.

* An output folder is checked before any work (:func:`check_output_dir`): a file in its
  place or above it, a read-only or pseudo filesystem (``/proc``) is a ConfigError naming the
  folder and the option that chose it, not a traceback after the whole simulation.
* A variant is written into a hidden sibling folder, ``.<variant>.partial``
  (:func:`partial_dir`), renamed to ``<variant>`` once every file is in it
  (:func:`finish_dir`). A run interrupted (Ctrl-C, a kill, a full disk) never leaves a
  folder that looks finished.
* :func:`check_finished_run` refuses an unfinished run by name (``sim compare``,
  ``workload: {replay: RUN}``): a ``.partial`` folder, or a run folder without its files.
* The experiment folder's ``experiment.json`` indexes its variant folders with the hash of
  the configuration that wrote each (:func:`config_hash`), so a re-run with ``--only``
  can say which folders beside it come from another configuration.

Imports nothing from the project but :mod:`servesim.sim.types`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

from .types import ConfigError

RUN_FILES = ("requests.parquet", "iterations.parquet", "summary.json", "config.yaml")
PARTIAL = ".partial"
INDEX = "experiment.json"


def partial_dir(out: Path, variant: str) -> Path:
    """The folder a variant is written into before it is complete."""
    return Path(out) / f".{variant}{PARTIAL}"


def is_partial(path: Path) -> bool:
    name = Path(path).name
    return name.startswith(".") and name.endswith(PARTIAL) and len(name) > len(PARTIAL) + 1


def final_name(path: Path) -> str:
    """``.ifb.partial`` -> ``ifb``."""
    return Path(path).name[1:-len(PARTIAL)]


def check_output_dir(path: Path, where: str) -> None:
    """Create `path` (and its parents) and check a file can be written in it; ConfigError
    (location `where`, e.g. ``command line: --out``) otherwise. Permission bits are only
    part of it: root writes anywhere but a read-only filesystem, and nobody creates
    folders in ``/proc``, so this really writes (and removes) a probe file."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.is_dir():
            break
        if q.exists() or q.is_symlink():
            what = "is a file, not a folder" if q == p else f"is under {q}, which is a file, not a folder"
            raise ConfigError(f"{p} {what}", where)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".servesim-write-check-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{p}: cannot create or write this folder ({e.strerror or e})", where) from None


def remove(path: Path) -> None:
    """Remove a folder (or file) if it is there; best effort."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        try:
            p.unlink()
        except OSError:
            pass


def finish_dir(partial: Path, final: Path) -> None:
    """Rename a complete `partial` folder to `final`, replacing an earlier run there. Ctrl-C
    is held back meanwhile (delivered right after), so no moment leaves neither."""
    partial, final = Path(partial), Path(final)
    old = final.with_name(f".{final.name}.old")
    block = hasattr(signal, "pthread_sigmask")
    if block:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        remove(old)
        if final.exists() or final.is_symlink():
            os.replace(final, old)
        os.replace(partial, final)
    finally:
        if block:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    remove(old)


def write_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary sibling and a rename: never half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{PARTIAL}")
    tmp.write_text(text)
    os.replace(tmp, path)


def unfinished_problems(path: Path, where: str = "") -> list[tuple[str, str]]:
    """Why `path` (a run folder, or a file in one) is not a finished run; [] if it is (or
    if it is a file outside any run folder: a bare requests table). `where`: the key that
    named the run (``workload.replay``), put before the path."""
    p = Path(path)
    d = p if p.is_dir() else p.parent
    at = (lambda q: f"{where}: {q}") if where else str
    if is_partial(d):
        return [(at(d), f"an unfinished run: `sim run` was interrupted while writing variant "
                         f"{final_name(d)!r} (a finished variant is renamed to {final_name(d)}/); "
                         f"run it again")]
    if not p.is_dir():
        return []
    missing = [f for f in RUN_FILES if not (p / f).is_file()]
    return [(at(p / f), f"not a finished run: {f} is missing (a run folder holds {', '.join(RUN_FILES)}, "
                         f"as `sim run` writes them; an interrupted or older run?)") for f in missing]


def check_finished_run(path: Path, where: str = "") -> None:
    """ConfigError naming `path` unless it is a finished run (see :func:`unfinished_problems`)."""
    probs = unfinished_problems(path, where)
    if probs:
        raise ConfigError(probs)


def config_hash(config: dict) -> str:
    """A resolved run config's identity (its JSON with sorted keys, sha256)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_index(out: Path) -> dict:
    """``experiment.json``'s ``runs``: variant -> {config_sha256, backend}; {} if none or unreadable."""
    try:
        doc = json.loads((Path(out) / INDEX).read_text())
        runs = doc.get("runs") if isinstance(doc, dict) else None
        return {k: v for k, v in runs.items() if isinstance(v, dict)} if isinstance(runs, dict) else {}
    except (OSError, UnicodeDecodeError, ValueError):
        return {}


def foreign_folders(out: Path, current: dict[str, str], backend: str, running: set[str]) -> list[tuple[str, str]]:
    """Folders in `out` that a run of this configuration did not write, with the reason:
    `current` maps each variant of the experiment to its config hash; `running` are the
    variants about to be (re)written. Unfinished ``.partial`` folders of other variants too."""
    out = Path(out)
    if not out.is_dir():
        return []
    index = read_index(out)
    found = []
    for d in sorted(out.iterdir()):
        if not d.is_dir() or d.is_symlink():
            continue
        if is_partial(d):
            if final_name(d) not in running:
                found.append((d.name, "an unfinished variant of an interrupted run"))
            continue
        if d.name.startswith(".") or d.name in running:
            continue
        entry = index.get(d.name)
        if entry is None:
            if any((d / f).exists() for f in RUN_FILES):
                found.append((d.name, "not in experiment.json's index (an older run or another tool)"))
        elif d.name not in current:
            found.append((d.name, "a variant that is not in this experiment"))
        elif entry.get("config_sha256") != current[d.name]:
            found.append((d.name, "written by another configuration of this variant (the file or --set changed)"))
        elif entry.get("backend") != backend:
            found.append((d.name, f"written by --backend {entry.get('backend')}"))
    return found
