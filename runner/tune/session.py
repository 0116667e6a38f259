"""One search and what it owns: the job and space it runs, its MLflow parent run and children, its Ray
storage and output folder. Every child run (a packed probe, an exclusive re-measurement, a quality run,
a pruned config) is created and found here, so they all carry the same params and tags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runner.loading import job_from_dict
from runner.spec import JobSpec, SearchSpaceSpec, alpha_for
from runner.storage import Location
from runner.tracking import RunLogger, find_child, start_run
from runner.tune.search import LEVERS, Config

PHASES = ("packed", "exclusive", "quality", "pruned")


def trial_params(c: Config, lora_alpha: float) -> dict:
    """The one param set of every child run, measured or pruned, so the UI charts them together."""
    k = "-" if c.k is None else c.k  # a dominated column: no k was ever chosen
    return {"r": c.r, "lora_alpha": lora_alpha, "k": k, "placement": c.placement,
            **{f.name: getattr(c, f.name) for f in LEVERS}, "micro_batch_size": c.micro_batch_size,
            "gradient_accumulation_steps": c.gradient_accumulation_steps, "checkpointed_layers": k}


@dataclass(frozen=True)
class Search:
    """A search in progress. Plain values only, so a Tune trial receives it whole (`to_dict`)."""

    job: JobSpec
    space: SearchSpaceSpec
    uri: str             # MLflow tracking URI
    parent_id: str       # the search's MLflow run; every trial, pruned config and quality run is its child
    out: Location        # the search's output folder (winner.yaml, frontier.png, searcher state)

    @property
    def storage(self) -> Location:
        """Ray Tune's and Ray Train's storage for this search."""
        return self.out / "tune"

    @property
    def parent(self) -> RunLogger:
        return RunLogger(self.uri, self.parent_id)

    def to_dict(self) -> dict[str, Any]:
        return {"job": self.job.to_dict(), "space": self.space.model_dump(mode="json"), "uri": self.uri,
                "parent_id": self.parent_id, "out": str(self.out)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Search":
        return cls(job_from_dict(d["job"]), SearchSpaceSpec.model_validate(d["space"]), d["uri"], d["parent_id"],
                   Location(d["out"]))

    def find_child(self, c: Config | str, phase: str, status: str | None = None) -> RunLogger | None:
        """The newest child run of config `c` (or its key) in `phase`, or None."""
        key = c if isinstance(c, str) else c.key
        run_id = find_child(self.uri, self.job.tracking.experiment_name, self.parent_id,
                            {"fitrun_config": key, "fitrun_phase": phase}, status)
        return RunLogger(self.uri, run_id) if run_id else None

    def child(self, c: Config, phase: str, tags: dict[str, str] | None = None, reuse: bool = False) -> RunLogger:
        """A new child run of config `c` in `phase` (with `reuse`, the existing one when a resumed search
        has it already: no duplicates)."""
        assert phase in PHASES, phase
        key = c.key + (f"-{(tags or {}).get('reason', 'dominated')}" if c.k is None else "")  # a whole column
        found = self.find_child(key, phase) if reuse else None
        if found:
            return found
        run_id = start_run(self.uri, self.job.tracking.experiment_name, f"{phase}-{key}", parent_run_id=self.parent_id,
                           params=trial_params(c, alpha_for(self.space.lora_alpha_rule, c.r)),
                           tags={"fitrun_config": key, "fitrun_phase": phase, "fitrun.kind": "trial", **(tags or {})})
        return RunLogger(self.uri, run_id)

    def log_pruned(self, c: Config, predicted_gib: float | None, outpaced: tuple[float, float, float] | None = None
                   ) -> None:
        """A config never launched: predicted over the ceiling, a column dominated by a smaller rank, or a column
        the step-time model predicts slower than the best measured (`outpaced`: its predicted tokens/s, the best
        measured, the model's error). Same params as a measured child; ends KILLED (it never ran), with the reason."""
        limit = self.space.limit_gib
        if outpaced:
            kind, reason = "outpaced", (f"predicted {outpaced[0]:,.0f} tokens/s at best, more than {outpaced[2]:.0%} "
                                        f"below the best measured {outpaced[1]:,.0f} (step-time model)")
        elif predicted_gib is not None:
            kind, reason = "estimate", f"predicted {predicted_gib:.3f} GiB > {limit:.3f} GiB (estimate)"
        else:
            kind, reason = "dominated", "dominated: a smaller rank fits with no more checkpointed layers"
        logger = self.child(c, "pruned", tags={"status": "pruned", "reason": kind})
        logger.metrics({"feasible": 0.0, **({"predicted_peak_gib": predicted_gib} if predicted_gib is not None else {}),
                        **({"predicted_tokens_per_s": outpaced[0]} if outpaced else {})})
        logger.end(ok=False, status="KILLED", reason=f"never run: {reason}")
