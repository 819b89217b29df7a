"""The serving loop in-process: ``Daemon`` runs in a thread, real sockets on loopback.

Signals are delivered with ``daemon.wake(signum)``, the same byte ``set_wakeup_fd`` writes
(which only the main thread may install). Counters are read straight from the bindings.
Every test runs twice: with the batched path (``io: batched``) and the plain one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import selectors
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import IO, RecordingNotifier, free_port, free_port_both, require_root, wait_until
from daemonproc import bindable

from udpbindd.activation import Inherited, socket_name
from udpbindd.config import Config, IOMode, parse_text
from udpbindd.daemon import DRAIN_BUDGET, SPREAD, Daemon, Served, StartFailed, options_of
from udpbindd.expand import Binding
from udpbindd.names import SocketName
from udpbindd.sockets import (
    SO_MEMINFO,
    BindError,
    kernel_drops,
    open_udp,
    set_receive_buffer,
)
from udpbindd.stats import Stats
from udpbindd.survey import survey
from udpbindd.systemd import Notifier

DEADLINE = 10.0
IPV6_CHECKSUM = getattr(socket, "IPV6_CHECKSUM", 7)
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
HOST = {4: "127.0.0.1", 6: "::1"}
FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
# Contents that must never be decoded: empty, NULs, invalid UTF-8, random bytes.
PAYLOADS = (b"", b"a", b"\x00\x00\x00", b"\xff\xfe\xc3\x28 not utf-8", bytes(range(256)))


def wait_counts(stats: Stats, deadline: float = DEADLINE, **expected: int) -> None:
    """Wait until the counters read exactly ``expected``; fail showing them if they never do.

    The loop bumps a counter just after the syscall it counts, so a reply can reach the test
    a moment before ``sent_packets`` moves: wait for the final values, never compare early.
    """
    end = time.monotonic() + deadline
    while any(getattr(stats, key) != value for key, value in expected.items()):
        if time.monotonic() > end:
            actual = {key: getattr(stats, key) for key in expected}
            raise AssertionError(f"counters {actual} never became {expected}")
        time.sleep(0.005)


def drops(simulated: int = 0, send_error: int = 0) -> dict[str, int]:
    """``Stats.dropped()`` when only these reasons counted (the guard refused nothing)."""
    return {
        "simulated": simulated,
        "send_error": send_error,
        "denied": 0,
        "rate_limited": 0,
        "reflection": 0,
    }


# Every test here runs on both paths, batched and plain.
pytestmark = pytest.mark.usefixtures("io_mode")


def config(text: str) -> Config:
    """``text`` parsed, moving datagrams the way the running test asks (``io_mode``)."""
    return dataclasses.replace(parse_text(text, "test.yaml"), io=IO["mode"])


@contextlib.contextmanager
def started(
    text: str,
    *,
    notifier: Notifier | None = None,
    bind: Callable[[Binding], tuple[socket.socket, int]] | None = None,
) -> Iterator[Daemon]:
    """A daemon that has bound its listeners but whose loop is not running yet."""
    cfg = config(text)
    daemon = Daemon(cfg, notifier=notifier, bind=bind)
    try:
        daemon.start(survey(cfg.enabled_listeners))
        yield daemon
    finally:
        daemon.shutdown()


@contextlib.contextmanager
def running(daemon: Daemon) -> Iterator[Daemon]:
    """Run ``daemon``'s loop in a thread; stop it with SIGTERM on leaving."""
    thread = threading.Thread(target=daemon.run, name="udpbindd-loop", daemon=True)
    thread.start()
    try:
        yield daemon
    finally:
        daemon.wake(signal.SIGTERM)
        thread.join(DEADLINE)
        assert not thread.is_alive(), "the loop did not stop on SIGTERM"


@contextlib.contextmanager
def serving(text: str, **kwargs: Any) -> Iterator[Daemon]:
    with started(text, **kwargs) as daemon, running(daemon):
        yield daemon


def served(daemon: Daemon, label: str) -> Served:
    """The binding serving socket name ``label`` (e.g. ``127.0.0.1:1060``)."""
    by_label = {str(name): item for name, item in daemon.served.items()}
    assert label in by_label, f"{label} not among {sorted(by_label)}"
    return by_label[label]


def label(family: int, port: int) -> str:
    return f"{HOST[family]}:{port}" if family == 4 else f"[{HOST[family]}]:{port}"


def client(family: int, port: int) -> socket.socket:
    sock = socket.socket(FAMILY[family], socket.SOCK_DGRAM)
    sock.settimeout(DEADLINE)
    sock.connect((HOST[family], port))
    return sock


def queued_bytes(sock: socket.socket) -> int:
    """The receive memory the socket's queued datagrams take (SK_MEMINFO_RMEM_ALLOC)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * 9)
    return int(struct.unpack_from("=I", raw, 0)[0])


def nothing_queued(sock: socket.socket) -> bool:
    """Whether no datagram waits on ``sock`` right now (it does not wait for one)."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        sock.recv(1)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(timeout)
    return False


def comm() -> str:
    return Path("/proc/self/comm").read_text().strip()


# -- responders and counters ------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_responders_and_exact_counters(family: int) -> None:
    host = HOST[family] if family == 4 else f"'{HOST[family]}'"
    size_port, echo_port, discard_port = (free_port_both() for _ in range(3))
    text = f"""
listeners:
  - {{name: size, interface: {host}, port: {size_port}, responder: size}}
  - {{name: echo, interface: {host}, port: {echo_port}, responder: echo}}
  - {{name: discard, interface: {host}, port: {discard_port}, responder: discard}}
"""
    with (
        serving(text) as daemon,
        client(family, size_port) as to_size,
        client(family, echo_port) as to_echo,
        client(family, discard_port) as to_discard,
    ):
        for payload in PAYLOADS:
            to_size.send(payload)
            assert to_size.recv(70000) == b"Your data was %d bytes" % len(payload)
            to_echo.send(payload)
            assert to_echo.recv(70000) == payload
            to_discard.send(payload)
        count, total = len(PAYLOADS), sum(len(p) for p in PAYLOADS)
        discard = served(daemon, label(family, discard_port)).stats
        wait_counts(discard, received_packets=count, received_bytes=total, sent_packets=0)
        assert discard.sent_bytes == 0
        assert discard.dropped() == drops(simulated=0, send_error=0)
        assert nothing_queued(to_discard)
        size = served(daemon, label(family, size_port)).stats
        replied = sum(len(b"Your data was %d bytes" % len(p)) for p in PAYLOADS)
        wait_counts(
            size,
            received_packets=count,
            received_bytes=total,
            sent_packets=count,
            sent_bytes=replied,
        )
        assert size.dropped() == drops(simulated=0, send_error=0)
        echo = served(daemon, label(family, echo_port)).stats
        wait_counts(
            echo, received_packets=count, received_bytes=total, sent_packets=count, sent_bytes=total
        )
        assert echo.dropped() == drops(simulated=0, send_error=0)


@pytest.mark.parametrize(("family", "largest"), [(4, 65507), (6, 65527)])
def test_largest_datagrams_round_trip(family: int, largest: int) -> None:
    echo_port, size_port = free_port_both(), free_port_both()
    host = HOST[family] if family == 4 else f"'{HOST[family]}'"
    text = f"""
listeners:
  - {{interface: {host}, port: {echo_port}, responder: echo}}
  - {{interface: {host}, port: {size_port}, responder: size}}
"""
    payload = os.urandom(largest)
    with serving(text), client(family, echo_port) as echo, client(family, size_port) as size:
        with pytest.raises(OSError) as too_big:
            echo.send(payload + b"x")
        assert too_big.value.errno == errno.EMSGSIZE  # so this really is the largest
        echo.send(payload)
        assert echo.recv(70000) == payload
        size.send(payload)
        assert size.recv(100) == b"Your data was %d bytes" % largest


def test_each_socket_of_a_wildcard_listener_counts_its_own_traffic() -> None:
    port = free_port_both()
    text = f"""
listeners:
  - {{name: everywhere, interface: "*", port: {port}}}
"""
    with serving(text) as daemon, client(4, port) as four, client(6, port) as six:
        for _ in range(3):
            four.send(b"1234")
            assert four.recv(100) == b"Your data was 4 bytes"
        for _ in range(2):
            six.send(b"12")
            assert six.recv(100) == b"Your data was 2 bytes"
        v4, v6 = served(daemon, f"0.0.0.0:{port}").stats, served(daemon, f"[::]:{port}").stats
        wait_counts(v4, received_packets=3, received_bytes=12, sent_packets=3)
        wait_counts(v6, received_packets=2, received_bytes=4, sent_packets=2)


def test_drop_rate_one_drops_everything() -> None:
    port = free_port()
    text = f"""
listeners:
  - {{interface: 127.0.0.1, port: {port}, drop_rate: 1.0}}
"""
    with serving(text) as daemon, client(4, port) as sock:
        for number in range(50):
            sock.send(b"%d" % number)
        stats = served(daemon, f"127.0.0.1:{port}").stats
        wait_counts(stats, received_packets=50, dropped_simulated=50, sent_packets=0)
        assert stats.sent_bytes == 0
        assert stats.dropped() == drops(simulated=50, send_error=0)
        # Nothing was sent, so nothing can still be on its way.
        assert nothing_queued(sock)


def test_drop_rate_half_drops_some() -> None:
    port = free_port()
    text = f"""
listeners:
  - {{interface: 127.0.0.1, port: {port}, drop_rate: 0.5, responder: echo}}
"""
    replies: list[bytes] = []
    with serving(text) as daemon, client(4, port) as sock:
        stats = served(daemon, f"127.0.0.1:{port}").stats
        # Batches keep the replies well within the client's receive buffer.
        for batch in range(8):
            for number in range(50):
                sock.send(b"%d" % (batch * 50 + number))
            # Every datagram ends either sent or dropped: wait until the batch is through.
            wait_until(
                lambda b=batch: stats.sent_packets + stats.dropped_simulated == (b + 1) * 50,
                "a batch answered or dropped",
            )
            while len(replies) < stats.sent_packets:
                replies.append(sock.recv(100))
        assert nothing_queued(sock)
    dropped = stats.dropped_simulated
    # 400 tries at 0.5: the binomial's standard deviation is 10, so this is ±10 sigma.
    assert 100 < dropped < 300
    assert stats.sent_packets == 400 - dropped == len(replies)
    assert len(set(replies)) == len(replies)  # each datagram answered at most once


# -- socket options on the daemon's own sockets -----------------------------------------------


def test_daemon_sockets_never_reuseaddr_and_always_explicit_v6only() -> None:
    port, star_port, dual_port = free_port_both(), free_port_both(), free_port_both()
    text = f"""
listeners:
  - {{name: loop4, interface: 127.0.0.1, port: {port}, recv_buffer: 256KiB}}
  - {{name: loop6, interface: "::1", port: {port}}}
  - {{name: star, interface: "*", port: {star_port}}}
  - {{name: dual, interface: "::", family: dual, port: {dual_port}}}
"""
    with started(text) as daemon:
        assert len(daemon.served) == 5
        for name, item in daemon.served.items():
            sock = item.sock
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0, name
            assert not sock.getblocking(), name
            assert item.recv_buffer == sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            if name.family == 6:
                v6only = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
                assert v6only == (0 if item.binding.listener.name == "dual" else 1), name
        assert served(daemon, f"127.0.0.1:{port}").recv_buffer == 2 * 256 * 1024


def test_listener_bound_events_report_the_granted_buffer(
    log_events: list[dict[str, object]],
) -> None:
    port = free_port()
    text = f"""
listeners:
  - {{name: small, interface: 127.0.0.1, port: {port}, recv_buffer: 100000}}
"""
    with started(text):
        pass
    bound = [event for event in log_events if event["event"] == "listener_bound"]
    assert bound == [
        {
            "event": "listener_bound",
            "log_level": "info",
            "listener": "small",
            "socket": f"127.0.0.1:{port}",
            "responder": "size",
            "recv_buffer": 200000,
            "inherited": False,
        }
    ]


# -- fairness ---------------------------------------------------------------------------------


def test_a_flooded_socket_does_not_starve_another() -> None:
    """With a backlog on A, B's one datagram is answered in the loop's first pass."""
    port_a, port_b = free_port(), free_port()
    text = f"""
listeners:
  - {{name: a, interface: 127.0.0.1, port: {port_a}, responder: echo}}
  - {{name: b, interface: 127.0.0.1, port: {port_b}, responder: echo}}
"""
    backlog = 3 * DRAIN_BUDGET
    with started(text) as daemon, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        # One client socket receives every reply, so their order is the order they were sent.
        set_receive_buffer(sock, 1024 * 1024)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(DEADLINE)
        a = served(daemon, f"127.0.0.1:{port_a}")
        # Queue the whole backlog before the loop runs, then one datagram for B.
        for number in range(backlog):
            sock.sendto(b"A%d" % number, ("127.0.0.1", port_a))
        sock.sendto(b"B", ("127.0.0.1", port_b))
        # Delivered in order, so once B's datagram is queued, A's backlog is too.
        b = served(daemon, f"127.0.0.1:{port_b}")
        wait_until(lambda: queued_bytes(b.sock) > 0, "B's datagram to be queued")
        with running(daemon):
            replies = [sock.recv(100) for _ in range(backlog + 1)]
            assert kernel_drops(a.sock) == 0  # the whole backlog was really queued
    assert sorted(replies) == sorted([b"A%d" % n for n in range(backlog)] + [b"B"])
    # Drained to the end first, A would push B's reply to the very end; with a budget per
    # wake-up, B is answered after at most one budget's worth of A.
    assert replies.index(b"B") <= DRAIN_BUDGET
    assert [r for r in replies if r != b"B"] == [b"A%d" % n for n in range(backlog)]


# -- send errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_a_reply_the_kernel_refuses_is_counted_and_serving_goes_on(family: int) -> None:
    """A datagram from source port 0 cannot be answered: sendto() fails with EINVAL.

    The reflection guard refuses port 0 before any reply is tried (see test_security.py),
    so it is off here: this is about what the loop does when the kernel refuses a send.
    """
    require_root()  # a raw socket forges the source port
    port = free_port_both()
    host = HOST[family] if family == 4 else f"'{HOST[family]}'"
    text = f"""
listeners:
  - {{interface: {host}, port: {port}, reflection_guard: {{enabled: false}}}}
"""
    payload = b"from port zero"
    # A UDP header with source port 0; the kernel adds the IP header (and the IPv6 checksum).
    datagram = struct.pack("!HHHH", 0, port, 8 + len(payload), 0) + payload
    with (
        serving(text) as daemon,
        socket.socket(FAMILY[family], socket.SOCK_RAW, socket.IPPROTO_UDP) as raw,
        client(family, port) as sock,
    ):
        if family == 6:
            raw.setsockopt(socket.IPPROTO_IPV6, IPV6_CHECKSUM, 6)
        stats = served(daemon, label(family, port)).stats
        raw.sendto(datagram, (HOST[family], 0))
        wait_until(lambda: stats.send_errors == 1, "the failed reply to be counted")
        sock.send(b"still there?")
        assert sock.recv(100) == b"Your data was 12 bytes"
        wait_counts(stats, received_packets=2, received_bytes=len(payload) + 12, sent_packets=1)
        assert stats.dropped() == drops(simulated=0, send_error=1)


def test_a_socket_passed_in_counts_its_icmp_errors_like_one_the_daemon_opened() -> None:
    """A socket systemd passed in was not made by open_udp: without IP_RECVERR, which the
    daemon sets when it adopts the socket, the ICMP error about a reply would be dropped
    by the kernel, and the failed reply never counted."""
    port = free_port()
    cfg = config(f"listeners: [{{interface: 127.0.0.1, port: {port}, responder: echo}}]")
    passed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    passed.bind(("127.0.0.1", port))
    passed.setblocking(False)
    assert passed.getsockopt(socket.SOL_IP, IP_RECVERR) == 0
    daemon = Daemon(cfg, inherited=[Inherited(passed, "", socket_name(passed))])
    try:
        daemon.start(survey(cfg.enabled_listeners, exclude_inodes=daemon.own_inodes()))
        item = served(daemon, f"127.0.0.1:{port}")
        assert item.sock is passed
        # Queued before the loop runs, from a socket closed before it is answered.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
            gone.sendto(b"reply to a closed port", ("127.0.0.1", port))
        wait_until(lambda: queued_bytes(passed) > 0, "the datagram to be queued")
        with running(daemon):
            # The echo goes to a port nobody holds any more; ICMP port unreachable comes back.
            wait_until(lambda: item.stats.send_errors == 1, "the failed reply to be counted")
            with client(4, port) as sock:
                sock.send(b"next")
                assert sock.recv(100) == b"next"
            # The loop counts a reply once sendto returns, which can be after it arrived.
            wait_counts(item.stats, received_packets=2, sent_packets=2)
    finally:
        daemon.shutdown()


def test_a_pending_socket_error_is_counted_and_the_next_datagram_served() -> None:
    """An ICMP error about a reply surfaces as a failed receive, counted once.

    open_udp asks for such errors (IP_RECVERR); the drain takes the error off the socket's
    error queue as well, so nothing is left to make the socket poll as ready for ever.
    """
    cfg = config(f"listeners: [{{interface: 127.0.0.1, port: {free_port()}}}]")
    listener = cfg.listeners[0]
    name = SocketName(listener.target.address, listener.port)  # type: ignore[union-attr]
    binding = Binding(listener, name)
    sock, granted = open_udp(name, options_of(binding))
    item = Served(binding, sock, granted)
    buffer = bytearray(65536)
    with sock, selectors.DefaultSelector() as selector:
        assert sock.getsockopt(socket.SOL_IP, IP_RECVERR) == 1
        selector.register(sock, selectors.EVENT_READ)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
            gone.sendto(b"reply to a closed port", sock.getsockname())
        # The reply goes to a port nobody holds any more: ICMP port unreachable comes back,
        # and the receive after it reports the error (whenever it has arrived by then).
        for _ in range(3):
            if item.stats.send_errors or not selector.select(DEADLINE):
                break
            item.drain(buffer, memoryview(buffer))
        assert (item.stats.sent_packets, item.stats.send_errors) == (1, 1)
        with pytest.raises(BlockingIOError):
            sock.recvmsg(1024, 1024, socket.MSG_ERRQUEUE)
        assert selector.select(0) == []
        with client(4, listener.port) as sock2:
            sock2.send(b"next")
            wait_until(lambda: queued_bytes(sock) > 0, "the next datagram to be queued")
            assert item.drain(buffer, memoryview(buffer)) == 1
            assert sock2.recv(100) == b"Your data was 4 bytes"
    assert item.stats.send_errors == 1
    assert (item.stats.received_packets, item.stats.sent_packets) == (2, 2)


def test_drain_reads_at_most_its_budget() -> None:
    port = free_port()
    with (
        started(f"listeners: [{{interface: 127.0.0.1, port: {port}, responder: discard}}]") as (
            daemon
        ),
        client(4, port) as sock,
    ):
        item = served(daemon, f"127.0.0.1:{port}")
        sock.send(b"x")
        wait_until(lambda: queued_bytes(item.sock) > 0, "the first datagram to be queued")
        one = queued_bytes(item.sock)
        for _ in range(9):
            sock.send(b"x")
        wait_until(lambda: queued_bytes(item.sock) == 10 * one, "all ten to be queued")
        buffer = bytearray(65536)
        assert item.drain(buffer, memoryview(buffer), budget=4) == 4
        assert item.stats.received_packets == 4
        # The rest stays queued for the next pass; an empty queue ends the drain early.
        assert item.drain(buffer, memoryview(buffer), budget=100) == 6
        assert item.drain(buffer, memoryview(buffer), budget=100) == 0


def test_the_loop_moves_datagrams_the_way_the_file_says(
    io_mode: IOMode, log_events: list[dict[str, object]]
) -> None:
    port = free_port()
    with serving(f"listeners: [{{interface: 127.0.0.1, port: {port}, responder: echo}}]") as d:
        assert d.io is io_mode
        with client(4, port) as sock:
            sock.send(b"hello")
            assert sock.recv(100) == b"hello"
    started_events = [event for event in log_events if event["event"] == "started"]
    assert [event["io"] for event in started_events] == [io_mode.value]


def test_a_reload_switches_between_batched_and_plain(io_mode: IOMode, tmp_path: Path) -> None:
    port = free_port()
    other = IOMode.PLAIN if io_mode is IOMode.BATCHED else IOMode.BATCHED
    text = f"listeners: [{{interface: 127.0.0.1, port: {port}, responder: echo}}]\n"
    cfg = config(text)
    daemon = Daemon(cfg, loader=lambda: parse_text(f"{text}io: {other}\n", "test.yaml"))
    try:
        daemon.start(survey(cfg.enabled_listeners))
        with running(daemon), client(4, port) as sock:
            assert daemon.io is io_mode
            daemon.wake(signal.SIGHUP)
            wait_until(lambda: daemon.io is other, "the reload to switch the path")
            for payload in (b"a", b"b" * 1400):
                sock.send(payload)
                assert sock.recv(2000) == payload
    finally:
        daemon.shutdown()


def test_when_many_sockets_are_ready_at_once_each_is_served_and_counted() -> None:
    """Spread load: more than SPREAD sockets ready in one pass, several datagrams each."""
    ports: list[int] = []
    while len(ports) < 3 * SPREAD:  # free_port may hand out a port again once it is free
        if (port := free_port()) not in ports:
            ports.append(port)
    entries = "\n".join(
        f"  - {{interface: 127.0.0.1, port: {port}, responder: echo}}" for port in ports
    )
    per_socket = 5
    with (
        started(f"listeners:\n{entries}\n") as daemon,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
    ):
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(DEADLINE)
        set_receive_buffer(sock, 1024 * 1024)
        for number in range(per_socket):
            for port in ports:
                sock.sendto(b"%d:%d" % (port, number), ("127.0.0.1", port))
        items = [served(daemon, f"127.0.0.1:{port}") for port in ports]
        wait_until(
            lambda: all(queued_bytes(item.sock) >= per_socket * 300 for item in items),
            "every datagram to be queued",
        )
        with running(daemon):
            replies = [sock.recv(100) for _ in range(per_socket * len(ports))]
            for item in items:
                wait_counts(item.stats, received_packets=per_socket, sent_packets=per_socket)
                assert kernel_drops(item.sock) == 0
        expected = [b"%d:%d" % (port, n) for port in ports for n in range(per_socket)]
        assert sorted(replies) == sorted(expected)


# -- starting: required and optional listeners ------------------------------------------------


def recording_bind() -> tuple[list[str], Callable[[Binding], tuple[socket.socket, int]]]:
    calls: list[str] = []

    def bind(binding: Binding) -> tuple[socket.socket, int]:
        calls.append(str(binding.name))
        return open_udp(binding.name, options_of(binding))

    return calls, bind


def test_required_listener_held_by_another_process_fails_naming_the_holder() -> None:
    held_port, free = free_port(), free_port()
    text = f"""
listeners:
  - {{name: fine, interface: 127.0.0.1, port: {free}}}
  - {{name: taken, interface: 127.0.0.1, port: {held_port}}}
"""
    calls, bind = recording_bind()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", held_port))
        with pytest.raises(StartFailed) as caught, started(text, bind=bind):
            pass
    (failure,) = caught.value.failures
    assert failure.listener.name == "taken"
    assert failure.socket == f"127.0.0.1:{held_port}"
    assert failure.errno_name == "EADDRINUSE"
    assert str(caught.value).startswith(
        f"listener 'taken' (127.0.0.1:{held_port}): address already in use: clashes with "
        f"127.0.0.1:{held_port} held by pid {os.getpid()} ({comm()})"
    )
    # Known before binding, so nothing was bound, not even the listener that was free.
    assert calls == []
    assert bindable("127.0.0.1", free)


def test_a_socket_taken_after_the_survey_is_explained_by_its_holder() -> None:
    port, other = free_port(), free_port()
    text = f"""
listeners:
  - {{name: first, interface: 127.0.0.1, port: {other}}}
  - {{name: raced, interface: 127.0.0.1, port: {port}}}
"""
    cfg = config(text)
    preflight = survey(cfg.enabled_listeners)
    daemon = Daemon(cfg)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
            holder.bind(("127.0.0.1", port))  # between the survey and the bind
            with pytest.raises(StartFailed) as caught:
                daemon.start(preflight)
        assert daemon.served == {}
    finally:
        daemon.shutdown()
    (failure,) = caught.value.failures
    assert failure.errno_name == "EADDRINUSE"
    assert f"held by pid {os.getpid()} ({comm()})" in failure.reason
    # The listener bound before the failure was closed again.
    assert bindable("127.0.0.1", other)


def test_optional_listener_that_cannot_bind_is_reported_and_the_rest_serve(
    log_events: list[dict[str, object]],
) -> None:
    held_port, port = free_port(), free_port()
    text = f"""
listeners:
  - {{name: optional, interface: 127.0.0.1, port: {held_port}, required: false}}
  - {{name: gone, interface: nosuchdev0, port: {port}, required: false}}
  - {{name: serving, interface: 127.0.0.1, port: {port}}}
"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", held_port))
        with serving(text) as daemon, client(4, port) as sock:
            sock.send(b"hi")
            assert sock.recv(100) == b"Your data was 2 bytes"
            assert list(map(str, daemon.served)) == [f"127.0.0.1:{port}"]
            assert {f.listener.name for f in daemon.failures} == {"optional"}
            # An absent interface is no failure: the listener waits for it to appear.
            assert [(w.listener.name, w.socket) for w in daemon.waiting] == [
                ("gone", f"nosuchdev0 port {port}")
            ]
            assert daemon.status_text() == "1 bound, 1 waiting, 1 failed"
    failures = {
        event["listener"]: event
        for event in log_events
        if event["event"] in ("bind_failed", "listener_unavailable")
    }
    assert set(failures) == {"optional"}
    assert failures["optional"]["event"] == "bind_failed"
    assert failures["optional"]["errno"] == "EADDRINUSE"
    assert failures["optional"]["required"] is False
    assert f"held by pid {os.getpid()}" in str(failures["optional"]["error"])
    (waiting,) = [event for event in log_events if event["event"] == "listener_waiting"]
    assert waiting["listener"] == "gone"
    assert waiting["reason"] == "interface nosuchdev0 does not exist"
    assert waiting["required"] is False
    started_events = [event for event in log_events if event["event"] == "started"]
    assert started_events[0]["bound"] == 1
    assert started_events[0]["waiting"] == 1
    assert started_events[0]["failed"] == 1


def test_a_required_listener_whose_address_is_absent_waits_and_is_never_bound() -> None:
    port = free_port()
    # 192.0.2.1 is on no interface: the survey finds it absent, so bind() is not even tried.
    text = f"""
listeners:
  - {{name: loop, interface: 127.0.0.1, port: {port}}}
  - {{name: absent, interface: 192.0.2.1, port: {port}}}
"""
    calls, bind = recording_bind()
    with started(text, bind=bind) as daemon:
        assert calls == [f"127.0.0.1:{port}"]
        assert daemon.failures == []
        (waiting,) = daemon.waiting
        assert str(waiting) == (
            f"listener 'absent' (192.0.2.1:{port}): no interface has the address 192.0.2.1"
        )
        assert daemon.status_text() == "1 bound, 1 waiting, 0 failed"
        assert daemon.ready is False  # READY=1 is for run() to send, once nothing waits
    assert bindable("127.0.0.1", port)


def test_an_address_gone_by_bind_time_waits_instead_of_rolling_back() -> None:
    port, other = free_port(), free_port()
    text = f"""
listeners:
  - {{name: first, interface: 127.0.0.1, port: {other}}}
  - {{name: raced, interface: 127.0.0.1, port: {port}}}
"""
    calls, record = recording_bind()

    def bind(binding: Binding) -> tuple[socket.socket, int]:
        if binding.listener.name == "raced":
            # As if the address was removed between the survey and bind().
            raise BindError(binding.name, errno.EADDRNOTAVAIL, "bind")
        return record(binding)

    with started(text, bind=bind) as daemon:
        assert calls == [f"127.0.0.1:{other}"]
        assert list(map(str, daemon.served)) == [f"127.0.0.1:{other}"]
        assert daemon.failures == []
        assert [(w.listener.name, w.socket) for w in daemon.waiting] == [
            ("raced", f"127.0.0.1:{port}")
        ]
        assert daemon.waiting[0].reason.startswith("address not available")


def test_missing_required_interface_waits_without_binding_it() -> None:
    port = free_port()
    text = f"""
listeners:
  - {{name: loop, interface: 127.0.0.1, port: {port}}}
  - {{name: ext, interface: nosuchdev0, port: {port}}}
"""
    calls, bind = recording_bind()
    with started(text, bind=bind) as daemon:
        assert calls == [f"127.0.0.1:{port}"]
        assert [str(w) for w in daemon.waiting] == [
            f"listener 'ext' (nosuchdev0 port {port}): interface nosuchdev0 does not exist"
        ]


def test_wildcard_beside_a_specific_listener_is_refused_before_binding() -> None:
    port = free_port_both()
    text = f"""
listeners:
  - {{name: loopback, interface: 127.0.0.1, port: {port}}}
  - {{name: everything, interface: "*", port: {port}}}
"""
    calls, bind = recording_bind()
    with pytest.raises(StartFailed) as caught, started(text, bind=bind):
        pass
    assert calls == []
    (failure,) = caught.value.failures
    assert failure.listener.name == "everything"
    assert failure.socket == f"0.0.0.0:{port}"
    assert (
        f"clashes with listener 'loopback' (127.0.0.1:{port}): 0.0.0.0:{port} receives on "
        "every IPv4 address, including 127.0.0.1" in failure.reason
    )


# -- signals and the loop ---------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_closes_every_socket(signum: int, log_events: list[dict[str, object]]) -> None:
    port = free_port_both()
    text = f"""
listeners:
  - {{interface: 127.0.0.1, port: {port}}}
  - {{interface: "::1", port: {port}}}
"""
    notifier = RecordingNotifier()
    with started(text, notifier=notifier) as daemon:
        thread = threading.Thread(target=daemon.run, daemon=True)
        thread.start()
        with client(4, port) as sock:
            sock.send(b"x")
            assert sock.recv(100) == b"Your data was 1 bytes"
        assert not bindable("127.0.0.1", port)
        daemon.wake(signum)
        thread.join(DEADLINE)
        assert not thread.is_alive()
        assert daemon.served == {}
    assert bindable("127.0.0.1", port)
    assert bindable("::1", port)
    events = [event["event"] for event in log_events]
    assert events[-3:] == ["started", "stopping", "stopped"]
    assert notifier.sent[0] == ("READY=1", "STATUS=2 bound, 0 waiting, 0 failed")
    assert notifier.sent[-1] == ("STOPPING=1", "STATUS=stopping")


def test_sighup_without_a_file_to_read_fails_the_reload_and_serving_goes_on(
    log_events: list[dict[str, object]],
) -> None:
    port = free_port()
    with (
        serving(f"listeners: [{{interface: 127.0.0.1, port: {port}}}]") as daemon,
        client(4, port) as sock,
    ):
        daemon.wake(signal.SIGHUP)
        wait_until(lambda: any(e["event"] == "reload_failed" for e in log_events), "SIGHUP handled")
        assert daemon.snapshot().reload_ok is False
        sock.send(b"after")
        assert sock.recv(100) == b"Your data was 5 bytes"


def test_watchdog_pings_come_from_the_loop_at_most_once_per_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    interval = 0.2
    monkeypatch.setenv("WATCHDOG_USEC", str(int(2 * interval * 1_000_000)))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    port = free_port()
    notifier = RecordingNotifier()
    text = f"listeners: [{{interface: 127.0.0.1, port: {port}}}]"
    with serving(text, notifier=notifier), client(4, port) as sock:
        # Idle, the loop still wakes up to ping.
        wait_until(lambda: notifier.count("WATCHDOG=1") >= 2, "two idle pings")
        before, start = notifier.count("WATCHDOG=1"), time.monotonic()
        exchanges = 500
        for _ in range(exchanges):
            sock.send(b"busy")
            sock.recv(100)
        pings, elapsed = notifier.count("WATCHDOG=1") - before, time.monotonic() - start
    # Each exchange is a loop pass of its own; a ping per pass would be hundreds.
    assert pings <= elapsed / interval + 2
    assert pings < exchanges / 10
