"""Listeners → bindings: the concrete socket names each configured listener stands for.

Pure: the addresses of the host's interfaces are passed in. ``"*"`` is 0.0.0.0 plus [::] with
V6ONLY=1 (never one socket that depends on ``net.ipv6.bindv6only``); ``family: dual`` is one
[::] socket with V6ONLY=0; an interface name is the addresses that interface has now. Also
decides which bindings must wait because their address or device is absent (``find_absent``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from udpbindd.config import Family, InterfaceName, Listener, Literal, Wildcard
from udpbindd.names import IPV4_ANY, IPV6_ANY, IPAddress, SocketName, address_text


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
class Absent:
    """A binding whose address or device is not on this host now: it waits until it is."""

    binding: Binding
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


def find_absent(
    bindings: Iterable[Binding],
    interfaces: Mapping[str, Sequence[IPAddress]],
    bindable: Callable[[IPAddress], bool] | None = None,
) -> tuple[Absent, ...]:
    """The bindings that cannot be bound now because an address or device they name is absent.

    A device (``device``, or a link-local zone) must exist; a link-local address must be an
    address of its zone's interface; any other specific address must be an address of some
    interface. The wildcard needs no address, and ``freebind`` binds without one (its device
    must still exist). Multicast addresses are always bindable. An address no interface lists
    may still be local to the kernel (a subnet broadcast, a ``local`` route); ``bindable``
    is asked about those, once each, and without it they count as absent.
    """
    # Keyed by (version, int): hashing ipaddress objects is slow with thousands of listeners.
    present: set[tuple[int, int]] = {(a.version, int(a)) for a in _all(interfaces)}
    # lo's 127.0.0.1/8 makes the whole of 127/8 local, whatever else lo lists.
    loopback = any(a.version == 4 and a.is_loopback for a in _all(interfaces))
    answers: dict[IPAddress, bool] = {}

    def local(address: IPAddress) -> bool:
        if bindable is None:
            return False
        if address not in answers:
            answers[address] = bindable(address)
        return answers[address]

    found: list[Absent] = []
    for binding in bindings:
        reason = _absence(binding, interfaces, present, loopback, local)
        if reason:
            found.append(Absent(binding, reason))
    return tuple(found)


def _all(interfaces: Mapping[str, Sequence[IPAddress]]) -> Iterable[IPAddress]:
    for addresses in interfaces.values():
        yield from addresses


def _absence(
    binding: Binding,
    interfaces: Mapping[str, Sequence[IPAddress]],
    present: set[tuple[int, int]],
    loopback: bool,
    local: Callable[[IPAddress], bool],
) -> str:
    name = binding.name
    device = name.device
    if device and device not in interfaces:
        return f"interface {device} does not exist"
    if name.is_wildcard or binding.listener.freebind:
        return ""
    address = name.address
    if name.is_link_local:
        # Link-local addresses are per link: the one on another interface does not count.
        if address in interfaces[device]:
            return ""
        return f"{address} is not an address of {device}"
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    effective: IPAddress = mapped if mapped is not None else address
    version, value = effective.version, int(effective)
    if (version, value) in present:
        return ""
    if version == 4:
        # 224.0.0.0/4 is multicast and 127.0.0.0/8 loopback: tested on the int, as each
        # ipaddress property costs a network lookup and a reload asks for every binding.
        if value >> 28 == 0xE or (loopback and value >> 24 == 127):
            return ""
    elif effective.is_multicast:
        return ""
    if local(address):
        return ""
    return f"no interface has the address {address_text(address)}"
