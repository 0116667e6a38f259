"""The Ray Train worker: setup → loop → summary. One function per phase, read top to bottom in
`train_loop_per_worker`; the training math of one optimizer step is `train_step`."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from runner.cards import allocator_cap_gib
from runner.data import IGNORE, MicroBatches, TokenizedData, collate, content_digest, tokenize
from runner.loading import job_from_dict
from runner.memory import PeakMemory, ProcessMemory, cap_gpu_memory, use_expandable_segments
from runner.model import Trainable, build_tokenizer, build_trainable
from runner.parallel import distribute, gradient_sync, local_value
from runner.spec import JobSpec
from runner.storage import Location
from runner.tracking import RunLogger, outbox_path
from runner.train.console import Console, format_step
from runner.train.state import intact_checkpoint, load_state, numeric, report


@dataclass(frozen=True)
class Probe:
    """What a tuner trial needs beyond its spec. `runner.tune.trial.probe_spec` writes the rest into the
    spec (its steps and warm-up, no saves, no eval, no restarts, the CUDA cap). A probe's OOM is a
    result, not a failure."""

    true_accum: int                  # the job's accumulation (the probe runs at most 2 micro-batches a step)
    cpu_limit_gib: float | None      # on CPU, the ceiling as a tensor-byte limit (CUDA has its cap)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Run:
    """What setup builds and the loop uses."""

    spec: JobSpec
    probe: Probe | None
    device: torch.device
    rank: int
    world_size: int
    data: TokenizedData
    batches: MicroBatches
    pad_id: int
    trainable: Trainable
    net: torch.nn.Module       # trainable.net, DDP-wrapped with several workers
    optimizer: torch.optim.Optimizer
    scheduler: Any
    max_steps: int
    step: int = 0
    console: Console = field(default_factory=lambda: Console(0))
    logger: RunLogger | None = None
    logged_through: int = 0    # steps already in the MLflow run (a restarted attempt logs after them)
    process_memory: ProcessMemory | None = None  # the whole process on the GPU (NVML), beside the allocator
    scaler: Any = None         # loss scaling for float16 compute on CUDA (cards without bf16)
    preemption_saved: bool = False  # a checkpoint was taken at this attempt's preemption notice


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the whole job. `config` is plain data (it crosses Ray)."""
    spec = job_from_dict(config["spec"])
    probe = Probe(**config["probe"]) if config.get("probe") else None
    run = setup(spec, probe, config.get("tracking_uri"), config.get("run_id"))
    # A job's rank 0 samples this node's CPU/GPU utilisation and memory into the run while it trains.
    monitor = run.logger.system_metrics() if run.logger and probe is None else None
    try:
        totals, last, oom = loop(run)
    finally:
        if monitor:
            run.logger.finish_system_metrics(monitor)
    summary = summarise(run, totals, last, oom)
    run.process_memory.close()
    if run.logger:
        run.logger.metrics(numeric({f"final_{k}": v for k, v in summary.items()}), step=run.step)
    state = None if probe else {"model": run.trainable.model, "optimizer": run.optimizer,
                                "scheduler": run.scheduler, "data_position": run.batches.position, "data_layout": _layout(run)}
    report(summary, run.rank, run.step, final=True, state=state, say=run.console.say)
    run.console.say(f"done: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()})}")


def setup(spec: JobSpec, probe: Probe | None, tracking_uri: str | None, run_id: str | None) -> Run:
    """Device and ceiling, data, model with its levers, optimizer and schedule, resume. Long on purpose:
    the setup reads top to bottom in the order it happens."""
    import ray.train
    import ray.train.torch
    from transformers import get_scheduler

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = _device(spec)
    # A dry run of a quantized base builds its random weights in the model dtype first (a pretrained
    # base is quantized while it loads): that moment is not the job's, so the cap and the whole-process
    # peak start after the build.
    dry_run_build = spec.model.init == "random" and spec.model.quantization != "none"
    if not dry_run_build:
        _cap(spec, device)
    process_memory = ProcessMemory(device)  # from before the model is built: weights, context, workspaces
    console = Console(rank)
    t = spec.training

    tok = build_tokenizer(spec.tokenizer, spec.model)
    data = tokenize(spec.data, tok, seed=t.seed)
    pad_to = spec.data.sequence_len if spec.data.pad_to_sequence_len else None
    batches = MicroBatches(data.train, t.micro_batch_size, tok.pad_token_id, t.seed, rank, world_size, pad_to)
    steps_per_epoch = max(1, batches.per_epoch // t.gradient_accumulation_steps)
    max_steps = t.max_steps or math.ceil(t.num_epochs * steps_per_epoch)
    console.say(data.summary_line())
    console.say(f"batch: micro {t.micro_batch_size} x accum {t.gradient_accumulation_steps} x workers {world_size} "
                f"= global {t.micro_batch_size * t.gradient_accumulation_steps * world_size}; {max_steps} steps")

    first = {k: v.to(device) for k, v in collate([batches.rows[0]], batches.pad_id).items()}
    trainable = build_trainable(spec, device, vocab_size=len(tok), check_batch=first)
    if dry_run_build:
        _cap(spec, device)
        process_memory.reset()
    console.say(f"activation checkpointing: {len(trainable.layers)}/{trainable.num_layers} layers {trainable.layers}")
    net = distribute(trainable.net, trainable.model, spec.resources.parallelism, device) if world_size > 1 \
        else trainable.net
    if world_size > 1:
        console.say(f"parallelism: {spec.resources.parallelism} over {world_size} workers")

    params = [p for p in trainable.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, fused=device.type == "cuda")
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=max_steps)
    logger = RunLogger(tracking_uri, run_id, outbox_path(spec.output_dir) if probe is None else None,
                       spec.tracking.retry_every_s) if rank == 0 and run_id else None
    # float16 (cards without bf16: T4, V100) overflows and underflows where bf16 does not: scale the loss.
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and spec.compute_dtype == "float16" else None
    run = Run(spec, probe, device, rank, world_size, data, batches, tok.pad_token_id, trainable, net, optimizer,
              scheduler, max_steps, console=console, logger=logger, process_memory=process_memory, scaler=scaler)

    resume = ray.train.get_checkpoint()  # Ray restores the run's latest checkpoint (same name + storage)
    if resume is not None:
        resume = intact_checkpoint(resume, console.say)
    if resume is not None:
        with resume.as_directory() as resume_dir:
            state = load_state(resume_dir, trainable.model, optimizer, scheduler, device)
        layout = (state.get("micro_batch_size", t.micro_batch_size), state.get("world_size", world_size))
        run.step, batches.position = state["step"], batches.position_from(state["data_position"], *layout)
        if layout != (t.micro_batch_size, world_size):
            console.say(f"data: the checkpoint counted micro-batches of {layout[0]} on {layout[1]} worker(s); "
                        f"resuming at micro-batch {batches.position} of {t.micro_batch_size} per worker, the same rows done")
        console.say(f"resumed from {resume.path} at step {run.step}")
    if logger:
        run.logged_through = logger.last_step("loss")
        if run.step == 0 and run.logged_through == 0:  # a fresh run: a resumed one has these already
            logger.metrics({f"data_{k}": v for k, v in data.accounting.items()})
            if probe is None:  # reads the data files once more, for the digest
                logger.dataset(Path(spec.data.path).name, content_digest(spec.data), spec.data.path, data.accounting)
    console.say(f"worker pid {os.getpid()} (rank {rank}, {device}) on node {ray.get_runtime_context().get_node_id()}")
    return run


def _device(spec: JobSpec) -> torch.device:
    """This worker's device (the CPU limit is set in the loop, the CUDA cap by `_cap`)."""
    import ray.train.torch

    if not spec.resources.use_gpu:
        return torch.device("cpu")
    device = ray.train.torch.get_device()
    if device.type != "cuda":
        raise RuntimeError("resources.use_gpu is true but this worker has no CUDA device")
    torch.cuda.set_device(device)
    if spec.training.expandable_segments:
        use_expandable_segments()  # before the first allocation
    return device


def _cap(spec: JobSpec, device: torch.device) -> None:
    """Cap the CUDA allocator where the job's card would run out (resources.gpu_memory_gib, or the
    budget of resources.gpu's card)."""
    cap = allocator_cap_gib(spec.resources) if device.type == "cuda" else None
    if cap:
        torch.cuda.empty_cache()  # a cap below what the allocator already holds would refuse at once
        cap_gpu_memory(device, cap)


def loop(run: Run) -> tuple[dict[str, float], dict[str, float], str | None]:
    """Train to max_steps: step, measure, evaluate, log, checkpoint. Returns (totals over the measured
    steps, the last step's metrics, a probe's OOM message or None)."""
    probe, t = run.probe, run.spec.training
    cpu_limit = probe.cpu_limit_gib if probe else None
    memory = PeakMemory(run.device, baseline=list(run.trainable.model.parameters()), limit_gib=cpu_limit)
    measure_from = min(t.measure_warmup_steps, max(0, run.max_steps - 1))
    totals = {"tokens": 0, "trainable_tokens": 0, "time_s": 0.0, "peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0,
              "micro_batch_time_s": 0.0, "optimizer_time_s": 0.0, "measured_steps": 0}
    metrics: dict[str, float] = {}
    run.console.start_progress(run.step, run.max_steps)
    try:
        with memory:
            while run.step < run.max_steps:
                _inject_oom(run)
                memory.reset()
                metrics = train_step(run.net, run.trainable.model, run.batches, run.optimizer, run.scheduler, t,
                                     run.device, run.world_size, run.scaler)
                run.step += 1
                _check_finite(metrics, run.step, scaled=run.scaler is not None)
                metrics.update(memory.peaks_gib(), step=run.step, epoch=run.batches.epoch)
                if (device_gib := run.process_memory.peak_gib) is not None:
                    metrics["peak_device_gib"] = device_gib
                _accumulate(totals, metrics, measured=run.step > measure_from)
                if t.eval_steps and run.data.eval and run.step % t.eval_steps == 0:
                    metrics["eval_loss"] = evaluate(run.net, run.data.eval, run.pad_id, t.micro_batch_size, run.device)
                if run.step % t.logging_steps == 0 or run.step == run.max_steps:
                    run.console.progress(run.step)
                    run.console.say(format_step(metrics, run.max_steps))
                    _log(run, metrics)
                notice = _preemption_notice(run)
                if notice or (t.save_steps and run.step % t.save_steps == 0 and run.step < run.max_steps):
                    if notice:
                        run.console.say(f"preemption notice: {notice}; saving a checkpoint at step {run.step}")
                    _check_run_open(run)
                    failed = report(metrics, run.rank, run.step, say=run.console.say, state={
                        "model": run.trainable.model, "optimizer": run.optimizer, "scheduler": run.scheduler,
                        "data_position": run.batches.position, "data_layout": _layout(run)})
                    if failed and run.logger:
                        run.logger.tags({"fitrun.checkpoint_error": failed[:5000]})
                _fault_injection(run.step)
    except torch.OutOfMemoryError as e:
        if not probe:
            raise
        return totals, metrics | memory.peaks_gib(), str(e).splitlines()[0][:300]
    finally:
        run.console.close()
    return totals, metrics | memory.peaks_gib(), None


def _log(run: Run, metrics: dict[str, float]) -> None:
    """Rank 0 logs each step once: a restarted attempt skips the steps its predecessor logged."""
    if run.logger is None or run.step <= run.logged_through:
        return
    _check_run_open(run)
    run.logger.metrics(numeric(metrics), step=run.step)
    run.logged_through = run.step


def _check_run_open(run: Run) -> None:
    """A worker that outlives its driver (stopped, killed) must neither log nor checkpoint: once the
    MLflow run is closed, stop."""
    if run.logger is None or run.probe:
        return
    status = run.logger.status()
    if status not in ("RUNNING", "UNKNOWN"):  # UNKNOWN: the tracking server is away; training goes on
        raise RuntimeError(f"MLflow run {run.logger.run_id} is {status}: its driver is gone; this worker stops")


def _check_finite(metrics: dict[str, float], step: int, scaled: bool) -> None:
    """Stop at the first non-finite loss (or gradient norm: with loss scaling an overflowed step is skipped
    by the scaler, not fatal), before a checkpoint or the adapter can take it."""
    bad = {k: metrics[k] for k in ("loss", *(() if scaled else ("grad_norm",))) if not math.isfinite(metrics[k])}
    if bad:
        raise FloatingPointError(f"non-finite {', '.join(f'{k} {v}' for k, v in bad.items())} at step {step}: stopped "
                                 "before any checkpoint or adapter took it; lower training.learning_rate or check "
                                 "the data")


def _accumulate(totals: dict[str, float], metrics: dict[str, float], measured: bool) -> None:
    tokens, trainable = metrics.pop("_tokens"), metrics.pop("_trainable_tokens")
    if measured:
        totals["tokens"] += tokens
        totals["trainable_tokens"] += trainable
        totals["time_s"] += metrics["step_time_s"]
        totals["micro_batch_time_s"] += metrics["micro_batch_time_s"]
        totals["optimizer_time_s"] += metrics["optimizer_time_s"]
        totals["measured_steps"] += 1
    for k in ("peak_allocated_gib", "peak_reserved_gib"):
        totals[k] = max(totals[k], metrics[k])


def _preemption_notice(run: Run) -> str | None:
    """Once per attempt, when Ray reports that a node of this worker group is being preempted (a spot reclaim,
    `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`): what it said. The checkpoint taken then means a
    restart on the nodes that remain redoes at most the steps since the notice. Jobs only, never the last step
    (its final report carries a checkpoint anyway)."""
    if run.probe or run.preemption_saved or run.step >= run.max_steps:
        return None
    import ray.train

    info = ray.train.get_preemption_info()  # every rank calls it: Ray agrees on one answer
    if info is None:
        return None
    run.preemption_saved = True
    left = f", {max(0, info.deadline_ms / 1000 - time.time()):.0f} s left" if info.deadline_ms else ""
    return f"node(s) {', '.join(n[:12] for n in info.preempted_node_ids)} (rank(s) {info.preempted_ranks}){left}"


def _layout(run: Run) -> dict[str, int]:
    return {"micro_batch_size": run.spec.training.micro_batch_size, "world_size": run.world_size}


def _inject_oom(run: Run) -> None:
    """FITRUN_OOM_AT_STEP=N: a CUDA out-of-memory error as step N starts, once per output_dir (the OOM
    fallback test's fault, on any device)."""
    if run.probe or os.environ.get("FITRUN_OOM_AT_STEP") != str(run.step + 1):
        return
    marker = Location(run.spec.output_dir) / "oom-injected"
    if run.rank == 0 and not marker.exists():
        marker.write_text(str(run.step + 1))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB (injected by FITRUN_OOM_AT_STEP)")


def _fault_injection(step: int) -> None:
    """FITRUN_CRASH_AFTER_STEP=N raises after step N: the resume tests' simulated crash. FITRUN_STEP_DELAY_S
    slows each step, so a test can act (stop a server, kill a node) between known steps."""
    if os.environ.get("FITRUN_CRASH_AFTER_STEP") == str(step):
        raise RuntimeError(f"FITRUN_CRASH_AFTER_STEP={step}: simulated crash")
    if delay := float(os.environ.get("FITRUN_STEP_DELAY_S", "0")):
        time.sleep(delay)


def summarise(run: Run, totals: dict[str, float], last: dict[str, float], oom: str | None) -> dict[str, Any]:
    """The run's summary: steady-state tokens/s, peaks, and (for a job) the final eval loss."""
    spec, probe = run.spec, run.probe
    summary: dict[str, Any] = {
        "step": run.step,
        "loss": last.get("loss", float("nan")),
        "tokens_per_s": totals["tokens"] / totals["time_s"] if totals["time_s"] else 0.0,
        # the tokens that carry a loss (assistant turns, not padding): what unpacked data is judged by
        "trainable_tokens_per_s": totals["trainable_tokens"] / totals["time_s"] if totals["time_s"] else 0.0,
        "peak_allocated_gib": max(totals["peak_allocated_gib"], last.get("peak_allocated_gib", 0.0)),
        "peak_reserved_gib": max(totals["peak_reserved_gib"], last.get("peak_reserved_gib", 0.0)),
        # the whole process (NVML), eval and checkpoint saves included: what the card must hold
        "peak_device_gib": run.process_memory.peak_gib,
        "num_checkpointed_layers": len(run.trainable.layers),
        "num_layers": run.trainable.num_layers,
        "num_truncated": run.data.num_truncated,
        "oom": 1.0 if oom else 0.0,
    }
    if probe and totals["measured_steps"]:
        # A probe runs few micro-batches per step; the job's real accumulation amortises the
        # optimizer step over more of them: tokens/s at the true accumulation, from the parts.
        n = totals["measured_steps"]
        micro_s, opt_s = totals["micro_batch_time_s"] / n, totals["optimizer_time_s"] / n
        tokens_per_micro = spec.training.micro_batch_size * spec.data.sequence_len * run.world_size
        summary["tokens_per_s"] = tokens_per_micro / (micro_s + opt_s / probe.true_accum)
        summary.update(micro_batch_time_s=micro_s, optimizer_time_s=opt_s)
    # The number a ceiling is compared with: reserved on GPU, tensor bytes on CPU.
    summary["peak_gib"] = summary["peak_reserved_gib"] if run.device.type == "cuda" else summary["peak_allocated_gib"]
    summary["score"] = 0.0 if oom else summary["tokens_per_s"]
    if oom:
        summary["oom_message"] = oom
    if not probe and run.data.eval and not oom:
        summary["eval_loss"] = evaluate(run.net, run.data.eval, run.pad_id, spec.training.micro_batch_size, run.device)
    return summary


def train_step(net, model, batches, optimizer, scheduler, t, device, world_size, scaler=None) -> dict[str, float]:
    """One optimizer step: accumulate micro-batches, normalise by the step's label tokens, clip, step
    (with `scaler`, a float16 job's loss scaled for backward, the gradients unscaled before clipping)."""
    micro = [batches.next() for _ in range(t.gradient_accumulation_steps)]
    num_label_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
    trainable_tokens = num_label_tokens  # the step's, over every worker
    if world_size > 1:  # normalise by the global count so DDP's mean equals the full-batch loss
        counts = torch.tensor([num_label_tokens], device=device, dtype=torch.float64)
        torch.distributed.all_reduce(counts)
        trainable_tokens = int(counts.item())
    denom = max(1, trainable_tokens / world_size)
    _sync(device)
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(micro):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with gradient_sync(net, sync=i == len(micro) - 1):
            loss = net(**batch) / denom
            (scaler.scale(loss) if scaler else loss).backward()
        loss_sum += loss.detach()
    if world_size > 1:  # the step's loss over the global batch: each rank holds its share times N
        torch.distributed.all_reduce(loss_sum)
        loss_sum = loss_sum / world_size
    _sync(device)
    backward_done = time.perf_counter()
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = local_value(torch.nn.utils.clip_grad_norm_(
        [p for p in model.parameters() if p.requires_grad], t.max_grad_norm or float("inf")))
    if scaler:
        scaler.step(optimizer)  # skips the step where a gradient overflowed, and lowers the scale
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    end = time.perf_counter()
    step_time = end - start
    tokens = sum(b["input_ids"].numel() for b in micro) * world_size
    return {"loss": float(loss_sum), "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
            "step_time_s": step_time, "tokens_per_s": tokens / step_time, "_tokens": tokens,
            "trainable_tokens_per_s": trainable_tokens / step_time, "_trainable_tokens": trainable_tokens,
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
