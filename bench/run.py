"""The one benchmark command: udpbindd against a C reference and its peers, side by side.

Builds the C load generator and echoes (``cc -O2``) into a temporary directory, then, on
loopback only, runs each server pinned to CPU 1 with the load generator on CPU 0, in
interleaved rounds (the order rotates each round), and prints medians and ratios to the C
reference; then the many-listeners figures (start to READY, memory per listener, load spread
over every port, for the daemon and for C echoes on the same ports: with epoll, what the kernel
allows one thread that waits as udpbindd does; with io_uring, what one thread can do when the
receives and sends of many sockets share system calls). Peers missing here are installed
(uvloop with pip; sockperf and liburing-dev with apt-get, as root) unless ``--no-install`` or
``--smoke``; a server still missing is skipped, and its row says why. Every process is started
and stopped by pid, every wait is bounded, and the load generator stops by itself. A full run
takes under 5 minutes.

Usage: python bench/run.py [--quick | --smoke] [--rounds N] [--duration S] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
HOST = "127.0.0.1"
SERVER_CPU, LOAD_CPU = "1", "0"
START_DEADLINE = 30.0
STOP_DEADLINE = 5.0


# -- the servers ----------------------------------------------------------------------------


@dataclass
class Server:
    """One contender: how to start it on a port, and why it is skipped if it is."""

    key: str
    label: str
    command: Callable[[int, Path], list[str]]
    skipped: str = ""
    note: str = ""
    # The scenarios (keys) it runs; empty: all of them.
    only: tuple[str, ...] = ()

    def runs(self, scenario: Scenario) -> bool:
        return not self.only or scenario.key in self.only


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _daemon(io: str) -> Callable[[int, Path], list[str]]:
    """How to start the real daemon (``python -m udpbindd run``) with ``io: IO``."""

    def command(port: int, workdir: Path) -> list[str]:
        config = workdir / f"udpbindd-{io}-{port}.yaml"
        config.write_text(
            "listeners:\n"
            f"  - interface: {HOST}\n    port: {port}\n    responder: echo\n"
            f"io: {io}\n"
            "metrics:\n  listen: []\nlogging:\n  level: warning\n  format: json\n"
        )
        return _python("-m", "udpbindd", "run", "-c", str(config))

    return command


def servers(build: Path) -> list[Server]:
    return [
        Server(
            "c_ref",
            "C reference echo (recvmmsg/sendmmsg)",
            lambda port, _: [str(build / "echo_ref"), HOST, str(port)],
        ),
        Server(
            "c_spin",
            "C echo, busy-polling (never sleeps: the kernel's cost alone)",
            lambda port, _: [str(build / "echo_ref"), HOST, str(port), "--spin"],
        ),
        # Waits for a datagram as every server of many sockets does (udpbindd included): in
        # epoll, then one recvfrom. Against the reference, which blocks in the receive
        # itself, it shows what that way of waiting costs a round trip.
        Server(
            "c_epoll",
            "C echo, epoll then recvfrom/sendto (how a server of many sockets waits)",
            lambda port, _: [str(build / "echo_ref"), HOST, str(port), "--ports", "1"],
            only=("pingpong",),
        ),
        Server("daemon", "udpbindd daemon, io: batched (the default)", _daemon("batched")),
        Server("plain", "udpbindd daemon, io: plain", _daemon("plain")),
        Server(
            "uvloop",
            "uvloop echo (DatagramProtocol)",
            lambda port, _: _python(str(BENCH / "aio_echo.py"), HOST, str(port), "--uvloop"),
        ),
        Server(
            "asyncio",
            "asyncio echo (DatagramProtocol)",
            lambda port, _: _python(str(BENCH / "aio_echo.py"), HOST, str(port)),
        ),
        Server(
            "sockperf",
            "sockperf server (C++)",
            lambda port, _: [
                "sockperf",
                "server",
                "-i",
                HOST,
                "-p",
                str(port),
                "--buffer-size",
                str(4 * 1024 * 1024),
            ],
        ),
    ]


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    size: int
    window: int
    metric: str  # "rate": replies per second, higher is better; "p50": median RTT, lower


SCENARIOS = (
    Scenario("rate64", "64 B, 64 in flight", 64, 64, "rate"),
    Scenario("rate1400", "1400 B, 64 in flight", 1400, 64, "rate"),
    Scenario("pingpong", "ping-pong 64 B (median RTT)", 64, 1, "p50"),
    Scenario("rate64w256", "64 B, 256 in flight", 64, 256, "rate"),
)


# -- processes ------------------------------------------------------------------------------


def pinned(cpu: str, command: list[str], pin: bool) -> list[str]:
    return ["taskset", "-c", cpu, *command] if pin else command


@contextlib.contextmanager
def running(
    command: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``command`` (output to ``log``) and stop it by pid on leaving: TERM, then KILL."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_DEADLINE)


def probe_datagram(size: int = 64) -> bytes:
    """A request every server here answers: sockperf's header (client | pong request)."""
    return struct.pack("!QHI", 1, 3, size) + bytes(size - 14)


def wait_answering(
    port: int, proc: subprocess.Popen[bytes], deadline: float = START_DEADLINE
) -> None:
    """Poll with datagrams until the server echoes one (bounded); fail if it died."""
    end = time.monotonic() + deadline
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.1)
        while time.monotonic() < end:
            with contextlib.suppress(OSError):
                sock.sendto(probe_datagram(), (HOST, port))
                if sock.recv(70000):
                    return
            _check_alive(proc)
    raise TimeoutError(f"nothing answered on {HOST}:{port} within {deadline} s")


def _check_alive(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        raise RuntimeError(f"{proc.args} exited with {proc.returncode} before it was ready")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def udp_sockets() -> list[tuple[int, int]]:
    """(local port, drops) of every UDP socket of this network namespace."""
    found = []
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                found.append((int(fields[1].rsplit(":", 1)[1], 16), int(fields[-1])))
    return found


def cpu_ns(pid: int) -> int:
    """CPU time all threads of ``pid`` have run, in ns (the kernel's scheduler accounting)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def kernel_drops(ports: range) -> int:
    """Datagrams the kernel dropped on the sockets bound to ``ports`` (full receive queue)."""
    return sum(drops for port, drops in udp_sockets() if port in ports)


def free_range(count: int) -> int:
    """The first port of ``count`` consecutive UDP ports nobody holds, below the ephemeral."""
    used = {port for port, _ in udp_sockets()}
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for base in range(10000, low - count, 1000):
        if not any(port in used for port in range(base, base + count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports below {low}")


def load(
    build: Path, port: int, args: argparse.Namespace, *, size: int, window: int, nports: int = 1
) -> dict[str, Any]:
    command = [
        str(build / "loadgen"),
        "-a",
        HOST,
        "-p",
        str(port),
        "-n",
        str(nports),
        "-s",
        str(size),
        "-w",
        str(window),
        "-d",
        str(args.duration),
        "-W",
        str(args.warmup),
    ]
    timeout = args.duration + args.warmup + 10
    done = subprocess.run(
        pinned(LOAD_CPU, command, args.pin),
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# -- peers the bench may install --------------------------------------------------------------


def ensure_uvloop(install: bool) -> str:
    """'' when uvloop imports in this interpreter, else why its row is skipped."""
    check = [sys.executable, "-c", "import uvloop"]
    if subprocess.run(check, capture_output=True, check=False).returncode == 0:
        return ""
    if not install:
        return "uvloop is not installed (pip install uvloop)"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "uvloop"]
    subprocess.run(pip, capture_output=True, check=False, timeout=300)
    if subprocess.run(check, capture_output=True, check=False).returncode == 0:
        return ""
    return "uvloop could not be installed with pip"


def ensure_apt(what: str, package: str, present: Callable[[], bool], install: bool) -> str:
    """'' when ``present()``, if need be after installing ``package`` with apt-get (only as
    root, and only when installing is allowed); else why the row that needs it is skipped."""
    if present():
        return ""
    if not install or os.geteuid() != 0:
        return f"{what} is not installed (apt-get install {package})"
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*apt, "update", "-qq"], capture_output=True, check=False, timeout=300)
    subprocess.run(
        [*apt, "install", "-y", "-qq", "--no-install-recommends", package],
        capture_output=True,
        check=False,
        env=env,
        timeout=300,
    )
    return "" if present() else f"{what} could not be installed with apt-get"


def ensure_sockperf(install: bool) -> str:
    return ensure_apt("sockperf", "sockperf", lambda: shutil.which("sockperf") is not None, install)


def _cc(build: Path, name: str, *libraries: str) -> list[str]:
    compiler = os.environ.get("CC", "cc")
    source = str(BENCH / f"{name}.c")
    return [compiler, "-O2", "-Wall", "-o", str(build / name), source, *libraries]


def build_c(build: Path, install: bool) -> str:
    """Build the load generator and the C echoes into ``build``. Returns '' when the io_uring
    echo was built and runs here too, else why its row is skipped (the others must build)."""
    for name in ("loadgen", "echo_ref"):
        subprocess.run(_cc(build, name), check=True, timeout=120)
    return build_uring_echo(build, install)


def build_uring_echo(build: Path, install: bool) -> str:
    """'' when ``uring_echo`` builds against liburing (installing liburing-dev as sockperf
    is installed) and answers here, else why not."""
    errors: list[str] = []

    def built() -> bool:
        done = subprocess.run(
            _cc(build, "uring_echo", "-luring"),
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        errors.append(done.stderr)
        return done.returncode == 0

    missing = ensure_apt("liburing", "liburing-dev", built, install)
    if missing and "liburing.h" not in errors[-1]:
        # liburing is there, but the build failed all the same (a liburing older than 2.3).
        said = [line for line in errors[-1].splitlines() if "error" in line] or ["no message"]
        return f"uring_echo does not build: {said[0]}"
    return missing or uring_refused(build)


def uring_refused(build: Path) -> str:
    """'' when ``uring_echo`` answers on one port, else why not: a kernel may lack what it
    needs, or refuse io_uring altogether (kernel.io_uring_disabled, a seccomp filter)."""
    port, log = free_port(), build / "uring_echo-check.log"
    with running([str(build / "uring_echo"), HOST, str(port), "1"], log) as proc:
        try:
            wait_answering(port, proc, deadline=STOP_DEADLINE)
        except TimeoutError:
            return f"uring_echo did not answer within {STOP_DEADLINE:.0f} s"
        except RuntimeError:
            said = log.read_text(errors="replace").splitlines() or ["no message"]
            return f"uring_echo does not run here: {said[-1].removeprefix('uring_echo: ')}"
    return ""


# -- the machine ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model or platform.processor() or "unknown",
        "cpus": os.cpu_count() or 1,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


# -- the peer table ---------------------------------------------------------------------------


@dataclass
class Results:
    # server key -> scenario key -> list of per-round results (loadgen JSON + drops)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)

    def add(self, server: str, scenario: str, result: dict[str, Any]) -> None:
        self.runs.setdefault(server, {}).setdefault(scenario, []).append(result)

    def values(self, server: str, scenario: Scenario, metric: str = "") -> list[float]:
        metric = metric or ("rate" if scenario.metric == "rate" else "p50_us")
        return [float(r[metric]) for r in self.runs.get(server, {}).get(scenario.key, [])]

    def ratio(self, server: str, scenario: Scenario, metric: str = "") -> float | None:
        """Median over rounds of this server's figure over the C reference's in that round."""
        mine = self.values(server, scenario, metric)
        reference = self.values("c_ref", scenario, metric)
        pairs = [(m, r) for m, r in zip(mine, reference, strict=False) if m > 0 and r > 0]
        if not pairs:
            return None
        # For a rate, above 1 is faster than C; for a round trip or a cost, above 1 is slower.
        return statistics.median(m / r for m, r in pairs)

    def drops(self, server: str, scenario: Scenario) -> int:
        return sum(r["kernel_drops"] for r in self.runs.get(server, {}).get(scenario.key, []))

    def lost(self, server: str, scenario: Scenario) -> int:
        return sum(r["lost"] for r in self.runs.get(server, {}).get(scenario.key, []))


# Seconds the keep-awake spinner may run at most: it stops by itself even if never stopped.
AWAKE_LIMIT = 600.0


@contextlib.contextmanager
def kept_awake(cpu: str, enabled: bool, work: Path) -> Iterator[None]:
    """Keep ``cpu`` from halting while the servers run on it, with a SCHED_IDLE busy loop.

    On a virtual machine, waking a halted virtual CPU costs the hypervisor tens of
    microseconds, and a server that sleeps whenever its queue runs dry pays that again and
    again: the faster the server, the more often it sleeps, and the more it loses. A
    SCHED_IDLE task only ever gets time nobody else wants, and any waking server preempts it
    at once, so with it every server is measured as on a CPU that never halts (as with the
    kernel's idle=poll). The server CPU time figures are not touched: they count the server's
    own time only.
    """
    if not enabled:
        yield
        return
    loop = (
        "import os, time\n"
        "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
        f"end = time.monotonic() + {AWAKE_LIMIT}\n"
        "while time.monotonic() < end: pass\n"
    )
    command = pinned(cpu, [sys.executable, "-c", loop], True)
    with (work / "awake.log").open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield
    finally:
        proc.kill()
        proc.wait(STOP_DEADLINE)


def run_peers(
    contenders: list[Server], build: Path, work: Path, args: argparse.Namespace
) -> Results:
    results = Results()
    active = [s for s in contenders if not s.skipped and any(s.runs(c) for c in args.scenarios)]
    for round_ in range(args.rounds):
        shift = round_ % len(active)
        for server in active[shift:] + active[:shift]:
            port = free_port()
            command = pinned(SERVER_CPU, server.command(port, work), args.pin)
            log = work / f"{server.key}-{round_}.log"
            scenarios = [c for c in args.scenarios if server.runs(c)]
            with running(command, log) as proc:
                wait_answering(port, proc)
                for scenario in scenarios:
                    before = kernel_drops(range(port, port + 1))
                    cpu = cpu_ns(proc.pid)
                    result = load(build, port, args, size=scenario.size, window=scenario.window)
                    result["kernel_drops"] = kernel_drops(range(port, port + 1)) - before
                    # Server CPU per reply: unlike a rate, barely moved by other load on
                    # the machine (it only counts the time the server actually ran).
                    result["cpu_us"] = (cpu_ns(proc.pid) - cpu) / 1000 / max(result["replies"], 1)
                    results.add(server.key, scenario.key, result)
            print(
                f"  round {round_ + 1}/{args.rounds} {server.key:9s} "
                + " ".join(_short(s, results.runs[server.key][s.key][-1]) for s in scenarios),
                file=sys.stderr,
                flush=True,
            )
    return results


def _short(scenario: Scenario, result: dict[str, Any]) -> str:
    if scenario.metric == "rate":
        return f"{scenario.key}={result['rate'] / 1000:.0f}k"
    return f"{scenario.key}={result['p50_us']:.1f}us"


def peer_table(
    contenders: list[Server], results: Results, scenarios: tuple[Scenario, ...] = SCENARIOS
) -> list[str]:
    head = "| server |"
    rule = "|---|"
    for scenario in scenarios:
        unit = "k replies/s" if scenario.metric == "rate" else "µs"
        head += f" {scenario.label}: {unit} | ratio to C |"
        rule += "---:|---:|"
    head += " kernel drops / lost |"
    rule += "---:|"
    lines = [head, rule]
    for server in contenders:
        if not any(server.runs(s) for s in scenarios):
            continue
        if server.skipped:
            lines.append(f"| {server.label} | skipped: {server.skipped} |")
            continue
        row = f"| {server.label} |"
        for scenario in scenarios:
            values = results.values(server.key, scenario)
            ratio = results.ratio(server.key, scenario)
            if not values:
                row += " - | - |"
                continue
            median = statistics.median(values)
            figure = f"{median / 1000:.1f}" if scenario.metric == "rate" else f"{median:.1f}"
            row += f" {figure} | {'-' if ratio is None else f'{ratio:.2f}'} |"
        drops = sum(results.drops(server.key, s) for s in scenarios)
        lost = sum(results.lost(server.key, s) for s in scenarios)
        row += f" {drops} / {lost} |"
        lines.append(row)
    return lines


def cpu_table(
    contenders: list[Server], results: Results, scenarios: tuple[Scenario, ...] = SCENARIOS
) -> list[str]:
    """Server CPU time per reply: the efficiency behind each rate, robust to a busy host."""
    rated = [s for s in scenarios if s.metric == "rate"]
    head = "| server (CPU per reply) |" + "".join(f" {s.label}: µs | C / this |" for s in rated)
    lines = [head, "|---|" + "---:|---:|" * len(rated)]
    for server in contenders:
        if server.skipped or not any(server.runs(s) for s in rated):
            continue
        row = f"| {server.label} |"
        for scenario in rated:
            values = results.values(server.key, scenario, "cpu_us")
            ratio = results.ratio(server.key, scenario, "cpu_us")
            if not values or ratio is None:
                row += " - | - |"
                continue
            row += f" {statistics.median(values):.2f} | {1 / ratio:.2f} |"
        lines.append(row)
    return lines


# -- many listeners ---------------------------------------------------------------------------


def notify_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    return sock


def wait_ready(
    sock: socket.socket, proc: subprocess.Popen[bytes], deadline: float = START_DEADLINE
) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        sock.settimeout(0.2)
        try:
            message = sock.recv(4096)
        except TimeoutError:
            _check_alive(proc)
            continue
        if b"READY=1" in message.split(b"\n"):
            return
    raise TimeoutError(f"no READY=1 within {deadline} s")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def raise_fd_limit(needed: int) -> None:
    """Raise the soft RLIMIT_NOFILE to at least ``needed``: the C echo, which inherits it,
    holds one socket per port (the daemon raises its own limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise RuntimeError(f"RLIMIT_NOFILE hard limit {hard} < {needed} needed")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def daemon_config(path: Path, base: int, count: int, io: str = "batched") -> None:
    lines = ["listeners:"]
    for port in range(base, base + count):
        lines.append(f"  - {{interface: {HOST}, port: {port}, responder: echo}}")
    # Logging at info, as in production: one listener_bound line per listener is part of
    # the start-up cost measured.
    lines += [f"io: {io}", "metrics:", "  listen: []", "logging:", "  level: info"]
    lines += ["  format: json"]
    path.write_text("\n".join(lines) + "\n")


# The servers of the load-spread figures, in table order: key -> label.
SPREAD_LABELS = {
    "daemon": "udpbindd daemon, io: batched",
    "plain": "udpbindd daemon, io: plain",
    "c_ports": "C reference echo, epoll, one recvfrom/sendto per ready socket",
    "c_ports_batch": "C reference echo, epoll, recvmmsg/sendmmsg per ready socket",
    "c_uring": "C echo, io_uring (multishot recvmsg, batched sends)",
}


def _echo_ref_ports(*extra: str) -> Callable[[Path, range], list[str]]:
    def command(build: Path, ports: range) -> list[str]:
        echo = [str(build / "echo_ref"), HOST, str(ports.start), "--ports", str(len(ports))]
        return [*echo, *extra]

    return command


def _uring_echo(build: Path, ports: range) -> list[str]:
    return [str(build / "uring_echo"), HOST, str(ports.start), str(len(ports))]


# The C echoes on every port: key -> its command, from the build directory and the ports.
# The io_uring echo shows what one thread can do when the receives and sends of many
# sockets share system calls, which no epoll server (udpbindd included) can.
C_PORTS: dict[str, Callable[[Path, range], list[str]]] = {
    "c_ports": _echo_ref_ports(),
    "c_ports_batch": _echo_ref_ports("--batch"),
    "c_uring": _uring_echo,
}
# The spread rate each daemon's (and the io_uring echo's) is compared with: a C server's
# usual answer to many sockets.
SPREAD_REFERENCE = "c_ports"


@dataclass
class Many:
    count: int
    ready_s: list[float] = field(default_factory=list)
    base_ready_s: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    base_rss_kib: list[int] = field(default_factory=list)
    # server key (of SPREAD_LABELS) -> "spread"/"one" -> rates
    rates: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # server key (of SPREAD_LABELS) -> why it did not run
    skipped: dict[str, str] = field(default_factory=dict)


def start_daemon(
    config: Path, work: Path, tag: str, args: argparse.Namespace
) -> contextlib.AbstractContextManager[tuple[int, float]]:
    @contextlib.contextmanager
    def started() -> Iterator[tuple[int, float]]:
        path = work / f"notify-{tag}.sock"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with notify_socket(path) as notify:
            command = pinned(
                SERVER_CPU, _python("-m", "udpbindd", "run", "-c", str(config)), args.pin
            )
            began = time.monotonic()
            env = {"NOTIFY_SOCKET": str(path)}
            with running(command, work / f"daemon-{tag}.log", env) as proc:
                wait_ready(notify, proc)
                yield proc.pid, time.monotonic() - began

    return started()


@contextlib.contextmanager
def c_ports_running(
    build: Path, work: Path, key: str, tag: str, *, ports: range, args: argparse.Namespace
) -> Iterator[None]:
    """The C echo ``key`` (of C_PORTS) on every port of ``ports``, answering; on leaving,
    stopped, and the ports free for the next server."""
    echo = C_PORTS[key](build, ports)
    with running(pinned(SERVER_CPU, echo, args.pin), work / f"{key}-{tag}.log") as proc:
        wait_answering(ports.start, proc)  # it binds every port before it answers on any
        yield
    wait_ports_free(ports)


def wait_ports_free(ports: range, deadline: float = STOP_DEADLINE) -> None:
    """Wait (bounded) until no socket holds a port of ``ports``. A server's exit does not
    always free them at once: an io_uring's registered files and pending receives are
    released by the kernel after the process is gone (tens of ms for 10,000 sockets)."""
    end = time.monotonic() + deadline
    while any(port in ports for port, _ in udp_sockets()):
        if time.monotonic() > end:
            raise TimeoutError(
                f"ports {ports.start}-{ports.stop - 1} still bound {deadline} s after the "
                "server exited"
            )
        time.sleep(0.01)


def run_many(build: Path, work: Path, args: argparse.Namespace, uring_skipped: str = "") -> Many:
    """The many-listeners figures; ``uring_skipped``: why the io_uring echo cannot run, if so."""
    count = args.listeners
    many = Many(count, skipped={"c_uring": uring_skipped} if uring_skipped else {})
    base = free_range(count)
    # Every socket of a C echo, plus its standard streams and epoll or io_uring.
    raise_fd_limit(count + 16)
    big, small, plain = work / "many.yaml", work / "one.yaml", work / "many-plain.yaml"
    daemon_config(big, base, count)
    daemon_config(small, base, 1)
    daemon_config(plain, base, count, io="plain")
    for round_ in range(args.many_rounds):
        with start_daemon(small, work, f"one-{round_}", args) as (pid, took):
            many.base_ready_s.append(took)
            many.base_rss_kib.append(rss_kib(pid))
        with start_daemon(big, work, f"many-{round_}", args) as (pid, took):
            many.ready_s.append(took)
            many.rss_kib.append(rss_kib(pid))
            _spread(many, "daemon", build, base, count=count, args=args)
        with start_daemon(plain, work, f"plain-{round_}", args):
            _spread(many, "plain", build, base, count=count, args=args)
        # Each C echo leaves the ports free before the next server (this round's next echo,
        # or the next round's daemons) binds them again.
        for key in (key for key in C_PORTS if key not in many.skipped):
            with c_ports_running(
                build, work, key, str(round_), ports=range(base, base + count), args=args
            ):
                _spread(many, key, build, base, count=count, args=args)
        print(
            f"  many listeners round {round_ + 1}/{args.many_rounds}: ready "
            f"{many.ready_s[-1]:.2f} s, rss {many.rss_kib[-1]} KiB",
            file=sys.stderr,
            flush=True,
        )
    return many


def _spread(
    many: Many, key: str, build: Path, base: int, *, count: int, args: argparse.Namespace
) -> None:
    rates = many.rates.setdefault(key, {"spread": [], "one": []})
    rates["one"].append(load(build, base, args, size=64, window=64)["rate"])
    rates["spread"].append(load(build, base, args, size=64, window=64, nports=count)["rate"])


def many_table(many: Many) -> list[str]:
    ready = statistics.median(many.ready_s)
    base_ready = statistics.median(many.base_ready_s)
    rss, base_rss = statistics.median(many.rss_kib), statistics.median(many.base_rss_kib)
    per = (rss - base_rss) * 1024 / max(many.count - 1, 1)
    lines = [
        "| figure | value |",
        "|---|---:|",
        f"| start to READY, {many.count} listeners (incl. interpreter, parse, clash check) "
        f"| {ready:.2f} s |",
        f"| start to READY, 1 listener | {base_ready:.2f} s |",
        f"| process memory (VmRSS), {many.count} listeners vs 1 | {rss} KiB vs {base_rss} KiB |",
        f"| memory per listener beyond the 1-listener daemon | {per:.0f} B |",
    ]
    return lines + spread_lines(many)


def spread_lines(many: Many) -> list[str]:
    """Each server's rate spread over every port against its one-port rate (or why it was
    skipped); then each daemon's spread rate, and the io_uring echo's, against the C epoll
    echo's on the same ports."""
    one = {key: statistics.median(rates["one"]) for key, rates in many.rates.items()}
    spread = {key: statistics.median(rates["spread"]) for key, rates in many.rates.items()}
    lines = []
    for key, label in SPREAD_LABELS.items():
        if key in many.skipped:
            lines.append(f"| {label} | skipped: {many.skipped[key]} |")
        elif key in spread:
            lines.append(
                f"| {label}: 64 B x64 over {many.count} ports vs one port "
                f"| {_versus(spread[key], one[key])} |"
            )
    reference = spread.get(SPREAD_REFERENCE)
    for key in ("daemon", "plain", "c_uring"):
        if key in spread and reference is not None:
            lines.append(
                f"| {SPREAD_LABELS[key]}: over {many.count} ports vs the C epoll echo "
                f"(recvfrom/sendto) over the same ports "
                f"| {_versus(spread[key], reference)} |"
            )
    return lines


def _versus(mine: float, other: float) -> str:
    share = mine / other if other else 0.0
    return f"{mine / 1000:.1f}k vs {other / 1000:.1f}k/s = {share:.2f}"


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer, shorter rounds (~1 minute)")
    mode.add_argument(
        "--smoke",
        action="store_true",
        help="seconds: proves every part runs; the numbers mean nothing",
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; quick 3)")
    parser.add_argument("--duration", type=float, help="seconds measured per run (default 1.2)")
    parser.add_argument("--listeners", type=int, help="listeners of the many-listener test")
    parser.add_argument("--json", type=Path, help="also write every raw result here")
    parser.add_argument("--no-install", action="store_true", help="never pip/apt-install peers")
    keys = ", ".join(scenario.key for scenario in SCENARIOS)
    parser.add_argument(
        "--only", metavar="SCENARIOS", help=f"run only these (comma-separated: {keys})"
    )
    parser.add_argument(
        "--servers",
        metavar="KEYS",
        help="run only these servers (comma-separated keys; c_ref, the reference, always runs)",
    )
    parser.add_argument(
        "--no-many", dest="many", action="store_false", help="skip the many-listeners figures"
    )
    parser.add_argument(
        "--let-cpu-sleep",
        dest="keep_awake",
        action="store_false",
        help="no SCHED_IDLE spinner on the server CPU (servers then pay the wake-up of an "
        "idle CPU, which on a virtual machine dominates)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        defaults = {
            "rounds": 1,
            "duration": 0.2,
            "warmup": 0.05,
            "listeners": 100,
            "many_rounds": 1,
        }
        args.no_install = True
    elif args.quick:
        defaults = {
            "rounds": 3,
            "duration": 1.0,
            "warmup": 0.2,
            "listeners": 10000,
            "many_rounds": 1,
        }
    else:
        defaults = {
            "rounds": 5,
            "duration": 1.2,
            "warmup": 0.3,
            "listeners": 10000,
            "many_rounds": 3,
        }
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    wanted = set(args.only.split(",")) if args.only else {s.key for s in SCENARIOS}
    unknown = wanted - {s.key for s in SCENARIOS}
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))} (known: {keys})")
    args.scenarios = tuple(s for s in SCENARIOS if s.key in wanted)
    args.servers = {"c_ref", *args.servers.split(",")} if args.servers else set()
    args.pin = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    args.keep_awake = args.keep_awake and args.pin
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    about = machine()
    with tempfile.TemporaryDirectory(prefix="udpbindd-bench-") as temp:
        work = Path(temp)
        install = not args.no_install
        uring_skipped = build_c(work, install)
        contenders = [s for s in servers(work) if not args.servers or s.key in args.servers]
        for server in contenders:
            if server.key == "uvloop":
                server.skipped = ensure_uvloop(install)
            elif server.key == "sockperf":
                server.skipped = ensure_sockperf(install)
        with kept_awake(SERVER_CPU, args.keep_awake, work):
            results = run_peers(contenders, work, work, args)
            many = run_many(work, work, args, uring_skipped) if args.many else None
    about["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    about["seconds"] = round(time.monotonic() - began, 1)
    report(about, contenders, results, many, args)
    if args.json:
        raw = {"machine": about, "peers": results.runs, "many": many and many.__dict__}
        args.json.write_text(json.dumps(raw, indent=1))
    return 0


def report(
    about: dict[str, Any],
    contenders: list[Server],
    results: Results,
    many: Many | None,
    args: argparse.Namespace,
) -> None:
    pin = (
        f"server on CPU {SERVER_CPU}, load generator on CPU {LOAD_CPU}"
        if args.pin
        else "not pinned"
    )
    if args.keep_awake:
        pin += f", CPU {SERVER_CPU} kept from halting (SCHED_IDLE spinner)"
    print(
        f"Machine: {about['cpu']}, {about['cpus']} CPUs, Linux {about['kernel']}, "
        f"Python {about['python']}; {pin}; loopback IPv4.\n"
        f"Runs: {args.rounds} interleaved rounds x {args.duration} s (+{args.warmup} s warm-up), "
        f"medians; ratios are medians of per-round ratios to the C reference "
        f"(rates: higher is better; RTT: lower is better). Load average "
        f"{' '.join(about['loadavg_start'])} at start, {' '.join(about['loadavg_end'])} at end; "
        f"took {about['seconds']} s."
    )
    if args.smoke:
        print("SMOKE RUN: tiny counts, the numbers mean nothing.")
    print()
    print("\n".join(peer_table(contenders, results, args.scenarios)))
    if any(scenario.metric == "rate" for scenario in args.scenarios):
        print()
        print("\n".join(cpu_table(contenders, results, args.scenarios)))
    notes = [f"- {s.label}: {s.note}" for s in contenders if s.note and not s.skipped]
    if notes:
        print("\n".join(["", *notes]))
    if many is not None:
        print()
        print("\n".join(many_table(many)))


if __name__ == "__main__":
    raise SystemExit(main())
