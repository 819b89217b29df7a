"""The sd_notify sequence, read from a NOTIFY_SOCKET the test owns, with the daemon as a subprocess.

The test binds an AF_UNIX datagram socket with SO_PASSCRED, so the kernel attaches the
sender's pid to every message: systemd (NotifyAccess=main) would ignore any message not sent
by the main pid, so every message must come from the daemon's own pid. Waits are bounded;
where the assertion is that nothing arrives (a stopped daemon, a watchdog meant for another
pid), the test watches for a fixed number of watchdog intervals.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import statistics
import struct
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import free_port, free_port_both
from daemonproc import DEADLINE, DaemonProcess, exchange, plain_lines, wait_answering

from udpbindd import host, systemd

# Variables a test run inside a systemd service would otherwise pass on to the daemon.
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
WATCHDOG_USEC = 400_000
PING_INTERVAL = WATCHDOG_USEC / 2 / 1e6
# Sets WATCHDOG_PID to the pid that the daemon will have (exec keeps it), as systemd does.
OWN_WATCHDOG_PID = ("/bin/sh", "-c", 'export WATCHDOG_PID=$$; exec "$@"', "sh")
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


@dataclass
class Message:
    """One sd_notify datagram: its fields, the sender's pid and when it arrived."""

    fields: dict[str, str]
    pid: int | None
    at: float = field(default_factory=time.monotonic)

    def has(self, key: str) -> bool:
        return key in self.fields


class NotifySocket:
    """The receiving end of NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.received: list[Message] = []

    def close(self) -> None:
        self.sock.close()

    def receive(self, timeout: float) -> Message | None:
        """The next message, or None if none arrives within ``timeout`` seconds."""
        if timeout > 0:
            self.sock.settimeout(timeout)
        else:
            self.sock.setblocking(False)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
        except (TimeoutError, BlockingIOError):
            return None
        pid = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(payload[: _UCRED.size])[0]
        fields = dict(line.partition("=")[::2] for line in data.decode().split("\n") if line)
        message = Message(fields, pid)
        self.received.append(message)
        return message

    def next(
        self, what: str, matches: Callable[[Message], bool], deadline: float = DEADLINE
    ) -> Message:
        """The next message that ``matches`` (others are kept in ``received``), bounded."""
        end = time.monotonic() + deadline
        while True:
            message = self.receive(end - time.monotonic())
            if message is not None and matches(message):
                return message
            if time.monotonic() >= end:
                raise TimeoutError(f"no {what} within {deadline} s; received: {self.received}")

    def during(self, seconds: float) -> list[Message]:
        """Every message that arrives in the next ``seconds`` seconds."""
        end = time.monotonic() + seconds
        found = []
        while (left := end - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None:
                found.append(message)
        return found

    def drain(self) -> list[Message]:
        """Whatever is queued right now."""
        found = []
        while (message := self.receive(0)) is not None:
            found.append(message)
        return found


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    path = tmp_path / "notify"
    assert len(os.fsencode(path)) < 108, "sun_path holds at most 107 bytes"
    receiver = NotifySocket(path)
    yield receiver
    receiver.close()


def is_ping(message: Message) -> bool:
    return message.fields == {"WATCHDOG": "1"}


def not_ping(message: Message) -> bool:
    return not is_ping(message)


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def daemon_with(
    config: Path,
    notify: NotifySocket | None,
    *,
    watchdog_usec: int | None = None,
    watchdog_pid: str | None = None,
    prefix: tuple[str, ...] = (),
) -> DaemonProcess:
    daemon = DaemonProcess(config, args=("--log-format", "json"), prefix=prefix)
    for name in SYSTEMD_VARIABLES:
        daemon.env.pop(name, None)
    if notify is not None:
        daemon.env["NOTIFY_SOCKET"] = str(notify.path)
    if watchdog_usec is not None:
        daemon.env["WATCHDOG_USEC"] = str(watchdog_usec)
    if watchdog_pid is not None:
        daemon.env["WATCHDOG_PID"] = watchdog_pid
    return daemon


def metrics_text(port: int) -> str:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=2) as response:
        return str(response.read().decode())


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (R, S, T for stopped...)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0]


def wait_state(pid: int, state: str) -> None:
    end = time.monotonic() + DEADLINE
    while process_state(pid) != state:
        if time.monotonic() > end:
            raise TimeoutError(f"pid {pid} never reached state {state}")
        time.sleep(0.005)


def one_listener(port: int) -> str:
    # No metrics: a file without the key would serve them on the default port, 9917.
    return f"listeners: [{{interface: 127.0.0.1, port: {port}}}]\nmetrics: {{listen: []}}\n"


def listeners_config(port: int, metrics_port: int | None, other: int) -> str:
    metrics = f"[127.0.0.1:{metrics_port}]" if metrics_port else "[]"
    return f"""
listeners:
  - {{interface: 127.0.0.1, port: {port}}}
  - {{interface: "::1", port: {port}}}
  - {{name: other, interface: 127.0.0.1, port: {other}}}
metrics:
  listen: {metrics}
"""


# -- READY and STATUS ------------------------------------------------------------------------


def test_ready_is_sent_once_every_listener_answers_and_metrics_are_served(
    notify: NotifySocket, write_config: Callable[[str], Path]
) -> None:
    port, other, metrics_port = free_port_both(), free_port(), free_tcp_port()
    config = write_config(listeners_config(port, metrics_port, other))
    with daemon_with(config, notify) as daemon:
        ready = notify.next("READY=1", lambda m: m.has("READY"))
        # Frozen as READY=1 left it, the daemon must already hold every socket: bound
        # listeners, and a listening metrics socket (the kernel completes the handshake).
        daemon.signal(signal.SIGSTOP)
        try:
            wait_state(daemon.pid, "T")
            held = {
                str(h.name) for h in host.held_sockets() if h.owner and h.owner.pid == daemon.pid
            }
            assert held == {f"127.0.0.1:{port}", f"[::1]:{port}", f"127.0.0.1:{other}"}
            with socket.create_connection(("127.0.0.1", metrics_port), timeout=2):
                pass
        finally:
            daemon.signal(signal.SIGCONT)
        # Then, with no retry: each listener answers, and so do the metrics.
        for address, to in (("127.0.0.1", port), ("::1", port), ("127.0.0.1", other)):
            assert exchange(address, to, b"ready?", timeout=2.0) == b"Your data was 6 bytes", to
        assert 'udpbindd_listener_up{listener="other"' in metrics_text(metrics_port)
        assert ready.fields == {"READY": "1", "STATUS": "3 bound, 0 waiting, 0 failed"}
        assert ready.pid == daemon.pid
        assert ready is notify.received[0], "something was sent before READY=1"
        assert daemon.stop() == 0


def test_status_counts_an_optional_listener_that_failed(
    notify: NotifySocket, write_config: Callable[[str], Path]
) -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        taken = squatter.getsockname()[1]
        config = write_config(
            f"""
listeners:
  - {{interface: 127.0.0.1, port: {port}}}
  - {{interface: 127.0.0.1, port: {taken}, required: false}}
metrics: {{listen: []}}
"""
        )
        with daemon_with(config, notify) as daemon:
            ready = notify.next("READY=1", lambda m: m.has("READY"))
            assert ready.fields["STATUS"] == "1 bound, 0 waiting, 1 failed"
            assert ready.pid == daemon.pid
            assert daemon.stop() == 0


def test_a_required_listener_that_cannot_bind_reports_status_and_is_never_ready(
    notify: NotifySocket, write_config: Callable[[str], Path]
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        taken = squatter.getsockname()[1]
        config = write_config(one_listener(taken))
        with daemon_with(config, notify) as daemon:
            assert daemon.wait() == 1
    messages = notify.drain()
    assert [m.fields.keys() for m in messages] == [{"STATUS"}]
    assert messages[0].fields["STATUS"].startswith(f"failed: listener '127.0.0.1:{taken}'")
    assert messages[0].pid == daemon.pid


# -- WATCHDOG ----------------------------------------------------------------------------------


def ping_bounds(seconds: float) -> tuple[int, int]:
    """How many pings a window may plausibly hold: allows for a late first one and jitter."""
    expected = seconds / PING_INTERVAL
    return int(expected * 0.6), int(expected) + 2


def test_watchdog_pings_every_half_watchdog_usec_from_the_main_pid(
    notify: NotifySocket, write_config: Callable[[str], Path]
) -> None:
    port = free_port()
    config = write_config(one_listener(port))
    # WATCHDOG_PID is the daemon's own pid here, as systemd sets it.
    with daemon_with(
        config, notify, watchdog_usec=WATCHDOG_USEC, prefix=OWN_WATCHDOG_PID
    ) as daemon:
        notify.next("READY=1", lambda m: m.has("READY"))
        window = 2.0
        messages = notify.during(window)
        pings = [m for m in messages if is_ping(m)]
        low, high = ping_bounds(window)
        assert low <= len(pings) <= high, [round(m.at, 3) for m in pings]
        assert {m.pid for m in pings} == {daemon.pid}
        gaps = [b.at - a.at for a, b in itertools.pairwise(pings)]
        # Never faster than the interval (receive-time jitter aside), about it on the median.
        assert min(gaps) > PING_INTERVAL / 2, gaps
        assert PING_INTERVAL * 0.75 <= statistics.median(gaps) <= PING_INTERVAL * 1.5, gaps
        assert daemon.stop() == 0


def test_no_watchdog_pings_when_watchdog_pid_is_another_process(
    notify: NotifySocket, write_config: Callable[[str], Path]
) -> None:
    port = free_port()
    config = write_config(one_listener(port))
    with daemon_with(
        config, notify, watchdog_usec=WATCHDOG_USEC, watchdog_pid=str(os.getpid())
    ) as daemon:
        notify.next("READY=1", lambda m: m.has("READY"))
        # Five intervals would hold five pings if the daemon ignored WATCHDOG_PID.
        assert notify.during(5 * PING_INTERVAL) == []
        assert daemon.stop() == 0


def test_a_stopped_daemon_stops_pinging_and_resumes_on_sigcont(
    notify: NotifySocket, write_config: Callable[[str], Path]
) -> None:
    port = free_port()
    config = write_config(one_listener(port))
    with daemon_with(
        config, notify, watchdog_usec=WATCHDOG_USEC, prefix=OWN_WATCHDOG_PID
    ) as daemon:
        notify.next("READY=1", lambda m: m.has("READY"))
        notify.next("a first ping", is_ping)
        notify.next("a second ping", is_ping)
        daemon.signal(signal.SIGSTOP)
        wait_state(daemon.pid, "T")
        notify.drain()  # sent before the stop took hold
        # A stuck loop is what systemd must notice: five intervals without a single ping.
        assert notify.during(5 * PING_INTERVAL) == []
        daemon.signal(signal.SIGCONT)
        resumed = notify.next("a ping after SIGCONT", is_ping, deadline=2 * PING_INTERVAL + 1)
        assert resumed.pid == daemon.pid
        assert exchange("127.0.0.1", port, b"awake") == b"Your data was 5 bytes"
        notify.next("the next ping", is_ping, deadline=2 * PING_INTERVAL + 1)
        assert daemon.stop() == 0


# -- RELOADING, STOPPING -----------------------------------------------------------------------


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_sighup_sends_reloading_with_monotonic_usec_then_ready_after_applying(
    notify: NotifySocket, write_config: Callable[[str], Path]
) -> None:
    port, added = free_port(), free_port()
    config = write_config(one_listener(port))
    with daemon_with(config, notify) as daemon:
        notify.next("READY=1", lambda m: m.has("READY"))
        config.write_text(
            f"""
listeners:
  - {{interface: 127.0.0.1, port: {port}}}
  - {{name: added, interface: 127.0.0.1, port: {added}, responder: echo}}
metrics: {{listen: []}}
"""
        )
        before = monotonic_usec()
        daemon.signal(signal.SIGHUP)
        reloading = notify.next("RELOADING=1", not_ping)
        after = monotonic_usec()
        assert reloading.fields.keys() == {"RELOADING", "MONOTONIC_USEC"}
        assert reloading.fields["RELOADING"] == "1"
        # CLOCK_MONOTONIC of this boot, taken between the signal and its receipt here.
        assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= after
        ready = notify.next("READY=1 after the reload", not_ping)
        assert ready.fields == {"READY": "1", "STATUS": "2 bound, 0 waiting, 0 failed"}
        # The new listener is there when READY=1 says so: no retry.
        assert exchange("127.0.0.1", added, b"new one") == b"new one"
        assert {m.pid for m in notify.received} == {daemon.pid}
        assert daemon.stop() == 0


def test_a_failed_reload_still_sends_ready_with_its_reason_in_utf8(
    notify: NotifySocket, tmp_path: Path
) -> None:
    port = free_port()
    # Problems name the file: non-ASCII in the status must reach systemd (as UTF-8), and
    # must not cost the READY=1 that ends the reload.
    config = tmp_path / "zürich→.yaml"
    config.write_text(one_listener(port))
    with daemon_with(config, notify) as daemon:
        notify.next("READY=1", lambda m: m.has("READY"))
        config.write_text("listeners:\n  - {interface: 127.0.0.1, port: 70000}\n")
        daemon.signal(signal.SIGHUP)
        assert notify.next("RELOADING=1", not_ping).has("RELOADING")
        ready = notify.next("READY=1 after the failed reload", not_ping)
        assert ready.fields["READY"] == "1"
        status = ready.fields["STATUS"]
        assert status.startswith("reload failed, still serving the previous set: ")
        assert f"{config}:2: listeners[0].port: 70000 is not in 1..65535" in status
        assert exchange("127.0.0.1", port, b"still") == b"Your data was 5 bytes"
        assert daemon.stop() == 0


def test_sigterm_sends_stopping_then_exits_0(
    notify: NotifySocket, write_config: Callable[[str], Path]
) -> None:
    port = free_port()
    config = write_config(one_listener(port))
    with daemon_with(config, notify) as daemon:
        notify.next("READY=1", lambda m: m.has("READY"))
        daemon.signal(signal.SIGTERM)
        stopping = notify.next("STOPPING=1", not_ping)
        assert stopping.fields == {"STOPPING": "1", "STATUS": "stopping"}
        assert stopping.pid == daemon.pid
        assert daemon.wait() == 0
    assert notify.drain() == []  # nothing after STOPPING=1


# -- without a service manager -----------------------------------------------------------------


@pytest.mark.parametrize("where", ["unset", "nobody listening"])
def test_runs_without_a_usable_notify_socket(
    where: str, tmp_path: Path, write_config: Callable[[str], Path]
) -> None:
    port = free_port()
    config = write_config(one_listener(port))
    daemon = daemon_with(config, None, watchdog_usec=WATCHDOG_USEC)
    if where != "unset":
        daemon.env["NOTIFY_SOCKET"] = str(tmp_path / "nobody")
    with daemon:
        assert wait_answering("127.0.0.1", port) == b"Your data was 4 bytes"
        assert daemon.stop() == 0
    assert plain_lines(daemon.stderr) == []  # no traceback, nothing but log lines
    warnings = [e for e in daemon.events if e.get("event") == "notify_socket_unusable"]
    assert len(warnings) == (0 if where == "unset" else 1)


# -- the adapter in-process ----------------------------------------------------------------------


def test_notifier_sends_one_field_per_line_in_utf8(
    notify: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    notifier = systemd.Notifier()
    try:
        assert notifier.enabled
        # A line break in a value must not become a field of its own.
        notifier.status("café → ok\nREADY=1")
        message = notify.next("STATUS", lambda m: True)
        assert message.fields == {"STATUS": "café → ok READY=1"}
        assert message.pid == os.getpid()
    finally:
        notifier.close()
        notifier.close()  # twice is harmless
    notifier.watchdog()  # closed: a no-op
    assert notify.drain() == []


def test_notifier_without_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = systemd.Notifier()
    assert not notifier.enabled
    notifier.ready("1 bound")
    notifier.close()
    assert not systemd.Notifier({}).enabled


def test_notifier_refuses_an_address_sdnotify_would_not_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with pytest.raises(ValueError, match="NOTIFY_SOCKET"):
        systemd.Notifier({"NOTIFY_SOCKET": "/run/elsewhere"})


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "400000"}, 0.2),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "OWN"}, 10.0),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    environ = {k: str(os.getpid()) if v == "OWN" else v for k, v in environ.items()}
    assert systemd.watchdog_interval(environ) == expected
