"""A one-pass row-wise fp8 quantization kernel (Triton) for `runner.quant`'s frozen fp8 linears.

Each program reads one row once: it optionally multiplies it by a per-column scale (the backward folds the
weight's row scales into the gradient), takes the row's absolute maximum, and writes the row in float8 e4m3
with one fp32 scale (row ~= q * scale). The row stays in registers, so the tensor is read once and written
once, where torch.compile's looped reduction over long rows (4,096 and 14,336 wide in the 8B) reads it twice.
Registered as a `torch.library.triton_op`, so torch.compile keeps it in its graph. Needs CUDA and Triton.

Measured slower than compile's own fusion on one 8B layer (bench/results/fp8-linear-2026-12-06.md: 1.44x bf16
against 1.49x): as an opaque op it is called for each of the 14 matmul inputs, where compile quantizes the input
q, k and v share (and gate and up) once. So `runner.quant.ROWWISE` keeps "torch"; this is the starting point
for a kernel that also takes those shared inputs once.
"""

from typing import Optional

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch expression in runner.quant is used
    triton = None


if triton is not None:
    @triton.jit
    def _rowwise_fp8_kernel(x_ptr, col_ptr, q_ptr, s_ptr, n_cols, HAS_COL: tl.constexpr, BLOCK: tl.constexpr,
                            FP8_MAX_: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < n_cols
        x = tl.load(x_ptr + row * n_cols + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_COL:
            x = x * tl.load(col_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12)
        multiplier = FP8_MAX_ / amax
        q = tl.minimum(tl.maximum(x * multiplier, -FP8_MAX_), FP8_MAX_)
        tl.store(q_ptr + row * n_cols + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + row, 1.0 / multiplier)

    @torch.library.triton_op("fitrun::rowwise_fp8", mutates_args=())
    def rowwise_fp8(x: torch.Tensor, column_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, scale): `x` (rows, cols), times `column_scale` (cols,) if given, in fp8 with one scale per row."""
        x = x.contiguous()
        rows, cols = x.shape
        q = torch.empty((rows, cols), dtype=FP8, device=x.device)
        s = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(cols)
        col = column_scale.contiguous() if column_scale is not None else x
        torch.library.wrap_triton(_rowwise_fp8_kernel)[(rows,)](
            x, col, q, s, cols, HAS_COL=column_scale is not None, BLOCK=block, FP8_MAX_=FP8_MAX,
            num_warps=min(max(block // 1024, 4), 16))
        return q, s
