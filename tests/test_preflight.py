"""Mutated input, as a user would get it wrong: every case ends in a clean exit-2 error from
`fitrun validate` (the same preflight `fitrun train` runs before Ray starts), naming the field, with no
traceback; or it is valid, and then the worker's own data and model path takes a real training step."""

import json
import os

import pytest
import torch

ALPACA = {"instruction": "Say hi", "input": "", "output": "hi"}
CHAT = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


# (id, data files {name: text | bytes | rows-for-parquet}, --set overrides, expected: None = valid, else a
# fragment of the one-line error)
CASES = [
    ("missing-file", {}, ["data.path={d}/nope.jsonl"], "data.path: "),
    ("typo-suffix", {"a.jsonll": jsonl([CHAT] * 20)}, ["data.path={d}/a.jsonll"], "unsupported file type"),
    ("txt-file", {"a.txt": "hello"}, ["data.path={d}/a.txt"], "unsupported file type"),
    ("empty-jsonl", {"a.jsonl": ""}, ["data.path={d}/a.jsonl"], "is empty"),
    ("blank-jsonl", {"a.jsonl": "\n \n"}, ["data.path={d}/a.jsonl"], "is empty"),
    ("bad-json-line", {"a.jsonl": jsonl([CHAT] * 2) + "{oops\n" + jsonl([CHAT])}, ["data.path={d}/a.jsonl"], "line 3"),
    ("not-utf8", {"a.jsonl": jsonl([CHAT] * 3).encode() + b"\xff\xfe\n"}, ["data.path={d}/a.jsonl"], "not UTF-8"),
    ("json-not-list", {"a.json": json.dumps("text")}, ["data.path={d}/a.json"], "list of rows"),
    ("json-cut-off", {"a.json": json.dumps([CHAT] * 3)[:-20]}, ["data.path={d}/a.json"], "not valid JSON"),
    ("messages-missing", {"a.jsonl": jsonl([ALPACA] * 20)}, ["data.path={d}/a.jsonl"], "needs keys ['messages']"),
    ("alpaca-on-chat", {"a.jsonl": jsonl([CHAT] * 20)}, ["data.path={d}/a.jsonl", "data.format=alpaca"], "missing"),
    ("text-on-alpaca", {"a.jsonl": jsonl([ALPACA] * 20)}, ["data.path={d}/a.jsonl", "data.format=text"], "['text']"),
    ("row-is-list", {"a.jsonl": jsonl([[1, 2]] * 20)}, ["data.path={d}/a.jsonl"], "a row is a JSON object"),
    ("messages-not-list", {"a.jsonl": jsonl([{"messages": "hi"}] * 20)}, ["data.path={d}/a.jsonl"],
     "must be a list of turns"),
    ("message-no-content", {"a.jsonl": jsonl([{"messages": [{"role": "user"}]}] * 20)}, ["data.path={d}/a.jsonl"],
     "nothing to train on"),
    ("content-null", {"a.jsonl": jsonl([{"messages": [{"role": "user", "content": None}]}] * 20)},
     ["data.path={d}/a.jsonl"], "nothing to train on"),
    ("assistant-only-refused", {"a.jsonl": jsonl([{"messages": [{"role": "assistant", "content": "x"}]}] * 20)},
     ["data.path={d}/a.jsonl", "data.bad_turns=refuse"], "line 1: leading_non_user_turn"),
    ("sharegpt-as-messages", {"a.jsonl": jsonl([{"conversations": [{"from": "human", "value": "hi"}]}] * 20)},
     ["data.path={d}/a.jsonl"], "needs keys ['messages']"),
    ("too-few-rows", {"a.jsonl": jsonl([CHAT] * 2)}, ["data.path={d}/a.jsonl"], "fewer than one micro-batch"),
    ("empty-dir", {"sub/readme.md": "x"}, ["data.path={d}/sub"], "holds no"),
    ("parquet-missing-column", {"a.parquet": [{"prompt": "x"}] * 20}, ["data.path={d}/a.parquet"], "missing"),
    ("parquet-corrupt", {"a.parquet": b"PAR1 not really"}, ["data.path={d}/a.parquet"], "not a readable parquet"),
    ("hub-id-offline", {}, ["data.path=someorg/somedata"], "hub is"),
    ("val-takes-all", {"a.jsonl": jsonl([CHAT] * 5)}, ["data.path={d}/a.jsonl", "data.val_fraction=0.5"],
     "fewer than one micro-batch"),
    ("max-rows-too-few", {}, ["data.max_rows=2"], "fewer than one micro-batch"),
    ("negative-rank", {}, ["lora.r=-4"], "lora.r"),
    ("unknown-target", {}, ["lora.target_modules=[q_proj,qkv]"], "lora.target_modules"),
    ("lm-head-target", {}, ["lora.target_modules=[lm_head]"], "lie outside the decoder layers"),
    ("rank-wider-than-layers", {}, ["lora.r=100000"], "wider than the narrowest adapted layer"),
    ("sequence-len-too-short", {}, ["data.sequence_len=4"], "leave none of the first 64 rows"),
    ("sequence-len-over-positions", {}, ["data.sequence_len=8192"], "positions this model was built for"),
    ("learning-rate-absurd", {}, ["training.learning_rate=1e30"], "training.learning_rate"),
    ("packing-longer-than-data", {"a.jsonl": jsonl([CHAT] * 20)},
     ["data.path={d}/a.jsonl", "data.packing=true", "data.sequence_len=8192"], "fewer than one packed micro-batch"),
    ("layer-out-of-range", {}, ["activation_checkpointing.count=null", "activation_checkpointing.layers=[9]"],
     "activation_checkpointing.layers"),
    ("count-too-large", {}, ["activation_checkpointing.count=7"], "activation_checkpointing.count"),
    ("name-escapes", {}, ["name=../../escape"], "name:"),
    ("name-with-space", {}, ["name=my job"], "name:"),
    ("address-closed", {}, ["resources.address=127.0.0.1:1"], "resources.address: nothing answers"),
    ("address-dashboard", {}, ["resources.address=http://127.0.0.1:8265"], "fitrun submit"),
    ("address-garbage", {}, ["resources.address=foo"], "resources.address"),
    ("tracking-server-away", {}, ["tracking.tracking_uri=http://127.0.0.1:1"], "tracking.tracking_uri: nothing answers"),
    ("tracking-sqlite-unwritable", {}, ["tracking.tracking_uri=sqlite:////proc/fitrun/mlflow.db"],
     "the SQLite store '/proc/fitrun/mlflow.db' cannot be written"),
    ("output-unwritable", {}, ["output_dir=/proc/fitrun-out"], "output_dir"),
    ("output-object-store", {}, ["output_dir=s3://bucket/out"], "output_dir"),
    ("tokenizer-missing", {}, ["tokenizer.name_or_path={d}/no-tokenizer"], "tokenizer.name_or_path"),
    ("model-dir-missing", {}, ["model.preset=null", "model.name_or_path={d}/no-model"], "model.name_or_path"),
    ("model-dir-no-config", {"m/readme.md": "x"}, ["model.preset=null", "model.name_or_path={d}/m"], "no config.json"),
    ("micro-batch-zero", {}, ["training.micro_batch_size=0"], "training.micro_batch_size"),
    ("sequence-len-zero", {}, ["data.sequence_len=0"], "data.sequence_len"),
    ("unknown-key", {}, ["training.lr=0.1"], "unknown key"),
    ("val-fraction-one", {}, ["data.val_fraction=1.0"], "data.val_fraction"),
    ("quantization-on-cpu", {}, ["model.quantization=nf4"], "model.quantization"),
    ("fp8-float32-on-gpu", {}, ["model.quantization=fp8", "resources.use_gpu=true"], "model.quantization: fp8"),
    ("liger-on-cpu", {}, ["training.kernels=liger"], "liger"),
    ("cap-without-gpu", {}, ["resources.gpu_memory_gib=8"], "gpu_memory_gib"),
    # valid inputs: each must then train
    ("valid-default", {}, [], None),
    ("valid-json-list", {"a.json": json.dumps([ALPACA] * 12)}, ["data.path={d}/a.json", "data.format=alpaca"], None),
    ("valid-parquet", {"a.parquet": [ALPACA] * 12}, ["data.path={d}/a.parquet", "data.format=alpaca"], None),
    ("valid-dir", {"sub/a.jsonl": jsonl([CHAT] * 12)}, ["data.path={d}/sub"], None),
    ("valid-blank-lines", {"a.jsonl": jsonl([CHAT] * 6) + "\n\n" + jsonl([CHAT] * 6)}, ["data.path={d}/a.jsonl"], None),
    ("valid-packing", {}, ["data.packing=true"], None),
    ("valid-fp8-on-cpu", {}, ["model.quantization=fp8"], None),
    ("valid-output-uri", {}, ["output_dir=file://{d}/out"], None),
    ("output-uri-with-keys", {}, ["output_dir=s3://b/x?access_key=AKIA1&secret_key=SECRET1"], "holds credentials"),
    ("output-uri-unknown-scheme", {}, ["output_dir=nope://bucket/out"], "output_dir: nope://bucket/out cannot be written"),
    ("valid-sharegpt", {"a.jsonl": jsonl([{"conversations": [{"from": "gpt", "value": "hello"},
                                                             {"from": "human", "value": "Say hi"},
                                                             {"from": "bing", "value": "hi"}]}] * 12)},
     ["data.path={d}/a.jsonl", "data.format=sharegpt"], None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_mutated_input_fails_cleanly_or_trains(case, root, tmp_path, monkeypatch, capsys):
    from runner.cli import main
    from runner.model import hub_reachable

    name, files, overrides, expected = case
    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    for rel, content in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".parquet" and isinstance(content, list):
            write_parquet(path, content)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    sets = [s.replace("{d}", str(tmp_path)) for s in overrides]
    args = ["validate", "jobs/tiny-cpu.yaml"] + [a for s in sets for a in ("--set", s)]
    code = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if expected is not None:
        assert code == 2, f"{name}: accepted"
        assert expected in err, err
        return
    assert code == 0, err
    _train_one_step(sets)


def _train_one_step(sets: list[str]) -> None:
    """The worker's own path, in process: tokenize, batch, build with the levers, one optimizer step."""
    from runner.data import MicroBatches, tokenize
    from runner.loading import load_job
    from runner.model import build_tokenizer, build_trainable
    from runner.train.worker import train_step

    spec = load_job("jobs/tiny-cpu.yaml", sets)
    t = spec.training
    tok = build_tokenizer(spec.tokenizer, spec.model)
    data = tokenize(spec.data, tok, seed=0)
    batches = MicroBatches(data.train, t.micro_batch_size, tok.pad_token_id, 0)
    built = build_trainable(spec, torch.device("cpu"), len(tok))
    opt = torch.optim.AdamW([p for p in built.model.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    m = train_step(built.net, built.model, batches, opt, sched, t, torch.device("cpu"), 1)
    assert m["loss"] == m["loss"] and m["loss"] > 0  # a finite, positive loss


def test_dotted_hub_ids_are_hub_ids(root, monkeypatch, capsys):
    """`meta-llama/Llama-3.1-8B` has a dot, not a file suffix: a hub id, not a missing local path."""
    from runner.cli import main
    from runner.model import hub_reachable

    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    assert main(["validate", "jobs/llama3-8b-lora.yaml", "--set", "model.name_or_path=meta-llama/Llama-3.1-8B",
                 "--set", "model.init=random"]) == 0, capsys.readouterr().err
    assert main(["validate", "jobs/llama3-8b-lora.yaml", "--set", "model.name_or_path=meta-llama/Llama-3.1-8B"]) == 2
    assert "not in the local Hugging Face cache" in capsys.readouterr().err


def test_unreachable_dashboard_is_a_clean_error(root, monkeypatch, capsys, tmp_path):
    """`fitrun submit` / `status` against an address where no Ray dashboard answers: exit 2, one
    line naming the address and the fix, no traceback."""
    from runner.cli import main

    monkeypatch.chdir(root)
    nowhere = "http://127.0.0.1:1"
    assert main(["submit", "jobs/tiny-cpu.yaml", "--set", f"output_dir={tmp_path}/out", "--address", nowhere]) == 2
    assert main(["status", "fitrun-x", "--address", nowhere]) == 2
    # SPACE after a --set is still the search space (argparse alone would call it unrecognized)
    assert main(["submit", "--tune", "jobs/tiny-cpu.yaml", "--set", f"output_dir={tmp_path}/out",
                 "search_spaces/tiny-cpu.yaml", "--address", nowhere]) == 2
    err = capsys.readouterr().err
    assert err.count("no Ray dashboard answers there") == 3 and "Traceback" not in err


def test_a_local_job_this_machine_cannot_run_is_refused_by_train_and_said_by_validate(root, monkeypatch, capsys):
    """Issue 27: no address means this machine. `train` refuses (exit 2, before Ray) more CPUs than it has, or a
    GPU it lacks; `validate` warns and accepts (the file may be meant for a cluster)."""
    from runner.cli import main
    from runner.preflight import preflight

    monkeypatch.chdir(root)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    too_many = ["--set", f"resources.cpus_per_worker={(os.cpu_count() or 1) + 1}"]
    assert main(["validate", "jobs/tiny-cpu.yaml", *too_many]) == 0
    assert "warning: resources: 1 worker(s)" in capsys.readouterr().err
    from runner.loading import load_job
    from runner.spec import SpecError

    with pytest.raises(SpecError, match="but this machine has"):
        preflight(load_job("jobs/tiny-cpu.yaml", [too_many[1]]), command="train")
    if not torch.cuda.is_available():
        with pytest.raises(SpecError, match="this machine has no CUDA GPU"):
            preflight(load_job("jobs/tiny-cpu.yaml", ["resources.use_gpu=true"]), command="tune")
