"""Issue 26: a worker node lost mid-run, or preempted with notice, on a real multi-node Ray cluster on this
machine: a head that runs no training (0 CPUs) and two worker nodes of 1 CPU each, token auth on, each node
under its own --temp-dir and stopped by PID. The job's one worker lands on either node; the test then
takes that node away, and the run must finish on the other one, in one MLflow run, each step logged once."""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
from test_cluster import _answers, _free_ports, _head, _start_node, _stop_node, logged_steps, the_run, tiny, wait_for_line

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture()
def three_nodes(tmp_path):
    """(gcs address, env, {node temp dir: its `ray start` process}) for a head of 0 CPUs and two 1-CPU nodes."""
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "FITRUN_PROGRESS": "0",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    temps = [tempfile.mkdtemp(prefix="r", dir="/tmp") for _ in range(3)]
    head, gcs, url = _head(ray, temps[0])
    head = [a if a != "--num-cpus=1" else "--num-cpus=0" for a in head]
    nodes: dict[str, subprocess.Popen] = {}
    try:
        nodes[temps[0]] = _start_node(head, env, tmp_path / "head.log", lambda: _answers(f"{url}/api/version"))
        for i, temp in enumerate(temps[1:], 1):
            ports = _free_ports(4)
            node = [ray, "start", f"--address=127.0.0.1:{gcs}", f"--temp-dir={temp}",
                    f"--dashboard-agent-listen-port={ports[0]}", f"--metrics-export-port={ports[1]}",
                    f"--runtime-env-agent-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
                    "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
            nodes[temp] = _start_node(node, env, tmp_path / f"node{i}.log", lambda t=temp: any(
                os.path.exists(p) for p in glob.glob(f"{t}/session_*/sockets/raylet")))
        yield f"127.0.0.1:{gcs}", env, nodes
    finally:
        for temp, proc in reversed(list(nodes.items())):
            _stop_node(proc, temp)
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)


def _node_of(pid: int, nodes: dict[str, subprocess.Popen]) -> str:
    """The temp dir of the node whose processes include `pid` (a Ray worker is a child of its node's raylet)."""
    for temp, proc in nodes.items():
        if pid in {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}:
            return temp
    raise AssertionError(f"worker pid {pid} is on none of this test's nodes")


def _start(root, tmp_path, address, env, *extra, steps: int = 24):
    args = tiny(tmp_path, "--set", f"resources.address={address}", "--set", f"training.max_steps={steps}",
                "--set", "training.logging_steps=1", "--set", "training.eval_steps=null", *extra)
    return subprocess.Popen([sys.executable, "-m", "runner", "train", *args], cwd=root, text=True,
                            env={**env, "FITRUN_STEP_DELAY_S": "0.3"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _worker(seen: list[str]) -> tuple[int, str]:
    pid, node_id = re.search(r"worker pid (\d+) \(.*\) on node (\w+)", seen[-1]).groups()
    return int(pid), node_id


def _finished_elsewhere(proc, seen: list[str], tmp_path, gone_node: str, resumed: str, steps: int) -> None:
    """The run ended well, resumed (`resumed` names the checkpoint) on a node other than `gone_node`, in one
    FINISHED MLflow run with each of its `steps` steps logged once."""
    rest, _ = proc.communicate(timeout=600)
    log = "".join(seen) + rest
    assert proc.returncode == 0, log[-4000:]
    assert re.search(r"resumed from \S*" + resumed, log), log[-4000:]
    assert re.findall(r"worker pid \d+ \(.*\) on node (\w+)", log)[-1] != gone_node  # the other node
    client, run = the_run(tmp_path)
    assert run.info.status == "FINISHED" and logged_steps(client, run) == list(range(1, steps + 1))


def test_a_lost_worker_node_restarts_the_run_on_the_node_that_remains(root, tmp_path, three_nodes):
    address, env, nodes = three_nodes
    proc = _start(root, tmp_path, address, env, "--set", "training.save_steps=4")
    seen = wait_for_line(proc, "worker pid")
    pid, first_node = _worker(seen)
    lost = _node_of(pid, nodes)
    seen += wait_for_line(proc, "step ", min_step=10)
    raylet = next(p for p in psutil.Process(nodes[lost].pid).children(recursive=True) if "raylet" in p.name())
    raylet.send_signal(signal.SIGKILL)  # the node is gone: no notice, its workers die with its raylet
    # from the latest checkpoint Ray's controller registered (one reported just before the node died may not be)
    _finished_elsewhere(proc, seen, tmp_path, first_node, r"checkpoint_0000(04|08|12) at step (4|8|12)\b", 24)


def test_a_preemption_notice_checkpoints_and_the_run_finishes_elsewhere(root, tmp_path, three_nodes):
    """`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` with a deadline (what a spot reclaim notice becomes
    on a Ray cluster), then the node SIGTERMed once the deadline passed: the worker checkpoints at the notice
    (the job saves nowhere else), and the restart on the other node resumes from exactly that step."""
    address, env, nodes = three_nodes
    proc = _start(root, tmp_path, address, env, "--set", "training.save_steps=null", steps=60)
    seen = wait_for_line(proc, "worker pid")
    pid, node_id = _worker(seen)
    doomed = _node_of(pid, nodes)
    seen += wait_for_line(proc, "step ", min_step=4)
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    drained = subprocess.run([ray, "drain-node", f"--address={address}", f"--node-id={node_id}",
                              "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=spot reclaim",
                              "--deadline-remaining-seconds=12"], env=env, capture_output=True, text=True, timeout=60)
    deadline = time.monotonic() + 12
    assert drained.returncode == 0, drained.stdout + drained.stderr
    seen += wait_for_line(proc, "preemption notice")  # Ray Train polls drain state every 5 s
    noticed_at = int(re.search(r"saving a checkpoint at step (\d+)", seen[-1]).group(1))
    time.sleep(max(0.0, deadline - time.monotonic()) + 2)  # past the deadline: the cloud takes the machine
    _stop_node(nodes.pop(doomed), doomed)
    _finished_elsewhere(proc, seen, tmp_path, node_id, rf"checkpoint_0*{noticed_at} at step {noticed_at}\b", 60)
