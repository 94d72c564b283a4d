"""YAML reading and writing shared by the configuration files and the calibration profiles.

Reading uses libyaml's C parser where PyYAML was built with it (``yaml.CSafeLoader``,
several times faster than the pure-Python parser; both build the same Python objects with
the same safe constructor), else the pure-Python ``yaml.SafeLoader``. Errors are PyYAML's
own ``yaml.YAMLError`` either way (with ``problem_mark`` where the parser knows the line).
A key written twice in one mapping is an error (:class:`SafeLoader`), not last-wins.
"""

from __future__ import annotations

import yaml

_BaseSafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping holds a key twice. ``duplicates``: ``(line, message)`` of every repeated
    key of the document (1-based lines); ``problem_mark`` is the first one's."""

    def __init__(self, duplicates: list[tuple[int, str]], mark):
        super().__init__(None, None, duplicates[0][1], mark)
        self.duplicates = duplicates


class SafeLoader(_BaseSafeLoader):
    """The safe loader, refusing a mapping that holds a key twice (YAML says keys are
    unique; PyYAML keeps the last silently): :func:`safe_load` raises
    :class:`DuplicateKeyError` naming each repeated key and its line. Keys brought in by a
    merge (``<<: *anchor``) may be overridden: only keys written in the mapping count."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=False)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the base constructor reports it
                    continue
                if first is not key_node.start_mark:
                    dups = self.__dict__.setdefault("_duplicates", [])
                    dups.append((key_node.start_mark, f"duplicate key {key!r} (first at line {first.line + 1}): "
                                 "each key may appear once in a mapping"))
        return super().construct_mapping(node, deep=deep)


def safe_load(text: str):
    """``yaml.safe_load`` through the fastest safe loader available; a key written twice in
    one mapping raises :class:`DuplicateKeyError` (every such key, after the whole document
    is read)."""
    loader = SafeLoader(text)
    try:
        data = loader.get_single_data()
    finally:
        loader.dispose()
    dups = loader.__dict__.get("_duplicates")
    if dups:
        dups.sort(key=lambda d: (d[0].line, d[0].column))
        raise DuplicateKeyError([(m.line + 1, msg) for m, msg in dups], dups[0][0])
    return data


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
