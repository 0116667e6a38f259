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


def measure_in_process(spec, steps: int = 3, pad_to_full: bool = False) -> tuple[float, float]:
    """(peak tensor GiB, median micro-batch seconds) of `steps` optimizer steps of `spec`, in this
    process, through the worker's own `train_step`; the peak covers steps with AdamW state."""
    from runner.data import MicroBatches, tokenize
    from runner.memory import PeakMemory
    from runner.model import build_tokenizer, build_trainable
    from runner.worker import train_step

    t = spec.training
    tok = build_tokenizer(spec.tokenizer, spec.model)
    data = tokenize(spec.data, tok)
    pad_to = spec.data.sequence_len if pad_to_full or not spec.data.packing else None
    batches = MicroBatches(data.train, t.micro_batch_size, tok.pad_token_id, 0, pad_to=pad_to)
    trainable = build_trainable(spec, torch.device("cpu"), len(tok))
    model, net = trainable.model, trainable.net
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    memory = PeakMemory(torch.device("cpu"), list(model.parameters()))
    peak, times = 0.0, []
    with memory:
        for _ in range(steps):
            memory.reset()
            m = train_step(net, model, batches, opt, sched, t, torch.device("cpu"), 1)
            peak = max(peak, memory.peaks_gib()["peak_allocated_gib"])
            times.append(m["micro_batch_time_s"])
    return peak, sorted(times[1:])[len(times[1:]) // 2]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=True, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "FITRUN_PROGRESS": "0"}})
    yield
    ray.shutdown()
