"""Writes fitrun's small shipped instruction dataset (ours, deterministic) and its tokenizer.

    python data/make_data.py        # rewrites data/instructions.{alpaca,messages}.jsonl and data/tokenizer/

Rows are templated tasks (arithmetic, word games, unit conversions, facts about colours/animals)
so that a tiny model's loss visibly falls within a few hundred steps on a CPU.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
WORDS = ("apple river stone cloud garden silver window forest candle orange pencil bridge mountain "
         "rabbit summer lantern harbor violet marble thunder").split()
ANIMALS = {"cat": "meows", "dog": "barks", "cow": "moos", "duck": "quacks", "lion": "roars",
           "sheep": "bleats", "horse": "neighs", "owl": "hoots", "frog": "croaks", "bee": "buzzes"}
COLOURS = {"grass": "green", "sky": "blue", "snow": "white", "coal": "black", "blood": "red",
           "banana": "yellow", "carrot": "orange", "plum": "purple", "chocolate": "brown", "ash": "grey"}


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            out.append(dict(instruction="Add the two numbers.", input=f"{a} and {b}", output=f"{a} + {b} = {a + b}."))
        elif kind == 1:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            out.append(dict(instruction=f"What is {a} times {b}?", input="", output=f"{a} times {b} is {a * b}."))
        elif kind == 2:
            w = rng.choice(WORDS)
            out.append(dict(instruction="Reverse the letters of the word.", input=w,
                            output=f"The word {w} reversed is {w[::-1]}."))
        elif kind == 3:
            km = rng.randint(1, 50)
            out.append(dict(instruction=f"Convert {km} kilometres to metres.", input="",
                            output=f"{km} kilometres is {km * 1000} metres."))
        elif kind == 4:
            animal = rng.choice(sorted(ANIMALS))
            out.append(dict(instruction=f"What sound does a {animal} make?", input="",
                            output=f"A {animal} {ANIMALS[animal]}."))
        else:
            thing = rng.choice(sorted(COLOURS))
            words = rng.sample(WORDS, 3)
            out.append(dict(instruction=f"Name the colour of {thing}, then list three words in alphabetical order.",
                            input=", ".join(words),
                            output=f"{thing.capitalize()} is {COLOURS[thing]}. In order: {', '.join(sorted(words))}."))
    return out


def to_messages(row: dict) -> dict:
    user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
    return {"messages": [{"role": "system", "content": "You are a concise assistant."},
                         {"role": "user", "content": user},
                         {"role": "assistant", "content": row["output"]}]}


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
           "<|pad|>"]


def write_tokenizer(texts: list[str], out: Path, vocab_size: int = 1024) -> None:
    """A byte-level BPE in Llama-3's layout (same special tokens and chat format, small vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   pad_token="<|pad|>", model_max_length=8192)
    fast.chat_template = LLAMA3_TEMPLATE
    fast.save_pretrained(out)


def main() -> None:
    data = rows(320)
    with open(HERE / "instructions.alpaca.jsonl", "w") as f:
        for r in data:
            f.write(json.dumps(r) + "\n")
    with open(HERE / "instructions.messages.jsonl", "w") as f:
        for r in data:
            f.write(json.dumps(to_messages(r)) + "\n")
    texts = [" ".join(r.values()) for r in data] + ["system user assistant You are a concise assistant."]
    texts += [f"### Instruction:\n{r['instruction']}\n\n### Input:\n{r['input']}\n\n### Response:\n" for r in data]
    write_tokenizer(texts, HERE / "tokenizer")


if __name__ == "__main__":
    main()
