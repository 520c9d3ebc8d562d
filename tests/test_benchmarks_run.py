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


def test_reference_table_divides_medians_of_the_same_run():
    """benchmarks.table's issue-#31 table: reference / toolkit, the CI functions' share of the step and
    the ceilings, from the medians given (hand-worked: 12 / 8, 4 / 8, 12 / 4, 12 / 0.08)."""
    from benchmarks.table import reference_table

    def bench(median: float, **extra: float) -> dict:
        return {"stats": {"median": median}, "extra_info": extra}

    benches = {"test_spd_vs_reference[tms_5_2-toolkit]": bench(0.008, flops=8e6),
               "test_spd_vs_reference[tms_5_2-reference]": bench(0.012, flops=1.2e7),
               "test_spd_vs_reference[tms_5_2-ci_only]": bench(0.004),
               "test_matmul_throughput[1024x100x200]": bench(0.001, gflops_per_s=100.0)}  # fmt: skip
    row = next(line for line in reference_table(benches) if line.startswith("| tms_5_2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["8.0 ms", "12.0 ms", "**1.50×**"]
    assert cells[6:9] == ["1.00", "1.0%", "eager"]  # 8 MFLOP in 8 ms = 1 GFLOP/s of a 100 GFLOP/s peak
    assert cells[-3:] == ["150.0×", "4.0 ms (50%)", "3.00×"]  # 12 ms / (8 MFLOP at 100 GFLOP/s = 0.08 ms)
