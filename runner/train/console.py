"""Rank-0 console output: the fixed-format step line and a progress bar on stderr."""

from __future__ import annotations

import os
import sys


def format_step(m: dict[str, float], max_steps: int) -> str:
    line = (f"step {int(m['step']):>5}/{max_steps} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
            f"grad_norm {m['grad_norm']:.3f} | tok/s {m['tokens_per_s']:,.0f} | "
            f"peak alloc/res {m['peak_allocated_gib']:.2f}/{m['peak_reserved_gib']:.2f} GiB | "
            f"{m['step_time_s']:.3f} s/step")
    if "eval_loss" in m:
        line += f" | eval_loss {m['eval_loss']:.4f}"
    return line


class Console:
    """Prints on rank 0 only; with FITRUN_PROGRESS=1 (default) lines go above a tqdm bar."""

    def __init__(self, rank: int):
        self.rank = rank
        self.bar = None

    def start_progress(self, start: int, total: int) -> None:
        if self.rank == 0 and os.environ.get("FITRUN_PROGRESS", "1") == "1":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr,
                            dynamic_ncols=True, leave=False)

    def progress(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def say(self, msg: str) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)
