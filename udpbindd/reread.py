"""Reloads of a large file: read again only the listener entries whose text changed.

Owns what the last good read of a file left for the next one (the text, compressed, and where
each listener entry starts in it) and the comparison of a new text with it: the unchanged
text before and after the change is the very text read last time, so only the entries that
hold changed lines are read again and every other ``Listener`` is reused. Anything unusual
falls back to reading the whole file, so the result is always what a whole read gives.
Knows nothing of what a listener means: the caller hands in how to read a whole text and
one listener entry.
"""

from __future__ import annotations

import zlib
from array import array
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from udpbindd.yamlsrc import (
    MAX_VALUES,
    Document,
    Entries,
    Item,
    block_entries,
    lines_only,
    read_plain,
)

if TYPE_CHECKING:
    from udpbindd.config import Config, Listener


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The last file ``load`` read and found valid, kept for the next reload of that file.

    Kept only for a plain document (see ``yamlsrc.Document``) whose listeners are a block
    sequence, one entry per ``-`` line, and whose text has no line breaks but ``\\n``.
    ``starts`` and ``end`` are the listener entries' places in the text (``Entries``);
    ``values`` is at least the number of values in the file.
    """

    source: str
    packed: bytes  # the text, compressed: about a twentieth of its size
    column: int
    starts: array[int]
    end: int
    values: int
    config: Config


@dataclass(frozen=True, slots=True)
class Reuse:
    """A reload read by reuse: its configuration, and what the next reload may reuse."""

    config: Config
    snapshot: Snapshot


ReadAll = Callable[[str, str], "tuple[Document, Config]"]
ReadListener = Callable[[str, Item, str], "Listener | None"]


class Rereader:
    """Reads configuration texts, keeping what the next reload of the same file can reuse.

    ``read_all`` reads and checks a whole text (raising ``ConfigError`` with every problem);
    ``read_listener`` reads one listener entry on its own (``None`` if it has any problem;
    the whole read then words it).
    """

    def __init__(self, read_all: ReadAll, read_listener: ReadListener) -> None:
        self._read_all = read_all
        self._read_listener = read_listener
        self.last: Snapshot | None = None

    def load(self, text: str, source: str) -> Config:
        """What ``read_all`` gives for ``text``; when the same file was read before, only
        the listener entries whose text changed are read again.

        Falls back to reading the whole file for anything unusual: a change outside the list
        of listeners, an anchor, alias, tag or merge key, a problem anywhere, a layout other
        than a block sequence.
        """
        previous = self.last
        if previous is not None and previous.source == source:
            reused = self.reuse(previous, text)
            if reused is not None:
                self.last = reused.snapshot
                return reused.config
        document, config = self._read_all(text, source)
        self.last = _snapshot(text, source, document, config)
        return config

    def reuse(self, previous: Snapshot, text: str) -> Reuse | None:
        """The configuration of ``text``, from ``previous`` and the entries that changed in it.

        ``None`` when that needs more than reading those entries again. The unchanged text before
        and after the changed entries is the very text the previous load read; each changed
        entry is read alone and must end where its lines end, so it means the same in the file.
        """
        old = zlib.decompress(previous.packed).decode()
        if text == old:
            return Reuse(previous.config, previous)
        if not lines_only(text):
            return None
        starts, end = previous.starts, previous.end
        same_head = _common_prefix(old, text)
        same_tail = _common_suffix(old, text, min(len(old), len(text)) - same_head)
        if same_head < starts[0] or len(old) - same_tail > end:
            return None  # a change outside the listeners
        # The old text's changed lines are [changed, unchanged): whole lines, which entries hold.
        changed = old.rfind("\n", 0, same_head) + 1
        unchanged = _next_line(old, len(old) - same_tail)
        # Read again the entries that hold those lines, and the one whose last line precedes
        # them: lines added at its end belong to it.
        first = max(bisect_right(starts, changed - 1) - 1, 0)
        last = max(bisect_right(starts, max(unchanged, changed) - 1) - 1, first)
        old_stop = starts[last + 1] if last + 1 < len(starts) else end
        shift = len(text) - len(old)
        new_stop = old_stop + shift
        if new_stop < len(text) and text[new_stop - 1] != "\n":
            return None
        begin = starts[first]
        read_again: list[Listener] = []
        values = previous.values
        new_starts: list[int] = []
        if new_stop > begin:
            entries = self._read_entries(text, begin, new_stop, previous, first)
            if entries is None:
                return None
            read_again, new_starts, count = entries
            values += count
        kept = previous.config.listeners
        lines = text.count("\n", begin, new_stop) - old.count("\n", begin, old_stop)
        after = kept[last + 1 :]
        if lines:
            after = tuple(replace(listener, line=listener.line + lines) for listener in after)
        listeners = (*kept[:first], *read_again, *after)
        if not listeners or values > MAX_VALUES:
            return None
        if len({listener.name for listener in listeners}) != len(listeners):
            return None  # a duplicate name: the full read words it
        snapshot = Snapshot(
            previous.source,
            zlib.compress(text.encode(), 1),
            previous.column,
            array(
                "q",
                [*starts[:first], *new_starts, *(start + shift for start in starts[last + 1 :])],
            ),
            end + shift,
            values,
            replace(previous.config, listeners=listeners),
        )
        return Reuse(snapshot.config, snapshot)

    def _read_entries(
        self, text: str, begin: int, stop: int, previous: Snapshot, first: int
    ) -> tuple[list[Listener], list[int], int] | None:
        """The listeners written in ``text[begin:stop]``, each a whole entry, where they start,
        and how many values they hold; ``None`` if any of them has a problem."""
        entries = block_entries(text, begin, stop, column=previous.column)
        if entries is None:
            return None
        document = read_plain(
            text[begin:stop], previous.source, first_line=_line_of(text, begin), depth=1
        )
        if document is None or document.problems or document.root is None:
            return None
        items = document.root.value
        if not isinstance(items, list) or not _entries_agree(text, entries, items):
            return None
        listeners = []
        for index, item in enumerate(items):
            listener = self._read_listener(previous.source, item, f"listeners[{first + index}]")
            if listener is None:
                return None
            listeners.append(listener)
        return listeners, entries.starts, document.values


def _snapshot(text: str, source: str, document: Document, config: Config) -> Snapshot | None:
    """What the next reload needs of this load, or ``None`` if it cannot reuse anything."""
    root = document.root
    if not document.plain or root is None or not config.listeners or not lines_only(text):
        return None
    listeners = root.value["listeners"]  # type: ignore[index]
    entries = block_entries(text, _line_start(text, listeners.line))
    if entries is None or not _entries_agree(text, entries, listeners.value):
        return None
    # Every entry but the last ends where the next one's "-" starts; make sure the last ends
    # before the lines that follow it, so that a new entry after it cannot change it.
    last = entries.starts[-1]
    alone = read_plain(text[last : entries.end], source, first_line=_line_of(text, last), depth=1)
    if alone is None or alone.problems:
        return None
    return Snapshot(
        source,
        zlib.compress(text.encode(), 1),
        entries.column,
        array("q", entries.starts),
        entries.end,
        document.values,
        config,
    )


def _entries_agree(text: str, entries: Entries, items: list[Item]) -> bool:
    """True when the parser found exactly these entries: one per group of lines, each
    starting within its own group."""
    if len(items) != len(entries.starts):
        return False
    bounds = [*entries.starts, entries.end]
    line = _line_of(text, bounds[0])
    for index, item in enumerate(items):
        following = line + text.count("\n", bounds[index], bounds[index + 1])
        if not line <= item.line < max(following, line + 1):
            return False
        line = following
    return True


def _next_line(text: str, offset: int) -> int:
    """The offset of the first line that starts at or after ``offset``."""
    if offset == 0 or text[offset - 1] == "\n":
        return offset
    found = text.find("\n", offset)
    return len(text) if found < 0 else found + 1


def _line_of(text: str, offset: int) -> int:
    """The 1-based line ``offset`` is on."""
    return text.count("\n", 0, offset) + 1


def _line_start(text: str, line: int) -> int:
    """The offset of the 1-based ``line``."""
    offset = 0
    for _ in range(line - 1):
        offset = text.index("\n", offset) + 1
    return offset


_CHUNK = 4096


def _common_prefix(a: str, b: str) -> int:
    """The length of the longest text both ``a`` and ``b`` start with."""
    size = min(len(a), len(b))
    low = 0
    while low < size and a[low : low + _CHUNK] == b[low : low + _CHUNK]:
        low += _CHUNK
    high = min(low + _CHUNK, size)
    while low < high:  # a[:low] == b[:low], and they differ before high (or high is size)
        middle = (low + high + 1) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle - 1
    return min(low, size)


def _common_suffix(a: str, b: str, limit: int) -> int:
    """The length, at most ``limit``, of the longest text both ``a`` and ``b`` end with."""
    low, high = 0, limit
    while low < limit:
        step = min(_CHUNK, limit - low)
        if a[len(a) - low - step : len(a) - low] != b[len(b) - low - step : len(b) - low]:
            high = low + step
            break
        low += step
    while low < high:
        middle = (low + high + 1) // 2
        if a[len(a) - middle : len(a) - low] == b[len(b) - middle : len(b) - low]:
            low = middle
        else:
            high = middle - 1
    return low
