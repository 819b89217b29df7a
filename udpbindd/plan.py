"""Reload plans: what changes between the serving bindings and the wanted ones. Pure.

Owns two decisions of a reload, and nothing that touches a socket:

- ``diff``: bindings are keyed by socket name. A binding whose socket options changed is
  re-bound; one whose other settings (name, responder, drop rate, ``required``...) changed is
  relabelled on its open socket; unchanged ones are kept with their file descriptor and counters.
- ``close_order``: which old sockets must be closed right before a new one is bound, because
  the kernel would refuse the new one while they are open.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from udpbindd.bindrule import InvalidBind, PortTable, Sock
from udpbindd.config import Listener
from udpbindd.expand import Binding
from udpbindd.names import SocketName


def socket_options(listener: Listener) -> tuple[bool, bool, int]:
    """The listener settings that only a new socket can change."""
    return (listener.reuse_port, listener.freebind, listener.recv_buffer)


def _options_differ(old: Listener, new: Listener) -> bool:
    # ``socket_options`` without building two tuples: run once per listener on every reload.
    return (
        old.recv_buffer != new.recv_buffer
        or old.reuse_port != new.reuse_port
        or old.freebind != new.freebind
    )


def same_settings(old: Listener, new: Listener) -> bool:
    """Whether two listeners differ at most in the line they are written on.

    Moving a listener within the file (or adding one above it) is not a change to serve.
    """
    return old == new or dataclasses.replace(old, line=new.line) == new


@dataclass(frozen=True, slots=True)
class Plan:
    """The steps from the serving set to the wanted one."""

    keep: tuple[Binding, ...] = ()
    relabel: tuple[Binding, ...] = ()  # new per-packet settings, same socket
    rebind: tuple[Binding, ...] = ()  # same socket name, new socket options
    add: tuple[Binding, ...] = ()
    remove: tuple[SocketName, ...] = ()

    @property
    def opens(self) -> tuple[Binding, ...]:
        """Bindings that need a new socket, in the wanted order."""
        return self.rebind + self.add

    @property
    def closes(self) -> tuple[SocketName, ...]:
        """Serving sockets that will be closed (removed, or replaced by a re-bind)."""
        return self.remove + tuple(binding.name for binding in self.rebind)

    @property
    def changes(self) -> bool:
        return bool(self.relabel or self.rebind or self.add or self.remove)


def diff(current: Mapping[SocketName, Binding], wanted: Sequence[Binding]) -> Plan:
    """Compare the serving bindings with the wanted ones, by socket name.

    ``wanted`` holds each socket name once (the clash check has left duplicates out). Each
    socket name is hashed once: with 10,000 listeners that is most of the cost of a reload's
    plan, since hashing an ``ipaddress`` address is not cheap.
    """
    keep: list[Binding] = []
    relabel: list[Binding] = []
    rebind: list[Binding] = []
    add: list[Binding] = []
    remaining = dict(current)  # a copy of a dict reuses its hashes
    for binding in wanted:
        old = remaining.pop(binding.name, None)
        if old is None:
            add.append(binding)
        elif _options_differ(old.listener, binding.listener):
            rebind.append(binding)
        elif same_settings(old.listener, binding.listener):
            keep.append(old)  # the serving binding, untouched
        else:
            relabel.append(binding)
    # What no wanted binding claimed, in serving order.
    return Plan(tuple(keep), tuple(relabel), tuple(rebind), tuple(add), tuple(remaining))


def close_order(
    opens: Sequence[Binding], closes: Iterable[Binding], uid: int = 0
) -> list[tuple[Binding, tuple[SocketName, ...]]]:
    """For each socket to open, the old sockets to close right before it.

    An old socket is closed early only when the kernel would refuse the new one while the old
    is open (e.g. ``127.0.0.1:53`` becoming ``0.0.0.0:53``, or a re-bind of one socket name
    without SO_REUSEPORT on both); every other old socket stays open until the new set is
    bound, so nothing it serves is interrupted for longer than needed. ``closes`` are given
    oldest first, as the kernel's hash chains order them. Each old socket is named at most once.
    """
    table = PortTable()
    socks: dict[int, SocketName] = {}
    for old in closes:
        sock = Sock(old.name, reuse_port=old.listener.reuse_port, uid=uid)
        table.insert(sock)
        socks[id(sock)] = old.name
    steps: list[tuple[Binding, tuple[SocketName, ...]]] = []
    for binding in opens:
        new = Sock(binding.name, reuse_port=binding.listener.reuse_port, uid=uid)
        first: list[SocketName] = []
        try:
            while (refuser := table.conflict(new)) is not None:
                table.remove(refuser)
                first.append(socks[id(refuser)])
        except InvalidBind:
            pass  # refused whatever is open: bind() reports it, and nothing is closed for it
        steps.append((binding, tuple(first)))
    return steps
