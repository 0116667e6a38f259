"""MLflow tracking against a real SQLite store, from several processes at once."""

import os
import socket
import subprocess
import sys
import time

import pytest
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


def _read_until_step(proc, step: int, seen: list[str], timeout_s: float = 300) -> None:
    """Read the job's output until it prints its step line for `step` (or a later one)."""
    import re

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError("the job ended first:\n" + "".join(seen[-40:]))
        seen.append(line)
        m = re.search(r"step\s+(\d+)/\d+ \|", line)
        if m and int(m.group(1)) >= step:
            return
    raise AssertionError(f"no step {step} within {timeout_s} s")


def _job_until_outage(root, tmp_path, steps: int, save_steps: str, stop_at: int, delay_s: float,
                      retry_every_s: float = 15.0):
    """The tiny job against a real `mlflow server` (this folder's store, a fixed port), the server stopped once
    the job prints step `stop_at`: (the running job, its output so far, the env, the port)."""
    from conftest import serve_mlflow

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "FITRUN_PROGRESS": "0", "FITRUN_STEP_DELAY_S": str(delay_s), "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "runner", "train", "jobs/tiny-cpu.yaml", "--set", f"output_dir={tmp_path}/out",
            "--set", f"tracking.tracking_uri=http://127.0.0.1:{port}", "--set", f"training.max_steps={steps}",
            "--set", "training.logging_steps=1", "--set", f"training.save_steps={save_steps}",
            "--set", "training.eval_steps=null", "--set", f"tracking.retry_every_s={retry_every_s}"]
    seen: list[str] = []
    with serve_mlflow(tmp_path, port):
        proc = subprocess.Popen(args, cwd=root, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            _read_until_step(proc, stop_at, seen)
        except BaseException:
            proc.kill()
            raise
    return proc, seen, env, port


def _the_run(url: str, steps: int) -> None:
    """One FINISHED run with every step's loss once, and the adapter."""
    client = MlflowClient(url)
    (run,) = client.search_runs([client.get_experiment_by_name("fitrun-tiny").experiment_id])
    logged = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert run.info.status == "FINISHED" and logged == list(range(1, steps + 1)), (run.info.status, logged)
    assert "adapter" in {f.path for f in client.list_artifacts(run.info.run_id)}


@pytest.mark.ray
@pytest.mark.slow
def test_a_tracking_outage_never_stops_training(root, tmp_path):
    """Issue 26: the MLflow server killed at step 8 of 30 and started again (same store, same port) at step 16:
    training never stops, exit 0, one FINISHED run, 30 loss points, each step once; the output says the server
    went away and that the waiting records were delivered."""
    from conftest import serve_mlflow

    proc, seen, _, port = _job_until_outage(root, tmp_path, steps=30, save_steps="15", stop_at=8, delay_s=1.0,
                                          retry_every_s=3)
    try:  # the server is gone: training goes on
        _read_until_step(proc, 16, seen)
        with serve_mlflow(tmp_path, port) as url:
            rest, _ = proc.communicate(timeout=300)
            log = "".join(seen) + rest
            assert proc.returncode == 0, log[-4000:]
            _the_run(url, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "does not answer" in log and "answers again" in log and "Traceback" not in log
    assert not (tmp_path / "out" / "mlflow-pending.jsonl").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_records_kept_through_the_end_are_delivered_by_fitrun_sync(root, tmp_path):
    """The server gone from step 5 to past the end: the run still ends cleanly (exit 0) and says what waits;
    `fitrun sync OUTPUT_DIR` delivers it once the server is back: every step once, the adapter, FINISHED."""
    from conftest import serve_mlflow

    out = tmp_path / "out"
    proc, seen, env, port = _job_until_outage(root, tmp_path, steps=12, save_steps="null", stop_at=5, delay_s=0.5)
    rest, _ = proc.communicate(timeout=300)
    log = "".join(seen) + rest
    assert proc.returncode == 0, log[-4000:]
    assert f"`fitrun sync {out}` delivers them" in log and (out / "mlflow-pending.jsonl").exists()
    sync = [sys.executable, "-m", "runner", "sync", str(out)]
    away = subprocess.run(sync, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert away.returncode == 1 and "pending (the server" in away.stdout, away.stdout + away.stderr
    with serve_mlflow(tmp_path, port) as url:
        done = subprocess.run(sync, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and ", 0 pending" in done.stdout, done.stdout + done.stderr
        _the_run(url, 12)
    assert not (out / "mlflow-pending.jsonl").exists()
