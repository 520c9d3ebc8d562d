"""The SLURM sweep path on a real single-node SLURM (scripts/slurm_local.sh), end to end.

Slow. Needs root and either SLURM already installed or apt: it skips with the reason elsewhere.
Run it with ``pytest -m slow tests/test_slurm_local.py``. The cluster has no accounting, so the
tests read job states from ``squeue -t all`` and ``scontrol``, never from sacct. The cluster is
brought up once for the module and stopped at the end, unless it was already up.
"""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_local.sh"
PARTITION = "debug"
CPUS = min(2, len(os.sched_getaffinity(0)))
"""cpus_per_task of the first sweep's jobs: their automatic thread count must come out equal to it.
The other sweeps give each job 1 CPU, so that two jobs run at once."""

DATA_PARALLEL_JOB = ["experiments.decompose", "experiment=tms_5_2", "steps=300", "figures=false", "n_eval=1000"]
"""What a 2-task job runs (``python -m`` + Hydra overrides): one data-parallel decomposition whose
two tasks join a gloo group from SLURM's environment (``apd.distributed.init_from_env``)."""

DATA_PARALLEL_LAUNCHER = ["hydra/launcher=slurm", f"hydra.launcher.partition={PARTITION}", "hydra.launcher.nodes=1",
                          "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
                          "hydra.launcher.timeout_min=10"]  # fmt: skip
"""The launcher settings of a 2-task job on one node (2 cores, CR_Core): sbatch --ntasks-per-node=2
--cpus-per-task=1, one srun step with 2 tasks."""

pytestmark = pytest.mark.slow
two_cpus = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="a 2-task job needs 2 CPUs on the node")


@pytest.fixture(scope="module")
def slurm_env():
    if os.geteuid() != 0:
        pytest.skip("needs root: scripts/slurm_local.sh installs slurm-wlm and munge and starts munged, slurmctld, slurmd")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and there is no apt-get to install it (scripts/slurm_local.sh targets Debian)")
    was_up = subprocess.run([SCRIPT, "status"], capture_output=True).returncode == 0
    up = subprocess.run([SCRIPT, "up"], capture_output=True, text=True, timeout=1800)
    if up.returncode == 3:
        pytest.skip(f"scripts/slurm_local.sh cannot run here: {up.stderr.strip()}")
    assert up.returncode == 0, up.stderr
    conf = subprocess.run([SCRIPT, "env"], capture_output=True, text=True, check=True).stdout.split("=", 1)[1].strip()
    yield {**os.environ, "SLURM_CONF": conf, "OMP_NUM_THREADS": "1"}
    if not was_up:
        down = subprocess.run([SCRIPT, "down"], capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr


def _sweep(env: dict, sweep_dir: Path, *overrides: str, cpus: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.decompose", *_sweep_args(sweep_dir, *overrides, cpus=cpus)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip


def _sweep_args(sweep_dir: Path, *overrides: str, cpus: int = 1) -> list[str]:
    return ["-m", "experiment=tms_5_2", "hydra/launcher=slurm", f"hydra.launcher.partition={PARTITION}",
            "hydra.launcher.timeout_min=10", "hydra.launcher.mem_gb=1", f"hydra.launcher.cpus_per_task={cpus}",
            "figures=false", f"hydra.sweep.dir={sweep_dir}", *overrides]  # fmt: skip


@contextlib.contextmanager
def _launched(env: dict, sweep_dir: Path, *overrides: str):
    """The sweep's launcher in the background. On the way out it is killed if it is still waiting and
    the sweep's jobs are cancelled, so that a failing test leaves nothing running on the cluster."""
    args = [sys.executable, "-m", "experiments.decompose", *_sweep_args(sweep_dir, *overrides)]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if (sweep_dir / ".submitit").is_dir() and _array_ids(sweep_dir):
            subprocess.run(["scancel", *_array_ids(sweep_dir)], env=env, capture_output=True)


def _wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.2)


def _array_ids(sweep_dir: Path) -> list[str]:
    """The job arrays submitit made for this sweep, oldest first (from its folder names: an array
    task's is ``<array>_<task>``; a sweep of one job is submitted alone, as ``<job>``)."""
    names = [d.name for d in (sweep_dir / ".submitit").iterdir()]
    tasks = {m.group(1) for name in names if (m := re.fullmatch(r"(\d+)_\d+", name))}
    return sorted(tasks or {name for name in names if name.isdigit()}, key=int)


def _states(env: dict, array_id: str, final: bool = True) -> dict[str, str]:
    """``{job id: state}`` of the array's tasks from ``squeue -t all``. A job can still be RUNNING
    or COMPLETING when the launcher returns (its result is written first), so by default this
    waits, for up to a minute, until no task is active."""
    deadline = time.time() + 60
    while True:
        out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", array_id, "-o", "%i|%T"], env=env,
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        states = dict(line.split("|") for line in out.split())
        if not final or not set(states.values()) & {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING"} or time.time() > deadline:
            return states
        time.sleep(1)


def _exit_code(env: dict, job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True, check=True).stdout
    return re.search(r"\bExitCode=(\S+)", out).group(1)


def test_a_sweep_with_a_failing_job_then_a_rerun_that_skips_the_finished_ones(slurm_env, tmp_path):
    sweep = tmp_path / "sweep"
    proc = _sweep(slurm_env, sweep, "method.lr=0.03,0.01,1e30", "steps=50", cpus=CPUS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [array] = _array_ids(sweep)  # one job array for the sweep
    assert _states(slurm_env, array) == {f"{array}_0": "COMPLETED", f"{array}_1": "COMPLETED", f"{array}_2": "FAILED"}
    assert _exit_code(slurm_env, f"{array}_2") == "1:0" and _exit_code(slurm_env, f"{array}_0") == "0:0"
    for ok in (sweep / "0", sweep / "1"):
        metrics = json.loads((ok / "metrics.json").read_text())
        assert metrics["torch_threads"] == CPUS and not (ok / "failure.json").exists()  # threads from the allocation
    failure = json.loads((sweep / "2" / "failure.json").read_text())
    assert failure["error"] == "NonFiniteLossError" and not (sweep / "2" / "metrics.json").exists()
    report = proc.stdout  # Hydra logs to stdout
    assert "3 jobs: 2 finished, 1 failed" in report
    assert f"#2 (SLURM job {array}_2" in report and f"details in {sweep / '2' / 'failure.json'}" in report

    finished = {i: (sweep / i / "decomposition.pt").stat().st_mtime_ns for i in "01"}
    rerun = _sweep(slurm_env, sweep, "method.lr=0.03,0.01,1e30", "steps=50", cpus=CPUS)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    first, second = _array_ids(sweep)
    assert first == array and int(second) > int(array)
    assert {i: (sweep / i / "decomposition.pt").stat().st_mtime_ns for i in "01"} == finished  # not redone
    assert _states(slurm_env, second)[f"{second}_2"] == "FAILED" and (sweep / "2" / "failure.json").is_file()


def test_a_cancelled_job_is_reported_and_a_rerun_finishes_the_sweep(slurm_env, tmp_path):
    # array_parallelism=1 holds job 1 in the queue while job 0 runs. A pending array task that is
    # cancelled vanishes from squeue at once, so the launcher sees a job gone without a result.
    sweep = tmp_path / "sweep"
    overrides = ("seed=0,1", "steps=50", "hydra.launcher.array_parallelism=1")
    with _launched(slurm_env, sweep, *overrides) as launcher:
        _wait_for(lambda: (sweep / ".submitit").is_dir() and _array_ids(sweep), "job array")
        [array] = _array_ids(sweep)
        assert _states(slurm_env, array, final=False)[f"{array}_1"] == "PENDING"
        subprocess.run(["scancel", f"{array}_1"], env=slurm_env, check=True)
        _, stderr = launcher.communicate(timeout=300)  # without accounting, submitit's launcher waits forever here

    assert launcher.returncode == 1, stderr[-3000:]
    assert _states(slurm_env, array) == {f"{array}_0": "COMPLETED"}  # the cancelled pending task is gone
    assert f"1 of 2 jobs of the sweep in {sweep} ended without a result" in stderr
    assert re.search(rf"#1 \(SLURM job {array}_1: [^)]*seed=1[^)]*\) left the queue \(cancelled before it started", stderr)
    assert f"run the same command again with hydra.sweep.dir={sweep}" in stderr
    assert (sweep / "0" / "metrics.json").is_file() and not (sweep / "1" / "metrics.json").exists()

    finished = (sweep / "0" / "decomposition.pt").stat().st_mtime_ns
    rerun = _sweep(slurm_env, sweep, *overrides)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "2 jobs: 2 finished, 0 failed" in rerun.stdout
    assert (sweep / "0" / "decomposition.pt").stat().st_mtime_ns == finished
    assert (sweep / "1" / "metrics.json").is_file()


def test_a_running_job_cancelled_by_the_scheduler_is_reported(slurm_env, tmp_path):
    # scancel sends SIGTERM, which a running submitit job ignores, and SIGKILL KillWait (30 s) later:
    # the run must still be going by then, on any machine, hence its many steps. Rerunning would
    # resume it from the checkpoint (as test_sweeps' SIGKILL test checks); that is not redone here.
    sweep = tmp_path / "sweep"
    with _launched(slurm_env, sweep, "seed=0", "steps=2000000", "method.checkpoint_every=100") as launcher:
        _wait_for(lambda: (sweep / "0" / "checkpoint.pt").is_file(), "checkpoint")
        [job] = _array_ids(sweep)  # one job: submitted alone, not as an array
        assert _states(slurm_env, job, final=False) == {job: "RUNNING"}
        subprocess.run(["scancel", job], env=slurm_env, check=True)
        _, stderr = launcher.communicate(timeout=300)  # without accounting, submitit's launcher waits forever here

    assert launcher.returncode == 1, stderr[-3000:]
    assert _states(slurm_env, job) == {job: "CANCELLED"}
    assert re.search(rf"#0 \(SLURM job {job}: [^)]*\) ended CANCELLED without a result; log: {sweep}/.submitit/{job}/", stderr)
    assert f"run the same command again with hydra.sweep.dir={sweep}" in stderr
    assert (sweep / "0" / "checkpoint.pt").is_file() and not (sweep / "0" / "metrics.json").exists()


@two_cpus
def test_a_two_task_allocation_runs_one_process_per_task(slurm_env):
    out = subprocess.run(["srun", f"--partition={PARTITION}", "--nodes=1", "--ntasks=2", "--cpus-per-task=1",
                          "bash", "-c", 'echo "$SLURM_PROCID/$SLURM_NTASKS"'],
                         env=slurm_env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split()) == ["0/2", "1/2"]


@two_cpus
def test_a_two_task_data_parallel_job(slurm_env, tmp_path):
    module, *overrides = DATA_PARALLEL_JOB  # Hydra's -m goes before the overrides (argparse stops at them)
    proc = subprocess.run([sys.executable, "-m", module, "-m", *overrides, *DATA_PARALLEL_LAUNCHER,
                           f"hydra.sweep.dir={tmp_path}"],
                          cwd=ROOT, env=slurm_env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "0" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["batch_size_per_rank"] == 1024  # the preset's global batch 2048, halved
    assert metrics["all_recovered"] in (0.0, 1.0) and metrics["l0"] > 0
    assert not (tmp_path / "0" / "failure.json").exists()
