"""Faster implementations of the same math: Liger's fused Triton kernels and torch.compile.

Each is a job option (`training.kernels`, `training.loss: liger`, `training.compile`) and changes
only how the layers compute, never what: the GPU test (tests/test_kernels_gpu.py) and the levers
benchmark (bench/levers_8b.py) check loss and gradients against the eager path.
"""

from __future__ import annotations

import torch

from runner.recompute import decoder_layers

LIGER_HINT = "pip install liger-kernel (Triton kernels; CUDA only)"


def require_liger() -> None:
    """Fail before any model is built when the job asks for Liger and it is not installed."""
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"training.kernels/loss: liger needs the liger-kernel package ({LIGER_HINT}): {e}") from e


def check_available(training) -> None:
    """Driver-side check, before Ray starts or any GPU time is spent."""
    if training.kernels == "liger" or training.loss == "liger":
        require_liger()


def apply_kernels(model: torch.nn.Module, kernels: str) -> None:
    """Swap RMSNorm, SwiGLU and RoPE for Liger's fused kernels on this model instance.

    Liger's fused RMSNorm keeps only the bf16 input (HF's keeps an fp32 copy), and its SwiGLU
    recomputes SiLU in backward instead of saving it: fewer saved activations per layer.
    """
    if kernels == "eager":
        return
    require_liger()
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config.model_type != "llama":
        raise ValueError(f"training.kernels: liger is wired for Llama models, got model_type {base.config.model_type!r}")
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=base)


def compile_layers(model: torch.nn.Module) -> None:
    """torch.compile every decoder layer in place. Activation checkpointing stays outside the compiled
    region (transformers' GradientCheckpointingLayer wraps the module call), so a checkpointed
    layer recomputes its compiled forward; all layers share one graph."""
    for layer in decoder_layers(model):
        layer.compile()  # static first; a new sequence length (unpacked data) recompiles once as dynamic
