"""MLflow: one run per job (or per trial, nested under a search's parent run), params = the resolved
spec flattened, metrics per step, artifacts = resolved spec YAML, adapter, plots, tables."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from filelock import FileLock
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from runner.loading import flatten, redact
from runner.spec import TrackingSpec
from runner.storage import is_uri

PARAM_MAX_CHARS = 6000


CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """`http://user:pw@host/...` -> (`http://host/...`, {MLFLOW_TRACKING_USERNAME: user, ..._PASSWORD: pw})."""
    parts = urlsplit(uri)
    if not (parts.username or parts.password):
        return uri, {}
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    env = {k: unquote(v) for k, v in zip(CREDENTIAL_ENV, (parts.username, parts.password)) if v}
    return urlunsplit(parts._replace(netloc=host)), env


def without_credentials(spec):
    """The job with credentials moved from its tracking URI into MLflow's own environment variables
    (MLFLOW_TRACKING_USERNAME/PASSWORD), so no param, artifact, log line or error message holds them."""
    if not spec.tracking.tracking_uri:
        return spec
    clean, env = split_credentials(spec.tracking.tracking_uri)
    for k, v in env.items():
        os.environ.setdefault(k, v)
    return spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"tracking_uri": clean})})


def _sqlite_db(uri: str) -> Path | None:
    """The database file of a `sqlite:///` store URI, absolute; None for any other store."""
    return Path(uri.removeprefix("sqlite:///")).absolute() if uri.startswith("sqlite:///") else None


def tracking_uri(spec: TrackingSpec) -> str:
    """The spec's URI, else MLflow's own default (sqlite:///mlflow.db) made absolute for Ray workers."""
    uri = split_credentials(spec.tracking_uri)[0] if spec.tracking_uri else "sqlite:///mlflow.db"
    db = _sqlite_db(uri)
    return f"sqlite:///{db}" if db else uri


def local_artifact_root(uri: str) -> str | None:
    """For a SQLite store, `mlruns/` beside the database file (MLflow's default is the current
    directory, which for a Ray job is a temporary copy of the working dir)."""
    db = _sqlite_db(uri)
    return str(db.parent / "mlruns") if db else None


_READY_STORES: set[str] = set()


def open_store(uri: str) -> MlflowClient:
    """An MlflowClient for `uri`. A new SQLite store gets its tables from whichever process touches it
    first, and two processes doing that at once (two jobs started together in one folder) break each
    other's schema migrations; so each process's first touch of a SQLite store holds a lock file
    beside the database (`.mlflow.db.lock`)."""
    db = _sqlite_db(uri)
    if db is None or uri in _READY_STORES:
        return MlflowClient(uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(db.parent / f".{db.name}.lock"):
        c = MlflowClient(uri)
        c.search_experiments(max_results=1)  # creates or migrates the schema, if MlflowClient() did not
    _READY_STORES.add(uri)
    return c


# MLflow 3 opens an experiment on the view its kind asks for; an untagged one opens on the GenAI overview
# (traces, latency, token usage), not on its runs. "finetuning" is one of the machine-learning kinds.
EXPERIMENT_KIND = {"mlflow.experimentKind": "finetuning"}


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, created (tagged as a fine-tuning experiment) if it does not exist."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=local_artifact_root(client.tracking_uri),
                                            tags=EXPERIMENT_KIND)
        except MlflowException:  # another job created it a moment ago
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    remote = client.tracking_uri.startswith(("http://", "https://"))
    if remote and not exp.artifact_location.startswith(("mlflow-artifacts:", "s3:", "gs:", "wasbs:", "hdfs:")):
        raise ValueError(f"MLflow experiment {name!r} keeps its artifacts at {exp.artifact_location}, a path on "
                         "whichever machine logs them (it was created against a local store): set "
                         "tracking.experiment_name to a new experiment, which the server creates with its own "
                         "artifact store")
    if not exp.tags.get("mlflow.experimentKind"):  # made by an older fitrun, or by hand: leave a user's kind alone
        for k, v in EXPERIMENT_KIND.items():
            client.set_experiment_tag(exp.experiment_id, k, v)
    return exp.experiment_id


def start_run(uri: str, experiment: str, run_name: str, params: dict[str, Any] | None = None,
              tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> str:
    client = open_store(uri)
    tags = dict(tags or {})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id  # nests the run under its parent in the UI
    run = client.create_run(experiment_id(client, experiment), run_name=run_name, tags=tags)
    if params:
        log_params(uri, run.info.run_id, params)
    return run.info.run_id


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    flat = flatten(params)
    items = [Param(k, str(v)[:PARAM_MAX_CHARS]) for k, v in flat.items()]
    open_store(uri).log_batch(run_id, params=items)  # the client splits it into the store's batch limits


def find_run(uri: str, experiment: str, filter_string: str) -> str | None:
    client = open_store(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def find_child(uri: str, experiment: str, parent_id: str, tags: dict[str, str], status: str | None = None) -> str | None:
    """The newest child of `parent_id` with these tags (and this status, when given), or None."""
    clauses = [f"tags.mlflow.parentRunId = '{parent_id}'", *(f"tags.{k} = '{v}'" for k, v in tags.items())]
    if status:
        clauses.append(f"attributes.status = '{status}'")
    return find_run(uri, experiment, " and ".join(clauses))


def ui_link(uri: str, exp_id: str) -> str:
    """The experiment's runs table in the MLflow UI. MLflow 3.17 opens an experiment on the view of its global
    GenAI / Model-training switch (GenAI's overview by default), whatever the experiment's kind; the link names
    the model-training view. A local store needs `mlflow ui` started on it first: the line says how."""
    page = f"#/experiments/{exp_id}/runs?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"{redact(uri).rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri}  ->  http://127.0.0.1:5000/{page}"


OUTBOX_FILE = "mlflow-pending.jsonl"
OUTBOX_MAX_ENTRIES = 200_000     # about 60 MB of step metrics; beyond it new metrics are dropped and counted
RETRY_EVERY_S = TrackingSpec.model_fields["retry_every_s"].default  # tracking.retry_every_s unless a job says


# MLflow's client retries a call 7 times with backoff (minutes) before it fails: a training step would wait that
# long for a server that is away. fitrun's calls retry once; the record then waits in the job's outbox.
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def fail_fast() -> dict[str, str]:
    """Set (where the user has not) and return the MLflow client settings of FAIL_FAST, for Ray workers too."""
    for k, v in FAIL_FAST.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in FAIL_FAST}


def unreachable(e: BaseException) -> bool:
    """The tracking server did not answer (refused, timed out, 5xx): worth keeping the record for later."""
    import requests

    text = str(e)
    return isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)) or (
        isinstance(e, MlflowException) and ("failed with exception" in text or "Max retries exceeded" in text
                                            or any(f"error code {c}" in text for c in (500, 502, 503, 504))))


def outbox_path(output_dir: str) -> Path | None:
    """Where a job keeps what its tracking server could not take: in its output folder, when that is local."""
    return None if is_uri(str(output_dir)) else Path(output_dir) / OUTBOX_FILE


class Outbox:
    """What a run could not deliver while its tracking server was away: JSON lines on disk (under the job's
    output_dir), in order, bounded; shared by the worker and the driver of one job through a lock file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = FileLock(str(self.path) + ".lock")
        self.dropped = 0
        self._count: int | None = None  # lines in the file, counted once: `add` runs every step of an outage

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        import json

        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def add(self, entry: dict) -> None:
        import json

        with self.lock:
            if self._count is None:
                self._count = sum(1 for _ in self.path.open()) if self.path.exists() else 0
            if entry["kind"] == "metrics" and self._count >= OUTBOX_MAX_ENTRIES:
                if not self.dropped:
                    print(f"warning: {self.path} holds {OUTBOX_MAX_ENTRIES:,} records: step metrics from here on are "
                          "dropped until MLflow answers", flush=True)
                self.dropped += 1
                return
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")
            self._count += 1

    def rewrite(self, entries: list[dict]) -> None:
        import json

        if entries:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(e) + "\n" for e in entries))
            tmp.replace(self.path)
        else:
            self.path.unlink(missing_ok=True)
        self._count = len(entries)


class RunLogger:
    """Rank-0 logging into an existing run from any process (Ray worker, Tune trial, driver). With an outbox,
    a tracking server that goes away never stops training: metrics, tags, artifacts and the run's end wait on
    disk and are delivered in order when it answers again (or by `fitrun sync OUTPUT_DIR`)."""

    def __init__(self, uri: str, run_id: str, outbox: Path | None = None, retry_every_s: float = RETRY_EVERY_S):
        self.client = open_store(uri)
        self.retry_every_s = retry_every_s
        self.uri, self.run_id = uri, run_id
        self.outbox = Outbox(outbox) if outbox else None
        if outbox:
            fail_fast()
        self._next_try = 0.0
        self._said_away = False

    def _send(self, entry: dict) -> None:
        """Deliver now, or keep it for later (behind anything already pending: the order holds)."""
        if self.outbox is None:
            return self._deliver(entry)
        if self.outbox.path.exists() and not self.flush():
            self.outbox.add(entry)
            return
        try:
            self._deliver(entry)
        except Exception as e:
            if not unreachable(e):
                raise
            self._away(e)
            self.outbox.add(entry)

    def _away(self, e: BaseException) -> None:
        self._next_try = time.monotonic() + self.retry_every_s
        if not self._said_away:
            self._said_away = True
            print(f"warning: MLflow at {redact(self.uri)} does not answer ({type(e).__name__}); training goes on, and "
                  f"its records wait in {self.outbox.path} until it does", flush=True)

    def _deliver(self, entry: dict) -> None:
        kind = entry["kind"]
        if kind == "metrics":
            batch = [Metric(k, float(v), entry["ts"], entry["step"]) for k, v in entry["values"].items()]
            self.client.log_batch(self.run_id, metrics=batch)
        elif kind == "tags":
            for k, v in entry["values"].items():
                self.client.set_tag(self.run_id, k, v)
        elif kind == "artifacts":
            self.client.log_artifacts(self.run_id, entry["local_dir"], entry["path"])
        elif kind == "end":
            self.client.set_terminated(self.run_id, status=entry["status"])

    def flush(self, force: bool = False) -> bool:
        """Deliver what waits in the outbox, oldest first; True when nothing is left. While the server is away,
        one attempt per `retry_every_s` (`force`: now)."""
        if self.outbox is None or not self.outbox.path.exists():
            return True
        if not force and time.monotonic() < self._next_try:
            return False
        with self.outbox.lock:
            entries = self.outbox.entries()
            for i, entry in enumerate(entries):
                try:
                    self._deliver(entry)
                except Exception as e:
                    if not unreachable(e):
                        raise
                    self.outbox.rewrite(entries[i:])
                    self._away(e)
                    return False
            self.outbox.rewrite([])
        if self._said_away:
            print(f"MLflow at {redact(self.uri)} answers again: {len(entries)} pending record(s) delivered", flush=True)
            self._said_away = False
        return True

    def pending(self) -> int:
        return len(self.outbox.entries()) if self.outbox else 0

    def system_metrics(self, interval_s: float = 5.0):
        """Start MLflow's system-metrics sampler for this run in this process: CPU, memory, disk,
        network and, where nvidia-ml-py is installed (the gpu extra), GPU utilisation and memory, as
        `system/*` metrics. Returns the monitor (call `.finish()`), or None where it cannot start."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, resume_logging=True,
                                           tracking_uri=self.uri)
            monitor.start()
            return monitor
        except Exception as e:  # never a reason to fail a training run
            print(f"warning: system metrics unavailable ({type(e).__name__}: {e})", flush=True)
            return None

    @staticmethod
    def finish_system_metrics(monitor) -> None:
        """Stop the sampler; a run shorter than one interval still gets one sample."""
        try:
            monitor.finish()
            if monitor._logging_step == 0:
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
        except Exception as e:
            print(f"warning: system metrics: {type(e).__name__}: {e}", flush=True)

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        values = {k: float(v) for k, v in values.items() if v is not None}
        if values:
            self._send({"kind": "metrics", "values": values, "step": step or 0, "ts": int(time.time() * 1000)})

    def prediction(self, predicted_gib: float | None, measured_gib: float | None) -> None:
        """The estimate beside the measurement: `predicted_peak_gib` and, once measured, its error."""
        if predicted_gib is None:
            return
        self.metrics({"predicted_peak_gib": predicted_gib})
        if measured_gib:
            self.metrics({"estimate_error_pct": (predicted_gib - measured_gib) / measured_gib * 100})

    def tags(self, values: dict[str, Any]) -> None:
        self._send({"kind": "tags", "values": {k: str(v) for k, v in values.items()}})

    def text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def dataset(self, name: str, digest: str, source: str, profile: dict, context: str = "train") -> None:
        """The run's input dataset (MLflow's Datasets tab): name, content digest, source, accounting."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = Dataset(name=name, digest=digest, source_type="local" if "://" not in source else "uri",
                     source=json.dumps({"uri": redact(source)}), profile=json.dumps(profile))
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(ds, [InputTag("mlflow.data.context", context)])])

    def table(self, columns: dict[str, list], artifact_file: str) -> None:
        self.client.log_table(self.run_id, data=columns, artifact_file=artifact_file)

    def artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        """A folder's files (kept for later, if the server is away: `local_dir` must then still exist)."""
        self._send({"kind": "artifacts", "local_dir": str(local_dir), "path": artifact_path})

    def figure(self, fig, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, fig, artifact_file, save_kwargs={"dpi": 110, "bbox_inches": "tight"})

    def status(self) -> str:
        """RUNNING, FINISHED, ...; UNKNOWN while the server is away (with an outbox)."""
        try:
            return self.client.get_run(self.run_id).info.status
        except Exception as e:
            if self.outbox is None or not unreachable(e):
                raise
            return "UNKNOWN"

    def rename(self, run_name: str) -> None:
        """The run's name: the one column of the runs table a user sees without configuring it."""
        self.client.update_run(self.run_id, name=run_name)

    def runs_link(self) -> str:
        """Where a user opens this run's experiment on its runs (`ui_link`)."""
        try:
            return ui_link(self.uri, self.client.get_run(self.run_id).info.experiment_id)
        except Exception as e:
            if not unreachable(e):
                raise
            return f"{redact(self.uri)} (not answering now)"

    def reopen(self) -> None:
        """Mark an ended run RUNNING again: a resumed job or search goes on logging into it."""
        self.client.update_run(self.run_id, status="RUNNING")

    def latest_metrics(self) -> dict[str, float]:
        """The run's metrics, each at its latest value."""
        return dict(self.client.get_run(self.run_id).data.metrics)

    def last_step(self, metric: str) -> int:
        """The highest step already logged for `metric` (0 if none), pending ones included: a resumed run logs
        after it."""
        pending = [e["step"] for e in (self.outbox.entries() if self.outbox else [])
                   if e["kind"] == "metrics" and metric in e["values"]]
        try:
            logged = [m.step for m in self.client.get_metric_history(self.run_id, metric)]
        except Exception as e:
            if self.outbox is None or not unreachable(e):
                raise
            logged = []
        return max(logged + pending, default=0)

    def end(self, ok: bool, status: str | None = None, reason: str | None = None) -> None:
        """FINISHED if ok, else `status` (FAILED unless given, e.g. KILLED), with the reason as a tag."""
        if reason:
            self.tags({"fitrun.end_reason": redact(reason)[:5000]})
        status = status or RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
        self._send({"kind": "end", "status": status})
