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
