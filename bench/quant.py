"""Issue 12: quantized bases (fp8, nf4) against the seed recipe and the peers, in one script on one
GPU. Every arm runs in a fresh process under its memory cap (set_per_process_memory_fraction), on
the Llama-3-8B architecture with random weights (seed 0), the shipped data packed to 2048 tokens,
global batch 16, LoRA r16 on all linears (the 24 GiB bf16-base job: r8):

  seed-24        the seed recipe: HF Trainer + gradient checkpointing on every layer, bf16 base
  fitrun-24      fitrun's shipped jobs/llama3-8b-lora-24gb-bf16.yaml (bf16 base)
  fitrun-24-fp8  fitrun, fp8 base; recomputed layers: the fewest the estimate fits under the cap
  fitrun-16-fp8, fitrun-16-nf4, fitrun-16-int8(-mb2)   the same under 16 GiB
  fitrun-24-int8(-mb2)   int8 under 24 GiB
  int8-eager-k16  int8 without compile, 16 layers recomputed, no cap (what a recomputed int8 layer keeps)
  fitrun-24-shipped, fitrun-16-shipped   the shipped jobs/llama3-8b-lora-{24,16}gb.yaml (the winners of
                 `fitrun tune` over the quantization spaces) as a user runs them, 20 steps
  hf-qlora-16    HF Trainer + peft QLoRA (nf4, double quant, prepare_model_for_kbit_training, GC)
  unsloth-24     Unsloth 16-bit LoRA, its offloaded gradient checkpointing
  unsloth-16     Unsloth 4-bit QLoRA, the same
  loss-none, loss-fp8, loss-nf4, loss-int8   fitrun, 100 steps (micro-batch 1 x 2), same rows and seed, no cap:
                 the loss after 100 steps and the eval loss on the held-out 5%

The peers load the random 8B from a local directory (save_pretrained of the same weights, written once).
Results accumulate in --state (a JSON file), so the arms can be spread over several commands; the
markdown is written from everything the state holds.

    PYTHONPATH=.:bench python bench/quant.py --state /tmp/quant.json --arms seed-24,fitrun-24-fp8 --out quant.md
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from throughput_24gb import GIB, flops_per_token, hf_trainer, ordered_rows

JOB = "jobs/llama3-8b-lora.yaml"
BF16_JOB = "jobs/llama3-8b-lora-24gb-bf16.yaml"  # the fitrun-24 arm
SHIPPED_STEPS = 20  # the shipped tuned jobs: long enough to show they train without OOM
LOCAL_DIR = Path("/tmp/llama3-8b-random")
STEPS = 4  # optimizer steps of global batch 16 per speed arm
LOSS_STEPS = 100
LOSS_DATA = Path("/tmp/quant-loss.sharegpt.jsonl")
LOSS_ROWS = 4000  # ShareGPT conversations from bench/data_cache.py: ~250 packed rows, 200 read in 100 steps
LOSS_LR = 2e-5
OUTLIER_CHANNELS = 4  # Llama-class models have a handful of massive-activation channels
MARGIN_GIB = 0.5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FITRUN = ["model.init=random", "lora.adapter_dtype=mixed", "training.compile=true", "training.warmup_steps=0",
          "training.save_steps=null", "activation_checkpointing.layers=none", "activation_checkpointing.placement=first",
          "tracking.experiment_name=bench-quant"]

ARMS = {  # name: (cap GiB, what)
    "seed-24": (24, "seed recipe: HF Trainer + GC (all layers), bf16, r16"),
    "fitrun-24": (24, "fitrun's 24 GiB bf16-base job: r8, first 11 recomputed, compile, mixed adapters"),
    "fitrun-24-fp8": (24, "fitrun fp8 base, r16"),
    "fitrun-24-fp8-mb2": (24, "fitrun fp8 base, r16, micro-batch 2 x 8"),
    "fitrun-16-fp8": (16, "fitrun fp8 base, r16"),
    "fitrun-16-nf4": (16, "fitrun nf4 base, r16"),
    "fitrun-16-int8": (16, "fitrun int8 base (LLM.int8), r16"),
    "fitrun-16-int8-mb2": (16, "fitrun int8 base (LLM.int8), r16, micro-batch 2 x 8"),
    "fitrun-24-int8": (24, "fitrun int8 base (LLM.int8), r16"),
    "fitrun-24-int8-mb2": (24, "fitrun int8 base (LLM.int8), r16, micro-batch 2 x 8; held out from the estimate's int8 fit"),
    "fitrun-24-shipped": (24, "fitrun jobs/llama3-8b-lora-24gb.yaml, the tune's winner: fp8, r16, micro-batch 2 x 8, "
                              "first 12 recomputed, 20 steps"),
    "fitrun-16-shipped": (16, "fitrun jobs/llama3-8b-lora-16gb.yaml, the tune's winner: fp8, r16, micro-batch 2 x 8, "
                              "first 27 recomputed, 20 steps"),
    "int8-eager-k16": (None, "fitrun int8 base, r16, eager, first 16 recomputed, no cap: what int8 keeps in a "
                             "recomputed layer without compile"),
    "hf-qlora-16": (16, "HF Trainer + peft QLoRA (nf4, double quant), GC, r16"),
    "unsloth-24": (24, "Unsloth 16-bit LoRA, offloaded GC, r16"),
    "unsloth-16": (16, "Unsloth 4-bit QLoRA, offloaded GC, r16"),
    "loss-none": (None, "fitrun bf16 base, 100 steps"),
    "loss-fp8": (None, "fitrun fp8 base, 100 steps"),
    "loss-nf4": (None, "fitrun nf4 base, 100 steps"),
    "loss-int8": (None, "fitrun int8 base, 100 steps"),
    # issue 25: fp8 with cuBLASLt's fast accumulation in both matmuls, and the outlier stress case (OUTLIER_CHANNELS
    # input channels of every q/k/v and gate/up 100x the rest, runner.model.add_outlier_channels) for bf16 and fp8
    "loss-fp8-fast": (None, "fitrun fp8 base, fast accumulation (forward and input gradient), 100 steps"),
    "loss-none-outliers": (None, "fitrun bf16 base with outlier channels, 100 steps"),
    "loss-fp8-outliers": (None, "fitrun fp8 base with outlier channels, 100 steps"),
    "loss-fp8-fast-outliers": (None, "fitrun fp8 base with outlier channels, fast accumulation, 100 steps"),
}


def cap_memory(cap_gib):
    import torch

    if cap_gib:
        torch.cuda.set_per_process_memory_fraction(cap_gib * GIB / torch.cuda.get_device_properties(0).total_memory)


def job_and_tokenizer(overrides=()):
    from runner.loading import load_job
    from runner.model import build_tokenizer

    spec = load_job(JOB, ["model.init=random", *overrides])
    return spec, build_tokenizer(spec.tokenizer, spec.model)


def write_local_model() -> None:
    """The random 8B (seed 0, bf16) and the tokenizer, saved as a pretrained model directory."""
    import torch

    from runner.model import build_base

    if (LOCAL_DIR / "config.json").exists():
        return
    spec, tok = job_and_tokenizer()
    base = build_base(spec.model, torch.device("cuda"), len(tok), seed=0)
    base.save_pretrained(LOCAL_DIR)
    tok.save_pretrained(LOCAL_DIR)


def fewest_recomputed(overrides: list[str], cap_gib: float) -> tuple[int, float]:
    """The smallest k (first-k placement) whose estimate fits cap - margin, by bisection, and its estimate."""
    from runner.estimate.trace import estimate
    from runner.loading import load_job

    def predicted(k):
        spec = load_job(JOB, [*FITRUN, *overrides, f"activation_checkpointing.count={k}"])
        return estimate(spec, "cuda").peak_reserved_gib

    lo, hi = 0, 32
    while lo < hi:
        mid = (lo + hi) // 2
        if predicted(mid) <= cap_gib - MARGIN_GIB:
            hi = mid
        else:
            lo = mid + 1
    return lo, predicted(lo)


def fitrun_arm(name: str, cap_gib, overrides: list[str], job: str = JOB, steps: int = STEPS) -> dict:
    from runner.estimate.trace import estimate
    from runner.loading import load_job
    from runner.train.driver import run_train

    cap = [f"resources.gpu_memory_gib={cap_gib}"] if cap_gib else []
    base = FITRUN if job == JOB else ["model.init=random", "training.save_steps=null", "training.warmup_steps=0"]
    spec = load_job(job, [*base, *overrides, f"training.max_steps={steps}", f"name=bench-{name}",
                          f"output_dir=/tmp/bench-quant/{name}", *cap])
    predicted = estimate(spec, "cuda").peak_reserved_gib
    s = run_train(spec, resume=False)
    return {"tokens_per_s": s["tokens_per_s"], "peak_reserved_gib": s["peak_reserved_gib"], "loss": s["loss"],
            "peak_allocated_gib": s.get("peak_allocated_gib"),
            "eval_loss": s.get("eval_loss"), "predicted_gib": predicted,
            "config": " ".join(o for o in overrides if not o.startswith(("data.", "training.eval")))}


def quant_arm(name: str, cap_gib: float, quantization: str, micro_batch: int = 1) -> dict:
    overrides = [f"model.quantization={quantization}", f"training.micro_batch_size={micro_batch}",
                 f"training.gradient_accumulation_steps={16 // micro_batch}"]
    k, _ = fewest_recomputed(overrides, cap_gib)
    return fitrun_arm(name, cap_gib, [*overrides, f"activation_checkpointing.count={k}"])


def loss_arm(name: str, quantization: str) -> dict:
    """100 steps on conversations none of which repeats (the shipped 36 KB file is memorized to a loss
    near 0 by then, which makes a relative gap meaningless), at a learning rate that keeps the loss
    well away from 0 within 100 steps."""
    # every layer recomputed (the same loss: recompute is exact) so four arms share an 80 GB card at once
    overrides = [f"model.quantization={quantization}", "training.compile=false", "activation_checkpointing.count=32",
                 "training.gradient_accumulation_steps=2", f"data.path={LOSS_DATA}", "data.format=sharegpt",
                 f"training.learning_rate={LOSS_LR}"]
    return fitrun_arm(name, None, overrides, steps=LOSS_STEPS)


def hf_qlora_arm(cap_gib: float) -> dict:
    """The common recipe: transformers + bitsandbytes nf4 + peft, prepare_model_for_kbit_training, HF Trainer."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cap_memory(cap_gib)
    spec, tok = job_and_tokenizer()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(LOCAL_DIR, quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": 0}, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    return hf_trainer(model, ordered_rows(spec, tok, STEPS * 16), 16, STEPS, spec.data.sequence_len)


def unsloth_arm(cap_gib: float, four_bit: bool, micro_batch: int = 1, checkpointing: bool | str = "unsloth",
                steps: int = STEPS) -> dict:
    """Unsloth as its README trains: FastLanguageModel, its offloaded checkpointing ("unsloth"; or True: plain
    gradient checkpointing), a plain HF Trainer, micro-batch x accumulation = 16 sequences."""
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    import torch
    import unsloth  # noqa: F401  (first, so it patches transformers and peft)
    from unsloth import FastLanguageModel

    cap_memory(cap_gib)
    spec, tok = job_and_tokenizer()
    model, _ = FastLanguageModel.from_pretrained(model_name=str(LOCAL_DIR), max_seq_length=spec.data.sequence_len,
                                                 dtype=torch.bfloat16, load_in_4bit=four_bit, local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0, bias="none",
                                             target_modules=TARGETS, use_gradient_checkpointing=checkpointing,
                                             random_state=0)
    return hf_trainer(model, ordered_rows(spec, tok, steps * 16), 16 // micro_batch, steps, spec.data.sequence_len,
                      gradient_checkpointing=False,  # Unsloth's own checkpointing, set by get_peft_model
                      micro_batch=micro_batch)


def run_arm(name: str) -> dict:
    from throughput_24gb import seed_recipe

    if name == "local-model":
        write_local_model()
        return {}
    cap = ARMS[name][0]
    if name == "seed-24":
        return seed_recipe(STEPS, 16)
    if name == "fitrun-24":
        return fitrun_arm(name, cap, [], job=BF16_JOB)
    if name.endswith("-shipped"):
        return fitrun_arm(name, cap, [], job=f"jobs/llama3-8b-lora-{cap}gb.yaml", steps=SHIPPED_STEPS)
    if name.startswith("fitrun-"):
        quantization, *mb = name.split("-")[2:]
        return quant_arm(name, cap, quantization, int(mb[0][2:]) if mb else 1)
    if name == "int8-eager-k16":
        return fitrun_arm(name, None, ["model.quantization=int8", "training.compile=false", "activation_checkpointing.count=16"])
    if name.startswith("loss-"):
        return loss_arm(name, name.split("-")[1])
    if name == "hf-qlora-16":
        return hf_qlora_arm(cap)
    if name.startswith("unsloth-"):
        return unsloth_arm(cap, four_bit=cap < 24)
    raise ValueError(name)


def arm_env(name: str) -> dict[str, str]:
    """The environment an arm's process adds: fp8's fast accumulation, the outlier stress case."""
    parts = name.split("-")
    return {"FITRUN_FP8_FAST_ACCUM": "all" if "fast" in parts else "none",
            "FITRUN_RANDOM_OUTLIERS": str(OUTLIER_CHANNELS if "outliers" in parts else 0)}


def loss_gaps(results: dict) -> list[str]:
    """`loss_gap_<arm>_pct`: each quantized loss arm against the bf16 arm of the same model (outliers or not)."""
    lines = []
    for name in [n for n in ARMS if n.startswith("loss-") and not n.startswith("loss-none")]:
        base = "loss-none-outliers" if name.endswith("-outliers") else "loss-none"
        q, b = results.get(name, {}), results.get(base, {})
        if "loss" in q and "loss" in b:
            key = name.removeprefix("loss-").replace("-", "_")
            lines.append(f"loss_gap_{key}_pct: {100 * (q['loss'] - b['loss']) / b['loss']:+.2f}")
    return lines


def estimate_cell(r: dict) -> str:
    """The predicted GiB of an arm; where the estimate changed after the run (a term fitted to it), also
    what it said at the run."""
    cell = f"{r['predicted_gib']:.2f}" if r.get("predicted_gib") else ""
    if r.get("predicted_gib_at_run"):
        cell += f" (at the run: {r['predicted_gib_at_run']:.2f})"
    return cell


def report(results: dict, out: str, command: str) -> str:
    from gpu import hardware

    def tps(name):
        return results.get(name, {}).get("tokens_per_s", float("nan"))

    def best(*names):  # the fastest arm that ran
        return max((tps(n) for n in names if tps(n) == tps(n)), default=float("nan"))

    seed = tps("seed-24")
    lines = [f"# Quantized bases vs the seed recipe and the peers ({datetime.date.today()})", "",
             f"- hardware: {results.get('_hardware', hardware())}",
             "- Llama-3-8B architecture, random weights (seed 0), shipped data packed to 2048 tokens, global batch 16 "
             f"(micro-batch 1 x 16), {STEPS} optimizer steps per speed arm (tokens/s over the last {STEPS - 1}; the "
             f"-shipped arms: the job's own micro-batch, {SHIPPED_STEPS} steps), "
             "every arm in a fresh process under its cap; model FLOPs/token "
             f"{flops_per_token(2048) / 1e9:.2f} G",
             f"- command: `{command}`", "",
             "| arm | cap GiB | tokens/s | x seed | peak reserved GiB | estimate GiB | loss | what |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, (cap, what) in ARMS.items():
        r = results.get(name)
        if r is None or name.startswith("loss-") or name == "local-model":
            continue
        if "error" in r:
            lines.append(f"| {name} | {cap} | error | | | | | {what}: `{r['error'][-300:]!s}` |".replace("\n", " "))
            continue
        config = f" ({r['config']})" if r.get("config") else ""
        lines.append(f"| {name} | {cap} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / seed:.2f} | "
                     f"{r['peak_reserved_gib']:.2f} | {estimate_cell(r)} | {r['loss']:.4f} | {what}{config} |")
    best24, best16 = (best(*[n for n, (c, _) in ARMS.items() if n.startswith("fitrun-") and c == cap])
                      for cap in (24, 16))
    lines += ["", f"speedup_vs_seed_recipe_24gib: {best24 / seed:.2f}", f"fits_16gib_tokens_per_s: {best16:.0f}",
              f"vs_unsloth_24gib: {best24 / tps('unsloth-24'):.2f}", f"vs_unsloth_16gib: {best16 / tps('unsloth-16'):.2f}",
              f"vs_hf_qlora_16gib: {best16 / tps('hf-qlora-16'):.2f}"]
    loss = {n.removeprefix("loss-"): results.get(n, {}) for n in ARMS if n.startswith("loss-")}
    lines += loss_gaps(results)
    lines += ["", f"## Loss after {LOSS_STEPS} steps", "",
              f"Micro-batch 1 x 2, no cap, every layer recomputed, eager; {LOSS_ROWS:,} ShareGPT conversations from "
              f"bench/data_cache.py (none repeats within the {LOSS_STEPS} steps), learning rate {LOSS_LR:g}; the loss "
              "arms of one command run at once on the GPU, so their tokens/s are not speeds.", "",
              "| base | train loss at the last step | peak reserved GiB | estimate GiB |", "| --- | --- | --- | --- |"]
    for q, r in loss.items():
        if "error" in r:
            lines.append(f"| {q} | error: `{r['error'][-200:]}` | | |".replace("\n", " "))
        elif r:
            lines.append(f"| {q} | {r['loss']:.4f} | {r['peak_reserved_gib']:.2f} | {estimate_cell(r)} |")
    text = "\n".join(lines) + "\n"
    Path(out).write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms to run now ('' for the report only)")
    ap.add_argument("--state", required=True, help="JSON file the results accumulate in")
    ap.add_argument("--out", required=True)
    ap.add_argument("--uns-path", default="", help="extra PYTHONPATH for the Unsloth arms only")
    ap.add_argument("--only", help="internal: run one arm in this process and print its JSON")
    args = ap.parse_args()
    if args.only:
        print("RESULT " + json.dumps(run_arm(args.only)), flush=True)
        return
    state = Path(args.state)
    results = json.loads(state.read_text()) if state.exists() else {}
    names = [n for n in args.arms.split(",") if n]  # none: rewrite the report from the state
    if any(n.startswith(("hf-", "unsloth-")) for n in names) and not (LOCAL_DIR / "config.json").exists():
        names.insert(0, "local-model")  # in its own process: its 15 GiB must not count under an arm's cap
    if any(n.startswith("loss-") for n in names) and not LOSS_DATA.exists():
        from data_cache import write_conversations

        write_conversations(LOSS_DATA, LOSS_ROWS)
    # Speed arms one at a time; the loss arms measure quality, not speed, and share the GPU at once.
    groups = [[n] for n in names if not n.startswith("loss-")] + [[n for n in names if n.startswith("loss-")]]
    for group in filter(None, groups):
        started = time.time()
        procs = {}
        for name in group:
            env = {**os.environ, **arm_env(name)}
            if name.startswith("unsloth-") and args.uns_path:
                env["PYTHONPATH"] = f"{args.uns_path}:{env.get('PYTHONPATH', '')}"
            procs[name] = subprocess.Popen([sys.executable, __file__, "--only", name, "--state", args.state,
                                            "--out", args.out], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True, env=env)
        for name, p in procs.items():
            output = p.communicate()[0]
            line = next((x for x in output.splitlines() if x.startswith("RESULT ")), None)
            results[name] = json.loads(line[7:]) if line else {"error": output[-1500:]}
            results[name]["wall_s"] = round(time.time() - started)
            print(name, json.dumps(results[name])[:700], flush=True)
        state.write_text(json.dumps(results, indent=1))
    print(report(results, args.out, "PYTHONPATH=.:bench python bench/quant.py --state S --uns-path U --arms A --out F"))


if __name__ == "__main__":
    main()
