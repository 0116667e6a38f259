import json

import pytest
import torch

from runner.data import IGNORE, MicroBatches, tokenize
from runner.spec import DataSpec


def test_messages_train_only_on_assistant_replies(root, tokenizer):
    data = tokenize(DataSpec(path=str(root / "data/instructions.messages.jsonl"), format="messages",
                             sequence_len=256), tokenizer)
    row = data.train[0]
    trained = tokenizer.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l != IGNORE])
    text = tokenizer.decode(row["input_ids"])
    assert text.startswith("<|begin_of_text|><|start_header_id|>system")
    assert trained.endswith("<|eot_id|>") and "user" not in trained and "assistant" not in trained
    assert trained[:-len("<|eot_id|>")] in text.split("assistant<|end_header_id|>\n\n")[1]


def test_alpaca_masks_prompt_and_counts_truncation(root, tokenizer):
    data = tokenize(DataSpec(path=str(root / "data/instructions.alpaca.jsonl"), format="alpaca",
                             sequence_len=24, val_fraction=0.1), tokenizer)
    assert data.num_rows == 320 and data.num_truncated > 0
    assert len(data.eval) == 32 and len(data.train) == 288
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
    shards = [MicroBatches(data.train, 4, tokenizer.pad_token_id, 3, rank=r, world_size=2) for r in (0, 1)]
    assert {id(r) for r in shards[0].rows}.isdisjoint(id(r) for r in shards[1].rows)
