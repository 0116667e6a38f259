"""The same job submitted to a real two-node Ray cluster (`ray start --head` + a second `ray start`
on this machine): two Ray Train workers, one per node, DDP over gloo, logged to MLflow."""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.ray


@pytest.fixture()
def two_node_cluster():
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    port = "6391"
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's unix sockets live under it
    loopback = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    subprocess.run([ray, "start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}",
                    *loopback], check=True, env=env, capture_output=True, timeout=120)
    try:
        subprocess.run([ray, "start", f"--address=127.0.0.1:{port}", *loopback], check=True, env=env,
                       capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_two_workers_on_two_nodes(root, tmp_path, two_node_cluster):
    args = [sys.executable, "-m", "runner", "train", "jobs/tiny-cpu.yaml",
            "--set", f"resources.address={two_node_cluster}", "--set", "resources.num_workers=2",
            "--set", "training.micro_batch_size=2", "--set", "training.max_steps=4", "--set", "training.save_steps=null",
            "--set", "training.logging_steps=2", "--set", f"output_dir={tmp_path}/out",
            "--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    out = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "FITRUN_PROGRESS": "0", "RAY_AUTH_MODE": "disabled"})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "batch: micro 2 x accum 2 x workers 2 = global 8" in log
    assert "world_size=2" in log
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("fitrun-tiny").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4]  # rank 0 only
    assert (tmp_path / "out/adapter/adapter_model.safetensors").exists()
