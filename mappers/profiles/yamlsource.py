"""YAML with line numbers: so every profile problem names ``file:line: path``.

PyYAML's composer keeps a start mark on every node; :func:`load_yaml_with_lines` composes
the node tree once, builds the data from it, and records the 1-based line of every mapping
key and sequence item by its path (``("items", 3, "options", 0, "code")``). It parses with
libyaml (``yaml.CSafeLoader``, about ten times faster) when PyYAML was built with it, and
with the pure-Python ``yaml.SafeLoader`` otherwise; both keep the marks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

Path_ = tuple[Any, ...]

#: The safe loader: libyaml's when available (same tags and marks, ~10x faster).
SAFE_LOADER: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = getattr(
    yaml, "CSafeLoader", yaml.SafeLoader
)


@dataclass
class YamlSource:
    """A parsed YAML document and the line of each path in it."""

    data: Any
    lines: dict[Path_, int] = field(default_factory=dict)

    def line_of(self, path: Path_) -> int | None:
        """The line of ``path``, or of its nearest ancestor that has one."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.lines.get((), None)


class YamlSyntaxError(ValueError):
    """Invalid YAML; ``line`` is 1-based (None when PyYAML gave no position)."""

    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.line = line


def load_yaml_with_lines(text: str | bytes) -> YamlSource:
    """Parse one YAML document (safe loader) and index the line of every path.

    The text is parsed once: the composed node tree gives both the data (the safe
    constructor, as ``yaml.safe_load``) and the lines.

    Raises:
        YamlSyntaxError: with the line of the problem.
    """
    loader = SAFE_LOADER(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise YamlSyntaxError(
            f"invalid YAML ({getattr(exc, 'problem', None) or exc})",
            mark.line + 1 if mark is not None else None,
        ) from exc
    finally:
        loader.dispose()
    source = YamlSource(data=data)
    if node is not None:
        source.lines[()] = node.start_mark.line + 1
        _index(node, (), source.lines)
    return source


def _index(node: yaml.Node, path: Path_, lines: dict[Path_, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            here = (*path, key)
            lines[here] = key_node.start_mark.line + 1
            _index(value_node, here, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, child in enumerate(node.value):
            here = (*path, i)
            lines[here] = child.start_mark.line + 1
            _index(child, here, lines)


def format_path(path: Path_) -> str:
    """``("items", 3, "options", 0)`` -> ``items[3].options[0]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
