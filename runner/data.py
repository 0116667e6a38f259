"""Datasets: loading (local files or hub ids through `datasets`), prompt formats, tokenisation,
truncation accounting, packing, and deterministic micro-batches that can resume mid-epoch."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset, load_dataset

from runner.spec import DataSpec

IGNORE = -100
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class TokenizedData:
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    num_rows: int
    num_truncated: int
    num_train_tokens: int


def load_rows(spec: DataSpec) -> Dataset:
    path = Path(spec.path)
    if path.is_file():
        if path.suffix not in FILE_BUILDERS:
            raise ValueError(f"data.path: unsupported file type {path.suffix!r}; use .jsonl, .json or .parquet")
        ds = load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    elif path.is_dir():
        ds = load_dataset(str(path), split=spec.split)
    else:
        ds = load_dataset(spec.path, split=spec.split)  # a hub id
    if spec.max_rows is not None:
        ds = ds.select(range(min(spec.max_rows, len(ds))))
    return ds


def _tokenize_alpaca(row: dict, tok, train_on_inputs: bool) -> tuple[list[int], list[int]]:
    template = ALPACA_PROMPT if row.get("input") else ALPACA_PROMPT_NO_INPUT
    prompt = [tok.bos_token_id] + tok.encode(template.format(**row), add_special_tokens=False)
    answer = tok.encode(row["output"], add_special_tokens=False) + [tok.eos_token_id]
    labels = (prompt if train_on_inputs else [IGNORE] * len(prompt)) + answer
    return prompt + answer, labels


def _tokenize_messages(row: dict, tok, train_on_inputs: bool) -> tuple[list[int], list[int]]:
    """Render turn by turn with the chat template; loss only on assistant replies.

    Each new piece of rendered text is encoded on its own (prompt and reply separately, as at
    inference), so token boundaries never straddle a prompt/reply edge.
    """
    messages = row["messages"]
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""

    def add(text: str, trained: bool) -> None:
        piece = tok.encode(text, add_special_tokens=False)  # the template writes its own special tokens
        ids.extend(piece)
        labels.extend(piece if trained or train_on_inputs else [IGNORE] * len(piece))

    for i, msg in enumerate(messages):
        if msg["role"] == "assistant":
            head = tok.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
            add(head[len(rendered):], trained=False)
            rendered = head
        full = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        add(full[len(rendered):], trained=msg["role"] == "assistant")
        rendered = full
    return ids, labels


def _tokenize_text(row: dict, tok, train_on_inputs: bool) -> tuple[list[int], list[int]]:
    ids = [tok.bos_token_id] + tok.encode(row["text"], add_special_tokens=False) + [tok.eos_token_id]
    return ids, list(ids)


FORMATS = {"alpaca": (_tokenize_alpaca, {"instruction", "output"}),
           "messages": (_tokenize_messages, {"messages"}),
           "text": (_tokenize_text, {"text"})}


def tokenize(spec: DataSpec, tok, seed: int = 0) -> TokenizedData:
    ds = load_rows(spec)
    fn, needed = FORMATS[spec.format]
    missing = needed - set(ds.column_names)
    if missing:
        raise ValueError(f"data.format={spec.format!r} needs columns {sorted(needed)}; "
                         f"{spec.path} has {ds.column_names} (missing {sorted(missing)})")

    def encode(row):
        ids, labels = fn(row, tok, spec.train_on_inputs)
        truncated = len(ids) > spec.sequence_len
        return {"input_ids": ids[: spec.sequence_len], "labels": labels[: spec.sequence_len], "truncated": truncated}

    encoded = ds.map(encode, remove_columns=ds.column_names, desc="tokenize")
    num_truncated = int(sum(encoded["truncated"]))
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in encoded]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    num_eval = int(round(len(rows) * spec.val_fraction))
    eval_rows = [rows[i] for i in order[:num_eval]]
    train_rows = [rows[i] for i in order[num_eval:]]
    if spec.packing:
        train_rows = pack(train_rows, spec.sequence_len)
        eval_rows = pack(eval_rows, spec.sequence_len) if eval_rows else []
    if not train_rows:
        raise ValueError(f"data.path {spec.path}: no training rows left (rows={len(rows)}, val_fraction="
                         f"{spec.val_fraction}, packing={spec.packing} needs >= sequence_len tokens)")
    return TokenizedData(train=train_rows, eval=eval_rows, num_rows=len(rows), num_truncated=num_truncated,
                         num_train_tokens=sum(len(r["input_ids"]) for r in train_rows))


def pack(rows: list[dict], sequence_len: int) -> list[dict]:
    """Concatenate rows into full blocks of `sequence_len` (the tail that does not fill one is dropped)."""
    ids = [t for r in rows for t in r["input_ids"]]
    labels = [t for r in rows for t in r["labels"]]
    n = len(ids) // sequence_len
    return [{"input_ids": ids[i * sequence_len:(i + 1) * sequence_len],
             "labels": labels[i * sequence_len:(i + 1) * sequence_len]} for i in range(n)]


def collate(rows: list[dict], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    length = pad_to or max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    batch = {"input_ids": ids, "labels": labels}
    if not bool(mask.all()):
        batch["attention_mask"] = mask  # full batches go mask-free: SDPA's causal path, no repeat_kv
    return batch


class MicroBatches:
    """Endless, deterministic micro-batches for one worker: epoch e is a seeded shuffle of its shard.

    `position` counts micro-batches handed out, so a checkpoint stores it and a resumed run skips
    exactly that many.
    """

    def __init__(self, rows: list[dict], micro_batch_size: int, pad_id: int, seed: int,
                 rank: int = 0, world_size: int = 1, pad_to: int | None = None):
        self.rows = rows[rank::world_size]
        if len(self.rows) < micro_batch_size:
            raise ValueError(f"only {len(self.rows)} training sequences per worker, fewer than "
                             f"training.micro_batch_size={micro_batch_size}")
        self.micro_batch_size, self.pad_id, self.seed, self.pad_to = micro_batch_size, pad_id, seed, pad_to
        self.per_epoch = len(self.rows) // micro_batch_size
        self.position = 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1000 + epoch).shuffle(order)
        return order

    @property
    def epoch(self) -> float:
        return self.position / self.per_epoch

    def next(self) -> dict[str, torch.Tensor]:
        epoch, idx = divmod(self.position, self.per_epoch)
        order = self._order(epoch)
        chosen = order[idx * self.micro_batch_size:(idx + 1) * self.micro_batch_size]
        self.position += 1
        return collate([self.rows[i] for i in chosen], self.pad_id, self.pad_to)
