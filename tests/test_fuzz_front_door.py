"""A fuzzed front door (issue S12 item 5): mutated experiment files and traces never end
in a traceback.

Each example takes a valid experiment of ``experiments/`` (made small: at most two
variants, a handful of requests, truncated copies of the bundled traces) or a small
experiment over a mutated trace (a truncated Azure CSV, Mooncake JSONL or request
table), mutates it -- a value replaced by one of another type, a huge, negative or NaN
number, a key deleted, misspelt or moved to another level, a mapping wrapped in a list,
the text truncated, a line doubled or dropped, another encoding -- and runs ``sim
validate`` and ``sim run`` on it in this process. Both must end with exit 0 or 2 and
print no traceback, and ``sim run`` must report exactly the problems ``sim validate``
reports. A traceback found here is a bug to fix where the input is read or checked.

``SERVESIM_FUZZ_EXAMPLES=N`` runs N random examples (not the fixed, derandomized set of
the default run) for a longer hunt.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import tempfile
import traceback
from pathlib import Path

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from servesim.sim.cli import main

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))
DATA = REPO / "traces" / "data"
TRACE_ROWS = 40  # rows kept of a bundled trace
_hunt = int(os.environ.get("SERVESIM_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_hunt or 60, deadline=None, derandomize=not _hunt, database=None,
                suppress_health_check=list(HealthCheck))

# ---------------------------------------------------------------------- small valid inputs


def _head(path: Path, lines: int) -> str:
    with path.open(encoding="utf-8") as f:
        return "".join(next(f) for _ in range(lines))


AZURE_TEXT = _head(DATA / "AzureLLMInferenceTrace_conv.csv", TRACE_ROWS + 1)
MOONCAKE_TEXT = _head(DATA / "mooncake_conversation_trace.jsonl", TRACE_ROWS)
TABLE_TEXT = "arrival_s,prompt_len,output_len,tenant,slo_ttft_s\n" + "".join(
    f"{i * 0.25},{100 + 37 * i},{5 + i % 7},{'ab'[i % 2]},{'' if i % 3 else 1.5}\n" for i in range(TRACE_ROWS))
TRACES = {"azure.csv": AZURE_TEXT, "mooncake.jsonl": MOONCAKE_TEXT, "table.csv": TABLE_TEXT}
BUNDLED = {"azure_conv": "azure.csv", "mooncake_conv": "mooncake.jsonl"}

TRACE_EXPERIMENT = {
    "name": "fuzz_trace",
    "model": "llama-3.2-1b",
    "hardware": "h100-sxm",
    "workload": {"trace": "TRACE", "num_requests": 6, "rate_scale": 2.0, "slo": {"ttft_s": 1.0}},
    "scheduler": {"max_batch_size": 16, "max_num_tokens": 2048},
    "variants": [{"name": "ifb"}, {"name": "static", "scheduler": {"capacity": "static_batch"}}],
}


def _small(node, folder: Path, key=None):
    """`node` with few requests, the bundled traces replaced by truncated copies in
    `folder`, and the file paths of the shipped experiments made absolute."""
    if isinstance(node, dict):
        out = {k: _small(v, folder, k) for k, v in node.items()}
        if isinstance(out.get("trace"), str) and "prefix" not in out and key == "workload":
            out["num_requests"] = min(out.get("num_requests") or 6, 6)
        return out
    if isinstance(node, list):
        return [_small(v, folder, key) for v in node]
    if key in ("num_requests", "num_conversations", "num_templates") and isinstance(node, int):
        return min(node, 3 if key != "num_requests" else 6)
    if key == "trace" and isinstance(node, str):
        return str(folder / BUNDLED.get(node, node))
    if key in ("profile", "draft_profile") and isinstance(node, str):
        return str((REPO / "experiments" / node).resolve())
    return node


def _base_doc(source: str, keep: list[int], folder: Path) -> dict:
    if source == "trace":
        doc = yaml.safe_load(yaml.safe_dump(TRACE_EXPERIMENT))
    else:
        doc = yaml.safe_load((REPO / "experiments" / source).read_text())
    doc = {k: v for k, v in doc.items() if not str(k).startswith("x-")}  # anchors: already expanded
    variants = doc.get("variants") or [{"name": "base"}]
    doc["variants"] = [variants[i] for i in dict.fromkeys(k % len(variants) for k in keep)]
    return _small(doc, folder)


# ---------------------------------------------------------------------- mutations

NASTY = [None, True, False, 0, -1, 1, 2, 3, 7, 1024, 2**31, 2**53 + 1, 10**9, 10**12, -(10**23), 10**23, 2**63,
         2**64 + 1, 1e308, 1e-300, 5e-324, -1e-308, math.inf, -math.inf, math.nan, 0.5, 1.0, 1.5, "", " ", "abc",
         "1e3", "0x10", "∞", "é" * 3, "../../x", "/proc/self", ".", [], [1, 2], [0.5, 2.0], [[]], {},
         {"kind": "nope"}, {"kind": "constant", "value": -3}, {"beta": [0, 1]}, {"a": {"b": {"c": 1}}}, "x" * 300]
# deep copies: a mutation must never change the pools the next example draws from
values = st.one_of(st.sampled_from(NASTY).map(copy.deepcopy), st.integers(min_value=-(2**70), max_value=2**70),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.booleans())


def _near(current, data):
    """A value of (or close to) `current`'s type that a person could mistype: a negative,
    zero, huge or tiny number, NaN, a number in quotes, another type."""
    if isinstance(current, bool):
        pool = [not current, 0, 1, "yes", "true", None, [current]]
    elif isinstance(current, int):
        k = data.draw(st.integers(1, 24), label="exponent")
        pool = [-current, -1, 0, current * 10**k, current + 10**k, 2**63, 2**64, current + 0.5, str(current),
                float(current), None, [current]]
    elif isinstance(current, float):
        k = data.draw(st.integers(1, 320), label="exponent")
        pool = [-current, 0.0, current * 10.0**min(k, 300), current / 10.0**min(k, 300), math.inf, math.nan,
                5e-324, str(current), int(current) if math.isfinite(current) else 1, None, [current]]
    elif isinstance(current, str):
        pool = ["", current + "x", current.upper(), " " + current, 5, None, [current], {"kind": current}]
    elif isinstance(current, list):
        pool = [[], current * 2, current[:1], current[::-1], None, {"x": current}, [current]]
    elif isinstance(current, dict):
        pool = [{}, None, [current], "x", {**current, "kind": "nope"}]
    else:
        pool = NASTY
    return copy.deepcopy(data.draw(st.sampled_from(pool), label="near"))


def _leaves(node, prefix=()):
    if isinstance(node, dict) and node:
        return [p for k, v in node.items() for p in _leaves(v, prefix + (k,))]
    return [prefix]


def _settings() -> list[tuple]:
    """(key path, a value) of every setting, defaults included (the resolved configs of
    the shipped experiments' variants)."""
    from servesim.sim.config import load_experiment

    found = {}
    for p in EXPERIMENTS:
        for v in load_experiment(p).variants:
            dump = v.config.model_dump(mode="json")
            for path in _leaves(dump):
                node = dump
                for k in path:
                    node = node[k]
                found.setdefault(path, node)
    return sorted(found.items(), key=str)


SETTINGS = _settings()


def _set(node: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[path[-1]] = value


def _paths(node, prefix=()):
    """Every key path of `node` (to a mapping's key or a list's element)."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        out.append(prefix + (k,))
        out.extend(_paths(v, prefix + (k,)))
    return out


def _parent(doc, path):
    node = doc
    for k in path[:-1]:
        node = node[k]
    return node


def _mutate(doc, data) -> None:
    """One structural mutation of `doc`, in place."""
    paths = _paths(doc)
    if not paths:
        return
    path = data.draw(st.sampled_from(paths), label="path")
    parent, key = _parent(doc, path), path[-1]
    how = data.draw(st.sampled_from(["setting", "setting", "setting", "value", "value", "delete", "rename",
                                     "in_list", "in_dict", "up", "down", "add_key", "swap"]), label="how")
    if how == "setting":  # any setting, written or not, in the shared settings or a variant
        where = doc
        if isinstance(doc.get("variants"), list) and doc["variants"] and data.draw(st.booleans(), label="in variant"):
            where = data.draw(st.sampled_from(doc["variants"]), label="variant")
        if isinstance(where, dict):
            setting, default = data.draw(st.sampled_from(SETTINGS), label="setting")
            value = _near(default, data) if data.draw(st.booleans(), label="near") else data.draw(values, label="v")
            _set(where, setting, value)
    elif how == "value":
        parent[key] = _near(parent[key], data) if data.draw(st.booleans(), label="near") else \
            data.draw(values, label="value")
    elif how == "delete":
        del parent[key]
    elif how == "rename" and isinstance(parent, dict):
        parent[data.draw(st.sampled_from([f"{key}x", str(key).upper(), f"{key}_s", 7, True]), label="to")] = \
            parent.pop(key)
    elif how == "in_list":
        parent[key] = [parent[key]]
    elif how == "in_dict":
        parent[key] = {data.draw(st.sampled_from(["kind", "value", str(key)]), label="wrap"): parent[key]}
    elif how == "up" and len(path) > 1 and isinstance(parent, dict):  # a key one level too high
        grand = _parent(doc, path[:-1])
        if isinstance(grand, dict):
            grand[key] = parent.pop(key)
    elif how == "down" and isinstance(parent, dict):  # a key one level too deep
        dicts = [k for k, v in parent.items() if isinstance(v, dict) and k != key]
        if dicts:
            parent[data.draw(st.sampled_from(dicts), label="into")][key] = parent.pop(key)
    elif how == "add_key":
        target = parent[key] if isinstance(parent[key], dict) else parent
        if isinstance(target, dict):
            target[data.draw(st.sampled_from(["kind", "extra", "name", "max", "seed", "trace"]), label="k")] = \
                data.draw(values, label="v")
    elif how == "swap" and len(paths) > 1:
        other = data.draw(st.sampled_from(paths), label="other")
        try:
            op, ok = _parent(doc, other), other[-1]
            parent[key], op[ok] = op[ok], parent[key]
        except (KeyError, IndexError, TypeError):
            pass


def _text_mutation(text: str, data) -> bytes:
    """The file's bytes after at most one textual mutation."""
    how = data.draw(st.sampled_from(["none", "none", "none", "truncate", "dup_line", "drop_line", "char",
                                     "latin1", "utf16", "bom", "bad_byte", "tabs", "empty"]), label="text")
    lines = text.splitlines(keepends=True)
    if how == "truncate":
        return text[: data.draw(st.integers(0, len(text)), label="at")].encode()
    if how in ("dup_line", "drop_line") and lines:
        i = data.draw(st.integers(0, len(lines) - 1), label="line")
        lines[i:i + 1] = [lines[i]] * (2 if how == "dup_line" else 0)
        return "".join(lines).encode()
    if how == "char":
        i = data.draw(st.integers(0, len(text)), label="at")
        c = data.draw(st.sampled_from([":", "-", "{", "]", "'", '"', "&", "*", "!", "#", "\t", "\n", "\x00", ",", "%"]),
                      label="c")
        return (text[:i] + c + text[i:]).encode()
    if how == "latin1":
        return (text + "# café\n").encode("latin-1", errors="replace")
    if how == "utf16":
        return text.encode("utf-16")
    if how == "bom":
        return b"\xef\xbb\xbf" + text.encode()
    if how == "bad_byte":
        b = bytearray(text.encode())
        b[data.draw(st.integers(0, max(len(b) - 1, 0)), label="at") if b else 0:0] = b"\xff\xfe"
        return bytes(b)
    if how == "tabs":
        return text.replace("  ", "\t").encode()
    if how == "empty":
        return b""
    return text.encode()


def _trace_mutation(name: str, text: str, data) -> bytes:
    """A trace's bytes after at most one mutation of a cell, a column or the text."""
    how = data.draw(st.sampled_from(["none", "cell", "cell", "column", "shuffle", "text"]), label="trace")
    lines = text.splitlines(keepends=True)
    if how == "cell" and len(lines) > 1:
        i = data.draw(st.integers(1 if name.endswith(".csv") else 0, len(lines) - 1), label="row")
        cell = data.draw(st.sampled_from(["", "-5", "0", "1e23", "100000000000000000000000", "nan", "inf", "abc",
                                          "2.5", "9" * 30, '"', "1,2", "null", "[]", "{}", "true"]), label="cell")
        if name.endswith(".csv"):
            parts = lines[i].rstrip("\n").split(",")
            parts[data.draw(st.integers(0, len(parts) - 1), label="col")] = cell
            lines[i] = ",".join(parts) + "\n"
        else:
            key = data.draw(st.sampled_from(["timestamp", "input_length", "output_length", "hash_ids"]), label="key")
            lines[i] = lines[i].replace(f'"{key}": ', f'"{key}": {cell or "null"}, "was_{key}": ', 1)
        return "".join(lines).encode()
    if how == "column" and name.endswith(".csv"):
        col = data.draw(st.integers(0, 2), label="col")
        return "".join(",".join(p for j, p in enumerate(ln.rstrip("\n").split(",")) if j != col) + "\n"
                       for ln in lines).encode()
    if how == "shuffle" and len(lines) > 2:
        head, rows = (lines[:1], lines[1:]) if name.endswith(".csv") else ([], lines)
        return "".join(head + data.draw(st.permutations(rows), label="order")).encode()
    if how == "text":
        return _text_mutation(text, data)
    return text.encode()


# ---------------------------------------------------------------------- the property


class _TooSlow(BaseException):
    """An example ran past its time: a slow input is a finding too."""


@contextlib.contextmanager
def _bounded(seconds: int = 30, extra_bytes: int = 4 << 30):
    """At most `seconds` and `extra_bytes` more address space for what runs inside (an
    input that asks for a 10^20-entry list must fail here with MemoryError, not take the
    machine's memory). Linux only; elsewhere no bounds."""
    try:
        import resource
        import signal

        vm = next(int(ln.split()[1]) * 1024 for ln in Path("/proc/self/status").read_text().splitlines()
                  if ln.startswith("VmSize:"))
    except (ImportError, OSError, StopIteration):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm + extra_bytes if hard == resource.RLIM_INFINITY else min(vm + extra_bytes, hard)

    def too_slow(*_):
        raise _TooSlow(f"still running after {seconds} s")

    before = signal.signal(signal.SIGALRM, too_slow)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _cli(argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of `sim ARGV` in this process; an escaping exception fails the
    test with its traceback."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with _bounded(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    except BaseException:  # noqa: BLE001 - anything escaping main() is the bug this test is for
        raise AssertionError(f"sim {' '.join(argv)} raised:\n{traceback.format_exc()}\nstderr:\n{err.getvalue()}")
    return rc, err.getvalue()


def _problems(stderr: str) -> list[str]:
    lines = stderr.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("error: ")), None)
    if start is None:
        return []
    return [lines[start]] + [ln for ln in lines[start + 1:] if ln.startswith("  ")]


SOURCES = ["trace"] + [p.name for p in EXPERIMENTS]
SMALL_RUN = ["--set", "output.plots=false", "--set", "output.timeline=false"]


@FUZZ
@given(source=st.sampled_from(SOURCES), keep=st.lists(st.integers(0, 11), min_size=1, max_size=2),
       n_mutations=st.integers(0, 4), data=st.data())
def test_mutated_inputs_exit_0_or_2_without_a_traceback(source, keep, n_mutations, data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, text in TRACES.items():
            (folder / name).write_text(text)
        doc = _base_doc(source, keep, folder)
        if source == "trace":
            name = data.draw(st.sampled_from(sorted(TRACES)), label="trace file")
            (folder / name).write_bytes(_trace_mutation(name, TRACES[name], data))
            doc["workload"]["trace"] = str(folder / name)
        for _ in range(n_mutations):
            _mutate(doc, data)
        try:
            text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
        except yaml.YAMLError:
            text = repr(doc)  # not YAML at all: the loader must say so
        exp = folder / "exp.yaml"
        exp.write_bytes(_text_mutation(text, data))
        for_run = data.draw(st.sampled_from([SMALL_RUN, SMALL_RUN + ["--set", "workload.num_requests=5"]]),
                            label="--set")
        rc_v, err_v = _cli(["validate", str(exp), *for_run])
        rc_r, err_r = _cli(["run", str(exp), "--out", str(folder / "out"), *for_run])
        event(f"validate exit {rc_v}, run exit {rc_r}")
        shown = exp.read_bytes()[:3000].decode("utf-8", errors="replace")
        assert rc_v in (0, 2), f"sim validate exit {rc_v}:\n{err_v}\n--- {exp.name}:\n{shown}"
        assert rc_r in (0, 2), f"sim run exit {rc_r}:\n{err_r}\n--- {exp.name}:\n{shown}"
        for err in (err_v, err_r):
            assert "Traceback" not in err, f"{err}\n--- {exp.name}:\n{shown}"
        if rc_v == 2:  # the same checks in the same order: the same problems
            assert _problems(err_r) == _problems(err_v), f"validate:\n{err_v}\nrun:\n{err_r}\n--- {shown}"
