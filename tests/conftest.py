import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("FITRUN_PROGRESS", "0")  # no progress bars in test logs
# The step-time calibrations the tests measure and refit stay in this session's own folder: a user's cache (or
# another checkout's, of another fitrun version) must not steer a test's search, nor a test write into it.
os.environ["FITRUN_CACHE_DIR"] = tempfile.mkdtemp(prefix="fitrun-test-cache-")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tokenizer():
    from runner.model import build_tokenizer
    from runner.spec import ModelSpec, TokenizerSpec

    return build_tokenizer(TokenizerSpec(name_or_path=str(ROOT / "data/tokenizer")), ModelSpec(preset="tiny", init="random"))


def tiny_model(r: int = 4, num_layers: int = 4, seed: int = 0, dtype=torch.float32, adapter_dtype="float32",
               hidden_size: int | None = None):
    """The real LlamaForCausalLM with a tiny config + peft LoRA, seeded, on CPU (`hidden_size`: wider
    layers, with the MLP 2.75x as wide, as the tiny preset's)."""
    from transformers import LlamaForCausalLM

    from runner.model import preset_config, wrap_lora
    from runner.spec import LoraSpec

    cfg = preset_config("tiny")
    cfg.num_hidden_layers = num_layers
    if hidden_size:
        cfg.hidden_size, cfg.intermediate_size = hidden_size, int(hidden_size * 2.75)
        cfg.head_dim = hidden_size // cfg.num_attention_heads
    torch.manual_seed(seed)
    base = LlamaForCausalLM(cfg).to(dtype)
    model = wrap_lora(base, LoraSpec(r=r, adapter_dtype=adapter_dtype), seed)
    # Non-zero B so both A and B carry gradient information in equivalence tests.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    model.train()
    return model


def tiny_batch(batch: int = 2, seq: int = 32, seed: int = 0, vocab: int = 1024):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def measure_in_process(spec, steps: int = 3, pad_to_full: bool = False) -> tuple[float, float]:
    """(peak tensor GiB, median micro-batch seconds) of `steps` optimizer steps of `spec`, in this
    process, through the worker's own `train_step`; the peak covers steps with AdamW state."""
    from runner.data import MicroBatches, tokenize
    from runner.memory import PeakMemory
    from runner.model import build_tokenizer, build_trainable
    from runner.train.worker import train_step

    t = spec.training
    tok = build_tokenizer(spec.tokenizer, spec.model)
    data = tokenize(spec.data, tok)
    pad_to = spec.data.sequence_len if pad_to_full or not spec.data.packing else None
    batches = MicroBatches(data.train, t.micro_batch_size, tok.pad_token_id, 0, pad_to=pad_to)
    trainable = build_trainable(spec, torch.device("cpu"), len(tok))
    model, net = trainable.model, trainable.net
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    memory = PeakMemory(torch.device("cpu"), list(model.parameters()))
    peak, times = 0.0, []
    with memory:
        for _ in range(steps):
            memory.reset()
            m = train_step(net, model, batches, opt, sched, t, torch.device("cpu"), 1)
            peak = max(peak, memory.peaks_gib()["peak_allocated_gib"])
            times.append(m["micro_batch_time_s"])
    return peak, sorted(times[1:])[len(times[1:]) // 2]


@contextmanager
def serve_mlflow(folder: Path, port: int | None = None):
    """A real `mlflow server` on 127.0.0.1 (SQLite behind it, proxied artifacts, both in `folder`); stopped by PID.
    The same folder and port again: the same server back after an outage."""
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{folder}/server.db",
                             "--artifacts-destination", str(folder / "server-artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(1)
        yield url
    finally:
        # Stop what this started, by PID: the mlflow CLI and the server processes below it.
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in tree:
            p.terminate()
        _, alive = psutil.wait_procs(tree, timeout=30)
        for p in alive:
            p.kill()


@pytest.fixture()
def mlflow_server(tmp_path):
    with serve_mlflow(tmp_path) as url:
        yield url


@pytest.fixture()
def s3_server(tmp_path):
    """An S3-compatible server (moto_server) on 127.0.0.1, stopped by PID: (output_dir URI for pyarrow and
    Ray Train, the credentials env, the server's process). pyarrow creates the bucket on the first write."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.5)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_EC2_METADATA_DISABLED": "true"}
    uri = (f"s3://fitrun/{tmp_path.name}/out?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
           "&allow_bucket_creation=true")
    yield uri, env, proc
    proc.send_signal(signal.SIGCONT)  # a test may have paused it
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture()
def s3_bucket(s3_server):
    """(output_dir URI, credentials env) of `s3_server`."""
    return s3_server[:2]


# The tiny job through the CLI, as a user runs it (test_train_ray, test_parallel).
STEPS = ["--set", "training.max_steps=8", "--set", "training.save_steps=4", "--set", "training.eval_steps=4",
         "--set", "training.logging_steps=2"]


def fitrun_train(root, tmp, *extra, env=None):
    args = [sys.executable, "-m", "runner", "train", "jobs/tiny-cpu.yaml", "--set", f"output_dir={tmp}/out",
            "--set", f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db", *STEPS, *extra]
    return subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "FITRUN_PROGRESS": "0", **(env or {})})


@pytest.fixture(scope="session")
def finished(root, tmp_path_factory):
    """The tiny job, 8 steps, one worker: shared by the end-to-end and the multi-worker tests."""
    tmp = tmp_path_factory.mktemp("e2e")
    out = fitrun_train(root, tmp)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return tmp, out
