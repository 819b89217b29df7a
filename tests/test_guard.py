"""The source guard: access lists, the per-source rate limit, the reflection guard.

Pure: time is passed in as integer nanoseconds, so every rate-limit case is exact. Tables pin
the documented behaviour; property tests compare the access check with ``ipaddress`` and the
rate limiter with a plain token bucket.
"""

from __future__ import annotations

import ipaddress
import socket
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udpbindd import batch, config
from udpbindd.batch import host_port
from udpbindd.config import Listener, Literal, RateLimit, ReflectionPolicy, Responder
from udpbindd.guard import (
    CACHE_SIZE,
    IPV6_BASE,
    AccessList,
    Guard,
    RateLimiter,
    ReflectionGuard,
    Verdict,
    build_guard,
    network_range,
    source_value,
)
from udpbindd.respond import size_reply
from udpbindd.stats import Stats

SECOND = 1_000_000_000
MS = 1_000_000
CLIENT_PORT = 40000  # an ordinary ephemeral source port


def nets(*texts: str) -> tuple[config.Network, ...]:
    return tuple(ipaddress.ip_network(text) for text in texts)


def listener(responder: Responder = Responder.SIZE, **policy: object) -> Listener:
    address = ipaddress.ip_address("127.0.0.1")
    return Listener("t", "127.0.0.1", Literal(address), 1060, responder=responder, **policy)  # type: ignore[arg-type]


def guard_of(**policy: object) -> Guard:
    guard = build_guard(listener(**policy))
    assert guard is not None
    return guard


# ---------------------------------------------------------------------------------------------
# source values: one number line for both families


@pytest.mark.parametrize(
    ("host", "value"),
    [
        ("0.0.0.0", 0),
        ("192.0.2.1", 0xC0000201),
        ("255.255.255.255", 0xFFFFFFFF),
        ("::ffff:192.0.2.1", 0xC0000201),  # a dual-stack socket's IPv4 client is IPv4
        ("::", IPV6_BASE),
        ("::1", IPV6_BASE | 1),
        ("::c000:201", IPV6_BASE | 0xC0000201),  # IPv4-compatible: IPv6, not the IPv4 address
        ("fe80::1%eth0", IPV6_BASE | 0xFE80 << 112 | 1),  # the zone is not the address
        ("2001:db8::1", IPV6_BASE | 0x20010DB8 << 96 | 1),
    ],
)
def test_source_value(host: str, value: int) -> None:
    assert source_value(host) == value


@pytest.mark.parametrize("host", ["", "localhost", "192.0.2.256", "1::2::3", "192.0.2.1%eth0"])
def test_source_value_rejects_text_that_is_no_address(host: str) -> None:
    with pytest.raises(ValueError, match="is not an IP address"):
        source_value(host)


@pytest.mark.parametrize(
    ("network", "first", "last"),
    [
        ("10.0.0.0/8", 0x0A000000, 0x0AFFFFFF),
        ("::ffff:10.0.0.0/104", 0x0A000000, 0x0AFFFFFF),
        ("::/0", IPV6_BASE, IPV6_BASE | (1 << 128) - 1),
        ("2001:db8::/32", IPV6_BASE | 0x20010DB8 << 96, IPV6_BASE | (0x20010DB9 << 96) - 1),
    ],
)
def test_network_range(network: str, first: int, last: int) -> None:
    assert network_range(ipaddress.ip_network(network)) == (first, last)


# ---------------------------------------------------------------------------------------------
# access lists: deny wins over allow

ACCESS_CASES = [
    # allow, deny, source, permitted
    ((), (), "192.0.2.1", True),
    (("192.0.2.0/24",), (), "192.0.2.1", True),
    (("192.0.2.0/24",), (), "192.0.2.0", True),
    (("192.0.2.0/24",), (), "192.0.2.255", True),
    (("192.0.2.0/24",), (), "192.0.3.0", False),
    (("192.0.2.0/24",), (), "192.0.1.255", False),
    (("192.0.2.0/24",), (), "2001:db8::1", False),  # with allow set, everything else is refused
    (("192.0.2.7/32",), (), "192.0.2.7", True),
    (("192.0.2.7/32",), (), "192.0.2.8", False),
    ((), ("192.0.2.0/24",), "192.0.2.9", False),
    ((), ("192.0.2.0/24",), "198.51.100.9", True),  # deny alone refuses only what it lists
    (("2001:db8::/32",), (), "2001:db8:ffff::1", True),
    (("2001:db8::/32",), (), "2001:db9::1", False),
    (("2001:db8::/32",), (), "192.0.2.1", False),
    (("fe80::/10",), (), "fe80::1%eth0", True),
    # v4-mapped sources are matched as IPv4, by IPv4 networks and by ::ffff: ones.
    (("192.0.2.0/24",), (), "::ffff:192.0.2.1", True),
    (("::ffff:192.0.2.0/120",), (), "192.0.2.1", True),
    (("::ffff:192.0.2.0/120",), (), "::ffff:192.0.2.1", True),
    ((), ("192.0.2.0/24",), "::ffff:192.0.2.1", False),
    # ::/0 is every IPv6 client; a dual-stack socket's IPv4 clients are not IPv6 ones.
    (("::/0",), (), "::ffff:192.0.2.1", False),
    (("::/0",), (), "2001:db8::1", True),
    (("0.0.0.0/0",), (), "::ffff:192.0.2.1", True),
    # Deny wins over allow, whichever is narrower and whatever the order.
    (("10.0.0.0/8",), ("10.6.6.0/24",), "10.6.6.6", False),
    (("10.0.0.0/8",), ("10.6.6.0/24",), "10.6.7.1", True),
    (("10.6.6.0/24",), ("10.0.0.0/8",), "10.6.6.6", False),
    (("192.0.2.1/32",), ("192.0.2.1/32",), "192.0.2.1", False),
    (("2001:db8::/32",), ("2001:db8:bad::/48",), "2001:db8:bad::1", False),
    (("2001:db8::/32",), ("2001:db8:bad::/48",), "2001:db8:bae::1", True),
    # Adjacent and overlapping networks merge into one range without gaps.
    (("10.0.0.0/9", "10.128.0.0/9"), (), "10.127.255.255", True),
    (("10.0.0.0/9", "10.128.0.0/9"), (), "10.128.0.0", True),
    (("10.0.0.0/8", "10.1.0.0/16", "10.200.0.0/16"), (), "10.255.255.255", True),
    (("10.0.0.0/8", "10.1.0.0/16"), (), "11.0.0.0", False),
]


@pytest.mark.parametrize(("allow", "deny", "source", "permitted"), ACCESS_CASES)
def test_access(
    allow: tuple[str, ...], deny: tuple[str, ...], source: str, permitted: bool
) -> None:
    access = AccessList(nets(*allow), nets(*deny))
    assert access.permits(source_value(source)) is permitted
    if allow or deny:
        # The guard says the same, as reason "denied".
        guard = guard_of(allow=nets(*allow), deny=nets(*deny))
        assert guard.check(source, CLIENT_PORT, 0) == (None if permitted else Verdict.DENIED)


# Reference: membership by the ipaddress module, v4-mapped sources and networks as IPv4.
def _as_ipv4(network: config.Network) -> config.Network:
    if network.version == 6 and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped  # type: ignore[union-attr]
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _reference(
    allow: list[config.Network], deny: list[config.Network], source: ipaddress._BaseAddress
) -> bool:
    if isinstance(source, ipaddress.IPv6Address) and source.ipv4_mapped is not None:
        source = source.ipv4_mapped

    def listed(networks: list[config.Network]) -> bool:
        return any(
            source.version == n.version and source in n  # type: ignore[operator]
            for n in map(_as_ipv4, networks)
        )

    return not listed(deny) and (not allow or listed(allow))


_v4_networks = st.builds(
    lambda value, prefix: ipaddress.IPv4Network((value, prefix), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
_v6_networks = st.builds(
    lambda value, prefix: ipaddress.IPv6Network((value, prefix), strict=False),
    st.integers(0, 2**128 - 1),
    st.integers(0, 128),
)
_mapped_networks = st.builds(
    lambda value, prefix: ipaddress.IPv6Network((0xFFFF << 32 | value, prefix), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(90, 128),  # some wider than ::ffff:0:0/96, which stay IPv6
)
_networks = st.one_of(_v4_networks, _v6_networks, _mapped_networks)


@st.composite
def _sources(draw: st.DrawFn, networks: list[config.Network]) -> ipaddress._BaseAddress:
    """Any address, or one at (or just past) the edge of a listed network."""
    if networks and draw(st.booleans()):
        network = draw(st.sampled_from(networks))
        edge = draw(st.sampled_from([network.network_address, network.broadcast_address]))
        step = draw(st.sampled_from([-1, 0, 1]))
        value = int(edge) + step
        if network.version == 4 and 0 <= value < 2**32:
            return ipaddress.IPv4Address(value)
        if network.version == 6 and 0 <= value < 2**128:
            return ipaddress.IPv6Address(value)
    kind = draw(st.sampled_from(["v4", "v6", "mapped"]))
    if kind == "v4":
        return ipaddress.IPv4Address(draw(st.integers(0, 2**32 - 1)))
    if kind == "mapped":
        return ipaddress.IPv6Address(0xFFFF << 32 | draw(st.integers(0, 2**32 - 1)))
    return ipaddress.IPv6Address(draw(st.integers(0, 2**128 - 1)))


@settings(max_examples=400, deadline=None)
@given(
    allow=st.lists(_networks, max_size=6),
    deny=st.lists(_networks, max_size=6),
    data=st.data(),
)
def test_access_agrees_with_ipaddress(
    allow: list[config.Network], deny: list[config.Network], data: st.DataObject
) -> None:
    access = AccessList(allow, deny)
    for _ in range(20):
        source = data.draw(_sources(allow + deny))
        host = str(source)
        if isinstance(source, ipaddress.IPv6Address) and source.ipv4_mapped is not None:
            host = f"::ffff:{source.ipv4_mapped}"  # as recvfrom writes it
        assert access.permits(source_value(host)) is _reference(allow, deny, source), host


# ---------------------------------------------------------------------------------------------
# the rate limiter: a token bucket per source, in integer nanoseconds


def test_burst_then_rate() -> None:
    limiter = RateLimiter(packets_per_second=10, burst=3)
    key = limiter.key(source_value("192.0.2.1"))
    assert [limiter.allow(key, 0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow(key, 99 * MS) is False  # not yet a tenth of a second
    assert limiter.allow(key, 100 * MS) is True  # one token back
    assert limiter.allow(key, 100 * MS) is False
    assert limiter.allow(key, 150 * MS) is False
    assert limiter.allow(key, 200 * MS) is True


def test_refill_stops_at_the_burst() -> None:
    limiter = RateLimiter(packets_per_second=10, burst=3)
    assert [limiter.allow(1, 0) for _ in range(3)] == [True] * 3
    later = 60 * SECOND  # 600 tokens' worth of time, but the bucket holds 3
    assert [limiter.allow(1, later) for _ in range(4)] == [True, True, True, False]


def test_refused_datagrams_take_no_token() -> None:
    limiter = RateLimiter(packets_per_second=1, burst=1)
    assert limiter.allow(1, 0) is True
    # A flood at 1 ms intervals keeps being refused, but does not push the next token away.
    assert not any(limiter.allow(1, t * MS) for t in range(1, 1000))
    assert limiter.allow(1, SECOND) is True


def test_a_fractional_rate() -> None:
    limiter = RateLimiter(packets_per_second=0.5, burst=1)
    assert limiter.interval == 2 * SECOND
    assert limiter.allow(1, 0) is True
    assert limiter.allow(1, 2 * SECOND - 1) is False
    assert limiter.allow(1, 2 * SECOND) is True


def test_sources_have_their_own_buckets() -> None:
    guard = guard_of(rate_limit=RateLimit(packets_per_second=1, burst=2))
    for host in ("192.0.2.1", "192.0.2.2", "2001:db8:0:1::1", "2001:db8:0:2::1"):
        verdicts = [guard.check(host, CLIENT_PORT, 0) for _ in range(3)]
        assert verdicts == [None, None, Verdict.RATE_LIMITED], host


@pytest.mark.parametrize(
    ("prefix", "first", "second", "shared"),
    [
        (64, "2001:db8:0:1::1", "2001:db8:0:1:ffff:ffff:ffff:ffff", True),
        (64, "2001:db8:0:1::1", "2001:db8:0:2::1", False),
        (56, "2001:db8:0:1::1", "2001:db8:0:ff::1", True),
        (56, "2001:db8:0:1::1", "2001:db8:0:100::1", False),
        (128, "2001:db8::1", "2001:db8::2", False),
        (1, "2001:db8::1", "7fff::1", True),
        (1, "2001:db8::1", "8000::1", False),
        # IPv4 sources are one address each, and never share with an IPv6 source.
        (64, "192.0.2.1", "192.0.2.2", False),
        (128, "1.0.0.1", "::100:1", False),  # the same low 32 bits
        (64, "192.0.2.1", "::ffff:192.0.2.1", True),  # the same IPv4 client
    ],
)
def test_ipv6_sources_are_grouped_by_prefix(
    prefix: int, first: str, second: str, shared: bool
) -> None:
    guard = guard_of(rate_limit=RateLimit(packets_per_second=1, burst=1, ipv6_prefix=prefix))
    assert guard.check(first, CLIENT_PORT, 0) is None
    expected = Verdict.RATE_LIMITED if shared else None
    assert guard.check(second, CLIENT_PORT, 0) is expected


def test_the_least_recently_seen_source_is_evicted() -> None:
    limiter = RateLimiter(packets_per_second=1, burst=1, max_sources=2)
    a, b, c = 1, 2, 3
    assert (limiter.allow(a, 0), limiter.allow(b, 0)) == (True, True)
    assert limiter.allow(a, 1) is False  # a is seen again (and refused): b is now the oldest
    assert limiter.allow(c, 2) is True
    assert (limiter.tracked, limiter.evictions) == (2, 1)
    assert limiter.allow(a, 3) is False  # a kept its empty bucket
    assert limiter.allow(b, 4) is True  # b was forgotten: a full bucket again, evicting c
    assert (limiter.tracked, limiter.evictions) == (2, 2)


def test_no_limiter_no_evictions() -> None:
    assert guard_of().take_evictions() == 0


def test_the_guard_reports_evictions_once() -> None:
    guard = guard_of(rate_limit=RateLimit(packets_per_second=1, burst=1, max_sources=2))
    for index in range(5):
        guard.check(f"192.0.2.{index}", CLIENT_PORT, 0)
    assert guard.take_evictions() == 3
    assert guard.take_evictions() == 0
    guard.check("192.0.2.100", CLIENT_PORT, 0)
    assert guard.take_evictions() == 1
    assert guard.limiter is not None
    assert guard.limiter.evictions == 4


@pytest.mark.parametrize(
    ("rate", "burst", "prefix", "sources"),
    [(0, 1, 64, 1), (-1, 1, 64, 1), (1, 0, 64, 1), (1, 1, 0, 1), (1, 1, 129, 1), (1, 1, 64, 0)],
)
def test_rate_limiter_refuses_impossible_settings(
    rate: float, burst: int, prefix: int, sources: int
) -> None:
    with pytest.raises(ValueError, match=r"ipv6_prefix|at least 1"):
        RateLimiter(rate, burst, prefix, sources)


class _TokenBucket:
    """The textbook bucket: tokens (scaled to ns) refill with time, capped at the burst.

    Forgotten sources start full, as in the limiter; the order of forgetting is a plain list.
    """

    def __init__(self, interval: int, burst: int, max_sources: int) -> None:
        self.interval, self.capacity, self.max_sources = interval, burst * interval, max_sources
        self.tokens: dict[int, tuple[int, int]] = {}  # key -> (scaled tokens, last time)
        self.order: list[int] = []
        self.evictions = 0

    def allow(self, key: int, now: int) -> bool:
        if key in self.order:
            self.order.remove(key)
        elif len(self.order) == self.max_sources:
            del self.tokens[self.order.pop(0)]
            self.evictions += 1
        self.order.append(key)
        tokens, last = self.tokens.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last))
        allowed = tokens >= self.interval
        self.tokens[key] = (tokens - self.interval if allowed else tokens, now)
        return allowed


_arrivals = st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 3 * SECOND)), min_size=1, max_size=120
).map(lambda pairs: [(key, t) for key, t in sorted(pairs, key=lambda pair: pair[1])])


@settings(max_examples=300, deadline=None)
@given(
    rate=st.one_of(st.integers(1, 1000), st.floats(0.1, 1000.0)),
    burst=st.integers(1, 20),
    max_sources=st.integers(1, 8),
    arrivals=_arrivals,
)
def test_limiter_is_a_token_bucket(
    rate: float, burst: int, max_sources: int, arrivals: list[tuple[int, int]]
) -> None:
    limiter = RateLimiter(rate, burst, max_sources=max_sources)
    bucket = _TokenBucket(limiter.interval, burst, max_sources)
    for key, now in arrivals:
        assert limiter.allow(key, now) is bucket.allow(key, now), (key, now)
        assert limiter.tracked <= max_sources
    assert limiter.evictions == bucket.evictions


@settings(max_examples=300, deadline=None)
@given(
    rate=st.one_of(st.integers(1, 1000), st.floats(0.1, 1000.0)),
    burst=st.integers(1, 20),
    times=st.lists(st.integers(0, 3 * SECOND), min_size=1, max_size=200).map(sorted),
)
def test_replies_never_exceed_burst_plus_rate_times_elapsed(
    rate: float, burst: int, times: list[int]
) -> None:
    limiter = RateLimiter(rate, burst)
    allowed = [now for now in times if limiter.allow(7, now)]
    # In any stretch of time from one answered datagram to another, inclusive:
    # answered <= burst + elapsed / interval (the rate, rounded to whole nanoseconds).
    for i, start in enumerate(allowed):
        for j in range(i, len(allowed)):
            assert (j - i + 1 - burst) * limiter.interval <= allowed[j] - start
    # And it is a limit, not a wall: a source that keeps to the rate is always answered.
    steady = RateLimiter(rate, burst)
    assert all(steady.allow(7, k * steady.interval) for k in range(50))


def test_rate_rounds_to_whole_nanoseconds() -> None:
    assert RateLimiter(3, 1).interval == 333_333_333
    assert RateLimiter(1_000_000, 1).interval == 1000
    assert RateLimiter(3e9, 1).interval == 1  # never 0: that would be no limit


# ---------------------------------------------------------------------------------------------
# the reflection guard


@pytest.mark.parametrize("port", [0, *config.DEFAULT_REFLECTION_PORTS])
def test_default_reflection_ports_are_refused(port: int) -> None:
    assert guard_of().check("192.0.2.1", port, 0) is Verdict.REFLECTION
    assert guard_of().check("2001:db8::1", port, 0) is Verdict.REFLECTION


@pytest.mark.parametrize("port", [1, 6, 8, 54, 1024, 1060, 32768, 40000, 60999, 65535])
def test_other_source_ports_are_answered(port: int) -> None:
    assert guard_of().check("192.0.2.1", port, 0) is None


def test_configured_ports_replace_the_default_list() -> None:
    guard = guard_of(reflection_guard=ReflectionPolicy(ports=(5060,)))
    assert guard.check("192.0.2.1", 5060, 0) is Verdict.REFLECTION
    assert guard.check("192.0.2.1", 53, 0) is None  # no longer listed
    assert guard.check("192.0.2.1", 0, 0) is Verdict.REFLECTION  # always refused
    bare = guard_of(reflection_guard=ReflectionPolicy(ports=()))
    assert [bare.check("192.0.2.1", port, 0) for port in (0, 7, 19)] == [
        Verdict.REFLECTION,
        None,
        None,
    ]


@pytest.mark.parametrize(
    "host",
    [
        "0.0.0.0",
        "0.1.2.3",  # 0.0.0.0/8: "this host on this network", never a reply address
        "0.255.255.255",
        "224.0.0.1",
        "224.0.0.251",
        "239.255.255.255",
        "255.255.255.255",
        "::ffff:0.0.0.0",
        "::ffff:224.0.0.1",
        "::ffff:255.255.255.255",
        "::",
        "ff02::1",
        "ff05::1:3",
        "ff0e::1",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    ],
)
def test_sources_that_are_not_clients_are_refused(host: str) -> None:
    assert guard_of().check(host, CLIENT_PORT, 0) is Verdict.REFLECTION


@pytest.mark.parametrize(
    "host",
    [
        "1.0.0.0",
        "127.0.0.1",
        "192.0.2.255",  # a subnet broadcast only when the host says so (below)
        "223.255.255.255",
        "240.0.0.1",
        "255.255.255.254",
        "::1",
        "::0.0.0.1",
        "ff::1",  # 00ff::1, not multicast: the first byte is 0x00
        "fe80::1%lo",
        "feff::1",
        "2001:db8::1",
    ],
)
def test_client_sources_are_answered(host: str) -> None:
    assert guard_of().check(host, CLIENT_PORT, 0) is None


def test_reflection_guard_alone() -> None:
    reflection = ReflectionGuard([53], 2.0, [ipaddress.IPv4Address("192.0.2.255")])
    assert [reflection.refuses_port(port) for port in (0, 53, 54)] == [True, True, False]
    refused = [reflection.refuses_source(source_value(h)) for h in ("192.0.2.255", "192.0.2.1")]
    assert refused == [True, False]


def test_subnet_broadcasts_are_refused_when_known() -> None:
    broadcast = [ipaddress.IPv4Address("192.0.2.255"), ipaddress.IPv4Address("10.255.255.255")]
    guard = build_guard(listener(), broadcast=broadcast)
    assert guard is not None
    for host in ("192.0.2.255", "10.255.255.255", "::ffff:192.0.2.255"):
        assert guard.check(host, CLIENT_PORT, 0) is Verdict.REFLECTION, host
    assert guard.check("192.0.2.254", CLIENT_PORT, 0) is None


# Amplification: (reply + headers) <= factor * (request + headers), 28 header bytes over
# IPv4 and 48 over IPv6.
AMPLIFICATION_CASES = [
    # family, request bytes, reply bytes, factor, allowed
    (4, 1, 21, 2.0, True),  # "Your data was 1 bytes": 49 / 29 = 1.69
    (4, 0, 21, 2.0, True),  # "Your data was 0 bytes": 49 / 28 = 1.75, the worst size reply
    (4, 0, 21, 1.75, True),
    (4, 0, 21, 1.74, False),
    (6, 0, 21, 2.0, True),  # 69 / 48 = 1.44
    (6, 0, 21, 1.43, False),
    (4, 2, 32, 2.0, True),  # 60 / 30: exactly 2.0 is allowed
    (4, 2, 33, 2.0, False),  # 61 / 30
    (6, 2, 52, 2.0, True),  # 100 / 50
    (6, 2, 53, 2.0, False),  # 101 / 50
    (4, 0, 40, 2.0, False),  # 68 / 28 = 2.43 over IPv4 ...
    (6, 0, 40, 2.0, True),  # ... but 88 / 48 = 1.83 over IPv6
    (4, 100, 100, 1.0, True),  # an echo: never larger
    (4, 100, 101, 1.0, False),
    (4, 0, 65507, 100.0, False),  # 65535 / 28
    (4, 1000, 65507, 100.0, True),  # 65535 / 1028 = 63.7
]


@pytest.mark.parametrize(("family", "asked", "reply", "factor", "allowed"), AMPLIFICATION_CASES)
def test_amplification_arithmetic(
    family: int, asked: int, reply: int, factor: float, allowed: bool
) -> None:
    reflection = ReflectionGuard((), factor)
    assert reflection.amplification_ok(asked, reply, family) is allowed
    # The guard's inlined copy of the arithmetic agrees, taking the family from the host.
    guard = Guard(reflection=reflection)
    for host in ("192.0.2.1", "::ffff:192.0.2.1") if family == 4 else ("2001:db8::1", "::1"):
        assert guard.reply_ok(host, asked, reply) is allowed, host


def test_the_wire_family_comes_from_the_host_text() -> None:
    guard = guard_of()
    # 40 bytes for 0: 68/28 = 2.43 over IPv4 (refused), 88/48 = 1.83 over IPv6 (sent).
    assert guard.reply_ok("192.0.2.1", 0, 40) is False
    assert guard.reply_ok("::ffff:192.0.2.1", 0, 40) is False  # dual-stack: IPv4 on the wire
    assert guard.reply_ok("2001:db8::1", 0, 40) is True
    assert guard.reply_ok("fe80::1%eth0", 0, 40) is True
    # The deprecated IPv4-compatible form is IPv6, but written with dots: judged as IPv4,
    # which is stricter.
    assert guard.reply_ok("::192.0.2.1", 0, 40) is False


@pytest.mark.parametrize(("family", "overhead"), [(4, 28), (6, 48)])
def test_every_size_reply_passes_the_default_factor(family: int, overhead: int) -> None:
    reflection = ReflectionGuard((), 2.0)
    worst = 0.0
    for n in range(65536):
        reply = len(size_reply(memoryview(b""), n))
        assert reflection.amplification_ok(n, reply, family), n
        worst = max(worst, (reply + overhead) / (n + overhead))
    assert worst == (21 + overhead) / overhead  # "Your data was 0 bytes": 1.75 and 1.4375


def test_reflection_guard_off() -> None:
    assert build_guard(listener(reflection_guard=ReflectionPolicy(enabled=False))) is None
    guard = guard_of(reflection_guard=ReflectionPolicy(enabled=False), deny=nets("198.51.100.0/24"))
    assert guard.reflection is None
    assert guard.check("224.0.0.1", 0, 0) is None  # only the access list applies
    assert guard.reply_ok("192.0.2.1", 0, 65507) is True


def test_which_replies_need_a_size_check() -> None:
    assert guard_of().checks_replies is True  # size
    echo = build_guard(listener(Responder.ECHO))
    assert echo is not None
    assert echo.checks_replies is False  # an echo is never larger than its request
    # A discard listener sends nothing: there is nothing to reflect, so no guard at all...
    assert build_guard(listener(Responder.DISCARD)) is None
    # ...unless it has an access list or a rate limit, which still count their drops.
    discard = build_guard(listener(Responder.DISCARD, deny=nets("192.0.2.0/24")))
    assert discard is not None
    assert (discard.reflection, discard.checks_replies) == (None, False)
    assert discard.check("192.0.2.1", CLIENT_PORT, 0) is Verdict.DENIED
    assert discard.check("224.0.0.1", 0, 0) is None


# ---------------------------------------------------------------------------------------------
# the guard as a whole: order, caching, reloads


def test_order_access_then_reflection_then_rate_limit() -> None:
    guard = guard_of(
        allow=nets("192.0.2.0/24", "224.0.0.0/4"),
        deny=nets("192.0.2.66/32"),
        rate_limit=RateLimit(packets_per_second=1, burst=1),
    )
    # Denied wins over a reflection port and over an address that is no client.
    assert guard.check("192.0.2.66", 53, 0) is Verdict.DENIED
    assert guard.check("198.51.100.1", 0, 0) is Verdict.DENIED
    # Allowed, but multicast or from a reflection port: reflection, and no token is taken.
    assert guard.check("224.0.0.1", CLIENT_PORT, 0) is Verdict.REFLECTION
    assert guard.check("192.0.2.1", 19, 0) is Verdict.REFLECTION
    assert guard.check("192.0.2.1", 19, 0) is Verdict.REFLECTION
    assert guard.check("192.0.2.1", CLIENT_PORT, 0) is None  # the token was still there
    assert guard.check("192.0.2.1", CLIENT_PORT, 0) is Verdict.RATE_LIMITED


def test_text_that_is_no_address_is_denied_and_not_remembered() -> None:
    guard = guard_of()
    assert guard.check("not-an-address", CLIENT_PORT, 0) is Verdict.DENIED
    assert "not-an-address" not in guard._cache


def test_the_cache_stays_bounded_under_a_flood_of_new_sources() -> None:
    guard = guard_of(deny=nets("10.0.0.0/9"), rate_limit=RateLimit(1, 1, max_sources=100))
    verdicts = {
        guard.check(str(ipaddress.IPv4Address(0x0A000000 + i)), CLIENT_PORT, 0)
        for i in range(0, 2**24, 2**24 // (CACHE_SIZE * 3))
    }
    assert len(guard._cache) <= CACHE_SIZE
    assert verdicts == {Verdict.DENIED, None}
    assert guard.limiter is not None
    assert guard.limiter.tracked == 100
    # Judged again after being forgotten, the same source gets the same answer.
    assert guard.check("10.0.0.1", CLIENT_PORT, 1) is Verdict.DENIED
    assert guard.check("10.200.0.1", CLIENT_PORT, 1) is None


def test_a_reload_keeps_the_buckets_when_the_limit_is_unchanged() -> None:
    limit = RateLimit(packets_per_second=1, burst=1, max_sources=1)
    old = guard_of(rate_limit=limit)
    assert old.check("192.0.2.1", CLIENT_PORT, 0) is None
    old.check("192.0.2.2", CLIENT_PORT, 0)  # evicts 192.0.2.1
    assert old.take_evictions() == 1
    relabelled = build_guard(listener(rate_limit=limit, deny=nets("198.51.100.0/24")), previous=old)
    assert relabelled is not None
    assert relabelled.limiter is old.limiter
    assert relabelled.check("192.0.2.2", CLIENT_PORT, 1) is Verdict.RATE_LIMITED
    assert relabelled.take_evictions() == 0  # the old guard already reported that one
    changed = build_guard(listener(rate_limit=RateLimit(2, 1, max_sources=1)), previous=old)
    assert changed is not None
    assert changed.limiter is not old.limiter
    assert changed.check("192.0.2.2", CLIENT_PORT, 1) is None  # a new limit starts afresh


def test_stats_count_each_reason() -> None:
    stats = Stats()
    for verdict in (Verdict.DENIED, Verdict.REFLECTION, Verdict.REFLECTION):
        stats.refused(verdict)
    stats.refused(Verdict.RATE_LIMITED)
    assert stats.dropped() == {
        "simulated": 0,
        "send_error": 0,
        "denied": 1,
        "rate_limited": 1,
        "reflection": 2,
    }
    assert {reason.value for reason in Verdict} <= set(stats.dropped())


# ---------------------------------------------------------------------------------------------
# the batched path judges peers by their raw socket address: the same verdicts


def sockaddr(host: str, port: int) -> bytes:
    """``host``:``port`` as the kernel writes a peer's sockaddr_in / sockaddr_in6."""
    address = ipaddress.ip_address(host)
    if address.version == 4:
        family = socket.AF_INET.to_bytes(2, sys.byteorder)
        return family + port.to_bytes(2, "big") + address.packed + bytes(8)
    family = socket.AF_INET6.to_bytes(2, sys.byteorder)
    return family + port.to_bytes(2, "big") + bytes(4) + address.packed + bytes(4)


def batch_key(name: bytes) -> bytes | int:
    """The key the batched path judges a peer by: an IPv4 sockaddr's first 8 bytes as an int."""
    return int.from_bytes(name[:8], sys.byteorder) if len(name) == 16 else name


PEER_HOSTS = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
    st.sampled_from(["127.0.0.1", "10.0.0.255", "0.0.0.0", "224.0.0.1", "::", "ff02::1"]),
)
PEERS = st.lists(
    st.tuples(PEER_HOSTS, st.sampled_from([0, 7, 19, 53, 1060, 40000, 65535])),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(peers=PEERS, request=st.integers(0, 1500), reply=st.integers(0, 3000))
def test_judging_by_raw_peer_name_gives_the_verdicts_of_judging_by_text(
    peers: list[tuple[str, int]], request: int, reply: int
) -> None:
    policy = {
        "allow": nets("0.0.0.0/1", "::/1", "::ffff:0:0/96"),
        "deny": nets("10.0.0.0/8"),
        "rate_limit": RateLimit(packets_per_second=1.0, burst=3),
    }
    by_text, by_name = guard_of(**policy), guard_of(**policy)
    for now, (host, port) in enumerate(peers):
        name = sockaddr(host, port)
        address = ipaddress.ip_address(host)
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        text = socket.inet_ntop(family, address.packed)  # as recvfrom writes it
        assert batch.unpack_peer(name)[:2] == (text, port)
        verdict = by_text.check(text, port, now)
        key = batch_key(name)
        assert by_name.check_name(key, now, host_port) == verdict
        if verdict is None:
            assert by_name.reply_ok_name(key, request, reply) == by_text.reply_ok(
                text, request, reply
            )


def test_the_raw_name_cache_is_bounded_and_keeps_judging_alike() -> None:
    by_text, by_name = guard_of(), guard_of()
    for number in range(3 * CACHE_SIZE):
        host = f"10.{number >> 16 & 255}.{number >> 8 & 255}.{number & 255}"
        port = 7 if number % 5 == 0 else 1024 + number % 60000
        key = batch_key(sockaddr(host, port))
        assert by_name.check_name(key, number, host_port) == by_text.check(host, port, number)
    assert len(by_name._by_name) <= CACHE_SIZE


def test_listeners_with_the_same_stateless_policy_share_one_guard() -> None:
    one, two = listener(), listener()
    assert build_guard(one) is build_guard(two)
    denying = listener(deny=nets("10.0.0.0/8"))
    assert build_guard(denying) is not build_guard(one)
    assert build_guard(denying) is build_guard(listener(deny=nets("10.0.0.0/8")))
    assert build_guard(listener(Responder.ECHO)) is not build_guard(one)
    broadcast = frozenset({ipaddress.IPv4Address("10.1.255.255")})
    assert build_guard(one, broadcast) is not build_guard(one)
    assert build_guard(one, broadcast) is build_guard(two, set(broadcast))
    # A rate limit is state of its own: never shared.
    limited = {"rate_limit": RateLimit(packets_per_second=5.0, burst=5)}
    assert build_guard(listener(**limited)) is not build_guard(listener(**limited))
