"""Issue 11: how long the memory estimate takes on the 8B, side by side in one script. Trace: the
few-layer trace replayed at full depth (what `fitrun estimate` does) against tracing all 32 layers,
in this process after one warm-up, with the two results compared byte for byte. CLI: `fitrun
estimate` on the shipped 24 GiB job from a fresh process, pinned to 2 cores, as a user runs it, under
each interpreter given (`--python`: the `python` of other venvs with the same packages), the runs
interleaved so that each sees the same machine load.

    PYTHONPATH=.:bench python bench/estimate_speed.py --out bench/results/estimate-speed.md \
        --python .venv/bin/python /tmp/pyenv-venv/bin/python
"""

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch
from multigpu import JOB, on_two_cores, write

from runner.estimate.trace import estimate
from runner.loading import load_job

CONFIGS = {
    "shipped (k=11 first, compile, mixed)": [],
    "k=0": ["activation_checkpointing.count=0"],
    "k=32": ["activation_checkpointing.count=32"],
    "unpacked, selective, k=16 every_n": ["data.packing=false", "activation_checkpointing.policy=selective",
                                       "activation_checkpointing.count=16", "activation_checkpointing.placement=every_n"],
    "2 workers FSDP": ["resources.num_workers=2", "resources.parallelism=fsdp"],
}
SHIPPED_JOB = "jobs/llama3-8b-lora-24gb.yaml"
CLI_RUNS = 5


def cli_wall(python: str) -> float:
    """`fitrun estimate` on the shipped job as a user runs it (its own process, 2 cores), in seconds."""
    p, wall = on_two_cores([python, "-m", "runner", "estimate", SHIPPED_JOB])
    p.check_returncode()
    return wall


def interpreter(python: str) -> str:
    """Which CPython `python` is, and how fast it runs plain Python (a 10M-step loop, in seconds):
    builds differ (a default pyenv build has no profile-guided optimization; distributions' have)."""
    code = ("import sys, time; t = time.perf_counter(); s = 0\nfor i in range(10_000_000): s += i\n"
            "print(sys.version.split()[0], sys.base_prefix, f'{time.perf_counter() - t:.2f}')")
    version, prefix, loop = subprocess.run([python, "-c", code], check=True, capture_output=True,
                                           text=True).stdout.split()
    return f"Python {version} from {prefix}, loop {loop} s"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--python", nargs="+", default=[sys.executable],
                    help="interpreters to time the CLI under (each needs fitrun's packages)")
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
    walls = {python: [] for python in args.python}
    for _ in range(CLI_RUNS):
        for python in args.python:
            walls[python].append(cli_wall(python))
    lines += ["", f"`fitrun estimate {SHIPPED_JOB}`, wall seconds from a fresh process on 2 cores, "
              f"{CLI_RUNS} runs each, interleaved:", "",
              "| interpreter | median s | runs |", "|---|---|---|"]
    lines += [f"| {interpreter(p)} (`{p}`) | {statistics.median(w):.1f} | {', '.join(f'{x:.1f}' for x in w)} |"
              for p, w in walls.items()]
    lines += ["", f"estimate_cli_wall_s_2_cores: {statistics.median(walls[args.python[0]]):.1f} "
              f"(median, under `{args.python[0]}`)"]
    write(args.out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
