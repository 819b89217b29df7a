"""The Linux UDP bind() clash rule (EADDRINUSE), as a pure model of the kernel's port table.

This follows the measured algorithm (kernel-bind-rules.md §2): address overlap by kind (IPv4,
v4-mapped, ``::``, plain IPv6) and V6ONLY, bound devices, SO_REUSEADDR on both sockets, and the
SO_REUSEPORT same-owner exception, decided by the *first* relevant socket in the kernel's hash
chain order, with the secondary-hash variant for busy slots; ``quiet_slots`` names the hash
slots where no bind can be refused at all. It knows nothing of listeners, processes or
explanations: ``clash.py`` builds those on top.

What it cannot see: sockets of other network namespaces that share the kernel's hash table (they
count towards a busy slot), and the rare case where the (address, port) slot holds more sockets
than the primary slot, when the kernel scans the primary chain after all. Options changed after
bind() are not modelled: every Sock carries the options it had when it was bound.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import deque
from collections.abc import Iterable
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


# The kinds as the small integers address keys carry: hashing an Enum member runs Python code,
# and a check of 10,000 bindings hashes keys tens of thousands of times.
_V4, _ANY, _V6 = 0, 1, 2
_KINDS = (Kind.V4, Kind.ANY, Kind.V6)

# (kind, address as an integer): the bucket a socket sits in within one port.
AddressKey = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Sock:
    """A socket as the kernel compares it: its name, SO_REUSEADDR/SO_REUSEPORT and owner uid.

    ``key`` and ``device`` are worked out once from ``name``: every comparison needs them, and
    asking ipaddress objects is slow.
    """

    name: SocketName
    reuse_addr: bool = False
    reuse_port: bool = False
    uid: int = 0
    key: AddressKey = field(init=False, repr=False, compare=False)
    device: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", _address_key(self.name.address))
        object.__setattr__(self, "device", _device(self.name))

    @property
    def kind(self) -> Kind:
        """Which overlap class the socket's address falls in."""
        return _KINDS[self.key[0]]

    @property
    def v6only(self) -> bool:
        """V6ONLY as the kernel sees it after bind: forced on for a specific IPv6 address."""
        if isinstance(self.name.address, ipaddress.IPv4Address):
            return False
        return self.name.v6only or self.key[0] == _V6

    @property
    def is_wildcard(self) -> bool:
        """True for 0.0.0.0, ::ffff:0.0.0.0 and ::, whatever zone the address carries."""
        return self.key[1] == 0  # a V6-kind key is never 0: that is ::

    @property
    def tail(self) -> bool:
        """IPv6 sockets with SO_REUSEPORT go to the tail of the hash chains, oldest first."""
        return self.reuse_port and isinstance(self.name.address, ipaddress.IPv6Address)


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
    """The device the kernel binds: a link-local zone overrides SO_BINDTODEVICE."""
    # A zone given with a link-scoped address becomes sin6_scope_id, which the kernel writes over
    # any SO_BINDTODEVICE; for any other address the kernel ignores the scope id.
    address = name.address
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id and needs_scope(address):
        return address.scope_id
    return name.device


def validate(sock: Sock) -> None:
    """Raise InvalidBind for binds the kernel rejects outright (not clashes)."""
    validate_name(sock.name)


def validate_name(name: SocketName) -> None:
    """``validate`` for a socket of this name: the verdict depends on nothing else."""
    address = name.address
    if isinstance(address, ipaddress.IPv4Address):
        return  # the rules below are all about IPv6 addresses
    if address.ipv4_mapped is not None and name.v6only:
        raise InvalidBind("a v4-mapped address cannot be bound with IPV6_V6ONLY=1")
    if needs_scope(address) and not _device(name):
        raise InvalidBind(f"{address} is link-scoped: it needs a zone or a device")


def overlaps(new: Sock, old: Sock) -> bool:
    """Whether two socket names cover a common destination, per the kernel's rule.

    Ports and devices are not considered here; see ``relevant``.
    """
    new_kind, a = new.key
    old_kind, b = old.key
    if new_kind == _V4 and old_kind == _V4:
        return 0 in (a, b) or a == b
    if new_kind == _ANY and old_kind == _ANY:
        return True  # two '::' sockets always clash, whatever V6ONLY is
    if old_kind == _ANY:
        return not (old.v6only and new_kind == _V4)
    if new_kind == _ANY:
        return not (new.v6only and old_kind == _V4)
    # Compared as integers: an IPv6Address with a zone never equals the same one without.
    return new_kind == _V6 and old_kind == _V6 and a == b


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


def quiet_slots(names: Iterable[SocketName], hash_entries: int = DEFAULT_HASH_ENTRIES) -> set[int]:
    """The primary hash slots (``port & (hash_entries - 1)``) where no bind can be refused.

    Binds in different slots never affect each other: a bind looks only at its own port's
    sockets and at its slot's count. In a slot where every socket in ``names`` has a specific
    address and none shares its address (as the kernel keys it) with another on its port, a
    bind meets neither a wildcard nor its own address, so nothing is relevant to it, in
    whatever order they bind, whatever the options and the secondary hash. A caller can
    pass over these slots without a PortTable; ``validate_name`` still applies.
    """
    mask = hash_entries - 1
    slots: set[int] = set()
    crowded: set[int] = set()
    taken: set[tuple[int, AddressKey]] = set()
    for name in names:
        port = name.port
        slot = port & mask
        place = (port, _address_key(name.address))
        slots.add(slot)
        if place[1][1] == 0 or place in taken:
            crowded.add(slot)
        else:
            taken.add(place)
    return slots - crowded


def _address_key(address: IPAddress) -> AddressKey:
    """The bucket a socket sits in within one port: its address as the secondary hash keys it.

    IPv4 and v4-mapped sockets share a key (the kernel hashes both by the IPv4 address).
    """
    if isinstance(address, ipaddress.IPv4Address):
        return (_V4, int(address))
    value = int(address)  # an integer, so that a zone ("::%eth0") never changes the key
    if value >> 32 == 0xFFFF:  # ::ffff:a.b.c.d, as IPv6Address.ipv4_mapped tests it
        return (_V4, value & 0xFFFFFFFF)
    return (_ANY if value == 0 else _V6, value)


_ANY_KEY: AddressKey = (_ANY, 0)
_V4_ANY_KEY: AddressKey = (_V4, 0)


# A socket's place in its hash chain: head sockets (0, -seq) newest first, then tail sockets
# (1, seq) oldest first. A bucket holds its sockets in that order (see ``PortTable._add``).
_Rank = tuple[int, int]
_Entry = tuple[_Rank, Sock]
# The sockets of one port by address key.
_Port = dict[AddressKey, deque[_Entry]]


def _candidates(port: _Port, new: Sock) -> list[deque[_Entry]]:
    """The buckets whose sockets can overlap ``new``; ``relevant`` filters inside them."""
    key = new.key
    kind, value = key
    if value:
        # A specific address meets only its own address and the wildcards: O(1) look-ups.
        keys = (key, _ANY_KEY, _V4_ANY_KEY) if kind == _V4 else (key, _ANY_KEY)
        return [bucket for bucket in map(port.get, keys) if bucket is not None]
    # A wildcard meets every address of the families it covers.
    return [
        bucket
        for (other, _), bucket in port.items()
        if other == _ANY
        or (kind == _V4 and other == _V4)
        or (kind == _ANY and (other == _V6 or not new.v6only))
    ]


def _wildcards(port: _Port) -> list[deque[_Entry]]:
    """The buckets of 0.0.0.0, ::ffff:0.0.0.0 and :: (the secondary hash's wildcard list)."""
    return [port[k] for k in (_V4_ANY_KEY, _ANY_KEY) if k in port]


def _first_relevant(new: Sock, buckets: Iterable[deque[_Entry]]) -> Sock | None:
    """The socket relevant to ``new`` that comes first in chain order across ``buckets``."""
    best: _Entry | None = None
    for bucket in buckets:
        for entry in bucket:  # in chain order: the first relevant one is this bucket's answer
            if relevant(new, entry[1]):
                if best is None or entry[0] < best[0]:
                    best = entry
                break
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
        number = new.name.port
        port = self._ports.get(number)
        if port is None:
            return None
        candidates = _candidates(port, new)
        if not candidates:
            return None  # the common case: nothing on the port shares its address or covers it
        busy = self._slot_counts.get(number & self._mask, 0) > SECONDARY_HASH_THRESHOLD
        if busy and not new.is_wildcard:
            # Secondary hash: the same-address list and the wildcard list are each decided
            # by their own first relevant socket; either refusal is a refusal.
            own = port.get(new.key)
            for group in ([own] if own is not None else [], _wildcards(port)):
                first = _first_relevant(new, group)
                if first is not None and not accepts(new, first):
                    return first
            return None
        first = _first_relevant(new, candidates)
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
        number = sock.name.port
        port = self._ports.get(number)
        if port is None:
            port = self._ports[number] = {}
        bucket = port.get(sock.key)
        if bucket is None:
            bucket = port[sock.key] = deque()
        if sock.tail:
            bucket.append(((1, self._seq), sock))
        else:
            bucket.appendleft(((0, -self._seq), sock))
        slot = number & self._mask
        self._slot_counts[slot] = self._slot_counts.get(slot, 0) + 1

    def remove(self, sock: Sock) -> None:
        """Forget a socket (it was closed). The same object that was bound must be passed."""
        port = self._ports.get(sock.name.port)
        key = sock.key
        bucket = None if port is None else port.get(key)
        index = None if bucket is None else _index_of(bucket, sock)
        if port is None or bucket is None or index is None:
            raise KeyError(str(sock.name))
        del bucket[index]
        if not bucket:
            del port[key]
        if not port:
            del self._ports[sock.name.port]
        slot = sock.name.port & self._mask
        self._slot_counts[slot] -= 1


def _index_of(bucket: deque[_Entry], sock: Sock) -> int | None:
    """Where ``sock`` itself (not an equal socket) is in ``bucket``."""
    for index, (_, held) in enumerate(bucket):
        if held is sock:
            return index
    return None
