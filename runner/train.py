"""The Ray Train worker loop and its driver; resumable checkpoints and the final PEFT adapter."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from runner.checkpointing import apply_checkpointing, check_gradient_flow, resolve_layers
from runner.data import IGNORE, MicroBatches, collate, tokenize
from runner.kernels import apply_kernels, check_available, compile_layers, liger_linear_cross_entropy
from runner.memory import PeakMemory, cap_gpu_memory
from runner.model import build_model, build_tokenizer, decoder_layers
from runner.spec import PATH_FIELDS, JobSpec, ResourcesSpec, dump_yaml, job_from_dict
from runner.tracking import RunLogger, start_run, tracking_uri

STATE_FILE = "state.json"


# ---------------------------------------------------------------------------------------------
# Loss


class CausalLMLoss(torch.nn.Module):
    """Model + loss in one module, so DDP sees one forward. Returns the summed token CE.

    `hf` is the model's own loss (full fp32 logits); `chunked` runs lm_head + CE over chunks of
    tokens under checkpoint, so at most one chunk of logits exists at a time, in forward and backward;
    `liger` is the same idea as one fused Triton kernel (runner.kernels).
    """

    def __init__(self, model: torch.nn.Module, kind: str = "chunked", chunk_tokens: int = 1024):
        super().__init__()
        self.model, self.kind, self.chunk_tokens = model, kind, chunk_tokens
        self.fused = liger_linear_cross_entropy() if kind == "liger" else None

    def forward(self, input_ids, labels, attention_mask=None):
        if self.kind == "hf":
            num_items = (labels[:, 1:] != IGNORE).sum()
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                             num_items_in_batch=num_items)
            return out.loss * num_items  # back to a sum: the caller normalises over the whole step
        causal_lm = self.model.get_base_model()
        hidden = causal_lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.fused is not None:
            return self.fused(causal_lm.lm_head.weight, hidden[:, :-1].reshape(-1, hidden.shape[-1]),
                              labels[:, 1:].reshape(-1))
        return chunked_cross_entropy(hidden[:, :-1], causal_lm.lm_head.weight, labels[:, 1:], self.chunk_tokens)


def _chunk_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((hidden @ weight.t()).float(), targets, ignore_index=IGNORE, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_tokens: int) -> torch.Tensor:
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(_chunk_ce, hidden[start:end], weight, targets[start:end], use_reentrant=False)
    return total


# ---------------------------------------------------------------------------------------------
# The worker loop


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the whole job, top to bottom. `config` is plain data (crosses Ray)."""
    import ray.train
    import ray.train.torch

    # -- rebuild the typed spec ----------------------------------------------------------------
    spec = job_from_dict(config["spec"])
    probe = config.get("probe")  # tuner trials: {"warmup_steps", "steps", "ceiling_gib"}
    t = spec.training
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if spec.resources.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if spec.resources.gpu_memory_gib:
            cap_gpu_memory(device, spec.resources.gpu_memory_gib)
    elif spec.resources.use_gpu:
        raise RuntimeError("resources.use_gpu is true but this worker has no CUDA device")
    logger = RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 and config.get("run_id") else None
    say = _printer(rank)

    # -- data ------------------------------------------------------------------------------------
    tok = build_tokenizer(spec.tokenizer, spec.model)
    data = tokenize(spec.data, tok, seed=t.seed)
    pad_to = spec.data.sequence_len if spec.data.pad_to_sequence_len else None
    batches = MicroBatches(data.train, t.micro_batch_size, tok.pad_token_id, t.seed, rank, world_size, pad_to)
    steps_per_epoch = max(1, batches.per_epoch // t.gradient_accumulation_steps)
    max_steps = probe["warmup_steps"] + probe["steps"] if probe else \
        (t.max_steps or math.ceil(t.num_epochs * steps_per_epoch))
    say(f"data: {data.num_rows} rows, {data.num_truncated} truncated to {spec.data.sequence_len} tokens, "
        f"{len(data.train)} train / {len(data.eval)} eval sequences")
    say(f"batch: micro {t.micro_batch_size} x accum {t.gradient_accumulation_steps} x workers {world_size} "
        f"= global {t.micro_batch_size * t.gradient_accumulation_steps * world_size}; {max_steps} steps")

    # -- model, activation checkpointing, gradient-flow check ------------------------------------
    model = build_model(spec.model, spec.lora, device, vocab_size=len(tok), seed=t.seed)
    num_layers = len(decoder_layers(model))
    layers = resolve_layers(spec.activation_checkpointing, num_layers)
    apply_checkpointing(model, layers, spec.activation_checkpointing.offload and device.type == "cuda",
                        spec.activation_checkpointing.policy)
    apply_kernels(model, t.kernels)
    model.train()
    say(f"activation checkpointing: {len(layers)}/{num_layers} layers {layers}")
    if t.check_gradient_flow:
        check_gradient_flow(model, collate_first(batches, device))
    if t.compile:
        compile_layers(model)  # after the check: its short eager slice must not trigger a compile
    trainable = [p for p in model.parameters() if p.requires_grad]
    net = CausalLMLoss(model, t.loss, t.loss_chunk_tokens)
    if world_size > 1:
        net = ray.train.torch.prepare_model(net, move_to_device=False)

    # -- optimizer, schedule, resume -------------------------------------------------------------
    optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay,
                                  fused=device.type == "cuda")
    from transformers import get_scheduler
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps,
                              num_training_steps=max_steps)
    step = 0
    resume = ray.train.get_checkpoint()  # Ray restores the run's latest checkpoint (same name + storage)
    if resume is not None and not probe:
        with resume.as_directory() as resume_dir:
            step = load_state(resume_dir, model, optimizer, scheduler, batches, device)
        say(f"resumed from {resume.path} at step {step}")

    # -- loop ------------------------------------------------------------------------------------
    memory = PeakMemory(device, baseline=list(model.parameters()),
                        limit_gib=probe.get("ceiling_gib") if probe and device.type != "cuda" else None)
    measure_from = probe["warmup_steps"] if probe else min(t.measure_warmup_steps, max(0, max_steps - 1))
    totals = {"tokens": 0, "time_s": 0.0, "peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0,
              "micro_batch_time_s": 0.0, "optimizer_time_s": 0.0, "measured_steps": 0}
    metrics: dict[str, float] = {}
    progress = _progress(rank, step, max_steps)
    oom = None
    try:
        with memory:
            while step < max_steps:
                memory.reset()
                metrics = train_step(net, model, batches, optimizer, scheduler, t, device, world_size)
                step += 1
                metrics.update(memory.peaks_gib(), step=step, epoch=batches.epoch)
                if step > measure_from:
                    totals["tokens"] += metrics.pop("_tokens")
                    totals["time_s"] += metrics["step_time_s"]
                    totals["micro_batch_time_s"] += metrics["micro_batch_time_s"]
                    totals["optimizer_time_s"] += metrics["optimizer_time_s"]
                    totals["measured_steps"] += 1
                else:
                    metrics.pop("_tokens")
                for k in ("peak_allocated_gib", "peak_reserved_gib"):
                    totals[k] = max(totals[k], metrics[k])
                if t.eval_steps and data.eval and step % t.eval_steps == 0:
                    metrics["eval_loss"] = evaluate(net, data.eval, tok.pad_token_id, t.micro_batch_size, device)
                if step % t.logging_steps == 0 or step == max_steps:
                    progress.update(step)
                    say(format_step(metrics, max_steps), progress)
                    if logger:
                        logger.metrics(_numeric(metrics), step=step)
                save_now = not probe and t.save_steps and step % t.save_steps == 0 and step < max_steps
                if save_now:
                    _report_with_state(metrics, model, optimizer, scheduler, batches, step, rank)
                if os.environ.get("FITRUN_CRASH_AFTER_STEP") == str(step):  # fault injection for resume tests
                    raise RuntimeError(f"FITRUN_CRASH_AFTER_STEP={step}: simulated crash")
    except torch.OutOfMemoryError as e:
        if not probe:
            raise
        oom = str(e).splitlines()[0][:300]
    finally:
        progress.close()

    # -- final report: summary (+ adapter for real jobs) -----------------------------------------
    summary = {
        "step": step,
        "loss": metrics.get("loss", float("nan")),
        "tokens_per_s": totals["tokens"] / totals["time_s"] if totals["time_s"] else 0.0,
        "peak_allocated_gib": max(totals["peak_allocated_gib"], memory.peaks_gib()["peak_allocated_gib"]),
        "peak_reserved_gib": max(totals["peak_reserved_gib"], memory.peaks_gib()["peak_reserved_gib"]),
        "num_checkpointed_layers": len(layers),
        "num_layers": num_layers,
        "num_truncated": data.num_truncated,
        "oom": 1.0 if oom else 0.0,
    }
    if probe and totals["measured_steps"]:
        # A probe runs few micro-batches per step; the job's real accumulation amortises the
        # optimizer step over more of them: tokens/s at the true accumulation, from the parts.
        n = totals["measured_steps"]
        micro_s, opt_s = totals["micro_batch_time_s"] / n, totals["optimizer_time_s"] / n
        tokens_per_micro = t.micro_batch_size * spec.data.sequence_len * world_size
        summary["tokens_per_s"] = tokens_per_micro / (micro_s + opt_s / probe["true_accum"])
        summary.update(micro_batch_time_s=micro_s, optimizer_time_s=opt_s)
    # The number a ceiling is compared with: reserved on GPU, tensor bytes on CPU.
    summary["peak_gib"] = summary["peak_reserved_gib"] if device.type == "cuda" else summary["peak_allocated_gib"]
    summary["score"] = 0.0 if oom else summary["tokens_per_s"]
    if oom:
        summary["oom_message"] = oom
    if not probe and data.eval and not oom:
        summary["eval_loss"] = evaluate(net, data.eval, tok.pad_token_id, t.micro_batch_size, device)
    if logger:
        logger.metrics(_numeric({f"final_{k}": v for k, v in summary.items()}), step=step)
    if probe:
        ray.train.report(summary)
    else:
        _report_with_state(summary, model, optimizer, scheduler, batches, step, rank, final=True)
    say(f"done: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()})}")


def train_step(net, model, batches, optimizer, scheduler, t, device, world_size) -> dict[str, float]:
    """One optimizer step: accumulate micro-batches, normalise by the step's label tokens, clip, step."""
    micro = [batches.next() for _ in range(t.gradient_accumulation_steps)]
    num_label_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
    if world_size > 1:  # normalise by the global count so DDP's mean equals the full-batch loss
        counts = torch.tensor([num_label_tokens], device=device, dtype=torch.float64)
        torch.distributed.all_reduce(counts)
        denom = max(1.0, counts.item() / world_size)
    else:
        denom = max(1, num_label_tokens)
    _sync(device)
    start = time.perf_counter()
    loss_sum = 0.0
    for i, batch in enumerate(micro):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        last = i == len(micro) - 1
        no_sync = net.no_sync() if world_size > 1 and not last else nullcontext()
        with no_sync:
            loss = net(**batch) / denom
            loss.backward()
        loss_sum += loss.detach()
    _sync(device)
    backward_done = time.perf_counter()
    grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for p in model.parameters() if p.requires_grad], t.max_grad_norm or float("inf"))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    end = time.perf_counter()
    step_time = end - start
    tokens = sum(b["input_ids"].numel() for b in micro) * world_size
    return {"loss": float(loss_sum), "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
            "step_time_s": step_time, "tokens_per_s": tokens / step_time, "_tokens": tokens,
            "micro_batch_time_s": (backward_done - start) / len(micro), "optimizer_time_s": end - backward_done}


@torch.no_grad()
def evaluate(net, rows, pad_id, micro_batch_size, device) -> float:
    was_training = net.training
    net.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), micro_batch_size):
        batch = collate(rows[i:i + micro_batch_size], pad_id)
        count += int((batch["labels"][:, 1:] != IGNORE).sum())
        total += float(net(**{k: v.to(device) for k, v in batch.items()}))
    net.train(was_training)
    return total / max(1, count)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_state(directory: Path, model, optimizer, scheduler, batches, step: int) -> None:
    model.save_pretrained(directory / "adapter")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state()}, directory / "trainer_state.pt")
    (directory / STATE_FILE).write_text(json.dumps({"step": step, "data_position": batches.position}))


def load_state(directory, model, optimizer, scheduler, batches, device) -> int:
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
    batches.position = state["data_position"]
    return state["step"]


def _report_with_state(metrics, model, optimizer, scheduler, batches, step, rank, final=False) -> None:
    """ray.train.report is a barrier: every rank calls it; rank 0 attaches the checkpoint."""
    import ray.train

    metrics = {**_numeric(metrics), "step": step, "final": float(final)}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_state(Path(tmp), model, optimizer, scheduler, batches, step)
        (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:06d}")


# ---------------------------------------------------------------------------------------------
# Console


def format_step(m: dict[str, float], max_steps: int) -> str:
    line = (f"step {int(m['step']):>5}/{max_steps} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
            f"grad_norm {m['grad_norm']:.3f} | tok/s {m['tokens_per_s']:,.0f} | "
            f"peak alloc/res {m['peak_allocated_gib']:.2f}/{m['peak_reserved_gib']:.2f} GiB | "
            f"{m['step_time_s']:.3f} s/step")
    if "eval_loss" in m:
        line += f" | eval_loss {m['eval_loss']:.4f}"
    return line


class _NoProgress:
    def update(self, step): ...
    def close(self): ...


class _Progress:
    def __init__(self, start: int, total: int):
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr,
                        dynamic_ncols=True, leave=False)

    def update(self, step: int) -> None:
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _progress(rank: int, start: int, total: int):
    return _Progress(start, total) if rank == 0 and os.environ.get("FITRUN_PROGRESS", "1") == "1" else _NoProgress()


def _printer(rank: int):
    def say(msg: str, progress=None) -> None:
        if rank != 0:
            return
        if isinstance(progress, _Progress):
            progress.bar.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)
    return say


def _numeric(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not k.startswith("_")}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def collate_first(batches: MicroBatches, device) -> dict[str, torch.Tensor]:
    first = collate([batches.rows[0]], batches.pad_id)
    return {k: v.to(device) for k, v in first.items()}


# ---------------------------------------------------------------------------------------------
# Driver


def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")  # read where the trainer is built
    # Workers inherit the driver's environment, so `python -m runner` works without an install too.
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")])),
                        "FITRUN_PROGRESS": os.environ.get("FITRUN_PROGRESS", "1"),
                        # Ray Train 2.60's structured worker logging echoes every printed line twice.
                        "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
                        # On a busy 2-core machine a worker group can take over Ray's default 60 s to start.
                        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]}}
    ray.init(address=address, runtime_env=env, log_to_driver=True, configure_logging=True, logging_level="WARNING")


def absolute_paths(spec: JobSpec) -> JobSpec:
    """Local paths become absolute so Ray workers (other cwd) read the same files."""
    spec = spec.model_copy(deep=True)
    for section, field in PATH_FIELDS:
        obj = getattr(spec, section)
        value = getattr(obj, field)
        if value and Path(value).exists():
            setattr(obj, field, str(Path(value).absolute()))
    spec.output_dir = str(spec.resolved_output_dir().absolute())
    return spec


def scaling_config(res: ResourcesSpec):
    """Ray Train workers for `resources` (CPU, and a GPU share when use_gpu)."""
    import ray.train

    per_worker = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.use_gpu else {})}
    return ray.train.ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu, resources_per_worker=per_worker)


def _predicted_peak(spec: JobSpec) -> float | None:
    """`fitrun estimate` for this job, logged beside the measured peak; never fails the job."""
    try:
        from runner.estimate import estimate

        return estimate(spec).peak_gib
    except Exception as e:  # an architecture the trace cannot handle: train anyway, say so
        print(f"warning: memory estimate unavailable ({type(e).__name__}: {e})", flush=True)
        return None


def run_train(spec: JobSpec, resume: bool = True) -> dict[str, Any]:
    """Run the job through a Ray Train TorchTrainer; returns the final summary metrics."""
    import ray.train
    from ray.train.torch import TorchTrainer

    spec = absolute_paths(spec)
    check_available(spec.training)
    out = Path(spec.output_dir)
    run_dir = out / "ray" / spec.name
    done_marker = out / "DONE"
    if done_marker.exists() or not resume:  # a finished (or unwanted) run is not resumed: start over
        shutil.rmtree(out / "ray", ignore_errors=True)
        done_marker.unlink(missing_ok=True)
    # An unfinished run with checkpoints: Ray Train restores its latest one from the run snapshot.
    resume_from = max(run_dir.glob("checkpoint_[0-9]*"), default=None)
    out.mkdir(parents=True, exist_ok=True)

    uri = tracking_uri(spec.tracking)
    run_id_file = out / "mlflow_run_id"
    if resume_from and run_id_file.exists():
        run_id = run_id_file.read_text().strip()  # one MLflow run per job, across restarts
        RunLogger(uri, run_id).client.update_run(run_id, status="RUNNING")
    else:
        run_id = start_run(uri, spec.tracking.experiment_name, spec.tracking.run_name or spec.name,
                           params=spec.to_dict(), tags={"fitrun.kind": "train"})
        run_id_file.write_text(run_id)
    logger = RunLogger(uri, run_id)
    logger.text(dump_yaml(spec), "job.yaml")
    predicted = _predicted_peak(spec)
    if predicted is not None:
        logger.metrics({"predicted_peak_gib": predicted})
    print(f"MLflow run {run_id} ({uri}); output {out}", flush=True)
    if resume_from:
        print(f"resuming from {resume_from}", flush=True)

    init_ray(spec.resources.address)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.to_dict(), "tracking_uri": uri, "run_id": run_id},
        scaling_config=scaling_config(spec.resources),
        run_config=ray.train.RunConfig(name=spec.name, storage_path=str(out / "ray"),
                                       failure_config=ray.train.FailureConfig(max_failures=0),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    try:
        result = trainer.fit()
    except Exception:
        logger.end(ok=False)
        raise
    adapter = out / "adapter"
    shutil.rmtree(adapter, ignore_errors=True)
    with result.checkpoint.as_directory() as final:
        summary = json.loads((Path(final) / "metrics.json").read_text())
        shutil.copytree(Path(final) / "adapter", adapter)
    logger.artifacts(adapter, "adapter")
    measured = summary["peak_gib"]  # the worker's: reserved on GPU, tensor bytes on CPU
    if predicted is not None and measured:
        # The estimate's error, visible next to the measurement in every run.
        logger.metrics({"estimate_error_pct": (predicted - measured) / measured * 100})
    logger.end(ok=True)
    done_marker.write_text(json.dumps(summary))
    summary["adapter_dir"] = str(adapter)
    summary["mlflow_run_id"] = run_id
    return summary
