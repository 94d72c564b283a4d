"""Print the configuration reference (Markdown) from the pydantic models' descriptions.

    python -m servesim.sim.config_doc > docs/config_reference.md
"""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel

from .config import RunConfig


def _type_name(t) -> str:
    origin = typing.get_origin(t)
    if origin is typing.Literal:
        return " \\| ".join(repr(a).replace("'", "") for a in typing.get_args(t))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(t))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(t)[0])
    if origin in (list, tuple, dict):
        return getattr(origin, "__name__", str(origin))
    if t is type(None):
        return "null"
    if isinstance(t, type) and issubclass(t, BaseModel):
        return "mapping"
    return getattr(t, "__name__", str(t))


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    out = []
    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = f.annotation
        sub = None
        for cand in (ann, *typing.get_args(ann)):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                sub = cand
                break
        if f.is_required():
            default = "required"
        elif f.default_factory is not None:
            default = "(section)" if sub else "[]"
        else:
            default = "null" if f.default is None else repr(f.default).replace("'", "")
        if sub is not None and typing.get_origin(ann) is None:
            out.append((key, "mapping", default, f.description or ""))
            out.extend(rows(sub, key + "."))
        else:
            out.append((key, _type_name(ann), default, (f.description or "").replace("|", "\\|")))
    return out


def markdown() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, typ, default, desc in rows(RunConfig):
        if key == "workload":
            desc = "what requests arrive when; see *Workloads* below"
            lines.append(f"| `{key}` | mapping | required | {desc} |")
            continue
        if key.startswith("workload."):
            continue
        lines.append(f"| `{key}` | {typ} | {default} | {desc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
