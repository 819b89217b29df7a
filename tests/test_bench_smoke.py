"""bench/counting.py --smoke: the counting benchmark still starts both loops, measures and
prints its ratio. Never judges speed: the numbers of a smoke run mean nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_counting_benchmark_smoke_run_prints_a_ratio() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "counting.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, ""), done.stdout + done.stderr
    # Each path, batched and plain, against its own uncounted twin.
    for mode in ("batched", "plain"):
        assert re.search(rf"^counting overhead, io: {mode}: 2 rounds", done.stdout, re.M)
    rounds = re.findall(
        r"^round +\d+: CPU per datagram on +[\d.]+ us, off +[\d.]+ us", done.stdout, re.M
    )
    assert len(rounds) == 4, done.stdout
    ratios = re.findall(r"^throughput ratio on/off: (\d+\.\d+) ", done.stdout, re.M)
    assert len(ratios) == 2, done.stdout
    assert all(float(ratio) > 0 for ratio in ratios)
    assert len(re.findall(r"^counting costs -?[\d.]+% of echo throughput", done.stdout, re.M)) == 2
