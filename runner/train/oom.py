"""Out of memory mid-run (`training.on_oom: fallback`): the next configuration under the same ceiling.

A job that ran out of memory after its first steps (a longer batch than any probe saw, fragmentation)
goes on from its latest checkpoint with less memory per step and the same global batch: first more
recomputed layers, then, once every layer recomputes, half the micro-batch with twice the accumulation.
The step chosen is the smallest whose estimated peak is lower than the failed config's by at least what
the failed allocation asked for (and at least 5%): the estimate ranks the configurations, the failure
says how far off it was.
"""

from __future__ import annotations

import re

from runner.spec import JobSpec

MIN_DROP = 0.05  # the estimate's peak must fall by at least this fraction
_ASKED = re.compile(r"Tried to allocate ([\d.]+) (GiB|MiB|KiB|B)\b")
_UNITS = {"GiB": 1.0, "MiB": 1 / 1024, "KiB": 1 / 1024**2, "B": 1 / 1024**3}


def is_oom(error: BaseException) -> bool:
    """Whether a failed fit ran out of GPU memory (the worker's error travels as text in Ray's)."""
    text = f"{type(error).__name__}: {error}"
    return "OutOfMemoryError" in text or "CUDA out of memory" in text


def asked_gib(error: BaseException) -> float:
    """What the allocation that failed asked for, from PyTorch's message (0 when it does not say)."""
    found = _ASKED.search(str(error))
    return float(found.group(1)) * _UNITS[found.group(2)] if found else 0.0


def _recomputed(spec: JobSpec, num_layers: int) -> int:
    from runner.recompute import resolve_layers

    return len(resolve_layers(spec.activation_checkpointing, num_layers))


def _with(spec: JobSpec, *sets: str) -> JobSpec:
    """`spec` with `--set`-style overrides (the CLI's own parsing and merge); a recomputed-layer count
    replaces any explicit layer list."""
    from runner.loading import deep_merge, job_from_dict, parse_overrides

    if any(s.startswith("activation_checkpointing.count=") for s in sets):
        sets = ("activation_checkpointing.layers=none", *sets)
    return job_from_dict(deep_merge(spec.to_dict(), parse_overrides(list(sets))), "job")


def candidates(spec: JobSpec, num_layers: int) -> list[tuple[str, JobSpec]]:
    """Configurations with less memory per step than `spec`, the mildest first: each number of recomputed
    layers above today's, then (all recomputed) half the micro-batch at twice the accumulation."""
    k, t = _recomputed(spec, num_layers), spec.training
    out = [(f"{n}/{num_layers} layers recomputed (was {k})", _with(spec, f"activation_checkpointing.count={n}"))
           for n in range(k + 1, num_layers + 1)]
    if t.micro_batch_size > 1 and t.micro_batch_size % 2 == 0:
        mb, acc = t.micro_batch_size // 2, t.gradient_accumulation_steps * 2
        halved = _with(spec, f"training.micro_batch_size={mb}", f"training.gradient_accumulation_steps={acc}",
                       f"activation_checkpointing.count={num_layers}")
        out.append((f"micro-batch {mb} x accumulation {acc} (was {t.micro_batch_size} x "
                     f"{t.gradient_accumulation_steps}), {num_layers}/{num_layers} layers recomputed", halved))
    return out


def next_config(spec: JobSpec, error: BaseException, estimate=None) -> tuple[str, JobSpec] | None:
    """The mildest candidate whose estimated peak is at least max(5%, the failed allocation) below
    `spec`'s, or None when nothing is left to trade. `estimate(spec) -> GiB` (the trace, by default)."""
    from runner.model import model_config

    if estimate is None:
        from runner.estimate.trace import estimate as trace

        def estimate(s):
            return trace(s).peak_gib
    num_layers = model_config(spec.model, allow_builtin=True).num_hidden_layers
    now = estimate(spec)
    target = now - max(MIN_DROP * now, asked_gib(error))
    options = candidates(spec, num_layers)
    if not options:
        return None
    lo, hi = 0, len(options) - 1  # the estimate falls as the options go: bisect for the first under target
    if estimate(options[hi][1]) > target:
        return options[hi]  # the least memory there is: try it rather than give up
    while lo < hi:
        mid = (lo + hi) // 2
        if estimate(options[mid][1]) <= target:
            hi = mid
        else:
            lo = mid + 1
    return options[lo]
