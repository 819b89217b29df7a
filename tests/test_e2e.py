"""``udpbindd run`` as a real subprocess: datagrams in, replies out, real signals, real exits.

What is asserted is what a user sees: replies, exit statuses, the lines on stderr (JSON log
events when stderr is not a terminal, one plain line per listener that cannot be bound), and
that every socket name is free again once the daemon has exited.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import free_port, free_port_both, require
from daemonproc import DaemonProcess, bindable, exchange, plain_lines, wait_answering

from udpbindd.config import DEFAULT_PATH

DEADLINE = 15.0
WriteConfig = Callable[[str], Path]


def comm_of(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def run_probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "udpbindd", "probe", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_serves_every_responder_and_counts_nothing_it_should_not(
    write_config: WriteConfig,
) -> None:
    size, echo, discard = free_port_both(), free_port_both(), free_port_both()
    path = write_config(
        f"""
listeners:
  - {{name: size4, interface: 127.0.0.1, port: {size}, responder: size}}
  - {{name: size6, interface: "::1", port: {size}, responder: size}}
  - {{name: echo, interface: 127.0.0.1, port: {echo}, responder: echo}}
  - {{name: echo6, interface: "::1", port: {echo}, responder: echo}}
  - {{name: discard, interface: 127.0.0.1, port: {discard}, responder: discard}}
"""
    )
    with DaemonProcess(path) as daemon:
        daemon.wait_for_event("started")
        for payload in (b"", b"x", b"\xff\xfe\x00 not text", os.urandom(1500)):
            for host in ("127.0.0.1", "::1"):
                assert exchange(host, size, payload) == b"Your data was %d bytes" % len(payload)
                assert exchange(host, echo, payload) == payload
        assert exchange("127.0.0.1", size, os.urandom(65507)) == b"Your data was 65507 bytes"
        largest6 = os.urandom(65527)
        assert exchange("::1", echo, largest6) == largest6

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(DEADLINE)
            # Queued before the first size datagram, the discard datagram is read in the same
            # loop pass at the latest; any reply to it would reach us before the second answer.
            sock.sendto(b"discard me", ("127.0.0.1", discard))
            for _ in range(2):
                sock.sendto(b"and me?", ("127.0.0.1", size))
                assert sock.recvfrom(100) == (b"Your data was 7 bytes", ("127.0.0.1", size))
        assert daemon.stop() == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_exits_0_and_releases_every_socket(
    signum: int, write_config: WriteConfig
) -> None:
    port, star = free_port_both(), free_port_both()
    path = write_config(
        f"""
listeners:
  - {{name: loop4, interface: 127.0.0.1, port: {port}}}
  - {{name: loop6, interface: "::1", port: {port}}}
  - {{name: all, interface: "*", port: {star}, responder: echo}}
"""
    )
    with DaemonProcess(path) as daemon:
        daemon.wait_for_event("started")
        assert exchange("127.0.0.1", star, b"via the wildcard") == b"via the wildcard"
        assert exchange("::1", star, b"both families") == b"both families"
        for address, number in (("127.0.0.1", port), ("::1", port), ("0.0.0.0", star)):
            assert not bindable(address, number)
        assert daemon.stop(signum=signum) == 0
    for address, number in (("127.0.0.1", port), ("::1", port), ("0.0.0.0", star), ("::", star)):
        assert bindable(address, number), f"{address} port {number} still held"
    # Not a terminal: every stderr line is a JSON event, nothing else.
    assert plain_lines(daemon.stderr) == []
    assert daemon.stdout == b""
    events = daemon.events
    assert all({"event", "level", "timestamp"} <= event.keys() for event in events)
    bound = {event["socket"]: event for event in events if event["event"] == "listener_bound"}
    assert sorted(bound) == sorted(
        [f"127.0.0.1:{port}", f"[::1]:{port}", f"0.0.0.0:{star}", f"[::]:{star}"]
    )
    assert bound[f"[::]:{star}"]["listener"] == "all"
    assert all(event["recv_buffer"] > 0 for event in bound.values())
    names = [event["event"] for event in events]
    assert names[-3:] == ["started", "stopping", "stopped"]
    assert next(e for e in events if e["event"] == "started")["bound"] == 4


def test_required_listener_held_elsewhere_exits_1_naming_the_holder(
    write_config: WriteConfig,
) -> None:
    held, other = free_port(), free_port()
    path = write_config(
        f"""
listeners:
  - {{name: fine, interface: 127.0.0.1, port: {other}}}
  - {{name: taken, interface: 127.0.0.1, port: {held}}}
"""
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", held))
        daemon = DaemonProcess(path)
        with daemon:
            assert daemon.wait() == 1
    (line,) = plain_lines(daemon.stderr)
    assert line.startswith(
        f"udpbindd: cannot bind listener 'taken' (127.0.0.1:{held}): address already in use: "
        f"clashes with 127.0.0.1:{held} held by pid {os.getpid()} ({comm_of(os.getpid())})"
    )
    # Refused before binding: not even the free listener was bound for a moment.
    assert [e for e in daemon.events if e["event"] in ("listener_bound", "started")] == []
    assert bindable("127.0.0.1", other)


def test_optional_listener_that_cannot_bind_is_reported_and_the_rest_serve(
    write_config: WriteConfig,
) -> None:
    held, port = free_port(), free_port()
    path = write_config(
        f"""
listeners:
  - {{name: optional, interface: 127.0.0.1, port: {held}, required: false}}
  - {{name: main, interface: 127.0.0.1, port: {port}}}
"""
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", held))
        with DaemonProcess(path) as daemon:
            daemon.wait_for_event("started")
            assert exchange("127.0.0.1", port, b"hello") == b"Your data was 5 bytes"
            assert daemon.stop() == 0
    (failed,) = [e for e in daemon.events if e["event"] == "bind_failed"]
    assert failed["listener"] == "optional"
    assert failed["required"] is False
    assert failed["errno"] == "EADDRINUSE"
    assert f"held by pid {os.getpid()}" in failed["error"]
    assert failed["level"] == "error"
    (started,) = [e for e in daemon.events if e["event"] == "started"]
    assert (started["bound"], started["failed"]) == (1, 1)


def test_probe_command_against_the_daemon(write_config: WriteConfig) -> None:
    port, lossy = free_port(), free_port()
    path = write_config(
        f"""
listeners:
  - {{name: classic, interface: 127.0.0.1, port: {port}}}
  - {{name: lossy, interface: 127.0.0.1, port: {lossy}, drop_rate: 1.0}}
"""
    )
    with DaemonProcess(path) as daemon:
        daemon.wait_for_event("started")
        done = run_probe("127.0.0.1", str(port))
        assert done.returncode == 0, done.stderr
        client, reply = done.stdout.splitlines()
        assert client.startswith("client socket name is 127.0.0.1:")
        assert reply == f"reply from 127.0.0.1:{port} (22 bytes): Your data was 23 bytes"
        # Every datagram "lost": the probe retries, then gives up.
        done = run_probe("127.0.0.1", str(lossy), "--timeout", "0.2")
        assert done.returncode == 1
        assert done.stderr == (
            f"udpbindd probe: no reply from 127.0.0.1:{lossy} after 2 tries: the server is "
            "down, or the datagrams are being lost\n"
        )
        assert daemon.stop() == 0


def test_run_without_a_file_serves_the_embedded_default() -> None:
    require(not DEFAULT_PATH.exists(), f"{DEFAULT_PATH} exists, so it would be used instead")
    require(
        bindable("127.0.0.1", 1060) and bindable("0.0.0.0", 1060),
        "port 1060 is in use on this host",
    )
    with DaemonProcess(None) as daemon:
        event = daemon.wait_for_event("listener_bound")
        assert (event["listener"], event["socket"]) == ("classic", "127.0.0.1:1060")
        daemon.wait_for_event("started")
        assert wait_answering("127.0.0.1", 1060) == b"Your data was 4 bytes"
        done = run_probe("127.0.0.1", "1060")
        assert done.returncode == 0, done.stderr
        assert done.stdout.endswith("Your data was 23 bytes\n")
        assert daemon.stop() == 0
    assert bindable("127.0.0.1", 1060)
