"""Issue 11: how long the memory estimate takes on the 8B, side by side in one script. Trace: the
few-layer trace replayed at full depth (what `fitrun estimate` does) against tracing all 32 layers,
in this process after one warm-up, with the two results compared byte for byte. CLI: `fitrun
estimate` on the shipped 24 GiB job from a fresh process, pinned to 2 cores, as a user runs it.

    PYTHONPATH=.:bench python bench/estimate_speed.py --out bench/results/estimate-speed.md
"""

import argparse
import datetime
import os
import platform
import statistics
import time
import warnings

import torch

from multigpu import JOB, estimate as cli_estimate, write
from runner.estimate import estimate
from runner.spec import load_job

CONFIGS = {
    "shipped (k=11 first, compile, mixed)": [],
    "k=0": ["activation_checkpointing.count=0"],
    "k=32": ["activation_checkpointing.count=32"],
    "unpacked, selective, k=16 every_n": ["data.packing=false", "activation_checkpointing.policy=selective",
                                       "activation_checkpointing.count=16", "activation_checkpointing.placement=every_n"],
    "2 workers FSDP": ["resources.num_workers=2", "resources.parallelism=fsdp"],
}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible"
    lines = [f"# Memory estimate speed on the 8B ({datetime.date.today()})", "",
             f"- hardware: CPU ({cpu}), torch {torch.__version__}",
             f"- job: `{JOB}` (model.init=random) with each row's `--set`s; trace times in one process after a "
             "warm-up estimate; CLI: `fitrun estimate` from a fresh process pinned to 2 cores, imports included", "",
             "| config | few layers traced, s | all 32 traced, s | same bytes |", "|---|---|---|---|"]
    estimate(load_job(JOB, ["model.init=random"]), "cuda")  # warm-up: first-call costs of fake tensors
    for name, sets in CONFIGS.items():
        spec = load_job(JOB, ["model.init=random", *sets])
        short, short_s = timed(lambda: estimate(spec, "cuda"))
        full, full_s = timed(lambda: estimate(spec, "cuda", trace_all_layers=True))
        same = short.components_gib == full.components_gib and short.peak_gib == full.peak_gib
        lines.append(f"| {name} | {short_s:.2f} | {full_s:.2f} | {'yes' if same else 'NO'} |")
    walls = [cli_estimate([])[1] for _ in range(5)]
    lines += ["", f"estimate_cli_wall_s_2_cores: {statistics.median(walls):.1f} (median of 5; runs: "
              f"{', '.join(f'{w:.1f}' for w in walls)})"]
    write(args.out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
