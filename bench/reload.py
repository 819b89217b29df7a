"""Reload with many listeners: a reload that changes one of 10,000 touches only that one.

Starts ``python -m udpbindd run`` as a subprocess with N listeners (127.1.x.y, one port, so
the kernel keeps them all in one hash slot), a test-owned NOTIFY_SOCKET and JSON logs, then
sends SIGHUP six times by pid, each time after changing exactly one listener: its responder
(relabel), its receive buffer (re-bind) and its address (add + remove), and back. For each
reload it checks the ``reload_finished`` counts (kept = N - 1), that every other listener
still has the very same file descriptor and socket inode (from /proc/PID/fd and sock_diag),
and that the changed listener answers as configured; it reports the time from SIGHUP to
READY=1 as systemd sees it, and the daemon's own breakdown (load, survey, apply).

Raises RLIMIT_NOFILE (the daemon inherits it). Loopback only; every wait is bounded; the
daemon is stopped by pid. Usage:

    python bench/reload.py [--listeners N | --smoke] [--json] [--deadline S]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs from a checkout without installing udpbindd

from udpbindd import host  # noqa: E402 - needs the line above

SMOKE_LISTENERS = 200
COUNTS = ("added", "removed", "kept", "rebound", "relabelled", "failed")
PHASES = ("seconds", "load_seconds", "survey_seconds", "apply_seconds")


class BenchError(Exception):
    """The run could not be measured (or something it checks was wrong)."""


@dataclass(frozen=True)
class Change:
    """One listener's settings; a reload moves from one of these to the next."""

    address: str = ""
    responder: str = "size"
    recv_buffer: str = "64KiB"


# Each step changes the one listener in exactly one way, then puts it back.
STEPS: tuple[tuple[str, Change, dict[str, int]], ...] = (
    ("relabel: responder size -> echo", Change(responder="echo"), {"relabelled": 1}),
    ("relabel: responder echo -> size", Change(), {"relabelled": 1}),
    ("rebind: recv_buffer 64KiB -> 128KiB", Change(recv_buffer="128KiB"), {"rebound": 1}),
    ("rebind: recv_buffer 128KiB -> 64KiB", Change(), {"rebound": 1}),
    ("move: address to 127.2.0.1", Change(address="127.2.0.1"), {"added": 1, "removed": 1}),
    ("move: address back", Change(), {"added": 1, "removed": 1}),
)


def address_of(index: int) -> str:
    """127.1.0.1, 127.1.0.2, ... 250 to a /24: the whole of 127/8 is loopback on Linux."""
    return f"127.1.{index // 250}.{index % 250 + 1}"


def config_text(count: int, port: int, target: int, change: Change) -> str:
    lines = ["listeners:"]
    for index in range(count):
        address, responder, buffer = address_of(index), "size", "64KiB"
        if index == target:
            address = change.address or address
            responder, buffer = change.responder, change.recv_buffer
        lines.append(
            f"  - {{name: l{index}, interface: {address}, port: {port},"
            f" responder: {responder}, recv_buffer: {buffer}}}"
        )
    lines.append("metrics: {listen: []}")
    lines.append("logging: {level: info, format: json}")
    return "\n".join(lines) + "\n"


def free_port() -> int:
    """A UDP port no IPv4 socket holds now (free on the wildcard means free on every address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


def raise_fd_limit(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to at least ``needed`` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise BenchError(f"RLIMIT_NOFILE hard limit {hard} < {needed} needed")
        soft = needed
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


class Notifications:
    """A NOTIFY_SOCKET owned by the bench: sd_notify messages with their arrival time."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)

    def wait_for(self, field_name: str, deadline: float) -> tuple[float, dict[str, str]]:
        """The next message holding ``field_name``, and when it arrived (monotonic)."""
        end = time.monotonic() + deadline
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            arrived = time.monotonic()
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            if field_name in fields:
                return arrived, fields
        raise BenchError(f"no sd_notify {field_name} within {deadline} s")

    def close(self) -> None:
        self.sock.close()


@dataclass
class LogReader:
    """Reads the daemon's stderr in a thread (10,000 bind events must never fill the pipe)."""

    stream: Any
    wanted: tuple[bytes, ...] = (b'"reload_finished"', b'"reload_failed"', b'"started"')
    events: list[dict[str, Any]] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._read, name="stderr", daemon=True)
        thread.start()
        return thread

    def _read(self) -> None:
        for line in self.stream:
            self.tail = [*self.tail[-20:], line.decode(errors="replace").rstrip()]
            if any(marker in line for marker in self.wanted):
                with contextlib.suppress(ValueError), self.changed:
                    self.events.append(json.loads(line))
                    self.changed.notify_all()

    def wait(self, event: str, count: int, deadline: float) -> dict[str, Any]:
        """The ``count``-th event named ``event``, waiting at most ``deadline`` seconds."""
        with self.changed:
            found = self.changed.wait_for(
                lambda: len(self.named(event)) >= count or bool(self.named("reload_failed")),
                timeout=deadline,
            )
            failed = self.named("reload_failed")
        if failed:
            raise BenchError(f"a reload failed: {failed[0].get('reason')}")
        if not found:
            raise BenchError(f"no {event} #{count} within {deadline} s:\n" + "\n".join(self.tail))
        return self.named(event)[count - 1]

    def named(self, event: str) -> list[dict[str, Any]]:
        return [item for item in self.events if item.get("event") == event]


def socket_fds(pid: int) -> dict[int, int]:
    """The daemon's socket inodes, each with the fd that holds it (from /proc/PID/fd)."""
    fds = {}
    for entry in os.scandir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            link = os.readlink(entry.path)
            if link.startswith("socket:["):
                fds[int(link[len("socket:[") : -1])] = int(entry.name)
    return fds


def listener_sockets(pid: int, port: int) -> dict[str, tuple[int, int]]:
    """Each of the daemon's sockets on ``port``: label -> (fd, inode)."""
    fds = socket_fds(pid)
    return {
        str(held.name): (fds[held.inode], held.inode)
        for held in host.held_sockets(owners=False)
        if held.inode in fds and held.name.port == port
    }


def ask(address: str, port: int, payload: bytes, timeout: float = 2.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect((address, port))
        sock.send(payload)
        try:
            return sock.recv(100)
        except (TimeoutError, ConnectionRefusedError):
            return None


@contextlib.contextmanager
def daemon_process(config: Path, notify: str) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "NOTIFY_SOCKET": notify, "PYTHONPATH": str(REPO)}
    env.pop("WATCHDOG_USEC", None)
    command = [sys.executable, "-m", "udpbindd", "run", "-c", str(config)]
    proc = subprocess.Popen(
        command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


def run(count: int, deadline: float) -> dict[str, Any]:
    """Measure; raise BenchError when a check fails or a wait runs out."""
    end = time.monotonic() + deadline
    limit = raise_fd_limit(count + 1024)
    target = count // 2
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="udpbindd-bench-") as directory:
        path = Path(directory) / "udpbindd.yaml"
        path.write_text(config_text(count, port, target, Change()))
        notify = Notifications(os.path.join(directory, "notify"))
        try:
            with daemon_process(path, notify.path) as proc:
                assert proc.stderr is not None
                logs = LogReader(proc.stderr)
                logs.start()
                began = time.monotonic()
                ready_at, _ = notify.wait_for("READY", end - time.monotonic())
                startup = ready_at - began
                before = listener_sockets(proc.pid, port)
                if len(before) != count:
                    raise BenchError(f"{len(before)} sockets bound, not {count}")
                target_label = f"{address_of(target)}:{port}"
                others = {label: ids for label, ids in before.items() if label != target_label}
                reloads = []
                for number, (what, change, changed) in enumerate(STEPS, start=1):
                    path.write_text(config_text(count, port, target, change))
                    sent = time.monotonic()
                    os.kill(proc.pid, signal.SIGHUP)
                    notify.wait_for("RELOADING", end - time.monotonic())
                    ready_at, ready = notify.wait_for("READY", end - time.monotonic())
                    finished = logs.wait("reload_finished", number, end - time.monotonic())
                    counts = {key: finished[key] for key in COUNTS}
                    expected = {key: 0 for key in COUNTS} | {"kept": count - 1} | changed
                    if counts != expected:
                        raise BenchError(f"{what}: counts {counts}, expected {expected}")
                    check_sockets(
                        proc.pid, port, others=others, target=target, change=change, count=count
                    )
                    reloads.append(
                        {"change": what, "sighup_to_ready_seconds": ready_at - sent}
                        | {key: finished[key] for key in PHASES}
                        | counts
                        | {"status": ready.get("STATUS", "")}
                    )
                proc.send_signal(signal.SIGTERM)
                proc.wait(max(end - time.monotonic(), 1.0))
                if proc.returncode != 0:
                    raise BenchError(f"the daemon exited {proc.returncode}")
        finally:
            notify.close()
    totals = [item["sighup_to_ready_seconds"] for item in reloads]
    return {
        "listeners": count,
        "port": port,
        "startup_seconds": startup,
        "untouched_sockets": len(others),
        "reloads": reloads,
        "median_sighup_to_ready_seconds": statistics.median(totals),
        "max_sighup_to_ready_seconds": max(totals),
        "median_apply_seconds": statistics.median(item["apply_seconds"] for item in reloads),
        "host": {
            "python": platform.python_version(),
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "rlimit_nofile": limit,
            # Other work on the machine slows every figure: the 1-minute load average.
            "load_average": round(os.getloadavg()[0], 2),
        },
    }


def check_sockets(
    pid: int, port: int, *, others: dict[str, tuple[int, int]], target: int, change: Change,
    count: int,
) -> None:  # fmt: skip
    """Every other listener has its very fd and socket; the changed one answers as set."""
    now = listener_sockets(pid, port)
    moved = [label for label, ids in others.items() if now.get(label) != ids]
    if moved:
        raise BenchError(f"{len(moved)} untouched listeners changed socket, e.g. {moved[:3]}")
    if len(now) != count:
        raise BenchError(f"{len(now)} sockets bound after the reload, not {count}")
    address = change.address or address_of(target)
    reply = ask(address, port, b"abc")
    wanted = b"abc" if change.responder == "echo" else b"Your data was 3 bytes"
    if reply != wanted:
        raise BenchError(f"the changed listener at {address}:{port} answered {reply!r}")


def render(report: dict[str, Any]) -> str:
    lines = [
        f"{report['listeners']} listeners on 127.1.x.y:{report['port']}; "
        f"start to READY=1 {report['startup_seconds']:.2f} s; "
        f"{report['untouched_sockets']} untouched listeners kept their fd and socket throughout",
        f"({report['host']['cpus']} CPUs, load average {report['host']['load_average']}, "
        f"Python {report['host']['python']}, kernel {report['host']['kernel']})",
        "",
        "| change (one listener) | SIGHUP to READY=1 | load | survey | apply | counts |",
        "|---|---|---|---|---|---|",
    ]
    for item in report["reloads"]:
        counts = ", ".join(f"{key} {item[key]}" for key in COUNTS if item[key])
        lines.append(
            f"| {item['change']} | {item['sighup_to_ready_seconds']:.3f} s "
            f"| {item['load_seconds']:.3f} s | {item['survey_seconds']:.3f} s "
            f"| {item['apply_seconds'] * 1000:.1f} ms | {counts} |"
        )
    lines.append("")
    lines.append(
        f"median SIGHUP to READY=1 {report['median_sighup_to_ready_seconds']:.3f} s, "
        f"max {report['max_sighup_to_ready_seconds']:.3f} s; median apply "
        f"{report['median_apply_seconds'] * 1000:.1f} ms"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--listeners", type=int, default=10_000, metavar="N")
    size.add_argument(
        "--smoke", action="store_true", help=f"{SMOKE_LISTENERS} listeners: checks, not figures"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--deadline", type=float, default=110.0, metavar="S")
    args = parser.parse_args(argv)
    count = SMOKE_LISTENERS if args.smoke else args.listeners
    if not 2 <= count <= 250 * 256:
        parser.error("--listeners must be in 2..64000")
    try:
        report = run(count, args.deadline)
    except BenchError as error:
        print(f"bench/reload.py: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
