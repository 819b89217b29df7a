"""The pre-flight survey shared by ``check`` and ``run``: expand, read the host, find clashes.

A thin shell around the pure ``expand`` and ``clash`` modules: it reads the host's interfaces
and bound UDP sockets, finds the bindings whose address or device is absent (they wait), and
names the owners of only the sockets that clash.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from udpbindd import host
from udpbindd.clash import Clash, check
from udpbindd.config import Listener
from udpbindd.expand import Absent, Binding, Expansion, expand_all, find_absent
from udpbindd.names import IPAddress, SocketName


@dataclass(frozen=True, slots=True)
class Survey:
    expansion: Expansion
    clashes: tuple[Clash, ...]
    host_checked: bool
    # Bindings whose address or device is absent now: they wait (a clash is reported instead).
    absent: tuple[Absent, ...] = ()
    # The interfaces and addresses the expansion saw.
    interfaces: Mapping[str, Sequence[IPAddress]] | None = field(
        default=None, compare=False, repr=False
    )

    @property
    def clashing(self) -> frozenset[Binding]:
        return frozenset(clash.binding for clash in self.clashes)


def interface_addresses() -> dict[str, tuple[IPAddress, ...]]:
    """Each interface of this network namespace with its addresses now."""
    return {name: iface.addresses for name, iface in host.interfaces().items()}


def survey(
    listeners: Sequence[Listener],
    *,
    with_host: bool = True,
    interfaces: Mapping[str, Sequence[IPAddress]] | None = None,
    exclude_inodes: Collection[int] = (),
    serving: Mapping[SocketName, str] | None = None,
    bindable: Callable[[IPAddress], bool] | None = host.bindable,
) -> Survey:
    """Expand ``listeners`` against the host and find every clash they would meet.

    ``exclude_inodes`` are sockets that are udpbindd's own (inherited or already serving).
    ``serving`` maps the socket names being served to their listener's name: those bindings
    go first in the clash check, so a binding that appears later (a new address) is the one
    reported, never the socket already serving. ``bindable`` asks the kernel about
    addresses no interface lists (see ``expand.find_absent``).
    """
    if interfaces is None:
        interfaces = interface_addresses()
    expansion = expand_all(listeners, interfaces)
    absent = find_absent(expansion.bindings, interfaces, bindable)
    held: list[host.HeldSocket] = []
    if with_host:
        # A set, because each socket of the host is looked up in it.
        own = exclude_inodes if isinstance(exclude_inodes, AbstractSet) else set(exclude_inodes)
        held = host.held_sockets(owners=False, exclude_inodes=own)
    order = expansion.bindings if not serving else _serving_first(expansion.bindings, serving)
    clashes = check(order, held, uid=os.geteuid(), hash_entries=host.udp_hash_entries())
    return Survey(expansion, tuple(_with_owners(clashes)), with_host, absent, interfaces)


def _serving_first(bindings: Sequence[Binding], serving: Mapping[SocketName, str]) -> list[Binding]:
    """``bindings`` with those already being served first, each group in its own order."""
    first: list[Binding] = []
    rest: list[Binding] = []
    for binding in bindings:
        served = serving.get(binding.name) == binding.listener.name
        (first if served else rest).append(binding)
    return first + rest


def _with_owners(clashes: list[Clash]) -> list[Clash]:
    """Name the process behind each foreign socket that clashes (a /proc scan, so only these)."""
    foreign = {c.other.inode for c in clashes if isinstance(c.other, host.HeldSocket)}
    if not foreign:
        return clashes
    owners = host.find_owners(foreign)
    result = []
    for clash in clashes:
        other = clash.other
        if isinstance(other, host.HeldSocket) and other.inode in owners:
            named = dataclasses.replace(other, owner=owners[other.inode])
            result.append(dataclasses.replace(clash, other=named))
        else:
            result.append(clash)
    return result
