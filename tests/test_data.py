import json
import os

import pytest
import torch

from runner.data import IGNORE, MicroBatches, tokenize
from runner.spec import DataSpec


def test_messages_train_only_on_assistant_replies(root, tokenizer):
    data = tokenize(DataSpec(path=str(root / "data/instructions.messages.jsonl"), format="messages",
                             sequence_len=256), tokenizer)
    row = data.train[0]
    trained = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE])
    text = tokenizer.decode(row["input_ids"])
    assert text.startswith("<|begin_of_text|><|start_header_id|>system")
    assert trained.endswith("<|eot_id|>") and "user" not in trained and "assistant" not in trained
    assert trained[:-len("<|eot_id|>")] in text.split("assistant<|end_header_id|>\n\n")[1]


def test_alpaca_masks_prompt_and_counts_truncation(root, tokenizer):
    data = tokenize(DataSpec(path=str(root / "data/instructions.alpaca.jsonl"), format="alpaca",
                             sequence_len=24, val_fraction=0.1), tokenizer)
    assert data.accounting["rows_read"] == 320 and data.num_truncated > 0
    # Rows whose reply is truncated away entirely have no trainable token: dropped, counted, never batched.
    zero = data.accounting["dropped_zero_trainable_tokens"]
    assert zero > 0 and data.num_rows == 320 - zero
    assert len(data.eval) == round(data.num_rows * 0.1) and len(data.train) + len(data.eval) == data.num_rows
    assert all(len(r["input_ids"]) <= 24 for r in data.train)
    full = tokenize(DataSpec(path=str(root / "data/instructions.alpaca.jsonl"), format="alpaca", sequence_len=512),
                    tokenizer)
    assert full.num_truncated == 0
    row = full.train[0]
    assert row["labels"][0] == IGNORE and row["labels"][-1] == tokenizer.eos_token_id


def test_packing_gives_full_blocks(root, tokenizer):
    data = tokenize(DataSpec(path=str(root / "data/instructions.alpaca.jsonl"), format="alpaca", sequence_len=128,
                             packing=True), tokenizer)
    assert all(len(r["input_ids"]) == 128 for r in data.train)
    batch = MicroBatches(data.train, 2, tokenizer.pad_token_id, 0).next()
    assert "attention_mask" not in batch  # full blocks take SDPA's mask-free causal path


def test_text_and_parquet_files_through_datasets(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["hello world", "the quick brown fox"] * 5}), tmp_path / "t.parquet")
    data = tokenize(DataSpec(path=str(tmp_path / "t.parquet"), format="text", sequence_len=64), tokenizer)
    assert data.num_rows == 10
    assert data.train[0]["labels"] == data.train[0]["input_ids"]


def test_wrong_columns_named_clearly(tmp_path, tokenizer):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"needs columns \['instruction', 'output'\]"):
        tokenize(DataSpec(path=str(p), format="alpaca"), tokenizer)


def test_micro_batches_resume_at_position(root, tokenizer):
    data = tokenize(DataSpec(path=str(root / "data/instructions.alpaca.jsonl"), sequence_len=64), tokenizer)
    a = MicroBatches(data.train, 4, tokenizer.pad_token_id, seed=3)
    seq = [a.next()["input_ids"] for _ in range(100)]  # crosses epoch boundaries
    b = MicroBatches(data.train, 4, tokenizer.pad_token_id, seed=3)
    b.position = 57
    assert all(torch.equal(b.next()["input_ids"], s) for s in seq[57:])



def test_workers_split_the_one_worker_global_batch(root, tokenizer):
    """2 workers x accum 2 see, step by step, exactly the rows of 1 worker x accum 4."""
    data = tokenize(DataSpec(path=str(root / "data/instructions.alpaca.jsonl"), sequence_len=64), tokenizer)

    def rows(batches, n):
        return sorted(tuple(r.tolist()) for _ in range(n) for r in batches.next()["input_ids"])

    one = MicroBatches(data.train, 2, tokenizer.pad_token_id, seed=3)
    shards = [MicroBatches(data.train, 2, tokenizer.pad_token_id, 3, rank=r, world_size=2) for r in (0, 1)]
    assert shards[0].per_epoch == one.per_epoch // 2
    for _ in range(2 * shards[0].per_epoch // 2):  # two epochs of optimizer steps
        step_rows = rows(shards[0], 2) + rows(shards[1], 2)
        assert sorted(step_rows) == rows(one, 4)


SHAREGPT = "tests/data/sharegpt_odd.jsonl"  # written by us: every odd case of real ShareGPT exports


def test_sharegpt_odd_cases_are_counted_and_never_trained_as_junk(root, tokenizer):
    spec = DataSpec(path=str(root / SHAREGPT), format="sharegpt", sequence_len=128)
    data = tokenize(spec, tokenizer)
    a = data.accounting
    assert a["rows_read"] == 40 and a["rows_kept"] == 36 == data.num_rows
    assert a["dropped_no_assistant_turn"] == 3  # assistant-only, user-only, empty conversation
    assert a["dropped_zero_trainable_tokens"] == 1 and a["rows_truncated"] == 1  # the reply truncated away
    assert a["dropped_bad_turns"] == 0
    assert a["turns_dropped_leading_non_user_turn"] == 2 and a["turns_dropped_unknown_role"] == 1
    assert a["turns_dropped_empty_turn"] == 2  # a blank reply and one without a value
    assert 0 < a["trainable_tokens_per_epoch"] < a["positions_per_epoch"]
    texts = [(tokenizer.decode(r["input_ids"]), tokenizer.decode([t for t, label in zip(r["input_ids"], r["labels"])
                                                                  if label != IGNORE])) for r in data.train]
    assert not any("None" in full for full, _ in texts)
    aliases = next(trained for full, trained in texts if "Two plus two" in full)
    assert "Four." in aliases and "Five." in aliases and "Yes." in aliases  # bing, chatgpt, bard are assistants
    assert not any("(a pause)" in full for full, _ in texts)  # the unknown role's turn is gone
    first = next(full for full, _ in texts if "Say hi." in full)
    assert "How can I help" not in first  # the leading assistant turn is gone

    strict = tokenize(DataSpec(path=str(root / SHAREGPT), format="sharegpt", sequence_len=128, bad_turns="drop_row"),
                      tokenizer)
    assert strict.accounting["dropped_bad_turns"] == 5 and strict.num_rows == 32


@pytest.mark.ray
@pytest.mark.slow
def test_ten_steps_on_sharegpt_through_fitrun_train(root, tmp_path):
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    args = [sys.executable, "-m", "runner", "train", "jobs/tiny-cpu.yaml", "--set", f"data.path={SHAREGPT}",
            "--set", "data.format=sharegpt", "--set", "training.max_steps=10", "--set", "training.save_steps=null",
            "--set", "training.eval_steps=null", "--set", f"output_dir={tmp_path}/out",
            "--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    out = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "FITRUN_PROGRESS": "0"})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "data: 40 rows read; dropped: 3 no_assistant_turn, 1 zero_trainable_tokens; 1 truncated" in log
    assert "step    10/10" in log
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("fitrun-tiny").experiment_id])
    assert run.data.metrics["data_rows_read"] == 40 and run.data.metrics["data_dropped_zero_trainable_tokens"] == 1
    (dataset,) = client.get_run(run.info.run_id).inputs.dataset_inputs  # MLflow's Datasets tab
    assert dataset.dataset.name == "sharegpt_odd.jsonl" and len(dataset.dataset.digest) == 32
