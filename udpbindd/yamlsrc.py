"""Strict YAML reading: text → a tree of plain values that remember their line numbers.

Owns the YAML layer under ``config.py``: syntax errors, duplicate keys (PyYAML silently keeps
the last), merge keys, tags, alias loops and alias bombs all become one-line ``Problem`` items.
Also owns where the entries of a block sequence lie in the text (``block_entries``), so that
a reload can read again only the entries whose text changed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Protocol

import yaml
from yaml.constructor import SafeConstructor
from yaml.events import (
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

# Configs nest four levels deep; anything near these limits is a mistake or an attack.
MAX_DEPTH = 64
MAX_VALUES = 1_000_000
# Digits of a plain integer read without the resolver (see _EventBuilder.scalar).
_SHORT_INT = 18

_TAG_PREFIX = "tag:yaml.org,2002:"
_STR_TAG = _TAG_PREFIX + "str"
_MAP_TAG = _TAG_PREFIX + "map"
_SEQ_TAG = _TAG_PREFIX + "seq"
_MERGE_TAG = _TAG_PREFIX + "merge"
_SCALAR_TAGS = frozenset(
    _TAG_PREFIX + name for name in ("str", "int", "float", "bool", "null", "timestamp", "binary")
)
# Line breaks libyaml knows besides "\n": a text holding one is never split into lines here.
_OTHER_BREAKS = ("\r", "\x85", "\u2028", "\u2029")


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


# Not frozen: a file with 10,000 listeners makes over 100,000 of these, and a frozen
# dataclass takes three times as long to build. Nothing changes one once it is built.
@dataclass(slots=True)
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


@dataclass(frozen=True, slots=True)
class Document:
    """One parsed document: its tree, its problems, and what a reload may reuse of it.

    ``plain`` is True when the document has no anchor, alias, explicit tag or merge key, so
    each part of it means the same wherever it stands. ``values`` counts its values.
    """

    root: Item | None
    problems: list[Problem]
    plain: bool
    values: int


@dataclass(frozen=True, slots=True)
class Stream:
    """Hands each entry of the list under ``key``, at the top level, to ``take`` once it is read.

    The list keeps what ``take`` returns in its place, so a caller can check a long list
    entry by entry and the tree of the whole list never exists at once. ``take`` gets the
    entry and its index. Only a plain document is streamed (see ``read_plain``).
    """

    key: str
    take: Callable[[Item, int], Item]


def parse(text: str, source: str) -> tuple[Item | None, list[Problem]]:
    """Parse one YAML document into an ``Item`` tree, collecting every problem on the way.

    A syntax error is returned as the only problem. An empty document gives ``None``.
    """
    document = read(text, source)
    return document.root, document.problems


def read(text: str, source: str, stream: Stream | None = None) -> Document:
    """``parse``, and whether the document is plain (see ``Document``)."""
    plain = read_plain(text, source, stream=stream)
    if plain is not None:
        return plain
    try:
        node = _compose(text)
    except yaml.MarkedYAMLError as error:
        return Document(None, [_syntax_problem(error, source)], False, 0)
    except yaml.reader.ReaderError as error:
        line = text.count("\n", 0, error.position) + 1
        character = f"U+{error.character:04X}" if isinstance(error.character, int) else "?"
        message = f"invalid YAML: character {character} is not allowed"
        return Document(None, [Problem(source, line, "", message)], False, 0)
    except yaml.YAMLError as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        return Document(None, [Problem(source, 0, "", f"invalid YAML: {first}")], False, 0)
    except RecursionError:
        return Document(None, [Problem(source, 0, "", "invalid YAML: nested too deeply")], False, 0)
    if node is None:
        return Document(None, [], False, 0)
    builder = _Builder(source)
    return Document(builder.convert(node, "", 0), builder.problems, False, builder.count)


def read_plain(
    text: str, source: str, *, first_line: int = 1, depth: int = 0, stream: Stream | None = None
) -> Document | None:
    """Read a plain document straight from the parser's events, or ``None`` if it is not one.

    Builds the same tree as ``read`` without composing nodes first (several times faster).
    ``None`` means the document has a syntax error, more than one document, an anchor, an
    alias, an explicit tag or a merge key, or is near a limit: ``read`` handles all of those.
    ``first_line`` is the line the text starts on and ``depth`` the depth of its root, for
    reading part of a file. ``stream`` may have taken some entries even when the answer is
    ``None``.
    """
    try:
        loader = _loader(text)
    except yaml.YAMLError:
        return None
    try:
        return _EventBuilder(loader, source, first_line - 1, depth, stream).document()
    except (_NotPlain, yaml.YAMLError, RecursionError):
        return None
    finally:
        loader.dispose()


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
        elif node.tag != _STR_TAG:
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


# ---------------------------------------------------------------------------------------------
# Plain documents, straight from the parser's events


class _Loader(Protocol):
    """What both PyYAML loaders (libyaml's and the pure-Python one) offer at the event level."""

    yaml_path_resolvers: dict[Any, Any]

    def get_event(self) -> Any: ...

    def resolve(self, kind: type[Node], value: str | None, implicit: Any) -> str: ...

    def dispose(self) -> None: ...


def _loader(text: str) -> _Loader:
    fast = getattr(yaml, "CSafeLoader", None)
    loader: _Loader = (fast or yaml.SafeLoader)(text)
    return loader


class _NotPlain(Exception):
    """The document needs the node-based builder: it is not plain, or it is near a limit."""


class _Refused:
    """A plain scalar that cannot be a value, and why (e.g. "unsupported tag !!merge")."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


_UNSEEN = object()


class _EventBuilder:
    """Builds the ``Item`` tree of a plain document from parser events, without nodes.

    Makes the same tree and problems, in the same order, as composing and then ``_Builder``:
    a document that needs more raises ``_NotPlain``. Each distinct plain scalar is resolved
    and constructed once, and equal strings are shared.
    """

    def __init__(
        self, loader: _Loader, source: str, line_offset: int, depth: int, stream: Stream | None
    ) -> None:
        if loader.yaml_path_resolvers:
            raise _NotPlain  # tags that depend on a value's place in the document
        self.next: Callable[[], Any] = loader.get_event
        self.resolve = loader.resolve
        self.source = source
        self.line_offset = line_offset + 1
        self.depth = depth
        self.stream = stream
        self.problems: list[Problem] = []
        self.count = 0
        # The key or index of each open mapping or list, outermost first: problems' paths.
        self.trail: list[str | int] = []
        self.scalars: dict[str, object] = {}  # plain scalar text → its value, or _Refused
        self.quoted: dict[str, str] = {}
        self.key_tags: dict[str, str] = {}  # plain key text → its resolved tag
        self.constructor: SafeConstructor | None = None

    def document(self) -> Document:
        self.next()  # stream start
        event = self.next()
        if type(event) is StreamEndEvent:
            return Document(None, [], True, 0)
        root = self.value(self.next(), self.depth, 0)
        self.next()  # document end
        if type(self.next()) is not StreamEndEvent:
            raise _NotPlain  # a second document: the composer words that error
        return Document(root, self.problems, True, self.count)

    def value(self, event: Any, depth: int, key_line: int) -> Item:
        """The value that starts with ``event``, with everything in it."""
        if depth > MAX_DEPTH:
            raise _NotPlain
        self.count += 1
        if self.count > MAX_VALUES:
            raise _NotPlain
        kind = type(event)
        if kind is ScalarEvent:
            return self.scalar(event, key_line)
        if event.anchor is not None or event.tag is not None:
            raise _NotPlain
        line = event.start_mark.line + self.line_offset
        if kind is MappingStartEvent:
            return Item(self.mapping(depth + 1), line, key_line)
        if kind is SequenceStartEvent:
            return Item(self.sequence(depth + 1), line, key_line)
        raise _NotPlain  # an alias

    def sequence(self, depth: int) -> list[Item]:
        items: list[Item] = []
        trail = self.trail
        level = len(trail)
        stream = self.stream
        take = stream.take if stream is not None and trail == [stream.key] else None
        trail.append(0)
        event = self.next()
        while type(event) is not SequenceEndEvent:
            index = trail[level] = len(items)
            item = self.value(event, depth, 0)
            items.append(item if take is None else take(item, index))
            event = self.next()
        trail.pop()
        return items

    def mapping(self, depth: int) -> dict[str, Item]:
        """A mapping's pairs; a refused key has its value skipped, as ``_Builder`` does."""
        items: dict[str, Item] = {}
        trail = self.trail
        level = len(trail)
        trail.append("")
        event = self.next()
        while type(event) is not MappingEndEvent:
            line = event.start_mark.line + self.line_offset
            key = self.key(event, line, items, level)
            event = self.next()
            if key is None:
                self.skip(event)
            elif type(event) is ScalarEvent and depth <= MAX_DEPTH and self.count < MAX_VALUES:
                # The commonest value by far, read here rather than through value().
                self.count += 1
                trail[level] = key
                items[key] = self.scalar(event, line)
            else:
                trail[level] = key
                items[key] = self.value(event, depth, line)
            event = self.next()
        trail.pop()
        return items

    def key(self, event: Any, line: int, items: dict[str, Item], level: int) -> str | None:
        kind = type(event)
        if kind is not ScalarEvent:
            if kind is not SequenceStartEvent and kind is not MappingStartEvent:
                raise _NotPlain  # an alias
            what = "a list" if kind is SequenceStartEvent else "a mapping"
            self.problem(
                line, self.path(level) or "(top level)", f"keys must be plain strings, not {what}"
            )
            self.skip(event)
            return None
        if event.anchor is not None or event.tag is not None:
            raise _NotPlain
        text: str = event.value
        tag = _STR_TAG
        if event.implicit[0]:
            tag = self.key_tags.get(text) or self.key_tags.setdefault(
                text, self.resolve(ScalarNode, text, event.implicit)
            )
        if tag == _MERGE_TAG:
            raise _NotPlain
        if tag != _STR_TAG:
            where = self.path(level) or "(top level)"
            self.problem(line, where, f"key {text!r} reads as {_tag(tag)}, not a string")
            return None
        if text in items:
            path = self.path(level)
            first = items[text].key_line
            self.problem(
                line,
                f"{path}.{text}" if path else text,
                f"duplicate key (first given on line {first})",
            )
            return None
        return text

    def scalar(self, event: Any, key_line: int) -> Item:
        if event.anchor is not None or event.tag is not None:
            raise _NotPlain
        text: str = event.value
        line = event.start_mark.line + self.line_offset
        if not event.implicit[0]:
            # Quoted: always a string. Equal strings are shared: a Listener keeps some.
            return Item(self.quoted.setdefault(text, text), line, key_line)
        if len(text) <= _SHORT_INT and text.isdigit() and text.isascii() and text[0] != "0":
            # A plain decimal integer, as YAML 1.1 resolves it (a leading 0 means octal): the
            # commonest value that is seldom repeated (a port), so it is not kept in the cache,
            # where 10,000 distinct ports would leave their texts until the file is read.
            # Longer digit strings take the constructor's way, which refuses what int() cannot
            # convert (over 4,300 digits) with a problem rather than an exception.
            return Item(int(text), line, key_line)
        value = self.scalars.get(text, _UNSEEN)
        if value is _UNSEEN:
            value = self.scalars[text] = self.construct(text, event.implicit)
        if type(value) is _Refused:
            self.problem(line, self.path(len(self.trail)), value.message)
            return Item(INVALID, line, key_line)
        return Item(value, line, key_line)

    def construct(self, text: str, implicit: tuple[bool, bool]) -> object:
        tag = self.resolve(ScalarNode, text, implicit)
        if tag == _STR_TAG:
            return text
        if tag not in _SCALAR_TAGS:
            return _Refused(f"unsupported tag {_tag(tag)}")
        if self.constructor is None:
            self.constructor = SafeConstructor()
        try:
            return self.constructor.construct_object(ScalarNode(tag, text), deep=True)
        except (yaml.YAMLError, ValueError, TypeError, KeyError, OverflowError):
            return _Refused(f"{text!r} is not a valid {_tag(tag)}")
        finally:
            # The constructor keeps every node it built, for aliases (a plain document has
            # none): forgotten at once, rather than each one kept until the file is read.
            self.constructor.constructed_objects.clear()

    def skip(self, event: Any) -> None:
        """Read past the value that starts with ``event``, as ``_Builder`` never looks at it."""
        level = 0
        while True:
            kind = type(event)
            if kind is SequenceEndEvent or kind is MappingEndEvent:
                level -= 1
            elif event.anchor is not None or getattr(event, "tag", None) is not None:
                raise _NotPlain  # an anchor or tag another part may rely on
            elif kind is SequenceStartEvent or kind is MappingStartEvent:
                level += 1
            elif kind is not ScalarEvent:
                raise _NotPlain  # an alias, which may be undefined
            if level == 0:
                return
            event = self.next()

    def problem(self, line: int, path: str, message: str) -> None:
        self.problems.append(Problem(self.source, line, path, message))

    def path(self, levels: int) -> str:
        """The key path, as ``_Builder`` spells it, of what the first ``levels`` levels hold."""
        path = ""
        for part in self.trail[:levels]:
            if isinstance(part, int):
                path = f"{path}[{part}]"
            else:
                path = f"{path}.{part}" if path else part
        return path


# ---------------------------------------------------------------------------------------------
# Where a block sequence's entries lie in the text


@dataclass(frozen=True, slots=True)
class Entries:
    """The entries of a block sequence, as lines of text.

    Each entry starts on a line that holds its ``-`` at ``column``, after spaces only, and runs
    until the next such line; its other lines are more indented, blank or comments. ``starts``
    holds the offset of each entry's first line, and ``end`` that of the first line after the
    last entry (a line less indented, or at ``column`` with no ``-``) or the text's length.
    """

    column: int
    starts: list[int]
    end: int


@lru_cache(maxsize=16)
def _layout(column: int) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """The patterns of the line break before an entry's first line, and before a line that is
    in no entry. Each starts with a line break, which the regex engine finds fast."""
    dash = f" {{{column}}}-(?:[ \\n]|\\Z)"
    first = re.compile(f"\\n(?={dash})")
    outside = re.compile(f"\\n(?! {{{column + 1}}}| *(?:[#\\n]|\\Z)|{dash})")
    return first, outside


def block_entries(
    text: str, start: int, end: int | None = None, *, column: int | None = None
) -> Entries | None:
    """The entries of a block sequence whose first entry starts on the line at ``start``.

    Reads lines only, never YAML: the caller checks that the parser agrees. ``None`` when the
    line at ``start`` does not start an entry (at ``column``, if given), or when ``end`` is
    given and a line before it is in no entry. ``text`` must be ``lines_only``.
    """
    line_end = text.find("\n", start)
    line = text[start : len(text) if line_end < 0 else line_end]
    indent = len(line) - len(line.lstrip(" "))
    if line[indent : indent + 1] != "-" or line[indent + 1 : indent + 2] not in ("", " "):
        return None
    if column is not None and indent != column:
        return None
    first, outside = _layout(indent)
    limit = len(text) if end is None else end
    stop = outside.search(text, start, limit)
    if stop is not None:
        if end is not None:
            return None
        limit = stop.start() + 1
    starts = [start, *(match.start() + 1 for match in first.finditer(text, start, limit))]
    return Entries(indent, starts, limit)


def lines_only(text: str) -> bool:
    """True when ``\\n`` is the only line break in ``text``, as libyaml reads it."""
    return not any(mark in text for mark in _OTHER_BREAKS)
