"""Source policy for one listener, asked once per datagram: who may be answered, how often.

Owns the access lists (``allow``/``deny``), the per-source rate limit, the reflection guard and
the drop reasons ``denied``, ``rate_limited`` and ``reflection``. Pure and cheap per packet:
everything is worked out when a guard is built. Never touches sockets, clocks or counters; the
caller passes the time in and counts the verdicts it gets back.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
import weakref
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from udpbindd.config import Listener, Network, RateLimit, ReflectionPolicy, Responder

# Every source is one int on one number line: an IPv4 address is its 32-bit value, and so is a
# v4-mapped IPv6 address (a dual-stack socket's IPv4 clients are IPv4 on the wire); any other
# IPv6 address is its 128-bit value plus IPV6_BASE. One line for both families makes an access
# list one sorted table and a source one dict key.
IPV6_BASE = 1 << 128
_V4_MAX = (1 << 32) - 1
_MAPPED_PREFIX = 0xFFFF  # ::ffff:0:0/96, the top 96 bits of a v4-mapped address

# Header bytes around a UDP payload on the wire: IPv4 (20, without options) or IPv6 (40,
# without extension headers), plus UDP (8). The amplification factor counts them on both sides.
IPV4_OVERHEAD = 28
IPV6_OVERHEAD = 48

# Sources that cannot be a client: a reply would go nowhere, or to many hosts at once.
_NOT_A_CLIENT: tuple[tuple[int, int], ...] = (
    (0x00000000, 0x00FFFFFF),  # 0.0.0.0/8: "this host", a source only while it boots
    (0xE0000000, 0xEFFFFFFF),  # 224.0.0.0/4: multicast
    (0xFFFFFFFF, 0xFFFFFFFF),  # 255.255.255.255: the limited broadcast
    (IPV6_BASE, IPV6_BASE),  # ::, the IPv6 unspecified address
    (IPV6_BASE | 0xFF << 120, IPV6_BASE | (1 << 128) - 1),  # ff00::/8: multicast
)

# Sources remembered per guard. What an address is allowed never changes while a guard lives,
# so a known source costs one dict lookup. The cache is emptied when full, which bounds its
# memory even when a spoofed flood brings a new source with every datagram.
CACHE_SIZE = 4096


class Verdict(enum.StrEnum):
    """Why a datagram gets no reply: the ``reason`` label of udpbindd_dropped_packets_total."""

    DENIED = "denied"
    RATE_LIMITED = "rate_limited"
    REFLECTION = "reflection"


# A source refused by its address alone is cached as a negative code: source values and bucket
# keys are never negative, and an int compare is far cheaper than isinstance() on an enum.
_DENIED = -1
_NOT_A_CLIENT_CODE = -2
_REFLECTED_PORT_CODE = -3  # only in the cache by raw peer name, which holds the port too
_REFUSED_BY_CODE = {
    _DENIED: Verdict.DENIED,
    _NOT_A_CLIENT_CODE: Verdict.REFLECTION,
    _REFLECTED_PORT_CODE: Verdict.REFLECTION,
}


def source_value(host: str) -> int:
    """The source address ``host``, as ``recvfrom`` gives it, on the one number line.

    A link-local source's ``%zone`` is ignored, and a v4-mapped one is its IPv4 address.

    Raises:
        ValueError: ``host`` is not an IPv4 or IPv6 address.
    """
    try:
        if ":" not in host:
            return int.from_bytes(socket.inet_pton(socket.AF_INET, host), "big")
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, host.partition("%")[0]), "big")
    except OSError:
        raise ValueError(f"{host!r} is not an IP address") from None
    if value >> 32 == _MAPPED_PREFIX:
        return value & _V4_MAX
    return IPV6_BASE | value


def network_range(network: Network) -> tuple[int, int]:
    """The first and last source value ``network`` covers (a v4-mapped one as IPv4)."""
    first, last = int(network.network_address), int(network.broadcast_address)
    if network.version == 4:
        return first, last
    if network.prefixlen >= 96 and first >> 32 == _MAPPED_PREFIX:
        return first & _V4_MAX, last & _V4_MAX
    return IPV6_BASE | first, IPV6_BASE | last


class _Ranges:
    """Disjoint, sorted ranges of source values; membership is one binary search."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, ranges: Iterable[tuple[int, int]]) -> None:
        starts: list[int] = []
        ends: list[int] = []
        for first, last in sorted(ranges):
            if ends and first <= ends[-1] + 1:
                ends[-1] = max(ends[-1], last)  # overlapping or adjacent: one range
            else:
                starts.append(first)
                ends.append(last)
        self._starts, self._ends = starts, ends

    def __contains__(self, value: int) -> bool:
        index = bisect_right(self._starts, value) - 1
        return index >= 0 and value <= self._ends[index]

    def __len__(self) -> int:
        return len(self._starts)


class AccessList:
    """``allow`` and ``deny`` networks. Deny wins: a source in both lists is refused.

    With no ``allow`` networks every source not denied is allowed; with some, only those.
    Deny winning means a narrow exception can be cut out of a broad allow
    (``allow: [10.0.0.0/8]``, ``deny: [10.6.6.0/24]``), and the answer never depends on
    the order the networks are written in.
    """

    __slots__ = ("_allow", "_deny")

    def __init__(self, allow: Iterable[Network] = (), deny: Iterable[Network] = ()) -> None:
        allowed = _Ranges(network_range(network) for network in allow)
        self._allow = allowed if len(allowed) else None
        self._deny = _Ranges(network_range(network) for network in deny)

    def permits(self, value: int) -> bool:
        """Whether the source ``value`` (see ``source_value``) may be answered."""
        if value in self._deny:
            return False
        return self._allow is None or value in self._allow


class RateLimiter:
    """A token bucket per source: ``burst`` datagrams at once, then ``packets_per_second``.

    Each bucket is kept as one int, the time (ns) at which it will be full again: the generic
    cell rate algorithm, the same limit as counting tokens, in exact integer arithmetic. A
    source whose time is past has a full bucket. Sources are IPv4 addresses and IPv6
    ``ipv6_prefix`` networks. At most ``max_sources`` are tracked; a new one beyond that
    evicts the least recently seen (counted in ``evictions``), which then starts again with
    a full bucket.
    """

    __slots__ = (
        "_shift",
        "_table",
        "burst",
        "evictions",
        "interval",
        "ipv6_prefix",
        "max_sources",
        "packets_per_second",
        "tolerance",
    )

    def __init__(
        self,
        packets_per_second: float,
        burst: int,
        ipv6_prefix: int = 64,
        max_sources: int = 65536,
    ) -> None:
        if not packets_per_second > 0 or burst < 1 or max_sources < 1:
            raise ValueError("a rate above 0, a burst and max_sources of at least 1 are needed")
        if not 1 <= ipv6_prefix <= 128:
            raise ValueError(f"ipv6_prefix {ipv6_prefix} is not in 1..128")
        self.packets_per_second = packets_per_second
        self.burst = burst
        self.ipv6_prefix = ipv6_prefix
        self.max_sources = max_sources
        # Nanoseconds one datagram costs; rounding changes the rate by under 1 ns a datagram.
        self.interval = max(1, round(1_000_000_000 / packets_per_second))
        # How far ahead of now a bucket's full-again time may be and still hold one token.
        self.tolerance = (burst - 1) * self.interval
        self._shift = 128 - ipv6_prefix
        self._table: OrderedDict[int, int] = OrderedDict()
        self.evictions = 0

    @classmethod
    def from_config(cls, limit: RateLimit) -> RateLimiter:
        return cls(limit.packets_per_second, limit.burst, limit.ipv6_prefix, limit.max_sources)

    def matches(self, limit: RateLimit) -> bool:
        """Whether this limiter enforces exactly ``limit`` (so its buckets can be kept)."""
        return (self.packets_per_second, self.burst, self.ipv6_prefix, self.max_sources) == (
            limit.packets_per_second,
            limit.burst,
            limit.ipv6_prefix,
            limit.max_sources,
        )

    @property
    def tracked(self) -> int:
        """How many sources have a bucket now."""
        return len(self._table)

    def key(self, value: int) -> int:
        """The bucket a source value belongs to: the IPv4 address, or the IPv6 prefix."""
        if value < IPV6_BASE:
            return value
        return IPV6_BASE | (value ^ IPV6_BASE) >> self._shift

    def allow(self, key: int, now: int) -> bool:
        """Take a token from ``key``'s bucket at ``now`` (monotonic ns); False when empty."""
        table = self._table
        full_at = table.get(key)
        if full_at is None:
            if len(table) >= self.max_sources:
                table.popitem(last=False)
                self.evictions += 1
            table[key] = now + self.interval
            return True
        # Seen, whether answered or not: a flooding source stays tracked and stays limited.
        table.move_to_end(key)
        if full_at <= now:  # the bucket has filled up again
            table[key] = now + self.interval
            return True
        if full_at - now > self.tolerance:  # less than one token left
            return False
        table[key] = full_at + self.interval
        return True


class ReflectionGuard:
    """No reply to sources that are not clients, or larger than the request allows.

    Refused: source port 0 and the ``ports`` given; the unspecified addresses (0.0.0.0/8,
    ::), multicast (224.0.0.0/4, ff00::/8), the limited broadcast 255.255.255.255 and the
    ``broadcast`` addresses given (the host's subnet broadcasts, which only the host knows).
    """

    __slots__ = ("_not_clients", "max_amplification", "ports")

    def __init__(
        self,
        ports: Iterable[int],
        max_amplification: float = 2.0,
        broadcast: Iterable[ipaddress.IPv4Address] = (),
    ) -> None:
        self.ports = frozenset({0, *ports})
        self.max_amplification = max_amplification
        subnet = ((int(address), int(address)) for address in broadcast)
        self._not_clients = _Ranges((*_NOT_A_CLIENT, *subnet))

    def refuses_port(self, port: int) -> bool:
        return port in self.ports

    def refuses_source(self, value: int) -> bool:
        """Whether the source ``value`` (see ``source_value``) cannot be a client."""
        return value in self._not_clients

    def amplification_ok(self, request_len: int, reply_len: int, family: int) -> bool:
        """Whether a reply of ``reply_len`` payload bytes to a request of ``request_len`` is
        at most ``max_amplification`` times as large on the wire, headers counted.

        ``family`` is the IP version on the wire (4 for v4-mapped sources).
        """
        overhead = IPV4_OVERHEAD if family == 4 else IPV6_OVERHEAD
        return reply_len + overhead <= self.max_amplification * (request_len + overhead)


class Guard:
    """The source policy of one listener: access, then reflection, then rate limit.

    ``check`` judges a datagram before anything is built for it; ``reply_ok`` judges the
    reply, and is needed only when ``checks_replies`` (an echo reply is never larger than
    its request). Built by ``build_guard``, which returns None when there is nothing to check.
    """

    __slots__ = (
        "__weakref__",
        "_by_name",
        "_cache",
        "_factor",
        "_ports",
        "_reported",
        "_wire_v4",
        "access",
        "checks_replies",
        "limiter",
        "reflection",
    )

    def __init__(
        self,
        access: AccessList | None = None,
        limiter: RateLimiter | None = None,
        reflection: ReflectionGuard | None = None,
        *,
        checks_replies: bool = True,
    ) -> None:
        self.access = access
        self.limiter = limiter
        self.reflection = reflection
        self.checks_replies = reflection is not None and checks_replies
        self._ports: frozenset[int] = frozenset() if reflection is None else reflection.ports
        self._factor = 0.0 if reflection is None else reflection.max_amplification
        # Host text -> a negative refusal code, or its bucket key (its value when there is no
        # limiter). An address never changes its verdict while this guard lives.
        self._cache: dict[str, int] = {}
        # The same verdicts by raw peer name (a sockaddr as the batched path receives it:
        # address and port), and whether that peer is IPv4 on the wire, as "." in its text.
        self._by_name: dict[bytes | int, int] = {}
        self._wire_v4: dict[bytes | int, bool] = {}
        # A kept limiter's earlier evictions were reported by the guard that had it before.
        self._reported = 0 if limiter is None else limiter.evictions

    def check(self, host: str, port: int, now: int) -> Verdict | None:
        """Why a datagram from ``host``:``port`` at ``now`` (monotonic ns) gets no reply;
        None when it may be answered. A datagram that passes has used its rate-limit token.
        """
        entry = self._cache.get(host)
        if entry is None:
            entry = self._classify(host)
        if entry < 0:
            return _REFUSED_BY_CODE[entry]
        if port in self._ports:
            return Verdict.REFLECTION
        limiter = self.limiter
        if limiter is not None and not limiter.allow(entry, now):
            return Verdict.RATE_LIMITED
        return None

    def check_name(
        self, name: bytes | int, now: int, decode: Callable[[Any], tuple[str, int]]
    ) -> Verdict | None:
        """``check`` for a peer given as its raw socket address ``name`` (the batched path).

        ``name`` is any key that identifies one peer (the caller's encoding of its sockaddr:
        bytes, or an int). ``decode`` turns it into (host, port) as recvfrom would give them;
        it is called only the first time a name is seen, so a known peer costs one dict
        lookup, as a known host does in ``check``. The verdicts are those of ``check``.
        """
        entry = self._by_name.get(name)
        if entry is None:
            entry = self._learn_name(name, decode)
        if entry < 0:
            return _REFUSED_BY_CODE[entry]
        limiter = self.limiter
        if limiter is not None and not limiter.allow(entry, now):
            return Verdict.RATE_LIMITED
        return None

    def _learn_name(self, name: bytes | int, decode: Callable[[Any], tuple[str, int]]) -> int:
        host, port = decode(name)
        entry = self._cache.get(host)
        if entry is None:
            entry = self._classify(host)
        if entry >= 0 and port in self._ports:
            entry = _REFLECTED_PORT_CODE
        by_name, wire_v4 = self._by_name, self._wire_v4
        if len(by_name) >= CACHE_SIZE:
            by_name.clear()
            wire_v4.clear()
        by_name[name] = entry
        wire_v4[name] = "." in host
        return entry

    def reply_ok_name(self, name: bytes | int, request_len: int, reply_len: int) -> bool:
        """``reply_ok`` for a peer ``check_name`` has just judged (and so remembers)."""
        factor = self._factor
        if not factor:
            return True
        if self._wire_v4.get(name, False):
            return reply_len + IPV4_OVERHEAD <= factor * (request_len + IPV4_OVERHEAD)
        return reply_len + IPV6_OVERHEAD <= factor * (request_len + IPV6_OVERHEAD)

    def _classify(self, host: str) -> int:
        try:
            value = source_value(host)
        except ValueError:
            return _DENIED  # nothing to judge it by: refused, and not remembered
        if self.access is not None and not self.access.permits(value):
            entry = _DENIED
        elif self.reflection is not None and self.reflection.refuses_source(value):
            entry = _NOT_A_CLIENT_CODE
        elif self.limiter is not None:
            entry = self.limiter.key(value)
        else:
            entry = value
        cache = self._cache
        if len(cache) >= CACHE_SIZE:
            cache.clear()
        cache[host] = entry
        return entry

    def reply_ok(self, host: str, request_len: int, reply_len: int) -> bool:
        """Whether a reply of ``reply_len`` bytes to ``request_len`` from ``host`` may be sent.

        The same arithmetic as ``ReflectionGuard.amplification_ok``, inlined: it runs for
        every reply.
        """
        factor = self._factor
        if not factor:
            return True
        # Only IPv4 sources are written with dots: 192.0.2.1, or ::ffff:192.0.2.1 on a
        # dual-stack socket, which is IPv4 on the wire. (The deprecated ::192.0.2.1 form is
        # IPv6; counting its smaller IPv4 headers makes the check stricter, never looser.)
        if "." in host:
            return reply_len + IPV4_OVERHEAD <= factor * (request_len + IPV4_OVERHEAD)
        return reply_len + IPV6_OVERHEAD <= factor * (request_len + IPV6_OVERHEAD)

    def take_evictions(self) -> int:
        """Rate-limit evictions since the last call, for the caller's counter."""
        limiter = self.limiter
        if limiter is None:
            return 0
        new = limiter.evictions - self._reported
        self._reported = limiter.evictions
        return new


def build_guard(
    listener: Listener,
    broadcast: Iterable[ipaddress.IPv4Address] = (),
    previous: Guard | None = None,
) -> Guard | None:
    """The guard for ``listener``, or None when it has nothing to check.

    ``broadcast`` lists the host's subnet broadcast addresses, refused as sources like
    255.255.255.255. ``previous`` is the guard the listener had before a reload: its rate
    limiter, and so every source's bucket, is kept when the limit did not change.
    """
    limit = listener.rate_limit
    broadcast = frozenset(broadcast)
    policy = listener.reflection_guard
    key: _PolicyKey | None = None
    if limit is None:
        # Without a rate limit a guard holds no state of its own (its caches follow from the
        # policy alone), so listeners with the same policy share one: thousands of listeners
        # written alike cost one guard, not thousands.
        key = (listener.allow, listener.deny, policy, listener.responder, broadcast)
        shared = _SHARED.get(key)
        if shared is not None:
            return shared
    access = None
    if listener.allow or listener.deny:
        access = AccessList(listener.allow, listener.deny)
    limiter = None
    if limit is not None:
        kept = previous.limiter if previous is not None else None
        limiter = (
            kept if kept is not None and kept.matches(limit) else RateLimiter.from_config(limit)
        )
    reflection = None
    # A discard listener sends nothing, so it has nothing to reflect.
    if policy.enabled and listener.responder is not Responder.DISCARD:
        reflection = ReflectionGuard(policy.ports, policy.max_amplification, broadcast)
    if access is None and limiter is None and reflection is None:
        return None
    # An echo reply is the request itself: never larger, whatever the factor (at least 1.0).
    guard = Guard(
        access, limiter, reflection, checks_replies=listener.responder is not Responder.ECHO
    )
    if key is not None:
        _SHARED[key] = guard
    return guard


# Allow list, deny list, reflection policy, responder, the host's broadcasts.
_PolicyKey = tuple[
    tuple[Network, ...], tuple[Network, ...], ReflectionPolicy, Responder, frozenset[object]
]
# Guards without a rate limit, by policy; one lives as long as a listener uses it.
_SHARED: weakref.WeakValueDictionary[_PolicyKey, Guard] = weakref.WeakValueDictionary()
