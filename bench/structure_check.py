"""After the structure change (issue 9): the shipped 24 GiB job through `fitrun train`, as before, and a
short QLoRA (nf4) smoke run of the new quantization lever under a 16 GiB cap. Random-init 8B.

    PYTHONPATH=. python bench/structure_check.py --out bench/results/structure-check.md
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

from gpu import hardware

RUNS = {
    "24gb-job": ("jobs/llama3-8b-lora-24gb-bf16.yaml", ["training.max_steps=20", "resources.gpu_memory_gib=24"]),
    "nf4-16gb-smoke": ("jobs/llama3-8b-lora-24gb-bf16.yaml",
                       ["training.max_steps=4", "model.quantization=nf4", "resources.gpu_memory_gib=16",
                        "training.compile=false", "activation_checkpointing.count=16", "name=nf4-smoke"]),
}
BEFORE = {"24gb-job": "12,133-12,562 tokens/s, 23.31 GiB reserved (bench/results/throughput-24gb-*, tune-24gb-fast-*)"}


def run(job: str, sets: list[str], out_dir: str, log_path: str) -> dict:
    args = [sys.executable, "-m", "runner", "train", job, "--set", "model.init=random", "--set", f"output_dir={out_dir}",
            "--set", f"tracking.tracking_uri=sqlite:///{out_dir}/mlflow.db", "--no-resume"]
    for s in sets:
        args += ["--set", s]
    with open(log_path, "w") as log_file:  # streamed, so a run cut short still leaves its log
        p = subprocess.run(args, stdout=subprocess.PIPE, stderr=log_file, text=True,
                           env={**os.environ, "FITRUN_PROGRESS": "0"})
    log = p.stdout + open(log_path).read()
    open(log_path, "a").write(p.stdout)
    if p.returncode != 0:
        return {"error": log[-3000:]}
    summary = json.loads(p.stdout[p.stdout.rindex("\n{") + 1:])
    predicted = [line for line in log.splitlines() if "predicted" in line]
    return {**summary, "log_tail": "\n".join(log.splitlines()[-6:]), "predicted": predicted[:1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", help="run just this one of " + ", ".join(RUNS))
    args = ap.parse_args()
    lines = [f"# Structure check on the GPU ({datetime.date.today()})", "", f"- hardware: {hardware()}",
             "- each run: `fitrun train` through Ray Train, random-init Llama-3-8B, packed shipped data, seq 2048", ""]
    for name, (job, sets) in RUNS.items():
        if args.only and name != args.only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            r = run(job, sets, tmp, os.path.splitext(args.out)[0] + f"-{name}.log")
        lines += [f"## {name}", "", f"- `{job}` with `{' '.join(sets)}`"]
        if "error" in r:
            lines += ["- FAILED:", "", "```", r["error"], "```", ""]
            continue
        lines += [f"- steady tokens/s: {r['tokens_per_s']:,.0f}", f"- peak reserved GiB: {r['peak_reserved_gib']:.2f}",
                  f"- peak allocated GiB: {r['peak_allocated_gib']:.2f}", f"- final loss: {r['loss']:.4f}",
                  f"- before the structure change: {BEFORE.get(name, 'n/a (new lever)')}", ""]
        lines += [f"{name}_tokens_per_s: {r['tokens_per_s']:.0f}", f"{name}_peak_reserved_gib: {r['peak_reserved_gib']:.2f}", ""]
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
