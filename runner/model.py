"""Tokenizer, the HF model (pretrained, or an architecture with random weights), PEFT LoRA wrapping."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

from runner.spec import LoraSpec, ModelSpec, TokenizerSpec

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def preset_config(preset: str) -> LlamaConfig:
    """Llama architectures by name, for runs without a config.json at hand."""
    common = dict(tie_word_embeddings=False, use_cache=False, bos_token_id=0, eos_token_id=1, pad_token_id=5)
    if preset == "tiny":
        # Matches the shipped tokenizer (data/tokenizer, 1024 tokens); real Llama layout, toy widths.
        return LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                           rms_norm_eps=1e-5, **common)
    if preset == "llama3-8b":
        return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                           rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                           **common)
    raise ValueError(f"unknown model preset {preset!r}")


def resolve_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    if spec.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[spec.dtype]


# Hub ids whose architecture we know, so `init: random` dry runs work where the hub is unreachable.
KNOWN_ARCHITECTURES = {"meta-llama/Meta-Llama-3-8B": "llama3-8b", "meta-llama/Meta-Llama-3-8B-Instruct": "llama3-8b",
                       "meta-llama/Llama-3.1-8B": "llama3-8b", "meta-llama/Llama-3.1-8B-Instruct": "llama3-8b"}
SHIPPED_TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "tokenizer"


def model_config(spec: ModelSpec, allow_builtin: bool = False):
    """The architecture; `allow_builtin` (or init=random) falls back to a known hub id's built-in config."""
    if spec.preset:
        return preset_config(spec.preset)
    try:
        return AutoConfig.from_pretrained(spec.name_or_path)
    except OSError:
        if (spec.init == "random" or allow_builtin) and spec.name_or_path in KNOWN_ARCHITECTURES:
            warnings.warn(f"config for {spec.name_or_path} unreachable; model.init=random uses the built-in "
                          f"{KNOWN_ARCHITECTURES[spec.name_or_path]} architecture", stacklevel=2)
            return preset_config(KNOWN_ARCHITECTURES[spec.name_or_path])
        raise


def build_tokenizer(tokenizer: TokenizerSpec, model: ModelSpec) -> PreTrainedTokenizerBase:
    source = tokenizer.name_or_path or model.name_or_path
    if source is None:
        raise ValueError("tokenizer.name_or_path is required with a model.preset (presets have no tokenizer)")
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except OSError:
        if not (model.init == "random" and tokenizer.name_or_path is None and SHIPPED_TOKENIZER.is_dir()):
            raise
        # A dry run without the weights has no tokenizer either: use the shipped Llama-3-layout one.
        warnings.warn(f"tokenizer {source} unreachable; model.init=random dry run uses {SHIPPED_TOKENIZER}",
                      stacklevel=2)
        tok = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    if tokenizer.chat_template:
        tok.chat_template = tokenizer.chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(spec: ModelSpec, lora: LoraSpec, device: torch.device, vocab_size: int | None = None,
                seed: int = 0) -> PeftModel:
    """The base model in `spec.dtype` on `device`, frozen, wrapped with LoRA adapters."""
    dtype = resolve_dtype(spec, device)
    config = model_config(spec)
    config.use_cache = False  # a training forward must not build a KV cache (it keeps activations alive)
    config._attn_implementation = spec.attn_implementation
    if vocab_size is not None and vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {vocab_size} tokens but the model's vocabulary has {config.vocab_size}")
    if spec.init == "random":
        torch.manual_seed(seed)
        with torch.device(device):
            base = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=spec.attn_implementation)
    else:
        base = AutoModelForCausalLM.from_pretrained(spec.name_or_path, dtype=dtype, device_map={"": device},
                                                    attn_implementation=spec.attn_implementation)
    base.config.use_cache = False
    return wrap_lora(base, lora, seed)


def wrap_lora(base: torch.nn.Module, lora: LoraSpec, seed: int = 0) -> PeftModel:
    torch.manual_seed(seed + 1)
    config = LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                        target_modules=lora.target_modules, task_type="CAUSAL_LM", bias="none")
    model = get_peft_model(base, config, autocast_adapter_dtype=lora.adapter_dtype != "model")
    if lora.adapter_dtype == "model":
        dtype = next(base.parameters()).dtype
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(dtype)
    if lora.adapter_dtype == "mixed":
        compute_adapters_in_input_dtype(model)
    return model


def _linear_in_input_dtype(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


def compute_adapters_in_input_dtype(model: torch.nn.Module) -> None:
    """fp32 adapter weights (and so fp32 gradients and optimizer state), bf16 compute.

    peft casts each adapter's input to the adapter's dtype, so q, k and v each save their own fp32
    copy of one input. Here the input stays as it is (shared) and the rank-r weights are cast to the
    input's dtype in the forward instead (a differentiable cast: gradients arrive in fp32).
    """
    from types import MethodType

    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False
            for adapters in (getattr(module, "lora_A", {}), getattr(module, "lora_B", {})):
                for linear in adapters.values():
                    linear.forward = MethodType(_linear_in_input_dtype, linear)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers, in order: the modules transformers makes checkpointable."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
