"""Training state: save and load a resumable checkpoint, and report it to Ray Train.

A checkpoint directory holds the adapter (PEFT format), optimizer + scheduler + RNG, and
`state.json` (step, data position). The final report of every run carries a checkpoint, so the
driver reads the worker's summary from Ray's `Result.metrics`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

STATE_FILE = "state.json"


def save_state(directory: Path, model, optimizer, scheduler, data_position: int, step: int) -> None:
    model.save_pretrained(directory / "adapter")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state()}, directory / "trainer_state.pt")
    (directory / STATE_FILE).write_text(json.dumps({"step": step, "data_position": data_position}))


def load_state(directory, model, optimizer, scheduler, device) -> dict:
    """Restores model, optimizer, scheduler and RNG; returns {"step", "data_position"}."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(directory)
    state = json.loads((directory / STATE_FILE).read_text())
    adapter = load_file(str(directory / "adapter" / "adapter_model.safetensors"), device=str(device))
    set_peft_model_state_dict(model, adapter)
    blob = torch.load(directory / "trainer_state.pt", map_location=device, weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"].cpu())
    return state


def numeric(d: dict) -> dict[str, float]:
    """The float-valued entries, as Ray and MLflow take them (names with a leading _ stay private)."""
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not k.startswith("_")}


def report(metrics: dict, rank: int, step: int, final: bool = False, state: dict | None = None) -> None:
    """`ray.train.report` is a barrier: every rank calls it; rank 0 attaches a checkpoint.

    `state` = {"model", "optimizer", "scheduler", "data_position"} saves a resumable checkpoint;
    without it (a probe's final report) the checkpoint is empty and only carries the metrics.
    """
    import ray.train

    metrics = {**numeric(metrics), "step": step, "final": float(final)}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if state is not None:
            save_state(Path(tmp), state["model"], state["optimizer"], state["scheduler"], state["data_position"], step)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:06d}")
