import os

import torch

torch.set_num_threads(1)  # every number in benchmarks/README.md is one torch thread

SMOKE = os.environ.get("APD_BENCH_SMOKE") == "1"
"""Set by tests/test_benchmarks_run.py: every benchmark body runs once on small batches, so the
benchmarks cannot rot without costing the test suite minutes. Never set for measured runs."""


def size(full: int, smoke: int) -> int:
    """A batch or step count: ``full`` in a measured run, ``smoke`` in the test suite's smoke run."""
    return smoke if SMOKE else full
