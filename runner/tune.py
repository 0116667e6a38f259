"""The Ray Tune search for the fastest configuration under a memory ceiling.

A trial is a short probe through the same Ray Train path as `fitrun train` (a Tune function that
builds and fits a `TorchTrainer`). The default searcher (`FitSearcher`) uses the space's structure:
peak memory falls as the number of checkpointed layers k grows and as the micro-batch shrinks, and
rises with the LoRA rank; speed falls as k grows. So for each column (r, accumulation, placement)
it looks for the smallest k that fits, starting from the memory estimate, bisecting on measured
results, never launching a config that a measured infeasible result (or the estimate, beyond a
margin) already rules out; the columns' winners are then compared on speed.
"""

from __future__ import annotations

import datetime
import json
import math
import pickle
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runner.spec import JobSpec, SearchSpaceSpec, SpecError, dump_yaml, job_from_dict
from runner.tracking import RunLogger, find_run, start_run, tracking_uri

GIB = 1024**3
TRIAL_CPUS = 0.25  # the Tune function only drives its TorchTrainer; the workers hold the real CPUs


ADAPTER_TAGS = {"float32": "", "model": "-bf16adapters", "mixed": "-mixedadapters"}


@dataclass(frozen=True, order=True)
class Config:
    r: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    placement: str
    k: int
    policy: str = "full"            # activation_checkpointing.policy
    adapter_dtype: str = "float32"  # lora.adapter_dtype
    offload: bool = False           # activation_checkpointing.offload

    @property
    def key(self) -> str:
        extra = ("-selective" if self.policy == "selective" else "") + ADAPTER_TAGS[self.adapter_dtype] + \
            ("-offload" if self.offload else "")
        return f"r{self.r}-mb{self.micro_batch_size}-acc{self.gradient_accumulation_steps}-{self.placement}{extra}-k{self.k}"

    @property
    def column(self) -> tuple:
        """Everything but k: (r, micro, accum, placement, policy, adapter_dtype, offload)."""
        return (self.r, self.micro_batch_size, self.gradient_accumulation_steps, self.placement, self.policy,
                self.adapter_dtype, self.offload)


def at_k(column: tuple, k: int) -> Config:
    r, mb, acc, placement, *rest = column
    return Config(r, mb, acc, placement, k, *rest)


def column_label(column: tuple) -> str:
    """A column's configs' common name: the key without its k."""
    return at_k(column, 0).key.removesuffix("-k0")


def alpha_for(rule: str, r: int) -> float:
    """`2*r`, `r`, `16`: lora_alpha as an arithmetic expression of r (nothing else is allowed)."""
    allowed = set("0123456789.*+-/() r")
    if not set(rule) <= allowed:
        raise SpecError("search space", [f"lora_alpha_rule: only numbers, r and + - * / ( ), got {rule!r}"])
    return float(eval(rule, {"__builtins__": {}}, {"r": r}))  # noqa: S307 - characters checked above


def apply_config(job: JobSpec, c: Config, alpha_rule: str) -> JobSpec:
    """The job with a config's values: what a trial runs and what the winner's YAML holds."""
    raw = job.to_dict()
    raw["lora"].update(r=c.r, lora_alpha=alpha_for(alpha_rule, c.r), adapter_dtype=c.adapter_dtype)
    raw["training"].update(micro_batch_size=c.micro_batch_size, gradient_accumulation_steps=c.gradient_accumulation_steps)
    raw["activation_checkpointing"] = {**raw["activation_checkpointing"], "layers": "none", "count": c.k,
                                       "placement": c.placement, "policy": c.policy, "offload": c.offload}
    return job_from_dict(raw, "tuned job")


def expand(job: JobSpec, space: SearchSpaceSpec, num_layers: int) -> tuple[list[tuple], list[int]]:
    """The columns (r, micro, accum, placement, policy, adapter dtype, offload) and the k values; all problems
    reported at once."""
    problems = []
    workers = job.resources.num_workers
    global_batch = job.global_batch_size
    accums = space.gradient_accumulation_steps or [job.training.gradient_accumulation_steps]
    bad = [a for a in accums if global_batch % (a * workers)]
    if bad:
        problems.append(f"gradient_accumulation_steps: {bad} do not divide the job's global batch {global_batch} "
                        f"(= micro {job.training.micro_batch_size} x accum {job.training.gradient_accumulation_steps}"
                        f" x workers {workers}); use divisors of {global_batch // workers}")
    ac = space.activation_checkpointing
    if ac.k is None:
        ks = list(range(num_layers + 1))
    elif isinstance(ac.k, dict):
        if set(ac.k) != {"min", "max"}:
            problems.append(f"activation_checkpointing.k: a range is {{min: A, max: B}}, got {ac.k}")
            ks = []
        else:
            ks = list(range(ac.k["min"], ac.k["max"] + 1))
    else:
        ks = sorted(set(ac.k))
    if ks and (min(ks) < 0 or max(ks) > num_layers):
        problems.append(f"activation_checkpointing.k: must lie in 0..{num_layers} (the model's layers), got {min(ks)}..{max(ks)}")
    if ac.layer_sets:
        problems.append("activation_checkpointing.layer_sets: explicit sets are for the random/optuna searchers' "
                        "comparison runs and are not supported by this version; use k with placements")
    if space.gpu_memory_gib is None:
        problems.append("gpu_memory_gib: set a ceiling (in the space file or with --gpu-memory-gib)")
    try:
        alpha_for(space.lora_alpha_rule, 8)
    except SpecError as e:
        problems += e.problems
    except Exception as e:  # a malformed expression
        problems.append(f"lora_alpha_rule: cannot evaluate {space.lora_alpha_rule!r}: {e}")
    if problems:
        raise SpecError("search space", problems)
    rs = space.lora_r or [job.lora.r]
    policies = ac.policies or [job.activation_checkpointing.policy]
    adapter_dtypes = space.adapter_dtypes or [job.lora.adapter_dtype]
    offloads = ac.offloads or [job.activation_checkpointing.offload]
    columns = [(r, global_batch // (a * workers), a, p, pol, ad, off) for ad in adapter_dtypes for pol in policies
               for off in offloads if not (off and pol == "selective")  # offload works with full recompute only
               for r in sorted(rs) for a in sorted(accums, reverse=True) for p in ac.placements]
    return columns, ks


# ---------------------------------------------------------------------------------------------
# Searchers


def _dominates_memory(a: Config, b: Config) -> bool:
    """b needs at least as much memory as a (same placement, policy, adapter dtype): larger r and
    micro-batch, fewer checkpointed layers."""
    return (a.column[3:] == b.column[3:] and b.r >= a.r and b.micro_batch_size >= a.micro_batch_size
            and b.k <= a.k)


class FitSearcher:
    """Smallest k that fits, per column, seeded by the memory estimate; see the module docstring.

    The decision logic lives here, apart from Ray, and `TuneFitSearcher` adapts it to Tune's
    Searcher interface (suggest / on_trial_complete / save / restore).
    """

    def __init__(self, columns: list[tuple], ks: list[int], ceiling_gib: float, margin_gib: float,
                 predicted: dict[str, float] | None = None, prune_margin_pct: float = 10.0,
                 prune_dominated: bool = True):
        self.columns, self.ks = columns, ks
        self.limit_gib = ceiling_gib - margin_gib
        self.predicted = predicted or {}
        self.prune_margin = prune_margin_pct / 100.0
        self.results: dict[str, dict] = {}   # key -> {"feasible": bool, ...}
        self.pending: dict[str, Config] = {}  # trial id -> config
        self.pruned: dict[str, float] = {}    # key -> predicted GiB (never launched)
        self.dominated: dict[tuple, bool] = {}  # columns that cannot beat a smaller-rank twin
        self.prune_dominated = prune_dominated

    def _config(self, column: tuple, k: int) -> Config:
        return at_k(column, k)

    def known(self, c: Config) -> bool | None:
        """True/False if measured or implied by a measured result; None if unknown."""
        if c.key in self.results:
            return self.results[c.key]["feasible"]
        for res in self.results.values():
            m = res["config"]
            if not res["feasible"] and _dominates_memory(m, c):
                return False
        return None

    def _predicted_over(self, c: Config) -> bool:
        p = self.predicted.get(c.key)
        return p is not None and p > self.limit_gib * (1 + self.prune_margin)

    def _column_state(self, column: tuple) -> tuple[int | None, int | None]:
        """(index of the largest k known infeasible, index of the smallest k measured feasible)."""
        lo, hi = None, None
        for i, k in enumerate(self.ks):
            c = self._config(column, k)
            state = self.known(c)
            if state is False or (c.key in self.pruned):
                lo = i
            if state is True and c.key in self.results and hi is None:
                hi = i
        return lo, hi

    def next_config(self) -> Config | None | str:
        """A config to probe, None to wait for running probes, or "done"."""
        busy = {c.column for c in self.pending.values()}
        waiting = False
        for column in self.columns:
            if column in busy or column in self.dominated:
                waiting = waiting or column in busy
                continue
            smaller_r = [c for c in self.columns if c[1:] == column[1:] and c[0] < column[0]]
            if any(not self._settled(c) for c in smaller_r):
                waiting = True  # its smaller-rank twin decides whether this column can win at all
                continue
            if self._is_dominated(column, smaller_r):
                self.dominated[column] = True
                continue
            lo, hi = self._column_state(column)
            first = 0 if lo is None else lo + 1
            last = (len(self.ks) - 1) if hi is None else hi - 1
            if first > last:
                continue  # column settled: its best is ks[hi] (or nothing fits)
            candidates = self.ks[first:last + 1]
            # Prune candidates the estimate puts over the ceiling beyond the margin.
            pruned_now = False
            for k in candidates:
                c = self._config(column, k)
                if self._predicted_over(c) and c.key not in self.pruned:
                    self.pruned[c.key] = self.predicted[c.key]
                    pruned_now = True
            if pruned_now:
                return self.next_config()
            # Probe nearest the predicted boundary: the smallest candidate predicted to fit (if a
            # fit is measured above it, this checks the estimate's claim); if none is predicted to
            # fit, the largest candidate (confirming the boundary); with no estimate, bisect.
            fits = [k for k in candidates if self.predicted.get(self._config(column, k).key, math.inf) <= self.limit_gib]
            if fits:
                k = fits[0]
            elif self.predicted:
                k = candidates[-1]
            else:
                k = candidates[(len(candidates) - 1) // 2] if hi is not None else candidates[len(candidates) // 2]
            return self._config(column, k)
        return None if waiting else "done"

    def _settled(self, column: tuple) -> bool:
        if column in self.dominated:
            return True
        if any(c.column == column for c in self.pending.values()):
            return False
        lo, hi = self._column_state(column)
        first = 0 if lo is None else lo + 1
        last = (len(self.ks) - 1) if hi is None else hi - 1
        return first > last

    def _is_dominated(self, column: tuple, smaller_r: list[tuple]) -> bool:
        """A larger rank is never faster at the same micro-batch and k, and never needs fewer
        checkpointed layers; so once a smaller-rank twin's best k* is measured and this column
        cannot fit below k*, none of its configs can beat the twin (pruned as 'dominated')."""
        if not self.prune_dominated:
            return False
        for twin in smaller_r:
            best = [res["config"].k for res in self.results.values() if res["config"].column == twin and res["feasible"]]
            if not best:
                continue
            lo, _ = self._column_state(column)
            k_star = min(best)
            first_k = self.ks[0 if lo is None else lo + 1] if (lo is None or lo + 1 < len(self.ks)) else None
            if first_k is None or first_k >= k_star:
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
        grid = [self._config(col, k) for col in self.columns for k in self.ks]
        random.Random(seed).shuffle(grid)
        self.queue = grid[:num_samples]

    def next_config(self):
        while self.queue:
            c = self.queue.pop(0)
            if c.key not in self.results:
                return c
        return None if self.pending else "done"


def tune_searcher_class():
    from ray.tune.search import Searcher

    class TuneFitSearcher(Searcher):
        """Adapts a FitSearcher/RandomSearcher to Ray Tune (so Tune's concurrency and resume apply)."""

        def __init__(self, inner: FitSearcher, on_result=None, on_pruned=None):
            super().__init__(metric="score", mode="max")
            self.inner, self.on_result, self.on_pruned = inner, on_result, on_pruned
            self.finished = False

        def suggest(self, trial_id: str):
            before, before_columns = set(self.inner.pruned), set(self.inner.dominated)
            nxt = self.inner.next_config()
            if self.on_pruned:
                for key in set(self.inner.pruned) - before:
                    self.on_pruned(key, self.inner.pruned[key])
                for column in set(self.inner.dominated) - before_columns:
                    self.on_pruned(column_label(column) + "-dominated", None)
            if nxt == "done":
                self.finished = True
                return Searcher.FINISHED
            if nxt is None:
                return None
            self.inner.pending[trial_id] = nxt
            return {"config": asdict(nxt), "predicted_peak_gib": self.inner.predicted.get(nxt.key)}

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            c = self.inner.pending.pop(trial_id, None)
            if c is None:
                return
            res = classify(result, self.inner.limit_gib, error)
            self.inner.record(c, res)
            if self.on_result:
                self.on_result(c, res)

        def save(self, checkpoint_path: str):
            with open(checkpoint_path, "wb") as f:
                pickle.dump(self.inner, f)

        def restore(self, checkpoint_path: str):
            with open(checkpoint_path, "rb") as f:
                self.inner = pickle.load(f)
            self.inner.pending.clear()  # unfinished trials are re-suggested

    return TuneFitSearcher


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


# ---------------------------------------------------------------------------------------------
# The trial: a Tune function that builds and fits a TorchTrainer (Ray's Train-inside-Tune pattern)


def probe_trial(config: dict, job: dict, space: dict, uri: str, parent_run_id: str, storage: str,
                exclusive: bool = False) -> None:
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from runner.train import scaling_config, train_loop_per_worker

    job_spec, sp = job_from_dict(job), SearchSpaceSpec.model_validate(space)
    c = Config(**config["config"])
    spec = apply_config(job_spec, c, sp.lora_alpha_rule)
    probe_accum = min(c.gradient_accumulation_steps, 2)
    raw = spec.to_dict()
    raw["training"].update(gradient_accumulation_steps=probe_accum, logging_steps=1, save_steps=None,
                           eval_steps=None)
    if not raw["data"]["packing"]:
        raw["data"]["pad_to_sequence_len"] = True  # probe the worst case: every sequence full length
    if spec.resources.use_gpu:
        raw["resources"]["gpu_memory_gib"] = sp.gpu_memory_gib  # OOM here exactly where the target card would
    probe_spec = job_from_dict(raw, "probe")

    phase = "exclusive" if exclusive else "packed"
    run_name = f"{phase}-{c.key}"
    run_id = find_run(uri, spec.tracking.experiment_name,
                      f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.fitrun_config = '{c.key}' "
                      f"and tags.fitrun_phase = '{phase}'")
    if run_id is None:  # a resumed search reuses the trial's run: no duplicates
        run_id = start_run(uri, spec.tracking.experiment_name, run_name, parent_run_id=parent_run_id,
                           params={"r": c.r, "lora_alpha": spec.lora.lora_alpha, "k": c.k, "placement": c.placement,
                                   "policy": c.policy, "adapter_dtype": c.adapter_dtype, "offload": c.offload,
                                   "micro_batch_size": c.micro_batch_size,
                                   "gradient_accumulation_steps": c.gradient_accumulation_steps,
                                   "checkpointed_layers": c.k},
                           tags={"fitrun_config": c.key, "fitrun_phase": phase, "fitrun.kind": "trial"})
    logger = RunLogger(uri, run_id)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": probe_spec.to_dict(), "tracking_uri": uri, "run_id": run_id,
                           "probe": {"warmup_steps": sp.probe_warmup_steps, "steps": sp.probe_steps,
                                     "ceiling_gib": sp.gpu_memory_gib, "true_accum": c.gradient_accumulation_steps}},
        scaling_config=scaling_config(spec.resources),
        run_config=ray.train.RunConfig(name=f"{phase}-{ray.tune.get_context().get_trial_id()}", storage_path=storage,
                                       failure_config=ray.train.FailureConfig(max_failures=0),
                                       callbacks=[TuneReportCallback()]),
    )
    try:
        trainer.fit()
        metrics = logger.client.get_run(run_id).data.metrics
        # The worker's final summary, peak_gib included (reserved on GPU, tensor bytes on CPU).
        summary = {k.removeprefix("final_"): v for k, v in metrics.items() if k.startswith("final_")}
        ray.tune.report({"score": summary.get("score", 0.0), **summary})
    except Exception as e:  # an OOM outside the loop (model build) is a result too; anything else is an error
        text = str(e)
        oom = "OutOfMemory" in text or "out of memory" in text
        summary = {"oom": 1.0 if oom else 0.0, "status": None if oom else "error", "message": text[-500:],
                   "peak_gib": None, "tokens_per_s": 0.0}
        ray.tune.report({"score": 0.0, **{k: v for k, v in summary.items() if v is not None}})
    outcome = classify(summary, sp.gpu_memory_gib - sp.safety_margin_gib)
    if config.get("predicted_peak_gib") is not None:
        logger.metrics({"predicted_peak_gib": config["predicted_peak_gib"]})
        if outcome["peak_gib"]:
            logger.metrics({"estimate_error_pct": (config["predicted_peak_gib"] - outcome["peak_gib"])
                            / outcome["peak_gib"] * 100})
    logger.metrics({"feasible": float(outcome["feasible"]), "tokens_per_s": outcome.get("measured_tokens_per_s", 0.0),
                    **({"peak_gib": outcome["peak_gib"]} if outcome["peak_gib"] is not None else {})})
    logger.tags({"status": outcome["status"]})
    logger.end(ok=outcome["status"] != "error")


# ---------------------------------------------------------------------------------------------
# Driver


def predict_all(job: JobSpec, space: SearchSpaceSpec, columns, ks, target: str, num_layers: int) -> dict[str, float]:
    """Estimated peak (GiB) of every grid config: two traces per (r, micro, placement), k interpolated."""
    import ray

    from runner.estimate import estimate
    from runner.spec import ActivationCheckpointingSpec
    from runner.checkpointing import resolve_layers

    @ray.remote(num_cpus=1)
    def trace(spec_dict: dict, k: int, placement: str, num_layers: int) -> float:
        spec = job_from_dict(spec_dict)
        layers = resolve_layers(ActivationCheckpointingSpec(count=k, placement=placement), num_layers)
        return estimate(spec, target, layers).peak_gib

    anchors = sorted({min(ks), max(ks)})
    futures = {}
    def trace_key(column, k):  # accumulation does not move memory: one trace serves all of them
        return column[:2] + column[3:] + (k,)

    for column in columns:
        spec = apply_config(job, at_k(column, 0), space.lora_alpha_rule)
        for k in anchors:
            if trace_key(column, k) not in futures:
                futures[trace_key(column, k)] = trace.remote(spec.to_dict(), k, column[3], num_layers)
    values = dict(zip(futures, ray.get(list(futures.values()))))
    out = {}
    for column in columns:
        lo, hi = values[trace_key(column, anchors[0])], values[trace_key(column, anchors[-1])]
        for k in ks:
            w = 0.0 if len(anchors) == 1 else (k - anchors[0]) / (anchors[-1] - anchors[0])
            out[at_k(column, k).key] = lo * (1 - w) + hi * w
    return out


def concurrency(job: JobSpec, space: SearchSpaceSpec, trial_cpus: float) -> tuple[int, float]:
    """(trials at once, GPU fraction per worker): ⌊card / (ceiling + margin)⌋ on a GPU, CPU-bound otherwise."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    res = job.resources
    by_cpu = max(1, int(cpus // (trial_cpus + res.cpus_per_worker * res.num_workers)))
    if not res.use_gpu:
        return min(by_cpu, space.max_concurrent_trials or by_cpu), 0.0
    card_gib = _card_gib()
    per_card = max(1, int(card_gib // (space.gpu_memory_gib + space.safety_margin_gib)))
    gpus = ray.cluster_resources().get("GPU", 1)
    n = min(by_cpu, int(per_card * gpus) // res.num_workers, space.max_concurrent_trials or 10**6)
    return max(1, n), 1.0 / per_card


def _card_gib() -> float:
    """The GPU's memory, read through NVML so the driver process creates no CUDA context."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total / GIB
    except Exception:
        import torch

        return torch.cuda.get_device_properties(0).total_memory / GIB


def run_tune(job: JobSpec, space: SearchSpaceSpec, resume: bool = False, gpu_hour_price: float | None = None,
             winner_path: str | None = None, extra_exclusive: list[Config] = ()) -> dict[str, Any]:
    """Run the search; print and return the winner, the frontier and the counts."""
    import ray.tune

    from runner.kernels import check_available
    from runner.model import model_config
    from runner.train import absolute_paths, init_ray

    job = absolute_paths(job)
    check_available(job.training)
    num_layers = model_config(job.model, allow_builtin=True).num_hidden_layers
    columns, ks = expand(job, space, num_layers)  # raises SpecError before anything runs
    out = Path(job.output_dir)
    storage = out / "tune"
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(job.tracking)
    experiment = job.tracking.experiment_name
    parent_file = out / "tune_parent_run_id"
    state_file = out / "tune_searcher.pkl"
    started = datetime.datetime.now()

    init_ray(job.resources.address)
    target = "cuda" if job.resources.use_gpu else "cpu"
    n_concurrent, gpu_fraction = concurrency(job, space, TRIAL_CPUS)
    if job.resources.use_gpu:
        job = job.model_copy(update={"resources": job.resources.model_copy(update={"gpus_per_worker": gpu_fraction})})

    if resume and parent_file.exists() and state_file.exists():
        parent_id = parent_file.read_text().strip()
        inner = pickle.loads(state_file.read_bytes())
        inner.pending.clear()
        RunLogger(uri, parent_id).client.update_run(parent_id, status="RUNNING")
        print(f"resuming search: {len(inner.results)} trials done, {len(inner.pruned)} pruned", flush=True)
    else:
        for f in (parent_file, state_file):
            f.unlink(missing_ok=True)
        shutil.rmtree(storage, ignore_errors=True)
        parent_id = start_run(uri, experiment, f"tune-{job.name}", params={"space": space.model_dump(mode="json"),
                              "job": job.name, "ceiling_gib": space.gpu_memory_gib}, tags={"fitrun.kind": "tune"})
        parent_file.write_text(parent_id)
        predicted = predict_all(job, space, columns, ks, target, num_layers) if space.prune_with_estimate else {}
        args = (columns, ks, space.gpu_memory_gib, space.safety_margin_gib)
        kw = {"predicted": predicted, "prune_margin_pct": space.prune_margin_pct,
              "prune_dominated": space.prune_dominated}
        inner = RandomSearcher(*args, num_samples=space.num_samples, **kw) if space.searcher == "random" \
            else FitSearcher(*args, **kw)
    parent = RunLogger(uri, parent_id)
    grid_size = len(columns) * len(ks)
    print(f"search: {len(columns)} columns x {len(ks)} k = {grid_size} configs; ceiling {space.gpu_memory_gib} GiB "
          f"(margin {space.safety_margin_gib}); {n_concurrent} trial(s) at once; MLflow parent run {parent_id}",
          flush=True)

    def on_result(c: Config, res: dict) -> None:
        state_file.write_bytes(pickle.dumps(searcher.inner))
        peak = f"{res['peak_gib']:.3f}" if res.get("peak_gib") is not None else "-"
        print(f"trial {c.key:<36} {res['status']:<10} peak {peak:>8} GiB  "
              f"{res.get('measured_tokens_per_s', 0.0):>10,.0f} tok/s", flush=True)

    def on_pruned(key: str, predicted_gib: float | None) -> None:
        """A config never launched: predicted over the ceiling, or a column dominated by a smaller rank."""
        state_file.write_bytes(pickle.dumps(searcher.inner))
        reason = "estimate" if predicted_gib is not None else "dominated"
        run = start_run(uri, experiment, f"pruned-{key}", parent_run_id=parent_id,
                        params={"config": key, "reason": reason},
                        tags={"status": "pruned", "fitrun_config": key, "fitrun_phase": "pruned", "fitrun.kind": "trial"})
        logger = RunLogger(uri, run)
        logger.metrics({"feasible": 0.0, **({"predicted_peak_gib": predicted_gib} if predicted_gib is not None else {})})
        logger.end(ok=True)

    searcher = tune_searcher_class()(inner, on_result, on_pruned)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(probe_trial, job=job.to_dict(), space=space.model_dump(mode="json"), uri=uri,
                                 parent_run_id=parent_id, storage=str(storage / "train")),
        {"cpu": TRIAL_CPUS})
    tuner = ray.tune.Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(search_alg=searcher, num_samples=grid_size,
                                        max_concurrent_trials=n_concurrent, reuse_actors=False),
        run_config=ray.tune.RunConfig(name=f"search-{len(list(storage.glob('search-*')))}", storage_path=str(storage),
                                      failure_config=ray.tune.FailureConfig(max_failures=0), verbose=1),
    )
    tuner.fit()
    inner = searcher.inner
    state_file.write_bytes(pickle.dumps(inner))
    if not searcher.finished:  # stopped early (Ctrl-C): keep the state, report nothing as final
        print(f"search interrupted after {len(inner.results)} trial(s); continue it with --resume", flush=True)
        raise SystemExit(130)

    # -- rank finalists by uncontended speed ---------------------------------------------------
    finalists = sorted(inner.best_per_column(), key=lambda res: -res["tokens_per_s"])[:space.exclusive_finalists]
    exclusive: dict[str, dict] = {}
    exclusive_configs = [res["config"] for res in finalists] if n_concurrent > 1 else []
    exclusive_configs += [c for c in extra_exclusive if c not in exclusive_configs]
    if exclusive_configs:
        exclusive = _run_exclusive(exclusive_configs, job, space, uri, parent_id, storage)
    speed_source = "exclusive" if exclusive and n_concurrent > 1 else \
        "packed (one trial at a time: uncontended)" if n_concurrent == 1 else "packed (contended)"

    def speed(res: dict) -> float:
        """Uncontended tokens/s: the exclusive re-measurement, else the probe's own (one trial at a time)."""
        ex = exclusive.get(res["config"].key)
        if ex is not None:
            return ex["tokens_per_s"] if ex["feasible"] else 0.0
        return res["tokens_per_s"]

    ranked = sorted(finalists, key=speed, reverse=True)
    winner = ranked[0] if ranked else None
    summary = _summarise(job, space, inner, winner, speed, speed_source, grid_size, started, exclusive,
                         gpu_hour_price, parent, winner_path, out)
    parent.end(ok=winner is not None)
    return summary


def _run_exclusive(configs: list[Config], job: JobSpec, space: SearchSpaceSpec, uri: str, parent_id: str,
                   storage: Path) -> dict[str, dict]:
    """Re-measure configs one at a time (full GPU share) for speed without contention."""
    import ray.tune
    from ray.tune.search import BasicVariantGenerator

    print(f"exclusive phase: {', '.join(c.key for c in configs)}", flush=True)
    exclusive_job = job.model_copy(update={"resources": job.resources.model_copy(update={"gpus_per_worker": 1.0})})
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(probe_trial, job=exclusive_job.to_dict(), space=space.model_dump(mode="json"),
                                 uri=uri, parent_run_id=parent_id, storage=str(storage / "train"), exclusive=True),
        {"cpu": TRIAL_CPUS})
    tuner = ray.tune.Tuner(
        trainable,
        param_space={"config": ray.tune.grid_search([asdict(c) for c in configs])},
        tune_config=ray.tune.TuneConfig(search_alg=BasicVariantGenerator(max_concurrent=1)),  # one at a time
        run_config=ray.tune.RunConfig(name="exclusive", storage_path=str(storage), verbose=0),
    )
    grid = tuner.fit()
    out = {}
    for r in grid:
        c = Config(**r.config["config"])
        out[c.key] = classify(r.metrics, space.gpu_memory_gib - space.safety_margin_gib, r.error is not None)
    return out


def pareto(points: list[dict]) -> list[dict]:
    """Feasible configs not beaten on both memory (lower) and speed (higher)."""
    front = []
    for p in sorted(points, key=lambda p: (p["peak_gib"], -p["tokens_per_s"])):
        if not front or p["tokens_per_s"] > front[-1]["tokens_per_s"]:
            front.append(p)
    return front


def _summarise(job, space, inner, winner, speed, speed_source, grid_size, started, exclusive, price, parent,
               winner_path, out) -> dict[str, Any]:
    wall_s = (datetime.datetime.now() - started).total_seconds()
    results = list(inner.results.values())
    counts = {"trials_run": len(results), "grid_size": grid_size, "pruned": len(inner.pruned),
              "dominated_columns": len(inner.dominated),
              "infeasible": sum(r["status"] == "infeasible" for r in results),
              "errors": sum(r["status"] == "error" for r in results), "exclusive_runs": len(exclusive)}
    front = pareto([r for r in results if r["feasible"]])
    lines = ["| config | status | peak GiB | tokens/s (packed) | tokens/s (exclusive) | loss |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in sorted(results, key=lambda r: r["config"]):
        ex = exclusive.get(r["config"].key)
        peak = f"{r['peak_gib']:.3f}" if r.get("peak_gib") is not None else "-"
        exclusive_speed = f"{ex['tokens_per_s']:,.0f}" if ex else "-"
        loss = f"{r['loss']:.4f}" if r.get("loss") is not None else "-"
        lines.append(f"| {r['config'].key} | {r['status']} | {peak} | {r.get('measured_tokens_per_s', 0):,.0f} | "
                     f"{exclusive_speed} | {loss} |")
    for key, gib in sorted(inner.pruned.items()):
        lines.append(f"| {key} | pruned (predicted {gib:.3f} GiB) | - | - | - | - |")
    for column in inner.dominated:
        lines.append(f"| {column_label(column)}-* | pruned (dominated by a smaller rank) "
                     f"| - | - | - | - |")
    table = "\n".join(lines)
    front_lines = ["| config | peak GiB | tokens/s |", "| --- | --- | --- |"] + \
        [f"| {p['config'].key} | {p['peak_gib']:.3f} | {p['tokens_per_s']:,.0f} |" for p in front]
    print("\n" + table, flush=True)
    print("\nfrontier (memory vs packed speed):\n" + "\n".join(front_lines))
    print(f"\n{json.dumps(counts)}; tune_wall_s: {wall_s:.0f}")
    summary: dict[str, Any] = {**counts, "tune_wall_s": wall_s, "frontier": [p["config"].key for p in front],
                               "speed_source": speed_source, "table": table}
    parent.metrics({k: float(v) for k, v in counts.items()} | {"tune_wall_s": wall_s})
    parent.text(table, "trials.md")
    parent.text("\n".join(front_lines), "frontier.md")
    _plot(results, front, parent, out)
    if winner is None:
        print("no configuration fits the ceiling: raise gpu_memory_gib, allow more checkpointed layers, "
              "or smaller micro-batches (larger accumulation)")
        parent.tags({"winner": "none"})
        return summary
    c = winner["config"]
    tokens_per_s = speed(winner)
    winner_spec = apply_config(job, c, space.lora_alpha_rule)
    raw = winner_spec.to_dict()
    raw["name"] = f"{job.name}-tuned"
    if job.resources.use_gpu:
        raw["resources"].update(gpus_per_worker=1.0)
    text = f"# fitrun tune winner: {c.key}, {tokens_per_s:,.0f} tokens/s ({speed_source}), " \
           f"peak {winner['peak_gib']:.2f} GiB under {space.gpu_memory_gib} GiB\n" + dump_yaml(job_from_dict(raw))
    path = Path(winner_path) if winner_path else out / "winner.yaml"
    path.write_text(text)
    parent.text(text, "winner.yaml")
    parent.tags({"winner": c.key})
    parent.metrics({"winner_tokens_per_s": tokens_per_s, "winner_peak_gib": winner["peak_gib"]})
    print(f"\nwinner: {c.key}  {tokens_per_s:,.0f} tokens/s ({speed_source}), peak {winner['peak_gib']:.3f} GiB; "
          f"job written to {path}  (fitrun train {path})")
    if price:
        from runner.data import tokenize
        from runner.model import build_tokenizer

        per_m = price / 3600 / tokens_per_s * 1e6
        tokens_per_epoch = tokenize(job.data, build_tokenizer(job.tokenizer, job.model)).num_train_tokens
        gpus = job.resources.num_workers if job.resources.use_gpu else 1
        per_epoch = price * gpus / 3600 * tokens_per_epoch / tokens_per_s
        print(f"cost: ${per_m:.4f} per 1M tokens, ${per_epoch:.4f} per epoch ({tokens_per_epoch:,} tokens) "
              f"at ${price}/GPU-hour")
        summary.update(usd_per_million_tokens=per_m, usd_per_epoch=per_epoch)
    summary.update(winner=c.key, winner_config=asdict(c), winner_tokens_per_s=tokens_per_s,
                   winner_peak_gib=winner["peak_gib"], winner_path=str(path), exclusive=dict(exclusive))
    return summary


def _plot(results, front, parent: RunLogger, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for status, colour in (("ok", "tab:blue"), ("infeasible", "tab:red")):
        pts = [r for r in results if r["status"] == status and r.get("peak_gib") is not None]
        ax.scatter([r["peak_gib"] for r in pts], [r.get("measured_tokens_per_s", 0) for r in pts], c=colour,
                   label=status, s=18)
    ax.plot([p["peak_gib"] for p in front], [p["tokens_per_s"] for p in front], "k--", lw=1, label="frontier")
    ax.set_xlabel("peak memory (GiB)")
    ax.set_ylabel("tokens/s")
    ax.legend()
    ax.set_title("fitrun tune: memory vs speed")
    path = out / "frontier.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    parent.artifact(path)
