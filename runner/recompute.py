"""Activation checkpointing (recompute) placed per decoder layer; model saving lives in state.py.

transformers' `GradientCheckpointingLayer` reads two attributes on every forward: a boolean
`gradient_checkpointing` and the function `_gradient_checkpointing_func`. Setting them per layer
recomputes exactly the chosen layers; the rest keep their activations.
"""

from __future__ import annotations

import warnings
from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from runner.spec import ActivationCheckpointingSpec, layer_range_problems


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers, in order: the modules transformers makes checkpointable."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def resolve_layers(spec: ActivationCheckpointingSpec, num_layers: int) -> list[int]:
    """The sorted 0-based indices of the layers to recompute."""
    problems = layer_range_problems(spec, num_layers)
    if problems:
        raise ValueError("; ".join(problems))
    if spec.count is not None:
        k = spec.count
        if spec.placement == "first":
            return list(range(k))
        if spec.placement == "last":
            return list(range(num_layers - k, num_layers))
        return sorted({(i * num_layers) // k for i in range(k)}) if k else []  # evenly spaced
    if spec.layers == "none":
        return []
    if spec.layers == "all":
        return list(range(num_layers))
    return sorted(spec.layers)


def offload_applies(spec: ActivationCheckpointingSpec, device_type: str) -> bool:
    """Whether `activation_checkpointing.offload` takes effect: it moves checkpointed inputs from a CUDA
    device to pinned host memory, so on the CPU there is nothing to move (said once, never silently).
    The one rule for the model build and the estimate."""
    if spec.offload and device_type != "cuda":
        if not _OFFLOAD_WARNED:
            _OFFLOAD_WARNED.append(True)
            warnings.warn("activation_checkpointing.offload moves checkpointed inputs off a CUDA device; on the "
                          "CPU it has no effect", stacklevel=2)
        return False
    return spec.offload


_OFFLOAD_WARNED: list[bool] = []


def _offloaded_checkpoint(function, *args, **kwargs):
    # Checkpointed layers save only their inputs; keep those in pinned host memory.
    with torch.autograd.graph.save_on_cpu(pin_memory=True):
        return checkpoint(function, *args, use_reentrant=False, **kwargs)


_aten = torch.ops.aten
_ALWAYS_SAVE = {_aten.bmm.default, _aten._scaled_dot_product_flash_attention.default,
                _aten._scaled_dot_product_efficient_attention.default,
                _aten._scaled_dot_product_cudnn_attention.default,
                _aten._scaled_dot_product_flash_attention_for_cpu.default}
LORA_MAX_RANK = 128


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep the expensive outputs (frozen-weight matmuls, attention); recompute everything else.
    LoRA's rank-r matmuls are cheap, so they are recomputed too."""
    if op in (_aten.mm.default, _aten.addmm.default):
        a, b = args[-2], args[-1]
        if min(a.shape[-1], b.shape[-1]) <= LORA_MAX_RANK:
            return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.MUST_SAVE if op in _ALWAYS_SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def apply_checkpointing(model: torch.nn.Module, layers: list[int], offload: bool = False,
                        policy: str = "full") -> None:
    """Recompute exactly `layers` in backward (non-reentrant); all other layers save activations."""
    if policy == "selective":
        func = partial(checkpoint, use_reentrant=False,
                       context_fn=partial(create_selective_checkpoint_contexts, _selective_policy))
    else:
        func = _offloaded_checkpoint if offload else partial(checkpoint, use_reentrant=False)
    chosen = set(layers)
    for i, layer in enumerate(decoder_layers(model)):
        layer._gradient_checkpointing_func = func
        layer.gradient_checkpointing = i in chosen


def check_gradient_flow(model: torch.nn.Module, batch: dict[str, torch.Tensor], max_tokens: int = 128) -> None:
    """One forward/backward on a short slice: every LoRA parameter must get a non-zero gradient.

    LoRA's B starts at zero, which makes A's gradient exactly zero on step one; so B is briefly set
    to small random values, and everything (weights, grads, RNG) is put back afterwards.
    """
    params = lora_parameters(model)
    if not params:
        raise RuntimeError("the model has no trainable parameters: check lora.target_modules")
    saved = {n: p.detach().clone() for n, p in params.items() if "lora_B" in n}
    rng = torch.get_rng_state()
    try:
        with torch.no_grad():
            for n, p in params.items():
                if "lora_B" in n:
                    p.normal_(std=1e-2)
        ids = batch["input_ids"][:1, :max_tokens]
        labels = ids.clone()
        out = model(input_ids=ids, labels=labels)
        if out.loss.requires_grad:
            out.loss.backward()
        dead = [n for n, p in params.items() if p.grad is None or not torch.any(p.grad != 0)]
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)
        for p in params.values():
            p.grad = None
        torch.set_rng_state(rng)
    if dead:
        shown = ", ".join(dead[:5]) + (f" (+{len(dead) - 5} more)" if len(dead) > 5 else "")
        raise RuntimeError(f"gradient-flow check failed: {len(dead)} of {len(params)} LoRA parameters got no "
                           f"gradient: {shown}. Checkpointed layers may be cutting the graph "
                           f"(reentrant checkpointing without input grads) or the targets are frozen.")
