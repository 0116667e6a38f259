"""Issue 25: one Llama-3-8B decoder layer's frozen linears, forward + input gradient, bf16 against fitrun's
fp8 (runner/quant.py), eager and under torch.compile, and the bare matmuls as the ceiling:

  bf16 / bf16-compile        plain nn.Linear, frozen
  fp8 / fp8-compile          runner.quant.Fp8Linear (e4m3 weight + row scale, _scaled_mm both ways)
  fp8-fast-compile           the same, the forward with cuBLASLt's fast fp8 accumulation
  mm-bf16 / mm-fp8           the 14 matmuls alone (7 forward, 7 input-gradient), operands prepared once

Every arm in one process on one card; the speedup lines divide two arms of this run.

    PYTHONPATH=. python bench/fp8_linear.py --out bench/results/fp8-linear.md [--tokens 4096]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch

sys.path.insert(0, "bench")
from torchao_fp8 import SHAPES, Linears  # noqa: E402 - the same seven linears

FP8 = torch.float8_e4m3fn


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


def layer_arm(name: str, tokens: int, steps: int) -> float:
    model = Linears("cuda")
    if name.startswith("fp8"):
        import runner.quant
        from runner.quant import Fp8Linear

        runner.quant.FAST_ACCUM = "fast" in name

        for n in list(model.proj):
            model.proj[n] = Fp8Linear(model.proj[n])
    forward = torch.compile(model) if name.endswith("compile") else model
    x = torch.randn(tokens, SHAPES["q"][1], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = None

    def step():
        nonlocal g
        y = forward(x)
        if g is None:
            g = torch.randn_like(y)
        y.backward(g)
        x.grad = None

    return _time(step, steps)


def matmul_arm(dtype: str, tokens: int, steps: int) -> float:
    """The 14 GEMMs of the layer (y = x W^T and dx = dy W per linear), nothing else."""
    ops = []
    for out_f, in_f in SHAPES.values():
        x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(tokens, out_f, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
        if dtype == "bf16":
            ops += [lambda x=x, w=w: x @ w.t(), lambda dy=dy, w=w: dy @ w]
        else:
            one = torch.ones((), device="cuda")
            xq, dyq, wq = x.to(FP8), dy.to(FP8), w.to(FP8)
            wt = wq.t().contiguous().t()
            ops += [lambda a=xq, b=wq.t(): torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                    lambda a=dyq, b=wt: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)]
    return _time(lambda: [op() for op in ops], steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--arms", nargs="*", default=["mm-bf16", "mm-fp8", "bf16", "fp8", "bf16-compile", "fp8-compile",
                                                       "fp8-fast-compile"])
    args = ap.parse_args()
    ms = {}
    for name in args.arms:
        kind = name.removeprefix("mm-")
        ms[name] = matmul_arm(kind, args.tokens, args.steps) if name.startswith("mm-") else \
            layer_arm(name, args.tokens, args.steps)
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
    for fp8, bf16 in (("fp8-compile", "bf16-compile"), ("fp8-fast-compile", "bf16-compile"), ("fp8", "bf16"),
                      ("mm-fp8", "mm-bf16")):
        if fp8 in ms and bf16 in ms:
            key = "fp8_linear_speedup_vs_bf16" if fp8 == "fp8-compile" else f"{fp8}_vs_{bf16}"
            lines.append(f"{key}: {ms[bf16] / ms[fp8]:.2f}")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(json.dumps(ms))


if __name__ == "__main__":
    main()
