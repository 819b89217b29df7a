"""Bounded floods on loopback: the daemon stays up, other listeners keep answering, and the
kernel drops it reports are the kernel's own count.

A listener with a tiny receive buffer is flooded while the daemon is stopped (SIGSTOP, so the
queue certainly overflows) and while it runs flat out. Every datagram sent is then either
received or counted as a kernel drop, and the drop counter matches the drops column of
/proc/net/udp for that socket's inode.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import free_port
from daemonproc import DaemonProcess, exchange
from prometheus import free_tcp_port, samples, scrape, value
from test_daemon import served, serving, wait_until

FLOOD = 3000
PAYLOAD = bytes(200)
# Much smaller than the flood: the kernel grants at least its minimum (about 4.5 KiB).
TINY_BUFFER = "4KiB"
# How long another listener may take to answer during a flood.
PROMPT = 1.0


def proc_udp(port: int) -> tuple[int, int]:
    """(inode, drops) of the IPv4 UDP socket bound to 127.0.0.1:``port``, from /proc/net/udp."""
    local = f"0100007F:{port:04X}"
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local:
            return int(fields[9]), int(fields[12])
    raise AssertionError(f"no UDP socket on 127.0.0.1:{port} in /proc/net/udp")


def flood(port: int, count: int = FLOOD) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(count):
            sock.sendto(PAYLOAD, ("127.0.0.1", port))


def socket_inodes(pid: int) -> set[int]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def test_a_flood_while_stopped_is_counted_as_kernel_drops(tmp_path: Path) -> None:
    small, other, metrics = free_port(), free_port(), free_tcp_port()
    path = tmp_path / "udpbindd.yaml"
    path.write_text(
        f"""
listeners:
  - {{name: small, interface: 127.0.0.1, port: {small}, recv_buffer: {TINY_BUFFER}}}
  - {{name: other, interface: 127.0.0.1, port: {other}}}
metrics: {{listen: "127.0.0.1:{metrics}"}}
"""
    )
    labels = {"listener": "small", "socket": f"127.0.0.1:{small}"}
    with DaemonProcess(path) as proc:
        proc.wait_for_event("started")
        inode, drops_before = proc_udp(small)
        assert inode in socket_inodes(proc.pid)
        assert drops_before == 0
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            flood(small)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        # The queue held what fitted; the kernel dropped (and counted) the rest.
        _, kernel = proc_udp(small)
        assert 0 < kernel < FLOOD
        assert exchange("127.0.0.1", other, b"still there?") == b"Your data was 12 bytes"

        def counters() -> tuple[float | None, ...]:
            found = samples(scrape("127.0.0.1", metrics))
            return (
                value(found, "udpbindd_received_packets_total", **labels),
                value(found, "udpbindd_dropped_packets_total", reason="kernel", **labels),
                value(found, "udpbindd_sent_packets_total", **labels),
            )

        wait_until(lambda: counters()[0] == FLOOD - kernel, "the queued datagrams to be read")
        received, reported, sent = counters()
        assert reported == kernel == proc_udp(small)[1]
        assert received is not None
        assert received + kernel == FLOOD
        # Every datagram read was answered: the flood came from a live client socket that has
        # since closed, so some replies may have drawn ICMP errors, but none was refused.
        assert sent == received
        assert proc.stop() == 0  # it was still running, and stops cleanly


@pytest.mark.usefixtures("io_mode")
def test_a_flood_faster_than_the_loop_does_not_stop_another_listener() -> None:
    small, other = free_port(), free_port()
    text = f"""
listeners:
  - {{name: small, interface: 127.0.0.1, port: {small}, recv_buffer: {TINY_BUFFER},
      responder: discard}}
  - {{name: other, interface: 127.0.0.1, port: {other}}}
"""
    floods, each = 4, 25 * FLOOD
    with serving(text) as daemon:
        item = served(daemon, f"127.0.0.1:{small}")
        senders = [threading.Thread(target=flood, args=(small, each)) for _ in range(floods)]
        for sender in senders:
            sender.start()
        slowest, probes = 0.0, 0
        try:
            while any(sender.is_alive() for sender in senders):
                began = time.monotonic()
                reply = exchange("127.0.0.1", other, b"ping", timeout=PROMPT)
                assert reply == b"Your data was 4 bytes", "no answer within 1 s during a flood"
                slowest = max(slowest, time.monotonic() - began)
                probes += 1
        finally:
            for sender in senders:
                sender.join()
        total = floods * each

        def accounted() -> bool:
            kernel = item.kernel_drops()
            return kernel is not None and item.stats.received_packets + kernel == total

        wait_until(accounted, "every flooded datagram received or dropped by the kernel")
        kernel = item.kernel_drops()
        assert kernel == proc_udp(small)[1]
        assert kernel is not None
        assert kernel > 0, "the flood never outpaced the loop: this test proved nothing"
        assert probes >= 5, "the flood ended before another listener was tried"
        # discard: nothing answered, and nothing refused either.
        assert item.stats.sent_packets == sum(item.stats.dropped().values()) == 0
        assert slowest < PROMPT
