"""Training state: save and load a resumable checkpoint, and report it to Ray Train.

A checkpoint directory holds the adapter (PEFT format), optimizer + scheduler + RNG, `state.json`
(step, data position) and, written last, `manifest.json` (every other file's size and SHA-256). The
final report of every run carries a checkpoint, so the driver reads the worker's summary from Ray's
`Result.metrics`.

Storage faults: rank 0 copies a checkpoint to the run's storage itself before reporting it, so a copy
that fails (a full disk, an object store that errs) is removed, said, and never registered: the
previous checkpoint stays the latest, and training goes on (the final checkpoint failing fails the
run). A checkpoint torn after it was registered (a kill mid-write on shared storage, a truncated
file) fails its manifest on resume, and the newest intact one before it is used instead.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch

from runner.parallel import load_optimizer_state, load_trainable_state, optimizer_state, trainable_state

STATE_FILE = "state.json"
MANIFEST = "manifest.json"


class CheckpointWriteError(RuntimeError):
    """The run's final checkpoint could not be written to its storage."""


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """Every file's size and SHA-256, written last (atomically): a checkpoint without it is incomplete."""
    files = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _digest(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1))
    tmp.rename(directory / MANIFEST)


def _manifest_problem(manifest_text, size_of, digest_of=None) -> str | None:
    """Why a checkpoint fails its manifest: `manifest_text()` (None when absent), `size_of(name)` (None when
    the file is missing) and, if given, `digest_of(name)`. None when every file matches."""
    text = manifest_text()
    if text is None:
        return f"no {MANIFEST} (its write did not finish)"
    try:
        files = json.loads(text)["files"]
    except (ValueError, KeyError) as e:
        return f"{MANIFEST} unreadable ({e})"
    for name, want in files.items():
        size = size_of(name)
        if size is None:
            return f"{name} missing"
        if size != want["bytes"]:
            return f"{name} has {size:,} bytes, its manifest says {want['bytes']:,}"
        if digest_of is not None and digest_of(name) != want["sha256"]:
            return f"{name} differs from its manifest's SHA-256"
    return None


def checkpoint_problem(directory: Path) -> str | None:
    """Why the checkpoint in `directory` cannot be trusted (missing manifest, a file missing, short or
    changed), or None when every file matches its manifest."""
    directory = Path(directory)
    return _manifest_problem(
        lambda: (directory / MANIFEST).read_text() if (directory / MANIFEST).is_file() else None,
        lambda name: (directory / name).stat().st_size if (directory / name).is_file() else None,
        lambda name: _digest(directory / name))


def stored_checkpoint_problem(checkpoint) -> str | None:
    """`checkpoint_problem` by sizes only, for a checkpoint in the run's storage (a `runner.storage.Location`,
    local or remote) without reading its files: what the driver says before a resume (the worker also checks
    the hashes)."""
    manifest = checkpoint / MANIFEST
    return _manifest_problem(lambda: manifest.read_text() if manifest.exists() else None,
                             lambda name: (checkpoint / name).size())


def gather_state(state: dict) -> dict:
    """What a checkpoint holds, in full: the trainable parameters and the optimizer state (collective
    under FSDP: every rank calls it), the scheduler and the data position."""
    model, optimizer = state["model"], state["optimizer"]
    return {"model": model, "trainable": trainable_state(model), "optimizer": optimizer_state(model, optimizer),
            "scheduler": state["scheduler"].state_dict(), "data_position": state["data_position"],
            "data_layout": state.get("data_layout", {})}


def save_state(directory: Path, gathered: dict, step: int) -> None:
    """The adapter in PEFT format, and everything a resume needs (any world size or parallelism)."""
    gathered["model"].save_pretrained(directory / "adapter", state_dict=gathered["trainable"])
    torch.save({"trainable": gathered["trainable"], "optimizer": gathered["optimizer"],
                "scheduler": gathered["scheduler"], "rng": torch.get_rng_state()}, directory / "trainer_state.pt")
    (directory / STATE_FILE).write_text(json.dumps({"step": step, "data_position": gathered["data_position"],
                                                   **gathered.get("data_layout", {})}))
    write_manifest(directory)


def load_state(directory, model, optimizer, scheduler, device) -> dict:
    """Restores model, optimizer, scheduler and RNG; returns {"step", "data_position"} and the data layout
    it counted in ("micro_batch_size", "world_size"; absent in older checkpoints)."""
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


def report(metrics: dict, rank: int, step: int, final: bool = False, state: dict | None = None,
           say=print) -> str | None:
    """`ray.train.report` is a barrier: every rank calls it; rank 0 attaches a checkpoint.

    `state` = {"model", "optimizer", "scheduler", "data_position"} saves a resumable checkpoint (rank 0
    copies it to the run's storage itself: `persist`); without it (a probe's final report) the
    checkpoint is empty and only carries the metrics. Returns None, or why the checkpoint was not
    written: a save that failed is said (`say`) and reported without one, the previous checkpoint staying
    the latest; the final one failing raises `CheckpointWriteError` (the run has nothing to end with).
    """
    import ray.train

    metrics = {**numeric(metrics), "step": step, "final": float(final)}
    gathered = gather_state(state) if state is not None else None  # every rank: a collective under FSDP
    if rank != 0:
        ray.train.report(metrics)
        return None
    name = f"checkpoint_{step:06d}"
    with tempfile.TemporaryDirectory() as tmp:
        if gathered is None:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
            return None
        try:
            save_state(Path(tmp), gathered, step)
            checkpoint = persist(Path(tmp), name)
        except OSError as e:
            where = _storage_path(name)
            problem = (f"checkpoint at step {step} could not be written to {where}: {type(e).__name__}: {e}. "
                       "The previous checkpoint stays the latest")
            ray.train.report(metrics)  # the barrier every rank is in, without a checkpoint
            if final:
                raise CheckpointWriteError(f"{problem}; free space (or fix the storage) and run the same `fitrun "
                                           "train` again: it resumes from that checkpoint") from e
            say(f"warning: {problem}; training goes on and the next save tries again")
            return problem
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
    return None


def _storage_path(name: str) -> str:
    import ray.train

    try:
        return ray.train.get_context().get_storage().build_checkpoint_path_from_name(name)
    except Exception:
        return name


def persist(local: Path, name: str):
    """Copy a checkpoint to the run's storage (Ray Train's: local folder, NFS or object store) under
    `name`; a copy that fails is removed before the error is raised, so no partial checkpoint is left."""
    import pyarrow.fs
    import ray.train

    storage = ray.train.get_context().get_storage()
    fs, dest = storage.storage_filesystem, storage.build_checkpoint_path_from_name(name)
    try:
        fs.create_dir(dest)
        pyarrow.fs.copy_files(str(local), dest, destination_filesystem=fs, chunk_size=64 << 20,
                              use_threads=not isinstance(fs, pyarrow.fs.S3FileSystem))
    except Exception as e:
        try:
            fs.delete_dir(dest)
        except Exception:
            pass
        if isinstance(e, OSError):
            raise
        raise OSError(str(e)) from e
    return ray.train.Checkpoint(dest, fs)


def intact_checkpoint(latest, say=print):
    """The checkpoint to resume from: `latest` (Ray's) when its manifest holds, else the newest intact
    one before it in the same run folder (Ray keeps two), else None. Says what it skipped."""
    import pyarrow.fs
    import ray.train

    with latest.as_directory() as d:
        problem = checkpoint_problem(Path(d))
    if problem is None:
        return latest
    say(f"warning: checkpoint {latest.path} is torn ({problem}): skipped")
    parent, newest = latest.path.rstrip("/").rsplit("/", 1)
    infos = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    older = sorted((i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name < newest), reverse=True)
    for name in older:
        candidate = ray.train.Checkpoint(f"{parent}/{name}", latest.filesystem)
        with candidate.as_directory() as d:
            problem = checkpoint_problem(Path(d))
        if problem is None:
            say(f"resuming from the checkpoint before it, {candidate.path}")
            return candidate
        say(f"warning: checkpoint {candidate.path} is torn too ({problem}): skipped")
    say("warning: no intact checkpoint is left: the run starts over from step 0")
    return None
