"""Open-file limits: the daemon raises its soft limit itself, and refuses a file that cannot fit.

Each listener socket is one file descriptor. The daemon runs under ``prlimit`` with a soft
limit far below its listener count: it must serve them all. Under a hard limit below it, it
must refuse before binding anything, saying which limit to raise.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

from conftest import free_port, require_tool
from daemonproc import DaemonProcess, bindable, wait_answering

from udpbindd import fdlimit

LISTENERS = 300


def many_listeners(path: Path, port: int, count: int = LISTENERS) -> Path:
    """``count`` echo listeners on 127.5.0.1.. (one port: loopback holds all of 127/8)."""
    lines = ["listeners:"]
    for index in range(count):
        address = f"127.5.{index // 250}.{index % 250 + 1}"
        lines.append(f"  - {{interface: {address}, port: {port}, responder: echo}}")
    # Warnings only: a line per bound listener would fill the pipe nobody reads meanwhile.
    lines += ["metrics:", "  listen: []", "logging:", "  level: warning", "  format: json"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_low_soft_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    prlimit = require_tool("prlimit")
    port = free_port()
    config = many_listeners(tmp_path / "many.yaml", port)
    with DaemonProcess(config, prefix=(prlimit, "--nofile=100:4096", "--")) as daemon:
        last = f"127.5.{(LISTENERS - 1) // 250}.{(LISTENERS - 1) % 250 + 1}"
        assert wait_answering(last, port) == b"ping"
        assert wait_answering("127.5.0.1", port) == b"ping"
        limits = Path(f"/proc/{daemon.pid}/limits").read_text()
        (line,) = [row for row in limits.splitlines() if row.startswith("Max open files")]
        assert line.split()[3:5] == ["4096", "4096"]
        assert daemon.stop() == 0


def test_a_file_that_cannot_fit_under_the_hard_limit_is_refused_before_binding(
    tmp_path: Path,
) -> None:
    prlimit = require_tool("prlimit")
    port = free_port()
    config = many_listeners(tmp_path / "many.yaml", port)
    command = (prlimit, "--nofile=200:200", "--")
    with DaemonProcess(config, prefix=command) as daemon:
        assert daemon.wait() == 1
    stderr = daemon.stderr.decode()
    assert (
        f"udpbindd: {LISTENERS} listener sockets need about {LISTENERS + fdlimit.RESERVE} "
        "file descriptors, but this process may open only 200" in stderr
    )
    assert "LimitNOFILE=512" in stderr
    assert "Traceback" not in stderr
    assert bindable("127.5.0.1", port)


def test_the_soft_limit_is_never_lowered() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    script = (
        "import resource; from udpbindd import fdlimit; "
        "print(*fdlimit.raise_soft_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    after = [int(word) for word in done.stdout.split()]
    assert after[0] == after[2] >= soft
    assert after[1] == after[3] == hard


def test_shortage_names_the_limit_to_raise() -> None:
    assert fdlimit.shortage(100, 1024) == ""
    assert fdlimit.shortage(1024 - fdlimit.RESERVE, 1024) == ""
    text = fdlimit.shortage(10_000, 4096)
    assert "10000 listener sockets need about 10064 file descriptors" in text
    assert "may open only 4096" in text
    assert "LimitNOFILE=16384" in text
    assert fdlimit.shortage(10**6, resource.RLIM_INFINITY) == ""
