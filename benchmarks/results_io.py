"""Where the benchmarks read and write: derived tables, GPU-call archives, scratch output.

* ``benchmarks/results/`` (tracked) holds what a reader looks at -- the derived tables
  (``*.md``, small ``*.csv``, ``*.png``) and the profiles refitted from the GPU calls' grids
  (``calibration_*/``, ``features/*/profiles/``; the shipped ones are in ``profiles/``) --
  and ``archives/``: the raw output of every GPU device call that a current table is made
  from, one ``<call>.tar.xz`` per call with a ``<call>.json`` manifest (the sha256 and size
  of each member, the command that made it, the date, the device).
* An archive's members are named by their path under ``benchmarks/results/`` (e.g.
  ``gpu_runs/8b-offline/requests.parquet``, ``calibration/h100-llama-3.1-8b.grid.csv``):
  the names the tables, the profiles' provenance and the notes use. `Results.path` gives
  such a path's file or folder, unpacking the archives that hold it -- checked against
  their manifests -- into an ignored cache (``benchmarks/out/cache/``, or
  ``$SERVESIM_RESULTS_CACHE``) the first time.
* ``benchmarks/out/`` (ignored) is where a benchmark writes its tables by default; with
  ``--write-results`` it writes them into ``benchmarks/results/`` instead.

    python benchmarks/results_io.py list            # the archives, their calls and sizes
    python benchmarks/results_io.py unpack [CALL]   # into the cache (all of them by default)
    python benchmarks/results_io.py verify          # every archive against its manifest
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFIX = "benchmarks/results/"  # logical paths may carry it (a profile's provenance does)


class ArchiveError(RuntimeError):
    """An archive that its manifest names is missing, or does not match the manifest."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def add_write_results(ap) -> None:
    """The ``--write-results`` flag of a benchmark that writes tables."""
    ap.add_argument("--write-results", action="store_true",
                    help="write the tables into benchmarks/results/ (tracked) instead of benchmarks/out/ (ignored)")


class Results:
    """The results of one checkout (``repo``): tracked tables, archives, cache, scratch."""

    def __init__(self, repo: Path = REPO, cache: Path | None = None):
        self.repo = Path(repo)
        self.tables = self.repo / "benchmarks" / "results"
        self.archives = self.tables / "archives"
        self.out = self.repo / "benchmarks" / "out"
        env = os.environ.get("SERVESIM_RESULTS_CACHE") if self.repo.resolve() == REPO else None  # this checkout's
        self.cache = Path(cache) if cache is not None else Path(env) if env else self.out / "cache"
        self._manifests: tuple[tuple, dict[str, dict]] | None = None

    # ------------------------------------------------------------------ output folders
    def out_dir(self, write_results: bool) -> Path:
        """Where a benchmark writes its tables: benchmarks/results/ when asked, else the
        ignored benchmarks/out/."""
        d = self.tables if write_results else self.out
        d.mkdir(parents=True, exist_ok=True)
        return d

    # ------------------------------------------------------------------ reading
    def manifests(self) -> dict[str, dict]:
        """Every archive's manifest, by call name (read again when one changes)."""
        files = sorted(self.archives.glob("*.json")) if self.archives.is_dir() else []
        sig = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files)
        if self._manifests is None or self._manifests[0] != sig:
            mans = {}
            for p in files:
                try:
                    mans[p.stem] = json.loads(p.read_text())
                except (OSError, ValueError) as e:
                    raise ArchiveError(f"{p}: not a readable archive manifest ({e})") from None
            self._manifests = (sig, mans)
        return self._manifests[1]

    @staticmethod
    def rel(path: str | Path) -> str:
        """A path under benchmarks/results/, as the archives name it."""
        s = Path(path).as_posix().strip("/")
        return s[len(PREFIX):] if s.startswith(PREFIX) else s

    def calls_with(self, rel: str | Path) -> list[str]:
        """The calls whose archives hold the file ``rel`` or something under the folder ``rel``."""
        r = self.rel(rel)
        return [name for name, m in self.manifests().items()
                if r in m["members"] or any(k.startswith(r + "/") for k in m["members"]) or r in ("", ".")]

    def path(self, rel: str | Path) -> Path:
        """The file or folder ``rel`` (under benchmarks/results/): in the cache, after
        unpacking every archive that holds something of it; else the tracked one. A path
        that neither has is returned as it would be in the cache (it does not exist)."""
        r = self.rel(rel)
        calls = self.calls_with(r)
        for name in calls:
            self.unpack(name)
        if calls or not (self.tables / r).exists():
            return self.cache / r
        return self.tables / r

    def require(self, rel: str | Path) -> Path:
        """`path`, or a clear error when no archive and no tracked file has it."""
        p = self.path(rel)
        if not p.exists():
            raise ArchiveError(f"{PREFIX}{self.rel(rel)}: not in the tree and in no archive's manifest "
                               f"({self.archives.relative_to(self.repo)}/*.json)")
        return p

    def unpack(self, name: str) -> Path:
        """Unpack call ``name``'s archive into the cache (once: a stamp records it), after
        checking the archive's sha256 and then every member's against the manifest."""
        mans = self.manifests()
        if name not in mans:
            raise ArchiveError(f"no archive manifest {self.archives / (name + '.json')}")
        man = mans[name]
        stamp = self.cache / ".unpacked" / f"{name}.json"
        old = None
        if stamp.is_file():
            try:
                old = json.loads(stamp.read_text())
            except ValueError:
                old = None
        if old and old.get("sha256") == man["sha256"] and all((self.cache / m).is_file() for m in man["members"]):
            return self.cache
        arc = self.archives / man["archive"]
        if not arc.is_file():
            raise ArchiveError(f"{arc}: missing (its manifest {name}.json names it: {len(man['members'])} files of "
                               f"the device call '{man.get('command', '?')}')")
        got = sha256_of(arc)
        if got != man["sha256"]:
            raise ArchiveError(f"{arc}: corrupt (sha256 {got[:16]}..., its manifest {name}.json says "
                               f"{man['sha256'][:16]}...)")
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.cache))
        try:
            with tarfile.open(arc, "r:*") as tf:
                names = {m.name for m in tf.getmembers() if m.isfile()}
                if names != set(man["members"]):
                    raise ArchiveError(f"{arc}: its files differ from its manifest's "
                                       f"({len(names ^ set(man['members']))} names)")
                tf.extractall(tmp, filter="data")
            for m, info in man["members"].items():
                f = tmp / m
                if sha256_of(f) != info["sha256"]:
                    raise ArchiveError(f"{arc}: member {m} does not match its sha256 in {name}.json")
            # a member the archive had before it was repacked (superseded): out of the cache,
            # unless another archive has it now
            others = {m for n, o in mans.items() if n != name for m in o["members"]}
            for m in set((old or {}).get("members", [])) - set(man["members"]) - others:
                (self.cache / m).unlink(missing_ok=True)
            for m in man["members"]:
                dest = self.cache / m
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / m, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._stamp(name, man)
        return self.cache

    def _stamp(self, name: str, man: dict | None) -> None:
        """Record that the cache holds call ``name``'s members as of manifest ``man`` (None: forget it)."""
        stamp = self.cache / ".unpacked" / f"{name}.json"
        if man is None:
            stamp.unlink(missing_ok=True)
            return
        stamp.parent.mkdir(parents=True, exist_ok=True)
        part = stamp.with_suffix(f".{os.getpid()}.tmp")
        part.write_text(json.dumps({"sha256": man["sha256"], "members": sorted(man["members"])}))
        os.replace(part, stamp)

    def verify(self) -> list[str]:
        """Problems of every archive against its manifest (missing, corrupt, a member's
        hash); [] when all are sound."""
        probs = []
        for name, man in self.manifests().items():
            arc = self.archives / man["archive"]
            if not arc.is_file():
                probs.append(f"{arc}: missing")
                continue
            if sha256_of(arc) != man["sha256"]:
                probs.append(f"{arc}: sha256 differs from {name}.json")
                continue
            with tarfile.open(arc, "r:*") as tf:
                for m in tf.getmembers():
                    if not m.isfile():
                        continue
                    want = man["members"].get(m.name)
                    if want is None or hashlib.sha256(tf.extractfile(m).read()).hexdigest() != want["sha256"]:
                        probs.append(f"{arc}: member {m.name} not as in {name}.json")
        return probs

    # ------------------------------------------------------------------ writing
    def pack(self, name: str, files: dict[str, Path], meta: dict) -> Path:
        """Write call ``name``'s archive from ``files`` (member name -> file on disk) and
        its manifest (``meta``: command, date, device, ... plus the members' hashes).
        The archive is reproducible: sorted members, no owners, no times."""
        self.archives.mkdir(parents=True, exist_ok=True)
        arc = self.archives / f"{name}.tar.xz"
        members = {}
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz", preset=9) as tf:
            for m in sorted(files):
                data = Path(files[m]).read_bytes()
                info = tarfile.TarInfo(self.rel(m))
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tf.addfile(info, io.BytesIO(data))
                members[self.rel(m)] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        arc.write_bytes(buf.getvalue())
        man = {"call": name, **meta, "archive": arc.name, "sha256": sha256_of(arc), "bytes": arc.stat().st_size,
               "members": members}
        (self.archives / f"{name}.json").write_text(json.dumps(man, indent=1) + "\n")
        self._manifests = None
        return arc

    def supersede(self, paths: set[str], by: str) -> list[str]:
        """Take the members ``paths`` (or under those folders) out of every other archive
        (repacked without them, its manifest saying what replaced them; an archive left
        empty is deleted): a newer call's runs replace an older call's of the same name."""
        changed = []
        for name, man in list(self.manifests().items()):
            if name == by:
                continue
            gone = {m for m in man["members"] if m in paths or any(m.startswith(p.rstrip("/") + "/") for p in paths)}
            if not gone:
                continue
            self.unpack(name)
            keep = {m: self.cache / m for m in man["members"] if m not in gone}
            if not keep:
                (self.archives / man["archive"]).unlink()
                (self.archives / f"{name}.json").unlink()
                self._stamp(name, None)
            else:
                meta = {k: v for k, v in man.items() if k not in ("call", "archive", "sha256", "bytes", "members")}
                meta["superseded"] = {**man.get("superseded", {}), by: sorted(gone)}
                with tempfile.TemporaryDirectory() as tmp:  # the cache's copies move when it is repacked
                    for m, f in keep.items():
                        (Path(tmp) / m).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy(f, Path(tmp) / m)
                    self.pack(name, {m: Path(tmp) / m for m in keep}, meta)
                self._stamp(name, self.manifests()[name])  # the cache holds the kept members already
            for m in gone:
                (self.cache / m).unlink(missing_ok=True)
            changed.append(name)
            self._manifests = None
        return changed


RESULTS = Results()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    res = RESULTS
    if args[:1] == ["list"]:
        for name, m in res.manifests().items():
            print(f"{name}: {m['bytes'] / 1e6:.1f} MB, {len(m['members'])} files, {m.get('date', '?')}, "
                  f"{m.get('device', '?')}: {m.get('command', '?')}")
        return 0
    if args[:1] == ["unpack"]:
        for name in args[1:] or list(res.manifests()):
            res.unpack(name)
            print(f"unpacked {name} into {res.cache}")
        return 0
    if args[:1] == ["verify"]:
        probs = res.verify()
        print("\n".join(probs) or f"{len(res.manifests())} archives match their manifests")
        return 1 if probs else 0
    print(__doc__.strip().split("\n\n")[-1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
