"""Loading user policies named in an experiment file.

A policy key takes a built-in name (``least_loaded``), ``module:Class``, or
``{name: "pkg.mod:Class", args: {...}}`` (keyword arguments for the constructor). The
module is imported from the experiment file's folder first, then sys.path. The object must
have every member its family's Protocol declares; every problem is a ConfigError naming
the key.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

from servesim.sim.types import ConfigError


class PolicyRef(BaseModel):
    """A user policy: ``module:Class`` and the keyword arguments of its constructor."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$", description="module:Class")
    args: dict[str, Any] = Field(default_factory=dict, description="constructor keyword arguments")


def parse_ref(value: "str | PolicyRef") -> PolicyRef | None:
    """The user reference in a policy key's value, or None for a built-in name."""
    if isinstance(value, PolicyRef):
        return value
    if isinstance(value, str) and ":" in value:
        return PolicyRef(name=value)
    return None


def protocol_members(protocol: type) -> list[str]:
    """The attributes and methods a Protocol declares (its own and its bases')."""
    names: list[str] = []
    for klass in reversed(protocol.__mro__):
        if klass in (object,) or klass.__name__ in ("Protocol", "Generic"):
            continue
        for n in list(getattr(klass, "__annotations__", {})) + [
                k for k, v in vars(klass).items() if callable(v) and not k.startswith("_")]:
            if not n.startswith("_") and n not in names:
                names.append(n)
    return names


def _import(modname: str, base_dir: Path | None, key: str):
    added = base_dir is not None and str(base_dir) not in sys.path
    if added:
        sys.path.insert(0, str(base_dir))
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name == modname or modname.startswith(f"{e.name}."):
            raise ConfigError(f"module {modname!r} not found (looked in {base_dir or '.'} and sys.path)", key) from None
        raise ConfigError(f"module {modname!r} failed to import: {e}", key) from None
    except Exception as e:  # the user's module raised while importing
        raise ConfigError(f"module {modname!r} failed to import: {type(e).__name__}: {e}", key) from None
    finally:
        if added:
            sys.path.remove(str(base_dir))


def load_policy(value: "str | PolicyRef", protocol: type, builtin: Callable[[str], Any],
                key: str, base_dir: Path | None = None) -> Any:
    """The policy object a key names: `builtin(name)` for a built-in, else the user's class
    built with its args and checked against `protocol`'s members."""
    ref = parse_ref(value)
    if ref is None:
        return builtin(value)
    modname, _, attr = ref.name.partition(":")
    obj: Any = _import(modname, base_dir, key)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"module {modname!r} has no attribute {attr!r}", key)
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{ref.name} is a {type(obj).__name__}, not a class or callable", key)
    try:
        inspect.signature(obj).bind(**ref.args)
    except TypeError as e:
        raise ConfigError(f"{ref.name} does not take args {sorted(ref.args)}: {e}", key) from None
    except ValueError:
        pass  # no signature (a builtin): let the call decide
    try:
        policy = obj(**ref.args)
    except Exception as e:
        raise ConfigError(f"{ref.name}(**args) raised {type(e).__name__}: {e}", key) from None
    missing = [m for m in protocol_members(protocol) if not hasattr(policy, m)]
    if missing:
        raise ConfigError(f"{ref.name} does not satisfy {protocol.__name__}: missing "
                          + ", ".join(missing), key)
    bad = [m for m in protocol_members(protocol)
           if callable(getattr(protocol, m, None)) and not callable(getattr(policy, m))]
    if bad:
        raise ConfigError(f"{ref.name}: {', '.join(bad)} must be a method ({protocol.__name__})", key)
    return policy
