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

from runner.parallel import load_optimizer_state, load_trainable_state, optimizer_state, trainable_state

STATE_FILE = "state.json"


def gather_state(state: dict) -> dict:
    """What a checkpoint holds, in full: the trainable parameters and the optimizer state (collective
    under FSDP: every rank calls it), the scheduler and the data position."""
    model, optimizer = state["model"], state["optimizer"]
    return {"model": model, "trainable": trainable_state(model), "optimizer": optimizer_state(model, optimizer),
            "scheduler": state["scheduler"].state_dict(), "data_position": state["data_position"]}


def save_state(directory: Path, gathered: dict, step: int) -> None:
    """The adapter in PEFT format, and everything a resume needs (any world size or parallelism)."""
    gathered["model"].save_pretrained(directory / "adapter", state_dict=gathered["trainable"])
    torch.save({"trainable": gathered["trainable"], "optimizer": gathered["optimizer"],
                "scheduler": gathered["scheduler"], "rng": torch.get_rng_state()}, directory / "trainer_state.pt")
    (directory / STATE_FILE).write_text(json.dumps({"step": step, "data_position": gathered["data_position"]}))


def load_state(directory, model, optimizer, scheduler, device) -> dict:
    """Restores model, optimizer, scheduler and RNG; returns {"step", "data_position"}."""
    directory = Path(directory)
    state = json.loads((directory / STATE_FILE).read_text())
    blob = torch.load(directory / "trainer_state.pt", map_location="cpu", weights_only=False)
    if "trainable" in blob:
        load_trainable_state(model, blob["trainable"])
    else:  # a checkpoint from before full-state saving: the PEFT adapter only
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(directory / "adapter" / "adapter_model.safetensors"),
                                                   device=str(device)))
    load_optimizer_state(model, optimizer, blob["optimizer"])
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
    gathered = gather_state(state) if state is not None else None  # every rank: a collective under FSDP
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if gathered is not None:
            save_state(Path(tmp), gathered, step)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:06d}")
