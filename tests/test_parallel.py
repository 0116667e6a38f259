"""Several Ray Train workers on CPU (gloo): DDP and FSDP2 give the one-worker run at the same global
batch, resume after a crash, and write one MLflow run (rank 0 logs) and one PEFT adapter."""

import pytest
import torch
from conftest import fitrun_train
from mlflow.tracking import MlflowClient
from test_train_ray import _adapter

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # end-to-end: real Ray clusters, fitrun through its CLI

# The shared one-worker run (conftest `finished`): micro 4 x accum 2 = global 8, 8 steps, checkpoint
# at step 4. Two workers: micro 4 x accum 1 x 2.
TWO = ["--set", "resources.num_workers=2", "--set", "training.gradient_accumulation_steps=1"]


def _run(root, tmp, *extra, env=None):
    out = fitrun_train(root, tmp, *extra, env=env)
    return out, out.stdout + out.stderr


def _history(tmp, key="loss"):
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("fitrun-tiny").experiment_id])
    return run, [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]


@pytest.fixture(scope="module")
def one_worker(finished):
    return finished[0]


def _same_training(tmp, ref):
    run, losses = _history(tmp)
    _, ref_losses = _history(ref)
    assert run.info.status == "FINISHED"
    assert [s for s, _ in losses] == [s for s, _ in ref_losses] == [2, 4, 6, 8]  # each step logged once
    for (_, a), (_, b) in zip(losses, ref_losses):
        assert a == pytest.approx(b, rel=1e-4)
    assert _history(tmp, "eval_loss")[1][-1][1] == pytest.approx(_history(ref, "eval_loss")[1][-1][1], rel=1e-4)
    got, want = _adapter(tmp / "out/adapter"), _adapter(ref / "out/adapter")
    assert got.keys() == want.keys() and len(got) == 4 * 7 * 2  # one plain PEFT adapter, every LoRA matrix
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-5, msg=k)


def test_ddp_two_workers_match_one_worker(root, one_worker, tmp_path):
    out, log = _run(root, tmp_path, *TWO)
    assert out.returncode == 0, log[-3000:]
    assert "batch: micro 4 x accum 1 x workers 2 = global 8" in log and "parallelism: ddp over 2 workers" in log
    _same_training(tmp_path, one_worker)


def test_fsdp_two_workers_crash_resume_match_one_worker(root, one_worker, tmp_path):
    fsdp = [*TWO, "--set", "resources.parallelism=fsdp"]
    crashed, log = _run(root, tmp_path, *fsdp, env={"FITRUN_CRASH_AFTER_STEP": "6"})
    assert crashed.returncode != 0 and "simulated crash" in log
    assert "parallelism: fsdp over 2 workers" in log
    resumed, log = _run(root, tmp_path, *fsdp)
    assert resumed.returncode == 0, log[-3000:]
    assert "at step 4" in log  # the sharded state was gathered into the checkpoint and scattered back
    _same_training(tmp_path, one_worker)
