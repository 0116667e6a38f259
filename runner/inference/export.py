"""`fitrun export OUTPUT_DIR --merged DIR`: the adapter merged into a copy of its base (peft's
`merge_and_unload`), saved as a plain Transformers model: safetensors, tokenizer, generation config."""

from __future__ import annotations

from pathlib import Path

from runner.inference.load import load_finished
from runner.model import resolve_dtype


def export_merged(output_dir: str, dest: str) -> Path:
    """Writes the merged model to `dest` and returns it. An adapter trained on a quantized base (fp8, nf4,
    int8) is merged into the unquantized base, and the message says so."""
    done = load_finished(output_dir)
    dtype = resolve_dtype(done.spec.model, "cuda" if done.spec.resources.use_gpu else "cpu")
    merged = done.model.merge_and_unload().to(dtype)
    path = Path(dest)
    path.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(path, safe_serialization=True)
    done.tokenizer.save_pretrained(path)
    if merged.generation_config is not None:
        merged.generation_config.save_pretrained(path)
    quantized = done.spec.model.quantization
    note = f" (trained on a {quantized} base, merged into the unquantized {dtype} base)" if quantized != "none" else ""
    print(f"merged model written to {path}{note}: AutoModelForCausalLM.from_pretrained({str(path)!r})")
    return path
