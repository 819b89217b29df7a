"""The batched path (udpbindd.batch) against the plain one (Served.drain), on real sockets.

The same traffic is sent to two sockets on loopback, one drained by each path; the replies
a client gets back and the counters must be identical. Also: bursts larger than a batch,
budgets, send errors in the middle of a sendmmsg, pending socket errors, peers, the guard,
and replies leaving from the address a wildcard socket was reached at (IP_PKTINFO).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import pytest
from conftest import require

from udpbindd import batch
from udpbindd.config import Listener, Literal, RateLimit, Responder
from udpbindd.daemon import BUFFER_SIZE, DRAIN_BUDGET, Served
from udpbindd.expand import Binding
from udpbindd.guard import build_guard
from udpbindd.names import SocketName
from udpbindd.respond import RESPONDERS, Reply, echo_reply
from udpbindd.sockets import Options, open_udp
from udpbindd.stats import Stats

HOST = {4: "127.0.0.1", 6: "::1"}
FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
MAX_PAYLOAD = {4: 65507, 6: 65527}
RECV_BUFFER = 4 * 1024 * 1024
QUIET = 0.05  # seconds without a datagram after which no more replies are expected
DEADLINE = 5.0
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)


@pytest.fixture(autouse=True)
def _batched() -> None:
    require(batch.available(), "recvmmsg/sendmmsg are not available here")


@contextlib.contextmanager
def server(
    family: int = 4,
    responder: Responder = Responder.ECHO,
    drop_rate: float = 0.0,
    address: str | None = None,
) -> Iterator[Served]:
    """A bound, non-blocking listener socket as the daemon opens it, with its Served."""
    ip = ipaddress.ip_address(address or HOST[family])
    name = SocketName(ip, 0, "", v6only=ip.version == 6)
    sock, granted = open_udp(name, Options(recv_buffer=RECV_BUFFER))
    port = sock.getsockname()[1]
    listener = Listener(
        name=f"test-{port}",
        interface=str(ip),
        target=Literal(ip),
        port=port,
        responder=responder,
        drop_rate=drop_rate,
    )
    bound = SocketName(ip, port, "", v6only=ip.version == 6)
    with sock:
        yield Served(Binding(listener, bound), sock, granted)


@contextlib.contextmanager
def client(family: int = 4) -> Iterator[socket.socket]:
    with socket.socket(FAMILY[family], socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
        sock.bind((HOST[family], 0))
        yield sock


def address_of(served: Served) -> tuple[str, int]:
    host, port = served.sock.getsockname()[:2]
    return host, port


def send_all(sock: socket.socket, target: tuple[str, int], payloads: list[bytes]) -> None:
    for payload in payloads:
        sock.sendto(payload, target)


def settle(served: Served) -> None:
    """Wait (bounded) until datagrams are queued for ``served`` and the queue stops growing.

    Loopback normally delivers before sendto returns, but a busy machine may defer it.
    """
    end = time.monotonic() + DEADLINE
    last, steady = -1, 0
    while steady < 3:
        assert time.monotonic() < end, "the datagrams never settled in the receive queue"
        time.sleep(0.003)
        queued = _queued_bytes(served.sock)
        steady = steady + 1 if queued == last and queued > 0 else 0
        last = queued


def _queued_bytes(sock: socket.socket) -> int:
    """The socket's receive queue in bytes, from the kernel's table (matched by inode)."""
    inode = str(os.fstat(sock.fileno()).st_ino)
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as lines:
            for line in lines:
                fields = line.split()
                if len(fields) > 9 and fields[9] == inode:
                    return int(fields[4].split(":")[1], 16)
    return 0


def receive_all(sock: socket.socket, expected: int | None = None) -> list[bytes]:
    """Replies on ``sock`` until ``expected`` arrived or none came for QUIET s (bounded)."""
    replies: list[bytes] = []
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end and (expected is None or len(replies) < expected):
        ready, _, _ = select.select([sock], [], [], QUIET)
        if not ready:
            break
        replies.append(sock.recv(70000))
    return replies


Drain = Callable[[Served, int], int]


def plain_drain() -> Drain:
    buffer = bytearray(BUFFER_SIZE)
    view = memoryview(buffer)
    return lambda served, budget: served.drain(buffer, view, budget)


def batched_drain(size: int = batch.BATCH_SIZE) -> Drain:
    fast = batch.Batch(size)
    # As the daemon calls it (Served.drain_batched): with the socket's guard and packet info.
    return lambda served, budget: fast.drain(
        served.sock,
        served.reply,
        served.stats,
        served.drop_rate,
        budget,
        guard=served.guard,
        pktinfo=served.pktinfo,
    )


def drain_until_empty(drain: Drain, served: Served, budget: int = 64) -> list[int]:
    """Drain passes until one finds nothing; return what each pass returned (bounded)."""
    passes = []
    for _ in range(10_000):
        count = drain(served, budget)
        passes.append(count)
        if count == 0:
            return passes
    raise AssertionError("the socket never ran dry")


def exchange(
    drain: Drain,
    payloads: list[bytes],
    *,
    family: int = 4,
    responder: Responder = Responder.ECHO,
    drop_rate: float = 0.0,
    seed: int | None = None,
    expected: int | None = None,
) -> tuple[list[bytes], Stats]:
    """Send ``payloads`` to a fresh listener, drain it with ``drain``; replies and counters."""
    with server(family, responder, drop_rate) as served, client(family) as sock:
        send_all(sock, address_of(served), payloads)
        settle(served)
        if seed is not None:
            random.seed(seed)
        drain_until_empty(drain, served)
        replies = receive_all(sock, len(payloads) if expected is None else expected)
        return replies, served.stats


def both(payloads: list[bytes], **kwargs: object) -> tuple[list[bytes], Stats]:
    """Run the same traffic through both paths; assert identical results and return them."""
    plain = exchange(plain_drain(), payloads, **kwargs)  # type: ignore[arg-type]
    fast = exchange(batched_drain(), payloads, **kwargs)  # type: ignore[arg-type]
    assert fast[0] == plain[0]
    assert asdict(fast[1]) == asdict(plain[1])
    return fast


# -- identical replies and counters ------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("responder", list(Responder))
def test_both_paths_answer_and_count_alike(family: int, responder: Responder) -> None:
    payloads = [b"", b"a", b"\x00\xff" * 32, bytes(range(256)) * 5, b"x" * 1400]
    replies, stats = both(payloads, family=family, responder=responder)
    expected = [RESPONDERS[responder](memoryview(p), len(p)) for p in payloads]
    assert replies == [bytes(r) for r in expected if r is not None]
    assert stats.received_packets == len(payloads)
    assert stats.received_bytes == sum(map(len, payloads))
    assert stats.sent_packets == len(replies)
    assert stats.sent_bytes == sum(map(len, replies))
    assert stats.send_errors == stats.dropped_simulated == 0


@pytest.mark.parametrize("family", [4, 6])
def test_zero_and_largest_datagrams_are_echoed_whole(family: int) -> None:
    largest = MAX_PAYLOAD[family]
    payloads = [b"", bytes(range(256)) * (largest // 256) + b"z" * (largest % 256), b""]
    replies, stats = both(payloads, family=family)
    assert replies == payloads
    assert len(replies[1]) == largest  # nothing truncated
    assert stats.received_bytes == stats.sent_bytes == largest


def test_everything_dropped_at_rate_one() -> None:
    replies, stats = both([b"p"] * 100, drop_rate=1.0, expected=0)
    assert replies == []
    assert stats.received_packets == stats.dropped_simulated == 100
    assert stats.sent_packets == 0


def test_the_same_datagrams_are_dropped_with_the_same_seed() -> None:
    payloads = [i.to_bytes(2, "big") for i in range(300)]
    replies, stats = both(payloads, drop_rate=0.5, seed=1060, expected=300)
    assert 0 < stats.dropped_simulated < 300
    assert len(replies) == 300 - stats.dropped_simulated


def test_a_burst_larger_than_the_batch_is_answered_in_order() -> None:
    payloads = [i.to_bytes(4, "big") for i in range(1000)]
    plain = exchange(plain_drain(), payloads)
    small = exchange(batched_drain(size=16), payloads)
    assert small[0] == plain[0] == payloads
    assert asdict(small[1]) == asdict(plain[1])


def test_a_drain_takes_at_most_its_budget_and_leaves_the_rest_queued() -> None:
    drain = batched_drain(size=16)
    with server() as served, client() as sock:
        send_all(sock, address_of(served), [b"q"] * 100)
        settle(served)
        assert drain(served, 40) == 40
        assert drain(served, 40) == 40
        assert drain(served, 40) == 20
        assert drain(served, 40) == 0
        assert len(receive_all(sock, 100)) == 100
        assert served.stats.received_packets == served.stats.sent_packets == 100


# -- errors ------------------------------------------------------------------------------------


def sized_reply(payload: memoryview, n: int) -> bytes | memoryview:
    """Echo, except a request starting with b"!" asks for more than IPv4 can carry."""
    if n and payload[0] == ord("!"):
        return b"r" * 65_520  # EMSGSIZE over IPv4: above 65,507 bytes
    if n and payload[0] == ord("~"):
        return b"r" * 70_000  # larger than any UDP datagram at all
    return payload[:n]


def test_a_refused_reply_in_the_middle_of_a_batch_is_one_send_error() -> None:
    payloads = [b"a", b"!", b"b", b"c", b"!", b"!", b"d", b"~", b"e"]
    results = []
    for drain in (plain_drain(), batched_drain()):
        with server() as served, client() as sock:
            served.reply = sized_reply
            send_all(sock, address_of(served), payloads)
            settle(served)
            drain_until_empty(drain, served)
            results.append((receive_all(sock, 5), asdict(served.stats)))
    assert results[0] == results[1]
    replies, stats = results[1]
    assert replies == [b"a", b"b", b"c", b"d", b"e"]
    assert stats["send_errors"] == 4
    assert stats["sent_packets"] == 5


def test_a_pending_socket_error_counts_once_on_both_paths() -> None:
    outcomes = []
    for drain in (plain_drain(), batched_drain()):
        with server() as served:
            # With IP_RECVERR an unconnected socket learns of ICMP port unreachable too: the
            # next receive reports ECONNREFUSED once, then reads on. (The plain path meets it
            # in the same drain, right after the send; the batched one in the next.)
            served.sock.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
            with client() as gone:
                gone.sendto(b"first", address_of(served))
                settle(served)
            passes = drain_until_empty(drain, served)  # its echo goes to a closed port
            assert sum(passes) == 2  # the datagram, then the error
            with client() as sock:
                sock.sendto(b"second", address_of(served))
                settle(served)
                assert drain_until_empty(drain, served) == [1, 0]
                assert receive_all(sock, 1) == [b"second"]
            outcomes.append(asdict(served.stats))
    assert outcomes[0] == outcomes[1]
    assert outcomes[1]["send_errors"] == 1
    assert outcomes[1]["received_packets"] == outcomes[1]["sent_packets"] == 2


# -- peers, guard, source address ----------------------------------------------------------------


def test_peers_read_as_recvfrom_gives_them() -> None:
    fast = batch.Batch(8)
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as dual:
        dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        dual.bind(("::", 0))
        dual.setblocking(False)
        port = dual.getsockname()[1]
        with client(4) as four, client(6) as six:
            four.sendto(b"4", ("127.0.0.1", port))
            six.sendto(b"6", ("::1", port))
            time.sleep(0.02)
            got = fast._recvmmsg(dual.fileno(), fast._rmsg_ptr, 8, socket.MSG_DONTWAIT, None)
            assert got == 2
            seen = [fast.peer(i) for i in range(got)]
            assert sorted(seen, key=str) == sorted(
                [
                    ("::ffff:127.0.0.1", four.getsockname()[1], 0, 0),
                    ("::1", six.getsockname()[1], 0, 0),
                ],
                key=str,
            )


def test_the_guard_refuses_on_the_batched_path() -> None:
    fast = batch.Batch()
    with server() as served, client() as sock:
        listener = Listener(
            name="limited",
            interface="127.0.0.1",
            target=Literal(ipaddress.ip_address("127.0.0.1")),
            port=address_of(served)[1],
            responder=Responder.ECHO,
            rate_limit=RateLimit(packets_per_second=0.001, burst=3),
        )
        guard = build_guard(listener)
        assert guard is not None
        send_all(sock, address_of(served), [b"g"] * 10)
        settle(served)
        fast.drain(served.sock, echo_reply, served.stats, guard=guard)
        assert receive_all(sock, 3) == [b"g"] * 3
        assert served.stats.received_packets == 10
        assert served.stats.dropped_rate_limited == 7
        assert served.stats.sent_packets == 3


def test_a_wildcard_socket_answers_from_the_address_it_was_reached_at() -> None:
    # 127.0.0.2 is a loopback address too; a connected client accepts replies only from the
    # address it sent to, which a wildcard socket gets right only with IP_PKTINFO.
    received = {}
    for pktinfo in (False, True):
        fast = batch.Batch()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as wildcard:
            wildcard.bind(("0.0.0.0", 0))
            wildcard.setblocking(False)
            wildcard.setsockopt(socket.SOL_IP, IP_PKTINFO, 1)
            port = wildcard.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind(("127.0.0.1", 0))
                sock.connect(("127.0.0.2", port))
                sock.send(b"hello")
                time.sleep(0.02)
                stats = Stats()
                fast.drain(wildcard, echo_reply, stats, pktinfo=pktinfo)
                assert stats.sent_packets == 1
                received[pktinfo] = receive_all(sock, 1)
    assert received[True] == [b"hello"]
    assert received[False] == []  # it left from 127.0.0.1, which the client ignores


def test_a_dual_stack_wildcard_answers_each_family_from_where_it_was_reached() -> None:
    """IPv4 clients reach [::] (V6ONLY off) as v4-mapped addresses: both paths answer each
    client from the very address it used, 127.0.0.2 or ::1, with identical counters."""
    outcomes = []
    for drain in (plain_drain(), batched_drain()):
        name = SocketName(ipaddress.ip_address("::"), 0, "", v6only=False)
        sock, granted = open_udp(name, Options(recv_buffer=RECV_BUFFER))
        port = sock.getsockname()[1]
        listener = Listener(
            name="dual",
            interface="::",
            target=Literal(ipaddress.ip_address("::")),
            port=port,
            responder=Responder.ECHO,
        )
        with sock:
            served = Served(Binding(listener, name), sock, granted)
            assert served.pktinfo
            with (
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as four,
                socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as six,
            ):
                four.bind(("127.0.0.1", 0))
                four.connect(("127.0.0.2", port))  # replies from elsewhere are not seen
                six.connect(("::1", port))
                for number in range(20):
                    four.send(b"4:%d" % number)
                    six.send(b"6:%d" % number)
                settle(served)
                assert drain_until_empty(drain, served) == [40, 0]
                got = (receive_all(four, 20), receive_all(six, 20))
                outcomes.append((got, asdict(served.stats)))
    assert outcomes[0] == outcomes[1]
    (four_replies, six_replies), stats = outcomes[1]
    assert four_replies == [b"4:%d" % n for n in range(20)]
    assert six_replies == [b"6:%d" % n for n in range(20)]
    assert stats["sent_packets"] == 40


def test_replies_other_than_echo_after_a_refusal_go_to_the_right_peers() -> None:
    # The first datagram of the batch is dropped by its responder; the second reply must
    # still go to the second client, not the first.
    def first_silent(payload: memoryview, n: int) -> bytes | None:
        return None if bytes(payload[:n]) == b"silent" else b"ok:" + bytes(payload[:n])

    fast = batch.Batch()
    with server() as served, client() as one, client() as two:
        one.sendto(b"silent", address_of(served))
        two.sendto(b"two", address_of(served))
        one.sendto(b"one", address_of(served))
        settle(served)
        reply: Reply = first_silent
        assert fast.drain(served.sock, reply, served.stats) == 3
        assert receive_all(two, 1) == [b"ok:two"]
        assert receive_all(one, 1) == [b"ok:one"]
        assert served.stats.sent_packets == 2


def test_a_quiet_socket_answers_its_first_datagrams_plain_and_a_burst_in_batches() -> None:
    """``Served.drain_batched``, as the daemon's loop calls it on the batched path."""
    fast = batch.Batch()
    batched: list[int] = []
    drain = fast.drain

    def counted(*args: Any, **kwargs: Any) -> int:
        got = drain(*args, **kwargs)
        batched.append(got)
        return got

    fast.drain = counted  # type: ignore[method-assign]
    buffer = bytearray(BUFFER_SIZE)
    view = memoryview(buffer)
    with server() as served, client() as sock:
        assert served.quiet
        sock.sendto(b"lone", address_of(served))
        settle(served)
        # Answered by a plain receive; a second plain one finds the queue empty: no batch.
        assert served.drain_batched(fast, buffer, view) == 1
        assert receive_all(sock, 1) == [b"lone"]
        assert (batched, served.quiet) == ([], True)
        burst = [b"%d" % n for n in range(100)]
        send_all(sock, address_of(served), burst)
        settle(served)
        # Two plain datagrams and the rest of the budget in a batch; then batches only.
        assert served.drain_batched(fast, buffer, view) == DRAIN_BUDGET
        assert (batched, served.quiet) == ([DRAIN_BUDGET - 2], False)
        assert served.drain_batched(fast, buffer, view) == 100 - DRAIN_BUDGET
        assert (batched[1:], served.quiet) == ([100 - DRAIN_BUDGET], False)
        assert receive_all(sock, 100) == burst
        # A wake-up that found nothing left: quiet again.
        assert served.drain_batched(fast, buffer, view) == 0
        assert served.quiet
        assert (served.stats.received_packets, served.stats.sent_packets) == (101, 101)


def test_batch_size_is_bounded() -> None:
    with pytest.raises(ValueError, match="batch size"):
        batch.Batch(0)
    with pytest.raises(ValueError, match="batch size"):
        batch.Batch(1025)
