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
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, ""), done.stdout + done.stderr
    rounds = re.findall(
        r"^round +\d+: CPU per datagram on +[\d.]+ us, off +[\d.]+ us", done.stdout, re.M
    )
    assert len(rounds) == 2, done.stdout
    ratio = re.search(r"^throughput ratio on/off: (\d+\.\d+) ", done.stdout, re.M)
    assert ratio is not None, done.stdout
    assert float(ratio.group(1)) > 0
    assert re.search(r"^counting costs -?[\d.]+% of echo throughput", done.stdout, re.M)
