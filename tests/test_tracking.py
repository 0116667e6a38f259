"""MLflow tracking against a real SQLite store, from several processes at once."""

import os
import subprocess
import sys
import time

from mlflow.tracking import MlflowClient

START = """
import sys, time
from pathlib import Path
while not Path(sys.argv[2]).exists():
    time.sleep(0.005)
from runner.tracking import start_run
print(start_run(sys.argv[1], "together", sys.argv[3]))
"""


def test_jobs_started_together_share_a_new_sqlite_store(root, tmp_path):
    """Four jobs started at once in one folder (the default `mlflow.db`, not there yet): each gets its
    run in one experiment. Without the lock on the first touch, their schema migrations collided and
    most of them failed."""
    uri, go = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(root)}
    procs = [subprocess.Popen([sys.executable, "-c", START, uri, str(go), f"job-{i}"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(4)]
    time.sleep(1.0)  # all four started; released together, they import alike and reach the store together
    go.touch()
    outputs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-800:] for _, err in outputs]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("together")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"job-{i}" for i in range(4)]


def test_a_local_store_is_refused_on_a_cluster_of_several_hosts(root, monkeypatch, capsys):
    """Workers log from their own hosts: a SQLite or file store would split the run across machines."""
    import pytest

    from runner.loading import load_job
    from runner.spec import SpecError
    from runner.train.driver import check_cluster_storage

    monkeypatch.chdir(root)
    job = load_job("jobs/tiny-cpu.yaml")
    for uri in ("sqlite:///mlflow.db", "file:///tmp/mlruns", "./mlruns"):
        check_cluster_storage(job, uri, hosts={"10.0.0.1"})  # one host: any store
        with pytest.raises(SpecError, match="the Ray cluster spans 2 hosts"):
            check_cluster_storage(job, uri, hosts={"10.0.0.1", "10.0.0.2"})
    check_cluster_storage(job, "http://10.0.0.1:5000", hosts={"10.0.0.1", "10.0.0.2"})
    assert "must be storage every host mounts" in capsys.readouterr().out


def test_a_worker_stops_once_its_run_is_closed(tmp_path):
    """A worker that outlives its driver (stopped, killed) neither logs nor checkpoints: once the MLflow
    run is not RUNNING, the check it makes before each log and save raises."""
    from types import SimpleNamespace

    import pytest

    from runner.tracking import RunLogger, start_run
    from runner.train.worker import _check_run_open

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = RunLogger(uri, start_run(uri, "x", "job"))
    run = SimpleNamespace(logger=logger, probe=None)
    _check_run_open(run)  # RUNNING: goes on
    logger.end(ok=False, status="KILLED", reason="fitrun stop")
    with pytest.raises(RuntimeError, match="is KILLED: its driver is gone; this worker stops"):
        _check_run_open(run)
