"""The loop's selector: epoll for read readiness, each file's data in a table indexed by fd.

A ``selectors.BaseSelector``, so the loop is still one ``selectors`` loop, but leaner than
``selectors.EpollSelector`` where udpbindd pays for it. With 10,000 listeners that one keeps,
per socket, a ``SelectorKey``, a dict entry and an int for the descriptor (about 140 B of
objects), and every wake-up builds a ``(key, events)`` pair per ready file that the loop only
unpacks again. This one keeps one list slot per descriptor number (8 B; descriptors are small,
dense numbers), and ``ready`` returns the ready files' data alone.

Files are known by descriptor. A file must be unregistered while it is still open, as the
daemon does with every serving socket (closing the selector itself needs no unregistering
first). The keys that ``select`` and ``get_map`` return have the descriptor as ``fileobj``.
"""

from __future__ import annotations

import contextlib
import math
import select
import selectors
from collections.abc import Iterator, Mapping
from typing import Any, Protocol, TypeAlias


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


FileObject: TypeAlias = "int | _HasFileno"

# Ready files taken per wake-up at most: the rest stay ready (level-triggered) for the next
# one, so a pass over 10,000 busy sockets is still bounded and the poll's buffer stays small.
MAX_EVENTS = 1024
# The table's slot of a descriptor that is not registered (None is valid data).
_FREE: Any = object()


def _fd(fileobj: FileObject) -> int:
    fd = fileobj if isinstance(fileobj, int) else int(fileobj.fileno())
    if fd < 0:
        raise ValueError(f"invalid file descriptor: {fd} (a file must be open to be selected)")
    return fd


class ReadSelector(selectors.BaseSelector):
    """Selects files for reading only (``EVENT_READ``), each with its data."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._data: list[Any] = []  # by descriptor: the data, or _FREE
        self._count = 0

    def fileno(self) -> int:
        return self._epoll.fileno()

    def register(self, fileobj: FileObject, events: int, data: Any = None) -> selectors.SelectorKey:
        _only_read(events)
        fd = _fd(fileobj)
        table = self._data
        if fd < len(table) and table[fd] is not _FREE:
            raise KeyError(f"{fileobj!r} (FD {fd}) is already registered")
        self._epoll.register(fd, select.EPOLLIN)
        if fd >= len(table):
            # Grown by half again at least, so 10,000 registrations copy it a few times only.
            table.extend([_FREE] * max(fd + 1 - len(table), len(table) // 2))
        table[fd] = data
        self._count += 1
        return selectors.SelectorKey(fd, fd, events, data)

    def unregister(self, fileobj: FileObject) -> selectors.SelectorKey:
        fd = _fd(fileobj)
        data = self._lookup(fd, fileobj)
        self._data[fd] = _FREE
        self._count -= 1
        # As selectors does: the file is forgotten whatever epoll says (it may have dropped
        # the file already), so that its number can be registered again.
        with contextlib.suppress(OSError):
            self._epoll.unregister(fd)
        return selectors.SelectorKey(fd, fd, selectors.EVENT_READ, data)

    def modify(self, fileobj: FileObject, events: int, data: Any = None) -> selectors.SelectorKey:
        """Change a registered file's data (the events are always ``EVENT_READ``)."""
        _only_read(events)
        fd = _fd(fileobj)
        self._lookup(fd, fileobj)
        self._data[fd] = data
        return selectors.SelectorKey(fd, fd, events, data)

    def ready(self, timeout: float | None = None) -> list[Any]:
        """Wait up to ``timeout`` seconds (None: for ever); the data of each ready file."""
        if timeout is None:
            # The loop's usual wait, polled here directly: this is the path from a lone
            # request's wake-up to its reply, where every call shows.
            try:
                events = self._epoll.poll(-1, MAX_EVENTS)
            except InterruptedError:
                return []
        else:
            events = self._poll(timeout)
        data = self._data
        return [data[fd] for fd, _ in events]

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        read, data = selectors.EVENT_READ, self._data
        return [
            (selectors.SelectorKey(fd, fd, read, data[fd]), read) for fd, _ in self._poll(timeout)
        ]

    def get_map(self) -> Mapping[FileObject, selectors.SelectorKey]:
        return _Keys(self)

    def close(self) -> None:
        self._epoll.close()
        self._data.clear()
        self._count = 0

    def _lookup(self, fd: int, fileobj: FileObject) -> Any:
        if fd >= len(self._data) or self._data[fd] is _FREE:
            raise KeyError(f"{fileobj!r} is not registered")
        return self._data[fd]

    def _poll(self, timeout: float | None) -> list[tuple[int, int]]:
        if timeout is None:
            timeout = -1
        elif timeout <= 0:
            timeout = 0
        else:
            # Whole milliseconds, rounded up, as selectors does (epoll.poll rounds up too,
            # but the intent is kept explicit): rounded down, a wait of 0.4 ms would return
            # at once and the caller would spin until it ran out.
            timeout = math.ceil(timeout * 1e3) * 1e-3
        try:
            return self._epoll.poll(timeout, MAX_EVENTS)
        except InterruptedError:
            return []


def _only_read(events: int) -> None:
    if events != selectors.EVENT_READ:
        raise ValueError(f"only EVENT_READ is selected, not {events!r}")


class _Keys(Mapping[FileObject, selectors.SelectorKey]):
    """The registered files as ``selectors`` shows them, built when asked for."""

    def __init__(self, selector: ReadSelector) -> None:
        self._selector = selector

    def __len__(self) -> int:
        return self._selector._count

    def __getitem__(self, fileobj: FileObject) -> selectors.SelectorKey:
        fd = _fd(fileobj)
        data = self._selector._lookup(fd, fileobj)
        return selectors.SelectorKey(fd, fd, selectors.EVENT_READ, data)

    def __iter__(self) -> Iterator[int]:
        table = self._selector._data
        return (fd for fd in range(len(table)) if table[fd] is not _FREE)
