"""Search points and searchers, without Ray.

A `Config` is one point of the grid; a column is a Config without k (`k=None`). The structured
searcher (`FitSearcher`) uses what is known of memory: it falls as the number of checkpointed layers
k grows and as the micro-batch shrinks, and rises with the LoRA rank; speed falls as k grows. So for
each column it looks for the smallest k that fits, starting from the memory estimate, bisecting on
measured results, never launching a config that a measured infeasible result (or the estimate,
beyond a margin) already rules out. `runner.tune.driver` adapts it to Ray Tune.

With the step-time model's predictions (`speed`: config key -> predicted tokens/s, and `speed_error`, the
model's relative error), it also uses what is known of speed: columns are tried fastest-predicted first, and
a column whose best possible config (its smallest open k) is predicted slower than the best measured speed by
more than the model's error is never probed (`outpaced`). Without predictions every column is searched.

Adding a lever as a search dimension: one `lever(...)` field on `Config` (its job field, the
space field that lists its values, its tag in the key), the space field in `runner.spec`, and the
lever itself in `runner.model.build_trainable`.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from runner.loading import job_from_dict
from runner.spec import (
    JobSpec,
    SearchSpaceSpec,
    SpecError,
    alpha_for,
    compute_dtype,
    job_card,
    lever_conflicts,
    micro_batch_for,
    space_accumulations,
)


def lever(job_field: str, space_field: str, default: Any, tags: dict) -> Any:
    """A Config field for a lever: the job field it sets, the space list it comes from, its key tag."""
    return field(default=default, metadata={"job_field": job_field, "space_field": space_field, "tags": tags})


@dataclass(frozen=True, order=True)
class Config:
    r: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    placement: str
    k: int | None
    policy: str = lever("activation_checkpointing.policy", "activation_checkpointing.policies", "full",
                        {"selective": "-selective"})
    adapter_dtype: str = lever("lora.adapter_dtype", "adapter_dtypes", "float32",
                               {"model": "-bf16adapters", "mixed": "-mixedadapters"})
    offload: bool = lever("activation_checkpointing.offload", "activation_checkpointing.offloads", False,
                          {True: "-offload"})
    quantization: str = lever("model.quantization", "quantizations", "none", {"nf4": "-nf4", "int8": "-int8", "fp8": "-fp8"})
    parallelism: str = lever("resources.parallelism", "parallelisms", "ddp", {"fsdp": "-fsdp"})

    @property
    def key(self) -> str:
        """`r8-mb1-acc16-first-mixedadapters-k11`; a column's key has no `-k`."""
        tags = "".join(f.metadata["tags"].get(getattr(self, f.name), "") for f in LEVERS)
        base = f"r{self.r}-mb{self.micro_batch_size}-acc{self.gradient_accumulation_steps}-{self.placement}{tags}"
        return base if self.k is None else f"{base}-k{self.k}"

    @property
    def column(self) -> Config:
        """Everything but k."""
        return replace(self, k=None)

    def at_k(self, k: int) -> Config:
        return replace(self, k=k)

    def valid(self) -> bool:
        return not lever_conflicts(self.quantization, self.parallelism, self.offload, self.policy)


LEVERS = [f for f in fields(Config) if "job_field" in f.metadata]


def at_k(column: Config, k: int) -> Config:
    return column.at_k(k)


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def set_config(raw: dict, c: Config, alpha_rule: str) -> dict:
    """Write a config's values into a job dict (in place; returned for chaining)."""
    raw["lora"].update(r=c.r, lora_alpha=alpha_for(alpha_rule, c.r))
    raw["training"].update(micro_batch_size=c.micro_batch_size, gradient_accumulation_steps=c.gradient_accumulation_steps)
    raw["activation_checkpointing"].update(layers="none", count=c.k, placement=c.placement)
    for f in LEVERS:
        section, name = f.metadata["job_field"].split(".")
        raw[section][name] = getattr(c, f.name)
    return raw


def apply_config(job: JobSpec, c: Config, alpha_rule: str) -> JobSpec:
    """The job with a config's values: what a trial runs and what the winner's YAML holds."""
    return job_from_dict(set_config(job.to_dict(), c, alpha_rule), "tuned job")


def expand(job: JobSpec, space: SearchSpaceSpec, num_layers: int) -> tuple[list[Config], list[int]]:
    """The columns and the k values of a space that `spec.check_space` accepted."""
    from runner.spec import check_space

    check_space(job, space, num_layers)
    accums = space_accumulations(job, space)
    card, _ = job_card(job)
    ks = space.activation_checkpointing.values(num_layers)
    lever_values = [[(f.name, v) for v in (_get(space, f.metadata["space_field"])
                                           or [_get(job, f.metadata["job_field"])])] for f in LEVERS]
    columns = []
    for levers in itertools.product(*lever_values):
        for r in sorted(space.lora_r or [job.lora.r]):
            for a in sorted(accums, reverse=True):
                for p in space.activation_checkpointing.placements:
                    c = Config(r, micro_batch_for(job, a), a, p, None, **dict(levers))
                    if c.valid() and not _card_refuses(card, job, c):
                        columns.append(c)
    if not columns and card is not None:
        raise SpecError("search space", [f"every config needs a lever the {card.name} cannot run: "
                                         f"{_card_refuses(card, job, Config(8, 1, 1, 'first', None))}"])
    if not columns:
        raise SpecError("search space", ["no configuration to try: every combination of its levers is refused "
                                         "(see `lever_conflicts`: offload with policy selective, fsdp with a "
                                         "quantized base)"])
    return columns, ks


def _card_refuses(card, job: JobSpec, c: Config) -> str | None:
    """Why the job's card cannot run config `c` (fp8 below compute capability 8.9, bf16 below 8.0), or None."""
    if card is None:
        return None
    return card.can_run(compute_dtype(job.model.dtype, c.quantization, job.resources.use_gpu), c.quantization)


def classify(result: dict | None, limit_gib: float, error: bool = False) -> dict:
    """A probe's outcome: ok (fits), infeasible (OOM or over the ceiling - margin), or error."""
    result = result or {}
    peak = result.get("peak_gib")
    if error or result.get("status") == "error":
        return {"feasible": False, "status": "error", "peak_gib": peak, "tokens_per_s": 0.0,
                "loss": result.get("loss"), "message": result.get("message", "trial failed")}
    oom = bool(result.get("oom"))
    feasible = not oom and peak is not None and peak <= limit_gib
    return {"feasible": feasible, "status": "ok" if feasible else "infeasible", "peak_gib": peak,
            "tokens_per_s": result.get("tokens_per_s", 0.0) if feasible else 0.0,
            "measured_tokens_per_s": result.get("tokens_per_s", 0.0), "loss": result.get("loss"),
            "oom": oom, "message": result.get("oom_message", "")}


def pareto(points: list[dict]) -> list[dict]:
    """Feasible configs not beaten on both memory (lower) and speed (higher)."""
    front = []
    for p in sorted(points, key=lambda p: (p["peak_gib"], -p["tokens_per_s"])):
        if not front or p["tokens_per_s"] > front[-1]["tokens_per_s"]:
            front.append(p)
    return front


def _needs_more_memory(a: Config, b: Config) -> bool:
    """b needs at least as much memory as a (same placement and levers): larger r and micro-batch,
    fewer checkpointed layers."""
    same = replace(a, r=0, micro_batch_size=0, gradient_accumulation_steps=0, k=None) == \
        replace(b, r=0, micro_batch_size=0, gradient_accumulation_steps=0, k=None)
    return same and b.r >= a.r and b.micro_batch_size >= a.micro_batch_size and b.k <= a.k


class FitSearcher:
    """Smallest k that fits, per column, seeded by the memory estimate; see the module docstring."""

    def __init__(self, columns: list[Config], ks: list[int], limit_gib: float,
                 predicted: dict[str, float] | None = None, prune_margin_pct: float = 10.0,
                 prune_dominated: bool = True):
        self.columns, self.ks = columns, ks
        self.limit_gib = limit_gib
        self.predicted = predicted or {}
        self.prune_margin = prune_margin_pct / 100.0
        self.prune_dominated = prune_dominated
        self.results: dict[str, dict] = {}      # key -> classify() outcome + "config"
        self.pending: dict[str, Config] = {}    # trial id -> config
        self.pruned: dict[str, float] = {}      # key -> predicted GiB (never launched)
        self.dominated: dict[Config, bool] = {}  # columns that cannot beat a smaller-rank twin
        self.speed: dict[str, float] = {}       # key -> predicted tokens/s (the step-time model; empty: unused)
        self.speed_error = 0.0                  # the model's relative error: the margin a prediction gets
        self.outpaced: dict[Config, float] = {}  # columns predicted slower than the best measured: never probed

    # -- state (JSON: what a resumed search continues from) ------------------------------------
    def state_dict(self) -> dict:
        return {"results": [{**{k: v for k, v in r.items() if k != "config"}, "config": asdict(r["config"])}
                            for r in self.results.values()],
                "pruned": self.pruned, "dominated": [asdict(c) for c in self.dominated],
                "predicted": self.predicted, "speed": self.speed, "speed_error": self.speed_error,
                "outpaced": [[asdict(c), v] for c, v in self.outpaced.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.results = {}
        for r in state["results"]:
            c = Config(**r["config"])
            self.results[c.key] = {**r, "config": c}
        self.pruned = dict(state["pruned"])
        self.dominated = {Config(**c): True for c in state["dominated"]}
        self.predicted = dict(state["predicted"])
        self.speed, self.speed_error = dict(state.get("speed", {})), state.get("speed_error", 0.0)
        self.outpaced = {Config(**c): v for c, v in state.get("outpaced", [])}
        self.pending.clear()  # unfinished trials are suggested again

    # -- decisions ---------------------------------------------------------------------------------
    def known(self, c: Config) -> bool | None:
        """True/False if measured or implied by a measured result; None if unknown."""
        if c.key in self.results:
            return self.results[c.key]["feasible"]
        for res in self.results.values():
            if not res["feasible"] and _needs_more_memory(res["config"], c):
                return False
        return None

    def _predicted_over(self, c: Config) -> bool:
        p = self.predicted.get(c.key)
        return p is not None and p > self.limit_gib * (1 + self.prune_margin)

    def _bounds(self, column: Config) -> tuple[int, int]:
        """(first, last) index into ks still open for `column`: above the largest k known infeasible,
        below the smallest k measured feasible; first > last when settled."""
        lo, hi = None, None
        for i, k in enumerate(self.ks):
            c = column.at_k(k)
            state = self.known(c)
            if state is False or c.key in self.pruned:
                lo = i
            if state is True and c.key in self.results and hi is None:
                hi = i
        return (0 if lo is None else lo + 1), ((len(self.ks) - 1) if hi is None else hi - 1)

    def next_config(self) -> Config | None | str:
        """A config to probe, None to wait for running probes, or "done"."""
        busy = {c.column for c in self.pending.values()}
        waiting = False
        outpaced_before = len(self.outpaced)
        for column in self._by_predicted_speed():
            if column in busy or column in self.dominated or column in self.outpaced:
                waiting = waiting or column in busy
                continue
            smaller_r = [c for c in self.columns if replace(c, r=0) == replace(column, r=0) and c.r < column.r]
            if any(not self._settled(c) for c in smaller_r):
                waiting = True  # its smaller-rank twin decides whether this column can win at all
                continue
            if self._is_dominated(column, smaller_r):
                self.dominated[column] = True
                continue
            first, last = self._bounds(column)
            if first > last:
                continue  # column settled: its best is the smallest feasible k (or nothing fits)
            candidates = self.ks[first:last + 1]
            pruned_now = False  # prune candidates the estimate puts over the ceiling beyond the margin
            for k in candidates:
                c = column.at_k(k)
                if self._predicted_over(c) and c.key not in self.pruned:
                    self.pruned[c.key] = self.predicted[c.key]
                    pruned_now = True
            if pruned_now:
                return self.next_config()
            if self._cannot_win(column, candidates):
                if busy:  # a running probe may still set the bar: decide once it reports
                    waiting = True
                    continue
                self.outpaced[column] = self._column_speed(column, candidates)
                continue
            return column.at_k(self._pick(column, candidates, last < len(self.ks) - 1))
        if waiting and len(self.outpaced) > outpaced_before:  # a column waiting on a twin outpaced since: look again
            return self.next_config()
        return None if waiting else "done"

    # -- speed (the step-time model) -------------------------------------------------------------
    def _column_speed(self, column: Config, candidates: list[int] | None = None) -> float | None:
        """The column's best predicted speed: at its smallest open k predicted to fit (fewest recomputed layers),
        else its smallest open k; None without predictions."""
        candidates = candidates if candidates is not None else self.ks
        fits = [k for k in candidates
                if self.predicted.get(column.at_k(k).key, -math.inf) <= self.limit_gib] or candidates
        return self.speed.get(column.at_k(fits[0]).key) if fits else None

    def best_measured_speed(self) -> float:
        return max((r["tokens_per_s"] for r in self.results.values() if r["feasible"]), default=0.0)

    def _cannot_win(self, column: Config, candidates: list[int]) -> bool:
        """Even its fastest open config, predicted with the model's error in its favour, is slower than a
        measured one (candidates the estimate calls over the ceiling are not its fastest: they cannot run)."""
        predicted = self._column_speed(column, candidates)
        best = self.best_measured_speed()
        return bool(self.speed) and predicted is not None and best > 0 and predicted * (1 + self.speed_error) < best

    def _by_predicted_speed(self) -> list[Config]:
        if not self.speed:
            return self.columns
        return sorted(self.columns, key=lambda c: -(self._column_speed(c) or 0.0))

    def _pick(self, column: Config, candidates: list[int], fit_known_above: bool) -> int:
        """Probe nearest the predicted boundary: the smallest candidate predicted to fit (if a fit is
        measured above it, this checks the estimate's claim); if none is predicted to fit, the largest
        candidate (confirming the boundary); with no estimate, bisect."""
        fits = [k for k in candidates if self.predicted.get(column.at_k(k).key, math.inf) <= self.limit_gib]
        if fits:
            return fits[0]
        if any(column.at_k(k).key in self.predicted for k in candidates):  # unmodelled columns have none: bisect
            return candidates[-1]
        return candidates[(len(candidates) - 1) // 2] if fit_known_above else candidates[len(candidates) // 2]

    def _settled(self, column: Config) -> bool:
        if column in self.dominated or column in self.outpaced:
            return True
        if any(c.column == column for c in self.pending.values()):
            return False
        first, last = self._bounds(column)
        return first > last

    def _is_dominated(self, column: Config, smaller_r: list[Config]) -> bool:
        """A larger rank is never faster at the same micro-batch and k, and never needs fewer
        checkpointed layers; so once a smaller-rank twin's best k* is measured and this column
        cannot fit below k*, none of its configs can beat the twin (pruned as 'dominated')."""
        if not self.prune_dominated:
            return False
        for twin in smaller_r:
            best = [res["config"].k for res in self.results.values() if res["config"].column == twin and res["feasible"]]
            if not best:
                continue
            first, _ = self._bounds(column)
            if first >= len(self.ks) or self.ks[first] >= min(best):
                return True
        return False

    def record(self, c: Config, result: dict) -> None:
        self.results[c.key] = {**result, "config": c}

    def best_per_column(self) -> list[dict]:
        best = []
        for column in self.columns:
            ok = [res for res in self.results.values() if res["config"].column == column and res["feasible"]]
            if ok:
                best.append(min(ok, key=lambda res: res["config"].k))
        return best


class RandomSearcher(FitSearcher):
    """Generic baseline for comparison: uniform random configs from the grid, no structure used."""

    def __init__(self, *args, num_samples: int = 20, seed: int = 0, **kw):
        super().__init__(*args, **kw)
        grid = [col.at_k(k) for col in self.columns for k in self.ks]
        random.Random(seed).shuffle(grid)
        self.queue = grid[:num_samples]

    def next_config(self):
        while self.queue:
            c = self.queue.pop(0)
            if c.key not in self.results:
                return c
        return None if self.pending else "done"
