"""Listeners → bindings: the concrete socket names each configured listener stands for.

Pure: the addresses of the host's interfaces are passed in. ``"*"`` is 0.0.0.0 plus [::] with
V6ONLY=1 (never one socket that depends on ``net.ipv6.bindv6only``); ``family: dual`` is one
[::] socket with V6ONLY=0; an interface name is the addresses that interface has now.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from udpbindd.config import Family, InterfaceName, Listener, Literal, Wildcard
from udpbindd.names import IPV4_ANY, IPV6_ANY, IPAddress, SocketName


@dataclass(frozen=True, slots=True)
class Binding:
    """One socket udpbindd will bind: a socket name and the listener it serves."""

    listener: Listener
    name: SocketName

    @property
    def label(self) -> str:
        return str(self.name)


@dataclass(frozen=True, slots=True)
class Unresolved:
    """A listener that stands for no socket right now, and why (e.g. an absent interface)."""

    listener: Listener
    reason: str


@dataclass(frozen=True, slots=True)
class Expansion:
    bindings: tuple[Binding, ...]
    unresolved: tuple[Unresolved, ...]


def _families(family: Family | None) -> tuple[int, ...]:
    if family is Family.IPV4:
        return (4,)
    if family in (Family.IPV6, Family.DUAL):
        return (6,)
    return (4, 6)


def expand(
    listener: Listener, interfaces: Mapping[str, Sequence[IPAddress]]
) -> tuple[list[Binding], str]:
    """The bindings of one listener, or an empty list and the reason there are none."""
    target, port, device = listener.target, listener.port, listener.device
    names: list[SocketName] = []
    if isinstance(target, Wildcard):
        if listener.family is Family.DUAL:
            names.append(SocketName(IPV6_ANY, port, device, v6only=False))
        else:
            families = _families(listener.family)
            if 4 in families:
                names.append(SocketName(IPV4_ANY, port, device))
            if 6 in families:
                names.append(SocketName(IPV6_ANY, port, device, v6only=True))
    elif isinstance(target, Literal):
        names.append(_literal(target, listener))
    else:
        assert isinstance(target, InterfaceName)  # noqa: S101 - Target is a closed union
        addresses = interfaces.get(target.name)
        if addresses is None:
            return [], f"interface {target.name} does not exist"
        families = _families(listener.family)
        for address in addresses:
            if address.version not in families:
                continue
            if address.version == 6 and address.is_link_local:
                if device and device != target.name:
                    continue  # its zone and the device would name two interfaces
                names.append(SocketName(address, port, target.name, v6only=True))
            else:
                names.append(SocketName(address, port, device, v6only=address.version == 6))
        if not names:
            wanted = {4: "IPv4 ", 6: "IPv6 "}.get(families[0], "") if len(families) == 1 else ""
            return [], f"interface {target.name} has no {wanted}address"
    return [Binding(listener, name) for name in names], ""


def _literal(target: Literal, listener: Listener) -> SocketName:
    address, port = target.address, listener.port
    device = target.zone or listener.device
    if address.version == 4:
        return SocketName(address, port, device)
    if address == IPV6_ANY:
        return SocketName(address, port, device, v6only=listener.family is not Family.DUAL)
    # A v4-mapped address cannot be bound with V6ONLY=1 (EINVAL); every other specific IPv6
    # address has V6ONLY forced on by the kernel, so set what the kernel will report.
    return SocketName(address, port, device, v6only=address.ipv4_mapped is None)


def expand_all(
    listeners: Iterable[Listener], interfaces: Mapping[str, Sequence[IPAddress]]
) -> Expansion:
    """Every enabled listener's bindings, in config order, and those that have none now."""
    bindings: list[Binding] = []
    unresolved: list[Unresolved] = []
    for listener in listeners:
        if not listener.enabled:
            continue
        found, reason = expand(listener, interfaces)
        bindings.extend(found)
        if reason:
            unresolved.append(Unresolved(listener, reason))
    return Expansion(tuple(bindings), tuple(unresolved))
