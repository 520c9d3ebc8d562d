"""Data-parallel decompositions on torch.distributed (gloo on this CPU), through real ``torchrun``.

Equivalence: 2 processes, each keeping half of every global batch of 256, give the components of
one process on the whole batch to within 1e-5 (float32 rounding of the averaged gradients: measured
≤ 2e-7 after 30 steps), for APD with batch top-k and min_active and for SPD with its stochastic
masks and the minimality frequency term. A rank killed mid-run: the rerun resumes from the last
checkpoint and ends bit for bit where an uninterrupted run ends.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from apd import load_decomposition

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


@pytest.mark.parametrize("method", ["apd", "spd"])
def test_two_processes_give_the_components_of_one(tmp_path, method):
    worker = str(ROOT / "tests" / "workers" / "decompose_worker.py")
    _run([sys.executable, worker, method, "30", str(tmp_path / "one.pt")])
    _run([*TORCHRUN, worker, method, "30", str(tmp_path / "two.pt")])
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for name, p in one["params"].items():
        torch.testing.assert_close(two["params"][name], p, atol=1e-5, rtol=0)
    assert [h["total"] for h in two["history"]] == pytest.approx([h["total"] for h in one["history"]], rel=1e-4)


STEPS = 300  # the kill lands right after the first checkpoint (step 25): 275 steps to spare
ARGS = ["experiment=spd_tms_5_2", f"steps={STEPS}", "batch_size=256", "method.checkpoint_every=25", "method.log_every=50",
        "figures=false", "n_eval=1000"]  # fmt: skip


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


@pytest.mark.slow  # three 300-step torchrun jobs: 70 s
def test_a_killed_rank_resumes_to_the_uninterrupted_result(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    _run([*TORCHRUN, "-m", "experiments.decompose", *ARGS, f"hydra.run.dir={full}"], timeout=600)
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["batch_size_per_rank"] == 128
    assert sorted(p.name for p in full.iterdir() if p.is_dir()) == [".hydra"]  # rank 1 wrote nothing of its own

    proc = subprocess.Popen([*TORCHRUN, "-m", "experiments.decompose", *ARGS, f"hydra.run.dir={killed}"], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    deadline = time.time() + 300
    while not (killed / "checkpoint.pt").is_file():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    rank1 = [p for p in _children(proc.pid) if _rank_of(p) == 1]
    assert rank1, "no rank-1 process found"
    os.kill(rank1[0], signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode != 0 and not (killed / "metrics.json").exists()
    step = load_decomposition(killed / "checkpoint.pt").step
    assert 0 < step < STEPS, step

    _run([*TORCHRUN, "-m", "experiments.decompose", *ARGS, f"hydra.run.dir={killed}"], timeout=600)
    a, b = load_decomposition(full), load_decomposition(killed)
    for name, p in a.params.items():
        assert torch.equal(b.params[name], p), name
    assert [h["step"] for h in a.history] == [h["step"] for h in b.history]


def test_an_uneven_global_batch_is_refused(tmp_path):
    proc = subprocess.run([*TORCHRUN, "-m", "experiments.decompose", "experiment=tms_5_2", "steps=5", "batch_size=255",
                           "figures=false", f"hydra.run.dir={tmp_path / 'odd'}"], cwd=ROOT, capture_output=True, text=True,
                          env=ENV, timeout=300)  # fmt: skip
    assert proc.returncode != 0 and "do not split evenly over 2 ranks" in proc.stderr
