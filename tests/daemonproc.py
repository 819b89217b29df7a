"""Start udpbindd as a real subprocess and talk to it over UDP, with bounded waits.

Used by end-to-end tests: ``DaemonProcess(config_path).start()`` runs ``python -m udpbindd
run``; ``wait_for_event("started")`` reads its JSON log lines from stderr until that event
appears; ``wait_answering`` polls with datagrams until a listener replies; ``stop`` sends
SIGTERM by pid and returns the exit status. Every wait has a deadline; the process is killed by
pid on leaving the ``with`` block if it is still running.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEADLINE = 15.0
# Read here: inside the class body, the method ``signal`` hides the module.
SIGTERM = signal.SIGTERM


def exchange(
    host: str, port: int, payload: bytes, timeout: float = 1.0, source: str | None = None
) -> bytes | None:
    """Send one datagram from a connected socket and return the reply, or None on timeout."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        if source is not None:
            sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.send(payload)
        try:
            return sock.recv(70000)
        except (TimeoutError, ConnectionRefusedError):
            return None


def bindable(address: str, port: int) -> bool:
    """Whether the test itself can bind this socket name now (V6ONLY set, never REUSEADDR)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((address, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def wait_answering(host: str, port: int, deadline: float = DEADLINE) -> bytes:
    """Poll host:port with a datagram until something answers (bounded)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        # The 0.2 s receive timeout paces the polls; a refused port answers at once, so pause.
        reply = exchange(host, port, b"ping", timeout=0.2)
        if reply is not None:
            return reply
        time.sleep(0.05)
    raise TimeoutError(f"nothing answered on {host}:{port} within {deadline} s")


def log_events(stderr: bytes) -> list[dict[str, Any]]:
    """The JSON log lines of ``stderr`` as dicts; other lines are left out."""
    events = []
    for line in stderr.splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                events.append(event)
    return events


def plain_lines(stderr: bytes) -> list[str]:
    """The lines of ``stderr`` that are not JSON log lines (what the CLI prints for people)."""
    lines = []
    for line in stderr.decode(errors="replace").splitlines():
        try:
            json.loads(line)
        except ValueError:
            lines.append(line)
    return lines


class DaemonProcess:
    """``python -m udpbindd run -c CONFIG`` as a subprocess."""

    def __init__(
        self,
        config: Path | None,
        *,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.config = config
        self.env = {**os.environ, **(env or {})}
        self.args = args
        self.prefix = prefix
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdout = b""
        self.stderr = b""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def events(self) -> list[dict[str, Any]]:
        """The JSON log events read from stderr so far."""
        return log_events(self.stderr)

    def start(self) -> DaemonProcess:
        command = [*self.prefix, sys.executable, "-m", "udpbindd", "run", *self.args]
        if self.config is not None:
            command += ["-c", str(self.config)]
        self.proc = subprocess.Popen(
            command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        return self

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait_for_event(self, event: str, deadline: float = DEADLINE) -> dict[str, Any]:
        """Read stderr until a JSON log line with ``event`` appears (bounded); return it.

        Raises:
            TimeoutError: with everything read so far, if it does not appear in time or the
                process exits first.
        """
        assert self.proc is not None
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        end = time.monotonic() + deadline
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while True:
                for found in self.events:
                    if found.get("event") == event:
                        return found
                left = end - time.monotonic()
                if left <= 0 or not selector.select(left):
                    break
                # Read the raw fd: the buffered pipe object stays empty for communicate().
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self.stderr += chunk
        raise TimeoutError(f"no {event!r} log event; stderr so far:\n{self.stderr.decode()}")

    def wait(self, timeout: float = DEADLINE) -> int:
        assert self.proc is not None
        out, err = self.proc.communicate(timeout=timeout)
        self.stdout += out
        self.stderr += err
        return self.proc.returncode

    def stop(self, timeout: float = DEADLINE, signum: int = SIGTERM) -> int:
        """Send ``signum`` (SIGTERM by default), then wait for the exit status (bounded)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.wait()

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
        if self.proc is not None:
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()
