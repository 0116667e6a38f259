"""fitrun on a real Ray cluster: `ray start --head` (token auth on, its own temp dir and ports) plus a
second `ray start` node on this machine. Submit, stop, kill a worker, kill the driver, resume. Each node
runs under `ray start --block`, so the teardown stops it by PID (with its children and anything under
its own --temp-dir), never by a process name and never with Ray's cluster-wide stop command."""

import glob
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import psutil
import pytest
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # end-to-end: real Ray clusters, fitrun through its CLI


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _names_dir(arg: str, directory: str) -> bool:
    """`arg` is `directory` or a path inside it, alone or as `--flag=...` (exact path components)."""
    value = arg.split("=", 1)[-1]
    return value == directory or value.startswith(directory + "/")


def _stop_node(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop one node this test started: the `ray start --block` process by its PID and every process
    below it, plus any process of its own --temp-dir that Ray detached; nothing else on the machine."""
    mine = {}
    try:
        root = psutil.Process(proc.pid)
        mine = {p.pid: p for p in [root, *root.children(recursive=True)]}
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(_names_dir(arg, temp_dir) for arg in p.info["cmdline"] or []):
                mine.setdefault(p.pid, p)
        except psutil.Error:
            continue
    mine.pop(os.getpid(), None)
    for p in mine.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(mine.values()), timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def _start_node(args: list[str], env: dict, log: str, ready) -> subprocess.Popen:
    """`ray start ... --block`: the process stays, so the node's processes are its children (stopped by
    PID); returns once `ready()` holds."""
    proc = subprocess.Popen([*args, "--block"], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not ready():
        assert proc.poll() is None, f"{args[:3]} exited: " + open(log).read()[-3000:]
        assert time.monotonic() < deadline, f"{args[:3]} not ready: " + open(log).read()[-3000:]
        time.sleep(1)
    return proc


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:
        return True  # up, even if it wants the token
    except OSError:
        return False
    return True


COMMON = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]


def _head(ray: str, temp: str) -> tuple[list[str], int, str]:
    """`ray start --head` on free ports with its own --temp-dir: (command, GCS port, dashboard URL)."""
    gcs, dashboard, client_port, *rest = _free_ports(7)
    head = [ray, "start", "--head", f"--port={gcs}", f"--temp-dir={temp}", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client_port}",
            f"--dashboard-agent-listen-port={rest[0]}", f"--metrics-export-port={rest[1]}",
            f"--runtime-env-agent-port={rest[2]}", f"--dashboard-agent-grpc-port={rest[3]}", *COMMON]
    return head, gcs, f"http://127.0.0.1:{dashboard}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head and a second node, token auth on; yields (gcs address, dashboard URL, env with the token)."""
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "FITRUN_PROGRESS": "0",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    logs = tmp_path_factory.mktemp("ray-logs")
    # Short paths: Ray's unix sockets live under them. Each node its own, as on separate machines (nodes
    # sharing one temp dir also share, and garbage-collect, each other's runtime-env files).
    temp, temp2 = tempfile.mkdtemp(prefix="r", dir="/tmp"), tempfile.mkdtemp(prefix="r", dir="/tmp")
    head, gcs, url = _head(ray, temp)
    rest = _free_ports(4)
    worker = [ray, "start", f"--address=127.0.0.1:{gcs}", f"--temp-dir={temp2}", f"--dashboard-agent-listen-port={rest[0]}",
              f"--metrics-export-port={rest[1]}", f"--runtime-env-agent-port={rest[2]}",
              f"--dashboard-agent-grpc-port={rest[3]}", *COMMON]
    nodes = []
    try:
        nodes.append((_start_node(head, env, logs / "head.log", lambda: _answers(f"{url}/api/version")), temp))
        raylet_socket = lambda: any(os.path.exists(p) for p in glob.glob(f"{temp2}/session_*/sockets/raylet"))  # noqa: E731
        nodes.append((_start_node(worker, env, logs / "worker.log", raylet_socket), temp2))
        yield f"127.0.0.1:{gcs}", url, env
    finally:
        for proc, directory in reversed(nodes):
            _stop_node(proc, directory)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(temp2, ignore_errors=True)


def fitrun(root, *args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=root, capture_output=True, text=True,
                          timeout=timeout, env=env)


def tiny(tmp_path, *extra) -> list[str]:
    return ["jobs/tiny-cpu.yaml", "--set", f"output_dir={tmp_path}/out",
            "--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", *extra]


def the_run(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("fitrun-tiny").experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]  # one MLflow run per job, across restarts
    return client, runs[0]


def logged_steps(client, run) -> list[int]:
    return [m.step for m in client.get_metric_history(run.info.run_id, "loss")]


def wait_for_line(proc, prefix: str, min_step: int = 0, timeout_s: float = 300) -> list[str]:
    """Read the process's output until a line starting with `prefix` (a step line past `min_step`)."""
    seen, deadline = [], time.monotonic() + timeout_s
    for line in proc.stdout:
        seen.append(line)
        text = re.sub(r"^(\x1b\[[0-9;]*m)?\(\w+ pid=\d+\)(\x1b\[[0-9;]*m)? ", "", line)  # Ray's worker prefix
        if text.startswith(prefix) and (not min_step or int(text.split()[1].split("/")[0]) >= min_step):
            return seen[:-1] + [text]
        assert time.monotonic() < deadline, "".join(seen[-50:])
    raise AssertionError("process ended first:\n" + "".join(seen[-80:]))


def start_16_steps(root, tmp_path, address: str, env: dict):
    """`fitrun train` of 16 logged steps, a checkpoint every 4, on the cluster; (its args, the process)."""
    args = tiny(tmp_path, "--set", f"resources.address={address}", "--set", "training.max_steps=16",
                "--set", "training.save_steps=4", "--set", "training.logging_steps=1", "--set", "training.eval_steps=null")
    proc = subprocess.Popen([sys.executable, "-m", "runner", "train", *args], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return args, proc


def test_two_workers_on_two_nodes(root, tmp_path, cluster):
    address, _, env = cluster
    out = fitrun(root, "train", *tiny(tmp_path, "--set", f"resources.address={address}", "--set",
                                      "resources.num_workers=2", "--set", "training.micro_batch_size=2", "--set",
                                      "training.max_steps=4", "--set", "training.save_steps=null", "--set",
                                      "training.logging_steps=2"), env=env)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "batch: micro 2 x accum 2 x workers 2 = global 8" in log and "world_size=2" in log
    client, run = the_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert logged_steps(client, run) == [2, 4]  # rank 0 only
    assert (tmp_path / "out/adapter/adapter_model.safetensors").exists()


def test_submit_status_logs_with_token_auth(root, tmp_path, cluster):
    _, dashboard, env = cluster
    env = {**env, "FITRUN_STATE_DIR": str(tmp_path / "state")}  # where submit records each job's cluster
    out = fitrun(root, "submit", *tiny(tmp_path, "--set", "training.max_steps=6", "--set", "training.save_steps=3",
                                       "--set", "training.logging_steps=1"),
                 "--address", dashboard, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("submitted "))
    assert str(tmp_path / "out") in out.stdout
    deadline = time.monotonic() + 400
    while (state := fitrun(root, "status", job_id, "--address", dashboard, env=env).stdout.strip()) in \
            ("PENDING", "RUNNING"):
        assert time.monotonic() < deadline
        time.sleep(3)
    logs = fitrun(root, "logs", job_id, "--address", dashboard, env=env).stdout
    assert state == "SUCCEEDED", logs[-4000:]
    # without --address: the cluster submit recorded for this id
    assert fitrun(root, "status", job_id, env=env).stdout.strip() == "SUCCEEDED"
    assert "step     6/6" in logs
    client, run = the_run(tmp_path)  # written where the job said, not in Ray's temporary working-dir copy
    assert run.info.status == "FINISHED" and logged_steps(client, run) == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "out/adapter/adapter_model.safetensors").exists()
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    no_token["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "missing")
    refused = fitrun(root, "status", job_id, "--address", dashboard, env=no_token)
    assert refused.returncode != 0  # the cluster enforces the token
    for verb in ("status", "logs", "stop"):  # an id the cluster does not know: one line, exit 2
        unknown = fitrun(root, verb, "no-such-job", "--address", dashboard, env=env)
        assert unknown.returncode == 2 and "no job 'no-such-job' on the cluster" in unknown.stderr, unknown.stderr
        assert "Traceback" not in unknown.stderr


def test_a_job_that_fails_before_its_driver_starts_says_why(root, tmp_path, cluster):
    """Issue 26: a job whose runtime env cannot be set up (here: a working-dir package the cluster does not have)
    never runs a line of its own; `fitrun status` and `fitrun logs` show Ray's reason instead of a bare FAILED."""
    from ray.job_submission import JobSubmissionClient

    _, dashboard, env = cluster
    c = JobSubmissionClient(dashboard, headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
    job_id = c.submit_job(entrypoint="python -c 'print(1)'",
                          runtime_env={"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip"})
    deadline = time.monotonic() + 120
    while (state := fitrun(root, "status", job_id, "--address", dashboard, env=env).stdout).split("\n")[0] in \
            ("PENDING", "RUNNING"):
        assert time.monotonic() < deadline
        time.sleep(2)
    assert state.startswith("FAILED\n  Ray says: ") and "_ray_pkg_0123456789abcdef" in state, state
    logs = fitrun(root, "logs", job_id, "--address", dashboard, env=env).stdout
    assert "Ray says: " in logs and "_ray_pkg_0123456789abcdef" in logs, logs


def test_stop_marks_the_run_killed(root, tmp_path, cluster):
    _, dashboard, env = cluster
    out = fitrun(root, "submit", *tiny(tmp_path, "--set", "training.max_steps=400"), "--address", dashboard, env=env)
    job_id = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("submitted "))
    deadline = time.monotonic() + 300
    while "step " not in fitrun(root, "logs", job_id, "--address", dashboard, env=env).stdout:
        assert time.monotonic() < deadline
        time.sleep(2)
    stopped = fitrun(root, "stop", job_id, "--address", dashboard, env=env)
    assert stopped.returncode == 0 and "STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    _, run = the_run(tmp_path)
    assert run.info.status == "KILLED" and run.info.end_time
    assert "SIGTERM" in run.data.tags["fitrun.end_reason"]


def test_killed_worker_restarts_from_checkpoint(root, tmp_path, cluster):
    address, _, env = cluster
    _, proc = start_16_steps(root, tmp_path, address, env)
    seen = wait_for_line(proc, "worker pid")
    pid = int(seen[-1].split()[2])
    # Ray Train's controller collects reported checkpoints by polling the workers: one reported a
    # moment before a worker dies can be lost (the restart then uses the one before). Kill well after
    # the step-4 checkpoint so a registered one exists either way.
    seen += wait_for_line(proc, "step ", min_step=10)
    os.kill(pid, signal.SIGKILL)  # a real Ray Train worker process dies mid-run
    rest, _ = proc.communicate(timeout=600)
    log = "".join(seen) + rest
    assert proc.returncode == 0, log[-4000:]
    assert "resumed from" in log  # Ray Train restarted the worker group from the latest checkpoint
    client, run = the_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert logged_steps(client, run) == list(range(1, 17))  # every step once, none beyond the last


def test_killed_driver_then_rerun_resumes_and_refuses_a_changed_spec(root, tmp_path, cluster):
    address, _, env = cluster
    args, proc = start_16_steps(root, tmp_path, address, env)
    wait_for_line(proc, "step ", min_step=9)
    proc.kill()  # SIGKILL: no handler runs, the MLflow run stays RUNNING
    proc.communicate(timeout=60)
    time.sleep(5)  # let Ray reap the dead driver's workers
    _, run = the_run(tmp_path)
    assert run.info.status == "RUNNING"

    changed = fitrun(root, "train", *args, "--set", "training.max_steps=20", env=env)
    assert changed.returncode == 2 and "training.max_steps: 16 -> 20" in changed.stderr, changed.stderr[-2000:]
    assert "Traceback" not in changed.stderr

    again = fitrun(root, "train", *args, env=env)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-4000:]
    assert "left RUNNING by a driver that died" in log
    resumed_at = json.loads((tmp_path / "out/job.resolved.json").read_text())["training"]["max_steps"]
    assert resumed_at == 16
    client, run = the_run(tmp_path)
    assert run.info.status == "FINISHED" and "fitrun.recovered" in run.data.tags
    assert logged_steps(client, run) == list(range(1, 17))


def test_a_local_job_starts_its_own_ray_beside_two_running(root, tmp_path, cluster):
    """Issue 27: with two Ray clusters already on the machine (the fixture's and one more head), a job with no
    address starts a Ray of its own: no "Found multiple active Ray instances" traceback, and it trains."""
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    head, _, url = _head(ray, temp)
    env = {k: v for k, v in cluster[2].items() if not k.startswith("RAY_AUTH")}
    proc = _start_node(head, cluster[2], tmp_path / "head.log", lambda: _answers(f"{url}/api/version"))
    try:
        env.pop("RAY_ADDRESS", None)
        out = fitrun(root, "train", *tiny(tmp_path, "--set", "training.max_steps=2", "--set", "training.eval_steps=null",
                                          "--set", "training.save_steps=null"), env=env)
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
        assert "multiple active Ray instances" not in out.stdout + out.stderr
    finally:
        _stop_node(proc, temp)
        shutil.rmtree(temp, ignore_errors=True)
