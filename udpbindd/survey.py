"""The pre-flight survey shared by ``check`` and ``run``: expand, read the host, find clashes.

A thin shell around the pure ``expand`` and ``clash`` modules: it reads the host's interfaces
and bound UDP sockets, and names the owners of only the sockets that clash.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from udpbindd import host
from udpbindd.clash import Clash, check
from udpbindd.config import Listener
from udpbindd.expand import Binding, Expansion, expand_all
from udpbindd.names import IPAddress


@dataclass(frozen=True, slots=True)
class Survey:
    expansion: Expansion
    clashes: tuple[Clash, ...]
    host_checked: bool

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
) -> Survey:
    """Expand ``listeners`` against the host and find every clash they would meet.

    ``exclude_inodes`` are sockets that are udpbindd's own (inherited or already serving).
    """
    if interfaces is None:
        interfaces = interface_addresses()
    expansion = expand_all(listeners, interfaces)
    held: list[host.HeldSocket] = []
    if with_host:
        held = [s for s in host.held_sockets(owners=False) if s.inode not in exclude_inodes]
    clashes = check(
        expansion.bindings, held, uid=os.geteuid(), hash_entries=host.udp_hash_entries()
    )
    return Survey(expansion, tuple(_with_owners(clashes)), with_host)


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
