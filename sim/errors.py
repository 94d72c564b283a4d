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
from typing import Any

import yaml

from .types import ConfigError
from .yamlio import safe_load

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
    if isinstance(err, yaml.YAMLError):
        mark = getattr(err, "problem_mark", None)
        line = first_line + mark.line if mark is not None else None
        return ConfigError(f"invalid YAML: {getattr(err, 'problem', None) or err}", at_line(path, line))
    return ConfigError(f"cannot read {what}: {err}", str(path))


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


def validation_problems(err: Any, data: Any, source: str = "", prefix: str = "",
                        unknown_key_hint: str = "") -> list[tuple[str, str]]:
    """One ``(location, message)`` per error of a pydantic ``ValidationError`` raised
    validating `data`; locations are ``source: prefix.key.path`` (`source` alone for an
    error of the whole input)."""
    problems = []
    for item in err.errors():
        path = format_key(key_parts(item["loc"], data, missing=item["type"] == "missing"), prefix)
        problems.append((f"{source}: {path}" if source and path else (source or path),
                         problem_message(item, unknown_key_hint)))
    return problems


__all__ = [
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
]
