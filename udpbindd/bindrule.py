"""The Linux UDP bind() clash rule (EADDRINUSE), as a pure model of the kernel's port table.

This follows the measured algorithm (kernel-bind-rules.md §2): address overlap by kind (IPv4,
v4-mapped, ``::``, plain IPv6) and V6ONLY, bound devices, SO_REUSEADDR on both sockets, and the
SO_REUSEPORT same-owner exception, decided by the *first* relevant socket in the kernel's hash
chain order, with the secondary-hash variant for busy slots. It knows nothing of listeners,
processes or explanations: ``clash.py`` builds those on top.

What it cannot see: sockets of other network namespaces that share the kernel's hash table (they
count towards a busy slot), and the rare case where the (address, port) slot holds more sockets
than the primary slot, when the kernel scans the primary chain after all. Options changed after
bind() are not modelled: every Sock carries the options it had when it was bound.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from udpbindd.names import IPAddress, SocketName

# The kernel switches specific-address binds to the secondary (address, port) hash when the
# primary slot holds more than this many sockets (udp_lib_get_port, hslot->count > 10).
SECONDARY_HASH_THRESHOLD = 10
DEFAULT_HASH_ENTRIES = 16384


class Kind(enum.Enum):
    """How a socket's address overlaps others (the kernel's ipv6_addr_type classes)."""

    V4 = "v4"  # an IPv4 socket, or an IPv6 socket on ::ffff:a.b.c.d (incl. ::ffff:0.0.0.0)
    ANY = "any"  # an IPv6 socket on ::
    V6 = "v6"  # an IPv6 socket on any other address


@dataclass(frozen=True, slots=True)
class Sock:
    """A socket as the kernel compares it: its name, SO_REUSEADDR/SO_REUSEPORT and owner uid."""

    name: SocketName
    reuse_addr: bool = False
    reuse_port: bool = False
    uid: int = 0

    @property
    def kind(self) -> Kind:
        """Which overlap class the socket's address falls in."""
        return _address_key(self)[0]

    @property
    def v6only(self) -> bool:
        """V6ONLY as the kernel sees it after bind: forced on for a specific IPv6 address."""
        if self.name.family == 4:
            return False
        return self.name.v6only or self.kind is Kind.V6

    @property
    def device(self) -> str:
        """The device the kernel binds: a link-local zone overrides SO_BINDTODEVICE."""
        return _device(self.name)

    @property
    def is_wildcard(self) -> bool:
        """True for 0.0.0.0, ::ffff:0.0.0.0 and ::, whatever zone the address carries."""
        return _address_key(self)[1] == 0  # a V6-kind key is never 0: that is ::

    @property
    def tail(self) -> bool:
        """IPv6 sockets with SO_REUSEPORT go to the tail of the hash chains, oldest first."""
        return self.name.family == 6 and self.reuse_port


class InvalidBind(ValueError):
    """The kernel refuses this bind before comparing it with anything (EINVAL)."""


def needs_scope(address: IPAddress) -> bool:
    """Whether the kernel requires a device to bind ``address`` (__ipv6_addr_needs_scope_id).

    Link-local unicast (fe80::/10) and multicast of interface-local or link-local scope
    (ffX1::/16, ffX2::/16): the same address exists once per link, so it is meaningless without one.
    """
    if not isinstance(address, ipaddress.IPv6Address):
        return False
    if address.is_link_local:
        return True
    return address.is_multicast and address.packed[1] & 0x0F in (1, 2)


def _device(name: SocketName) -> str:
    # A zone given with a link-scoped address becomes sin6_scope_id, which the kernel writes over
    # any SO_BINDTODEVICE; for any other address the kernel ignores the scope id.
    address = name.address
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id and needs_scope(address):
        return address.scope_id
    return name.device


def validate(sock: Sock) -> None:
    """Raise InvalidBind for binds the kernel rejects outright (not clashes)."""
    name = sock.name
    address = name.address
    if (
        isinstance(address, ipaddress.IPv6Address)
        and address.ipv4_mapped is not None
        and name.v6only
    ):
        raise InvalidBind("a v4-mapped address cannot be bound with IPV6_V6ONLY=1")
    if needs_scope(address) and not sock.device:
        raise InvalidBind(f"{address} is link-scoped: it needs a zone or a device")


def overlaps(new: Sock, old: Sock) -> bool:
    """Whether two socket names cover a common destination, per the kernel's rule.

    Ports and devices are not considered here; see ``relevant``.
    """
    new_kind, old_kind = new.kind, old.kind
    if new_kind is Kind.V4 and old_kind is Kind.V4:
        a, b = _address_key(new)[1], _address_key(old)[1]
        return 0 in (a, b) or a == b
    if new_kind is Kind.ANY and old_kind is Kind.ANY:
        return True  # two '::' sockets always clash, whatever V6ONLY is
    if old_kind is Kind.ANY:
        return not (old.v6only and new_kind is Kind.V4)
    if new_kind is Kind.ANY:
        return not (new.v6only and old_kind is Kind.V4)
    # Compared as integers: an IPv6Address with a zone never equals the same one without.
    return new_kind is Kind.V6 and old_kind is Kind.V6 and _address_key(new) == _address_key(old)


def devices_compatible(new: Sock, old: Sock) -> bool:
    """Sockets bound to two different devices never clash; an unbound socket clashes with all."""
    a, b = new.device, old.device
    return not a or not b or a == b


def relevant(new: Sock, old: Sock) -> bool:
    """Whether ``old`` takes part in deciding ``new``'s bind (same port assumed)."""
    return (
        not (new.reuse_addr and old.reuse_addr)
        and devices_compatible(new, old)
        and overlaps(new, old)
    )


def accepts(new: Sock, first: Sock) -> bool:
    """The decision made by the first relevant socket: SO_REUSEPORT on both, same owner."""
    return new.reuse_port and first.reuse_port and new.uid == first.uid


def _address_key(sock: Sock) -> tuple[Kind, int]:
    """The bucket a socket sits in within one port: its address as the secondary hash keys it.

    IPv4 and v4-mapped sockets share a key (the kernel hashes both by the IPv4 address).
    """
    address = sock.name.address
    if isinstance(address, ipaddress.IPv4Address):
        return (Kind.V4, int(address))
    if address.ipv4_mapped is not None:
        return (Kind.V4, int(address.ipv4_mapped))
    # An integer, so that a zone ("::%eth0", "fe80::1%eth0") never changes the key.
    value = int(address)
    return (Kind.ANY if value == 0 else Kind.V6, value)


_ANY_KEY = (Kind.ANY, 0)
_V4_ANY_KEY = (Kind.V4, 0)


@dataclass(slots=True)
class _Bucket:
    """Sockets with one address key on one port, split as the hash chain orders them."""

    head: list[tuple[int, Sock]] = field(default_factory=list)  # scanned newest first
    tail: list[tuple[int, Sock]] = field(default_factory=list)  # scanned oldest first

    def first_relevant(self, new: Sock) -> tuple[tuple[int, int], Sock] | None:
        """The first socket relevant to ``new`` with its chain rank (lower comes first)."""
        for seq, sock in reversed(self.head):
            if relevant(new, sock):
                return (0, -seq), sock
        for seq, sock in self.tail:
            if relevant(new, sock):
                return (1, seq), sock
        return None

    def remove(self, sock: Sock) -> bool:
        for entries in (self.head, self.tail):
            for index, (_, held) in enumerate(entries):
                if held is sock:
                    del entries[index]
                    return True
        return False

    def __len__(self) -> int:
        return len(self.head) + len(self.tail)


@dataclass(slots=True)
class _Port:
    buckets: dict[tuple[Kind, int], _Bucket] = field(default_factory=dict)

    def candidates(self, new: Sock) -> Iterator[_Bucket]:
        """The buckets whose sockets can overlap ``new``; ``relevant`` filters inside them."""
        key = _address_key(new)
        kind = key[0]
        if not new.is_wildcard:
            # A specific address meets only its own address and the wildcards: O(1) look-ups.
            keys = [key, _ANY_KEY] + ([_V4_ANY_KEY] if kind is Kind.V4 else [])
            yield from (self.buckets[k] for k in keys if k in self.buckets)
            return
        # A wildcard meets every address of the families it covers.
        for (other, _), bucket in self.buckets.items():
            if (
                other is Kind.ANY
                or (kind is Kind.V4 and other is Kind.V4)
                or (kind is Kind.ANY and (other is Kind.V6 or not new.v6only))
            ):
                yield bucket

    def wildcards(self) -> Iterator[_Bucket]:
        """The buckets of 0.0.0.0, ::ffff:0.0.0.0 and :: (the secondary hash's wildcard list)."""
        yield from (self.buckets[k] for k in (_V4_ANY_KEY, _ANY_KEY) if k in self.buckets)

    def first_relevant(self, new: Sock, buckets: Iterable[_Bucket]) -> Sock | None:
        """The socket relevant to ``new`` that comes first in chain order across ``buckets``."""
        best: tuple[tuple[int, int], Sock] | None = None
        for bucket in buckets:
            found = bucket.first_relevant(new)
            if found is not None and (best is None or found[0] < best[0]):
                best = found
        return None if best is None else best[1]


class PortTable:
    """The kernel's UDP port table for one network namespace, as far as bind() is concerned.

    ``bind`` adds sockets in order and answers as the kernel would; sockets that the kernel
    would refuse are not added. ``hash_entries`` is the size of the kernel's UDP hash table,
    ``net.ipv4.udp_hash_entries`` (a child namespace that shares the host's table reads it as a
    negative number; pass its absolute value).
    """

    def __init__(self, hash_entries: int = DEFAULT_HASH_ENTRIES) -> None:
        if hash_entries < 1 or hash_entries & (hash_entries - 1):
            raise ValueError(f"hash_entries must be a power of two, not {hash_entries}")
        self._mask = hash_entries - 1
        self._ports: dict[int, _Port] = {}
        self._slot_counts: dict[int, int] = {}
        self._seq = 0

    def conflict(self, new: Sock) -> Sock | None:
        """The socket that makes the kernel refuse ``new`` with EADDRINUSE, or None.

        Raises:
            InvalidBind: the kernel would refuse it with EINVAL before any comparison.
        """
        validate(new)
        port = self._ports.get(new.name.port)
        if port is None:
            return None
        busy = self._slot_counts.get(new.name.port & self._mask, 0) > SECONDARY_HASH_THRESHOLD
        if busy and not new.is_wildcard:
            # Secondary hash: the same-address list and the wildcard list are each decided
            # by their own first relevant socket; either refusal is a refusal.
            own = port.buckets.get(_address_key(new))
            for group in ([own] if own is not None else [], port.wildcards()):
                first = port.first_relevant(new, group)
                if first is not None and not accepts(new, first):
                    return first
            return None
        first = port.first_relevant(new, port.candidates(new))
        if first is None or accepts(new, first):
            return None
        return first

    def bind(self, new: Sock) -> Sock | None:
        """Bind ``new`` if the kernel would; return the refusing socket otherwise."""
        refused_by = self.conflict(new)
        if refused_by is None:
            self._add(new)
        return refused_by

    def insert(self, sock: Sock) -> None:
        """Record a socket that is already bound (e.g. by another process) without judging it."""
        self._add(sock)

    def _add(self, sock: Sock) -> None:
        self._seq += 1
        port = self._ports.setdefault(sock.name.port, _Port())
        bucket = port.buckets.setdefault(_address_key(sock), _Bucket())
        (bucket.tail if sock.tail else bucket.head).append((self._seq, sock))
        slot = sock.name.port & self._mask
        self._slot_counts[slot] = self._slot_counts.get(slot, 0) + 1

    def remove(self, sock: Sock) -> None:
        """Forget a socket (it was closed). The same object that was bound must be passed."""
        port = self._ports.get(sock.name.port)
        key = _address_key(sock)
        bucket = None if port is None else port.buckets.get(key)
        if port is None or bucket is None or not bucket.remove(sock):
            raise KeyError(str(sock.name))
        if not bucket:
            del port.buckets[key]
        if not port.buckets:
            del self._ports[sock.name.port]
        slot = sock.name.port & self._mask
        self._slot_counts[slot] -= 1
