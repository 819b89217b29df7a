"""Reload plans: what changes between the serving bindings and the wanted ones. Pure.

Bindings are keyed by socket name. A binding whose socket options changed is re-bound; one
whose per-packet settings (name, responder, drop rate) changed is relabelled on its open
socket; unchanged ones are kept with their file descriptor and counters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from udpbindd.bindrule import PortTable, Sock
from udpbindd.config import Listener
from udpbindd.expand import Binding
from udpbindd.names import SocketName


def socket_options(listener: Listener) -> tuple[bool, bool, int]:
    """The listener settings that only a new socket can change."""
    return (listener.reuse_port, listener.freebind, listener.recv_buffer)


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
    """Compare the serving bindings with the wanted ones, by socket name."""
    keep: list[Binding] = []
    relabel: list[Binding] = []
    rebind: list[Binding] = []
    add: list[Binding] = []
    wanted_names = set()
    for binding in wanted:
        wanted_names.add(binding.name)
        old = current.get(binding.name)
        if old is None:
            add.append(binding)
        elif socket_options(old.listener) != socket_options(binding.listener):
            rebind.append(binding)
        elif old.listener != binding.listener:
            relabel.append(binding)
        else:
            keep.append(binding)
    remove = tuple(name for name in current if name not in wanted_names)
    return Plan(tuple(keep), tuple(relabel), tuple(rebind), tuple(add), remove)


def close_order(
    opens: Sequence[Binding], closes: Iterable[Binding], uid: int = 0
) -> list[tuple[Binding, tuple[SocketName, ...]]]:
    """For each socket to open, the old sockets to close right before it.

    An old socket is closed early only when the kernel would refuse the new one while the old
    is open (e.g. ``127.0.0.1:53`` becoming ``0.0.0.0:53``); every other old socket stays open
    until the new set is bound, so nothing it serves is interrupted for longer than needed.
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
        while (refuser := table.conflict(new)) is not None:
            table.remove(refuser)
            first.append(socks[id(refuser)])
        steps.append((binding, tuple(first)))
    return steps
