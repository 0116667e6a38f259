"""Issue 5 benchmark, one process after another in one script, each under a 24 GiB per-process cap:
(1) the seed recipe through HF `Trainer` (gradient checkpointing on all layers, micro-batch 1,
accumulation 16, bf16, adamw_torch), (2) fitrun's training on the same config, data, seed and global
batch, (3) fitrun's tuned config. Reports tokens/s, peak reserved GiB, MFU and loss after the same steps.

    PYTHONPATH=. python bench/throughput_24gb.py --steps 6 --out bench/results/throughput-24gb.md
"""

import argparse
import datetime
import json
import subprocess
import sys
import time

from gpu import hardware, matmul_tflops

GIB = 1024**3
CAP_GIB = 24.0
JOB = "jobs/llama3-8b-lora.yaml"



def flops_per_token(seq: int) -> float:
    """Model FLOPs per token for LoRA on Llama-3-8B (no recompute counted): frozen linears forward +
    input-gradient backward, attention, LoRA, lm_head (see shared notes, section 9)."""
    h, inter, layers, vocab, kv = 4096, 14336, 32, 128256, 1024
    linear = 2 * (h * h * 2 + h * kv * 2 + 3 * h * inter)       # forward multiply-adds x2
    attention = 4 * (seq / 2) * h
    return layers * (2 * linear + 3.5 * attention) + 2 * 2 * h * vocab


def seed_recipe(steps: int, accum: int) -> dict:
    """The seed recipe, exactly: HF Trainer, gradient checkpointing (non-reentrant), bf16, adamw_torch."""
    import torch

    from runner.loading import load_job
    from runner.model import build_model, build_tokenizer

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_per_process_memory_fraction(CAP_GIB * GIB / torch.cuda.get_device_properties(0).total_memory)
    spec = load_job(JOB, ["model.init=random"])
    tok = build_tokenizer(spec.tokenizer, spec.model)
    model = build_model(spec.model, spec.lora, torch.device("cuda" if cuda else "cpu"), len(tok), seed=0)
    return hf_trainer(model, ordered_rows(spec, tok, steps * accum), accum, steps, spec.data.sequence_len)


def ordered_rows(spec, tok, count: int) -> list[dict]:
    """The first `count` micro-batches (of one row) in the exact order fitrun's worker reads them
    (seed 0), so a Trainer reading them sequentially sees what fitrun sees, step by step."""
    from runner.data import MicroBatches, tokenize

    order = MicroBatches(tokenize(spec.data, tok, seed=0).train, 1, tok.pad_token_id, spec.training.seed)
    return [{k: v[0].tolist() for k, v in order.next().items()} for _ in range(count)]


def hf_trainer(model, rows: list[dict], accum: int, steps: int, seq: int, gradient_checkpointing: bool = True,
               micro_batch: int = 1, **extra_args) -> dict:
    """`steps` optimizer steps of HF Trainer over `rows` in order (micro-batch `micro_batch`, bf16, adamw_torch,
    non-reentrant gradient checkpointing): tokens/s between the first and the last step, peak
    reserved memory, the losses."""
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    cuda = torch.cuda.is_available()
    times = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    args = TrainingArguments(output_dir="/tmp/seed", per_device_train_batch_size=micro_batch,
                             gradient_accumulation_steps=accum,
                             bf16=cuda, gradient_checkpointing=gradient_checkpointing, use_cpu=not cuda,
                             gradient_checkpointing_kwargs={"use_reentrant": False}, optim="adamw_torch",
                             learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0, max_steps=steps,
                             logging_steps=1, save_strategy="no", report_to=[], seed=0, max_grad_norm=1.0,
                             dataloader_drop_last=True, **extra_args)

    class InOrder(Trainer):
        def _get_train_sampler(self, *a, **kw):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    trainer = InOrder(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=default_data_collator,
                      callbacks=[Clock()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    step_s = (times[-1] - times[0]) / (len(times) - 1)
    return {"tokens_per_s": accum * micro_batch * seq / step_s,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else 0.0, "loss": losses[-1],
            "losses": losses}


def fitrun(steps: int, overrides: list[str]) -> dict:
    import torch

    from runner.loading import load_job
    from runner.train.driver import run_train

    cap = [f"resources.gpu_memory_gib={CAP_GIB}"] if torch.cuda.is_available() else []
    spec = load_job(JOB, ["model.init=random", f"training.max_steps={steps}", "training.warmup_steps=0",
                          "training.save_steps=null", "training.lr_scheduler=cosine", "name=bench-throughput",
                          "tracking.experiment_name=bench-throughput", *cap, *overrides])
    s = run_train(spec, resume=False)
    return {"tokens_per_s": s["tokens_per_s"], "peak_reserved_gib": s["peak_reserved_gib"], "loss": s["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", help="internal: run one arm in this process and print its JSON")
    ap.add_argument("--job", default=JOB, help="a smaller job, to try the script on a CPU")
    ap.add_argument("--tuned-job", help="winner.yaml written by `fitrun tune`: arm (3) runs its tuned values")
    ap.add_argument("--cap-gib", type=float, default=CAP_GIB,
                    help="the allocator cap (default 24; a card's budget: `fitrun estimate --gpu NAME`)")
    args = ap.parse_args()
    globals()["JOB"], globals()["CAP_GIB"] = args.job, args.cap_gib
    if args.tuned_job:
        ARMS["tuned"] = tuned_overrides(args.tuned_job)
        LABELS["tuned"] = f"(3) fitrun tuned: {args.tuned_job}"
    if args.only:
        if args.only == "seed":
            print("RESULT " + json.dumps(seed_recipe(args.steps, 16)), flush=True)
        else:
            arm = ARMS[args.only]
            print("RESULT " + json.dumps(fitrun(args.steps, arm)), flush=True)
        return
    results = {}
    for name in ["seed", *ARMS]:  # each arm in a fresh process: no allocator state carried over
        p = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--out", args.out, "--only", name,
                            "--job", args.job, *(["--tuned-job", args.tuned_job] if args.tuned_job else [])],
                           capture_output=True, text=True)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        results[name] = json.loads(line[7:]) if line else {"error": (p.stdout + p.stderr)[-800:]}
        print(name, results[name], flush=True)
    import torch

    if not torch.cuda.is_available():
        print(json.dumps(results, indent=1))
        return
    peak = matmul_tflops()
    fpt = flops_per_token(2048)
    base = results["seed"].get("tokens_per_s", float("nan"))
    lines = [f"# Throughput under a {CAP_GIB:g} GiB cap ({datetime.date.today()})", "",
             f"- hardware: {hardware()}; measured bf16 matmul "
             f"{peak:.0f} TFLOP/s (8192^3); model FLOPs/token {fpt / 1e9:.2f} G (no recompute counted)",
             f"- Llama-3-8B architecture (random init, seed 0), seq 2048 packed shipped data, global batch 16, "
             f"{args.steps} optimizer steps each, every arm in a fresh process capped at {CAP_GIB:g} GiB",
             "- command: `PYTHONPATH=. python bench/throughput_24gb.py " f"--steps {args.steps} --out <file>`", "",
             "| arm | tokens/s | x seed | peak reserved GiB | MFU % | loss at last step |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {LABELS[name]} | error | | | | |")
            continue
        lines.append(f"| {LABELS[name]} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f} | "
                     f"{r['peak_reserved_gib']:.2f} | {100 * r['tokens_per_s'] * fpt / (peak * 1e12):.1f} | {r['loss']:.4f} |")
    tuned = results.get("tuned", {}).get("tokens_per_s", float("nan"))
    lines += ["", f"speedup_vs_seed_recipe: {tuned / base:.2f}"]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


TUNED_FIELDS = {"lora": ["r", "lora_alpha", "adapter_dtype"],
                "training": ["micro_batch_size", "gradient_accumulation_steps", "compile", "kernels", "loss"],
                "activation_checkpointing": ["layers", "count", "placement", "policy", "offload"]}


def tuned_overrides(path: str) -> list[str]:
    """The values `fitrun tune` chose (winner.yaml), as overrides of the base job."""
    import yaml

    won = yaml.safe_load(open(path))
    return [f"{section}.{key}={json.dumps(won[section][key])}" for section, keys in TUNED_FIELDS.items()
            for key in keys if key in won.get(section, {})]


ARMS = {
    "fitrun-same": ["activation_checkpointing.count=null", "activation_checkpointing.layers=all", "training.loss=hf",
                    "training.micro_batch_size=1",
                    "training.gradient_accumulation_steps=16"],
    # The seed's own config (r16, mb1 x 16) with the levers that win outright: same loss as (1) expected.
    "levers-r16": ["lora.adapter_dtype=mixed", "training.compile=true", "activation_checkpointing.layers=none",
                   "activation_checkpointing.count=14"],
    # Default: the levers bench's choice (bench/results/levers-8b-2026-11-29.md); --tuned-job replaces it.
    "tuned": ["lora.adapter_dtype=mixed", "training.compile=true", "activation_checkpointing.layers=none",
              "activation_checkpointing.count=14", "training.micro_batch_size=1", "training.gradient_accumulation_steps=16"],
}
LABELS = {"seed": "(1) seed recipe: HF Trainer, all layers, mb1 x 16, r16",
          "fitrun-same": "(2) fitrun, same config (all layers, mb1 x 16, r16, HF loss)",
          "fitrun-chunked": "(2b) fitrun, same config + chunked loss",
          "levers-r16": "(2c) fitrun, seed config (r16, mb1 x 16) + mixed adapters + compile, k=14",
          "tuned": "(3) fitrun: mixed adapters + compile, r16, mb1 x 16, k=14"}


if __name__ == "__main__":
    main()
