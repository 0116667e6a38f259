"""A finished job's output folder back as a model: its resolved spec, its tokenizer, its base (unquantized: an
adapter trained on an fp8 or nf4 base is plain PEFT and loads onto the full-precision weights) and the adapter."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from runner.loading import job_from_dict
from runner.model import build_base, build_tokenizer
from runner.spec import JobSpec, SpecError
from runner.train.driver import SPEC_FILE


@dataclass
class Finished:
    spec: JobSpec
    tokenizer: object
    model: torch.nn.Module   # the PeftModel: base + adapter, in eval mode
    adapter_dir: Path


def load_finished(output_dir: str | Path, device: torch.device = torch.device("cpu")) -> Finished:
    """The base + adapter of a job's output folder (`fitrun train`'s output_dir)."""
    from peft import PeftModel

    out = Path(output_dir)
    adapter, spec_file = out / "adapter", out / SPEC_FILE
    if not (adapter / "adapter_config.json").is_file() or not spec_file.is_file():
        raise SpecError(str(output_dir), [f"no finished job here: expected {adapter}/ (the adapter) and {spec_file} "
                                          "(the job), as `fitrun train` writes them into its output_dir"])
    spec = job_from_dict(json.loads(spec_file.read_text()), str(spec_file))
    model_spec = spec.model.model_copy(update={"quantization": "none"})
    tok = build_tokenizer(spec.tokenizer, spec.model)
    base = build_base(model_spec, device, len(tok), spec.training.seed)
    model = PeftModel.from_pretrained(base, str(adapter)).to(device)
    model.eval()
    return Finished(spec, tok, model, adapter)
