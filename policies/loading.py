"""Loading the policies an experiment file names: built-ins and the user's own, one path.

Every policy key of an experiment (``scheduler.capacity``, ``scheduler.order``,
``scheduler.chunking``, ``scheduler.preemption_victim``, ``kv_cache.eviction``,
``cluster.router``, ``speculative.draft_policy``) takes

* a built-in name (``fcfs``), which is only a short name for the built-in's class
  (``servesim.policies.ordering:Fcfs``);
* ``module:Class`` (``my_policies:ShortestJobFirst``), or ``path/to/file.py:Class`` (a
  file, relative to the experiment's folder);
* ``{class: module:Class, args: {...}}``: keyword arguments for its constructor.

A built-in goes through exactly the same steps as a user's class: import, argument check,
construction, a check of every member its family's Protocol declares (a missing method is
named), and a record of the class and the sha256 of its source file for the run's
``config.yaml``. ``module`` is looked for next to the experiment file first (a file
``my_policies.py`` beside it, reloaded when it changed), then on ``sys.path`` (an installed
module). Every problem is a ConfigError naming the key (the CLI exits with status 2).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from servesim.sim.types import ConfigError

# module:Class, or path/to/file.py:Class (relative to the experiment's folder)
REF_PATTERN = r"^([A-Za-z_][\w.]*|[\w./~-]+\.py):[A-Za-z_][\w.]*$"


class PolicyRef(BaseModel):
    """``{class: module:Class, args: {...}}``: a policy class and its constructor's keyword arguments."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)
    class_: str = Field(alias="class", description="module:Class (a file next to the experiment, or an "
                        "installed module)")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of its constructor")

    @field_validator("class_")
    @classmethod
    def _ref(cls, v: str) -> str:
        import re

        if not re.match(REF_PATTERN, v.strip()) and not re.match(r"^[A-Za-z_]\w*$", v.strip()):
            raise ValueError("expected module:Class (e.g. my_policies:ShortestJobFirst) or a built-in's name")
        return v.strip()


# ---------------------------------------------------------------------------------------
# the families


@dataclass(frozen=True)
class Family:
    """One kind of decision: the config key that chooses it, its Protocol, its built-ins."""

    name: str
    key: str  # where an experiment sets it
    module: str  # servesim.policies.<module>: the Protocol and the built-ins
    protocol: str  # the Protocol's name in that module
    registry: str  # the name of the module's registry of built-ins (name -> class)

    def protocol_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.protocol)

    def builtin_classes(self) -> dict[str, type]:
        return dict(getattr(importlib.import_module(self.module), self.registry))


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("capacity", "scheduler.capacity", "servesim.policies.capacity", "CapacityPolicy", "CAPACITY_POLICIES"),
    Family("order", "scheduler.order", "servesim.policies.ordering", "WaitingOrder", "ORDERS"),
    Family("chunking", "scheduler.chunking", "servesim.policies.chunking", "ChunkPolicy", "CHUNK_POLICIES"),
    Family("preemption", "scheduler.preemption_victim", "servesim.policies.preemption", "PreemptionPolicy",
           "VICTIM_POLICIES"),
    Family("eviction", "kv_cache.eviction", "servesim.policies.eviction", "EvictionPolicy", "EVICTION_POLICIES"),
    Family("router", "cluster.router", "servesim.policies.routing", "Router", "ROUTERS"),
    Family("draft", "speculative.draft_policy", "servesim.policies.speculative", "DraftPolicy",
           "DRAFT_POLICIES"),
)}


def builtin_names(family: str) -> list[str]:
    return list(FAMILIES[family].builtin_classes())


def check_value(value: Any, family: str) -> Any:
    """Config validation of a policy key's value (a pydantic before-validator): a built-in
    name or ``module:Class`` (kept as written), or a mapping (validated as a PolicyRef)."""
    if isinstance(value, str):
        v = value.strip()
        if ":" in v:
            PolicyRef(class_=v)  # raises ValueError with the expected form
            return v
        names = builtin_names(family)
        if v not in names:
            raise ValueError(f"not a built-in {family} policy ({', '.join(names)}) nor module:Class (your own, "
                             "e.g. my_policies:MyPolicy)")
        return v
    return value


# ---------------------------------------------------------------------------------------
# loading


class PolicyError(RuntimeError):
    """A policy's decision the engine cannot carry out (an index out of range, a victim
    twice): the policy is wrong, not the engine."""


@dataclass
class LoadedPolicy:
    """A policy class resolved from a key: what makes fresh instances, and its provenance."""

    family: str
    key: str
    ref: str  # module:Class
    cls: Any
    args: dict = field(default_factory=dict)
    file: str | None = None
    sha256: str | None = None
    builtin: str | None = None  # the built-in name it was given by, if any

    @property
    def config_key(self) -> str:
        """The experiment key it is set by (``scheduler.order``)."""
        return FAMILIES[self.family].key

    def make(self) -> Any:
        """A fresh instance (one per engine and run: a stateful policy starts clean)."""
        return self.cls(**self.args)

    def provenance(self) -> dict:
        out = {"class": self.ref, "args": dict(self.args), "file": self.file, "sha256": self.sha256}
        if self.builtin is not None:
            out["builtin"] = self.builtin
        return out


def parse_ref(value: "str | PolicyRef | dict") -> PolicyRef | None:
    """The reference in a policy key's value, or None for a built-in name."""
    if isinstance(value, PolicyRef):
        return value
    if isinstance(value, dict):
        return PolicyRef.model_validate(value)
    if isinstance(value, str) and ":" in value:
        return PolicyRef(class_=value)
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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _local_file(modname: str, base_dir: Path | None) -> Path | None:
    if base_dir is None:
        return None
    rel = Path(*modname.split("."))
    for cand in (base_dir / rel.with_suffix(".py"), base_dir / rel / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _import(modname: str, base_dir: Path | None, key: str):
    local = _local_file(modname, base_dir)
    if modname.endswith(".py"):  # a file path
        local = (Path(base_dir or Path.cwd()) / Path(modname).expanduser()).resolve()
        if not local.is_file():
            raise ConfigError(f"policy file not found: {local}", key)
        modname = f"_servesim_policy_{local.stem}_{hashlib.sha256(str(local).encode()).hexdigest()[:10]}"
    try:
        if local is not None and "." not in modname:
            # a file next to the experiment: (re)loaded when it is not the module already
            # imported under this name, or it changed since (a notebook edits and reruns)
            sha = _sha256(local)
            mod = sys.modules.get(modname)
            if (mod is not None and getattr(mod, "__file__", None)
                    and Path(mod.__file__).resolve() == local.resolve()
                    and getattr(mod, "__servesim_sha256__", None) == sha):
                return mod
            spec = importlib.util.spec_from_file_location(modname, local)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[modname] = mod
            try:
                spec.loader.exec_module(mod)
            except BaseException:
                sys.modules.pop(modname, None)
                raise
            mod.__servesim_sha256__ = sha
            return mod
        added = base_dir is not None and str(base_dir) not in sys.path
        if added:
            sys.path.insert(0, str(base_dir))
        try:
            return importlib.import_module(modname)
        finally:
            if added:
                sys.path.remove(str(base_dir))
    except ModuleNotFoundError as e:
        if e.name == modname or modname.startswith(f"{e.name}."):
            raise ConfigError(f"module {modname!r} not found (looked next to the experiment, in "
                              f"{base_dir or Path.cwd()}, and on sys.path)", key) from None
        raise ConfigError(f"module {modname!r} failed to import: {e}", key) from None
    except ConfigError:
        raise
    except Exception as e:  # the user's module raised while importing
        raise ConfigError(f"module {modname!r} failed to import: {type(e).__name__}: {e}", key) from None


def _source(cls: Any) -> tuple[str | None, str | None]:
    """(source file, sha256 of it) of a class; the file's bytes are what a run ran."""
    try:
        f = inspect.getsourcefile(cls)
    except TypeError:
        f = None
    if f is None or not Path(f).is_file():
        try:
            return None, hashlib.sha256(inspect.getsource(cls).encode()).hexdigest()
        except (OSError, TypeError):
            return None, None
    return str(Path(f).resolve()), _sha256(Path(f))


def _check_members(policy: Any, protocol: type, ref: str, key: str) -> None:
    members = protocol_members(protocol)
    missing = [m for m in members if not hasattr(policy, m)]
    if missing:
        raise ConfigError(f"{ref} does not satisfy {protocol.__name__}: missing "
                          + ", ".join(missing) + f" (the Protocol declares {', '.join(members)})", key)
    for m in members:
        want = getattr(protocol, m, None)
        if not callable(want):
            continue
        have = getattr(policy, m)
        if not callable(have):
            raise ConfigError(f"{ref}.{m} must be a method ({protocol.__name__}.{m})", key)
        params = [p for p in inspect.signature(want).parameters.values() if p.name != "self"]
        try:
            inspect.signature(have).bind(*[None] * len(params))
        except TypeError:
            raise ConfigError(f"{ref}.{m} must take ({', '.join(p.name for p in params)}) like "
                              f"{protocol.__name__}.{m}; it is {m}{inspect.signature(have)}", key) from None
        except ValueError:
            pass  # no signature to read (a builtin): let the call decide


def load_policy(value: "str | PolicyRef | dict", family: str, key: str | None = None,
                base_dir: Path | None = None, builtin_args: dict | None = None) -> LoadedPolicy:
    """The policy class a key names, checked: a built-in name resolves to its class and is
    then treated as any ``module:Class``. `builtin_args`: constructor arguments a built-in
    takes from other settings (a fixed chunk's ``chunk_size``). `key`: where the value was
    written (default: the family's key), for every error."""
    fam = FAMILIES[family]
    key = key or fam.key
    protocol = fam.protocol_class()
    try:
        ref = parse_ref(value)
    except Exception as e:
        raise ConfigError(f"expected a built-in name, module:Class or {{class, args}}: {e}", key) from None
    builtin = None
    if ref is None or ":" not in ref.class_:  # a built-in's name (with args in {class, args})
        name = value if ref is None else ref.class_
        classes = fam.builtin_classes()
        if name not in classes:
            raise ConfigError(f"unknown {family} policy {name!r}: a built-in ({', '.join(classes)}) or "
                              "module:Class", key)
        c = classes[name]
        builtin = name
        args = dict(builtin_args or {}) if ref is None else {**(builtin_args or {}), **ref.args}
        ref = PolicyRef(class_=f"{c.__module__}:{c.__qualname__}", args=args)
    modname, _, attr = ref.class_.rpartition(":")
    obj: Any = _import(modname, base_dir, key)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"module {modname!r} ({getattr(obj, '__file__', '?')}) has no attribute {attr!r}", key)
        obj = getattr(obj, part)
    if not inspect.isclass(obj):  # (a function of some module is not called: `os:system`)
        raise ConfigError(f"{ref.class_} is a {type(obj).__name__}, not a class", key)
    try:
        inspect.signature(obj).bind(**ref.args)
    except TypeError as e:
        raise ConfigError(f"{ref.class_} does not take args {sorted(ref.args)}: {e} "
                          f"(its constructor: {obj.__name__}{inspect.signature(obj)})", key) from None
    except ValueError:
        pass  # no signature (a builtin): let the call decide
    try:
        policy = obj(**ref.args)
    except Exception as e:
        raise ConfigError(f"{ref.class_}(**args) raised {type(e).__name__}: {e}", key) from None
    _check_members(policy, protocol, ref.class_, key)
    f, sha = _source(obj)
    return LoadedPolicy(family, key, ref.class_, obj, dict(ref.args), f, sha, builtin)


def find_family(value: "str | PolicyRef | dict", base_dir: Path | None, where: str) -> str:
    """The family whose Protocol a policy satisfies (ConfigError when none or several)."""
    fits, why = [], []
    for name in FAMILIES:
        try:
            load_policy(value, name, where, base_dir)
            fits.append(name)
        except ConfigError as e:
            msg = e.problems[0][1]
            if "not found" in msg or "failed to import" in msg or "has no attribute" in msg:
                raise
            why.append(f"{name}: {msg}")
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise ConfigError("it satisfies no policy family's Protocol:\n    " + "\n    ".join(why), where)
    raise ConfigError(f"it satisfies several families ({', '.join(fits)}): give --family", where)


# ---------------------------------------------------------------------------------------
# a run's policies


def run_policy_values(cfg) -> dict[str, tuple[Any, dict]]:
    """family -> (the value its key holds, the arguments a built-in takes from other
    settings) for a RunConfig."""
    s = cfg.scheduler
    out: dict[str, tuple[Any, dict]] = {
        "capacity": (s.capacity, {}),
        "order": (s.order, {}),
        "preemption": (s.preemption_victim, {}),
        "eviction": (cfg.kv_cache.eviction, {}),
        "router": (cfg.cluster.router, router_builtin_args(cfg, cfg.cluster.router)),
    }
    if s.chunking is not None:
        out["chunking"] = (s.chunking, {})
    elif not s.enable_chunked_context:
        out["chunking"] = ("none", {})
    elif s.chunk_size is None:
        out["chunking"] = ("fill_budget", {})
    else:
        out["chunking"] = ("fixed", {"chunk_size": s.chunk_size})
    sp = cfg.speculative
    if sp is not None and sp.max_draft_len:
        out["draft"] = (sp.draft_policy, {"name": sp.proposer, "max_draft_len": sp.max_draft_len,
                                          "tree_nodes": sp.tree_nodes if sp.proposer == "eagle" else 0})
    return out


def router_builtin_args(cfg, value) -> dict:
    """The arguments a built-in router takes from other settings (prefix_aware's load bound)."""
    if value == "prefix_aware":
        pa = cfg.cluster.prefix_aware
        return {"load_factor": pa.load_factor, "slack_tokens": pa.slack_tokens}
    return {}


def load_run_policies(cfg, base_dir: Path | None, where: str = "") -> dict[str, LoadedPolicy]:
    """Every policy of a run, loaded and checked (one ConfigError with every problem)."""
    out: dict[str, LoadedPolicy] = {}
    problems: list[tuple[str, str]] = []
    for family, (value, bargs) in run_policy_values(cfg).items():
        try:
            out[family] = load_policy(value, family, f"{where}{FAMILIES[family].key}", base_dir, bargs)
        except ConfigError as e:
            problems.extend(e.problems)
    if not problems:
        cap = out["capacity"].make()
        if cfg.scheduler.preemption == "swap" and not cap.pauses_on_shortage:
            problems.append((f"{where}scheduler.preemption", f"swap needs a capacity policy that pauses requests "
                             f"(pauses_on_shortage); {out['capacity'].ref} never does"))
    if problems:
        raise ConfigError(problems)
    return out
