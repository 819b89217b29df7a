"""Reload as a user sees it: SIGHUP re-reads the file and moves the serving set as one transaction.

Real daemons (``python -m udpbindd run``, real SIGHUP by pid) show what an operator and a
client see: replies, the daemon's sockets in the kernel's table, /metrics, log events and
the sd_notify messages on a test-owned NOTIFY_SOCKET. A bind that fails between the clash
check and bind() cannot be timed from outside, so that case runs the daemon in-process with a
``bind`` that lets a test socket take the name first. Traffic stays on loopback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RecordingNotifier, free_port, free_port_both
from daemonproc import DaemonProcess, exchange
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from udpbindd import host
from udpbindd.config import load
from udpbindd.daemon import Daemon, Served, options_of
from udpbindd.expand import Binding
from udpbindd.metrics import make_registry
from udpbindd.sockets import open_udp
from udpbindd.survey import survey

DEADLINE = 15.0
# Every request to the kept listener must be answered within this (a reload takes far less).
REQUEST_TIMEOUT = 2.0
WriteConfig = Callable[[str], Path]


# -- helpers: a real daemon's events, sockets, metrics and notifications ----------------------


class Events:
    """The JSON log events of a daemon subprocess, read from its stderr as they come (bounded)."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        self.parsed: list[dict[str, Any]] = []
        self._partial = b""

    def named(self, event: str) -> list[dict[str, Any]]:
        return [item for item in self.parsed if item.get("event") == event]

    def wait(self, event: str, count: int = 1, deadline: float = DEADLINE) -> dict[str, Any]:
        """Read until ``count`` events named ``event`` have appeared; return the last of them."""
        proc = self.daemon.proc
        assert proc is not None
        assert proc.stderr is not None
        fd = proc.stderr.fileno()
        end = time.monotonic() + deadline
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while len(self.named(event)) < count:
                left = end - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise TimeoutError(f"{event!r} #{count} not logged in {deadline} s:\n{self}")
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise TimeoutError(f"the daemon exited before {event!r} #{count}:\n{self}")
                # Kept on the DaemonProcess too, so its own helpers still see everything.
                self.daemon.stderr += chunk
                *lines, self._partial = (self._partial + chunk).split(b"\n")
                for line in lines:
                    with contextlib.suppress(ValueError):
                        self.parsed.append(json.loads(line))
        return self.named(event)[count - 1]

    def __str__(self) -> str:
        return self.daemon.stderr.decode(errors="replace")[-4000:]


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sockets_of(pid: int) -> dict[str, int]:
    """The UDP sockets process ``pid`` holds, as the kernel reports them: label → inode."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(int(link[len("socket:[") : -1]))
    return {str(s.name): s.inode for s in host.held_sockets(owners=False) if s.inode in inodes}


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=DEADLINE) as reply:
        return parse_metrics(reply.read().decode())


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def series(samples: Samples, name: str) -> set[tuple[tuple[str, str], ...]]:
    return {labels for metric, labels in samples if metric == name}


class NotifySocket:
    """A test-owned NOTIFY_SOCKET: each datagram with the pid the kernel says sent it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        # The kernel attaches the sender's real pid, uid and gid (SCM_CREDENTIALS).
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def next(self, deadline: float = DEADLINE) -> tuple[int, dict[str, str]]:
        """The next message that is not a watchdog ping: (sender pid, its fields)."""
        end = time.monotonic() + deadline
        while True:
            self.sock.settimeout(max(end - time.monotonic(), 0.001))
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                raise TimeoutError(f"no sd_notify message in {deadline} s") from None
            pid = -1
            for level, kind, raw in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                    pid, _, _ = struct.unpack("=iII", raw[:12])
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            if set(fields) != {"WATCHDOG"}:
                return pid, fields

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    # A short directory of its own: AF_UNIX paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="udpbindd-notify-") as directory:
        listener = NotifySocket(os.path.join(directory, "notify"))
        try:
            yield listener
        finally:
            listener.close()


def ask_unconnected(address: str, port: int, payload: bytes) -> bytes | None:
    """Send from an unconnected socket and take a reply from any source address.

    A wildcard socket answers from the address the route prefers (127.0.0.1 on loopback), not
    from the one the client sent to, so a connected client would filter that reply out.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(REQUEST_TIMEOUT)
        sock.sendto(payload, (address, port))
        try:
            return sock.recv(100)
        except TimeoutError:
            return None


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def sighup(daemon: DaemonProcess) -> None:
    os.kill(daemon.pid, signal.SIGHUP)


@contextlib.contextmanager
def holder_process(address: str, port: int) -> Iterator[int]:
    """Another process holding ``address:port`` (UDP) until the block ends; yields its pid."""
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"s.bind(({address!r}, {port}))\n"
        "print('bound', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"bound\n"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(DEADLINE)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


# -- zero loss across many reloads ------------------------------------------------------------


class Pinger(threading.Thread):
    """A client that keeps one request in flight to an echo listener and counts what happens."""

    def __init__(self, port: int, limit_seconds: float = 120.0) -> None:
        super().__init__(name="pinger", daemon=True)
        self.port = port
        self.limit = limit_seconds
        self.stopping = threading.Event()
        self.sent = 0
        self.answered = 0
        self.failures: list[str] = []

    def run(self) -> None:
        end = time.monotonic() + self.limit
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.connect(("127.0.0.1", self.port))
                while not self.stopping.is_set() and time.monotonic() < end:
                    self.request(sock, b"request %d" % self.sent)
        except Exception as error:  # reported by the test, not lost in a thread
            self.failures.append(f"client crashed: {error!r}")

    def request(self, sock: socket.socket, payload: bytes) -> None:
        sock.send(payload)
        self.sent += 1
        answer_by = time.monotonic() + REQUEST_TIMEOUT
        while (left := answer_by - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                reply = sock.recv(100)
            except TimeoutError:
                break
            except ConnectionRefusedError:
                self.failures.append(f"{payload!r}: connection refused")
                return
            if reply == payload:
                self.answered += 1
                return
            # A late reply to an earlier request that already counted as failed: wait on.
        self.failures.append(f"{payload!r}: no reply within {REQUEST_TIMEOUT} s")


State = tuple[int, int, int]  # (swap to the wildcard, movers swapped, extra present)


def reload_config(ports: dict[str, int], metrics: int, state: State) -> str:
    wildcard, moved, extra = state
    a, b = ("127.0.0.3", "127.0.0.2") if moved else ("127.0.0.2", "127.0.0.3")
    text = f"""
listeners:
  - {{name: kept, interface: 127.0.0.1, port: {ports["kept"]}, responder: echo}}
  - {{name: swap, interface: {"0.0.0.0" if wildcard else "127.0.0.1"}, port: {ports["swap"]}}}
  - {{name: mover-a, interface: {a}, port: {ports["move"]}, responder: echo}}
  - {{name: mover-b, interface: {b}, port: {ports["move"]}, responder: size}}
"""
    if extra:
        text += f"  - {{name: extra, interface: 127.0.0.4, port: {ports['extra']}}}\n"
    return text + f'metrics: {{listen: "127.0.0.1:{metrics}"}}\n'


def expected_sockets(ports: dict[str, int], state: State) -> set[str]:
    wildcard, _, extra = state
    names = {
        f"127.0.0.1:{ports['kept']}",
        f"{'0.0.0.0' if wildcard else '127.0.0.1'}:{ports['swap']}",
        f"127.0.0.2:{ports['move']}",
        f"127.0.0.3:{ports['move']}",
    }
    return names | ({f"127.0.0.4:{ports['extra']}"} if extra else set())


def expected_counts(before: State, after: State) -> dict[str, int]:
    swapped, moved = before[0] != after[0], before[1] != after[1]
    return {
        "added": int(swapped) + int(after[2] and not before[2]),
        "removed": int(swapped) + int(before[2] and not after[2]),
        "kept": 1 + (0 if swapped else 1) + (0 if moved else 2) + int(before[2] and after[2]),
        "rebound": 0,
        "relabelled": 2 if moved else 0,
        "failed": 0,
    }


def check_changed_listeners(ports: dict[str, int], state: State) -> None:
    """What clients of the listeners that change see right after a reload to ``state``."""
    wildcard, moved, extra = state
    if wildcard:
        assert ask_unconnected("127.0.0.5", ports["swap"], b"x") == b"Your data was 1 bytes"
    else:
        assert exchange("127.0.0.5", ports["swap"], b"x") is None  # refused
    assert exchange("127.0.0.1", ports["swap"], b"xy") == b"Your data was 2 bytes"
    at_2 = exchange("127.0.0.2", ports["move"], b"who")
    assert at_2 == (b"Your data was 3 bytes" if moved else b"who")
    at_4 = exchange("127.0.0.4", ports["extra"], b"x")
    assert at_4 == (b"Your data was 1 bytes" if extra else None)


def received_and_sent(metrics: int, labels: dict[str, str], expected: int) -> tuple[float, float]:
    """The packet counters of one binding, once both read ``expected`` (or the deadline)."""
    # The loop counts a reply just after sending it, so a client can be a moment ahead.
    end = time.monotonic() + DEADLINE
    while True:
        samples = scrape(metrics)
        now = (
            sample(samples, "udpbindd_received_packets_total", **labels),
            sample(samples, "udpbindd_sent_packets_total", **labels),
        )
        if now == (expected, expected) or time.monotonic() > end:
            return now
        time.sleep(0.01)


def test_a_kept_listener_answers_every_request_through_many_reloads(
    write_config: WriteConfig,
) -> None:
    ports = {"kept": free_port(), "swap": free_port_both(), "move": free_port()}
    ports["extra"] = free_port()
    metrics = free_tcp_port()
    kept = f"127.0.0.1:{ports['kept']}"
    labels = {"listener": "kept", "socket": kept}
    # Counting in binary: the swap flips every reload, the movers every second one and the
    # extra listener comes and goes every fourth; 24 reloads pass through every combination.
    states: list[State] = [(i % 2, i // 2 % 2, i // 4 % 2) for i in range(25)]
    path = write_config(reload_config(ports, metrics, states[0]))
    pinger = Pinger(ports["kept"])
    with DaemonProcess(path) as daemon:
        events = Events(daemon)
        events.wait("started")
        first = sockets_of(daemon.pid)
        assert set(first) == expected_sockets(ports, states[0])
        inode = first[kept]
        counts = [sample(scrape(metrics), "udpbindd_received_packets_total", **labels)]
        pinger.start()
        try:
            for number, state in enumerate(states[1:], start=1):
                path.write_text(reload_config(ports, metrics, state))
                sighup(daemon)
                finished = events.wait("reload_finished", count=number)
                assert finished["ok"] is True, events
                summary = {key: finished[key] for key in expected_counts(state, state)}
                assert summary == expected_counts(states[number - 1], state), number
                held = sockets_of(daemon.pid)
                assert set(held) == expected_sockets(ports, state)
                assert held[kept] == inode  # the very same socket, never re-bound
                counts.append(sample(scrape(metrics), "udpbindd_received_packets_total", **labels))
                check_changed_listeners(ports, state)
        finally:
            pinger.stopping.set()
            pinger.join(REQUEST_TIMEOUT + DEADLINE)
        assert not pinger.is_alive()
        assert pinger.failures == []
        # Thousands in practice; at least a steady stream while the reloads ran.
        assert pinger.sent == pinger.answered > 10 * 24
        # Counters only grow, and in the end they count exactly what the client sent.
        assert counts == sorted(counts)
        assert received_and_sent(metrics, labels, pinger.sent) == (pinger.sent, pinger.sent)
        assert daemon.stop() == 0
    assert len(events.named("reload_finished")) == 24


# -- failed reloads change nothing ------------------------------------------------------------


@dataclasses.dataclass
class Watched:
    """A daemon subprocess seen from outside: log events, sd_notify messages and /metrics."""

    daemon: DaemonProcess
    path: Path
    notify: NotifySocket
    metrics: int
    reloads: int = 0

    def __post_init__(self) -> None:
        self.events = Events(self.daemon)

    def reload(self, text: str) -> tuple[dict[str, Any], dict[str, str]]:
        """Write ``text``, SIGHUP, and return the summary event and the READY=1 message."""
        self.path.write_text(text)
        sighup(self.daemon)
        self.reloads += 1
        finished = self.events.wait("reload_finished", count=self.reloads)
        assert self.notify.next()[1]["RELOADING"] == "1"
        _, ready = self.notify.next()
        assert ready["READY"] == "1"
        return finished, ready

    def failed_reload(self, text: str, serving: dict[str, int], since: float) -> str:
        """Reload ``text``, check that nothing changed, and return what STATUS says why."""
        finished, ready = self.reload(text)
        assert finished["ok"] is False
        # The same sockets, no others; the reload gauge is 0 and its timestamp stays.
        assert sockets_of(self.daemon.pid) == serving
        samples = scrape(self.metrics)
        assert sample(samples, "udpbindd_config_last_reload_successful") == 0
        stamp = sample(samples, "udpbindd_config_last_reload_success_timestamp_seconds")
        assert stamp == since
        assert {dict(labels)["socket"] for labels in series(samples, "udpbindd_listener_up")} == (
            set(serving)
        )
        prefix = "reload failed, still serving the previous set: "
        assert ready["STATUS"].startswith(prefix)
        return str(ready["STATUS"]).removeprefix(prefix)


def test_failed_reloads_keep_serving_and_say_why_until_a_good_one(
    write_config: WriteConfig, notify: NotifySocket
) -> None:
    kept, other, taken = free_port(), free_port_both(), free_port()
    metrics = free_tcp_port()
    good = f"""
listeners:
  - {{name: kept, interface: 127.0.0.1, port: {kept}, responder: echo}}
  - {{name: other, interface: 127.0.0.1, port: {other}}}
metrics: {{listen: "127.0.0.1:{metrics}"}}
"""
    path = write_config(good)

    def still_serving_as_before() -> None:
        assert exchange("127.0.0.1", kept, b"still") == b"still"
        assert exchange("127.0.0.1", other, b"here") == b"Your data was 4 bytes"

    with DaemonProcess(path, env={"NOTIFY_SOCKET": notify.path}) as daemon:
        watched = Watched(daemon, path, notify, metrics)
        events = watched.events
        assert notify.next()[1]["READY"] == "1"
        started = scrape(metrics)
        assert sample(started, "udpbindd_config_last_reload_successful") == 1
        since = sample(started, "udpbindd_config_last_reload_success_timestamp_seconds")
        assert since > 0
        serving = sockets_of(daemon.pid)
        assert set(serving) == {f"127.0.0.1:{kept}", f"127.0.0.1:{other}"}

        # 1. An invalid file: every problem is logged with its line; STATUS gives the first.
        invalid = good.replace(f"port: {other}}}", "port: 70000, colour: red}")
        status = watched.failed_reload(invalid, serving, since)
        still_serving_as_before()
        assert status.startswith(f"invalid configuration: {path}:4: listeners[1].")
        problems = [e["problem"] for e in events.named("config_problem")]
        assert len(problems) == 2
        assert all(problem.startswith(f"{path}:4: listeners[1].") for problem in problems)
        assert any("70000 is not in 1..65535" in problem for problem in problems)
        assert any("colour" in problem for problem in problems)
        assert events.named("reload_failed")[-1]["reason"].startswith(status)

        # 2. A clash with a socket another process holds; the relabel beside it waits too.
        with holder_process("127.0.0.1", taken) as pid:
            clashing = good.replace("responder: echo", "responder: size").replace(
                "metrics:", f"  - {{name: taken, interface: 127.0.0.1, port: {taken}}}\nmetrics:"
            )
            status = watched.failed_reload(clashing, serving, since)
            still_serving_as_before()  # with the old responder: the relabel waits too
        assert status.startswith(
            f"listener 'taken' (127.0.0.1:{taken}): address already in use: clashes with "
            f"127.0.0.1:{taken} held by pid {pid} ("
        )

        # 3. A clash within the file: the wildcard would cover the serving 127.0.0.1 socket.
        within = good.replace(
            "metrics:", f'  - {{name: everywhere, interface: "0.0.0.0", port: {other}}}\nmetrics:'
        )
        status = watched.failed_reload(within, serving, since)
        still_serving_as_before()
        assert status.startswith(
            f"listener 'everywhere' (0.0.0.0:{other}): address already in use: clashes with "
            f"listener 'other' (127.0.0.1:{other})"
        )
        assert exchange("127.0.0.5", other, b"x") is None  # no wildcard was bound

        # 4. A good reload puts the gauge back to 1 with a newer timestamp.
        finished, ready = watched.reload(good.replace("responder: echo", "responder: size"))
        assert (finished["ok"], finished["relabelled"], finished["kept"]) == (True, 1, 1)
        assert ready == {"READY": "1", "STATUS": "2 bound, 0 waiting, 0 failed"}
        samples = scrape(metrics)
        assert sample(samples, "udpbindd_config_last_reload_successful") == 1
        assert sample(samples, "udpbindd_config_last_reload_success_timestamp_seconds") > since
        assert exchange("127.0.0.1", kept, b"abc") == b"Your data was 3 bytes"
        assert sockets_of(daemon.pid) == serving
        assert daemon.stop() == 0


def test_sd_notify_sequence_around_a_reload(
    write_config: WriteConfig, notify: NotifySocket
) -> None:
    port = free_port()
    path = write_config(
        f"listeners: [{{name: one, interface: 127.0.0.1, port: {port}}}]\nmetrics: {{listen: []}}\n"
    )
    with DaemonProcess(path, env={"NOTIFY_SOCKET": notify.path}) as daemon:
        events = Events(daemon)
        pid, ready = notify.next()
        assert pid == daemon.pid
        assert ready == {"READY": "1", "STATUS": "1 bound, 0 waiting, 0 failed"}
        for number, text, status in (
            (1, path.read_text(), "1 bound, 0 waiting, 0 failed"),
            (2, "listeners: [", "reload failed, still serving the previous set: invalid"),
        ):
            path.write_text(text)
            before = monotonic_usec()
            sighup(daemon)
            pid, reloading = notify.next()
            after = monotonic_usec()
            assert pid == daemon.pid
            assert set(reloading) == {"RELOADING", "MONOTONIC_USEC"}
            assert reloading["RELOADING"] == "1"
            # CLOCK_MONOTONIC is one clock for every process: taken between the kill and now.
            assert before <= int(reloading["MONOTONIC_USEC"]) <= after
            pid, done = notify.next()
            assert pid == daemon.pid
            assert done["READY"] == "1"
            assert done["STATUS"].startswith(status)
            events.wait("reload_finished", count=number)
        assert daemon.stop() == 0
        pid, stopping = notify.next()
        assert (pid, stopping) == (daemon.pid, {"STOPPING": "1", "STATUS": "stopping"})


# -- in-process: a bind that fails in the middle of the transaction ---------------------------


class RacingBind:
    """Binds as the daemon does, but lets a test socket take chosen names first (a race).

    A context manager: the sockets it took are closed on leaving, or earlier by ``release``.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.steal: set[str] = set()
        self.thieves: list[socket.socket] = []

    def __call__(self, binding: Binding) -> tuple[socket.socket, int]:
        label = str(binding.name)
        self.calls.append(label)
        if label in self.steal:
            self.steal.discard(label)
            thief = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.thieves.append(thief)
            thief.bind((str(binding.name.address), binding.name.port))
        return open_udp(binding.name, options_of(binding))

    def release(self) -> None:
        for thief in self.thieves:
            thief.close()
        self.thieves.clear()

    def __enter__(self) -> RacingBind:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def in_process(path: Path, bind: RacingBind) -> Iterator[tuple[Daemon, RecordingNotifier]]:
    """A daemon reading ``path``, serving from a thread; SIGTERM on leaving."""
    config = load(path)
    notifier = RecordingNotifier()
    daemon = Daemon(config, notifier=notifier, bind=bind, loader=lambda: load(path))
    try:
        daemon.start(survey(config.enabled_listeners))
        thread = threading.Thread(target=daemon.run, name="udpbindd-loop", daemon=True)
        thread.start()
        try:
            yield daemon, notifier
        finally:
            daemon.wake(signal.SIGTERM)
            thread.join(DEADLINE)
            assert not thread.is_alive()
    finally:
        daemon.shutdown()


def reload_in_process(daemon: Daemon, events: list[dict[str, Any]]) -> dict[str, Any]:
    """SIGHUP the loop and wait (bounded) for this reload's summary event."""
    done = len([e for e in events if e["event"] == "reload_finished"])
    daemon.wake(signal.SIGHUP)
    end = time.monotonic() + DEADLINE
    while len(finished := [e for e in events if e["event"] == "reload_finished"]) <= done:
        assert time.monotonic() < end, "the reload did not finish"
        time.sleep(0.002)
    return finished[-1]


def by_label(daemon: Daemon) -> dict[str, Served]:
    return {str(name): served for name, served in daemon.served.items()}


def can_bind(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((address, port))
        except OSError:
            return False
        return True


def comm() -> str:
    return Path("/proc/self/comm").read_text().strip()


def test_a_bind_failing_mid_reload_rolls_back_to_exactly_the_previous_set(
    write_config: WriteConfig, log_events: list[dict[str, Any]]
) -> None:
    kept, relabel, rebind, swap, gone, new, raced = (free_port_both() for _ in range(7))
    before = f"""
listeners:
  - {{name: kept, interface: 127.0.0.1, port: {kept}, responder: echo}}
  - {{name: relabel, interface: 127.0.0.1, port: {relabel}, responder: size}}
  - {{name: rebind, interface: 127.0.0.1, port: {rebind}, recv_buffer: 256KiB}}
  - {{name: swap, interface: 127.0.0.1, port: {swap}}}
  - {{name: gone, interface: 127.0.0.1, port: {gone}}}
metrics: {{listen: []}}
"""
    after = f"""
listeners:
  - {{name: kept, interface: 127.0.0.1, port: {kept}, responder: echo}}
  - {{name: renamed, interface: 127.0.0.1, port: {relabel}, responder: echo}}
  - {{name: rebind, interface: 127.0.0.1, port: {rebind}, recv_buffer: 512KiB}}
  - {{name: swap, interface: 0.0.0.0, port: {swap}}}
  - {{name: new, interface: 127.0.0.7, port: {new}}}
  - {{name: raced, interface: 127.0.0.8, port: {raced}}}
metrics: {{listen: []}}
"""
    path = write_config(before)
    with RacingBind() as bind, in_process(path, bind) as (daemon, notifier):
        for port in (kept, rebind, swap):
            assert exchange("127.0.0.1", port, b"abc") is not None
        previous = by_label(daemon)
        old_snapshot = daemon.snapshot()
        fd, inode = previous[f"127.0.0.1:{kept}"].sock.fileno(), previous[f"127.0.0.1:{kept}"].inode
        bind.calls.clear()
        bind.steal.add(f"127.0.0.8:{raced}")
        path.write_text(after)
        finished = reload_in_process(daemon, log_events)

        assert finished["ok"] is False
        # Bound in plan order until the race; then what was closed was bound again.
        assert bind.calls == [
            f"127.0.0.1:{rebind}",
            f"0.0.0.0:{swap}",
            f"127.0.0.7:{new}",
            f"127.0.0.8:{raced}",
            f"127.0.0.1:{rebind}",
            f"127.0.0.1:{swap}",
        ]
        now = by_label(daemon)
        assert list(now) == list(previous)  # the same socket names, in the same order
        assert now[f"127.0.0.1:{kept}"] is previous[f"127.0.0.1:{kept}"]
        assert (now[f"127.0.0.1:{kept}"].sock.fileno(), now[f"127.0.0.1:{kept}"].inode) == (
            fd,
            inode,
        )
        # The relabel was never applied; the re-bound socket has its old options back.
        assert now[f"127.0.0.1:{relabel}"].binding.listener.name == "relabel"
        assert exchange("127.0.0.1", relabel, b"abcd") == b"Your data was 4 bytes"
        assert now[f"127.0.0.1:{rebind}"].recv_buffer == 2 * 256 * 1024
        # Counters of the sockets that were closed and bound again go on from where they were.
        assert exchange("127.0.0.1", rebind, b"x") == b"Your data was 1 bytes"
        assert now[f"127.0.0.1:{rebind}"].stats.received_packets == 2
        assert exchange("127.0.0.1", swap, b"x") == b"Your data was 1 bytes"
        assert exchange("127.0.0.5", swap, b"x") is None  # the wildcard is gone again
        assert exchange("127.0.0.1", gone, b"x") == b"Your data was 1 bytes"
        assert can_bind("127.0.0.7", new)
        snap = daemon.snapshot()
        assert snap.reload_ok is False
        assert snap.reload_timestamp == old_snapshot.reload_timestamp
        assert [(b.binding.listener.name, str(b.binding.name)) for b in snap.bound] == [
            (b.binding.listener.name, str(b.binding.name)) for b in old_snapshot.bound
        ]
        assert notifier.sent[-2][0] == "RELOADING=1"
        assert notifier.sent[-1][0] == "READY=1"
        assert notifier.sent[-1][1].startswith(
            f"STATUS=reload failed, still serving the previous set: listener 'raced' "
            f"(127.0.0.8:{raced}): address already in use: clashes with 127.0.0.8:{raced} "
            f"held by pid {os.getpid()} ({comm()}): both want exactly 127.0.0.8:{raced}"
        )
        (failed,) = [e for e in log_events if e["event"] == "bind_failed"]
        assert (failed["listener"], failed["errno"], failed["required"]) == (
            "raced",
            "EADDRINUSE",
            True,
        )

        # The thief lets go: the same file now applies in full.
        bind.release()
        assert can_bind("127.0.0.8", raced)
        finished = reload_in_process(daemon, log_events)
        assert {k: finished[k] for k in ("ok", "added", "removed", "kept")} == {
            "ok": True,
            "added": 3,  # 0.0.0.0 (for 127.0.0.1), 127.0.0.7, 127.0.0.8
            "removed": 2,  # the swapped 127.0.0.1 and "gone"
            "kept": 1,
        }
        assert (finished["rebound"], finished["relabelled"], finished["failed"]) == (1, 1, 0)
        snap = daemon.snapshot()
        assert snap.reload_ok is True
        assert snap.reload_timestamp > old_snapshot.reload_timestamp
        assert ask_unconnected("127.0.0.5", swap, b"x") == b"Your data was 1 bytes"
        assert exchange("127.0.0.1", relabel, b"echoed") == b"echoed"
        assert by_label(daemon)[f"127.0.0.1:{rebind}"].recv_buffer == 2 * 512 * 1024
        assert by_label(daemon)[f"127.0.0.1:{rebind}"].stats.received_packets == 2
        assert can_bind("127.0.0.1", gone)  # removed: closed once the new set was bound


def test_a_socket_the_rollback_cannot_bind_again_is_reported_down(
    write_config: WriteConfig, log_events: list[dict[str, Any]]
) -> None:
    kept, swap, raced = free_port(), free_port_both(), free_port()
    before = f"""
listeners:
  - {{name: kept, interface: 127.0.0.1, port: {kept}}}
  - {{name: swap, interface: 127.0.0.1, port: {swap}}}
metrics: {{listen: []}}
"""
    path = write_config(before)
    with RacingBind() as bind, in_process(path, bind) as (daemon, notifier):
        # The wildcard closes 127.0.0.1 first; the race fails the reload; and while the
        # wildcard is closed again, another socket takes 127.0.0.1 before the rollback can.
        bind.steal |= {f"127.0.0.8:{raced}", f"127.0.0.1:{swap}"}
        path.write_text(
            before.replace(f"127.0.0.1, port: {swap}", f"0.0.0.0, port: {swap}").replace(
                "metrics:", f"  - {{name: raced, interface: 127.0.0.8, port: {raced}}}\nmetrics:"
            )
        )
        finished = reload_in_process(daemon, log_events)
        assert (finished["ok"], finished["kept"]) == (False, 1)
        assert list(map(str, daemon.served)) == [f"127.0.0.1:{kept}"]
        assert exchange("127.0.0.1", kept, b"x") == b"Your data was 1 bytes"
        snap = daemon.snapshot()
        assert snap.reload_ok is False
        assert [(d.listener, d.socket) for d in snap.down] == [("swap", f"127.0.0.1:{swap}")]
        (lost,) = [e for e in log_events if e["event"] == "rollback_rebind_failed"]
        assert (lost["socket"], lost["errno"]) == (f"127.0.0.1:{swap}", "EADDRINUSE")
        status = notifier.sent[-1][1]
        assert status.startswith("STATUS=reload failed, still serving the previous set: ")
        assert status.endswith("; 1 previous socket(s) could not be bound again")
        assert daemon.status_text() == "1 bound, 0 waiting, 1 failed"


def test_a_relabel_renames_the_series_and_keeps_counting(
    write_config: WriteConfig, log_events: list[dict[str, Any]]
) -> None:
    port = free_port()
    path = write_config(
        f"listeners: [{{name: before, interface: 127.0.0.1, port: {port}}}]\n"
        "metrics: {listen: []}\n"
    )
    with RacingBind() as bind, in_process(path, bind) as (daemon, _):
        registry = make_registry(daemon.snapshot)
        for _ in range(3):
            assert exchange("127.0.0.1", port, b"abc") == b"Your data was 3 bytes"
        served = by_label(daemon)[f"127.0.0.1:{port}"]
        old_snapshot = daemon.snapshot()
        path.write_text(path.read_text().replace("name: before", "name: after, responder: echo"))
        finished = reload_in_process(daemon, log_events)
        assert (finished["relabelled"], finished["kept"], finished["rebound"]) == (1, 0, 0)
        assert exchange("127.0.0.1", port, b"echo") == b"echo"
        now = by_label(daemon)[f"127.0.0.1:{port}"]
        assert now.sock is served.sock  # the same socket: relabelled, never re-bound
        end = time.monotonic() + DEADLINE
        while now.stats.sent_packets < 4 and time.monotonic() < end:
            time.sleep(0.002)
        samples = parse_metrics(generate_latest(registry).decode())
        socket_label = f"127.0.0.1:{port}"
        assert (
            sample(
                samples, "udpbindd_received_packets_total", listener="after", socket=socket_label
            )
            == 4
        )
        assert series(samples, "udpbindd_received_packets_total") == {
            (("listener", "after"), ("socket", socket_label))
        }
        # A snapshot taken before the reload still reads as before: never changed in place.
        (old,) = old_snapshot.bound
        assert (old.binding.listener.name, old.binding.listener.responder.value) == (
            "before",
            "size",
        )


def test_an_optional_listener_failing_mid_reload_is_not_a_rollback(
    write_config: WriteConfig, log_events: list[dict[str, Any]]
) -> None:
    kept, optional, added = free_port(), free_port(), free_port()
    base = f"""
listeners:
  - {{name: kept, interface: 127.0.0.1, port: {kept}}}
metrics: {{listen: []}}
"""
    path = write_config(base)
    with RacingBind() as bind, in_process(path, bind) as (daemon, notifier):
        bind.steal.add(f"127.0.0.1:{optional}")
        path.write_text(
            base.replace(
                "metrics:",
                f"  - {{name: optional, interface: 127.0.0.1, port: {optional}, required: false}}\n"
                f"  - {{name: added, interface: 127.0.0.1, port: {added}}}\nmetrics:",
            )
        )
        finished = reload_in_process(daemon, log_events)
        assert (finished["ok"], finished["added"], finished["failed"]) == (True, 1, 1)
        assert exchange("127.0.0.1", added, b"x") == b"Your data was 1 bytes"
        snap = daemon.snapshot()
        assert snap.reload_ok is True
        assert [(d.listener, d.socket) for d in snap.down] == [
            ("optional", f"127.0.0.1:{optional}")
        ]
        assert notifier.sent[-1] == ("READY=1", "STATUS=2 bound, 0 waiting, 1 failed")


def test_every_snapshot_a_scrape_takes_is_one_whole_state(
    write_config: WriteConfig, log_events: list[dict[str, Any]]
) -> None:
    """Scrapes racing many reloads see the state before or after one, never a mixture.

    Each reload relabels 200 sockets, adds or removes 20 and changes which listener is down;
    a scraper thread checks every snapshot it can take. The interpreter switches threads
    every 10 µs meanwhile, so a state that is visible half-built is found.
    """
    port, other = free_port(), free_port()
    count, extra = 200, 20

    def text(flip: int) -> str:
        rows = [
            f"  - {{name: l{i}-{flip}, interface: 127.0.0.{i + 1}, port: {port},"
            f" responder: {'echo' if flip else 'size'}}}"
            for i in range(count)
        ]
        rows += [
            f"  - {{name: x{i}, interface: 127.0.1.{i + 1}, port: {port}}}" for i in range(extra)
        ][: extra * flip]
        # A listener that cannot resolve: its "down" entry must belong to the same state.
        rows.append(
            f"  - {{name: maybe, interface: nosuchdev{flip}, port: {other}, required: false}}"
        )
        return "listeners:\n" + "\n".join(rows) + "\nmetrics: {listen: []}\n"

    def state(flip: int) -> tuple[frozenset[tuple[str, str]], list[str]]:
        bound = {(f"l{i}-{flip}", f"127.0.0.{i + 1}:{port}") for i in range(count)}
        bound |= {(f"x{i}", f"127.0.1.{i + 1}:{port}") for i in range(extra * flip)}
        return frozenset(bound), [f"maybe nosuchdev{flip} port {other}"]

    states = [state(0), state(1)]
    path = write_config(text(0))
    mixtures: list[str] = []
    stop = threading.Event()
    scrapes = 0

    def scraper(daemon: Daemon) -> None:
        nonlocal scrapes
        while not stop.is_set():
            snap = daemon.snapshot()
            bound = frozenset((b.binding.listener.name, str(b.binding.name)) for b in snap.bound)
            down = [f"{d.listener} {d.socket}" for d in snap.down]
            if (bound, down) not in states:
                names = sorted({name.split("-")[-1] for name, _ in bound})
                mixtures.append(f"{len(bound)} bound, name suffixes {names}, down={down}")
            scrapes += 1

    switch = sys.getswitchinterval()
    with RacingBind() as bind, in_process(path, bind) as (daemon, _):
        thread = threading.Thread(target=scraper, args=(daemon,), daemon=True)
        sys.setswitchinterval(1e-5)
        thread.start()
        try:
            for number in range(1, 11):
                path.write_text(text(number % 2))
                finished = reload_in_process(daemon, log_events)
                assert (finished["ok"], finished["relabelled"]) == (True, count)
        finally:
            stop.set()
            thread.join(DEADLINE)
            sys.setswitchinterval(switch)
    assert scrapes > 100
    assert mixtures == []
