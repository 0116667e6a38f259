"""Tokenizer, the HF model (pretrained, or an architecture with random weights), PEFT LoRA wrapping,
and `build_trainable`: the one place where a job's model is put together with all its levers."""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

from runner.kernels import apply_kernels, compile_layers
from runner.loss import CausalLMLoss
from runner.quant import bnb_config, quantize_fp8, quantize_linear_layers
from runner.recompute import (
    apply_checkpointing,
    check_gradient_flow,
    decoder_layers,
    lora_parameters,
    offload_applies,
    resolve_layers,
)
from runner.spec import BITSANDBYTES, PRESET_NUM_LAYERS, JobSpec, LoraSpec, ModelSpec, TokenizerSpec

__all__ = ["Trainable", "build_trainable", "build_model", "build_tokenizer", "decoder_layers", "lora_parameters",
           "model_config", "preset_config", "wrap_lora"]

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def preset_config(preset: str) -> LlamaConfig:
    """Llama architectures by name, for runs without a config.json at hand."""
    common = dict(tie_word_embeddings=False, use_cache=False, bos_token_id=0, eos_token_id=1, pad_token_id=5)
    if preset == "tiny":
        # Matches the shipped tokenizer (data/tokenizer, 1024 tokens); real Llama layout, toy widths.
        return LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=176,
                           num_hidden_layers=PRESET_NUM_LAYERS["tiny"],
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                           rms_norm_eps=1e-5, **common)
    if preset == "llama3-8b":
        return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                           num_hidden_layers=PRESET_NUM_LAYERS["llama3-8b"],
                           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                           rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                           **common)
    raise ValueError(f"unknown model preset {preset!r}")


def resolve_dtype(spec: ModelSpec, target: str) -> torch.dtype:
    """The weights' dtype on `target` ('cuda' or 'cpu')."""
    if spec.dtype == "auto":
        return torch.bfloat16 if target == "cuda" else torch.float32
    return DTYPES[spec.dtype]


# Hub ids whose architecture we know, so `init: random` dry runs work where the hub is unreachable.
KNOWN_ARCHITECTURES = {"meta-llama/Meta-Llama-3-8B": "llama3-8b", "meta-llama/Meta-Llama-3-8B-Instruct": "llama3-8b",
                       "meta-llama/Llama-3.1-8B": "llama3-8b", "meta-llama/Llama-3.1-8B-Instruct": "llama3-8b"}
SHIPPED_TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "tokenizer"


@functools.lru_cache(maxsize=None)
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick TCP connect to the hub per process (never with HF_HUB_OFFLINE=1), instead of the
    hub client's retries with backoff for every file when there is no network."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _from_hub_or_cache(loader, source: str, **kw):
    """`loader.from_pretrained(source)`: local dirs and the local cache first, the hub only if reachable."""
    if Path(source).exists():
        return loader.from_pretrained(source, **kw)
    try:
        return loader.from_pretrained(source, local_files_only=True, **kw)
    except OSError:
        if not hub_reachable():
            raise OSError(f"{source}: not in the local Hugging Face cache and the hub is unreachable "
                          "(HF_HUB_OFFLINE or no network)") from None
        return loader.from_pretrained(source, **kw)


def model_config(spec: ModelSpec, allow_builtin: bool = False):
    """The architecture; `allow_builtin` (or init=random) falls back to a known hub id's built-in config."""
    if spec.preset:
        return preset_config(spec.preset)
    try:
        return _from_hub_or_cache(AutoConfig, spec.name_or_path)
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
        tok = _from_hub_or_cache(AutoTokenizer, source)
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


@dataclass
class Trainable:
    """A job's model with its levers applied, and the module the training loop calls."""

    model: PeftModel
    net: CausalLMLoss          # model + loss: one forward, what DDP wraps
    layers: list[int]          # decoder layers that recompute in backward
    num_layers: int


def build_trainable(spec: JobSpec, device: torch.device, vocab_size: int | None = None,
                    layers: list[int] | None = None, check_batch: dict | None = None,
                    target: str | None = None, depth: int | None = None) -> Trainable:
    """Base model + LoRA + every lever of the job, in the order they must apply: recompute
    placement, fused kernels, the gradient-flow check (on `check_batch`), then compile.

    A new lever belongs here and nowhere else. On the meta device (the estimate's trace, planned
    for `target`) nothing can run: kernels, compile and offload are left to the estimate's measured
    terms, and Liger's loss is traced as the chunked loss it equals in memory; `depth` builds it with
    that many decoder layers (the estimate traces a few and accounts for the rest).
    """
    meta = device.type == "meta"
    target = target or device.type
    base = build_base(spec.model, device, vocab_size, spec.training.seed, target, depth)
    quantization = spec.model.quantization
    if quantization in BITSANDBYTES and not meta:
        quantize_linear_layers(base, quantization, device)
    model = wrap_lora(base, spec.lora, spec.training.seed)
    if quantization == "fp8" and not meta:
        quantize_fp8(model)  # after LoRA: peft wraps plain linears, our fp8 ones replace its base layers
    num_layers = len(decoder_layers(model))
    ac = spec.activation_checkpointing
    layers = resolve_layers(ac, num_layers) if layers is None else layers
    apply_checkpointing(model, layers, offload_applies(ac, device.type), ac.policy)
    if not meta:
        apply_kernels(model, spec.training.kernels)
    model.train()
    if check_batch is not None and spec.training.check_gradient_flow:
        check_gradient_flow(model, check_batch)
    if spec.training.compile and not meta:
        compile_layers(model)  # after the check: its short eager slice must not trigger a compile
    loss_kind = "chunked" if meta and spec.training.loss == "liger" else spec.training.loss
    return Trainable(model, CausalLMLoss(model, loss_kind, spec.training.loss_chunk_tokens), layers, num_layers)


def build_model(spec: ModelSpec, lora: LoraSpec, device: torch.device, vocab_size: int | None = None,
                seed: int = 0) -> PeftModel:
    """The base model wrapped with LoRA adapters and nothing else (the seed recipe's starting point)."""
    return wrap_lora(build_base(spec, device, vocab_size, seed), lora, seed)


def build_base(spec: ModelSpec, device: torch.device, vocab_size: int | None = None, seed: int = 0,
               target: str | None = None, depth: int | None = None) -> torch.nn.Module:
    """The base model in `spec.dtype` on `device`. The meta device builds the architecture only (for
    the estimate), in the dtype planned for `target`. A random-init base that will be quantized (a dry
    run) is built in the model dtype first, so it needs room for those weights for a moment; a
    pretrained base is quantized while it loads."""
    meta = device.type == "meta"
    dtype = resolve_dtype(spec, target or device.type)
    config = model_config(spec, allow_builtin=meta)
    config.use_cache = False  # a training forward must not build a KV cache (it keeps activations alive)
    if depth is not None:
        if not meta:
            raise ValueError("depth is for the estimate's meta-device trace only")
        config.num_hidden_layers = depth
        if getattr(config, "layer_types", None):  # per-layer attention kinds (uniform: see estimate)
            config.layer_types = config.layer_types[:depth]
    # The trace cannot load flash-attn; SDPA saves the same tensors.
    attn = "sdpa" if meta and spec.attn_implementation == "flash_attention_2" else spec.attn_implementation
    config._attn_implementation = attn
    if vocab_size is not None and vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {vocab_size} tokens but the model's vocabulary has {config.vocab_size}")
    if meta:
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    elif spec.init == "random":
        torch.manual_seed(seed)
        with torch.device(device):
            base = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=spec.attn_implementation)
        if channels := int(os.environ.get("FITRUN_RANDOM_OUTLIERS", "0")):
            add_outlier_channels(base, channels, seed=seed)
    else:
        base = AutoModelForCausalLM.from_pretrained(spec.name_or_path, dtype=dtype, device_map={"": device},
                                                    attn_implementation=spec.attn_implementation,
                                                    quantization_config=bnb_config(spec.quantization, dtype))
    base.config.use_cache = False
    return base


def add_outlier_channels(base: torch.nn.Module, channels: int, factor: float = 100.0, seed: int = 0) -> None:
    """Give a random-init Llama base the outlier input channels real ones have (a few channels of each linear's
    input ~100x the rest, from large RMSNorm weights on them) without changing what it computes: each decoder
    layer's two norms scale `channels` fixed channels by `factor`, and the linears that read their output divide
    those input columns by it. A stress case for quantized bases (FITRUN_RANDOM_OUTLIERS=N in a dry run)."""
    picked = torch.randperm(base.config.hidden_size, generator=torch.Generator().manual_seed(seed))[:channels]
    picked = picked.to(next(base.parameters()).device)
    with torch.no_grad():
        for layer in decoder_layers(base):
            attn, mlp = layer.self_attn, layer.mlp
            for norm, readers in ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                                  (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
                norm.weight[picked] *= factor
                for linear in readers:
                    linear.weight[:, picked] /= factor


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

