"""Sweeps: multirun through submitit's local executor, failure capture, summaries, kill-and-resume."""

import csv
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
from experiments import schema  # noqa: F401  (registers the config schemas)
from experiments.summarize import summarize

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _decompose(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.decompose", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_submitit_local_multirun_with_a_failing_job_then_summarize(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _decompose("-m", "hydra/launcher=submitit_local", "method.lr=3e-2,1e30", "steps=60", "figures=false",
                      f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ok, bad = sweep / "0", sweep / "1"
    assert (ok / "metrics.json").is_file() and not (ok / "failure.json").exists()
    assert json.loads((ok / "metrics.json").read_text())["torch_threads"] == 1  # default threads=0: 1 off SLURM/joblib
    failure = json.loads((bad / "failure.json").read_text())
    assert failure["error"] == "NonFiniteLossError" and "Traceback" in failure["traceback"]

    out = summarize(sweep, "mmcs", 0.5)
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 2 and out["swept"] == ["method.lr"]
    status = {r["method.lr"]: r["status"] for r in rows}
    assert status == {"0.03": "finished", "1e+30": "failed"}
    assert float(next(r for r in rows if r["status"] == "finished")["mmcs"]) > 0.5
    md = (sweep / "summary.md").read_text()
    assert "1 finished, 1 failed" in md and "NonFiniteLossError" in md
    assert (sweep / "success_vs_method.lr.png").is_file()


def test_summarize_a_2d_grid_with_a_run_still_in_progress(tmp_path):
    for i, (k, simp, seed, done) in enumerate([(1, 1, 0, True), (1, 2, 0, True), (2, 1, 0, True), (2, 2, 0, False)]):
        run = tmp_path / str(i)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- method.topk={k}\n- method.simplicity_coeff={simp}\n- seed={seed}\n")
        if done:
            (run / "metrics.json").write_text(json.dumps({"all_recovered": float(k == 1), "mmcs": 0.9}))
        else:
            (run / "metrics.jsonl").write_text(json.dumps({"step": 40}) + "\n")
    out = summarize(tmp_path)
    by_run = {r["run"]: r for r in out["records"]}
    assert by_run["3"]["status"] == "running" and by_run["3"]["last_step"] == 40
    assert out["swept"] == ["method.simplicity_coeff", "method.topk"]
    assert (tmp_path / "success_heatmap.png").is_file()
    md = (tmp_path / "summary.md").read_text()
    assert "| 1 | 1 | 1 | 1 | 0 | 100% |" in md and "| 2 | 2 | 1 | 0 | 0 | – |" in md


@pytest.mark.slow  # three 1500-step runs in subprocesses: 50 s
def test_a_run_killed_with_sigkill_resumes_to_the_same_components(tmp_path):
    args = ["steps=1500", "batch_size=256", "n_eval=2000", "method.checkpoint_every=250", "method.log_every=50", "figures=false"]
    straight = tmp_path / "straight"
    proc = _decompose(*args, f"hydra.run.dir={straight}")
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "experiments.decompose", *args, f"hydra.run.dir={killed}"], cwd=ROOT,
                         env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline:
        ckpt = killed / "checkpoint.pt"
        if ckpt.is_file() and load_decomposition(ckpt).step >= 500:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (killed / "decomposition.pt").exists(), "the run finished before it could be killed"
    # a temporary file may be left beside it; the checkpoint itself is whole (it loads:)
    assert 500 <= load_decomposition(killed / "checkpoint.pt").step < 1500

    proc = _decompose(*args, f"hydra.run.dir={killed}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_decomposition(straight), load_decomposition(killed)
    for name in a.A:
        assert torch.equal(a.A[name], b.A[name]) and torch.equal(a.B[name], b.B[name])
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 1499  # no replayed duplicates in the log
    assert json.loads((killed / "metrics.json").read_text())["mmcs"] == json.loads((straight / "metrics.json").read_text())["mmcs"]

    # started a third time, a finished run is not redone
    before = (killed / "decomposition.pt").stat().st_mtime_ns
    assert _decompose(*args, f"hydra.run.dir={killed}").returncode == 0
    assert (killed / "decomposition.pt").stat().st_mtime_ns == before


@pytest.mark.parametrize("sweep", ["seeds", "topk_x_simplicity", "tms_40_10_topk_x_simplicity"])
def test_sweep_presets_compose(sweep):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="decompose", overrides=[f"sweep={sweep}"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN" and ("seed" in cfg.hydra.sweeper.params or cfg.n_seeds >= 10)


def test_cpu_share_divides_cores_among_parallel_jobs(monkeypatch):
    from apd.experiment import cpu_share

    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    n = len(os.sched_getaffinity(0))
    assert cpu_share() == 1  # no launcher shares the machine out: a plain run takes one thread
    assert cpu_share(1) == n and cpu_share(n) == 1 and cpu_share(4 * n) == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert cpu_share() == 6 and cpu_share(3) == 6  # a SLURM job owns its allocation


def test_joblib_jobs_with_automatic_threads_split_the_cpus(tmp_path):
    proc = _decompose("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "threads=0", "steps=5", "seed=0,1",
                      "figures=false", f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = max(1, len(os.sched_getaffinity(0)) // 2)
    assert [json.loads((tmp_path / i / "metrics.json").read_text())["torch_threads"] for i in "01"] == [expected] * 2
