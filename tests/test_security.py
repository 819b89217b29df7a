"""Which datagrams get a reply, end to end: each control with the counters it must move.

Access lists, the per-source rate limit and the reflection guard on a real daemon (in-process,
loop in a thread, clients on loopback bound to 127.0.0.1, .2 and .3 or ::1); replies from the
address a wildcard socket was reached at; ICMP errors about replies; and the user switch and
privileged-port refusal of ``udpbindd run``, in real subprocesses. Counters are read from the
bindings in-process and from /metrics for the subprocess.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    AS_NOBODY,
    NOBODY,
    free_port,
    free_port_both,
    require,
    require_root,
    run_as_nobody,
)
from daemonproc import DaemonProcess, exchange, plain_lines, wait_answering
from prometheus import free_tcp_port, samples, scrape, value
from test_daemon import (
    DEADLINE,
    nothing_queued,
    running,
    served,
    serving,
    started,
    wait_counts,
    wait_until,
)

from udpbindd import privileges
from udpbindd.config import Listener, Literal
from udpbindd.daemon import Served
from udpbindd.expand import Binding
from udpbindd.guard import Verdict
from udpbindd.host import interfaces
from udpbindd.names import SocketName
from udpbindd.sockets import (
    IP_PKTINFO,
    IPV6_PKTINFO,
    enable_error_queue,
    read_error_queue,
    reply_source,
)
from udpbindd.stats import Stats

FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
# How long a refused datagram is given to show up anyway, once its refusal was counted.
QUIET = 0.2


def connected(host: str, port: int, source: str | None = None) -> socket.socket:
    """A client socket connected to ``host``:``port``, bound to ``source`` if given.

    A connected UDP socket accepts datagrams only from the address it is connected to, as
    most clients do: a reply from any other address of the host is never seen.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if source is not None:
            sock.bind((source, 0))
        sock.settimeout(DEADLINE)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def replies(sock: socket.socket, wait: float = QUIET) -> list[bytes]:
    """Every datagram that reaches ``sock`` within ``wait`` seconds of the last one."""
    timeout = sock.gettimeout()
    sock.settimeout(wait)
    got = []
    try:
        while True:
            try:
                got.append(sock.recv(70000))
            except TimeoutError:
                return got
    finally:
        sock.settimeout(timeout)


def refused(stats: Stats) -> dict[str, int]:
    """The guard's drop counters only (the reasons this file is about)."""
    reasons = stats.dropped()
    return {key: reasons[key] for key in ("denied", "rate_limited", "reflection")}


def guard_drops(denied: int = 0, rate_limited: int = 0, reflection: int = 0) -> dict[str, int]:
    return {"denied": denied, "rate_limited": rate_limited, "reflection": reflection}


def balanced(stats: Stats) -> bool:
    """Every datagram received was answered or counted under exactly one reason."""
    return stats.received_packets == stats.sent_packets + sum(stats.dropped().values())


# -- access lists -------------------------------------------------------------------------------


@pytest.mark.usefixtures("io_mode")
def test_allow_answers_the_listed_source_and_counts_the_rest_as_denied() -> None:
    port = free_port()
    text = f"""
listeners:
  - {{interface: 127.0.0.1, port: {port}, allow: [127.0.0.1/32]}}
"""
    with (
        serving(text) as daemon,
        connected("127.0.0.1", port, source="127.0.0.1") as allowed,
        connected("127.0.0.1", port, source="127.0.0.2") as other,
    ):
        stats = served(daemon, f"127.0.0.1:{port}").stats
        for number in range(5):
            other.send(b"denied %d" % number)
            allowed.send(b"allowed %d" % number)
        wait_counts(stats, received_packets=10, sent_packets=5, dropped_denied=5)
        assert [allowed.recv(100) for _ in range(5)] == [b"Your data was 9 bytes"] * 5
        assert replies(other) == []
        assert refused(stats) == guard_drops(denied=5)
        assert stats.dropped()["simulated"] == stats.send_errors == 0
        assert balanced(stats)


@pytest.mark.usefixtures("io_mode")
def test_deny_wins_over_a_broader_allow() -> None:
    port = free_port()
    text = f"""
listeners:
  - {{interface: 127.0.0.1, port: {port}, allow: 127.0.0.0/8, deny: [127.0.0.2]}}
"""
    with (
        serving(text) as daemon,
        connected("127.0.0.1", port, source="127.0.0.1") as one,
        connected("127.0.0.1", port, source="127.0.0.2") as two,
        connected("127.0.0.1", port, source="127.0.0.3") as three,
    ):
        stats = served(daemon, f"127.0.0.1:{port}").stats
        for sock in (one, two, three):
            sock.send(b"hello")
        wait_counts(stats, received_packets=3, sent_packets=2, dropped_denied=1)
        assert one.recv(100) == three.recv(100) == b"Your data was 5 bytes"
        assert replies(two) == []


@pytest.mark.usefixtures("io_mode")
def test_dual_stack_sources_are_matched_as_the_ipv4_clients_they_are() -> None:
    """A dual-stack socket sees 127.0.0.1 as ::ffff:127.0.0.1; entries match it either way."""
    port = free_port_both()
    # ::ffff:127.0.0.0/104 is read as 127.0.0.0/8; ::1 is outside the allow list.
    text = f"""
listeners:
  - name: dual
    interface: "::"
    family: dual
    port: {port}
    allow: ["::ffff:127.0.0.0/104"]
    deny: [127.0.0.2/32]
"""
    with (
        serving(text) as daemon,
        connected("127.0.0.1", port, source="127.0.0.1") as one,
        connected("127.0.0.2", port, source="127.0.0.2") as two,
        connected("::1", port) as six,
    ):
        stats = served(daemon, f"[::]:{port}").stats
        for sock in (one, two, six):
            sock.send(b"hi")
        wait_counts(stats, received_packets=3, sent_packets=1, dropped_denied=2)
        assert one.recv(100) == b"Your data was 2 bytes"
        assert replies(two) == replies(six) == []


# -- rate limit ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("io_mode")
def test_a_burst_gets_at_most_burst_plus_rate_times_time_per_source() -> None:
    rate, burst, sent = 5, 10, 200
    port = free_port()
    text = f"""
listeners:
  - interface: 127.0.0.1
    port: {port}
    responder: echo
    rate_limit: {{packets_per_second: {rate}, burst: {burst}}}
"""
    with (
        serving(text) as daemon,
        connected("127.0.0.1", port, source="127.0.0.1") as eager,
        connected("127.0.0.1", port, source="127.0.0.2") as other,
    ):
        stats = served(daemon, f"127.0.0.1:{port}").stats
        began = time.monotonic()
        for number in range(sent):
            eager.send(b"%d" % number)
        wait_until(lambda: stats.received_packets == sent, "the burst to be read")
        wait_until(lambda: balanced(stats), "every datagram answered or refused")
        elapsed = time.monotonic() - began
        answered = stats.sent_packets
        assert burst <= answered <= burst + rate * elapsed, (answered, elapsed)
        assert refused(stats) == guard_drops(rate_limited=sent - answered)
        # The first `burst` datagrams are the ones answered, in order.
        got = replies(eager)
        assert len(got) == answered
        assert got[:burst] == [b"%d" % n for n in range(burst)]
        # Another source has a bucket of its own, full.
        for _ in range(burst):
            other.send(b"x")
        wait_until(lambda: stats.received_packets == sent + burst, "the other source's burst")
        assert len(replies(other)) == burst


@pytest.mark.usefixtures("io_mode")
def test_evicted_sources_are_counted_and_start_again_with_a_full_bucket() -> None:
    port = free_port()
    text = f"""
listeners:
  - interface: 127.0.0.1
    port: {port}
    rate_limit: {{packets_per_second: 0.001, burst: 1, max_sources: 2}}
"""
    with started(text) as daemon, contextlib.ExitStack() as stack:
        clients = {
            n: stack.enter_context(connected("127.0.0.1", port, source=f"127.0.0.{n}"))
            for n in (1, 2, 3)
        }
        item = served(daemon, f"127.0.0.1:{port}")
        buffer = bytearray(65536)

        def one(n: int) -> None:
            clients[n].send(b"x")
            wait_until(lambda: item.drain(buffer, memoryview(buffer), budget=1) == 1, "a read")

        one(1)
        one(1)  # its only token is spent
        assert item.stats.dropped_rate_limited == 1
        one(2)
        one(3)  # the table is full: 127.0.0.1, the least recently seen, is forgotten
        assert item.stats.rate_limit_evictions == 1
        one(1)  # forgotten, so a full bucket again (evicting 127.0.0.2)
        assert item.stats.rate_limit_evictions == 2
        assert (item.stats.sent_packets, item.stats.dropped_rate_limited) == (4, 1)
        assert len(replies(clients[1])) == 2


@pytest.mark.usefixtures("io_mode")
@pytest.mark.parametrize(("burst", "kept"), [(1, True), (2, False)])
def test_a_relabelled_socket_keeps_its_buckets_only_when_the_limit_is_unchanged(
    burst: int, kept: bool
) -> None:
    port = free_port()
    limit = "packets_per_second: 0.001, max_sources: 8"
    text = f"""
listeners:
  - {{name: before, interface: 127.0.0.1, port: {port}, rate_limit: {{{limit}, burst: 1}}}}
  - {{name: after, interface: 127.0.0.1, port: {free_port()},
      rate_limit: {{{limit}, burst: {burst}}}}}
"""
    with started(text) as daemon, connected("127.0.0.1", port) as sock:
        old = served(daemon, f"127.0.0.1:{port}")
        buffer = bytearray(65536)
        sock.send(b"x")
        wait_until(lambda: old.drain(buffer, memoryview(buffer)) == 1, "the first datagram")
        assert sock.recv(100) == b"Your data was 1 bytes"  # the only token
        # The same socket relabelled with the second listener's settings, as a reload does.
        after = next(i.binding.listener for i in daemon.served.values() if i is not old)
        new = Served(
            Binding(after, old.binding.name), old.sock, old.recv_buffer, old.stats, old.guard
        )
        assert new.guard is not None
        assert old.guard is not None
        assert (new.guard.limiter is old.guard.limiter) is kept
        sock.send(b"y")
        wait_until(lambda: new.drain(buffer, memoryview(buffer)) == 1, "the second datagram")
        if kept:
            assert new.stats.dropped_rate_limited == 1
            assert replies(sock) == []
        else:  # a new limit starts afresh: a full bucket
            assert new.stats.dropped_rate_limited == 0
            assert sock.recv(100) == b"Your data was 1 bytes"


# -- reflection guard ---------------------------------------------------------------------------


@contextlib.contextmanager
def from_port(port: int, family: int = 4) -> Iterator[socket.socket]:
    """A socket bound to a well-known source port on loopback (needs root)."""
    require_root()
    host = "127.0.0.1" if family == 4 else "::1"
    with socket.socket(FAMILY[family], socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as error:
            require(error.errno != errno.EADDRINUSE, f"{host} port {port} is in use here")
            raise
        sock.settimeout(DEADLINE)
        yield sock


@pytest.mark.usefixtures("io_mode")
@pytest.mark.parametrize("family", [4, 6])
def test_no_reply_to_the_echo_and_chargen_ports(family: int) -> None:
    port, open_port = free_port_both(), free_port_both()
    host = "127.0.0.1" if family == 4 else "::1"
    text = f"""
listeners:
  - {{name: guarded, interface: "{host}", port: {port}}}
  - {{name: open, interface: "{host}", port: {open_port}, reflection_guard: {{enabled: false}}}}
"""
    label = f"{host}:{port}" if family == 4 else f"[{host}]:{port}"
    with (
        serving(text) as daemon,
        from_port(7, family) as echo,
        from_port(19, family) as chargen,
        connected(host, port) as client,
    ):
        stats = served(daemon, label).stats
        for sock in (echo, chargen):
            for _ in range(3):
                sock.sendto(b"loop?", (host, port))
        client.send(b"a client")
        assert client.recv(100) == b"Your data was 8 bytes"
        wait_counts(stats, received_packets=7, sent_packets=1, dropped_reflection=6)
        assert refused(stats) == guard_drops(reflection=6)
        assert nothing_queued(echo)
        assert nothing_queued(chargen)
        # The control: without the guard, the same source port is answered.
        echo.sendto(b"loop?", (host, open_port))
        assert echo.recv(100) == b"Your data was 5 bytes"


@pytest.mark.usefixtures("io_mode")
@pytest.mark.parametrize("family", [4, 6])
def test_source_port_zero_is_refused_as_reflection(family: int) -> None:
    require_root()  # a raw socket forges the source port
    port = free_port_both()
    host = "127.0.0.1" if family == 4 else "::1"
    payload = b"from port zero"
    # A UDP header with source port 0; the kernel adds the IP header (and the IPv6 checksum).
    datagram = struct.pack("!HHHH", 0, port, 8 + len(payload), 0) + payload
    label = f"{host}:{port}" if family == 4 else f"[{host}]:{port}"
    with (
        serving(f'listeners: [{{interface: "{host}", port: {port}}}]') as daemon,
        socket.socket(FAMILY[family], socket.SOCK_RAW, socket.IPPROTO_UDP) as raw,
    ):
        if family == 6:
            raw.setsockopt(socket.IPPROTO_IPV6, 7, 6)  # IPV6_CHECKSUM at the UDP checksum
        stats = served(daemon, label).stats
        raw.sendto(datagram, (host, 0))
        wait_counts(stats, received_packets=1, dropped_reflection=1)
        # Refused before a reply was tried: no send error, unlike with the guard off.
        assert (stats.sent_packets, stats.send_errors) == (0, 0)


@pytest.mark.usefixtures("io_mode")
@pytest.mark.parametrize("family", [4, 6])
def test_replies_larger_than_max_amplification_are_not_sent(family: int) -> None:
    size_port, echo_port = free_port_both(), free_port_both()
    host = "127.0.0.1" if family == 4 else "::1"
    guard = "reflection_guard: {max_amplification: 1.0}"
    text = f"""
listeners:
  - {{interface: "{host}", port: {size_port}, responder: size, {guard}}}
  - {{interface: "{host}", port: {echo_port}, responder: echo, {guard}}}
"""
    label = (lambda p: f"{host}:{p}") if family == 4 else (lambda p: f"[{host}]:{p}")
    with (
        serving(text) as daemon,
        connected(host, size_port) as size,
        connected(host, echo_port) as echo,
    ):
        stats = served(daemon, label(size_port)).stats
        # "Your data was 0 bytes" (21) to an empty request is larger on the wire; the reply
        # to 100 bytes (23) is smaller than its request.
        size.send(b"")
        size.send(bytes(100))
        assert size.recv(100) == b"Your data was 100 bytes"
        wait_counts(stats, received_packets=2, sent_packets=1, dropped_reflection=1)
        assert replies(size) == []
        # An echo is never larger than its request: even the empty one goes.
        echo.send(b"")
        assert echo.recv(100) == b""
        assert served(daemon, label(echo_port)).stats.dropped_reflection == 0


@pytest.mark.usefixtures("io_mode")
def test_the_default_factor_answers_the_smallest_request() -> None:
    port = free_port()
    with serving(f"listeners: [{{interface: 127.0.0.1, port: {port}}}]") as daemon:
        with connected("127.0.0.1", port) as sock:
            sock.send(b"")
            assert sock.recv(100) == b"Your data was 0 bytes"  # 49 / 28 = 1.75 on the wire
        assert refused(served(daemon, f"127.0.0.1:{port}").stats) == guard_drops()


@pytest.mark.usefixtures("io_mode")
def test_the_guard_refuses_the_hosts_subnet_broadcasts_and_follows_them() -> None:
    port = free_port()
    text = f"""
listeners:
  - {{name: guarded, interface: 127.0.0.1, port: {port},
      rate_limit: {{packets_per_second: 0.001, burst: 1}}}}
"""
    with started(text) as daemon, connected("127.0.0.1", port, source="127.0.0.3") as sock:
        item = served(daemon, f"127.0.0.1:{port}")
        # Handed over from the daemon's interface table (the kernel tells us no others here).
        on_host = frozenset(b for i in interfaces().values() for b in i.broadcasts)
        assert item.broadcast == on_host
        assert item.guard is not None
        for broadcast in on_host:
            assert item.guard.check(str(broadcast), 40000, 0) is Verdict.REFLECTION
        buffer = bytearray(65536)

        def one() -> None:
            wait_until(lambda: item.drain(buffer, memoryview(buffer)) == 1, "a datagram")

        sock.send(b"x")
        one()
        assert sock.recv(100) == b"Your data was 1 bytes"  # its only token
        # As an interface event does: 127.0.0.3 becomes a subnet broadcast. The guard is built
        # again with it, and forgets that it had answered that source...
        limiter = item.guard.limiter
        item.set_broadcast(on_host | {ipaddress.IPv4Address("127.0.0.3")})
        assert item.guard.limiter is limiter  # ...but keeps every rate-limit bucket
        sock.send(b"y")
        one()
        assert refused(item.stats) == guard_drops(reflection=1)
        # No longer one: judged by its (spent) bucket again.
        item.set_broadcast(on_host)
        sock.send(b"z")
        one()
        assert refused(item.stats) == guard_drops(rate_limited=1, reflection=1)
        assert replies(sock) == []
        assert balanced(item.stats)


# -- replies from the address the request was sent to ------------------------------------------

WILDCARD_CLIENTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "::1")


@pytest.mark.usefixtures("io_mode")
@pytest.mark.parametrize("interface", ['"*"', '"::"'], ids=["star", "dual"])
def test_a_wildcard_listener_answers_from_the_address_each_client_used(interface: str) -> None:
    port = free_port_both()
    family = "family: dual, " if interface == '"::"' else ""
    text = f"""
listeners:
  - {{name: everywhere, interface: {interface}, {family}port: {port}, responder: echo}}
"""
    with serving(text) as daemon, contextlib.ExitStack() as stack:
        for host in WILDCARD_CLIENTS:
            # Sent from 127.0.0.1: the routing table would pick 127.0.0.1 for the reply too.
            source = "127.0.0.1" if "." in host else None
            sock = stack.enter_context(connected(host, port, source))
            sock.send(host.encode())
            assert sock.recv(100) == host.encode(), host
        items = list(daemon.served.values())
        assert all(item.pktinfo for item in items)
        wait_until(lambda: sum(i.stats.sent_packets for i in items) == 4, "four replies counted")
        assert sum(i.stats.received_packets for i in items) == 4
        assert all(i.stats.send_errors == 0 and balanced(i.stats) for i in items)


@pytest.mark.usefixtures("io_mode")
def test_without_packet_info_the_client_of_127_0_0_2_hears_nothing() -> None:
    """The control for the test above: the same socket answering the plain way."""
    port = free_port()
    with started(f'listeners: [{{interface: "0.0.0.0", port: {port}}}]') as daemon:
        item = served(daemon, f"0.0.0.0:{port}")
        item.pktinfo = False
        with running(daemon), connected("127.0.0.2", port, source="127.0.0.1") as sock:
            sock.send(b"hello")
            wait_counts(item.stats, received_packets=1, sent_packets=1)
            assert replies(sock) == []  # it left from 127.0.0.1, which the client ignores


def v4info(ifindex: int, local: str, destination: str) -> tuple[int, int, bytes]:
    """An IP_PKTINFO message: struct in_pktinfo {ifindex, spec_dst, addr}."""
    raw = struct.pack("=i", ifindex) + socket.inet_aton(local) + socket.inet_aton(destination)
    return (socket.SOL_IP, IP_PKTINFO, raw)


def v6info(address: str, ifindex: int) -> tuple[int, int, bytes]:
    """An IPV6_PKTINFO message: struct in6_pktinfo {addr, ifindex}."""
    raw = socket.inet_pton(socket.AF_INET6, address) + struct.pack("=i", ifindex)
    return (socket.IPPROTO_IPV6, IPV6_PKTINFO, raw)


@pytest.mark.parametrize(
    ("ancillary", "expected"),
    [
        pytest.param([], [], id="nothing-received"),
        pytest.param(
            [v4info(1, "127.0.0.2", "127.0.0.2")],
            [v4info(0, "127.0.0.2", "127.0.0.2")],
            id="ipv4-keeps-the-address-not-the-interface",
        ),
        pytest.param(
            [v4info(2, "192.0.2.1", "192.0.2.255")],
            [v4info(0, "192.0.2.1", "192.0.2.255")],
            id="ipv4-broadcast-answers-from-the-local-address",
        ),
        pytest.param([v6info("::1", 1)], [v6info("::1", 1)], id="ipv6-keeps-both"),
        pytest.param(
            [v6info("::ffff:127.0.0.2", 1)],
            [v6info("::ffff:127.0.0.2", 0)],
            id="v4-mapped-is-ipv4-on-the-wire",
        ),
        pytest.param([v6info("ff02::1", 1)], [], id="ipv6-multicast-lets-the-kernel-pick"),
        pytest.param(
            [v6info("::ffff:255.255.255.255", 1)], [], id="v4-mapped-broadcast-lets-the-kernel-pick"
        ),
        pytest.param([(socket.SOL_SOCKET, 29, b"\0" * 16)], [], id="another-message"),
    ],
)
def test_reply_source(
    ancillary: list[tuple[int, int, bytes]], expected: list[tuple[int, int, bytes]]
) -> None:
    assert reply_source(ancillary) == expected


# -- ICMP errors about replies ------------------------------------------------------------------


def gone_port(family: int) -> int:
    """A port nobody holds on loopback any more: a datagram to it draws ICMP unreachable."""
    host = "127.0.0.1" if family == 4 else "::1"
    with socket.socket(FAMILY[family], socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("family", [4, 6])
def test_the_error_queue_counts_each_icmp_error_once(family: int) -> None:
    host = "127.0.0.1" if family == 4 else "::1"
    with socket.socket(FAMILY[family], socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        sock.setblocking(False)
        enable_error_queue(sock)
        for _ in range(3):
            sock.sendto(b"x", (host, gone_port(family)))
            # Each error is also left pending on the socket, where the next send would report
            # it instead of sending; reading SO_ERROR takes it (on loopback it is there).
            wait_until(
                lambda: sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0,
                "the ICMP error",
            )
        assert read_error_queue(sock, 2) == 2
        assert read_error_queue(sock, 10) == 1
        assert read_error_queue(sock, 10) == 0


@pytest.mark.usefixtures("io_mode")
@pytest.mark.parametrize(
    ("interface", "family"),
    [("127.0.0.1", 4), ("0.0.0.0", 4), ("::1", 6), ("::", 6)],
    ids=["ipv4", "ipv4-wildcard", "ipv6", "ipv6-wildcard"],
)
def test_an_icmp_error_is_counted_and_the_next_client_is_still_answered(
    interface: str, family: int
) -> None:
    """A reply to a closed port draws an ICMP error: counted once, and serving goes on."""
    port = free_port_both()
    host = "127.0.0.1" if family == 4 else "::1"
    text = f'listeners: [{{interface: "{interface}", port: {port}, responder: echo}}]'
    label = f"{interface}:{port}" if family == 4 else f"[{interface}]:{port}"
    with started(text) as daemon, connected(host, port) as alive:
        with connected(host, port) as leaving:
            leaving.send(b"gone")
        alive.send(b"alive")
        item = served(daemon, label)
        with running(daemon):
            assert alive.recv(100) == b"alive"
            wait_counts(item.stats, received_packets=2, sent_packets=2, send_errors=1)
            # Counted once: the queue is empty, so nothing more turns up later.
            time.sleep(QUIET)
            assert item.stats.send_errors == 1


# -- privileges ---------------------------------------------------------------------------------


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory the user nobody may read (pytest's own tmp_path is private to root)."""
    require_root()
    path = Path(tempfile.mkdtemp(prefix="udpbindd-security-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path)


def privileged_port() -> int:
    """A UDP port below 1024 that is free on 127.0.0.1 right now."""
    for port in range(1023, 600, -1):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free privileged port on 127.0.0.1")


def write(directory: Path, text: str) -> Path:
    path = directory / "udpbindd.yaml"
    path.write_text(text)
    path.chmod(0o644)
    return path


def test_a_privileged_port_without_the_capability_is_refused_before_binding(
    nobody_dir: Path,
) -> None:
    start = privileges.unprivileged_port_start()
    require(start > 1, "every port is unprivileged on this host")
    low, high = start - 1, free_port()
    path = write(
        nobody_dir,
        f"""
listeners:
  - {{name: ok, interface: 127.0.0.1, port: {high}}}
  - {{name: dns, interface: 127.0.0.1, port: {low}}}
  - {{name: optional, interface: 127.0.0.1, port: {low - 1}, required: false}}
""",
    )
    result = run_as_nobody("run", "--log-format", "json", "-c", path)
    assert result.returncode == 1
    assert plain_lines(result.stderr.encode()) == [
        f"udpbindd: listener 'dns' (127.0.0.1:{low}): ports below {start} need "
        "CAP_NET_BIND_SERVICE, which this process lacks: run as root with --user NAME, "
        "grant CAP_NET_BIND_SERVICE, or pass the sockets by socket activation (udpbindd.socket)"
    ]
    # Refused before anything was bound: not even the listener that could have been.
    assert "listener_bound" not in result.stderr


def test_user_switch_needs_root(nobody_dir: Path) -> None:
    path = write(nobody_dir, f"listeners: [{{interface: 127.0.0.1, port: {free_port()}}}]\n")
    result = run_as_nobody("run", "--user", "daemon", "-c", path)
    assert result.returncode == 1
    assert result.stderr == (
        "udpbindd: switching to user 'daemon' needs root (CAP_SETUID and CAP_SETGID); "
        f"udpbindd runs as uid {NOBODY}: start it as root, or without --user/user:\n"
    )


def test_running_as_the_user_already_needs_no_switch(nobody_dir: Path) -> None:
    port = free_port()
    path = write(nobody_dir, f"listeners: [{{interface: 127.0.0.1, port: {port}}}]\n")
    command = [sys.executable, "-c", AS_NOBODY, "run", "--user", "nobody", "-c", str(path)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            assert wait_answering("127.0.0.1", port) == b"Your data was 4 bytes"
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
            _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 0, err


@pytest.mark.parametrize(
    ("config_user", "args", "message"),
    [
        (
            "",
            ("--user", "no-such-user-here"),
            "user 'no-such-user-here' does not exist on this host",
        ),
        ("no-such-user-here", (), "user 'no-such-user-here' does not exist on this host"),
        ("root", (), "user 'root' is uid 0, which keeps every privilege"),
    ],
)
def test_a_user_that_cannot_be_switched_to_fails_before_binding(
    tmp_path: Path, config_user: str, args: tuple[str, ...], message: str
) -> None:
    port = free_port()
    user = f"user: {config_user}\n" if config_user else ""
    path = tmp_path / "udpbindd.yaml"
    path.write_text(f"{user}listeners: [{{interface: 127.0.0.1, port: {port}}}]\n")
    with DaemonProcess(path, args=args) as proc:
        assert proc.wait() == 1
    assert plain_lines(proc.stderr) == [f"udpbindd: {message}"]
    assert not any(event.get("event") == "listener_bound" for event in proc.events)


def task_status(pid: int) -> list[dict[str, str]]:
    """/proc/PID/task/*/status of every thread, parsed."""
    found = []
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        with contextlib.suppress(FileNotFoundError):
            found.append(privileges.parse_status((task / "status").read_text()))
    return found


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def udp_inodes_on(port: int) -> set[int]:
    """Inodes of the IPv4 UDP sockets bound to 127.0.0.1:``port`` (from /proc/net/udp)."""
    local = f"0100007F:{port:04X}"
    found = set()
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local:
            found.add(int(fields[9]))
    return found


def test_run_user_switches_after_binding_and_keeps_serving(nobody_dir: Path) -> None:
    """``--user nobody`` overrides ``user:``; the daemon keeps its privileged socket."""
    low, high, metrics = privileged_port(), free_port(), free_tcp_port()
    text = f"""
user: daemon
listeners:
  - {{name: low, interface: 127.0.0.1, port: {low}, allow: [127.0.0.1]}}
  - {{name: high, interface: 127.0.0.1, port: {high}}}
metrics: {{listen: "127.0.0.1:{metrics}"}}
"""
    path = write(nobody_dir, text)
    with DaemonProcess(path, args=("--user", "nobody", "--log-format", "json")) as proc:
        proc.wait_for_event("started")
        dropped = next(e for e in proc.events if e["event"] == "privileges_dropped")
        assert dropped["user"] == "nobody"
        assert (dropped["uid"], dropped["gid"], dropped["groups"]) == (NOBODY, NOBODY, [NOBODY])
        threads = task_status(proc.pid)
        assert len(threads) > 1  # the metrics server's threads were running already
        for status in threads:
            assert status["Uid"].split() == [str(NOBODY)] * 4
            assert status["Gid"].split() == [str(NOBODY)] * 4
            assert status["Groups"].split() == [str(NOBODY)]
            for field in ("CapPrm", "CapEff", "CapAmb"):
                assert int(status[field], 16) == 0, (field, status[field])
        # Still bound to the privileged port, by this very process, and serving it.
        assert udp_inodes_on(low) & socket_inodes(proc.pid)
        assert exchange("127.0.0.1", low, b"low") == b"Your data was 3 bytes"
        assert exchange("127.0.0.1", low, b"low", source="127.0.0.2", timeout=QUIET) is None
        # A reload as nobody re-reads the file (readable by nobody) and keeps serving.
        proc.signal(signal.SIGHUP)
        reloaded = proc.wait_for_event("reload_finished")
        assert reloaded["ok"] is True
        assert exchange("127.0.0.1", high, b"high") == b"Your data was 4 bytes"
        # The metrics server, started before the switch, serves on after it.
        labels = {"listener": "low", "socket": f"127.0.0.1:{low}"}

        def low_counts() -> tuple[float | None, float | None]:
            found = samples(scrape("127.0.0.1", metrics))
            return (
                value(found, "udpbindd_sent_packets_total", **labels),
                value(found, "udpbindd_dropped_packets_total", reason="denied", **labels),
            )

        wait_until(lambda: low_counts() == (1, 1), "one reply and one denial on /metrics")
        assert proc.stop() == 0


# -- the reasons on /metrics ----------------------------------------------------------------------


def test_metrics_show_each_refusal_under_its_reason(tmp_path: Path) -> None:
    port, metrics = free_port(), free_tcp_port()
    path = tmp_path / "udpbindd.yaml"
    path.write_text(
        f"""
listeners:
  - name: guarded
    interface: 127.0.0.1
    port: {port}
    deny: [127.0.0.3]
    rate_limit: {{packets_per_second: 0.001, burst: 2}}
    reflection_guard: {{max_amplification: 1.0}}
metrics: {{listen: "127.0.0.1:{metrics}"}}
"""
    )
    with DaemonProcess(path) as proc:
        proc.wait_for_event("started")
        assert exchange("127.0.0.1", port, bytes(50), source="127.0.0.2") == (
            b"Your data was 50 bytes"
        )
        # An empty request would get a larger reply; then the bucket of 2 is spent.
        assert exchange("127.0.0.1", port, b"", source="127.0.0.2", timeout=QUIET) is None
        assert exchange("127.0.0.1", port, bytes(50), source="127.0.0.2", timeout=QUIET) is None
        assert exchange("127.0.0.1", port, bytes(50), source="127.0.0.3", timeout=QUIET) is None
        labels = {"listener": "guarded", "socket": f"127.0.0.1:{port}"}

        def reasons() -> dict[str, float | None]:
            found = samples(scrape("127.0.0.1", metrics))
            return {
                reason: value(found, "udpbindd_dropped_packets_total", reason=reason, **labels)
                for reason in ("denied", "rate_limited", "reflection", "simulated", "send_error")
            }

        expected = {
            "denied": 1,
            "rate_limited": 1,
            "reflection": 1,
            "simulated": 0,
            "send_error": 0,
        }
        wait_until(lambda: reasons() == expected, f"/metrics to show {expected}")
        assert proc.stop() == 0


# -- the privileged-port rule, pure ---------------------------------------------------------------


def binding(name: str, port: int) -> Binding:
    address = ipaddress.ip_address("127.0.0.1")
    listener = Listener(name=name, interface="127.0.0.1", target=Literal(address), port=port)
    return Binding(listener, SocketName(address, port))


NET_BIND = 1 << privileges.CAP_NET_BIND_SERVICE
FIX = (
    "need CAP_NET_BIND_SERVICE, which this process lacks: run as root with --user NAME, "
    "grant CAP_NET_BIND_SERVICE, or pass the sockets by socket activation (udpbindd.socket)"
)


@pytest.mark.parametrize(
    ("ports", "capabilities", "start", "expected"),
    [
        ((53,), NET_BIND, 1024, ""),
        (
            (53,),
            ~NET_BIND & 0xFFFFFFFFFF,
            1024,
            f"listener 'p53' (127.0.0.1:53): ports below 1024 {FIX}",
        ),
        ((1024,), 0, 1024, ""),
        ((80,), 0, 80, ""),
        ((79,), 0, 80, f"listener 'p79' (127.0.0.1:79): ports below 80 {FIX}"),
        ((53,), 0, 0, ""),
        (
            (53, 2000, 123),
            0,
            1024,
            f"listeners 'p53' (127.0.0.1:53), 'p123' (127.0.0.1:123): ports below 1024 {FIX}",
        ),
    ],
)
def test_the_privileged_port_rule(
    ports: tuple[int, ...], capabilities: int, start: int, expected: str
) -> None:
    bindings = [binding(f"p{port}", port) for port in ports]
    found = privileges.privileged_port_problem(
        bindings, capabilities=capabilities, port_start=start
    )
    assert found == expected


def test_capability_sets_are_read_from_proc_status() -> None:
    status = privileges.parse_status(
        "Name:\tudpbindd\nUid:\t0\t0\t0\t0\nCapPrm:\t0000000000000400\n"
        "CapEff:\t0000000000000400\nCapAmb:\tnonsense\n"
    )
    assert status["Uid"] == "0\t0\t0\t0"
    assert privileges.capability_set(status) == NET_BIND
    assert privileges.capability_set(status, "CapPrm") == NET_BIND
    assert privileges.capability_set(status, "CapAmb") == 0  # unreadable: nothing claimed
    assert privileges.capability_set(status, "CapBnd") == 0
    mine = privileges.effective_capabilities()
    own = Path("/proc/self/status").read_text()
    assert f"CapEff:\t{mine:016x}" in own


@pytest.mark.parametrize(
    ("interface", "family"),
    [("127.0.0.1", 4), ("0.0.0.0", 4), ("::1", 6), ("::", 6)],
    ids=["ipv4", "ipv4-wildcard", "ipv6", "ipv6-wildcard"],
)
def test_a_send_that_reports_an_earlier_icmp_error_is_tried_again(
    interface: str, family: int
) -> None:
    """An ICMP error arriving between a receive and the next send is reported by that send
    (ECONNREFUSED), though its own datagram is fine: it is counted once, and the reply goes.
    """
    port = free_port_both()
    host = "127.0.0.1" if family == 4 else "::1"
    text = f'listeners: [{{interface: "{interface}", port: {port}, responder: echo}}]'
    label = f"{interface}:{port}" if family == 4 else f"[{interface}]:{port}"
    with started(text) as daemon, connected(host, port) as client:
        item = served(daemon, label)
        echo = item.reply

        def icmp_meanwhile(payload: memoryview, n: int) -> bytes | memoryview | None:
            # What the network may do at this moment: an ICMP error about an earlier reply
            # arrives (on loopback it is there as soon as this send returns).
            item.sock.sendto(b"an earlier reply", (host, gone_port(family)))
            return echo(payload, n)

        item.reply = icmp_meanwhile
        client.send(b"mine")
        buffer = bytearray(65536)
        wait_until(lambda: item.drain(buffer, memoryview(buffer), budget=1) == 1, "a read")
        assert client.recv(100) == b"mine"
        stats = item.stats
        assert (stats.received_packets, stats.sent_packets, stats.send_errors) == (1, 1, 1)
        with pytest.raises(BlockingIOError):  # the error was taken off the queue
            item.sock.recvmsg(0, 1024, socket.MSG_ERRQUEUE)
