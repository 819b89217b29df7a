"""Shared fixtures and helpers: free ports, config files, captured log events, the loop's I/O
path, bounded waits, a notifier that records what it would tell systemd, and the CLI run as
the user nobody."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

sys.path.insert(0, str(Path(__file__).parent))

from udpbindd import batch
from udpbindd.config import IOMode
from udpbindd.systemd import Notifier

IN_CI = os.environ.get("CI") == "true"
# How long a test waits for something the code under test should do at once.
WAIT = 10.0
# How the in-process daemons of the running test move datagrams (set by ``io_mode``).
IO = {"mode": IOMode.BATCHED}
NOBODY = 65534

# The interpreter may live where nobody cannot reach it (a pyenv under /root), so the process
# starts as root, imports udpbindd (and the codec it loads lazily to read /proc), and only then
# gives up every privilege to run the CLI.
AS_NOBODY = f"""
import encodings.ascii, os, sys
from udpbindd.cli import main
os.setgroups([])
os.setresgid({NOBODY}, {NOBODY}, {NOBODY})
os.setresuid({NOBODY}, {NOBODY}, {NOBODY})
raise SystemExit(main(sys.argv[1:]))
"""


def run_as_nobody(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI in a process whose real, effective and saved uid and gid are nobody's."""
    return subprocess.run(
        [sys.executable, "-c", AS_NOBODY, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
    )


def require(condition: bool, reason: str) -> None:
    """Skip when a component is missing, except in CI, where a missing component fails."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(params=list(IOMode), ids=lambda mode: f"io={mode}")
def io_mode(request: pytest.FixtureRequest) -> Iterator[IOMode]:
    """Run the test once with the batched path and once with the plain one."""
    mode: IOMode = request.param
    with io_path(mode):
        yield mode


@contextlib.contextmanager
def io_path(mode: IOMode) -> Iterator[None]:
    """In-process daemons configured meanwhile move datagrams as ``mode`` says."""
    if mode is IOMode.BATCHED:
        require(batch.available(), "recvmmsg/sendmmsg are not available here")
    IO["mode"] = mode
    try:
        yield
    finally:
        IO["mode"] = IOMode.BATCHED


def wait_until(condition: Callable[[], bool], what: str, deadline: float = WAIT) -> None:
    """Poll ``condition`` until it holds; fail after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class RecordingNotifier(Notifier):
    """A Notifier that records what it would send to systemd."""

    def __init__(self) -> None:
        super().__init__({})
        self.sent: list[tuple[str, ...]] = []

    def send(self, *fields: str) -> None:
        self.sent.append(fields)

    def count(self, field: str) -> int:
        """How many messages held exactly ``field`` (e.g. ``READY=1``)."""
        return sum(1 for fields in self.sent if field in fields)

    def fields(self) -> list[set[str]]:
        """The names of the fields of each message, in order."""
        return [{field.partition("=")[0] for field in fields} for fields in self.sent]


def require_tool(name: str) -> str:
    candidates = (f"/usr/sbin/{name}", f"/usr/bin/{name}", f"/sbin/{name}")
    path = shutil.which(name) or next((p for p in candidates if os.path.exists(p)), None)
    require(path is not None, f"{name} is not installed")
    assert path is not None
    return path


def require_root() -> None:
    require(os.geteuid() == 0, "needs root (network namespaces, privileged ports)")


@pytest.fixture(autouse=True)
def log_events() -> Iterator[list[dict[str, object]]]:
    """Every structlog event emitted in-process during the test, as dicts."""
    with structlog.testing.capture_logs() as events:
        yield events


def free_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    """A UDP port that was free on ``host`` a moment ago (the kernel picked it)."""
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_port_both() -> int:
    """A UDP port free on 127.0.0.1 and ::1 and the wildcards of both families."""
    for _ in range(50):
        port = free_port()
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as six:
                six.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                six.bind(("::", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on both families")


@pytest.fixture
def free_udp_port() -> int:
    return free_port_both()


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    """Write YAML text to a file in tmp_path and return its path."""
    counter = iter(range(1000))

    def write(text: str, name: str | None = None) -> Path:
        path = tmp_path / (name or f"udpbindd-{next(counter)}.yaml")
        path.write_text(text)
        return path

    return write
