"""apd's SLURM launcher (hydra/launcher=slurm) without a cluster: its config, and how it tells a job
that ended without a result from one still running. tests/test_slurm_local.py runs it on SLURM."""

import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
from submitit.core.utils import JobPaths  # noqa: E402

from experiments import schema  # noqa: E402, F401  (registers the config schemas)
from hydra_plugins.apd_launchers import _slurm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_the_slurm_launcher_option_instantiates_apds_launcher():
    from hydra import compose, initialize_config_dir
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="decompose", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=debug"],
                      return_hydra_config=True)  # fmt: skip
        launcher = Plugins.instance().instantiate_launcher(
            hydra_context=HydraContext(config_loader=None, callbacks=None), task_function=lambda c: None, config=cfg
        )  # fmt: skip
    assert type(launcher) is _slurm.ApdSlurmLauncher
    assert launcher.params["partition"] == "debug" and launcher.params["cpus_per_task"] == 1


def _job(tmp_path: Path, job_id: str, result: bool) -> SimpleNamespace:
    job = SimpleNamespace(job_id=job_id, paths=JobPaths(tmp_path / job_id, job_id), num_tasks=1)
    job.paths.folder.mkdir()
    if result:
        job.paths.result_pickle.touch()
    return job


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(_slurm, "RESULT_GRACE_S", 0.3)
    monkeypatch.setattr(_slurm, "SQUEUE_FIRST_POLL_S", 0.05)
    monkeypatch.setattr(_slurm, "SQUEUE_MAX_POLL_S", 0.05)
    monkeypatch.setattr(_slurm, "RESULT_POLL_S", 0.02)


def test_wait_returns_the_jobs_that_ended_without_a_result(tmp_path, monkeypatch, fast):
    done = _job(tmp_path, "7_0", result=True)
    cancelled = _job(tmp_path, "7_1", result=False)
    gone = _job(tmp_path, "7_2", result=False)
    late = _job(tmp_path, "7_3", result=False)  # its result shows up after the job has ended
    polls = []

    def queue_states(array_ids):
        assert array_ids == {"7"}
        polls.append(1)
        if len(polls) == 3:
            late.paths.result_pickle.touch()
        if len(polls) < 3:
            return {"7_1": "RUNNING", "7_2": "PENDING", "7_3": "RUNNING"}
        return {"7_1": "CANCELLED", "7_3": "COMPLETED"}

    monkeypatch.setattr(_slurm, "_queue_states", queue_states)
    lost = _slurm._wait([done, cancelled, gone, late])
    assert lost == {"7_1": "ended CANCELLED", "7_2": _slurm.LEFT_THE_QUEUE}


def test_wait_keeps_waiting_while_squeue_cannot_be_asked(tmp_path, monkeypatch, fast):
    job = _job(tmp_path, "8_0", result=False)
    polls = []

    def queue_states(array_ids):
        polls.append(1)
        if len(polls) == 20:
            job.paths.result_pickle.touch()
        return None

    monkeypatch.setattr(_slurm, "_queue_states", queue_states)
    assert _slurm._wait([job]) == {} and len(polls) >= 20


@pytest.mark.parametrize(
    "script, expected",
    [
        ('echo "9_0|COMPLETED"; echo "9_1|CANCELLED"; echo "9_2|PENDING"', {"9_0": "COMPLETED", "9_1": "CANCELLED", "9_2": "PENDING"}),
        ('echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1', {}),
        ('echo "slurm_load_jobs error: Unable to contact slurm controller" >&2; exit 1', None),
    ],
)  # fmt: skip
def test_queue_states_reads_squeue(tmp_path, monkeypatch, script, expected):
    squeue = tmp_path / "squeue"
    squeue.write_text(f"#!/bin/sh\n{script}\n")
    squeue.chmod(squeue.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert _slurm._queue_states({"9"}) == expected
