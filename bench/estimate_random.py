"""Issue 26: the memory estimate on lever combinations drawn at random, not the ones it was fitted to.

    PYTHONPATH=. python bench/estimate_random.py draw --seed 2612 --n 21 --max-gib 42   # on a CPU: writes the draw
    PYTHONPATH=. python bench/harness.py run estimate-random --parallel 3                 # on the GPU: measures it

`draw` picks combinations uniformly from the valid ones (quantization x policy x compile x offload x kernels x
micro-batch x placement x recomputed layers x rank; a combination the job spec refuses is drawn again), keeps
those whose estimate is at most `--max-gib` (so three arms share one 141 GiB card without touching each
other), and writes them with the seed and each one's estimate to `bench/results/estimate-random-draw.json`.
The suite `estimate-random` (bench/suites.py) trains each for 3 steps (the optimizer state exists from step 2)
as `fitrun train` does, so the estimate it prints and the peak it measures come from the same run.
"""

from __future__ import annotations

import argparse
import json
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRAW = ROOT / "bench" / "results" / "estimate-random-draw.json"
JOB = "jobs/llama3-8b-lora.yaml"
BASE = ("model.init=random", "training.max_steps=3", "training.save_steps=null", "training.gradient_accumulation_steps=2",
        "activation_checkpointing.layers=none", "training.warmup_steps=1")


def one_draw(rng: random.Random) -> dict[str, object]:
    policy = rng.choice(["full", "selective"])
    r = rng.choice([8, 16, 32])
    return {"model.quantization": rng.choice(["none", "nf4", "int8", "fp8"]),
            "activation_checkpointing.policy": policy,
            "activation_checkpointing.offload": rng.choice([False, True]) if policy == "full" else False,
            "training.compile": rng.choice([False, True]),
            "training.kernels": rng.choice(["eager", "liger"]),
            "training.micro_batch_size": rng.choice([1, 2, 4]),
            "activation_checkpointing.placement": rng.choice(["first", "last", "every_n"]),
            "activation_checkpointing.count": rng.randint(0, 32),
            "lora.r": r, "lora.lora_alpha": 2 * r}


def overrides(levers: dict[str, object]) -> list[str]:
    return [*BASE, *(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in levers.items())]


def _estimate(levers: dict[str, object]) -> float | None:
    import os

    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from runner.estimate.trace import estimate
    from runner.loading import load_job
    from runner.spec import SpecError

    try:
        spec = load_job(str(ROOT / JOB), overrides(levers))
    except SpecError:
        return None
    return estimate(spec).peak_reserved_gib


def draw(seed: int, n: int, max_gib: float) -> list[dict]:
    rng, kept, seen = random.Random(seed), [], set()
    with ProcessPoolExecutor(2) as pool:
        while len(kept) < n:
            batch = []
            while len(batch) < 2 * (n - len(kept)):
                levers = one_draw(rng)
                if (key := json.dumps(levers, sort_keys=True)) not in seen:
                    seen.add(key)
                    batch.append(levers)
            for levers, est in zip(batch, pool.map(_estimate, batch)):
                if est is not None and est <= max_gib and len(kept) < n:
                    kept.append({"name": f"rand{len(kept):02d}", "levers": levers, "estimate_gib": round(est, 3)})
                print(levers, est, flush=True)
    return kept


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("verb", choices=["draw"])
    ap.add_argument("--seed", type=int, default=2612)
    ap.add_argument("--n", type=int, default=21)
    ap.add_argument("--max-gib", type=float, default=42.0)
    args = ap.parse_args()
    kept = draw(args.seed, args.n, args.max_gib)
    DRAW.write_text(json.dumps({"seed": args.seed, "max_gib": args.max_gib, "job": JOB, "base": list(BASE),
                                "draw": kept}, indent=1) + "\n")
    print(f"wrote {DRAW}: {len(kept)} combinations")


if __name__ == "__main__":
    main()
