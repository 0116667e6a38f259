"""Issue 11: the shipped 24 GiB job on 1 and 2 GPUs through `fitrun train` (DDP, FSDP2) at the same
global batch, the estimate against each measurement, and a 2-worker `fitrun tune` whose winner then
trains 20 steps under the same per-GPU cap. Random-init 8B, packed shipped data, seq 2048.

    PYTHONPATH=.:bench python bench/multigpu.py --phase train --out bench/results/multigpu-train.md
    PYTHONPATH=.:bench python bench/multigpu.py --phase tune --out bench/results/multigpu-tune.md
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

from gpu import hardware
from structure_check import run

JOB = "jobs/llama3-8b-lora-24gb-bf16.yaml"
CAP = ["resources.gpu_memory_gib=24", "training.max_steps=12", "training.measure_warmup_steps=3"]
TWO = ["resources.num_workers=2", "training.gradient_accumulation_steps=8"]  # global batch 16 either way
ARMS = {
    "1gpu": ([], {}),
    "2gpu-ddp": ([*TWO, "resources.parallelism=ddp"], {}),
    "2gpu-fsdp": ([*TWO, "resources.parallelism=fsdp"], {}),
    "2gpu-fsdp-k0": ([*TWO, "resources.parallelism=fsdp", "activation_checkpointing.count=0"], {}),
    "2gpu-ddp-dynamo-split": ([*TWO, "resources.parallelism=ddp"], {"FITRUN_DDP_GRAPH_SPLIT": "1"}),
}


def on_two_cores(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run `args` pinned to 2 cores, as the estimate's speed goal says; (the process, its wall seconds)."""
    start = time.time()
    p = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"},
                       preexec_fn=lambda: os.sched_setaffinity(0, {0, 1}))
    return p, time.time() - start


def estimate(sets: list[str]) -> tuple[dict, float]:
    args = [sys.executable, "-m", "runner", "estimate", JOB, "--json", "--set", "model.init=random"]
    for s in sets:
        args += ["--set", s]
    p, wall = on_two_cores(args)
    return (json.loads(p.stdout[p.stdout.index("{"):]) if p.returncode == 0 else {"error": p.stderr[-2000:]}), wall


def write(path: str, lines: list[str]) -> None:
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def phase_train(out: str, only: list[str] | None) -> None:
    lines = [f"# Multi-GPU: 1 vs 2 H200s through `fitrun train` ({datetime.date.today()})", "",
             f"- hardware: {hardware()}", f"- job: `{JOB}` (model.init=random) with `{' '.join(CAP)}`; 2 workers: "
             f"`{' '.join(TWO)}` (global batch 16 in every arm); tokens/s over steps 4-12", "",
             "| arm | tokens/s | peak alloc GiB | peak reserved GiB | estimate GiB | error % | estimate s (2 cores) |",
             "|---|---|---|---|---|---|---|"]
    results = {}
    for name, (sets, env) in ARMS.items():
        if only and name not in only:
            continue
        est, est_s = estimate([*CAP, *sets])
        os.environ.update(env)
        with tempfile.TemporaryDirectory() as tmp:
            r = run(JOB, [*CAP, *sets, f"name=mg-{name}"], tmp, os.path.splitext(out)[0] + f"-{name}.log")
        for k in env:
            os.environ.pop(k)
        results[name] = r
        if "error" in r:
            lines += [f"| {name} | FAILED: {r['error'].splitlines()[-1][:200]} | | | | | |"]
        else:
            pred = est.get("peak_gib", float("nan"))
            err = 100 * (pred - r["peak_reserved_gib"]) / r["peak_reserved_gib"]
            lines += [f"| {name} | {r['tokens_per_s']:,.0f} | {r['peak_allocated_gib']:.2f} | "
                      f"{r['peak_reserved_gib']:.2f} | {pred:.2f} | {err:+.1f} | {est_s:.1f} |"]
            r.update(predicted_gib=pred, estimate_error_pct=err, estimate_s=est_s)
        write(out, lines)
    lines.append("")
    one, ddp, fsdp = results.get("1gpu", {}), results.get("2gpu-ddp", {}), results.get("2gpu-fsdp", {})
    if "tokens_per_s" in one and "tokens_per_s" in ddp:
        lines.append(f"ddp_scaling_2gpu: {ddp['tokens_per_s'] / one['tokens_per_s']:.2f}")
        lines.append(f"estimate_error_ddp_pct: {ddp['estimate_error_pct']:+.1f}")
    if "tokens_per_s" in one and "tokens_per_s" in fsdp:
        lines.append(f"fsdp_scaling_2gpu: {fsdp['tokens_per_s'] / one['tokens_per_s']:.2f}")
        lines.append(f"estimate_error_fsdp_pct: {fsdp['estimate_error_pct']:+.1f}")
    for name, r in results.items():
        if "tokens_per_s" in r:
            lines.append(f"{name.replace('-', '_')}_tokens_per_s: {r['tokens_per_s']:.0f}")
            lines.append(f"{name.replace('-', '_')}_peak_reserved_gib: {r['peak_reserved_gib']:.2f}")
    write(out, lines)
    print("\n".join(lines))


def phase_tune(out: str, space: str) -> None:
    lines = [f"# Multi-GPU: a 2-worker tune under 24 GiB per GPU, then its winner ({datetime.date.today()})", "",
             f"- hardware: {hardware()}", f"- `fitrun tune {JOB} {space}` with `{' '.join(TWO)}`: every probe runs at "
             "world size 2 (one worker per GPU), under the per-process cap", ""]
    with tempfile.TemporaryDirectory() as tmp:
        winner = os.path.join(tmp, "winner.yaml")
        args = [sys.executable, "-m", "runner", "tune", JOB, space, "--out", winner, "--set", "model.init=random",
                "--set", f"output_dir={tmp}/tune", "--set", f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db"]
        for s in TWO:
            args += ["--set", s]
        start = time.time()
        log_path = os.path.splitext(out)[0] + "-tune.log"
        with open(log_path, "w") as log:
            p = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "FITRUN_PROGRESS": "0"})
        text = open(log_path).read()
        lines += [f"tune_wall_s: {time.time() - start:.0f}", "", "```",
                  *[line for line in text.splitlines() if "|" in line or "winner" in line.lower()][-40:], "```", ""]
        write(out, lines)
        if p.returncode != 0 or not os.path.exists(winner):
            lines += ["tune FAILED", "```", text[-3000:], "```"]
            write(out, lines)
            return
        lines += ["winner job:", "```yaml", open(winner).read(), "```"]
        r = run(winner, ["training.max_steps=20", "training.measure_warmup_steps=3", f"output_dir={tmp}/winner"],
                f"{tmp}/winner", os.path.splitext(out)[0] + "-winner.log")
        if "error" in r:
            lines += ["winner_2gpu_fits: no", "```", r["error"], "```"]
        else:
            lines += [f"winner_2gpu_fits: {'yes' if r['step'] >= 20 and not r.get('oom') else 'no'}",
                      f"winner_2gpu_steps: {r['step']}", f"winner_2gpu_tokens_per_s: {r['tokens_per_s']:.0f}",
                      f"winner_2gpu_peak_reserved_gib: {r['peak_reserved_gib']:.2f}"]
    write(out, lines)
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=["train", "tune"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*", help="train arms to run (default: all)")
    ap.add_argument("--space", default="search_spaces/fit-24gb-2gpu.yaml")
    args = ap.parse_args()
    if args.phase == "train":
        phase_train(args.out, args.only)
    else:
        phase_tune(args.out, args.space)


if __name__ == "__main__":
    main()
