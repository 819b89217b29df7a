"""Strict YAML reading: text → a tree of plain values that remember their line numbers.

Owns the YAML layer under ``config.py``: syntax errors, duplicate keys (PyYAML silently keeps
the last), merge keys, tags, alias loops and alias bombs all become one-line ``Problem`` items.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

# Configs nest four levels deep; anything near these limits is a mistake or an attack.
MAX_DEPTH = 64
MAX_VALUES = 1_000_000

_TAG_PREFIX = "tag:yaml.org,2002:"
_MAP_TAG = _TAG_PREFIX + "map"
_SEQ_TAG = _TAG_PREFIX + "seq"
_MERGE_TAG = _TAG_PREFIX + "merge"
_SCALAR_TAGS = frozenset(
    _TAG_PREFIX + name for name in ("str", "int", "float", "bool", "null", "timestamp", "binary")
)


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a configuration file, located by line and key path.

    ``line`` is 0 when the problem is with the file as a whole (missing, not text, empty).
    """

    source: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class _Invalid:
    """The value of a node that could not be read; its problem is already reported."""

    def __repr__(self) -> str:
        return "<invalid>"


INVALID: object = _Invalid()


@dataclass(frozen=True, slots=True)
class Item:
    """A YAML value with the 1-based line it starts on, and the line of its key if it has one.

    ``value`` is a ``dict[str, Item]``, a ``list[Item]``, a scalar (str, int, float, bool,
    None, or another YAML scalar type such as a date), or ``INVALID`` when the node could not
    be read (its problem is already in the list; checkers should not add another).
    """

    value: object
    line: int
    key_line: int = 0

    @property
    def where(self) -> int:
        """The line a problem with this value points at: its key's, else its own."""
        return self.key_line or self.line


def parse(text: str, source: str) -> tuple[Item | None, list[Problem]]:
    """Parse one YAML document into an ``Item`` tree, collecting every problem on the way.

    A syntax error is returned as the only problem. An empty document gives ``None``.
    """
    try:
        node = _compose(text)
    except yaml.MarkedYAMLError as error:
        return None, [_syntax_problem(error, source)]
    except yaml.reader.ReaderError as error:
        line = text.count("\n", 0, error.position) + 1
        character = f"U+{error.character:04X}" if isinstance(error.character, int) else "?"
        return None, [
            Problem(source, line, "", f"invalid YAML: character {character} is not allowed")
        ]
    except yaml.YAMLError as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        return None, [Problem(source, 0, "", f"invalid YAML: {first}")]
    except RecursionError:
        return None, [Problem(source, 0, "", "invalid YAML: nested too deeply")]
    if node is None:
        return None, []
    builder = _Builder(source)
    return builder.convert(node, "", 0), builder.problems


def _compose(text: str) -> Node | None:
    """Compose with libyaml when present (ten times faster on files with 10,000 listeners).

    On any error the pure-Python composer runs again, so every message reads the same with or
    without libyaml.
    """
    fast = getattr(yaml, "CSafeLoader", None)
    if fast is not None:
        try:
            return yaml.compose(text, Loader=fast)
        except (yaml.YAMLError, RecursionError):
            pass
    return yaml.compose(text, Loader=yaml.SafeLoader)


def _syntax_problem(error: yaml.MarkedYAMLError, source: str) -> Problem:
    mark = error.problem_mark or error.context_mark
    line = mark.line + 1 if mark is not None else 0
    problem = (error.problem or "syntax error").strip()
    context = (error.context or "").strip()
    if context == "while scanning an alias":
        # "interface: *" is the commonest way to meet this: '*' starts an alias in YAML.
        message = 'a bare * starts a YAML alias; quote the wildcard as "*"'
    elif problem.startswith("found undefined alias"):
        message = f"{problem} (a bare * starts a YAML alias; quote text that begins with *)"
    elif problem == "mapping values are not allowed here":
        message = f"{problem} (is the indentation right, or a ': ' inside unquoted text?)"
    elif context == "expected a single document in the stream":
        message = "a second document starts here (---); the file must hold exactly one"
    elif context:
        where = f" on line {error.context_mark.line + 1}" if error.context_mark else ""
        message = f"{problem} ({context}{where})"
    else:
        message = problem
    return Problem(source, line, "", f"invalid YAML: {message}")


def _tag(tag: str) -> str:
    return "!!" + tag.removeprefix(_TAG_PREFIX) if tag.startswith(_TAG_PREFIX) else tag


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _describe(node: Node) -> str:
    if isinstance(node, ScalarNode):
        return f"{node.value!r}"
    return "a list" if isinstance(node, SequenceNode) else "a mapping"


class _Builder:
    """Converts composed nodes to ``Item`` values once each, so aliases cost nothing extra."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []
        self.constructor = SafeConstructor()
        self.done: dict[int, Item] = {}
        self.active: set[int] = set()
        self.count = 0
        self.too_many = False

    def problem(self, node: Node, path: str, message: str) -> Item:
        self.problems.append(Problem(self.source, _line(node), path, message))
        return Item(INVALID, _line(node))

    def convert(self, node: Node, path: str, depth: int) -> Item:
        # An alias is the very same node object, so the first conversion serves every use.
        key = id(node)
        if key in self.done:
            return self.done[key]
        if key in self.active:
            return self.problem(node, path, "an alias refers to a value that contains it")
        if depth > MAX_DEPTH:
            return self.problem(node, path, f"nested more than {MAX_DEPTH} levels deep")
        self.count += 1
        if self.count > MAX_VALUES:
            if self.too_many:
                return Item(INVALID, _line(node))
            self.too_many = True
            return self.problem(node, path, f"more than {MAX_VALUES} values")
        self.active.add(key)
        try:
            item = self._convert(node, path, depth)
        finally:
            self.active.discard(key)
        self.done[key] = item
        return item

    def _convert(self, node: Node, path: str, depth: int) -> Item:
        if isinstance(node, ScalarNode):
            return self.scalar(node, path)
        if isinstance(node, SequenceNode):
            if node.tag != _SEQ_TAG:
                return self.problem(node, path, f"unsupported tag {_tag(node.tag)} on a list")
            items = [
                self.convert(child, f"{path}[{index}]", depth + 1)
                for index, child in enumerate(node.value)
            ]
            return Item(items, _line(node))
        if isinstance(node, MappingNode):
            if node.tag != _MAP_TAG:
                return self.problem(node, path, f"unsupported tag {_tag(node.tag)} on a mapping")
            return Item(self.mapping(node, path, depth), _line(node))
        return self.problem(node, path, "unsupported YAML node")

    def scalar(self, node: ScalarNode, path: str) -> Item:
        if node.tag not in _SCALAR_TAGS:
            return self.problem(node, path, f"unsupported tag {_tag(node.tag)}")
        try:
            value = self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, KeyError, OverflowError):
            # PyYAML lets plain ValueErrors escape for input such as "!!int x".
            return self.problem(node, path, f"{node.value!r} is not a valid {_tag(node.tag)}")
        return Item(value, _line(node))

    def key(self, node: Node, path: str) -> str | None:
        where = path or "(top level)"
        if not isinstance(node, ScalarNode):
            self.problem(node, where, f"keys must be plain strings, not {_describe(node)}")
        elif node.tag != _TAG_PREFIX + "str":
            self.problem(node, where, f"key {node.value!r} reads as {_tag(node.tag)}, not a string")
        else:
            return str(node.value)
        return None

    def mapping(self, node: MappingNode, path: str, depth: int) -> dict[str, Item]:
        """The mapping's own keys over those merged in with ``<<``; own duplicates reported."""
        merged: dict[str, Item] = {}
        own: dict[str, Item] = {}
        own_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merge_path = f"{path}.<<" if path else "<<"
                if "<<" in own_lines:
                    self.problem(
                        key_node,
                        merge_path,
                        f"duplicate key (first given on line {own_lines['<<']})",
                    )
                    continue
                own_lines["<<"] = _line(key_node)
                for name, item in self.merge(value_node, path, merge_path, depth).items():
                    merged.setdefault(name, item)
                continue
            key = self.key(key_node, path)
            if key is None:
                continue
            child_path = f"{path}.{key}" if path else key
            if key in own_lines:
                self.problem(
                    key_node, child_path, f"duplicate key (first given on line {own_lines[key]})"
                )
                continue
            own_lines[key] = _line(key_node)
            value = self.convert(value_node, child_path, depth + 1)
            own[key] = replace(value, key_line=_line(key_node))
        return merged | own

    def merge(self, node: Node, path: str, merge_path: str, depth: int) -> dict[str, Item]:
        """The pairs a ``<<`` value brings: one mapping, or a list of them (earlier ones win)."""
        sources = node.value if isinstance(node, SequenceNode) else [node]
        result: dict[str, Item] = {}
        for source in sources:
            if not isinstance(source, MappingNode):
                self.problem(
                    source,
                    merge_path,
                    f"a merge takes a mapping or a list of mappings, not {_describe(source)}",
                )
                continue
            item = self.convert(source, path, depth + 1)
            if isinstance(item.value, dict):
                for name, child in item.value.items():
                    result.setdefault(name, child)
        return result
