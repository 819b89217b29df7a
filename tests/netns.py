"""Private network namespaces and in-namespace worker processes, for tests that need a kernel.

This is a helper module, not a test file; import it as ``from netns import ...`` (tests/ is on
sys.path). Everything it creates it also removes: namespaces by the unique name it gave them
(their interfaces go with them), worker processes by pid.

API
---
``require_netns()``
    Call first (in a fixture). Skips the test unless running as root with ``ip`` on PATH, or
    fails it instead when the environment variable ``CI`` is ``"true"``, so a CI job that lost
    its privileges cannot pass by skipping.

``Veth(name, peer, addresses=(), peer_addresses=(), up=True)``
    A veth pair to create inside the namespace (the kernel under test may lack the ``dummy``
    driver, so veth stands in for it). ``addresses`` go on ``name``, ``peer_addresses`` on
    ``peer``, as CIDR strings: ``"10.199.0.1/24"``, ``"fd99::1/64"``, ``"fe80::1/64"``. IPv6
    addresses are added with ``nodad`` so they are bindable at once, without waiting for
    duplicate address detection. ``up=False`` leaves both ends down.

``namespace(veths=(), *, prefix="udpbt") -> ContextManager[str]``
    Creates a namespace named ``<prefix>-<pid>-<n>``, brings ``lo`` up, adds the veths and
    yields the name. On exit it deletes the namespace, even when the body or the setup failed.

``ip(*args) -> str``
    Runs ``ip ARGS`` with a bounded timeout and returns its stdout; raises RuntimeError with
    ip's stderr when it fails. Use ``ip("-n", ns, ...)`` to act inside a namespace.

``Worker(ns, script, *, timeout=10.0)``
    A long-lived Python process (``sys.executable script``) started inside namespace ``ns``
    with ``ip netns exec``. ``request(obj)`` writes ``obj`` as one JSON line to its stdin and
    returns the next JSON line from its stdout, decoded; it raises ``WorkerError`` (with the
    worker's stderr) if no line arrives within ``timeout`` seconds or the worker exits.
    ``close()`` (also called on leaving its ``with`` block) closes stdin, waits a bounded time
    for the worker to exit, kills it by pid if it has not, and closes every pipe. ``pid`` is
    the worker's pid (``ip netns exec`` execs the script, so it is the Python process itself);
    ``stderr()`` returns what it wrote to stderr so far, ``returncode`` its exit status (None
    while it runs). tests/bindworker.py is one such worker.

Example::

    require_netns()
    with namespace([Veth("vb0", "vb1", ["10.199.0.1/24"])]) as ns, Worker(ns, script) as w:
        reply = w.request([...])
"""

from __future__ import annotations

import itertools
import json
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

# Every `ip` call is bounded: a hung netlink request must fail the test, not stall the run.
IP_TIMEOUT = 30.0
# How long close() lets a worker exit on its own after its stdin closes, before killing it.
EXIT_GRACE = 5.0

_counter = itertools.count(1)


class WorkerError(RuntimeError):
    """The worker did not answer in time, exited, or sent something that is not JSON."""


def require_netns() -> None:
    """Skip unless root with ``ip`` available; fail instead when ``CI`` is ``"true"``."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    if shutil.which("ip") is None:
        missing.append("the `ip` command")
    if not missing:
        return
    reason = f"network namespace tests need {' and '.join(missing)}"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@dataclass(frozen=True)
class Veth:
    """A veth pair created inside a test namespace."""

    name: str
    peer: str
    addresses: Sequence[str] = ()
    peer_addresses: Sequence[str] = ()
    up: bool = True


def ip(*args: str) -> str:
    """Run ``ip ARGS`` and return its stdout; raise RuntimeError with its stderr on failure."""
    done = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def _add_address(ns: str, device: str, cidr: str) -> None:
    if ":" in cidr:
        ip("-n", ns, "-6", "address", "add", cidr, "dev", device, "nodad")
    else:
        ip("-n", ns, "address", "add", cidr, "dev", device)


@contextmanager
def namespace(veths: Sequence[Veth] = (), *, prefix: str = "udpbt") -> Iterator[str]:
    """Create a fresh namespace with ``lo`` up and the given veths; delete it on exit."""
    name = f"{prefix}-{os.getpid()}-{next(_counter)}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        for veth in veths:
            ip("-n", name, "link", "add", veth.name, "type", "veth", "peer", "name", veth.peer)
            for cidr in veth.addresses:
                _add_address(name, veth.name, cidr)
            for cidr in veth.peer_addresses:
                _add_address(name, veth.peer, cidr)
            if veth.up:
                ip("-n", name, "link", "set", veth.name, "up")
                ip("-n", name, "link", "set", veth.peer, "up")
        yield name
    finally:
        # Deleting the namespace by the name created above also destroys its veths.
        ip("netns", "delete", name)


class Worker:
    """A Python process inside a namespace, spoken to in JSON lines. See the module docstring."""

    def __init__(self, ns: str, script: str | Path, *, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._buffer = b""
        # stderr goes to a file, not a pipe: nobody drains a pipe while the worker is busy.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        try:
            self._proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, str(script)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                bufsize=0,
            )
        except BaseException:
            self._stderr.close()
            raise
        self.pid = self._proc.pid

    def __enter__(self) -> Worker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def returncode(self) -> int | None:
        """The worker's exit status once it has exited and been reaped, else None."""
        return self._proc.poll()

    def stderr(self) -> str:
        """What the worker has written to stderr so far."""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def request(self, obj: Any) -> Any:
        """Send one JSON line and return the decoded reply line."""
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps(obj).encode() + b"\n")
            stdin.flush()
        except BrokenPipeError as exc:
            raise WorkerError(f"worker {self.pid} exited: {self.stderr()}") from exc
        line = self._read_line()
        try:
            return json.loads(line)
        except ValueError as exc:
            raise WorkerError(f"worker {self.pid} sent {line!r}: {self.stderr()}") from exc

    def _read_line(self) -> bytes:
        stdout = self._proc.stdout
        assert stdout is not None
        deadline = time.monotonic() + self.timeout
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise WorkerError(
                        f"worker {self.pid} did not answer in {self.timeout}s: {self.stderr()}"
                    )
                chunk = os.read(stdout.fileno(), 65536)
                if not chunk:
                    raise WorkerError(f"worker {self.pid} exited: {self.stderr()}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def close(self) -> None:
        """End the worker: EOF on stdin, a bounded wait, then SIGKILL by pid; close the pipes."""
        proc = self._proc
        try:
            if proc.stdin is not None:
                with suppress(BrokenPipeError):
                    proc.stdin.close()
            try:
                proc.wait(timeout=EXIT_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=EXIT_GRACE)
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
            self._stderr.close()
