"""YAML reading and writing shared by the configuration files and the calibration profiles.

Reading uses libyaml's C parser where PyYAML was built with it (``yaml.CSafeLoader``,
several times faster than the pure-Python parser; both build the same Python objects with
the same safe constructor), else the pure-Python ``yaml.SafeLoader``. Errors are PyYAML's
own ``yaml.YAMLError`` either way (with ``problem_mark`` where the parser knows the line).
"""

from __future__ import annotations

import yaml

SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def safe_load(text: str):
    """``yaml.safe_load`` through the fastest safe loader available."""
    return yaml.load(text, Loader=SafeLoader)  # noqa: S506 - a safe loader (CSafeLoader or SafeLoader)


class _FlowListDumper(yaml.SafeDumper):
    """A SafeDumper that writes a list of plain numbers or strings on one line
    (``tokens: [1, 2, 4]``): long numeric series stay readable and short."""


def _represent_list(dumper: yaml.SafeDumper, data: list):
    flow = bool(data) and all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowListDumper.add_representer(list, _represent_list)


def dump_readable(doc) -> str:
    """``doc`` as block-style YAML with short lists of scalars on one line, keys in their
    order; loads back to an equal object (floats are written with ``repr``, exactly)."""
    return yaml.dump(doc, Dumper=_FlowListDumper, sort_keys=False, default_flow_style=False, width=120)
