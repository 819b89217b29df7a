"""Per-packet cost of the source guard (udpbindd/guard.py), for docs/security.md.

Times what the serving loop adds per datagram: ``check`` before the reply and ``reply_ok``
after it, for the policies an operator can configure, and for comparison one receive plus
one send on a loopback socket, the work the loop does for every datagram anyway.

Run: .venv/bin/python bench/guard.py
"""

from __future__ import annotations

import ipaddress
import socket
import time
import timeit

from udpbindd.config import Listener, Literal, RateLimit, ReflectionPolicy
from udpbindd.guard import CACHE_SIZE, Guard, build_guard

NUMBER = 200_000
REPEAT = 7
NOW = time.monotonic_ns()


def listener(**policy: object) -> Listener:
    address = ipaddress.ip_address("127.0.0.1")
    return Listener("bench", "127.0.0.1", Literal(address), 1060, **policy)  # type: ignore[arg-type]


def cost(guard: Guard | None, host: str) -> tuple[float, float]:
    """ns for ``check`` and for ``reply_ok`` on one answered datagram, calls included."""
    if guard is None:
        # All the loop does then: one test per datagram.
        test = timeit.Timer("guard is not None", globals={"guard": guard})
        return min(test.repeat(REPEAT, NUMBER)) / NUMBER * 1e9, 0.0
    names = {"check": guard.check, "reply_ok": guard.reply_ok, "host": host, "now": NOW}
    check = timeit.Timer("check(host, 40000, now)", globals=names)
    reply = timeit.Timer("reply_ok(host, 1, 21)", globals=names)
    check_ns = min(check.repeat(REPEAT, NUMBER)) / NUMBER * 1e9
    reply_ns = min(reply.repeat(REPEAT, NUMBER)) / NUMBER * 1e9 if guard.checks_replies else 0.0
    return check_ns, reply_ns


def flood(guard: Guard) -> float:
    """ns for ``check`` when every datagram brings a new source (a spoofed flood)."""
    hosts = [str(ipaddress.IPv4Address(0x0A000000 + i)) for i in range(CACHE_SIZE * 4)]
    names = {"check": guard.check, "hosts": hosts, "now": NOW}
    timer = timeit.Timer("for host in hosts: check(host, 40000, now)", globals=names)
    return min(timer.repeat(REPEAT, 10)) / (10 * len(hosts)) * 1e9


def socket_round_trip() -> float:
    """One recvfrom_into plus one sendto on loopback, per datagram."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        server.bind(("127.0.0.1", 0))
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        client.bind(("127.0.0.1", 0))
        client.setblocking(False)
        buffer = bytearray(65536)
        count, best = 2000, float("inf")
        for _ in range(REPEAT):
            for _ in range(count):
                client.sendto(b"x", server.getsockname())
            start = time.perf_counter_ns()
            for _ in range(count):
                _, peer = server.recvfrom_into(buffer)
                server.sendto(b"Your data was 1 bytes", peer)
            best = min(best, (time.perf_counter_ns() - start) / count)
            for _ in range(count):
                client.recv(64)
        return best
    finally:
        server.close()
        client.close()


def main() -> None:
    nets = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "192.168.0.0/16", "fd00::/8"))
    deny = tuple(ipaddress.ip_network(n) for n in ("10.6.6.0/24", "192.168.66.0/24"))
    limit = RateLimit(packets_per_second=1e6, burst=1_000_000)
    full = listener(allow=nets, deny=deny, rate_limit=limit)
    nothing = listener(reflection_guard=ReflectionPolicy(enabled=False))
    cases: list[tuple[str, Guard | None, str]] = [
        ("no policy: guard is None", build_guard(nothing), "10.1.2.3"),
        ("reflection guard only (the default), size", build_guard(listener()), "10.1.2.3"),
        (
            "allow + deny + reflection, size",
            build_guard(listener(allow=nets, deny=deny)),
            "10.1.2.3",
        ),
        ("allow + deny + rate limit + reflection, size", build_guard(full), "10.1.2.3"),
        ("the same, IPv6 source", build_guard(full), "fd00::1234"),
    ]
    print(f"{'ns per datagram':46} {'check':>6} {'reply_ok':>8} {'total':>6}")
    for name, guard, host in cases:
        check_ns, reply_ns = cost(guard, host)
        print(f"{name:46} {check_ns:6.0f} {reply_ns:8.0f} {check_ns + reply_ns:6.0f}")
    flooded = build_guard(full)
    assert flooded is not None
    print(f"{'full policy, a new source every datagram':46} {flood(flooded):6.0f}")
    print(f"{'for scale: recvfrom_into + sendto, loopback':46} {socket_round_trip():6.0f}")


if __name__ == "__main__":
    main()
