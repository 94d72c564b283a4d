"""Turning what goes wrong with user input into :class:`~servesim.sim.types.ConfigError`.

One place for the two ways user input fails before it means anything:

* **files** (:func:`read_text`, :func:`load_yaml`, :func:`load_json`, :func:`existing_file`,
  :func:`file_error`): a file that is missing, not a file, unreadable, not UTF-8 or not
  valid YAML/JSON gives an error naming the file and, for a parse error, the line
  (``path, line N``);
* **pydantic validation** (:func:`validation_problems`, and its parts :func:`key_parts`,
  :func:`format_key`, :func:`problem_message` for callers that place a problem
  themselves): one ``(location, message)`` per error, located by the key path the user
  wrote (``workload.synthetic.arrival.rate_req_s``, ``window_s[1]``), without the tags
  pydantic adds for unions.

Imports nothing from the project but :mod:`servesim.sim.types` and :mod:`servesim.sim.yamlio`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator

from .types import ConfigError
from .yamlio import DuplicateKeyError, safe_load

# ---------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------


def at_line(path: str | Path, line: int | None = None) -> str:
    """The location of a 1-based line of a file (the file itself for None)."""
    return str(path) if line is None else f"{path}, line {line}"


def existing_file(path: str | Path, what: str = "file") -> Path:
    """`path` as a Path; ConfigError unless it is an existing regular file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"no such {what} (file not found, resolved to {p.resolve()})", str(p))
    if not p.is_file():
        raise ConfigError(f"not a regular file ({what} expected)", str(p))
    return p


def file_error(path: str | Path, err: BaseException, what: str = "file", first_line: int = 1) -> ConfigError:
    """The ConfigError for `err` raised while reading or parsing file `path`: an OSError,
    a UnicodeDecodeError, a ``json.JSONDecodeError`` or a ``yaml.YAMLError``.
    ``first_line``: the file's line number of the parsed text's first line (a JSONL line)."""
    if isinstance(err, FileNotFoundError):
        return ConfigError(f"no such {what} (file not found, resolved to {Path(path).resolve()})", str(path))
    if isinstance(err, IsADirectoryError):
        return ConfigError(f"not a regular file ({what} expected)", str(path))
    if isinstance(err, OSError):
        return ConfigError(f"cannot read {what}: {err.strerror or err}", str(path))
    if isinstance(err, UnicodeDecodeError):
        return ConfigError(f"not a UTF-8 text file ({err.reason} at byte {err.start})", str(path))
    if isinstance(err, json.JSONDecodeError):
        return ConfigError(f"invalid JSON: {err.msg} (column {err.colno})", at_line(path, first_line + err.lineno - 1))
    if isinstance(err, DuplicateKeyError):  # every repeated key, each at its line
        return ConfigError([(at_line(path, first_line + line - 1), f"invalid YAML: {msg}")
                            for line, msg in err.duplicates])
    if isinstance(err, yaml.YAMLError):
        mark = getattr(err, "problem_mark", None)
        line = first_line + mark.line if mark is not None else None
        return ConfigError(f"invalid YAML: {getattr(err, 'problem', None) or err}", at_line(path, line))
    return ConfigError(f"cannot read {what}: {err}", str(path))


def path_problem(text: str) -> str | None:
    """Why the string `text` can name no file on this system (a NUL character, a name
    longer than a file system allows), or None. Such a string makes ``os.stat`` raise
    instead of saying that no such file exists."""
    if "\x00" in text:
        return "a path cannot contain a NUL character"
    longest = max((len(part.encode("utf-8", "surrogateescape")) for part in text.split("/")), default=0)
    if longest > 255:
        return f"not a usable path: it holds a name of {longest} bytes (a file or folder name has at most 255)"
    if len(text.encode("utf-8", "surrogateescape")) > 4095:
        return "not a usable path: longer than 4,095 bytes"
    return None


def _usable_path(v: Any) -> Any:
    problem = path_problem(v) if isinstance(v, str) else None
    if problem:
        raise ValueError(problem)
    return v


# A setting that names a file (a bundled name or a path): refused when no file can have it.
PathStr = Annotated[str, AfterValidator(_usable_path)]


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of `path`; ConfigError naming the file for anything else."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise file_error(path, e, what) from None


def load_yaml(path: str | Path, what: str = "YAML file") -> Any:
    """The parsed YAML of `path` (``yaml.safe_load``, with libyaml's C parser where there is
    one: sim/yamlio.py); ConfigError naming the file (and the line of a syntax error)."""
    text = read_text(path, what)
    try:
        return safe_load(text)
    except yaml.YAMLError as e:
        raise file_error(path, e, what) from None


def load_json(path: str | Path, what: str = "JSON file") -> Any:
    """The parsed JSON of `path`; ConfigError naming the file (and the line of a syntax error)."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise file_error(path, e, what) from None


# ---------------------------------------------------------------------------------------
# pydantic validation errors
# ---------------------------------------------------------------------------------------


def key_parts(loc: tuple, data: Any, missing: bool = False) -> tuple:
    """Pydantic's ``loc`` reduced to the keys and indices of the user's `data`: union tags
    (``poisson``, ``function-after[...]``: elements that are no key of the mapping at that
    point) are left out, and the path ends at a scalar shorthand that a validator expanded
    (``prompt_len: 0`` -> ``prompt_len``). ``missing``: the last element is a key that is
    absent by definition (kept)."""
    out: list = []
    node = data
    last = len(loc) - 1
    for i, item in enumerate(loc):
        if isinstance(item, str):
            if item.startswith("function-"):
                continue
            if node is not None and not isinstance(node, (dict, list, tuple)):
                break  # a scalar the user wrote, expanded by a validator: the path ends here
            if not (missing and i == last) and (
                    isinstance(node, (list, tuple)) or (isinstance(node, dict) and item not in node)):
                continue  # a union member's tag, not a key the user wrote
        out.append(item)
        if isinstance(node, dict):
            node = node.get(item)
        elif isinstance(node, (list, tuple)) and isinstance(item, int) and item < len(node):
            node = node[item]
        else:
            node = None
    return tuple(out)


def format_key(parts: tuple, prefix: str = "") -> str:
    """``("a", 1, "b")`` -> ``a[1].b`` (after `prefix`, e.g. ``workload.a[1].b``)."""
    out = prefix
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def problem_message(item: dict, unknown_key_hint: str = "") -> str:
    """The message of one pydantic error (an item of ``ValidationError.errors()``), with
    the value the user gave when it is a scalar. ``unknown_key_hint`` follows "unknown
    key" in parentheses (what the keys may be)."""
    kind = item["type"]
    if kind == "extra_forbidden":
        return f"unknown key ({unknown_key_hint})" if unknown_key_hint else "unknown key"
    if kind == "missing":
        return "missing key"
    if kind == "union_tag_not_found":
        return f"missing key {item.get('ctx', {}).get('discriminator', 'kind').strip(chr(39))!r}"
    msg = item["msg"]
    for p in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(p)
    if kind != "union_tag_invalid" and "input" in item and not isinstance(item["input"], (dict, list, tuple)):
        msg = f"{msg}, got {item['input']!r}"
    return msg


class KeyedError(ValueError):
    """A model validator's problem about particular keys (a cross-check of two settings):
    ``keys`` are their dotted paths relative to the model validated, the most relevant
    first. Raised inside a pydantic validator, it reaches :func:`located_errors`, which
    puts the problem at the key the user wrote instead of at the model's mapping."""

    def __init__(self, message: str, *keys: str):
        super().__init__(message)
        self.keys = tuple(tuple(k.split(".")) for k in keys)


def _has_path(d: Any, loc: tuple) -> bool:
    for p in loc:
        if isinstance(d, dict) and p in d:
            d = d[p]
        elif isinstance(d, list) and isinstance(p, int) and p < len(d):
            d = d[p]
        else:
            return False
    return True


def error_keys(item: dict, data: Any) -> list[tuple]:
    """The key paths in `data` an error item is about: its own location, or for a
    :class:`KeyedError` the location extended by each of its keys."""
    loc = key_parts(item["loc"], data, missing=item["type"] == "missing")
    exc = (item.get("ctx") or {}).get("error")
    if isinstance(exc, KeyedError) and exc.keys:
        return [loc + k for k in exc.keys]
    return [loc]


def _type_mismatch(kind: str) -> bool:
    return kind.endswith(("_type", "_parsing")) or kind in ("is_instance_of", "finite_number")


def located_errors(err: Any, data: Any) -> list[tuple[list[tuple], dict]]:
    """``(candidate key paths, error item)`` per problem of a pydantic ``ValidationError``,
    in pydantic's order. The errors of a union's members at one key become one: a value
    that matches one member's type keeps that member's error (``acceptance: .inf``: "a
    finite number", not also "a valid list"); a value of no member's type gets one message
    listing what it may be."""
    items = err.errors()
    keyed = [(error_keys(it, data), it) for it in items]
    by_path: dict[tuple, list[int]] = {}
    for i, (paths, it) in enumerate(keyed):
        by_path.setdefault(paths[0], []).append(i)
    drop: set[int] = set()
    merged: dict[int, dict] = {}
    for idx in by_path.values():
        if len(idx) < 2 or len({tuple(items[i]["loc"]) for i in idx}) < len(idx):
            continue  # one error at this key, or not a union's members
        typed = [i for i in idx if _type_mismatch(items[i]["type"])]
        if len(typed) < len(idx):  # the value has some member's type: that member's errors tell what is wrong
            drop.update(typed)
            continue
        finite = [i for i in idx if items[i]["type"] == "finite_number"]
        if finite:  # a number, but not a finite one
            drop.update(i for i in idx if i != finite[0])
            continue
        whats = []
        for i in idx:
            w = items[i]["msg"].removeprefix("Input should be ").split(", ")[0]
            if w not in whats:
                whats.append(w)
        msg = ", ".join(whats[:-1]) + " or " + whats[-1] if len(whats) > 1 else whats[0]
        merged[idx[0]] = {**items[idx[0]], "type": "union_type", "msg": f"Input should be {msg}"}
        drop.update(idx[1:])
    return [(paths, merged.get(i, it)) for i, (paths, it) in enumerate(keyed) if i not in drop]


def validation_problems(err: Any, data: Any, source: str = "", prefix: str = "",
                        unknown_key_hint: str = "") -> list[tuple[str, str]]:
    """One ``(location, message)`` per error of a pydantic ``ValidationError`` raised
    validating `data`; locations are ``source: prefix.key.path`` (`source` alone for an
    error of the whole input); a :class:`KeyedError` at the first of its keys that `data`
    holds."""
    problems = []
    for paths, item in located_errors(err, data):
        parts = next((p for p in paths if _has_path(data, p)), paths[0])
        path = format_key(parts, prefix)
        problems.append((f"{source}: {path}" if source and path else (source or path),
                         problem_message(item, unknown_key_hint)))
    return problems


__all__ = [
    "PathStr",
    "path_problem",
    "at_line",
    "existing_file",
    "file_error",
    "read_text",
    "load_yaml",
    "load_json",
    "key_parts",
    "format_key",
    "problem_message",
    "validation_problems",
    "located_errors",
    "error_keys",
    "KeyedError",
]
