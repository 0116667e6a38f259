"""Planted credentials (a password in the tracking URI, an HF token) appear nowhere a user or a log
collector would look: not in MLflow params, tags or artifacts, not in the output directory, not in
the console. Against a real `mlflow server` on 127.0.0.1."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # end-to-end: real Ray clusters, fitrun through its CLI

PASSWORD = "planted-pw-3f9a1c"
HF_TOKEN = "hf_plantedTOKENx7q2"


def test_planted_credentials_are_never_recorded(root, tmp_path, mlflow_server):
    uri = mlflow_server.replace("http://", f"http://alice:{PASSWORD}@")
    args = [sys.executable, "-m", "runner", "train", "jobs/tiny-cpu.yaml", "--set", f"output_dir={tmp_path}/out",
            "--set", f"tracking.tracking_uri={uri}", "--set", "tracking.experiment_name=secrets",
            "--set", "training.max_steps=2", "--set", "training.save_steps=1", "--set", "training.eval_steps=null"]
    out = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "FITRUN_PROGRESS": "0", "HF_TOKEN": HF_TOKEN})
    console = out.stdout + out.stderr
    assert out.returncode == 0, console[-4000:]
    for secret in (PASSWORD, HF_TOKEN):
        assert secret not in console

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    assert run.info.status == "FINISHED"
    recorded = repr(run.data.params) + repr(run.data.tags)
    assert run.data.params["tracking.tracking_uri"] == mlflow_server  # the URI, without its user:password
    downloaded = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    files = [p for p in downloaded.rglob("*") if p.is_file()] + \
        [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert any(p.name == "job.yaml" for p in files) and any(p.name == "adapter_model.safetensors" for p in files)
    for secret in (PASSWORD, HF_TOKEN):
        assert secret not in recorded
        for p in files:
            assert secret.encode() not in p.read_bytes(), p
