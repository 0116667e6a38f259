"""`fitrun generate OUTPUT_DIR --prompt ...`: the job's base plus its adapter answering one prompt, rendered
the way the job's data was (its chat template, or the alpaca prompt), streamed to the terminal."""

from __future__ import annotations

import torch

from runner.data import prompt_ids
from runner.inference.load import load_finished


def generate(output_dir: str, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0,
             seed: int = 0, stream: bool = True) -> str:
    """The reply's text: greedy at temperature 0, else sampled (seeded)."""
    from transformers import TextStreamer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    done = load_finished(output_dir, device)
    tok = done.tokenizer
    ids = torch.tensor([prompt_ids(done.spec.data, tok, prompt)], device=device)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.no_grad():
        out = done.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, streamer=streamer,
                                  **sampling)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
