"""Preflight: everything about a job that can be checked on the driver before Ray starts or any GPU
time is spent: the data file (exists, type, parses, columns, enough rows), the tokenizer and model
(local paths exist, hub ids reachable or cached), LoRA targets and checkpointed layers against the
real architecture, the Ray address, and the output root. Every problem at once, one line each,
naming the field and the fix (`SpecError`, exit 2 in the CLI)."""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from runner.data import conversation_fields, data_files, normalize_conversation, required_columns
from runner.loading import looks_local, redact
from runner.spec import JobSpec, SpecError, layer_range_problems
from runner.storage import Location, is_uri


def preflight(spec: JobSpec, source: str = "job", command: str = "train") -> None:
    """Every check at once, for `command`. Its tracking server must answer from here unless the job is submitted
    (it then reaches it from the cluster). A job with no Ray address runs on this machine: train and tune refuse
    what this machine cannot give it; validate says so as a warning (the file may be meant for a cluster)."""
    problems = check_data(spec) + check_model(spec) + check_resources(spec) + check_output(spec)
    if not problems:  # data and tokenizer readable: a sample can be tokenized
        problems += _check_short_sequences(spec)
    if command != "submit":
        problems += check_tracking(spec)
    if command != "submit" and not (spec.resources.address or os.environ.get("RAY_ADDRESS")):
        machine = _check_this_machine(spec)
        if command in ("train", "tune"):
            problems += machine
        for note in machine if command == "validate" and not problems else []:  # errors first, alone
            print(f"warning: {note}; `fitrun train` here refuses it", file=sys.stderr)
    if problems:
        raise SpecError(source, problems)


# -- data --------------------------------------------------------------------------------------


def check_data(spec: JobSpec) -> list[str]:
    d = spec.data
    path = Path(d.path).expanduser()
    if not path.exists():
        if not looks_local(d.path):
            return [] if _hub_ok() else [f"data.path: {d.path!r} is not a local path, and the Hugging Face hub is "
                                         "unreachable (HF_HUB_OFFLINE or no network): use a local file"]
        return [f"data.path: {d.path!r} does not exist (relative paths are read from {Path.cwd()})"]
    try:
        chosen = data_files(path)  # the loader's own rule: what it reads is what is counted here
    except ValueError as e:
        return [f"data.path: {e}"]
    if chosen.warning():
        print(f"warning: {chosen.warning()}", file=sys.stderr)
    rows, problems = 0, []
    for f in chosen.read:
        n, problem = _count_rows(f, d)
        if problem:
            problems.append(f"data.path: {problem}")
        rows += n
    if problems:
        return problems
    if d.max_rows is not None:
        rows = min(rows, d.max_rows)
    train_rows = rows - int(round(rows * d.val_fraction))
    if not rows:
        return [f"data.path: no row of {d.path!r} has a user turn followed by an assistant turn with text (after "
                f"data.bad_turns: {d.bad_turns}): nothing to train on"]
    need = spec.training.micro_batch_size * spec.resources.num_workers
    if not d.packing and train_rows < need:
        problems.append(f"data.path: {train_rows} training rows in {d.path!r} (after val_fraction {d.val_fraction}), "
                        f"fewer than one micro-batch per worker ({spec.training.micro_batch_size} x "
                        f"{spec.resources.num_workers} workers): add rows or lower training.micro_batch_size")
    elif train_rows < 1:
        problems.append(f"data.path: no training rows in {d.path!r} (after val_fraction {d.val_fraction})")
    elif d.packing and all(f.suffix in (".json", ".jsonl") for f in chosen.read):
        # Packing keeps only full blocks of sequence_len. A byte-level BPE token is at least one byte of text,
        # and a JSON row spends more bytes on its keys and quotes than its chat template spends on tokens: the
        # files' size bounds the data's tokens from above.
        most = sum(f.stat().st_size for f in chosen.read)
        block = d.sequence_len * need
        if most < block:
            problems.append(f"data.packing: {d.path!r} holds at most {most:,} tokens (its files' bytes), fewer than "
                            f"one packed micro-batch: data.sequence_len {d.sequence_len} x micro-batch "
                            f"{spec.training.micro_batch_size} x {spec.resources.num_workers} worker(s) = {block:,}; "
                            "lower data.sequence_len or add data")
    return problems


def _count_rows(f: Path, d) -> tuple[int, str | None]:
    """(usable rows, first problem) of one data file, read the way `datasets` will read it; for a
    conversation, usable means it keeps an assistant turn under `data.bad_turns`."""
    columns, fmt = required_columns(d), d.format
    if not os.access(f, os.R_OK):
        return 0, f"{f} is not readable"
    if f.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            meta = pq.read_schema(f), pq.ParquetFile(f).metadata.num_rows
        except Exception as e:
            return 0, f"{f}: not a readable parquet file ({type(e).__name__}: {str(e)[:120]})"
        missing = columns - set(meta[0].names)
        return meta[1], (f"{f}: data.format {fmt!r} needs columns {sorted(columns)}, missing {sorted(missing)}"
                         if missing else None)
    try:
        text = f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = f.read_bytes()[:e.start].count(b"\n") + 1
        return 0, f"{f}, line {line}: not UTF-8 text (byte {e.start}); re-encode the file as UTF-8"
    if not text.strip():
        return 0, f"{f} is empty: it needs at least one row"
    if f.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            return 0, f"{f}, line {e.lineno} column {e.colno}: not valid JSON ({e.msg})"
        if isinstance(rows, dict) and len(rows) == 1 and isinstance(next(iter(rows.values())), list):
            rows = next(iter(rows.values()))  # {"data": [...]}, as `datasets` reads it
        if not isinstance(rows, list):
            return 0, f"{f}: a .json data file holds a list of rows (objects); got {type(rows).__name__}"
        return _check_rows(f, rows, d, lambda i: f"row {i}")
    rows, lines = [], []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
            lines.append(i)
        except json.JSONDecodeError as e:
            return 0, f"{f}, line {i}: not valid JSON ({e.msg} at column {e.colno})"
    return _check_rows(f, rows, d, lambda i: f"line {lines[i - 1]}")


def _check_rows(f: Path, rows: list, d, where) -> tuple[int, str | None]:
    columns, fmt = required_columns(d), d.format
    usable = 0
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            return 0, f"{f}, {where(i)}: a row is a JSON object, got {type(row).__name__}"
        missing = columns - set(row)
        if missing:
            return 0, (f"{f}, {where(i)}: data.format {fmt!r} needs keys {sorted(columns)}, missing {sorted(missing)} "
                       "(set data.format to match the file)")
        if fmt not in ("messages", "sharegpt"):
            usable += 1
            continue
        turns = row[conversation_fields(d)[0]]
        if not isinstance(turns, list):
            return 0, f"{f}, {where(i)}: {conversation_fields(d)[0]} must be a list of turns, got {type(turns).__name__}"
        messages, problems = normalize_conversation(turns, d)
        if problems and d.bad_turns == "refuse":
            return 0, (f"{f}, {where(i)}: {', '.join(sorted(set(problems)))} (data.bad_turns: refuse; drop_turn or "
                       "drop_row would skip it)")
        usable += bool(messages) and any(m["role"] == "assistant" for m in messages)
    return usable, None


# -- model and tokenizer -----------------------------------------------------------------------


def _hub_ok() -> bool:
    from runner.model import hub_reachable

    return hub_reachable()


def _cached(repo_id: str, filename: str = "config.json") -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:
        return False


def check_model(spec: JobSpec) -> list[str]:
    from runner.model import KNOWN_ARCHITECTURES, SHIPPED_TOKENIZER

    m, problems = spec.model, []
    builtin = m.init == "random" and m.name_or_path in KNOWN_ARCHITECTURES
    if m.name_or_path:
        problems += _check_source("model.name_or_path", m.name_or_path, "config.json", builtin,
                                  weights=m.init == "pretrained")
    tok = spec.tokenizer.name_or_path or m.name_or_path
    if tok is None:
        problems.append("tokenizer.name_or_path: a model.preset has no tokenizer; set tokenizer.name_or_path")
    elif tok:
        fallback = spec.tokenizer.name_or_path is None and m.init == "random" and SHIPPED_TOKENIZER.is_dir()
        field = "tokenizer.name_or_path" if spec.tokenizer.name_or_path else "model.name_or_path (its tokenizer)"
        problems += _check_source(field, tok, "tokenizer_config.json", fallback, weights=False)
    if problems:
        return problems
    return _check_architecture(spec)


SHORT_SEQUENCE = 512  # below it, a chat template's own tokens can fill a whole sequence


def _check_short_sequences(spec: JobSpec) -> list[str]:
    """A short sequence_len can leave no row a trainable token (the template and the prompt fill it): tokenize a
    sample of the data with the job's tokenizer and template, as the worker will, and say so before Ray starts."""
    d = spec.data
    if d.sequence_len >= SHORT_SEQUENCE or not Path(d.path).expanduser().exists():
        return []
    import datasets

    from runner.data import tokenize
    from runner.model import build_tokenizer

    sample = d.model_copy(update={"max_rows": 64, "val_fraction": 0.0, "packing": False})
    datasets.disable_progress_bars()  # a sample: no "tokenize" bar in validate's output
    try:
        tokenize(sample, build_tokenizer(spec.tokenizer, spec.model))
    except ValueError as e:
        if "no training rows left" not in str(e):
            return []  # what else a sample can meet, the worker says in full
        return [f"data.sequence_len: {d.sequence_len} tokens leave none of the first 64 rows a trainable (assistant) "
                "token: the chat template and the prompt fill the whole sequence; raise data.sequence_len"]
    finally:
        datasets.enable_progress_bars()
    return []


def _check_source(field: str, value: str, marker: str, has_fallback: bool, weights: bool) -> list[str]:
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / marker).exists():
            return [f"{field}: {value!r} is not a Hugging Face model directory (no {marker})"]
        if weights and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            return [f"{field}: {value!r} has no weights (*.safetensors); for a dry run set model.init: random"]
        return []
    if looks_local(value):
        return [f"{field}: local path {value!r} does not exist"]
    if has_fallback or _cached(value, marker) or _hub_ok():
        return []
    return [f"{field}: {value!r} is not in the local Hugging Face cache and the hub is unreachable "
            "(HF_HUB_OFFLINE or no network): download it first or use a local directory"]


def _check_architecture(spec: JobSpec) -> list[str]:
    """LoRA targets and checkpointed layers against the real architecture (built on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    from runner.model import model_config

    try:
        config = model_config(spec.model, allow_builtin=True)
    except Exception as e:
        return [f"model.name_or_path: cannot read the model's config ({type(e).__name__}: {str(e)[:160]})"]
    problems = layer_range_problems(spec.activation_checkpointing, config.num_hidden_layers)
    positions = getattr(config, "max_position_embeddings", None)
    if positions and spec.data.sequence_len > positions:
        problems.append(f"data.sequence_len: {spec.data.sequence_len} is longer than the {positions} positions this model "
                        "was built for (config max_position_embeddings); lower it, or use a model (or rope_scaling "
                        "in its config) made for that length")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    narrowest = min(config.hidden_size, kv_heads * head_dim)  # k_proj and v_proj's outputs
    if spec.lora.r > narrowest:
        problems.append(f"lora.r: {spec.lora.r} is wider than the narrowest adapted layer ({narrowest}): a rank above "
                        "a layer's width adds memory and nothing else; use a rank up to it")
    targets = spec.lora.target_modules
    if targets != "all-linear":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        linears = [name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]
        names = {name.rsplit(".", 1)[-1] for name in linears}
        in_layers = {name.rsplit(".", 1)[-1] for name in linears if ".layers." in name}
        unknown = [t for t in targets if t not in names]
        outside = [t for t in targets if t in names and t not in in_layers]
        if unknown:
            problems.append(f"lora.target_modules: {unknown} match no linear layer of this model; "
                            f"choose from {sorted(in_layers)} or all-linear")
        if outside:
            problems.append(f"lora.target_modules: {outside} lie outside the decoder layers: fitrun adapts the decoder "
                            "layers' linears (its loss computes the LM head from its weight, chunk by chunk); "
                            f"choose from {sorted(in_layers)} or all-linear")
    return problems


# -- resources and outputs -------------------------------------------------------------------


def check_resources(spec: JobSpec) -> list[str]:
    address = spec.resources.address
    if not address or address == "auto":
        return []
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    if parsed.scheme in ("http", "https"):
        return [f"resources.address: {address!r} is a dashboard (Ray Jobs) address; `fitrun train` connects to the "
                f"cluster's GCS (HOST:6379, or ray://HOST:10001). To submit through Ray Jobs use "
                f"`fitrun submit JOB --address {address}`"]
    if not parsed.hostname or not parsed.port:
        return [f"resources.address: expected HOST:PORT, ray://HOST:PORT or auto, got {address!r}"]
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=3).close()
    except OSError as e:
        return [f"resources.address: nothing answers at {parsed.hostname}:{parsed.port} ({e.strerror or e}); "
                "is the Ray head running (`ray start --head`)?"]
    return []


def _check_this_machine(spec: JobSpec) -> list[str]:
    """A job with no address runs on a Ray of its own on this machine: its CPUs and GPUs are all there is (the
    same rule `train.driver.check_cluster_resources` applies to a cluster's nodes, once Ray runs)."""
    res, problems = spec.resources, []
    cpus = os.cpu_count() or 1
    if res.cpus_per_worker * res.num_workers > cpus:
        problems.append(f"resources: {res.num_workers} worker(s) x {res.cpus_per_worker:g} CPU, but this machine has "
                        f"{cpus} CPU (a job with no resources.address runs here); lower resources.cpus_per_worker or "
                        "resources.num_workers, or give a cluster's address")
    if res.use_gpu:
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            problems.append("resources.use_gpu: true, but this machine has no CUDA GPU (a job with no "
                            "resources.address runs here): set resources.use_gpu: false to train on the CPU")
        elif res.gpus_per_worker * res.num_workers > gpus:
            problems.append(f"resources: {res.num_workers} worker(s) x {res.gpus_per_worker:g} GPU, but this machine "
                            f"has {gpus} GPU(s)")
    return problems


def check_tracking(spec: JobSpec) -> list[str]:
    """A tracking server must answer at the start (later, a run outlives its going away: `runner.tracking.Outbox`)."""
    import urllib.error
    import urllib.request

    from runner.tracking import split_credentials

    uri = spec.tracking.tracking_uri or ""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///")).expanduser()
        problem = _unwritable(db.parent)
        return [f"tracking.tracking_uri: the SQLite store {str(db)!r} cannot be written ({problem})"] if problem else []
    if not uri.startswith(("http://", "https://")):
        return []
    base = split_credentials(uri)[0].rstrip("/")
    try:
        urllib.request.urlopen(f"{base}/health", timeout=5).close()
    except urllib.error.HTTPError:
        return []  # it answers (a server without /health, or behind a proxy that wants the credentials)
    except (OSError, ValueError) as e:
        return [f"tracking.tracking_uri: nothing answers at {redact(base)} ({getattr(e, 'reason', e)}); start the "
                "MLflow server (`mlflow server --host 127.0.0.1 --port 5000`), or track locally: "
                "tracking.tracking_uri: sqlite:///mlflow.db"]
    return []


def check_output(spec: JobSpec) -> list[str]:
    if is_uri(spec.output_dir):
        return _check_output_uri(spec.resolved_output_dir())
    out = Path(spec.resolved_output_dir()).expanduser()
    problem = _unwritable(out)
    return [f"output_dir: {str(out)!r} cannot be written ({problem}); choose a writable directory"] if problem else []


def _unwritable(folder: Path) -> str | None:
    """Why `folder` (or the nearest folder above it that exists, where it would be made) cannot take a file."""
    existing = next(p for p in [folder, *folder.absolute().parents] if p.exists())
    try:  # a real write: permission bits say little to root or on read-only and virtual filesystems
        if not existing.is_dir():
            raise NotADirectoryError(existing)
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".fitrun-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"{existing}: {e.strerror or type(e).__name__}"
    return None


def _check_output_uri(uri: str) -> list[str]:
    """An object-store output_dir: a real write and delete, as the job will do."""
    try:
        probe = Location(uri) / f".fitrun-write-check-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except Exception as e:  # pyarrow: ArrowInvalid (an unknown scheme), OSError (network, credentials, bucket)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        return [f"output_dir: {redact(uri)} cannot be written ({reason}); check the URI, the bucket and the "
                "credentials (AWS_* / GOOGLE_APPLICATION_CREDENTIALS)"]
    return []
