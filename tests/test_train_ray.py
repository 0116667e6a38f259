"""The tiny job end to end: CLI -> local Ray cluster -> Ray Train worker -> MLflow (real SQLite store)."""

import pytest
import torch
from conftest import fitrun_train
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.ray


def _adapter(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_job_logs_fixed_format_lines(finished):
    _, out = finished
    log = out.stdout + out.stderr
    assert "batch: micro 4 x accum 2 x workers 1 = global 8; 8 steps" in log
    assert "activation checkpointing: 2/4 layers [0, 2]" in log
    assert "step     8/8 | loss " in log and "| tok/s " in log and "eval_loss" in log


def test_mlflow_run_read_back(finished):
    tmp, _ = finished
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("fitrun-tiny")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == "8" and run.data.params["activation_checkpointing.count"] == "2"
    assert run.data.params["data.path"] == "data/instructions.messages.jsonl"  # as given, not absolute
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [2, 4, 6, 8]
    assert {"tokens_per_s", "peak_allocated_gib", "grad_norm", "lr", "eval_loss", "final_tokens_per_s",
            "predicted_peak_gib", "estimate_error_pct"} <= set(run.data.metrics)
    # MLflow system metrics sampled by rank 0 while it trained (GPU ones too, where nvidia-ml-py is installed)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"job.yaml", "adapter"} <= artifacts
    assert "adapter/adapter_model.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}


def test_final_adapter_loads_with_peft(finished):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from runner.model import preset_config

    tmp, _ = finished
    base = LlamaForCausalLM(preset_config("tiny"))
    model = PeftModel.from_pretrained(base, str(tmp / "out/adapter"))
    saved = _adapter(tmp / "out/adapter")
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved) == 4 * 7 * 2
    assert any(float(v.abs().sum()) > 0 for k, v in saved.items() if "lora_B" in k)  # it trained


def test_crash_then_resume_matches_uninterrupted_run(root, finished, tmp_path, s3_bucket, monkeypatch):
    """With output_dir in an object store (S3, served on 127.0.0.1): checkpoints, the spec, the MLflow
    run id and the adapter go there, and the resume finds them there."""
    import pyarrow.fs

    from runner.storage import Location

    ref_tmp, _ = finished
    uri, credentials = s3_bucket
    for key, value in credentials.items():
        monkeypatch.setenv(key, value)
    output = ["--set", f"output_dir={uri}"]
    crashed = fitrun_train(root, tmp_path, *output, env={"FITRUN_CRASH_AFTER_STEP": "6"})
    assert crashed.returncode != 0 and "simulated crash" in crashed.stdout + crashed.stderr
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("fitrun-tiny").experiment_id])
    assert run.info.status == "FAILED"

    resumed = fitrun_train(root, tmp_path, *output)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    assert "at step 4" in log and "step     2/8" not in log
    runs = client.search_runs([client.get_experiment_by_name("fitrun-tiny").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one MLflow run per job, across restarts
    out = Location(uri)
    assert (out / "DONE").exists() and (out / "ray" / "tiny-cpu").names("checkpoint_0") == ["checkpoint_000004",
                                                                                           "checkpoint_000008"]
    assert not (tmp_path / "out").exists()  # nothing written locally
    (tmp_path / "adapter").mkdir()
    pyarrow.fs.copy_files((out / "adapter").path, str(tmp_path / "adapter"), source_filesystem=out.fs)
    ref, got = _adapter(ref_tmp / "out/adapter"), _adapter(tmp_path / "adapter")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)
