"""The bench suites, as data: each a list of arms that one command runs (bench/harness.py).

    PYTHONPATH=. python bench/harness.py run cards --parallel 3      # the card jobs under their cards' budgets
    PYTHONPATH=. python bench/harness.py run structure               # the 24 GiB job before and after a change
"""

import os
from dataclasses import replace

from harness import Arm

from runner.cards import load_catalogue

RANDOM = ("model.init=random",)
# 20 steps with an eval and a checkpoint save inside the window: what a real run holds at its peak.
WINDOW = ("training.max_steps=20", "training.eval_steps=10", "training.save_steps=10", "data.val_fraction=0.3",
          "training.warmup_steps=2")
CARD_JOBS = {"L4": "l4", "T4": "t4", "RTX-4080": "rtx4080", "A10G": "a10g", "RTX-4090": "rtx4090"}  # big and small together


def _card_arm(card: str, key: str) -> Arm:
    total = load_catalogue()[card].memory_total_mib
    return Arm(name=f"card-{key}", kind="fitrun", job=f"jobs/llama3-8b-lora-{key}.yaml", sets=RANDOM + WINDOW,
               card_total_mib=total,
               note=f"`resources.gpu: {card}`: allocator capped at the {card}'s budget on a bigger card")


def _random_arms() -> list[Arm]:
    """Issue 26: the lever combinations drawn by bench/estimate_random.py (seed and estimates in its file)."""
    from estimate_random import DRAW, JOB, overrides

    if not DRAW.exists():
        return []
    import json

    return [Arm(name=d["name"], kind="fitrun", job=JOB, sets=tuple(overrides(d["levers"])),
                note=" ".join(f"{k.split('.')[-1]}={v}" for k, v in d["levers"].items() if k != "lora.lora_alpha"))
            for d in json.loads(DRAW.read_text())["draw"]]


def _l4_budget_gib() -> float:
    from runner.cards import allocator_budget_gib

    cards = load_catalogue()
    return round(allocator_budget_gib(cards["L4"], cards), 3)


def _seed_l4() -> Arm:
    return Arm(name="seed-recipe-l4", kind="script", script="bench/throughput_24gb.py",
               sets=("--only", "seed", "--out", "/dev/null", "--cap-gib", str(_l4_budget_gib())),
               note="HF Trainer + GC, bf16, r16, mb 1 x 16, allocator capped at the L4's budget")


def _l4_job(baseline: str) -> Arm:
    return Arm(name="l4-job", kind="fitrun", job="jobs/llama3-8b-lora-l4.yaml", baseline=baseline,
               sets=RANDOM + ("training.max_steps=6", "training.save_steps=null"),
               note="jobs/llama3-8b-lora-l4.yaml under the L4's budget")


def _unsloth_grid() -> list[str]:
    from unsloth_grid import GRID

    return GRID


# Where an Unsloth install lives on the device (its wheels and pinned dependencies unpacked, like .device's):
# FITRUN_UNSLOTH_PATH=/tmp/uns; empty: Unsloth importable as installed.
UNSLOTH_PATH = ("--uns-path", os.environ["FITRUN_UNSLOTH_PATH"]) if os.environ.get("FITRUN_UNSLOTH_PATH") else ()


def _before() -> str:
    """The commit unpacked in `.before/` (its `.commit` file, written beside `git archive`), for the notes."""
    from harness import ROOT

    marker = ROOT / ".before" / ".commit"
    return marker.read_text().strip() if marker.exists() else "0969317"


_L4_MIB = load_catalogue()["L4"].memory_total_mib

SUITES = {
    # Issue 25's ratio, honest: the 24 GB class's shipped job (the L4 job, under the L4's budget) against the
    # seed recipe (HF Trainer + gradient checkpointing, bf16, r16, micro-batch 1 x 16) under the same
    # allocator budget, one arm at a time in one command.
    "l4-vs-seed": [
        _seed_l4(),
        _l4_job("seed-recipe-l4"),
    ],
    # Issue 25, the peers: the same, and Unsloth's best of its grid (bench/unsloth_grid.py: micro-batch 1/2/4,
    # its offloaded or plain checkpointing, 16-bit or 4-bit) under the same budget; the random 8B saved first in
    # its own process. Each arm alone. Measured on a fresh H100 (2026-12-07): l4-job 141 s (Ray's first start,
    # Inductor from nothing), local-model 44 s, an Unsloth arm over 75 s (load, patch, its first step not done
    # by then): the grid does not fit one 10-minute command. Split it, each command with its own l4-job arm, about
    # four Unsloth arms each, e.g. `--only seed-recipe-l4 l4-job local-model 'unsloth-16bit-mb4-*'
    # 'unsloth-16bit-mb2-*'`, then `--only l4-job 'unsloth-16bit-mb1-*' 'unsloth-4bit-mb4-*'`, then
    # `--only l4-job 'unsloth-4bit-mb2-*' 'unsloth-4bit-mb1-*'`; every ratio stays within one command, and the
    # claim is the lowest.
    "l4-vs-peers": [
        _seed_l4(),
        _l4_job("seed-recipe-l4,unsloth-*"),
        Arm(name="local-model", kind="script", script="bench/unsloth_grid.py", sets=("--only", "local-model"),
            note="the random 8B saved for the peers (not a measurement)"),
        *[Arm(name=f"unsloth-{g}", kind="script", script="bench/unsloth_grid.py",
              sets=("--only", g, "--cap-gib", str(_l4_budget_gib()), *UNSLOTH_PATH),
              note=f"Unsloth, {g.replace('-', ', ')}, allocator capped at the L4's budget") for g in _unsloth_grid()],
    ],
    # The allocator's expandable segments (training.expandable_segments): the L4 job as shipped, the same with
    # them (what less the allocator reserves), and with them and two fewer recomputed layers (whether that fits
    # the L4's budget, and how much faster). One arm at a time.
    "allocator": [
        replace(_l4_job(""), card_total_mib=_L4_MIB),
        replace(_l4_job("l4-job"), name="l4-job-expandable", card_total_mib=_L4_MIB,
                sets=_l4_job("").sets + ("training.expandable_segments=true",), note="the L4 job, expandable segments"),
        replace(_l4_job("l4-job"), name="l4-job-expandable-k13", card_total_mib=_L4_MIB,
                sets=_l4_job("").sets + ("training.expandable_segments=true", "activation_checkpointing.count=13"),
                note="the L4 job, expandable segments, 13 layers recomputed instead of 15"),
    ],
    # Issue 23: each shipped card job trains 20 steps (eval and a save inside) under its card's emulated
    # budget; fits = the whole process (NVML) within the card's driver-reported total.
    "cards": [_card_arm(card, key) for card, key in CARD_JOBS.items()],
    # Issue 23, several workers: the L4 job on two GPUs (DDP; global batch kept at 16), each worker under the
    # L4's budget; a worker's whole process (NVML) less its allocator peak is what lives outside the allocator
    # with NCCL's communicator buffers and streams in it (runner.cards.NCCL_UNMEASURED until this has run).
    # Needs a 2-GPU machine: `run cards-2workers`.
    "cards-2workers": [
        Arm(name="card-l4-2workers", kind="fitrun", job="jobs/llama3-8b-lora-l4.yaml",
            sets=RANDOM + WINDOW + ("resources.num_workers=2", "training.gradient_accumulation_steps=4"),
            card_total_mib=_L4_MIB,
            note="`resources.gpu: L4`, 2 workers (DDP): each capped at the L4's budget; NCCL's buffers outside it"),
    ],
    # Issue 26: estimate vs measured peak reserved on random valid lever combinations, 3 steps each (memory
    # only: arms may share the card).
    "estimate-random": _random_arms(),
    # Behaviour and speed unchanged by a change. `.before/` holds `git archive` of the commit before it (and its
    # hash in `.before/.commit`), carried to the device untracked; the same job file, 10 steps, one arm at a time.
    "structure": [
        Arm(name="before-24gb", kind="fitrun", job="jobs/llama3-8b-lora-24gb.yaml", tree=".before",
            sets=RANDOM + ("training.max_steps=10", "training.save_steps=5"), note=f"commit {_before()}, before the change"),
        Arm(name="after-24gb", kind="fitrun", job="jobs/llama3-8b-lora-24gb.yaml", baseline="before-24gb",
            sets=RANDOM + ("training.max_steps=10", "training.save_steps=5"), note="this commit"),
    ],
    # The tiny job on the CPU, before and after: its losses and tokens/s.
    "structure-tiny": [
        Arm(name="before-tiny", kind="fitrun", job="jobs/tiny-cpu.yaml", tree=".before",
            sets=("training.max_steps=10", "training.logging_steps=1"), note=f"commit {_before()}"),
        Arm(name="after-tiny", kind="fitrun", job="jobs/tiny-cpu.yaml", baseline="before-tiny",
            sets=("training.max_steps=10", "training.logging_steps=1"), note="this commit"),
    ],
}
