"""The classic client, ``probe()`` and ``udpbindd probe``, against test-owned UDP sockets.

A silent socket shows the retries and their doubling waits (kernel receive timestamps, lower
bounds only); a free port shows "refused"; a peer that ignores the first datagram shows a retry
that succeeds.
"""

from __future__ import annotations

import itertools
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from conftest import free_port

from udpbindd.probe import DEFAULT_MESSAGE, FIRST_WAIT, ProbeFailed, probe

# SO_TIMESTAMPNS (missing from Python 3.11's socket module): the kernel stamps each datagram
# on arrival, so gaps are not skewed by when the test happens to read them.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")


def silent_socket(family: int = socket.AF_INET, host: str = "127.0.0.1") -> socket.socket:
    """A bound socket that never replies, stamping each datagram as it arrives."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.bind((host, 0))
        _wait_for_arrival_stamps(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def _wait_for_arrival_stamps(sock: socket.socket) -> None:
    """Wait (bounded) until the kernel stamps datagrams on arrival rather than when read.

    The first socket asking for timestamps switches them on in deferred kernel work; until it
    has run, datagrams are stamped when they are read, which would hide the gaps.
    """
    family, address = sock.family, sock.getsockname()
    with socket.socket(family, socket.SOCK_DGRAM) as client:
        for _ in range(50):
            client.sendto(b"stamp check", address)
            sent = time.time()
            # Read well after the arrival, so an arrival stamp and a read stamp differ.
            time.sleep(0.02)
            arrived = queued(sock)
            if arrived and arrived[0][1] - sent < 0.01:
                return
    raise AssertionError("the kernel never stamped datagrams on arrival")


def queued(sock: socket.socket) -> list[tuple[bytes, float]]:
    """Every datagram queued on ``sock``, with its kernel arrival time in seconds."""
    result = []
    blocking = sock.getblocking()
    sock.setblocking(False)
    for _ in range(1000):
        try:
            data, ancillary, _, _ = sock.recvmsg(65536, 1024)
        except BlockingIOError:
            break
        stamp = 0.0
        for level, kind, raw in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanoseconds = _TIMESPEC.unpack(raw[: _TIMESPEC.size])
                stamp = seconds + nanoseconds / 1e9
        result.append((data, stamp))
    sock.setblocking(blocking)
    return result


def assert_doubling_gaps(stamps: list[float]) -> None:
    """Each retry waited at least its due: 0.1 s, then twice the wait before it."""
    gaps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
    for index, gap in enumerate(gaps):
        # Lower bounds only: a timeout never expires early, but a busy host may make it late.
        assert gap >= 0.9 * FIRST_WAIT * 2**index, gaps


@contextmanager
def answering_peer(replies: list[bytes | None]) -> Iterator[tuple[int, list[tuple[bytes, str]]]]:
    """A socket on 127.0.0.1 that answers its n-th datagram with ``replies[n]`` (None: silence).

    Yields its port and the list of (payload, client "host:port") it received.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(10)
    received: list[tuple[bytes, str]] = []

    def serve() -> None:
        for reply in replies:
            try:
                data, peer = sock.recvfrom(65536)
            except (TimeoutError, OSError):
                return
            received.append((data, f"{peer[0]}:{peer[1]}"))
            if reply is not None:
                sock.sendto(reply, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1], received
    finally:
        thread.join(timeout=15)
        sock.close()
    assert not thread.is_alive()


def run_probe(*args: str | bytes, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "udpbindd", "probe", *args],
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def test_probe_returns_the_reply_and_the_client_socket_name() -> None:
    shown: list[str] = []
    with answering_peer([b"pong"]) as (port, received):
        result = probe("127.0.0.1", port, b"hello", on_connected=shown.append)
    assert result.reply == b"pong"
    assert result.attempts == 1
    assert result.server == f"127.0.0.1:{port}"
    assert received == [(b"hello", result.client)]
    assert shown == [result.client]


def test_probe_retries_after_a_lost_reply() -> None:
    with answering_peer([None, b"second time lucky"]) as (port, received):
        result = probe("127.0.0.1", port, b"again")
    assert result.reply == b"second time lucky"
    assert result.attempts == 2
    assert [data for data, _ in received] == [b"again", b"again"]
    # Both tries came from the same connected socket.
    assert {client for _, client in received} == {result.client}


def test_probe_gives_up_after_the_wait_passes_the_limit() -> None:
    with silent_socket() as server:
        port = server.getsockname()[1]
        with pytest.raises(ProbeFailed) as caught:
            probe("127.0.0.1", port, b"anyone?", max_wait=0.4)
        arrived = queued(server)
    # Waits 0.1, 0.2, 0.4: three tries, then the next wait (0.8) is past the limit.
    assert [data for data, _ in arrived] == [b"anyone?"] * 3
    assert_doubling_gaps([stamp for _, stamp in arrived])
    assert str(caught.value) == (
        f"no reply from 127.0.0.1:{port} after 3 tries: the server is down, "
        "or the datagrams are being lost"
    )


def test_probe_over_ipv6() -> None:
    with silent_socket(socket.AF_INET6, "::1") as server:
        port = server.getsockname()[1]
        with pytest.raises(ProbeFailed, match=r"no reply from \[::1\]:\d+ after 1 tries"):
            probe("::1", port, b"six", max_wait=0.1)
        assert [data for data, _ in queued(server)] == [b"six"]


def test_probe_reports_a_refused_port() -> None:
    port = free_port()
    with pytest.raises(ProbeFailed) as caught:
        probe("127.0.0.1", port, b"hello")
    assert str(caught.value) == (
        f"127.0.0.1:{port} refused the datagram (ICMP port unreachable): nothing is "
        "listening on that address and port"
    )


def test_probe_reports_an_unresolvable_host() -> None:
    # A zone naming no interface fails inside getaddrinfo without asking any DNS server.
    with pytest.raises(ProbeFailed, match=r"cannot resolve 'fe80::1%nosuchdev0'"):
        probe("fe80::1%nosuchdev0", 1060, b"x")


def test_cli_prints_client_name_and_reply() -> None:
    with answering_peer([b"Your data was 23 bytes"]) as (port, received):
        done = run_probe("127.0.0.1", str(port))
    assert done.returncode == 0, done.stderr
    (payload, client), *_ = received
    assert payload == DEFAULT_MESSAGE.encode()
    assert done.stdout.decode().splitlines() == [
        f"client socket name is {client}",
        f"reply from 127.0.0.1:{port} (22 bytes): Your data was 23 bytes",
    ]
    assert done.stderr == b""


def test_cli_sends_message_bytes_unchanged_and_shows_any_reply_bytes() -> None:
    # Not UTF-8 in either direction: the message is sent as given, the reply shown escaped.
    with answering_peer([b"\xff\x00ok"]) as (port, received):
        done = run_probe("127.0.0.1", str(port), "--message", b"\xfe\xed caf\xc3\xa9")
    assert done.returncode == 0, done.stderr
    assert received[0][0] == b"\xfe\xed caf\xc3\xa9"
    # Control characters are escaped too: a reply must not drive the user's terminal.
    assert done.stdout.decode().splitlines()[1] == (
        f"reply from 127.0.0.1:{port} (4 bytes): \\xff\\x00ok"
    )


def test_cli_nothing_answers_retries_with_doubling_waits_then_exits_1() -> None:
    with silent_socket() as server:
        port = server.getsockname()[1]
        done = run_probe("127.0.0.1", str(port))
        arrived = queued(server)
    assert done.returncode == 1
    # The default limit is 2 s: waits 0.1, 0.2, 0.4, 0.8 and 1.6, so five tries.
    assert [data for data, _ in arrived] == [DEFAULT_MESSAGE.encode()] * 5
    assert_doubling_gaps([stamp for _, stamp in arrived])
    # The client socket name is shown before the waiting starts, even when nothing answers.
    assert done.stdout.decode().startswith("client socket name is 127.0.0.1:")
    assert done.stderr.decode() == (
        f"udpbindd probe: no reply from 127.0.0.1:{port} after 5 tries: the server is down, "
        "or the datagrams are being lost\n"
    )


def test_cli_timeout_option_sets_the_longest_wait() -> None:
    with silent_socket() as server:
        port = server.getsockname()[1]
        done = run_probe("127.0.0.1", str(port), "--timeout", "0.2")
        arrived = queued(server)
    assert done.returncode == 1
    assert len(arrived) == 2
    assert b"after 2 tries" in done.stderr


def test_cli_refused_port_exits_1_with_a_clear_message() -> None:
    port = free_port()
    done = run_probe("127.0.0.1", str(port))
    assert done.returncode == 1
    assert done.stderr.decode() == (
        f"udpbindd probe: 127.0.0.1:{port} refused the datagram (ICMP port unreachable): "
        "nothing is listening on that address and port\n"
    )


@pytest.mark.parametrize("port", ["0", "65536", "http"])
def test_cli_bad_port_is_a_usage_error(port: str) -> None:
    done = run_probe("127.0.0.1", port)
    assert done.returncode == 2
    assert b"Traceback" not in done.stderr
