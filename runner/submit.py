"""Ray Jobs: submit a job (or a search) to a running Ray cluster, then status, logs and stop.

The working directory is uploaded without outputs, virtualenvs, caches or MLflow stores; relative
output and tracking paths are made absolute (the job's driver runs in a temporary copy of the
working directory, so a relative path would vanish with it). Token auth: the token comes from
RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (Ray's own order) and is sent as a header,
never printed.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from runner.loading import redact
from runner.spec import JobSpec, SpecError
from runner.storage import absolute
from runner.tracking import CREDENTIAL_ENV, tracking_uri, without_credentials

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# gitignore syntax, relative to the working directory (Ray's runtime_env `excludes`).
UPLOAD_EXCLUDES = ["/outputs/", ".venv/", "venv/", "mlruns/", "mlartifacts/", "mlflow.db", "*.db", "__pycache__/",
                   ".git/", "*.egg-info/", ".pytest_cache/", ".device/", ".whl/"]
# Ray's job supervisor waits this long after SIGTERM before SIGKILL: time for the driver to mark its
# MLflow run KILLED and for Ray Train to shut its workers down (Ray's default is 3 s).
STOP_WAIT_S = "60"
PASSED_ENV = ("HF_HUB_OFFLINE", "HF_ENDPOINT", "MLFLOW_TRACKING_TOKEN", *CREDENTIAL_ENV)


def auth_token() -> str | None:
    """Ray's lookup order: RAY_AUTH_TOKEN, then the file RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    return path.read_text().strip() or None if path.is_file() else None


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    address = dashboard_address(address)
    token = auth_token() if os.environ.get("RAY_AUTH_MODE", "token") != "disabled" else None
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except ConnectionError:
        raise SpecError("--address", [f"{address}: no Ray dashboard answers there; start the head (`ray start --head`) "
                                      "or pass its dashboard, http://HEAD:8265"]) from None
    except Exception as e:  # Ray's AuthenticationError: the token is missing or not the cluster's
        if "Authentication" not in type(e).__name__:
            raise
        raise SpecError("--address", [f"{address}: the cluster refused the token ({type(e).__name__}); set "
                                      "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token"]) from None


def durable_overrides(job: JobSpec) -> list[str]:
    """`--set` overrides that pin where a submitted job writes: absolute paths, as this machine sees them
    (a relative path would land in the job's temporary copy of the working directory)."""
    return ["--set", f"output_dir={absolute(job.resolved_output_dir())}",
            "--set", f"tracking.tracking_uri={tracking_uri(job.tracking)}"]


def submit(job_path: str, job: JobSpec, overrides: list[str], address: str | None, space: str | None = None,
           extra: list[str] = ()) -> str:
    """Submit `fitrun train` (or `fitrun tune` with `space`) as a Ray job; returns its submission id."""
    job = without_credentials(job)  # a URI's user:password travel as MLflow's variables, not on the command line
    command = ["python", "-m", "runner", "tune" if space else "train", job_path, *([space] if space else [])]
    for item in overrides:  # where outputs and tracking go is pinned below (and may hold credentials)
        if not item.startswith(("output_dir=", "tracking.tracking_uri=")):
            command += ["--set", item]
    command += durable_overrides(job) + list(extra)
    submission_id = f"fitrun-{job.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    from runner.train.driver import worker_env

    env = {**worker_env(), "RAY_JOB_STOP_WAIT_TIME_S": STOP_WAIT_S, "FITRUN_PROGRESS": "0",
           **{k: os.environ[k] for k in PASSED_ENV if k in os.environ}}
    c = client(address)
    with tempfile.TemporaryDirectory(prefix="fitrun-upload-") as snap:
        snapshot(Path.cwd(), Path(snap))  # files written meanwhile (this submit's own log) cannot break the upload
        retrying(lambda: c.submit_job(entrypoint=shlex.join(command), submission_id=submission_id,
                                      runtime_env={"working_dir": snap, "excludes": UPLOAD_EXCLUDES, "env_vars": env},
                                      metadata={"fitrun_job": job.name}),
                 f"submit to {dashboard_address(address)}")
    remember(submission_id, dashboard_address(address))
    out = absolute(job.resolved_output_dir())
    print(f"submitted {submission_id}\n"
          f"  entrypoint: {redact(shlex.join(command))}\n"
          f"  outputs (adapter, checkpoints): {out}  (a URI, or a path on the cluster's nodes: shared storage on a "
          "multi-node cluster)\n"
          f"  follow: fitrun logs {submission_id} --follow; stop: fitrun stop {submission_id}", flush=True)
    return submission_id


def snapshot(source: Path, dest: Path) -> int:
    """Copy the working directory, less what the upload excludes (UPLOAD_EXCLUDES and the root .gitignore, as
    Ray reads them), into `dest`: Ray hashes and zips the copy, so a file growing or vanishing meanwhile (a log
    being written, an open SQLite store) is taken as it was or not at all. Returns the files copied."""
    import shutil

    from ray._private.thirdparty.pathspec import PathSpec

    lines = list(UPLOAD_EXCLUDES)
    if (source / ".gitignore").is_file():
        lines += (source / ".gitignore").read_text().splitlines()
    spec, copied = PathSpec.from_lines("gitwildmatch", lines), 0
    for folder, dirs, files in os.walk(source):
        rel = Path(folder).relative_to(source)
        dirs[:] = [d for d in dirs if not spec.match_file(f"{(rel / d).as_posix()}/")]
        for name in files:
            path = (rel / name).as_posix()
            if spec.match_file(path) or not (Path(folder) / name).is_file():
                continue
            (dest / rel).mkdir(parents=True, exist_ok=True)
            try:
                shutil.copy2(Path(folder) / name, dest / rel / name)
                copied += 1
            except FileNotFoundError:  # deleted while we walked: not part of the snapshot
                pass
    return copied


TRANSIENT = ("No available agent", "status code 500", "status code 502", "status code 503", "status code 504")


def retrying(call, what: str, attempts: int | None = None, first_wait_s: float | None = None):
    """`call()`, retried with a doubling wait when Ray's dashboard answers a transient error (its job agent
    not up yet, a 5xx, a dropped connection); the last failure is one clear error (exit 2), not a traceback."""
    attempts = attempts or int(os.environ.get("FITRUN_SUBMIT_ATTEMPTS", "6"))
    wait = first_wait_s if first_wait_s is not None else float(os.environ.get("FITRUN_SUBMIT_RETRY_S", "2"))
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except (RuntimeError, ConnectionError) as e:
            message = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            if not (isinstance(e, ConnectionError) or any(t in str(e) for t in TRANSIENT)):
                raise
            if attempt == attempts:
                raise SpecError(what, [f"the Ray cluster did not accept it after {attempts} tries: {message[:300]} (its "
                                       "dashboard agent may still be starting, or the head is overloaded: try again in a "
                                       "minute; `ray status` on the head shows its state)"]) from None
            print(f"{what}: {message[:200]}; retrying in {wait:g} s ({attempt}/{attempts})", flush=True)
            time.sleep(wait)
            wait = min(wait * 2, 30)


def _submitted_file() -> Path:
    """Where `fitrun submit` records the dashboard each job went to (FITRUN_STATE_DIR, default ~/.fitrun)."""
    return Path(os.environ.get("FITRUN_STATE_DIR") or Path.home() / ".fitrun").expanduser() / "submitted.json"


def remember(submission_id: str, address: str) -> None:
    path = _submitted_file()
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
        known[submission_id] = address
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(known, indent=1))
    except (OSError, ValueError) as e:  # a record we cannot keep costs only the --address later
        print(f"warning: could not record where {submission_id} went ({e}); pass --address to status/logs/stop")


def dashboard_address(address: str | None, submission_id: str | None = None) -> str:
    """`--address`, else where `fitrun submit` sent this job, else Ray's environment variables, else the
    local default."""
    if address:
        return address
    if submission_id:
        try:
            recorded = json.loads(_submitted_file().read_text()).get(submission_id)
        except (OSError, ValueError):
            recorded = None
        if recorded:
            return recorded
    return os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def _known(c, submission_id: str, address: str | None):
    """The job's info; an id the cluster does not know is one clear error (Ray answers 404 with a traceback)."""
    try:
        return retrying(lambda: c.get_job_info(submission_id), f"job {submission_id}")
    except RuntimeError as e:
        if "404" not in str(e) and "does not exist" not in str(e):
            raise
        raise SpecError(submission_id, [f"no job {submission_id!r} on the cluster at {dashboard_address(address)}: "
                                        "check the id `fitrun submit` printed, and --address"]) from None


def status(submission_id: str, address: str | None, reason: bool = False) -> str:
    """The job's state; with `reason`, a FAILED job's cause as Ray gives it on a second line (a job that failed
    before its driver started, its runtime env or upload, has it nowhere else: its logs are empty)."""
    address = dashboard_address(address, submission_id)
    info = _known(client(address), submission_id, address)
    state = str(info.status.value if hasattr(info.status, "value") else info.status)
    if reason and state == "FAILED" and info.message:
        return f"{state}\n  Ray says: {_ray_says(info)}"
    return state


def _ray_says(info) -> str:
    """Ray's own message on a job (its last 2,000 characters: a runtime-env failure carries a traceback)."""
    return info.message.strip()[-2000:]


def logs(submission_id: str, address: str | None, follow: bool) -> None:
    address = dashboard_address(address, submission_id)
    c = client(address)
    info = _known(c, submission_id, address)
    if not follow:
        text = c.get_job_logs(submission_id)
        sys.stdout.write(text)
        if not text.strip() and info.message:
            print(f"(no output from the job itself) Ray says: {_ray_says(info)}")
        return

    async def tail():
        async for chunk in c.tail_job_logs(submission_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())


def stop(submission_id: str, address: str | None, timeout_s: float = 180) -> str:
    """Ask Ray to stop the job (SIGTERM to its driver), then wait until Ray reports it ended."""
    address = dashboard_address(address, submission_id)
    c = client(address)
    _known(c, submission_id, address)
    c.stop_job(submission_id)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = status(submission_id, address)
        if state in ("STOPPED", "SUCCEEDED", "FAILED"):
            return state
        time.sleep(1)
    return status(submission_id, address)
