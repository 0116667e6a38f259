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


class RunLogger:
    """Rank-0 logging into an existing run from any process (Ray worker, Tune trial, driver)."""

    def __init__(self, uri: str, run_id: str):
        self.client = open_store(uri)
        self.uri, self.run_id = uri, run_id

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
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in values.items() if v is not None]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def prediction(self, predicted_gib: float | None, measured_gib: float | None) -> None:
        """The estimate beside the measurement: `predicted_peak_gib` and, once measured, its error."""
        if predicted_gib is None:
            return
        self.metrics({"predicted_peak_gib": predicted_gib})
        if measured_gib:
            self.metrics({"estimate_error_pct": (predicted_gib - measured_gib) / measured_gib * 100})

    def tags(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self.client.set_tag(self.run_id, k, str(v))

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
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def figure(self, fig, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, fig, artifact_file, save_kwargs={"dpi": 110, "bbox_inches": "tight"})

    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status

    def rename(self, run_name: str) -> None:
        """The run's name: the one column of the runs table a user sees without configuring it."""
        self.client.update_run(self.run_id, name=run_name)

    def runs_link(self) -> str:
        """Where a user opens this run's experiment on its runs (`ui_link`)."""
        return ui_link(self.uri, self.client.get_run(self.run_id).info.experiment_id)

    def reopen(self) -> None:
        """Mark an ended run RUNNING again: a resumed job or search goes on logging into it."""
        self.client.update_run(self.run_id, status="RUNNING")

    def latest_metrics(self) -> dict[str, float]:
        """The run's metrics, each at its latest value."""
        return dict(self.client.get_run(self.run_id).data.metrics)

    def last_step(self, metric: str) -> int:
        """The highest step already logged for `metric` (0 if none): a resumed run logs after it."""
        return max((m.step for m in self.client.get_metric_history(self.run_id, metric)), default=0)

    def end(self, ok: bool, status: str | None = None, reason: str | None = None) -> None:
        """FINISHED if ok, else `status` (FAILED unless given, e.g. KILLED), with the reason as a tag."""
        if reason:
            self.client.set_tag(self.run_id, "fitrun.end_reason", redact(reason)[:5000])
        status = status or RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
        self.client.set_terminated(self.run_id, status=status)
