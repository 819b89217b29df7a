"""Start udpbindd as a real subprocess and talk to it over UDP, with bounded waits.

Used by end-to-end tests: ``Daemon(config_path).start()`` runs ``python -m udpbindd run``,
``wait_answering`` polls with datagrams until the listener replies, ``stop`` sends SIGTERM by
pid and returns the exit status. Every wait has a deadline; the process is killed by pid at
exit if it is still running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DEADLINE = 15.0


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


def wait_answering(host: str, port: int, deadline: float = DEADLINE) -> bytes:
    """Poll host:port with a datagram until something answers (bounded)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        reply = exchange(host, port, b"ping", timeout=0.2)
        if reply is not None:
            return reply
        time.sleep(0.05)
    raise TimeoutError(f"nothing answered on {host}:{port} within {deadline} s")


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

    def wait(self, timeout: float = DEADLINE) -> int:
        assert self.proc is not None
        out, err = self.proc.communicate(timeout=timeout)
        self.stdout += out
        self.stderr += err
        return self.proc.returncode

    def stop(self, timeout: float = DEADLINE) -> int:
        """SIGTERM, then wait for the exit status (bounded)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
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
