"""Issue 12: which fp8 for the frozen base? fitrun's own Fp8Linear (runner/quant.py) against torchao's
two float8 paths, on the seven linears of one Llama-3-8B decoder layer (bf16 activations, 2048 tokens,
the input's gradient needed as in LoRA training, the weights frozen):

  bf16            plain nn.Linear, the unquantized base
  fitrun-fp8      runner.quant.Fp8Linear: e4m3 weight + rowwise scale, _scaled_mm forward and input grad
  torchao-train   torchao.float8 Float8Linear (convert_to_float8_training, rowwise recipe)
  torchao-weights torchao.quantization Float8DynamicActivationFloat8WeightConfig(PerRow): fp8 weights

For each: the frozen weight bytes it keeps, whether forward + backward to the input runs, and on CUDA
the time per forward + backward and the peak memory.

    PYTHONPATH=. python bench/torchao_fp8.py --out torchao-fp8.md      # torchao importable
"""

import argparse
import datetime
import time

import torch

HIDDEN, INTER, KV = 4096, 14336, 1024
SHAPES = {"q": (HIDDEN, HIDDEN), "k": (KV, HIDDEN), "v": (KV, HIDDEN), "o": (HIDDEN, HIDDEN),
          "gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}


class Linears(torch.nn.Module):
    """The decoder layer's linears, chained so each one's output feeds the loss."""

    def __init__(self, device):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.ModuleDict({n: torch.nn.Linear(i, o, bias=False, device=device, dtype=torch.bfloat16)
                                         for n, (o, i) in SHAPES.items()})
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        p = self.proj
        attn = p["o"](p["q"](x)) + (p["k"](x).sum() + p["v"](x).sum()) * 0
        return p["down"](torch.nn.functional.silu(p["gate"](x)) * p["up"](x)) + attn


def convert(name: str, model: Linears) -> Linears:
    if name == "fitrun-fp8":
        from runner.quant import Fp8Linear

        for n in list(model.proj):
            model.proj[n] = Fp8Linear(model.proj[n])
    elif name == "torchao-train":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("rowwise"))
    elif name == "torchao-weights":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return model


def frozen_bytes(model) -> dict[str, int]:
    out = {}
    for t in [*model.parameters(), *model.buffers()]:
        inner = [getattr(t, a) for a in ("qdata", "_data", "scale") if isinstance(getattr(t, a, None), torch.Tensor)]
        for x in inner or [t]:
            out[str(x.dtype).removeprefix("torch.")] = out.get(str(x.dtype).removeprefix("torch."), 0) + \
                x.numel() * x.element_size()
    return out


def arm(name: str, device: str, steps: int) -> dict:
    model = convert(name, Linears(device))
    res = {"bytes": frozen_bytes(model)}
    x = torch.randn(2048, SHAPES["q"][1], device=device, dtype=torch.bfloat16, requires_grad=True)
    try:
        for i in range(steps + 3):
            if i == 3:
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
            y = model(x)
            y.float().square().mean().backward()
            x.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
            res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["ms"] = 1000 * (time.perf_counter() - start) / steps
    except Exception as e:  # noqa: BLE001 - the arm's failure is the result
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--shrink", type=int, default=1, help="divide the layer's sizes (a quick CPU check)")
    args = ap.parse_args()
    for n, (o, i) in SHAPES.items():
        SHAPES[n] = (o // args.shrink, i // args.shrink)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import torchao

    hw = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    lines = [f"# fp8 for the frozen base: fitrun's Fp8Linear vs torchao ({datetime.date.today()})", "",
             f"- hardware: {hw}, torch {torch.__version__}, torchao {torchao.__version__}",
             "- the seven linears of one Llama-3-8B decoder layer, bf16 input of 2048 tokens that needs its gradient, "
             f"frozen weights; {args.steps} forward + backward after 3 warm-up", "",
             "| arm | frozen bytes by dtype (MiB) | ms per fwd+bwd | peak GiB | note |", "| --- | --- | --- | --- | --- |"]
    for name in ("bf16", "fitrun-fp8", "torchao-train", "torchao-weights"):
        try:
            r = arm(name, device, args.steps if device == "cuda" else 1)
        except Exception as e:  # noqa: BLE001 - conversion refused
            r = {"bytes": {}, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        b = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in sorted(r["bytes"].items()))
        ms = f"{r['ms']:.2f}" if "ms" in r and device == "cuda" else ""
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else ""
        lines.append(f"| {name} | {b} | {ms} | {peak} | {r.get('error', 'ok')} |")
        print(lines[-1], flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
