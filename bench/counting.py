"""What counting every datagram for metrics costs the echo loop (docs/benchmarks.md).

Two udpbindd serving loops run side by side on loopback, each in its own process: one with
the production ``Served`` and ``Batch`` (counters on), one with ``UncountedServed`` and
``UncountedBatch``, benchmark-only subclasses whose drains are the production ones with each
counter increment replaced by ``pass``. Both paths are measured (``io: batched``, the default,
and ``io: plain``), each against its own uncounted twin.
This script, as the client, floods one loop at a time with echo requests, faster than it can
answer, and counts its replies: the echo throughput of a saturated loop. The rounds alternate
which variant goes first, so drift hits both alike. It reports the median throughput of each
variant, the loop's CPU time per datagram, and their ratios.

Usage: python bench/counting.py [--rounds N] [--burst DATAGRAMS] [--size BYTES] [--io MODE]
       python bench/counting.py --smoke      (a few seconds; checks that it runs, not speed)
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from udpbindd import batch as batch_module
from udpbindd import daemon as daemon_module
from udpbindd.config import IOMode, LogFormat, LogLevel, parse_text
from udpbindd.daemon import Daemon, Served
from udpbindd.logs import configure
from udpbindd.survey import survey

BUDGET = 0.03  # counting may cost at most 3 % of echo throughput
LIMIT_SECONDS = 55.0  # the whole run stays under a minute
SERVER_CPU, CLIENT_CPU = 1, 0
# Not in Python's socket module: the Linux values.
SO_RCVBUFFORCE = 33
SO_TIMESTAMPNS = 35
# Both ends' receive queues hold a whole burst (the server's while it is paused).
RECV_BUFFER = 64 * 1024 * 1024
IDLE_POLL = 0.005  # seconds between two looks at the loop's CPU time
# A counter update in the drain: ``stats.<counter> += <n>``.
_COUNTING = re.compile(r"^(\s*)stats\.\w+\s*\+=.*$")


def _uncounted(function: object, module: object, expected: int) -> object:
    """``function`` as it is in udpbindd, every counter increment made ``pass``.

    Derived from the production source at run time, so the "off" variant can never drift
    from the code it is compared with: the only difference is the counting.
    """
    source = textwrap.dedent(inspect.getsource(function))  # type: ignore[arg-type]
    lines, removed = [], 0
    for line in source.splitlines():
        match = _COUNTING.match(line)
        # "pass" in place of the line, not nothing: a block of only counting stays a block.
        lines.append(f"{match.group(1)}pass" if match else line)
        removed += match is not None
    name = function.__qualname__  # type: ignore[attr-defined]
    if removed < expected:
        raise RuntimeError(f"found {removed} counter increments in {name}, expected >= {expected}")
    namespace: dict[str, object] = {}
    code = compile("\n".join(lines), f"<uncounted {inspect.getsourcefile(module)}>", "exec")  # type: ignore[arg-type]
    # The production module's globals: the same names (random, DRAIN_BUDGET...) resolve alike.
    exec(code, dict(vars(module)), namespace)  # noqa: S102 - our own source, transformed
    return namespace[function.__name__]  # type: ignore[attr-defined]


class UncountedServed(Served):
    """Benchmark only: a binding whose plain drain counts nothing."""

    __slots__ = ()
    drain = _uncounted(Served.drain, daemon_module, 4)  # type: ignore[assignment]


class UncountedBatch(batch_module.Batch):
    """Benchmark only: the batched path, counting nothing."""

    drain = _uncounted(batch_module.Batch.drain, batch_module, 2)  # type: ignore[assignment]
    _answer = _uncounted(batch_module.Batch._answer, batch_module, 3)  # type: ignore[assignment]


# -- server side (a child process per variant) ---------------------------------------------------


def serve(variant: str, port: int, cpu: int | None, io: IOMode) -> int:
    """Run udpbindd's loop with one echo listener on 127.0.0.1:``port`` until SIGTERM."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    if variant == "uncounted":
        # Only in this child process: Daemon builds its bindings and its batch from these.
        daemon_module.Served = UncountedServed  # type: ignore[misc]
        batch_module.Batch = UncountedBatch  # type: ignore[misc]
    configure(LogLevel.WARNING, LogFormat.JSON)
    config = parse_text(
        f"listeners:\n  - {{name: bench, interface: 127.0.0.1, port: {port}, responder: echo,"
        f" recv_buffer: {RECV_BUFFER}}}\n"
        f"io: {io}\n"
        "metrics:\n  listen: []\n",
        "<bench>",
    )
    loop = Daemon(config)
    signal.set_wakeup_fd(loop.wake_fd, warn_on_full_buffer=False)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    try:
        loop.start(survey(config.enabled_listeners, with_host=False))
        kind = type(next(iter(loop.served.values()))).__name__
        expected = "UncountedServed" if variant == "uncounted" else "Served"
        if kind != expected:
            raise RuntimeError(f"the {variant} server runs {kind}")
        if loop.io is not io:
            raise RuntimeError(f"the {variant} server moves datagrams {loop.io}, not {io}")
        print(f"ready {kind} {loop.io}", flush=True)
        loop.run()
    finally:
        loop.shutdown()
    return 0


# -- client side ---------------------------------------------------------------------------------


@dataclass
class Server:
    variant: str
    port: int
    proc: subprocess.Popen[str]

    def cpu_ns(self) -> int:
        """CPU time the server's main thread (the loop) has used, in nanoseconds."""
        return int(Path(f"/proc/{self.proc.pid}/schedstat").read_text().split()[0])

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        end = time.monotonic() + 5
        while Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            if time.monotonic() > end:
                raise RuntimeError(f"the {self.variant} server did not stop")
            time.sleep(0.001)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def wait_idle(self) -> None:
        """Return once the loop has used no CPU for a few milliseconds (bounded)."""
        end, last = time.monotonic() + 10, -1
        while (now := self.cpu_ns()) != last:
            if time.monotonic() > end:
                raise RuntimeError(f"the {self.variant} server never went idle")
            last = now
            time.sleep(IDLE_POLL)


@dataclass
class Burst:
    replies: int
    seconds: float
    cpu_ns: int

    @property
    def rate(self) -> float:
        return self.replies / self.seconds

    @property
    def cpu_per_reply_us(self) -> float:
        return self.cpu_ns / self.replies / 1000


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(variant: str, pin: bool, io: IOMode) -> Server:
    port = free_udp_port()
    command = [sys.executable, __file__, "--serve", variant, "--port", str(port), "--io", io]
    if pin:
        command += ["--cpu", str(SERVER_CPU)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the server prints "ready" once bound; EOF if it died
    if not line.startswith("ready"):
        proc.kill()
        proc.wait(10)
        raise RuntimeError(f"the {variant} server did not start: {line!r}")
    return Server(variant, port, proc)


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        os.kill(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait(10)
    if server.proc.stdout is not None:
        server.proc.stdout.close()


def client_socket(port: int) -> socket.socket:
    """A client whose queue holds a whole burst of replies, each stamped by the kernel."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
    with contextlib.suppress(PermissionError):  # root lifts net.core.rmem_max
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECV_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.connect(("127.0.0.1", port))
    return sock


def burst_capacity(size: int) -> int:
    """How many datagrams of ``size`` bytes a receive queue holds here (rmem_max if not root)."""
    with client_socket(9) as sock:
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    # The kernel charges each queued datagram its buffer's true size: on loopback about
    # 800 bytes for 64 of payload, 2300 for 1472. This bound stays above it.
    return granted // (2 * (512 + size))


def measure(server: Server, count: int, size: int) -> Burst:
    """Queue ``count`` requests while the loop is paused, release it, time the answers.

    With its queue full the loop never waits for work, and the client sends nothing while
    it runs: this is the echo throughput of a saturated loop. The time is the span between
    the kernel's receive stamps of the first and the last reply.
    """
    payload = b"x" * size
    with client_socket(server.port) as sock:
        sock.settimeout(1.0)
        server.pause()
        try:
            for _ in range(count):
                sock.send(payload)
            cpu0 = server.cpu_ns()
        finally:
            server.resume()
        # The client stays idle while the loop answers (the replies wait in its queue), so it
        # takes no CPU from the loop; then it reads the replies and their receive stamps.
        server.wait_idle()
        stamps: list[int] = []
        for _ in range(count):
            try:
                _, ancillary, _, _ = sock.recvmsg(size, socket.CMSG_SPACE(16))
            except TimeoutError:
                raise RuntimeError(
                    f"{len(stamps)} of {count} replies: a queue overflowed (lower --burst)"
                ) from None
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    seconds, nanoseconds = struct.unpack("=qq", data[:16])
                    stamps.append(seconds * 1_000_000_000 + nanoseconds)
        cpu1 = server.cpu_ns()
    # count - 1 intervals between count stamps.
    return Burst(count - 1, (stamps[-1] - stamps[0]) / 1e9, cpu1 - cpu0)


def run(rounds: int, count: int, size: int, io: IOMode) -> int:
    pin = (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity")
    if pin:
        os.sched_setaffinity(0, {CLIENT_CPU})
    capacity = burst_capacity(size)
    if count > capacity:
        print(f"note: queues here hold about {capacity} datagrams; burst lowered from {count}")
        count = capacity
    print(
        f"counting overhead, io: {io}: {rounds} rounds of a {count}-datagram burst per variant, "
        f"{size}-byte echo on 127.0.0.1, "
        + (f"client on CPU {CLIENT_CPU}, servers on CPU {SERVER_CPU}" if pin else "unpinned")
    )
    servers = []
    results: dict[str, list[Burst]] = {"counted": [], "uncounted": []}
    started = time.monotonic()
    try:
        for variant in ("counted", "uncounted"):
            servers.append(start_server(variant, pin, io))
        for server in servers:  # warm-up: caches, branch predictors, socket buffers
            measure(server, count, size)
        for index in range(rounds):
            order = servers if index % 2 == 0 else servers[::-1]
            for server in order:
                results[server.variant].append(measure(server, count, size))
            on, off = results["counted"][-1], results["uncounted"][-1]
            print(
                f"round {index + 1:2}: CPU per datagram on {on.cpu_per_reply_us:6.3f} us,"
                f" off {off.cpu_per_reply_us:6.3f} us;"
                f" wall rate on {on.rate:9,.0f}/s, off {off.rate:9,.0f}/s"
            )
            if time.monotonic() - started > LIMIT_SECONDS:
                print(f"stopping after {index + 1} rounds: the {LIMIT_SECONDS:g} s limit")
                break
    finally:
        for server in servers:
            stop_server(server)
    on_cpu = statistics.median(b.cpu_per_reply_us for b in results["counted"])
    off_cpu = statistics.median(b.cpu_per_reply_us for b in results["uncounted"])
    pairs = list(zip(results["counted"], results["uncounted"], strict=True))
    paired = statistics.median(
        off.cpu_ns / off.replies / (on.cpu_ns / on.replies) for on, off in pairs
    )
    on_wall = statistics.median(b.rate for b in results["counted"])
    off_wall = statistics.median(b.rate for b in results["uncounted"])
    # A saturated loop answers one datagram per CPU time it spends on one, so the CPU time is
    # the throughput, free of the noise of other processes sharing the CPU.
    ratio = off_cpu / on_cpu
    print(f"median loop CPU per datagram: counters on {on_cpu:.3f} us, off {off_cpu:.3f} us")
    print(
        f"saturated echo throughput (1 / CPU per datagram): counters on {1e6 / on_cpu:,.0f}/s,"
        f" off {1e6 / off_cpu:,.0f}/s"
    )
    print(f"throughput ratio on/off: {ratio:.4f} (median of paired rounds {paired:.4f})")
    print(
        f"wall-clock rate from reply stamps (noisy when the CPU is shared): on {on_wall:,.0f}/s,"
        f" off {off_wall:,.0f}/s"
    )
    overhead = 1 - ratio
    verdict = "within" if overhead <= BUDGET else "OVER"
    print(f"counting costs {overhead:.1%} of echo throughput ({verdict} the {BUDGET:.0%} budget)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25, help="bursts per variant (1..100)")
    parser.add_argument("--burst", type=int, default=20000, help="datagrams per burst")
    parser.add_argument("--size", type=int, default=64, help="payload bytes (1..1472)")
    parser.add_argument("--smoke", action="store_true", help="2 small rounds: it runs, no more")
    parser.add_argument(
        "--io", choices=[*IOMode, "both"], default="both", help="the path measured (default both)"
    )
    parser.add_argument("--serve", choices=("counted", "uncounted"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve, args.port, args.cpu, IOMode(args.io))
    if args.smoke:
        args.rounds, args.burst = 2, 2000
    if not 1 <= args.rounds <= 100 or not 2 <= args.burst <= 100_000:
        parser.error("rounds must be 1..100 and burst 2..100000")
    if not 1 <= args.size <= 1472:
        parser.error("size must be 1..1472 (one loopback datagram, small enough to queue)")
    modes = list(IOMode) if args.io == "both" else [IOMode(args.io)]
    for mode in modes:
        run(args.rounds, args.burst, args.size, mode)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
