"""Datasets: loading (local files or hub ids through `datasets`), prompt formats, tokenisation,
truncation accounting, packing, and deterministic micro-batches that can resume mid-epoch."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import pyarrow.compute as pc
import torch
from datasets import Dataset, load_dataset

from runner.loss import IGNORE
from runner.spec import DataSpec

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
    accounting: dict[str, float] = field(default_factory=dict)

    def summary_line(self) -> str:
        a = self.accounting
        dropped = ", ".join(f"{int(v)} {k.removeprefix('dropped_')}" for k, v in a.items()
                            if k.startswith("dropped_") and v) or "none"
        return (f"data: {int(a['rows_read'])} rows read; dropped: {dropped}; {int(a['rows_truncated'])} truncated; "
                f"{len(self.train)} train / {len(self.eval)} eval sequences; "
                f"{int(a['trainable_tokens_per_epoch']):,} trainable tokens per epoch of "
                f"{int(a['positions_per_epoch']):,} positions ({a['token_efficiency']:.0%})")


def content_digest(spec: DataSpec) -> str:
    """sha256 (first 32 hex) of the data files' bytes, or of the hub id and split."""
    import hashlib

    path = Path(spec.path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    if not files:
        h.update(f"{spec.path}:{spec.split}".encode())
    return h.hexdigest()[:32]


def conversation_fields(spec: DataSpec) -> tuple[str, str, str]:
    """(conversation column, role key, content key) for a conversational format."""
    sharegpt = spec.format == "sharegpt"
    return (spec.field_messages or ("conversations" if sharegpt else "messages"),
            spec.message_field_role or ("from" if sharegpt else "role"),
            spec.message_field_content or ("value" if sharegpt else "content"))


def normalize_conversation(turns, spec: DataSpec) -> tuple[list[dict] | None, list[str]]:
    """A row's turns as [{role: system|user|assistant, content}], by `spec.roles`, with `bad_turns`
    applied. Returns (messages or None if the row is dropped, the problems found: one word each)."""
    _, role_key, content_key = conversation_fields(spec)
    alias = {name: role for role, names in spec.roles.items() for name in names}
    messages, problems = [], []
    for turn in turns if isinstance(turns, list) else []:
        role = alias.get(turn.get(role_key)) if isinstance(turn, dict) else None
        content = turn.get(content_key) if isinstance(turn, dict) else None
        if role is None:
            problems.append("unknown_role")
        elif not isinstance(content, str) or not content.strip():
            problems.append("empty_turn")
        elif not any(m["role"] == "user" for m in messages) and role == "assistant":
            problems.append("leading_non_user_turn")
        elif role == "system" and messages:
            problems.append("late_system_turn")
        else:
            messages.append({"role": role, "content": content})
    if not isinstance(turns, list):
        problems.append("not_a_conversation")
    if problems and spec.bad_turns != "drop_turn":
        return None, problems
    return messages, problems


HELD_OUT_STEMS = ("test", "eval", "valid", "validation", "dev")  # files a directory holds out of training


@dataclass(frozen=True)
class DataFiles:
    """What a local `data.path` contributes: the files read as training rows, and the files not read."""

    read: list[Path]
    skipped: list[Path]

    def warning(self) -> str | None:
        if not self.skipped:
            return None
        return (f"data.path: reading {', '.join(p.name for p in self.read)}; not reading "
                f"{', '.join(p.name for p in self.skipped)} (held out by name: the eval split is data.val_fraction "
                "of the rows read)")


def data_files(path: Path) -> DataFiles:
    """The one rule for a local data path, used by preflight (counting) and the loader (reading): a file is
    itself; a directory contributes every data file of its one type, sorted, except those named as
    held-out splits (test, eval, valid, validation, dev). Raises ValueError with the fix otherwise."""
    if path.is_file():
        if path.suffix not in FILE_BUILDERS:
            raise ValueError(f"unsupported file type {path.suffix or '(none)'!r} for {path.name}; use .jsonl, .json "
                             "or .parquet")
        return DataFiles([path], [])
    files = sorted(p for p in path.iterdir() if p.suffix in FILE_BUILDERS)
    if not files:
        raise ValueError(f"directory {str(path)!r} holds no .jsonl/.json/.parquet files")
    builders = {FILE_BUILDERS[p.suffix] for p in files}
    if len(builders) > 1:
        raise ValueError(f"directory {str(path)!r} mixes file types ({', '.join(p.name for p in files)}): one "
                         "type is read as one table; keep one, or point data.path at a file")
    skipped = [p for p in files if p.stem.lower().split("-")[0].split("_")[0] in HELD_OUT_STEMS]
    read = [p for p in files if p not in skipped]
    if not read:
        raise ValueError(f"directory {str(path)!r} holds only held-out files ({', '.join(p.name for p in skipped)}): "
                         "point data.path at the file to train on")
    return DataFiles(read, skipped)


def load_rows(spec: DataSpec) -> Dataset:
    path = Path(spec.path)
    if path.exists():
        try:
            files = data_files(path)
        except ValueError as e:
            raise ValueError(f"data.path: {e}") from None
        ds = load_dataset(FILE_BUILDERS[files.read[0].suffix], data_files=[str(p) for p in files.read], split="train")
    else:
        ds = load_dataset(spec.path, split=spec.split)  # a hub id
    if spec.max_rows is not None:
        ds = ds.select(range(min(spec.max_rows, len(ds))))
    return ds


def prompt_ids(spec: DataSpec, tok, prompt: str) -> list[int]:
    """A user's prompt as the job's data renders a prompt before its reply: the chat template's
    generation prompt for conversations, the alpaca prompt for alpaca, the text itself for text."""
    if spec.format in ("messages", "sharegpt"):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        return tok.encode(text, add_special_tokens=False)
    if spec.format == "alpaca":
        return [tok.bos_token_id] + tok.encode(ALPACA_PROMPT_NO_INPUT.format(instruction=prompt), add_special_tokens=False)
    return [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)


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
           "messages": (_tokenize_messages, set()),  # the conversation column comes from the spec
           "sharegpt": (_tokenize_messages, set()),
           "text": (_tokenize_text, {"text"})}


def required_columns(spec: DataSpec) -> set[str]:
    return {conversation_fields(spec)[0]} if spec.format in ("messages", "sharegpt") else FORMATS[spec.format][1]


def tokenize(spec: DataSpec, tok, seed: int = 0) -> TokenizedData:
    """Rows -> token ids and labels, with the data accounting: rows read, dropped by reason, truncated,
    rows left with no trainable token (dropped, never batched), trainable tokens per epoch. Long on purpose:
    encode each row, then the accounting over Arrow columns, then the split, read top to bottom."""
    ds = load_rows(spec)
    fn = FORMATS[spec.format][0]
    needed = required_columns(spec)
    missing = needed - set(ds.column_names)
    if missing:
        raise ValueError(f"data.format={spec.format!r} needs columns {sorted(needed)}; "
                         f"{spec.path} has {ds.column_names} (missing {sorted(missing)})")
    conversational = spec.format in ("messages", "sharegpt")
    column = conversation_fields(spec)[0]

    def encode(row):
        problems: list[str] = []
        if conversational:
            messages, problems = normalize_conversation(row[column], spec)
            if messages is None or not any(m["role"] == "assistant" for m in messages):
                return {"input_ids": [], "labels": [], "truncated": False, "problems": problems,
                        "dropped": "bad_turns" if messages is None else "no_assistant_turn"}
            row = {"messages": messages}
        elif spec.format == "alpaca" and not all(isinstance(row.get(k), str) and row[k].strip()
                                                 for k in ("instruction", "output")):
            # a null or empty instruction or output would train on the text "None", or on nothing
            return {"input_ids": [], "labels": [], "truncated": False, "problems": problems, "dropped": "missing_text"}
        elif spec.format == "alpaca" and not isinstance(row.get("input"), str):
            row = {**row, "input": ""}
        ids, labels = fn(row, tok, spec.train_on_inputs)
        labels = labels[: spec.sequence_len]
        trainable = any(t != IGNORE for t in labels[1:])
        return {"input_ids": ids[: spec.sequence_len], "labels": labels, "truncated": len(ids) > spec.sequence_len,
                "problems": problems, "dropped": "" if trainable else "zero_trainable_tokens"}

    # datasets caches the map by the file's and the function's fingerprints: a second run (or another
    # worker) reads the token ids back from its cache; what follows works on Arrow columns, not rows.
    encoded = ds.map(encode, remove_columns=ds.column_names, desc="tokenize")
    table = encoded.with_format("arrow")[:]
    dropped = Counter(table.column("dropped").to_pylist())
    problems = Counter(pc.list_flatten(table.column("problems")).to_pylist())
    accounting = {"rows_read": float(len(encoded)), "rows_truncated": float(pc.sum(table.column("truncated")).as_py() or 0)}
    for reason in ("bad_turns", "no_assistant_turn", "zero_trainable_tokens", "missing_text"):
        accounting[f"dropped_{reason}"] = float(dropped[reason])
    for problem in ("unknown_role", "empty_turn", "leading_non_user_turn", "late_system_turn"):
        accounting[f"turns_dropped_{problem}"] = float(problems[problem])
    kept = table.filter(pc.equal(table.column("dropped"), ""))
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(kept.column("input_ids").to_pylist(),
                                                               kept.column("labels").to_pylist())]
    train_rows, eval_rows = split(rows, spec, seed)
    if not train_rows:
        raise ValueError(f"data.path {spec.path}: no training rows left (read {len(encoded)}, kept {len(rows)} with "
                         f"trainable tokens; val_fraction={spec.val_fraction}, packing={spec.packing} needs >= "
                         "sequence_len tokens)")
    trainable = sum(len(r["labels"]) - 1 - r["labels"][1:].count(IGNORE) for r in train_rows if r["labels"])
    positions = sum(len(r["input_ids"]) for r in train_rows) if spec.packing or not spec.pad_to_sequence_len \
        else len(train_rows) * spec.sequence_len
    accounting.update(rows_kept=float(len(rows)), train_sequences=float(len(train_rows)),
                      trainable_tokens_per_epoch=float(trainable), positions_per_epoch=float(positions),
                      token_efficiency=trainable / max(1, positions))
    return TokenizedData(train=train_rows, eval=eval_rows, num_rows=len(rows),
                         num_truncated=int(accounting["rows_truncated"]),
                         num_train_tokens=sum(len(r["input_ids"]) for r in train_rows), accounting=accounting)


def split(rows: list[dict], spec: DataSpec, seed: int) -> tuple[list[dict], list[dict]]:
    """The train and eval rows: a `val_fraction` of the rows, shuffled by `seed` (the job's
    `training.seed`), held out; each side packed into full blocks when `packing`."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    num_eval = int(round(len(rows) * spec.val_fraction))
    eval_rows = [rows[i] for i in order[:num_eval]]
    train_rows = [rows[i] for i in order[num_eval:]]
    if spec.packing:
        train_rows = pack(train_rows, spec.sequence_len)
        eval_rows = pack(eval_rows, spec.sequence_len) if eval_rows else []
    return train_rows, eval_rows


def pack(rows: list[dict], sequence_len: int) -> list[dict]:
    """Concatenate rows into full blocks of `sequence_len` (the tail that does not fill one is dropped)."""
    ids = list(chain.from_iterable(r["input_ids"] for r in rows))
    labels = list(chain.from_iterable(r["labels"] for r in rows))
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
    """Endless, deterministic micro-batches for one worker. Epoch e is one seeded shuffle of all rows,
    the same on every worker; worker r's i-th micro-batch is the (i·N + r)-th slice of it, so the N
    workers' micro-batches of one optimizer step hold exactly the rows that one worker with N times
    the accumulation would see (the same global batch at any world size).

    `position` counts micro-batches handed out to this worker, so a checkpoint stores it and a
    resumed run skips exactly that many.
    """

    def __init__(self, rows: list[dict], micro_batch_size: int, pad_id: int, seed: int,
                 rank: int = 0, world_size: int = 1, pad_to: int | None = None):
        self.rows, self.rank, self.world_size = rows, rank, world_size
        if len(rows) < micro_batch_size * world_size:
            raise ValueError(f"only {len(rows)} training sequences, fewer than training.micro_batch_size="
                             f"{micro_batch_size} x {world_size} workers")
        self.micro_batch_size, self.pad_id, self.seed, self.pad_to = micro_batch_size, pad_id, seed, pad_to
        self.per_epoch = len(rows) // (micro_batch_size * world_size)
        self.position = 0

    def position_from(self, position: int, micro_batch_size: int, world_size: int) -> int:
        """This layout's position after the rows that `position` micro-batches of another layout (a checkpoint's
        micro-batch size and world size) handed out: the same epoch, the same rows done in it."""
        per_epoch = len(self.rows) // (micro_batch_size * world_size)
        epoch, idx = divmod(position, per_epoch)
        return epoch * self.per_epoch + idx * micro_batch_size * world_size // (self.micro_batch_size * self.world_size)

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
        start = (idx * self.world_size + self.rank) * self.micro_batch_size
        chosen = order[start:start + self.micro_batch_size]
        self.position += 1
        return collate([self.rows[i] for i in chosen], self.pad_id, self.pad_to)
