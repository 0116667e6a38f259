"""Frozen base weights in fewer bytes (`model.quantization`).

`nf4` and `int8` are bitsandbytes' (QLoRA): transformers loads a pretrained base straight into them,
and `quantize_linear_layers` does the same for a random-init one. `fp8` is ours: each frozen linear
of the decoder layers keeps its weight in float8 e4m3 with one fp32 scale per output row, and both
of its matmuls (the forward and the input gradient) run on fp8 tensor cores through
`torch._scaled_mm`, with the activations and gradients scaled per row. A frozen weight needs no
weight gradient, so nothing is saved for backward but the fp8 weight itself. torchao's Float8Linear
was the alternative: it keeps the bf16 weight (no memory saved) and computes a weight gradient that
a frozen base throws away.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from runner.recompute import decoder_layers
from runner.spec import BITSANDBYTES

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# cuBLASLt's fast fp8 accumulation in the forward matmul (torchao's default) and the input-gradient one (not
# torchao's). On by default in both: one 8B layer's linears 1.56x bf16 with it against 1.42x without (H100 and
# H200, bench/results/fp8-linear-*.md), and the loss after 100 steps within 0.5% of bf16's with it, within 0.75%
# with outlier input channels (bench/results/fp8-loss-2026-12-07.md). FITRUN_FP8_FAST_ACCUM=none|forward|all
# chooses per run (forwarded to Ray workers).
FAST_ACCUM_ENV = "FITRUN_FP8_FAST_ACCUM"
FAST_ACCUM_MODE = os.environ.get(FAST_ACCUM_ENV) or "all"
if FAST_ACCUM_MODE not in ("none", "forward", "all"):
    raise ValueError(f"{FAST_ACCUM_ENV}={FAST_ACCUM_MODE!r}: use none, forward or all")
FAST_ACCUM = FAST_ACCUM_MODE in ("forward", "all")
FAST_ACCUM_BACKWARD = FAST_ACCUM_MODE == "all"
# Row-wise quantization of activations and gradients: "torch" (an expression torch.compile fuses), "triton"
# (runner/fp8_kernels.py: one kernel per row-wise quantization; CUDA only), or "auto": the torch expression under
# torch.compile (fused with its neighbours: faster there, bench/results/fp8-linear-2026-12-07.md) and the Triton
# kernel in eager layers, where the expression is ~10 kernel launches per quantization (14 per layer forward and
# backward). bench/fp8_linear.py measures each.
ROWWISE = "auto"


def _replace(layer: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Put `module` where `layer`'s submodule `name` (dotted) was."""
    parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
    setattr(parent, name.rsplit(".", 1)[-1], module)


def _rowwise_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` (rows, cols) in fp8 with one fp32 scale per row: t ≈ q * scale. The multiplier is rounded
    to t's dtype before use, so the scale handed to the matmul is exactly its inverse."""
    amax = t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    inverse = (FP8_MAX / amax).clamp(max=torch.finfo(t.dtype).max).to(t.dtype)  # an all-zero row: finite
    q = (t * inverse).clamp(-FP8_MAX, FP8_MAX).to(FP8)  # out of range would cast to NaN, not saturate
    return q, inverse.float().reciprocal()


def _quantize_rows(t: torch.Tensor, column_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` (times `column_scale` per column, if given) in fp8 with one scale per row, by ROWWISE's kernel."""
    if t.is_cuda and (ROWWISE == "triton" or (ROWWISE == "auto" and not torch.compiler.is_compiling())):
        from runner.fp8_kernels import triton

        if triton is not None:
            from runner.fp8_kernels import rowwise_fp8

            return rowwise_fp8(t, column_scale)
    return _rowwise_fp8(t if column_scale is None else t * column_scale.to(t.dtype))


def _pad_rows(t: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    """fp8 matmuls need row counts divisible by 16 (a ragged unpacked micro-batch may not be)."""
    pad = -t.shape[0] % multiple
    return F.pad(t, (0, 0, 0, pad)) if pad else t


class _Fp8FrozenMatmul(torch.autograd.Function):
    """y = x @ W.T for a frozen fp8 W (out, in) with row scales `scale` (out, 1); backward returns the
    input gradient only: dx = (dy * scale.T) @ Wq, the weight's row scales folded into dy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, scale)
        rows = x.reshape(-1, x.shape[-1])
        xq, xs = _quantize_rows(_pad_rows(rows))
        # _scaled_mm takes its second operand column-major: W (out, in) row-major transposed is.
        y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale.t(), out_dtype=x.dtype, use_fast_accum=FAST_ACCUM)
        return y[: rows.shape[0]].reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, scale = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        gq, gs = _quantize_rows(_pad_rows(rows), scale.reshape(-1))
        ones = torch.ones(1, weight.shape[1], device=weight.device, dtype=torch.float32)
        column_major = weight.t().contiguous().t()  # one layer's weight at a time, 1 byte per weight
        dx = torch._scaled_mm(gq, column_major, scale_a=gs, scale_b=ones, out_dtype=grad.dtype,
                               use_fast_accum=FAST_ACCUM_BACKWARD)
        return dx[: rows.shape[0]].reshape(*grad.shape[:-1], weight.shape[1]), None, None


class Fp8Linear(torch.nn.Module):
    """A frozen `nn.Linear` whose weight is stored in fp8 e4m3 with one fp32 scale per output row."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = _rowwise_fp8(linear.weight.detach())
        self.weight = torch.nn.Parameter(q, requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Fp8FrozenMatmul.apply(x, self.weight, self.scale)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3 rowwise"


def fp8_eligible(module: torch.nn.Module) -> bool:
    """A frozen plain linear whose shape fp8 matmuls take (both sides divisible by 16)."""
    return (type(module) is torch.nn.Linear and not module.weight.requires_grad
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def quantize_fp8(model: torch.nn.Module) -> int:
    """Swap the decoder layers' frozen linears (LoRA's base layers and untargeted ones) for `Fp8Linear`,
    after LoRA wrapped them: peft sees plain linears, its adapters stay in their own dtype. Embeddings,
    the LM head and the norms keep the model dtype. Returns how many were swapped."""
    if torch.cuda.is_available() and next(model.parameters()).is_cuda and torch.cuda.get_device_capability() < (8, 9):
        name = torch.cuda.get_device_name()
        raise ValueError(f"model.quantization: fp8 needs fp8 tensor cores (compute capability 8.9+: L4, "
                         f"RTX 4090, H100, H200...); this GPU is {name}: use nf4 or none")
    swapped = 0
    for layer in decoder_layers(model):
        for name, child in list(layer.named_modules()):
            if not fp8_eligible(child):
                continue
            _replace(layer, name, Fp8Linear(child))
            child.weight = None  # free the model-dtype weight now, not at the end of the loop
            swapped += 1
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return swapped


def bnb_config(quantization: str, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for `model.quantization` (None for `none`): QLoRA's nf4 with
    double quantization, or LLM.int8()."""
    if quantization not in BITSANDBYTES:
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def quantize_linear_layers(base: torch.nn.Module, quantization: str, device: torch.device) -> None:
    """Quantize the decoder layers' frozen linear weights in place (bitsandbytes), as loading with
    `bnb_config` does, for a base built with random weights; the rest of the model moves to `device`.
    A pretrained base was quantized while loading (its linears are bitsandbytes modules already)."""
    import bitsandbytes as bnb

    if any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in base.modules()):
        return
    compute_dtype = next(base.parameters()).dtype
    for layer in decoder_layers(base):
        for name, child in list(layer.named_modules()):
            if not isinstance(child, torch.nn.Linear):
                continue
            _replace(layer, name, bnb_linear(child, quantization, compute_dtype, device))  # quantized on the move
            del child
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the bf16 weights' blocks
    base.is_loaded_in_4bit, base.is_loaded_in_8bit = quantization == "nf4", quantization == "int8"


def bnb_linear(child: torch.nn.Linear, quantization: str, compute_dtype: torch.dtype, device: torch.device):
    """`child` as the bitsandbytes module of `quantization` (nf4: QLoRA's, double-quantized; int8: LLM.int8()),
    quantized as it moves to `device`. Built on the meta device: its own weights are replaced at once, and a
    random init of them on the CPU cost ~30 s for the 8B's 224 linears (2 cores)."""
    import bitsandbytes as bnb

    if quantization == "nf4":
        q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    else:
        q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                has_fp16_weights=False, device="meta")
        q.weight = bnb.nn.Int8Params(child.weight.data, requires_grad=False, has_fp16_weights=False)
    if child.bias is not None:
        q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
    return q.to(device)
