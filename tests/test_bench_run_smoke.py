"""bench/run.py --smoke: the benchmark command still builds, starts every server, measures and
prints its tables. Never judges speed: the numbers of a smoke run mean nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require

REPO = Path(__file__).resolve().parent.parent
ROWS = (
    "C reference echo",
    "C echo, busy-polling",
    "udpbindd daemon, io: batched",
    "udpbindd daemon, io: plain",
    "uvloop echo",
    "asyncio echo",
    "sockperf server",
)
# Measured where liburing is installed and the kernel lets io_uring run, else skipped (a
# smoke run never installs it).
URING = "C echo, io_uring (multishot recvmsg, batched sends)"


def bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run bench/run.py with ``args`` (bounded); what it printed and its exit status."""
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )


def require_build_tools() -> None:
    require(shutil.which("cc") is not None, "no C compiler (cc) to build the load generator")
    require(shutil.which("taskset") is not None, "taskset (util-linux) is missing")


@pytest.mark.slow
def test_smoke_run_prints_every_row() -> None:
    require_build_tools()
    done = bench("--smoke")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "SMOKE RUN" in out
    assert re.search(r"^Machine: .+ CPUs, Linux ", out, re.MULTILINE)
    lines = out.splitlines()
    first = lines.index(next(line for line in lines if line.startswith("| server |")))
    table = lines[first : lines.index("", first)]
    for label in ROWS:
        (row,) = [line for line in table if line.startswith(f"| {label}")]
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        if cells[1].startswith("skipped:"):
            continue  # a peer that is not installed here is named, never silently left out
        # Four scenarios, each a figure and a ratio, then drops / lost.
        assert len(cells) == 1 + 4 * 2 + 1, row
        assert all(re.fullmatch(r"\d+(\.\d+)?", cell) for cell in cells[1:9:2]), row
        assert re.fullmatch(r"\d+ / \d+", cells[9]), row
    reference = next(line for line in table if line.startswith("| C reference"))
    assert reference.count("| 1.00 |") == 4  # the reference against itself
    for figure in (
        "start to READY, 100 listeners",
        "memory per listener",
        "udpbindd daemon, io: batched: 64 B x64 over 100 ports",
        "udpbindd daemon, io: plain: 64 B x64 over 100 ports",
        "C reference echo, epoll, one recvfrom/sendto per ready socket: 64 B x64 over 100 ports",
        "C reference echo, epoll, recvmmsg/sendmmsg per ready socket: 64 B x64 over 100 ports",
        "udpbindd daemon, io: batched: over 100 ports vs the C epoll echo",
        "udpbindd daemon, io: plain: over 100 ports vs the C epoll echo",
    ):
        assert figure in out, figure
    assert_uring_row(lines)


def assert_uring_row(lines: list[str]) -> None:
    """The io_uring echo's many-listeners row is there, either measured or skipped with why."""
    measured = f"| {URING}: 64 B x64 over 100 ports vs one port | "
    skipped = f"| {URING} | skipped: "
    (row,) = [line for line in lines if line.startswith((measured, skipped))]
    if row.startswith(skipped):
        assert re.fullmatch(r".*skipped: \S.* \|", row), row
        assert not any(line.startswith(f"| {URING}: ") for line in lines)
        return
    figure = r"\d+\.\dk vs \d+\.\dk/s = \d+\.\d\d \|"
    assert re.fullmatch(re.escape(measured) + figure, row), row
    (versus,) = [line for line in lines if line.startswith(f"| {URING}: over 100 ports vs the C")]
    assert re.search(r"\| " + figure + "$", versus), versus


@pytest.mark.slow
def test_one_scenario_for_a_few_servers() -> None:
    require_build_tools()
    done = bench("--smoke", "--only", "pingpong", "--servers", "plain", "--no-many")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| server | ping-pong 64 B (median RTT): µs | ratio to C |")
    labels = [row.split("|")[1].strip() for row in rows[1:]]
    # The reference always runs: the ratios are to it.
    assert labels == ["C reference echo (recvmmsg/sendmmsg)", "udpbindd daemon, io: plain"]
    assert "start to READY" not in done.stdout
    assert "CPU per reply" not in done.stdout  # no rate scenario ran


def test_an_unknown_scenario_is_a_usage_error() -> None:
    done = bench("--only", "pingpong,nope", timeout=60)
    assert done.returncode == 2
    assert "unknown scenario(s): nope" in done.stderr
