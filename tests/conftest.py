import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("FITRUN_PROGRESS", "0")  # no progress bars in test logs
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tokenizer():
    from runner.model import build_tokenizer
    from runner.spec import ModelSpec, TokenizerSpec

    return build_tokenizer(TokenizerSpec(name_or_path=str(ROOT / "data/tokenizer")), ModelSpec(preset="tiny", init="random"))


def tiny_model(r: int = 4, num_layers: int = 4, seed: int = 0, dtype=torch.float32, adapter_dtype="float32"):
    """The real LlamaForCausalLM with a tiny config + peft LoRA, seeded, on CPU."""
    from transformers import LlamaForCausalLM

    from runner.model import preset_config, wrap_lora
    from runner.spec import LoraSpec

    cfg = preset_config("tiny")
    cfg.num_hidden_layers = num_layers
    torch.manual_seed(seed)
    base = LlamaForCausalLM(cfg).to(dtype)
    model = wrap_lora(base, LoraSpec(r=r, adapter_dtype=adapter_dtype), seed)
    # Non-zero B so both A and B carry gradient information in equivalence tests.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    model.train()
    return model


def tiny_batch(batch: int = 2, seq: int = 32, seed: int = 0, vocab: int = 1024):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=True, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "FITRUN_PROGRESS": "0"}})
    yield
    ray.shutdown()
