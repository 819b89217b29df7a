"""Socket names: the (address, port, device, V6ONLY) a UDP socket is bound to, and their labels.

A socket name is what the kernel's clash rule compares, so it is the identity of a binding
everywhere in udpbindd: in the clash check, in the daemon's table and in metric labels.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

IPV4_ANY = ipaddress.IPv4Address("0.0.0.0")
IPV6_ANY = ipaddress.IPv6Address("::")


@dataclass(frozen=True, slots=True)
class SocketName:
    """One concrete socket name.

    ``device`` is the SO_BINDTODEVICE interface, or the zone of a link-local address (the
    kernel treats the scope id as the bound device); ``""`` means no device. ``v6only`` is the
    IPV6_V6ONLY value set before bind() and is always False for IPv4 sockets.
    """

    address: IPAddress
    port: int
    device: str = ""
    v6only: bool = False

    @property
    def family(self) -> int:
        """4 or 6: the address family of the socket (a v4-mapped address is family 6)."""
        return self.address.version

    @property
    def is_wildcard(self) -> bool:
        """True for 0.0.0.0, [::] and [::ffff:0.0.0.0]: sockets that receive on every address."""
        return v4_value(self.address) == 0 or self.address == IPV6_ANY

    @property
    def is_link_local(self) -> bool:
        """True for fe80::/10, where the device is the address's zone."""
        return self.address.version == 6 and self.address.is_link_local

    @property
    def dual_stack(self) -> bool:
        """True for an IPv6 wildcard socket that also receives IPv4 (V6ONLY=0)."""
        return self.address == IPV6_ANY and not self.v6only

    def __str__(self) -> str:
        return label(self)

    def sort_key(self) -> tuple[int, int, int, str, bool]:
        """A total order: by port, family, address, device."""
        return (self.port, self.family, int(self.address), self.device, self.v6only)


def v4_value(address: IPAddress) -> int | None:
    """The IPv4 address a socket covers as an int: itself, or the v4 part of ::ffff:a.b.c.d.

    ``::`` counts as 0 (the IPv4 wildcard) because a dual-stack socket on it also covers IPv4;
    whether it really does depends on V6ONLY, which the caller checks. Plain IPv6 → None.
    """
    if isinstance(address, ipaddress.IPv4Address):
        return int(address)
    if address == IPV6_ANY:
        return 0
    mapped = address.ipv4_mapped
    return None if mapped is None else int(mapped)


def address_text(address: IPAddress) -> str:
    """The address as operators write it; v4-mapped IPv6 as ``::ffff:a.b.c.d`` on every Python."""
    if address.version == 6 and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


def label(name: SocketName) -> str:
    """The socket's label as it appears in tables and metrics.

    ``127.0.0.1:1060``, ``[::1]:1060``, ``0.0.0.0:1060%eth0``, ``[fe80::1%eth0]:1060``.
    """
    address = address_text(name.address)
    if name.family == 4:
        text = f"{address}:{name.port}"
    elif name.is_link_local and name.device:
        return f"[{address}%{name.device}]:{name.port}"
    else:
        text = f"[{address}]:{name.port}"
    return f"{text}%{name.device}" if name.device else text


def describe(name: SocketName) -> str:
    """The label plus what V6ONLY means for it, for human-facing tables."""
    if name.family == 6 and name.address == IPV6_ANY:
        return f"{label(name)} ({'IPv6 only' if name.v6only else 'dual-stack: IPv6 and IPv4'})"
    return label(name)
