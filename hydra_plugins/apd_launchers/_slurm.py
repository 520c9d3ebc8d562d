"""``hydra/launcher=slurm``: hydra-submitit-launcher's SLURM launcher, made to report what happened.

It differs from ``SlurmLauncher`` in three ways. Each was found by running sweeps on a real
single-node SLURM (``scripts/slurm_local.sh``):

- **A failed run fails its SLURM job.** ``experiments.decompose`` records a failed run in
  ``failure.json`` and returns NaN, so that the sweep goes on. In a SLURM job that ran fine as far
  as SLURM could tell, so the job showed COMPLETED. Here the job then raises
  :class:`RunFailedError`: submitit stores the traceback and the job exits 1, so ``squeue -t all``,
  ``scontrol show job`` and ``sacct`` show FAILED.
- **Every job is waited for and reported.** ``SlurmLauncher`` stops at the first failed job with a
  raw traceback and stops watching the rest. This launcher waits for all of them. It logs one
  line for each job that failed, with the job's failure.json or log, and says how to resume.
- **A job that ends without a result is noticed without accounting.** submitit learns job states
  from ``sacct``. If a job is cancelled (``scancel``), hits its time limit or loses its node,
  submitit raises ``UncompletedJobError`` (exit 1) when accounting is on. When it is off, every
  sacct call fails and submitit waits forever. This launcher asks ``squeue -t all`` instead, which
  needs no accounting.

The launcher exits 0 when every job either finished or failed with ``failure.json``:
``experiments.summarize`` counts both as results. Otherwise it exits 1 with a
:class:`SweepIncompleteError` that names the jobs and says how to resume.
"""

import json
import logging
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.errors import CompactHydraException
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf
from submitit.core.utils import FailedJobError, JobPaths

log = logging.getLogger(__name__)

FAILURE_FILE = "failure.json"
"""what a run writes into its run dir when it fails (experiments/decompose.py)"""

ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
                 "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}  # fmt: skip
"""squeue states of a job that may still produce a result; any other state is final"""

RESULT_GRACE_S = 15.0
"""how long a job may sit in a final state (or be gone from squeue) before its missing result
counts as lost. submitit writes the result before the job ends, but a shared file system can show
it late."""

LEFT_THE_QUEUE = "left the queue (cancelled before it started, or ended longer ago than slurmctld keeps jobs)"
"""how a job ended that squeue no longer lists: a pending array task that is cancelled vanishes at once"""

SQUEUE_FIRST_POLL_S, SQUEUE_MAX_POLL_S = 2.0, 60.0
"""squeue is first asked after 2 s, then at doubling intervals, at most once a minute"""

RESULT_POLL_S = 1.0
"""how often the result files are looked for (as submitit does)"""


class RunFailedError(RuntimeError):
    """Raised inside a SLURM job whose run failed, so that the job exits non-zero."""


class SweepIncompleteError(CompactHydraException):
    """Jobs ended without a result: cancelled, timed out, killed, or crashed outside the run."""


def failure_note(folder: Path, job_id: str, task: int) -> Path:
    """Where a failed job leaves its run dir and error for the launcher, next to submitit's files."""
    return folder / f"{job_id}_{task}_failed_run.json"


class ApdSlurmLauncher(submitit_launcher.SlurmLauncher):
    def __call__(
        self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
        singleton_state: dict[type, Singleton],
    ) -> JobReturn:  # fmt: skip
        """Runs in the SLURM job: the sweep job, then a non-zero exit if its run failed."""
        ret = super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
        assert ret.hydra_cfg is not None
        run_dir = Path(str(ret.hydra_cfg.hydra.runtime.output_dir))
        failure = run_dir / FAILURE_FILE
        if ret.status != JobStatus.FAILED and not failure.is_file():
            return ret
        cause = ret._return_value if ret.status == JobStatus.FAILED else None  # the exception, if one escaped
        if failure.is_file():
            recorded = json.loads(failure.read_text())
            error, message = recorded["error"], recorded["message"]
        else:
            error, message = type(cause).__name__, str(cause)
        env = submitit.JobEnvironment()
        note = {"run_dir": str(run_dir), "error": error, "message": message,
                "failure_json": str(failure) if failure.is_file() else None}  # fmt: skip
        failure_note(env.paths.folder, env.job_id, env.global_rank).write_text(json.dumps(note, indent=2) + "\n")
        where = failure if failure.is_file() else run_dir
        raise RunFailedError(f"run failed ({error}: {message}); details in {where}") from cause

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
        """Submits the sweep as one job array, waits for every job, reports, returns their results."""
        assert self.config is not None and len(job_overrides) > 0
        # the executor as SlurmLauncher.launch builds it
        executor = submitit.AutoExecutor(cluster="slurm", folder=self.params["submitit_folder"],
                                         slurm_max_num_timeout=self.params["max_num_timeout"])  # fmt: skip
        base_keys = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base_keys else f"slurm_{k}": v for k, v in self.params.items()
                                      if k not in ("submitit_folder", "max_num_timeout")})  # fmt: skip
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Submitit 'slurm' sweep output dir : {sweep_dir}")
        params = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*params))
        slurm_id = jobs[0].job_id.split("_")[0]
        log.info(f"submitted SLURM job {slurm_id}" + (f", an array of {len(jobs)}" if len(jobs) > 1 else "")
                 + "; waiting for every job to end")  # fmt: skip
        try:
            lost = _wait(jobs)
        except KeyboardInterrupt:
            log.warning(f"stopped waiting; the jobs go on (squeue -j {slurm_id}). Once they have ended (or after "
                        f"scancel {slurm_id}), the same command with hydra.sweep.dir={sweep_dir} finishes the sweep.")  # fmt: skip
            raise
        returns, failed, incomplete = [], [], []
        for idx, (overrides, job) in enumerate(zip(job_overrides, jobs), start=initial_job_idx):
            label = f"#{idx} (SLURM job {job.job_id}: {' '.join(filter_overrides(overrides))})"
            if job.job_id in lost:
                log_file = f"; log: {job.paths.stderr}" if job.paths.stderr.is_file() else ""
                incomplete.append(f"{label} {lost[job.job_id]} without a result{log_file}")
                continue
            try:
                returns.append(job.results()[0])
            except FailedJobError:
                note = _read_note(job)
                if note is None:
                    incomplete.append(f"{label} crashed outside the run; traceback in {job.paths.stderr}")
                elif note["failure_json"] is None:
                    incomplete.append(f"{label} failed: {note['error']}: {note['message']}; no failure.json, traceback in "
                                      f"{job.paths.stderr}")  # fmt: skip
                else:
                    failed.append(f"{label} failed: {note['error']}: {note['message']}; details in {note['failure_json']}")
                    returns.append(_nan_return(overrides))  # a result, as the task function returns it under joblib
        n_finished = len(jobs) - len(failed) - len(incomplete)
        log.info(f"sweep {sweep_dir}: {len(jobs)} jobs: {n_finished} finished, {len(failed)} failed "
                 f"(failure.json written), {len(incomplete)} without a result")  # fmt: skip
        for line in failed:
            log.warning(line)
        if incomplete:
            raise SweepIncompleteError(
                f"{len(incomplete)} of {len(jobs)} jobs of the sweep in {sweep_dir} ended without a result:\n  "
                + "\n  ".join(incomplete)
                + f"\nTo finish the sweep, run the same command again with hydra.sweep.dir={sweep_dir}: "
                "finished jobs are skipped, unfinished ones resume from their last checkpoint."
            )
        return returns


def _nan_return(overrides: Sequence[str]) -> JobReturn:
    """What a failed run's task function returns in a multirun (experiments/decompose.py): NaN."""
    ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
    ret.return_value = float("nan")
    return ret


def _read_note(job: submitit.Job) -> dict | None:
    notes = [failure_note(job.paths.folder, job.job_id, task) for task in range(job.num_tasks)]
    return next((json.loads(n.read_text()) for n in notes if n.is_file()), None)


def _has_results(job: submitit.Job) -> bool:
    """Whether every task of the job has written its result (success or error)."""
    return all(JobPaths(job.paths.folder, job.job_id, task).result_pickle.exists() for task in range(job.num_tasks))


def _queue_states(array_ids: set[str]) -> dict[str, str] | None:
    """``{job id: state}`` of the array tasks slurmctld still knows (``squeue -t all``: no
    accounting needed); None if squeue could not be asked."""
    command = ["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", ",".join(sorted(array_ids))]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning(f"cannot ask squeue for the jobs' states ({e}); waiting for their results only")
        return None
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:  # all of them have left slurmctld's memory (MinJobAge)
            return {}
        log.warning(f"squeue failed ({proc.stderr.strip()}); waiting for the jobs' results only")
        return None
    return dict(line.split("|", 1) for line in proc.stdout.splitlines() if "|" in line)


def _wait(jobs: Sequence[submitit.Job]) -> dict[str, str]:
    """Waits until each job has written its results, or has sat in a final state (or been gone from
    squeue) for ``RESULT_GRACE_S``; returns ``{job id: how it ended}`` of the jobs without results."""
    pending = {job.job_id: job for job in jobs}
    array_ids = {job_id.split("_")[0] for job_id in pending}
    ended_at: dict[str, float] = {}
    lost: dict[str, str] = {}
    poll_s = SQUEUE_FIRST_POLL_S
    next_poll = time.monotonic() + poll_s
    while True:
        for job_id in [job_id for job_id, job in pending.items() if _has_results(job)]:
            del pending[job_id]
        if not pending:
            return lost
        now = time.monotonic()
        if now >= next_poll:
            states = _queue_states(array_ids)
            for job_id in list(pending) if states is not None else []:
                state = states.get(job_id, "")
                if state in ACTIVE_STATES:
                    ended_at.pop(job_id, None)
                elif now - ended_at.setdefault(job_id, now) >= RESULT_GRACE_S:
                    lost[job_id] = f"ended {state}" if state else LEFT_THE_QUEUE
                    log.warning(f"SLURM job {job_id} {lost[job_id]} without a result")
                    del pending[job_id]
            poll_s = min(SQUEUE_MAX_POLL_S, 2 * poll_s)
            in_grace = any(job_id in ended_at for job_id in pending)
            next_poll = now + (min(poll_s, RESULT_GRACE_S / 3) if in_grace else poll_s)
        time.sleep(RESULT_POLL_S)
