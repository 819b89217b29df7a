"""Strict YAML reading: text → a tree of plain values that remember their line numbers.

PyYAML silently keeps the last of two equal keys; here every duplicate is a ``Problem``. The
tree is built from PyYAML's composed nodes, so every value, key and item carries its line.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a configuration file, located by line and key path."""

    source: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


@dataclass(frozen=True, slots=True)
class Item:
    """A YAML value with the 1-based line it starts on.

    ``value`` is a ``dict[str, Item]``, a ``list[Item]`` or a scalar (str, int, float, bool,
    None, or another YAML scalar type such as a date).
    """

    value: object
    line: int


class _Constructor(SafeConstructor):
    """Builds scalars exactly as yaml.safe_load would (same tags, same implicit types)."""


def parse(text: str, source: str) -> tuple[Item | None, list[Problem]]:
    """Parse one YAML document into an ``Item`` tree, collecting duplicate-key problems.

    A syntax error is returned as the only problem. An empty document gives ``None``.
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else 0
        what = error.problem or "invalid YAML"
        return None, [Problem(source, line, "", f"invalid YAML: {what}")]
    except yaml.YAMLError as error:
        return None, [Problem(source, 0, "", f"invalid YAML: {error}")]
    if node is None:
        return None, []
    problems: list[Problem] = []
    return _convert(node, _Constructor(), source, "", problems), problems


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _convert(
    node: Node, constructor: _Constructor, source: str, path: str, problems: list[Problem]
) -> Item:
    if isinstance(node, ScalarNode):
        try:
            value = constructor.construct_object(node, deep=True)
        except yaml.YAMLError as error:
            problems.append(Problem(source, _line(node), path, f"invalid value: {error}"))
            value = None
        return Item(value, _line(node))
    if isinstance(node, SequenceNode):
        items = [
            _convert(child, constructor, source, f"{path}[{index}]", problems)
            for index, child in enumerate(node.value)
        ]
        return Item(items, _line(node))
    if isinstance(node, MappingNode):
        return Item(_mapping(node, constructor, source, path, problems), _line(node))
    problems.append(Problem(source, _line(node), path, "unsupported YAML node"))
    return Item(None, _line(node))


def _mapping(
    node: MappingNode, constructor: _Constructor, source: str, path: str, problems: list[Problem]
) -> dict[str, Item]:
    own = sum(1 for key, _ in node.value if key.tag != "tag:yaml.org,2002:merge")
    try:
        # Resolves '<<' merge keys in place; merged pairs come first, the mapping's own last.
        constructor.flatten_mapping(node)
    except yaml.YAMLError as error:
        problems.append(Problem(source, _line(node), path, f"invalid merge: {error}"))
        return {}
    first_own = len(node.value) - own
    result: dict[str, Item] = {}
    own_lines: dict[str, int] = {}
    for index, (key_node, value_node) in enumerate(node.value):
        key = constructor.construct_object(key_node) if isinstance(key_node, ScalarNode) else None
        if not isinstance(key, str):
            problems.append(
                Problem(
                    source, _line(key_node), path or "(top level)", "keys must be plain strings"
                )
            )
            continue
        child_path = f"{path}.{key}" if path else key
        if index >= first_own:
            if key in own_lines:
                problems.append(
                    Problem(
                        source,
                        _line(key_node),
                        child_path,
                        f"duplicate key (first given on line {own_lines[key]})",
                    )
                )
                continue
            own_lines[key] = _line(key_node)
        result[key] = _convert(value_node, constructor, source, child_path, problems)
    return result
