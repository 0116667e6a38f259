"""The driver side of Ray Train: start Ray, resolve paths, build one TorchTrainer, run a job.

`make_trainer` is the only place a `TorchTrainer` is built, for `fitrun train` and for every
tuner probe alike; results come back through Ray's `Result.metrics` (the worker's final report).
"""

from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from runner.cards import allocator_cap_gib, fit_on
from runner.kernels import check_available
from runner.loading import dump_yaml, flatten, job_from_dict, map_local_paths, redact
from runner.spec import JobSpec, ResourcesSpec, SpecError, job_card
from runner.storage import Location, absolute, is_uri
from runner.tracking import CREDENTIAL_ENV, RunLogger, fail_fast, outbox_path, start_run, tracking_uri, without_credentials
from runner.train.worker import Probe, train_loop_per_worker

SPEC_FILE = "job.resolved.json"  # the spec a run started with: a resume must match it
CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of registered checkpoints
TEST_HOOKS = ("FITRUN_STEP_DELAY_S", "FITRUN_CRASH_AFTER_STEP", "FITRUN_OOM_AT_STEP", "FITRUN_RANDOM_OUTLIERS",
              "FITRUN_FP8_FAST_ACCUM")


def worker_env() -> dict[str, str]:
    """Environment every Ray worker needs: set by `init_ray`, or by `fitrun submit` for a Ray job."""
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")  # read where the trainer is built
    return {"FITRUN_PROGRESS": os.environ.get("FITRUN_PROGRESS", "1"),
            # Ray Train 2.60's structured worker logging echoes every printed line twice.
            "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
            # On a busy 2-core machine a worker group can take over Ray's default 60 s to start.
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"],
            **fail_fast(),  # a tracking server that is away costs a call one retry, not minutes
            # the fault tests' hooks (runner/train/worker.py), the outlier stress case (runner/model.py) and fp8's
            # fast accumulation (runner/quant.py), to
            # workers on any node
            **{k: os.environ[k] for k in TEST_HOOKS if k in os.environ},
            # MLflow credentials travel as MLflow's own variables, never inside a URI.
            **{k: os.environ[k] for k in CREDENTIAL_ENV if k in os.environ}}


def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    env = worker_env()
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # Inside a Ray job (`fitrun submit`): the job's runtime env (working_dir, worker_env()) already
        # reaches every worker, and a second runtime env in the driver would set the working dir up again.
        ray.init(address=address, log_to_driver=True, configure_logging=True, logging_level="WARNING")
        return
    # Workers inherit the driver's path, so `python -m runner` works without an install too.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")]))
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True, configure_logging=True,
                 logging_level="WARNING")
        return
    # No address: a Ray of its own. Ray's default would join whatever Ray already runs on this machine (someone
    # else's), and stop with "Found multiple active Ray instances" beside two of them; so would Ray Train's own
    # actors that look their cluster up (its placement-group cleaner), unless RAY_ADDRESS tells them which.
    port = _free_port()
    env["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{port}"
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by the head this init starts
    try:
        ray.init(address="local", runtime_env={"env_vars": env}, log_to_driver=True, configure_logging=True,
                 logging_level="WARNING")
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def absolute_paths(spec: JobSpec) -> JobSpec:
    """Local paths become absolute so Ray workers (other cwd) read the same files."""
    raw = map_local_paths(spec.to_dict(), lambda value: str(Path(value).absolute()))
    raw["output_dir"] = absolute(spec.resolved_output_dir())
    return job_from_dict(raw, "job")


def scaling_config(res: ResourcesSpec):
    """Ray Train workers for `resources` (CPU, and a GPU share when use_gpu)."""
    import ray.train

    per_worker = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.use_gpu else {})}
    return ray.train.ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu, resources_per_worker=per_worker)


def make_trainer(spec: JobSpec, run_name: str, storage_path: str, uri: str | None, run_id: str | None,
                 probe: Probe | None = None):
    """The TorchTrainer for `spec`: a job (checkpoints kept, resumable, restarted after a worker
    dies up to `training.max_failures` times) or a probe (`probe` set; its spec asks for no restarts)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    config = {"spec": spec.to_dict(), "tracking_uri": uri, "run_id": run_id,
              **({"probe": probe.to_dict()} if probe else {})}
    on_cluster = bool(spec.resources.address or os.environ.get("RAY_ADDRESS"))
    max_failures = spec.training.max_failures if spec.training.max_failures is not None else 3 if on_cluster else 0
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=scaling_config(spec.resources),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path,
            # A worker group that cannot start (resources that never come) fails after 3 tries instead of hanging.
            failure_config=ray.train.FailureConfig(max_failures=max_failures, controller_failure_limit=3),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )


class Stopped(BaseException):
    """SIGTERM or SIGINT reached the driver (`ray job stop`, `fitrun stop`, Ctrl-C)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def _signals_stop():
    def handler(signum, _frame):
        raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def check_cluster_resources(spec: JobSpec, nodes: list[dict] | None = None) -> None:
    """Each worker's CPUs and GPUs against the cluster's nodes (the live Ray nodes' resources, unless given):
    a request that no node can meet, or that all of them together cannot, never starts (Ray would wait)."""
    if nodes is None:
        import ray

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    res, problems = spec.resources, []
    asks = {"CPU": ("resources.cpus_per_worker", res.cpus_per_worker)}
    if res.use_gpu:
        asks["GPU"] = ("resources.gpus_per_worker", res.gpus_per_worker)
    for kind, (field, per_worker) in asks.items():
        largest, total = max((n.get(kind, 0) for n in nodes), default=0), sum(n.get(kind, 0) for n in nodes)
        if kind == "GPU" and total == 0:
            problems.append("resources.use_gpu: true, but this Ray cluster has no GPU (set resources.use_gpu: false "
                            "to train on the CPU)")
        elif per_worker > largest:
            problems.append(f"{field}: {per_worker:g} per worker, but the largest node has {largest:g} {kind}")
        elif per_worker * res.num_workers > total:
            problems.append(f"resources.num_workers: {res.num_workers} workers x {per_worker:g} {kind} = "
                            f"{per_worker * res.num_workers:g}, but the cluster has {total:g} {kind} in all")
    if problems:
        raise SpecError("job", problems)


def waiting_for(spec: JobSpec, free: dict | None = None) -> str | None:
    """What a job that the cluster can hold but not now waits for (the free resources: Ray's, unless given):
    a line to print before Ray Train waits in silence, or None when the workers can start at once."""
    if free is None:
        import ray

        free = ray.available_resources()
    res = spec.resources
    asks = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.use_gpu else {})}
    short = [f"{per_worker * res.num_workers:g} {kind} ({res.num_workers} worker(s) x {per_worker:g}), "
             f"{free.get(kind, 0):g} free now" for kind, per_worker in asks.items()
             if free.get(kind, 0) < per_worker * res.num_workers]
    if not short:
        return None
    return (f"waiting for the cluster: this job needs {'; '.join(short)}; other work holds the rest, and the job "
            "starts when it frees up (Ctrl-C gives up; the MLflow run is then marked KILLED)")


def check_cluster_storage(spec: JobSpec, uri: str, hosts: set[str] | None = None) -> None:
    """On a cluster of several hosts (the live Ray nodes' addresses, unless given), a local MLflow store
    would split the records across machines: refuse it before anything runs. The output directory must
    then be storage every host mounts."""
    if hosts is None:
        import ray

        hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    if len(hosts) < 2:
        return
    if not uri.startswith(("http://", "https://", "databricks", "postgresql", "mysql")):
        raise SpecError("job", [f"tracking.tracking_uri: {redact(uri)} is a store on this machine, but the Ray cluster "
                                f"spans {len(hosts)} hosts and workers log from theirs: run an MLflow server (cluster.yaml "
                                "starts one on the head) and set tracking.tracking_uri: http://HEAD:5000"])
    if not is_uri(spec.output_dir):
        print(f"note: {len(hosts)} hosts; output_dir {spec.output_dir} must be storage every host mounts (NFS, EFS) "
              "or an object-store URI", flush=True)


def fit_interruptibly(trainer):
    """`trainer.fit()` in a helper thread, the main thread waiting where Python can run signal
    handlers: a blocking `ray.get` in the main thread never returns to Python, so SIGTERM (`ray job
    stop`) went unseen until the SIGKILL that follows. Raises `Stopped` on SIGTERM/SIGINT."""
    import threading

    box: dict[str, Any] = {}

    def target():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # handed to the main thread
            box["error"] = e

    thread = threading.Thread(target=target, name="fitrun-fit", daemon=True)
    with _signals_stop():
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
    if "error" in box:
        raise box["error"]
    return box["result"]


def _shutdown_ray() -> None:
    """Disconnect the driver: Ray ends the actors it owns (the Train controller and its workers)."""
    import ray

    try:
        ray.shutdown()
    except Exception as e:  # the process exits next: say so, do not mask the stop
        print(f"warning: ray.shutdown: {e}", flush=True)


def latest_checkpoint(run_dir: Location) -> Location | None:
    """The checkpoint a resume starts from: the latest one Ray Train's snapshot lists (a worker that outlived
    its driver may have written a later directory that Ray never registered) when its manifest holds, else the
    newest intact one before it, as the worker's `intact_checkpoint` picks (sizes here, hashes there)."""
    from runner.train.state import stored_checkpoint_problem

    snapshot = run_dir / CHECKPOINT_SNAPSHOT
    if not snapshot.exists():
        return None
    latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name")
    if not name or not (run_dir / name).exists():
        return None
    for candidate in [name] + [n for n in reversed(run_dir.names("checkpoint_")) if n < name]:
        if stored_checkpoint_problem(run_dir / candidate) is None:
            return run_dir / candidate
    return None


def spec_changes(saved: dict, spec: JobSpec) -> list[str]:
    """Fields that differ between the spec a run started with and `spec` (where it is tracked and the
    Ray address may change between attempts)."""
    old, new = flatten(saved), flatten(spec.to_dict())
    ignored = ("tracking.", "resources.address")
    # A field a later fitrun added, at its default, is no change: the run started without it, as that default.
    old.update({k: v for k, v in new.items() if k not in old and v == _default(spec, k)})
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if not k.startswith(ignored) and old.get(k) != new.get(k)]


def _default(spec: JobSpec, dotted: str) -> Any:
    """The declared default of the spec field at `dotted` (a section's field), or a marker that equals nothing."""
    section, _, name = dotted.partition(".")
    model = getattr(spec, section, None)
    field = type(model).model_fields.get(name) if hasattr(type(model), "model_fields") else None
    return field.default if field is not None else object()


def _predicted_peak(spec: JobSpec) -> float | None:
    """`fitrun estimate` for this job, logged beside the measured peak; never fails the job."""
    try:
        from runner.estimate.trace import estimate

        return estimate(spec).peak_gib
    except Exception as e:  # an architecture the trace cannot handle: train anyway, say so
        print(f"warning: memory estimate unavailable ({type(e).__name__}: {e})", flush=True)
        return None


def run_train(spec: JobSpec, resume: bool = True, allow_changes: bool = False) -> dict[str, Any]:
    """Run the job through a Ray Train TorchTrainer; returns the final summary metrics.

    Re-running the same job resumes it from the checkpoint Ray Train registered last, in the same
    MLflow run; a changed spec is refused (`allow_changes` accepts it and records the changes).
    SIGTERM/SIGINT mark the run KILLED and raise `Stopped`; any other failure marks it FAILED.
    """
    written = without_credentials(spec)  # the params a user sees: paths as given, not absolute
    spec = without_credentials(absolute_paths(spec))
    check_available(spec.training)
    out = Location(spec.output_dir)
    run_dir = out / "ray" / spec.name
    if (out / "DONE").exists() or not resume:  # a finished (or unwanted) run is not resumed: start over
        (out / "ray").rmtree()
        (out / "DONE").unlink()
    resume_from = latest_checkpoint(run_dir)
    changes = spec_changes(json.loads((out / SPEC_FILE).read_text()), spec) \
        if resume_from and (out / SPEC_FILE).exists() else []
    if changes and not allow_changes:
        raise ResumeRefused(changes, resume_from)
    out.mkdir()
    (out / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=1))

    uri = tracking_uri(spec.tracking)
    init_ray(spec.resources.address)
    check_cluster_resources(spec)  # before any MLflow run exists: a request no node meets would wait forever
    check_cluster_storage(spec, uri)
    logger = _open_run(spec, out, uri, resume_from, changes, written)
    predicted, fit = _estimate_said(spec, logger)
    print(f"MLflow run {logger.run_id} ({redact(uri)}); output {out}", flush=True)
    if resume_from:
        print(f"resuming from {resume_from}", flush=True)
    if waiting := waiting_for(spec):
        print(waiting, flush=True)

    result, spec, fallbacks = _fit(spec, out, uri, logger)
    summary = _finish(spec, result, out, logger, predicted)
    if fallbacks:
        summary["oom_fallbacks"] = fallbacks
    summary.update(predicted_peak_gib=predicted, **({"predicted_device_gib": fit.device_gib, "gpu": fit.card,
                                                     "card_total_gib": fit.total_gib} if fit else {}))
    return summary


MAX_OOM_FALLBACKS = 4


def _fit(spec: JobSpec, out: Location, uri: str, logger: RunLogger):
    """The Ray Train fit, again with the next configuration after each out-of-memory failure (`training.on_oom:
    fallback`). Returns (result, the spec that finished, the fallbacks taken). SIGTERM/SIGINT mark the run
    KILLED and raise `Stopped`; any other failure marks it FAILED."""
    fallbacks: list[str] = []
    while True:
        try:
            return fit_interruptibly(make_trainer(spec, spec.name, str(out / "ray"), uri, logger.run_id)), spec, fallbacks
        except Stopped as e:
            logger.end(ok=False, status="KILLED", reason=f"stopped by {e}")
            _shutdown_ray()
            raise
        except Exception as e:
            fallback = _oom_fallback(spec, e, out, len(fallbacks)) if spec.training.on_oom == "fallback" else None
            if fallback is None:
                last_line = (str(e).strip().splitlines() or [""])[-1]
                logger.end(ok=False, reason=f"{type(e).__name__}: {last_line[:300]}")
                raise
            what, spec = fallback
            fallbacks.append(what)
            logger.tags({f"fitrun.oom_fallback_{len(fallbacks)}": what, "fitrun.oom_fallbacks": str(len(fallbacks))})
            logger.text(dump_yaml(spec), f"job-oom-fallback-{len(fallbacks)}.yaml")
            (out / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=1))


def _oom_fallback(spec: JobSpec, error: Exception, out: Location, done: int) -> tuple[str, JobSpec] | None:
    """After an out-of-memory failure: the next configuration (runner/train/oom.py), said, or None (not an
    OOM, nothing left to trade, or too many fallbacks already)."""
    from runner.train.oom import is_oom, next_config

    if not is_oom(error) or done >= MAX_OOM_FALLBACKS:
        return None
    found = next_config(spec, error)
    if found is None:
        print("out of memory, and this job has nothing left to trade (every layer recomputed at micro-batch 1): it "
              "does not fit; see `fitrun estimate` and `fitrun tune`", flush=True)
        return None
    latest = latest_checkpoint(out / "ray" / spec.name)
    print(f"out of memory mid-run; training.on_oom: fallback: going on with {found[0]}, the same global batch, from "
          f"{latest.name if latest else 'the start (no checkpoint yet)'}", flush=True)
    return found


def _estimate_said(spec: JobSpec, logger: RunLogger):
    """The memory estimate before the run: logged to MLflow, said against the job's card (whole process),
    and a warning when it is over the allocator cap. Returns (predicted allocator peak GiB, the card's Fit)."""
    from runner.estimate.trace import unmodelled

    predicted = _predicted_peak(spec)
    logger.prediction(predicted, None)
    if predicted is not None and spec.resources.use_gpu and (why := unmodelled(spec)):
        print(f"note: the memory estimate is not modelled to 3% for this lever combination ({why})", flush=True)
    cap = allocator_cap_gib(spec.resources) if spec.resources.use_gpu else None
    card, catalogue = job_card(spec)
    fit = fit_on(card, catalogue, predicted, spec.compute_dtype, spec.model.quantization, workers=spec.resources.num_workers) \
        if predicted is not None and card is not None else None
    if fit:
        logger.metrics({"predicted_device_gib": fit.device_gib})
        print(f"estimate: {fit.line()}", flush=True)
    if predicted is not None and cap and predicted > cap:
        worst = " on its longest batches (unpacked data is estimated at full sequence_len)" if not spec.data.packing else ""
        print(f"warning: the memory estimate is {predicted:.1f} GiB, over the allocator cap of {cap:.2f} GiB: this job is "
              f"likely to run out of memory{worst}; `fitrun tune` finds a configuration that fits", flush=True)
    return predicted, fit


def log_model(spec: JobSpec, adapter_dir: Path, out: Location, logger: RunLogger, measured: dict[str, Any],
              winner: dict[str, Any] | None = None) -> str | None:
    """The adapter as the run's MLflow model, registered if the job asks (`tracking.registered_model_name`). A failure to log
    it warns and leaves the run's files as they are; a registration that was asked for and failed is an error."""
    if not spec.tracking.log_model:
        return None
    from runner.registry import log_adapter_model

    keep = ("tokens_per_s", "trainable_tokens_per_s", "peak_gib", "peak_device_gib", "loss", "eval_loss")
    try:
        local = None if is_uri(str(out)) else Path(str(out))
        return log_adapter_model(spec, adapter_dir, local, logger.uri, logger.run_id,
                                 {k: measured[k] for k in keep if k in measured}, spec.tracking.registered_model_name, winner)
    except Exception as e:
        if spec.tracking.registered_model_name:
            raise
        print(f"warning: the adapter was not logged as an MLflow model ({type(e).__name__}: {str(e)[-300:]}); "
              f"its files are in {out / 'adapter'} and in the run's artifacts", flush=True)
        return None


def sync(output_dir: str) -> int:
    """`fitrun sync OUTPUT_DIR`: deliver what a job kept while its tracking server was away (its outbox), in
    order. Returns how many records are still pending (0: all delivered)."""
    out = Path(output_dir)
    spec_file, run_id_file, outbox = out / SPEC_FILE, out / "mlflow_run_id", outbox_path(str(out))
    if not (spec_file.is_file() and run_id_file.is_file()):
        raise SpecError(str(output_dir), [f"no job here: expected {spec_file} and {run_id_file}, as `fitrun train` "
                                          "writes them into its output_dir"])
    spec = job_from_dict(json.loads(spec_file.read_text()), str(spec_file))
    logger = RunLogger(tracking_uri(spec.tracking), run_id_file.read_text().strip(), outbox, spec.tracking.retry_every_s)
    before = logger.pending()
    logger.flush(force=True)
    left = logger.pending()
    print(f"MLflow run {logger.run_id}: {before - left} record(s) delivered, {left} pending"
          + (f" (the server at {redact(logger.uri)} does not answer; run this again later)" if left else ""))
    return left


class ResumeRefused(Exception):
    def __init__(self, changes: list[str], checkpoint: Location):
        self.changes = changes
        lines = "\n".join(f"  - {c}" for c in changes)
        super().__init__(f"the spec changed since {checkpoint.name} was saved; resuming would mix two jobs:\n{lines}\n"
                         "Re-run with --allow-changes to resume anyway (recorded in MLflow), or --no-resume to start over.")


def _open_run(spec: JobSpec, out: Location, uri: str, resume_from: Location | None, changes: list[str],
              written: JobSpec) -> RunLogger:
    """The job's one MLflow run: the existing one when resuming (a run its dead driver left RUNNING is
    marked as recovered), else a new one; a run with nothing to resume from is closed as KILLED."""
    run_id_file = out / "mlflow_run_id"
    outbox = outbox_path(str(out))
    old = RunLogger(uri, run_id_file.read_text().strip(), outbox, spec.tracking.retry_every_s) \
        if run_id_file.exists() else None
    if old is not None and resume_from:
        if old.status() == "RUNNING":
            old.tags({"fitrun.recovered": "the previous driver died without closing this run; resumed from "
                                          f"{resume_from.name}"})
            print(f"MLflow run {old.run_id} was left RUNNING by a driver that died; resuming it", flush=True)
        old.reopen()
        if changes:
            old.tags({"fitrun.changes_on_resume": "; ".join(changes)[:5000]})
        old.text(dump_yaml(spec), f"job-resumed-{resume_from.name}.yaml" if changes else "job.yaml")
        return old
    if old is not None and old.status() == "RUNNING":
        old.end(ok=False, status="KILLED", reason="stopped before its first checkpoint; a new run started over")
    run_id = start_run(uri, spec.tracking.experiment_name, spec.tracking.run_name or spec.name,
                       params=written.to_dict(), tags={"fitrun.kind": "train"})
    run_id_file.write_text(run_id)
    logger = RunLogger(uri, run_id, outbox, spec.tracking.retry_every_s)
    logger.text(dump_yaml(spec), "job.yaml")
    return logger


def _finish(spec: JobSpec, result, out: Location, logger: RunLogger, predicted: float | None) -> dict[str, Any]:
    summary = dict(result.metrics)  # the worker's final report (it carries the final checkpoint)
    adapter = out / "adapter"
    logger.prediction(predicted, summary["peak_gib"])  # the worker's peak: reserved on GPU, tensor bytes on CPU
    with result.checkpoint.as_directory() as final:  # a local copy, also of a checkpoint in an object store
        adapter.upload(Path(final) / "adapter")
        # From the output folder when it is local: it outlives this block, should the upload wait for the server.
        logger.artifacts(str(adapter) if not is_uri(str(out)) else Path(final) / "adapter", "adapter")
        model_uri = log_model(spec, Path(final) / "adapter", out, logger, summary) if logger.flush() else None
    logger.end(ok=True)
    if pending := logger.pending():
        print(f"warning: MLflow at {redact(logger.uri)} still does not answer: {pending} record(s) of this run (its "
              f"last steps, adapter and end) wait in {logger.outbox.path}; `fitrun sync {out}` delivers them. The "
              "adapter's MLflow model was not logged.", flush=True)
    print(f"MLflow: {logger.runs_link()}", flush=True)
    if model_uri:
        summary["mlflow_model_uri"] = model_uri
    (out / "DONE").write_text(json.dumps(summary))
    summary["adapter_dir"] = str(adapter)
    summary["mlflow_run_id"] = logger.run_id
    return summary
