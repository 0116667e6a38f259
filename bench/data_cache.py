"""Issue 13: a 100k-conversation ShareGPT file through `fitrun train`, twice, with a fresh `datasets`
cache: the first run tokenizes, the second reads the cache. Measures the wall time from the command's
start to its first optimizer step. The file is written from our own shipped conversations (1-3
exchanges each, ShareGPT layout), so it is reproducible without downloads.

    PYTHONPATH=. python bench/data_cache.py --out bench/results/data-cache.md
"""

import argparse
import datetime
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = 100_000
ROLES = {"user": "human", "assistant": "gpt"}


def write_conversations(path: Path, rows: int = ROWS, seed: int = 0) -> None:
    source = [json.loads(line) for line in open("data/instructions.messages.jsonl")]
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(rows):
            turns = []
            for _ in range(rng.choice([1, 1, 2, 3])):
                turns += [{"from": ROLES[m["role"]], "value": m["content"]}
                          for m in rng.choice(source)["messages"] if m["role"] in ROLES]
            f.write(json.dumps({"id": f"c{i}", "conversations": turns}) + "\n")


def first_step(data: Path, tmp: Path, cache: Path, name: str) -> tuple[float, str]:
    """Seconds from `fitrun train` starting to its first step line; the run stops after step 1."""
    fmt = "messages" if data.name.startswith("instructions") else "sharegpt"
    args = [sys.executable, "-m", "runner", "train", "jobs/tiny-cpu.yaml", "--set", f"data.path={data}",
            "--set", f"data.format={fmt}", "--set", "training.max_steps=1", "--set", "training.eval_steps=null",
            "--set", "data.val_fraction=0", "--set", f"output_dir={tmp}/{name}", "--no-resume",
            "--set", f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db"]
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "FITRUN_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    start = time.time()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen, elapsed = [], float("nan")
    for line in proc.stdout:
        seen.append(line)
        if re.search(r"step +1/1 ", line) and elapsed != elapsed:
            elapsed = time.time() - start
    proc.wait()
    accounting = next((re.sub(r"^.*?data: ", "data: ", line.strip()) for line in seen if "rows read" in line), "")
    if proc.returncode != 0:
        raise SystemExit("".join(seen[-40:]))
    return elapsed, accounting


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        data = tmp / "sharegpt-100k.jsonl"
        write_conversations(data)
        shipped = Path("data/instructions.messages.jsonl").resolve()
        first_step(shipped, tmp, tmp / "hf-datasets", "warm-up")  # Python's and Ray's own first-run costs
        base, _ = first_step(shipped, tmp, tmp / "hf-datasets", "shipped")
        cold, accounting = first_step(data, tmp, tmp / "hf-datasets", "cold")
        cached, _ = first_step(data, tmp, tmp / "hf-datasets", "cached")
        size_mb = data.stat().st_size / 1e6
    lines = [f"# 100k conversations: first step, tokenizing vs cached ({datetime.date.today()})", "",
             f"- hardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (the CI-sized "
             "machine), no GPU", f"- data: {ROWS:,} ShareGPT conversations written from our shipped data "
             f"({size_mb:.0f} MB), `jobs/tiny-cpu.yaml` with `data.format=sharegpt`, seq 128",
             "- each number: wall time from `fitrun train` starting (Python imports, Ray start, data, model) "
             "to its first optimizer step, with a fresh `HF_DATASETS_CACHE` before the first run",
             f"- accounting line of the first run: `{accounting}`", "",
             f"first_step_s_shipped_data: {base:.1f}  (320 rows: the baseline, cached as well)",
             f"first_step_s_uncached: {cold:.1f}", f"first_step_s_cached: {cached:.1f}",
             f"cached_slowdown_vs_shipped_s: {cached - base:.1f}", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
