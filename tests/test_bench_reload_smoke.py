"""``bench/reload.py --smoke`` runs and reports in the expected shape. Never asserts speed.

The smoke run uses 200 listeners: the same checks as the full run (kept = N - 1 on every
reload, the untouched listeners keep their fd and socket, the changed one answers as set),
with figures nobody should read.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "reload.py"
COUNTS = ("added", "removed", "kept", "rebound", "relabelled", "failed")
PHASES = ("sighup_to_ready_seconds", "seconds", "load_seconds", "survey_seconds", "apply_seconds")


def test_smoke_run_reports_every_reload_touching_one_listener() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--json", "--deadline", "90"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    count = report["listeners"]
    assert count == 200
    assert report["untouched_sockets"] == count - 1
    assert report["startup_seconds"] > 0
    changes = [item["change"].split(":")[0] for item in report["reloads"]]
    assert changes == ["relabel", "relabel", "rebind", "rebind", "move", "move"]
    for item in report["reloads"]:
        assert item["kept"] == count - 1
        assert item["failed"] == 0
        assert item["relabelled"] + item["rebound"] + item["added"] in (1, 2)
        assert item["status"] == f"{count} bound, 0 waiting, 0 failed"
        assert all(isinstance(item[key], int) for key in COUNTS)
        assert all(item[key] >= 0 for key in PHASES)
        assert item["load_seconds"] + item["survey_seconds"] <= item["seconds"]
    assert report["median_sighup_to_ready_seconds"] <= report["max_sighup_to_ready_seconds"]
    assert set(report["host"]) >= {"python", "kernel", "cpus", "rlimit_nofile", "load_average"}


def test_text_report_is_a_markdown_table() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--smoke"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("200 listeners on 127.1.x.y:")
    table = [line for line in lines if line.startswith("|")]
    assert (
        table[0] == "| change (one listener) | SIGHUP to READY=1 | load | survey | apply | counts |"
    )
    assert len(table) == 2 + 6
    assert lines[-1].startswith("median SIGHUP to READY=1 ")
