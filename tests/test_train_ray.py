"""The tiny job end to end: CLI -> local Ray cluster -> Ray Train worker -> MLflow (real SQLite store)."""

import pytest
import torch
from conftest import fitrun_train
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # end-to-end: real Ray clusters, fitrun through its CLI


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


# `fitrun train jobs/tiny-cpu.yaml` as the README runs it, 10 steps, every step logged: its MLflow loss
# and grad-norm history, recorded from the CLI. Its first 5 steps (the warm-up, where the schedule does
# not depend on max_steps) equal the in-process pin of tests/test_worker.py.
CLI_LOSS = [6.9884843826293945, 6.998772621154785, 6.989872455596924, 6.929351329803467, 6.834429740905762,
            6.760223865509033, 6.717260360717773, 6.6738691329956055, 6.634040832519531, 6.6490702629089355]
CLI_GRAD_NORM = [1.2171540260314941, 1.2043849229812622, 1.1767315864562988, 1.2342332601547241, 1.254033088684082,
                 1.0170432329177856, 0.8190815448760986, 0.7292346954345703, 0.6640400886535645, 0.5053238272666931]


def test_loss_history_of_fitrun_train_is_pinned(root, tmp_path):
    from test_worker import EXPECTED_LOSS

    out = fitrun_train(root, tmp_path, "--set", "training.max_steps=10", "--set", "training.logging_steps=1",
                       "--set", "training.eval_steps=null", "--set", "training.save_steps=null")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("fitrun-tiny").experiment_id])

    def history(metric):
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)]
    assert history("loss") == pytest.approx(CLI_LOSS, rel=1e-5)
    assert history("grad_norm") == pytest.approx(CLI_GRAD_NORM, rel=1e-4)
    assert CLI_LOSS[:5] == pytest.approx(EXPECTED_LOSS[:5], rel=1e-6)


def test_allow_changes_resumes_a_changed_job_and_records_it(root, tmp_path):
    """A crashed job whose spec then changed: refused with the differing field (exit 2), resumed with
    --allow-changes from its checkpoint, in the same MLflow run, the change recorded there."""
    crashed = fitrun_train(root, tmp_path, env={"FITRUN_CRASH_AFTER_STEP": "6"})  # a checkpoint at step 4
    assert crashed.returncode != 0 and "simulated crash" in crashed.stdout + crashed.stderr
    changed = ["--set", "training.learning_rate=0.001"]
    refused = fitrun_train(root, tmp_path, *changed)
    assert refused.returncode == 2 and "training.learning_rate: 0.003 -> 0.001" in refused.stderr
    assert "--allow-changes" in refused.stderr and "Traceback" not in refused.stderr
    allowed = fitrun_train(root, tmp_path, *changed, "--allow-changes")
    log = allowed.stdout + allowed.stderr
    assert allowed.returncode == 0, log[-3000:]
    assert "at step 4" in log
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("fitrun-tiny").experiment_id])
    assert run.info.status == "FINISHED"
    assert "training.learning_rate: 0.003 -> 0.001" in run.data.tags["fitrun.changes_on_resume"]
    assert "job-resumed-checkpoint_000004.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
