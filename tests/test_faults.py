"""Issue 26: faults a long run meets, each on the real component: a checkpoint torn after it was written, a
disk that fills during a save (a real tmpfs of a few MiB), an object store that stops answering during a save
(moto_server, paused), an out-of-memory error mid-run."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pyarrow
import pytest
import torch
from conftest import fitrun_train
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from runner.storage import Location

pytestmark = pytest.mark.slow


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _history(tmp: Path, metric: str = "loss") -> list[int]:
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("fitrun-tiny").experiment_id])
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, metric)), run


def test_a_torn_checkpoint_is_skipped_for_the_one_before(root, finished, tmp_path):
    """Checkpoints at steps 4 and 6, a crash after 7; the newest is then truncated (as a kill during its write
    on shared storage leaves it). The resume says so, starts from step 4, and ends where the uninterrupted run
    ends: the same adapter, each step logged once."""
    saves = ["--set", "training.save_steps=2"]
    crashed = fitrun_train(root, tmp_path, *saves, env={"FITRUN_CRASH_AFTER_STEP": "7"})
    assert crashed.returncode != 0 and "simulated crash" in crashed.stdout + crashed.stderr
    run_dir = tmp_path / "out" / "ray" / "tiny-cpu"
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == ["checkpoint_000004", "checkpoint_000006"]
    state = run_dir / "checkpoint_000006" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])

    resumed = fitrun_train(root, tmp_path, *saves)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    assert "checkpoint_000006 is torn (trainer_state.pt has" in log
    assert f"resuming from {run_dir / 'checkpoint_000004'}\n" in log  # the driver's line names the one used
    assert "resuming from the checkpoint before it" in log and "at step 4" in log
    steps, run = _history(tmp_path)
    assert steps == [2, 4, 6, 8] and run.info.status == "FINISHED"
    ref, got = _adapter(finished[0] / "out/adapter"), _adapter(tmp_path / "out/adapter")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)


def _when_registered(run_dir: Location, name: str, timeout_s: float = 300) -> None:
    """Wait until Ray Train's snapshot in `run_dir` (local or in an object store) names checkpoint `name`: Ray
    has registered it."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if name in snapshot.read_text():
                return
        except (OSError, pyarrow.lib.ArrowException):  # not written yet
            pass
        time.sleep(0.1)


@pytest.fixture()
def small_disk(tmp_path):
    """A real filesystem of 24 MiB (tmpfs), unmounted afterwards; skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(folder: Path) -> Path:
    """Write until the filesystem is full; returns the filler file."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(root, tmp_path, small_disk):
    """output_dir on a 24 MiB filesystem that fills after the first checkpoint (step 4): the save at step 8
    fails, says so and training goes on; the final one (step 10) fails the run with the reason and the way on.
    Space freed, the same command resumes from step 4 and finishes, each step logged once."""
    args = ["--set", f"output_dir={small_disk}/out", "--set", "training.max_steps=10", "--set", "training.save_steps=4",
            "--set", "training.logging_steps=1"]
    filler: list[Path] = []

    def fill_after_first_checkpoint():
        _when_registered(Location(str(small_disk / "out" / "ray" / "tiny-cpu")), "checkpoint_000004")
        filler.append(_fill(small_disk))

    filling = threading.Thread(target=fill_after_first_checkpoint, daemon=True)
    filling.start()
    failed = fitrun_train(root, tmp_path, *args, env={"FITRUN_STEP_DELAY_S": "0.5"})
    filling.join()
    log = failed.stdout + failed.stderr
    assert failed.returncode != 0, log[-3000:]
    assert "warning: checkpoint at step 8 could not be written to" in log and "No space left on device" in log
    assert "training goes on" in log
    assert "checkpoint at step 10 could not be written" in log and "resumes from that checkpoint" in log
    run_dir = small_disk / "out" / "ray" / "tiny-cpu"
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == ["checkpoint_000004"]  # no partial copies
    steps, run = _history(tmp_path)
    assert run.info.status == "FAILED" and "step 8 could not be written" in run.data.tags["fitrun.checkpoint_error"]

    filler[0].unlink()
    resumed = fitrun_train(root, tmp_path, *args)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    assert "at step 4" in log
    steps, run = _history(tmp_path)
    assert steps == list(range(1, 11)) and run.info.status == "FINISHED"


def test_an_out_of_memory_error_mid_run_falls_back_and_finishes(root, tmp_path):
    """An OOM as step 6 starts (injected once): the run goes on from its step-4 checkpoint with more recomputed
    layers, says so, records it in MLflow, and finishes with the same global batch, each step logged once."""
    out = fitrun_train(root, tmp_path, "--set", "training.logging_steps=1", env={"FITRUN_OOM_AT_STEP": "6"})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "out of memory mid-run; training.on_oom: fallback: going on with" in log
    assert "layers recomputed (was 2)" in log and "from checkpoint_000004" in log and "at step 4" in log
    assert log.count("= global 8;") == 2  # micro x accum x workers, before and after
    steps, run = _history(tmp_path)
    assert steps == list(range(1, 9)) and run.info.status == "FINISHED"
    assert run.data.tags["fitrun.oom_fallbacks"] == "1" and "was 2" in run.data.tags["fitrun.oom_fallback_1"]
    summary = json.loads(out.stdout[out.stdout.index("\n{") + 1:])
    assert summary["oom_fallbacks"] == [run.data.tags["fitrun.oom_fallback_1"]]


def test_on_oom_fail_keeps_the_failure(root, tmp_path):
    out = fitrun_train(root, tmp_path, "--set", "training.on_oom=fail", env={"FITRUN_OOM_AT_STEP": "6"})
    log = out.stdout + out.stderr
    assert out.returncode != 0 and "OutOfMemoryError" in log and "going on with" not in log
    _, run = _history(tmp_path)
    assert run.info.status == "FAILED"


def test_an_object_store_that_stops_answering_during_a_save(root, tmp_path, s3_server, monkeypatch):
    """output_dir in an object store (moto_server) that stops answering (SIGSTOPped) once the first checkpoint
    (step 4) is registered, until the failed save is on record: the save at step 8 fails, says so and training goes
    on; the previous checkpoint stays the latest; the store answers again and the run finishes with its final
    checkpoint, one MLflow run, each step logged once, no partial checkpoint left."""
    import signal as signals

    uri, credentials, server = s3_server
    for key, value in credentials.items():
        monkeypatch.setenv(key, value)
    run_dir = Location(uri) / "ray" / "tiny-cpu"
    args = ["--set", f"output_dir={uri}", "--set", "training.max_steps=16", "--set", "training.save_steps=4",
            "--set", "training.logging_steps=1"]
    events: list[str] = []

    def pause_until_a_save_fails():
        _when_registered(run_dir, "checkpoint_000004")
        deadline = time.time() + 300
        server.send_signal(signals.SIGSTOP)
        events.append("paused")
        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        try:
            while time.time() < deadline:
                runs = client.search_runs([client.get_experiment_by_name("fitrun-tiny").experiment_id])
                if runs and "fitrun.checkpoint_error" in runs[0].data.tags:
                    events.append("failed save recorded")
                    break
                time.sleep(0.5)
        finally:
            server.send_signal(signals.SIGCONT)

    pausing = threading.Thread(target=pause_until_a_save_fails, daemon=True)
    pausing.start()
    done = fitrun_train(root, tmp_path, *args, env={"FITRUN_STEP_DELAY_S": "1.0"})
    pausing.join()
    log = done.stdout + done.stderr
    assert events == ["paused", "failed save recorded"] and done.returncode == 0, log[-3000:]
    assert "warning: checkpoint at step 8 could not be written to" in log and "training goes on" in log
    steps, run = _history(tmp_path)
    assert steps == list(range(1, 17)) and run.info.status == "FINISHED"
    assert "step 8 could not be written" in run.data.tags["fitrun.checkpoint_error"]
    names = run_dir.names("checkpoint_0")
    assert "checkpoint_000016" in names and "checkpoint_000008" not in names, names
