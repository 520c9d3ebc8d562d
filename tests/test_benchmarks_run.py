import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "APD_BENCH_SMOKE": "1"}


def test_every_benchmark_imports_and_is_collected():
    """The fast check of the default run: the benchmark modules import and every benchmark is collected
    (a renamed API breaks this); the slow test below runs each body."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    collected = [line for line in proc.stdout.splitlines() if "::test_" in line]
    assert len(collected) >= 10 and all(line.startswith("benchmarks/") for line in collected), proc.stdout[-2000:]


@pytest.mark.slow  # the whole benchmark suite in a subprocess: 84 s of an 8-min -n 2 run
def test_benchmarks_run_once_so_they_cannot_rot():
    """`pytest benchmarks --benchmark-disable` runs every benchmark body once (with its checks), on
    the small sizes of APD_BENCH_SMOKE=1 (benchmarks/conftest.py)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-disable", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1] and "failed" not in proc.stdout.splitlines()[-1]
