"""Issue 2 benchmark: the 8B job (random init) through `fitrun train` (Ray Train) with activation
checkpointing none / all / first-16, N steps each, in one process. Writes a markdown table.

    PYTHONPATH=. python bench/train_placements.py --steps 20 --accum 4 --out bench/results/x.md
"""

import argparse
import datetime
import json
from pathlib import Path

from gpu import hardware

from runner.loading import load_job
from runner.train.driver import run_train

PLACEMENTS = {"none": ["activation_checkpointing.count=null", "activation_checkpointing.layers=none"],
              "all": ["activation_checkpointing.count=null", "activation_checkpointing.layers=all"],
              "first-16": ["activation_checkpointing.layers=none", "activation_checkpointing.count=16",
                           "activation_checkpointing.placement=first"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", default="jobs/llama3-8b-lora.yaml")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--loss", default="hf")
    ap.add_argument("--placements", default="none,all,first-16")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for name in args.placements.split(","):
        spec = load_job(args.job, ["model.init=random", f"training.max_steps={args.steps}",
                                   f"training.gradient_accumulation_steps={args.accum}", "training.save_steps=null",
                                   "training.logging_steps=5", f"training.loss={args.loss}",
                                   f"name=bench-{name}", "tracking.experiment_name=bench-train", *PLACEMENTS[name]])
        try:
            s = run_train(spec, resume=False)
        except Exception as e:  # keep measuring the other placements
            rows.append({"placement": name, "error": repr(e)[:300]})
            continue
        seq = spec.data.sequence_len
        step_s = seq * spec.global_batch_size / s["tokens_per_s"]
        rows.append({"placement": name, "k": int(s["num_checkpointed_layers"]),
                     "peak_allocated_gib": s["peak_allocated_gib"], "peak_reserved_gib": s["peak_reserved_gib"],
                     "s_per_step": step_s, "s_per_micro_batch": step_s / args.accum,
                     "tokens_per_s": s["tokens_per_s"], "loss": s["loss"]})
        print(json.dumps(rows[-1]), flush=True)
    lines = [f"# 8B LoRA through Ray Train: checkpoint placements ({datetime.date.today()})", "",
             f"- hardware: {hardware()}",
             f"- job: {args.job} with model.init=random, r=16 all-linear (peft defaults, fp32 adapters), seq 2048 "
             f"packed, micro-batch 1, accumulation {args.accum}, {args.steps} optimizer steps, loss={args.loss}, "
             f"bf16, SDPA, AdamW (fused); tokens/s excludes the first step",
             "- command: `PYTHONPATH=. python bench/train_placements.py " + " ".join(
                 f"--{k} {v}" for k, v in vars(args).items() if k != "out") + "`", "",
             "| placement | k | peak allocated GiB | peak reserved GiB | s/step | s/micro-batch | tokens/s | loss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['placement']} | error: {r['error']} | | | | | | |")
        else:
            lines.append(f"| {r['placement']} | {r['k']} | {r['peak_allocated_gib']:.2f} | {r['peak_reserved_gib']:.2f} "
                         f"| {r['s_per_step']:.3f} | {r['s_per_micro_batch']:.3f} | {r['tokens_per_s']:,.0f} | {r['loss']:.4f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
