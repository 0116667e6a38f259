"""Issue 25: one Llama-3-8B decoder layer's frozen linears, forward + input gradient, bf16 against fitrun's
fp8 (runner/quant.py), eager and under torch.compile, and the bare matmuls as the ceiling:

  bf16 / bf16-compile        plain nn.Linear, frozen
  fp8 / fp8-compile          runner.quant.Fp8Linear (e4m3 weight + row scale, _scaled_mm both ways)
  fp8-fast-compile           the same, the forward with cuBLASLt's fast fp8 accumulation
  fp8-fastall-compile        fast accumulation in the input-gradient matmul too
  fp8-fast-mk-compile        fp8-fast-compile with inductor's multi-kernel (one-pass row reductions allowed)
  fp8-triton[-fast]-compile  row-wise quantization by runner/fp8_kernels.py (one pass per row)
  fp8 / fp8-torchrows        eager: the Triton row-wise kernel (fitrun's default there) / the torch expression
  mm-bf16 / mm-fp8 / mm-fp8-fast   the 14 matmuls alone (7 forward, 7 input-gradient), operands prepared once

The seven linears are chained as in the layer (q, k, v read the input; o reads q plus k and v repeated to its
width; gate, up and down form the MLP), so a compiler can drop none of them. Every arm in one process on one
card; the speedup lines divide two arms of this run.

    PYTHONPATH=. python bench/fp8_linear.py --out bench/results/fp8-linear.md [--tokens 4096] [--profile ARM]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch

sys.path.insert(0, "bench")
from torchao_fp8 import HIDDEN, INTER, KV, SHAPES  # noqa: E402 - one 8B layer's linears, as that bench has them

FP8 = torch.float8_e4m3fn


class Linears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.ModuleDict({n: torch.nn.Linear(i, o, bias=False, device="cuda", dtype=torch.bfloat16)
                                         for n, (o, i) in SHAPES.items()})
        self.requires_grad_(False)

    def forward(self, x):
        p, rep = self.proj, HIDDEN // KV
        attn = p["o"](p["q"](x) + (p["k"](x) + p["v"](x)).repeat(1, rep))
        return p["down"](torch.nn.functional.silu(p["gate"](x)) * p["up"](x)) + attn


def _time(fn, steps: int) -> float:
    """Milliseconds per call, CUDA events around `steps` calls after 5 warm-up ones."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def layer_step(name: str, tokens: int):
    import runner.quant

    model = Linears()
    if name.startswith("fp8"):
        runner.quant.FAST_ACCUM = "-fast" in name
        runner.quant.FAST_ACCUM_BACKWARD = "-fastall" in name
        runner.quant.ROWWISE = "triton" if "-triton" in name else "torch" if "-torchrows" in name or \
            name.endswith("compile") else "auto"  # eager: fitrun's default (auto: the Triton kernel there)
        for n in list(model.proj):
            model.proj[n] = runner.quant.Fp8Linear(model.proj[n])
    torch._inductor.config.triton.multi_kernel = 1 if "-mk" in name else 0
    forward = torch.compile(model) if name.endswith("compile") else model
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)

    def step():
        forward(x).backward(g)
        x.grad = None
    return step


def matmul_step(name: str, tokens: int):
    """The 14 GEMMs of the layer (y = x W^T and dx = dy W per linear), nothing else."""
    ops, fast = [], name.endswith("-fast")
    for out_f, in_f in SHAPES.values():
        x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(tokens, out_f, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
        if name == "mm-bf16":
            ops += [lambda x=x, w=w: x @ w.t(), lambda dy=dy, w=w: dy @ w]
            continue
        xs, ws = torch.ones(tokens, 1, device="cuda"), torch.ones(1, out_f, device="cuda")
        gs, ones = torch.ones(tokens, 1, device="cuda"), torch.ones(1, in_f, device="cuda")
        xq, dyq, wq = x.to(FP8), dy.to(FP8), w.to(FP8)
        wt = wq.t().contiguous().t()
        ops += [lambda a=xq, b=wq.t(), s=xs, t=ws: torch._scaled_mm(a, b, scale_a=s, scale_b=t, out_dtype=torch.bfloat16,
                                                                    use_fast_accum=fast),
                lambda a=dyq, b=wt, s=gs, t=ones: torch._scaled_mm(a, b, scale_a=s, scale_b=t, out_dtype=torch.bfloat16)]
    return lambda: [op() for op in ops]


def kernel_check() -> str:
    """runner/fp8_kernels.py against runner.quant's torch expression on a gradient-like tensor: the largest
    difference after dequantizing, relative to the row's maximum."""
    from runner.fp8_kernels import rowwise_fp8
    from runner.quant import _rowwise_fp8

    x = torch.randn(4096, INTER, device="cuda", dtype=torch.bfloat16)
    col = torch.rand(INTER, device="cuda") + 0.5
    q, s = rowwise_fp8(x, col)
    rq, rs = _rowwise_fp8(x * col.to(x.dtype))
    a, b = q.float() * s, rq.float() * rs
    rel = ((a - b).abs().amax(dim=1) / b.abs().amax(dim=1)).max().item()
    return f"max row-relative difference {rel:.4f} (fp8 e4m3 step: 0.0625)"


def profile(step, label: str) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    return f"### {label}: CUDA kernels, 5 steps\n\n```\n" + \
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70) + "\n```\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--arms", nargs="*", default=["mm-bf16", "mm-fp8", "mm-fp8-fast", "bf16-compile",
                                                  "fp8-compile", "fp8-fast-compile", "fp8-fastall-compile",
                                                  "fp8-fast-mk-compile", "fp8-triton-compile",
                                                  "fp8-triton-fast-compile", "bf16", "fp8", "fp8-torchrows"])
    ap.add_argument("--profile", nargs="*", default=[], help="arms whose kernels to list")
    args = ap.parse_args()
    ms, profiles = {}, []
    if any("triton" in a for a in args.arms):
        print(f"triton kernel vs torch expression: {kernel_check()}", flush=True)
    for name in args.arms:
        try:
            step = matmul_step(name, args.tokens) if name.startswith("mm-") else layer_step(name, args.tokens)
            ms[name] = _time(step, args.steps)
            if name in args.profile:
                profiles.append(profile(step, name))
        except Exception as e:  # noqa: BLE001 - an arm that fails is reported, the others still run
            print(f"{name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        print(f"{name}: {ms[name]:.3f} ms", flush=True)
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    flops = 2 * 2 * args.tokens * sum(o * i for o, i in SHAPES.values())  # forward + input gradient
    lines = [f"# fp8 frozen linears vs bf16, one 8B decoder layer ({datetime.date.today()})", "",
             f"- card: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}",
             f"- the seven linears, {args.tokens} tokens, forward + input gradient (frozen weights), {args.steps} "
             "steps after 5 warm-up, CUDA events; every arm in this one process",
             f"- command: `PYTHONPATH=. python bench/fp8_linear.py --tokens {args.tokens} --out ...`", "",
             "| arm | ms | TFLOP/s |", "| --- | --- | --- |"]
    lines += [f"| {n} | {t:.3f} | {flops / t / 1e9:.0f} |" for n, t in ms.items()]
    lines.append("")
    for fp8, bf16 in (("fp8-compile", "bf16-compile"), ("fp8-fast-compile", "bf16-compile"),
                      ("fp8-fastall-compile", "bf16-compile"), ("fp8-fast-mk-compile", "bf16-compile"),
                      ("fp8-triton-compile", "bf16-compile"), ("fp8-triton-fast-compile", "bf16-compile"),
                      ("fp8", "bf16"), ("fp8-torchrows", "bf16"), ("mm-fp8", "mm-bf16"), ("mm-fp8-fast", "mm-bf16")):
        if fp8 in ms and bf16 in ms:
            lines.append(f"{fp8}_vs_{bf16}: {ms[bf16] / ms[fp8]:.2f}")
    with open(args.out, "w") as f:
        f.write("\n".join(lines + [""] + profiles) + "\n")
    print(json.dumps(ms))


if __name__ == "__main__":
    main()
