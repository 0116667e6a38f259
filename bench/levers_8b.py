"""What each memory/speed lever saves and costs, on the 8B architecture, side by side in one script.

Every variant runs in a fresh process (kernels patch modules; no allocator state carried over) with
the same random-init weights (seed 0) and the same batch; for each (micro-batch, k) it measures the
median seconds per micro-batch (forward + backward) and peak allocated / reserved GiB including
the AdamW state, with no memory cap. It also checks each variant's loss and LoRA gradients against
the eager fp32-adapter baseline on one batch.

    PYTHONPATH=. python bench/levers_8b.py --out bench/results/levers-8b.md
"""

import argparse
import datetime
import subprocess
import sys
import time

import torch
from gpu import hardware, matmul_tflops

GIB = 1024**3
JOB = "jobs/llama3-8b-lora.yaml"
VARIANTS = {
    "eager": [],
    "mixed": ["lora.adapter_dtype=mixed"],
    "bf16": ["lora.adapter_dtype=model"],
    "liger": ["lora.adapter_dtype=mixed", "training.kernels=liger", "training.loss=liger"],
    "compile": ["lora.adapter_dtype=mixed", "training.compile=true"],
    "selective": ["lora.adapter_dtype=mixed", "activation_checkpointing.policy=selective"],
    "offload": ["lora.adapter_dtype=mixed", "activation_checkpointing.offload=true"],
}
LABELS = {
    "eager": "eager, fp32 adapters (peft default), chunked loss",
    "mixed": "+ mixed adapters (fp32 weights, bf16 compute, shared input)",
    "bf16": "bf16 adapters (`lora.adapter_dtype: model`)",
    "liger": "mixed + Liger RMSNorm/SwiGLU/RoPE + Liger fused linear-CE",
    "compile": "mixed + torch.compile per decoder layer",
    "selective": "mixed + selective recompute in checkpointed layers",
    "offload": "mixed + checkpointed inputs offloaded to pinned host memory",
}


def run_variant(name: str, settings: list[tuple[int, int]], reps: int, r: int) -> dict:
    from runner.loading import load_job
    from runner.model import build_trainable
    from runner.recompute import apply_checkpointing

    spec = load_job(JOB, ["model.init=random", f"lora.r={r}", f"lora.lora_alpha={2 * r}", *VARIANTS[name]])
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    trainable = build_trainable(spec, dev, layers=[])  # the job's levers; k is placed per setting below
    model, net = trainable.model, trainable.net
    build_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 128000, (4, 2048), generator=gen).to(dev)
    out = {"build_s": build_s, "settings": []}

    # Equivalence on one batch: B set non-zero (seeded) so that every adapter carries gradient.
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=1e-3)
    apply_checkpointing(model, [])
    loss = net(input_ids=ids[:1], labels=ids[:1]) / 2047
    loss.backward()
    out["check_loss"] = float(loss)
    out["check_grads"] = {n: p.grad.float().cpu() for n, p in model.named_parameters()
                          if p.requires_grad and (".layers.0." in n or ".layers.31." in n)}
    opt.zero_grad(set_to_none=True)

    for mb, k in settings:
        ac = spec.activation_checkpointing
        apply_checkpointing(model, list(range(k)), ac.offload, ac.policy)
        batch = ids[:mb]
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        times = []
        try:
            for i in range(reps + 2):
                torch.cuda.synchronize()
                t = time.perf_counter()
                (net(input_ids=batch, labels=batch) / 2047).backward()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
                if i < 2:
                    opt.step()  # AdamW state exists from here on, as in training
                opt.zero_grad(set_to_none=True)
            row = {"mb": mb, "k": k, "s_per_micro": sorted(times[2:])[len(times[2:]) // 2],
                   "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                   "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB}
        except torch.OutOfMemoryError:
            row = {"mb": mb, "k": k, "error": "OOM"}
        opt.zero_grad(set_to_none=True)
        out["settings"].append(row)
        print(name, row, flush=True)
    return out



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--settings", default="1:0,1:32,2:0,2:16,2:32", help="mb:k pairs")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--only", help="internal: run one variant, write its result to --out")
    args = ap.parse_args()
    settings = [tuple(int(x) for x in s.split(":")) for s in args.settings.split(",")]
    if args.only:
        torch.save(run_variant(args.only, settings, args.reps, args.r), args.out)
        return
    results = {}
    peak = matmul_tflops()
    for name in args.variants.split(","):
        path = f"/tmp/levers-{name}.pt"
        p = subprocess.run([sys.executable, __file__, "--only", name, "--out", path, "--settings", args.settings,
                            "--reps", str(args.reps), "--r", str(args.r)], capture_output=True, text=True)
        if p.returncode:
            results[name] = {"error": (p.stdout + p.stderr)[-1500:]}
            print(name, "FAILED", results[name]["error"], flush=True)
        else:
            results[name] = torch.load(path, weights_only=False)
        write_report(args, results, peak)  # after every variant: a cut-short run keeps what it measured


def write_report(args, results: dict, peak: float) -> None:
    ref = results.get("eager", {})
    lines = [f"# Levers on the 8B architecture ({datetime.date.today()})", "",
             f"- hardware: {hardware()}; "
             f"bf16 matmul {peak:.0f} TFLOP/s measured (8192^3)",
             f"- Llama-3-8B architecture, random init (seed 0), bf16, SDPA, LoRA r={args.r} all linear, seq 2048, "
             "one fixed random batch, no memory cap; first k layers checkpointed",
             f"- s/micro: median forward+backward of {args.reps} micro-batches after 2 warm-up ones; "
             "peak includes weights and AdamW state",
             "- command: `PYTHONPATH=. python bench/levers_8b.py --out <file>`", "",
             "| variant | micro-batch | k | s / micro | tokens/s | peak allocated GiB | peak reserved GiB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, res in results.items():
        if "error" in res:
            lines.append(f"| {LABELS[name]} | failed: {res['error'].splitlines()[-1][:120]} | | | | | |")
            continue
        for row in res["settings"]:
            if "error" in row:
                lines.append(f"| {LABELS[name]} | {row['mb']} | {row['k']} | OOM | | | |")
                continue
            lines.append(f"| {LABELS[name]} | {row['mb']} | {row['k']} | {row['s_per_micro']:.3f} | "
                         f"{row['mb'] * 2048 / row['s_per_micro']:,.0f} | {row['peak_allocated_gib']:.2f} | "
                         f"{row['peak_reserved_gib']:.2f} |")
    lines += ["", "## Same loss and gradients as the eager path (one batch, micro-batch 1, no checkpointing)", "",
              "| variant | loss | loss rel. diff | max grad rel. diff (layers 0 and 31, per tensor) | build s |",
              "| --- | --- | --- | --- | --- |"]
    for name, res in results.items():
        if "error" in res or "check_loss" not in ref:
            continue
        rel = max(float((res["check_grads"][n] - g).norm() / g.norm().clamp_min(1e-30))
                  for n, g in ref["check_grads"].items())
        lines.append(f"| {LABELS[name]} | {res['check_loss']:.5f} | "
                     f"{abs(res['check_loss'] - ref['check_loss']) / ref['check_loss']:.1e} | {rel:.1e} | "
                     f"{res['build_s']:.0f} |")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
