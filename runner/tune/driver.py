"""The Ray Tune driver: the fastest configuration under a memory ceiling.

Trials (`runner.tune.trial`) run concurrently, ⌊card / (ceiling + margin)⌋ to a GPU, steered by the
structured searcher (`runner.tune.search`); the finalists are then re-measured one at a time for their
uncontended speed (the exclusive phase), each rank's fastest is trained a few steps for its eval loss
(the quality phase), and `runner.tune.report` tabulates and writes the winner. The search's parent run,
children and folders belong to one `Search` (`runner.tune.session`).
"""

from __future__ import annotations

import datetime
import json
from contextlib import contextmanager
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

from runner.cards import MEASURED_ON, card_in_hand, load_catalogue, outside_allocator_gib
from runner.loading import job_from_dict
from runner.spec import JobSpec, SearchSpaceSpec, SpecError
from runner.storage import Location
from runner.tracking import start_run, tracking_uri, without_credentials
from runner.tune.cheapest import load_prices, parse_cards
from runner.tune.report import Outcome, TuneOptions, fastest_per_rank, summarise
from runner.tune.search import Config, FitSearcher, RandomSearcher, expand
from runner.tune.session import Search
from runner.tune.trial import OUTCOME_KEYS, measure, probe_trial

GIB = 1024**3
TRIAL_CPUS = 0.25  # the Tune function only drives its TorchTrainer; the workers hold the real CPUs
STATE_FILE = "tune_searcher.json"


def tune_searcher_class():
    from ray.tune.search import Searcher

    class TuneFitSearcher(Searcher):
        """Adapts a FitSearcher/RandomSearcher to Ray Tune (so Tune's concurrency applies); its state
        is one JSON file, written after every result, read back by `--resume`."""

        def __init__(self, inner: FitSearcher, state_path: Location, on_result=None, on_pruned=None):
            super().__init__(metric="score", mode="max")
            self.inner, self.state_path, self.on_result, self.on_pruned = inner, state_path, on_result, on_pruned
            self.finished = False

        def suggest(self, trial_id: str):
            before = set(self.inner.pruned), set(self.inner.dominated), set(self.inner.outpaced)
            nxt = self.inner.next_config()
            self._log_pruned_since(*before)
            if nxt == "done":
                self.finished = True
                return Searcher.FINISHED
            if nxt is None:
                return None
            self.inner.pending[trial_id] = nxt
            return {"config": asdict(nxt), "predicted_peak_gib": self.inner.predicted.get(nxt.key),
                    "predicted_tokens_per_s": self.inner.speed.get(nxt.key)}

        def _log_pruned_since(self, *before: set) -> None:
            """What the last suggestion ruled out without running it: state saved, each logged (on_pruned)."""
            if new := ruled_out_since(self.inner, *before):
                self.save(str(self.state_path))
            for config, predicted, slower in new if self.on_pruned else ():
                self.on_pruned(config, predicted, outpaced=slower)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            from runner.tune.search import classify

            c = self.inner.pending.pop(trial_id, None)
            if c is None:
                return
            # The trial classified its own outcome; only a trial that died before reporting is classified here.
            res = {k: result[k] for k in OUTCOME_KEYS if k in result} if result and "status" in result and not error \
                else classify(result, self.inner.limit_gib, error=True)
            if c.key in self.inner.speed:  # the prediction it was chosen by, beside what it measured
                res["predicted_tokens_per_s"] = self.inner.speed[c.key]
            self.inner.record(c, res)
            self.save(str(self.state_path))
            if self.on_result:
                self.on_result(c, res)

        def save(self, checkpoint_path: str):
            Location(checkpoint_path).write_text(json.dumps(self.inner.state_dict()))

        def restore(self, checkpoint_path: str):
            self.inner.load_state_dict(json.loads(Location(checkpoint_path).read_text()))

    return TuneFitSearcher


def ruled_out_since(inner: FitSearcher, pruned: set, dominated: set, outpaced: set) -> list[tuple]:
    """(config or column, its predicted GiB, (predicted tokens/s, best measured, the model's error)) for each config
    the searcher pruned by the estimate, column it found dominated, or column it found outpaced, since `pruned`,
    `dominated` and `outpaced` were taken."""
    new_keys = set(inner.pruned) - pruned
    by_key = {c.at_k(k).key: c.at_k(k) for c in inner.columns for k in inner.ks} if new_keys else {}
    return [(by_key[key], inner.pruned[key], None) for key in new_keys] + \
        [(column, None, None) for column in set(inner.dominated) - dominated] + \
        [(column, None, (inner.outpaced[column], inner.best_measured_speed(), inner.speed_error))
         for column in set(inner.outpaced) - outpaced]


def predict_all(job: JobSpec, space: SearchSpaceSpec, columns: list[Config], ks: list[int], target: str,
                num_layers: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Estimated peak (GiB) of every grid config the estimate models, and every config's estimate (the
    step-time model prices its work): its k anchors traced in parallel Ray tasks, the rest interpolated the
    same way as `fitrun estimate --sweep`."""
    import ray

    from runner.estimate.trace import estimate_at_k, interpolate_k, k_anchors
    from runner.tune.search import apply_config

    @ray.remote(num_cpus=1)
    def trace(spec_dict: dict, k: int, placement: str):
        return estimate_at_k(job_from_dict(spec_dict), k, placement, num_layers, target)

    def trace_key(column: Config) -> Config:  # accumulation does not move memory: one trace serves all
        return replace(column, gradient_accumulation_steps=0)

    futures: dict[Config, dict[int, Any]] = {}
    for column in columns:
        if trace_key(column) not in futures:
            spec = apply_config(job, column.at_k(0), space.lora_alpha_rule).to_dict()
            futures[trace_key(column)] = {k: trace.remote(spec, k, column.placement) for k in k_anchors(ks)}
    traced = {key: interpolate_k(dict(zip(fs, ray.get(list(fs.values())))), ks) for key, fs in futures.items()}
    # A lever combination the estimate is not modelled for gets no prediction: it is measured, never pruned by it.
    unmodelled = [c for c in columns if traced[trace_key(c)][ks[0]].unmodelled]
    if unmodelled:
        print(f"estimate: {len(unmodelled)} of {len(columns)} columns are lever combinations it is not modelled for "
              f"({traced[trace_key(unmodelled[0])][ks[0]].unmodelled}): measured, not pruned by it", flush=True)
    peaks = {column.at_k(k).key: traced[trace_key(column)][k].peak_gib for column in columns for k in ks
             if column not in unmodelled}
    return peaks, {column.at_k(k).key: traced[trace_key(column)][k] for column in columns for k in ks}


def concurrency(job: JobSpec, space: SearchSpaceSpec, trial_cpus: float) -> tuple[int, float]:
    """(trials at once, GPU fraction per worker): ⌊card / (ceiling + margin)⌋ on a GPU, CPU-bound otherwise."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    res = job.resources
    by_cpu = max(1, int(cpus // (trial_cpus + res.cpus_per_worker * res.num_workers)))
    if not res.use_gpu:
        return min(by_cpu, space.max_concurrent_trials or by_cpu), 0.0
    gpus = ray.cluster_resources().get("GPU", 1)
    if res.num_workers > 1:
        # NCCL refuses two ranks of one process group on one GPU, and Ray places fractional workers
        # on any card with room: a multi-worker trial takes whole GPUs (its cap still sets the ceiling).
        return max(1, min(by_cpu, int(gpus) // res.num_workers, space.max_concurrent_trials or 10**6)), 1.0
    # Each probe is a whole process: its allocator ceiling, the margin, and what lives outside the allocator.
    catalogue = load_catalogue()
    outside_gib, _ = outside_allocator_gib(card_in_hand() or catalogue[MEASURED_ON], catalogue)
    per_card = max(1, int(_card_gib() // (space.gpu_memory_gib + space.safety_margin_gib + outside_gib)))
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


def _trainable(search: Search):
    import ray.tune

    return ray.tune.with_resources(ray.tune.with_parameters(probe_trial, search=search.to_dict()),
                                   {"cpu": TRIAL_CPUS})


def _on_result(c: Config, res: dict) -> None:
    peak = f"{res['peak_gib']:.3f}" if res.get("peak_gib") is not None else "-"
    print(f"trial {c.key:<36} {res['status']:<10} peak {peak:>8} GiB  "
          f"{res.get('measured_tokens_per_s', 0.0):>10,.0f} tok/s", flush=True)


def _speed_guide(job: JobSpec, space: SearchSpaceSpec, estimates: dict, configs: list[Config], inner: FitSearcher,
                 n_concurrent: int):
    """The step-time model over the grid, on the card the probes run on; None (every column searched) where
    no calibration applies. A resumed search refits it to the uncontended results it already has."""
    from runner.estimate.speed import calibration_for, linear_kind
    from runner.tune.guide import SpeedGuide
    from runner.tune.search import apply_config

    kinds = {linear_kind(apply_config(job, column.at_k(0), space.lora_alpha_rule))
             for column in {c.column for c in configs}}
    try:
        cal = calibration_for(job, None, load_catalogue(job.resources.gpu_catalogue), kinds)
    except ValueError as e:
        print(f"speed: not predicted ({e}): every column is searched", flush=True)
        return None
    guide = SpeedGuide(job, space, cal, estimates, configs)
    for res in inner.results.values() if n_concurrent == 1 else ():
        if res["feasible"]:
            guide.observe(res["config"], res["tokens_per_s"])
    inner.speed, inner.speed_error = guide.predictions(), guide.error
    print(f"speed: {len(inner.speed)} of {len(configs)} configs predicted ({cal.source}); columns tried fastest "
          f"first, a column predicted slower than the best measured by over {guide.error:.0%} is not probed "
          f"(--exhaustive searches every column)", flush=True)
    return guide


def _on_result_guided(c: Config, res: dict, guide, inner: FitSearcher, n_concurrent: int) -> None:
    """A probe's outcome: printed; an uncontended feasible one refits the step-time model, whose new predictions
    the searcher uses from its next suggestion."""
    _on_result(c, res)
    if guide is None or not res.get("feasible") or n_concurrent > 1:
        return
    guide.observe(c, res["tokens_per_s"])
    inner.speed, inner.speed_error = guide.predictions(), guide.error


def _alone(job: JobSpec) -> JobSpec:
    """The job with a whole GPU per worker: a run that measures speed without contention."""
    return job.model_copy(update={"resources": job.resources.model_copy(update={"gpus_per_worker": 1.0})})


def run_tune(job: JobSpec, space: SearchSpaceSpec, options: TuneOptions = TuneOptions()) -> dict[str, Any]:
    """Run the search; print and return the winner, the frontier and the counts.
    Long on purpose: the driver reads top to bottom (set up or resume, search, rank, report)."""

    from runner.kernels import check_available
    from runner.model import model_config
    from runner.train.driver import absolute_paths, check_cluster_resources, init_ray

    winner_base = job.model_copy(update={"model": job.model.model_copy(update={"init": options.file_init
                                                                                or job.model.init})})
    options = replace(options, winner_base=winner_base)
    job = without_credentials(absolute_paths(job))
    check_available(job.training)
    num_layers = model_config(job.model, allow_builtin=True).num_hidden_layers
    columns, ks = expand(job, space, num_layers)  # raises SpecError before anything runs
    catalogue = load_catalogue(job.resources.gpu_catalogue)
    cards = parse_cards(options.gpus, catalogue) if options.gpus else []  # bad names or prices: before any run
    if cards and not job.resources.use_gpu:
        raise SpecError("--gpus", ["--gpus ranks GPU cards: the job needs resources.use_gpu: true"])
    prices = load_prices(options.prices, cards, catalogue) if cards else {}
    out = Location(job.output_dir)
    out.mkdir()
    uri = tracking_uri(job.tracking)
    parent_file, state_file = out / "tune_parent_run_id", out / STATE_FILE
    started = datetime.datetime.now()

    # Set up, or resume: the parent run and the searcher's state from the output folder.
    init_ray(job.resources.address)
    check_cluster_resources(job)
    n_concurrent, gpu_fraction = concurrency(job, space, TRIAL_CPUS)
    guided = not options.exhaustive and space.prune_with_estimate
    if guided and job.resources.use_gpu and n_concurrent > 1:
        # Speed-guided: probes run one at a time, as on a real card of the ceiling's size, so each measured
        # speed is uncontended: comparable with the model's predictions and fit to refit it.
        n_concurrent, gpu_fraction = 1, 1.0
    if job.resources.use_gpu:
        job = job.model_copy(update={"resources": job.resources.model_copy(update={"gpus_per_worker": gpu_fraction})})
    # Rank is a quality choice: every rank is measured unless the user asked for the cheapest config,
    # where a larger rank that cannot beat a smaller one need not run.
    kw = {"prune_margin_pct": space.prune_margin_pct, "prune_dominated": space.prune_dominated and options.cheapest}
    inner = RandomSearcher(columns, ks, space.limit_gib, num_samples=space.num_samples, **kw) \
        if space.searcher == "random" else FitSearcher(columns, ks, space.limit_gib, **kw)
    searcher = tune_searcher_class()(inner, state_file, _on_result)
    guide, estimates = None, {}
    if options.resume and parent_file.exists() and state_file.exists():
        search = Search(job, space, uri, parent_file.read_text().strip(), out)
        searcher.restore(str(state_file))
        search.parent.reopen()
        print(f"resuming search: {len(inner.results)} trials done, {len(inner.pruned)} pruned", flush=True)
    else:
        for f in (parent_file, state_file):
            f.unlink()
        (out / "tune").rmtree()
        parent_id = start_run(uri, job.tracking.experiment_name, f"tune-{job.name}",
                              params={"space": space.model_dump(mode="json"), "job": job.name,
                                      "ceiling_gib": space.gpu_memory_gib}, tags={"fitrun.kind": "tune"})
        search = Search(job, space, uri, parent_id, out)
        parent_file.write_text(parent_id)
    with _parent_closed_if_stopped(search):
        if space.prune_with_estimate and (guided or not inner.results):
            target = "cuda" if job.resources.use_gpu else "cpu"
            predicted, estimates = predict_all(job, space, columns, ks, target, num_layers)
            inner.predicted = inner.predicted or predicted  # a resumed search keeps what it pruned by
            if guided:
                guide = _speed_guide(job, space, estimates, [c.at_k(k) for c in columns for k in ks], inner,
                                     n_concurrent)
                searcher.on_result = partial(_on_result_guided, guide=guide, inner=inner, n_concurrent=n_concurrent)
        summary = _search_and_report(search, searcher, inner, grid_size=len(columns) * len(ks),
                                     n_concurrent=n_concurrent, options=options, state_file=state_file, started=started)
    if cards:
        summary["cards"] = _cheapest(search, columns, ks, num_layers, estimates, cards, catalogue, prices, guide, summary)
    return summary


def _cheapest(search: Search, columns: list[Config], ks: list[int], num_layers: int, estimates: dict, cards: list,
              catalogue: dict, prices: dict, guide, summary: dict) -> list[dict]:
    """`--gpus`: every named card's cheapest config by $ per 1M tokens, printed and logged to the parent."""
    from runner.estimate.speed import calibration_for
    from runner.tune.cheapest import rank_cards, table

    job = search.job
    configs = [c.at_k(k) for c in columns for k in ks]
    if not estimates:  # --exhaustive, or a search without the estimate: trace the grid for the cards now
        _, estimates = predict_all(job, search.space, columns, ks, "cuda", num_layers)
    try:
        reference = guide.cal if guide else calibration_for(job, None, catalogue)
    except ValueError as e:
        print(f"speed: not predicted on other cards ({e})", flush=True)
        reference = None
    in_hand = card_in_hand()
    measured = {}
    if in_hand and summary.get("winner") and job.resources.gpu in (None, in_hand.name):  # the search ran on it, whole
        measured[in_hand.name] = {"config": Config(**summary["winner_config"]), "tokens_per_s": summary["winner_tokens_per_s"]}
    rows = rank_cards(job, search.space, configs, estimates, cards, catalogue, prices, reference, measured)
    text = table(rows)
    print("\ncheapest card x config ($ per 1M trained tokens; measured on the card in hand, predicted elsewhere):\n"
          + text, flush=True)
    search.parent.text(text, "cards.md")
    return rows


def _search_and_report(search: Search, searcher, inner: FitSearcher, grid_size: int, n_concurrent: int,
                       options: TuneOptions, state_file: Location, started: datetime.datetime) -> dict[str, Any]:
    """The packed phase, then rank, quality and report. Long on purpose: the phases in the order they run."""
    import ray.tune

    searcher.on_pruned = search.log_pruned
    print(f"search: {len(inner.columns)} columns x {len(inner.ks)} k = {grid_size} configs; "
          f"ceiling {search.space.gpu_memory_gib} GiB "
          f"(margin {search.space.safety_margin_gib}); {n_concurrent} trial(s) at once; MLflow parent run {search.parent_id}",
          flush=True)

    # The packed phase: Tune runs the searcher's configs, n_concurrent at a time. A trial's actor only drives its
    # probe's Ray Train run (the workers are new processes, CUDA is theirs): reusing it saves a process start and
    # the imports per trial (~7 s of a CPU trial's ~21 s).
    tuner = ray.tune.Tuner(
        _trainable(search),
        tune_config=ray.tune.TuneConfig(search_alg=searcher, num_samples=grid_size,
                                        max_concurrent_trials=n_concurrent, reuse_actors=True),
        run_config=ray.tune.RunConfig(name=f"search-{len(search.storage.names('search-'))}",
                                      storage_path=str(search.storage),
                                      failure_config=ray.tune.FailureConfig(max_failures=0), verbose=1),
    )
    tuner.fit()
    searcher.save(str(state_file))
    if not searcher.finished:  # stopped early (Ctrl-C): keep the state, report nothing as final
        print(f"search interrupted after {len(inner.results)} trial(s); continue it with --resume", flush=True)
        raise SystemExit(130)

    # Rank (the exclusive phase where probes shared a card), the quality phase, the report.
    outcome = rank_finalists(search, inner, n_concurrent, options)
    outcome.grid_size, outcome.started = grid_size, started
    outcome.quality = quality_runs(search, [res["config"] for res in fastest_per_rank(inner)], outcome)
    summary = summarise(search, outcome, options)
    search.parent.end(ok=outcome.winner is not None)
    return summary


@contextmanager
def _parent_closed_if_stopped(search: Search):
    """A search that stops before its report never leaves its MLflow parent RUNNING: KILLED when it was
    interrupted (`--resume` reopens it), FAILED with the reason when something failed."""
    from runner.train.driver import Stopped

    try:
        yield
    except (KeyboardInterrupt, SystemExit, Stopped) as e:
        search.parent.end(ok=False, status="KILLED", reason=f"interrupted ({type(e).__name__}): `fitrun tune` with "
                                                            "--resume continues the search")
        raise
    except BaseException as e:
        search.parent.end(ok=False, reason=f"{type(e).__name__}: {str(e)[-500:]}")
        raise


def rank_finalists(search: Search, inner: FitSearcher, n_concurrent: int, options: TuneOptions) -> Outcome:
    """The columns' best configs ranked by uncontended speed: re-measured one at a time when probes
    shared the card. Only the highest rank that fits competes unless `options.cheapest`."""
    best = sorted(inner.best_per_column(), key=lambda res: -res["tokens_per_s"])
    if best and not options.cheapest:
        top = max(res["config"].r for res in best)
        best = [res for res in best if res["config"].r == top]
    remeasured = best[:search.space.exclusive_finalists] if n_concurrent > 1 else []
    finalists = remeasured or best  # one trial at a time (or no re-measurement asked): the probes' own speed
    exclusive_configs = [res["config"] for res in remeasured]
    exclusive_configs += [c for c in options.extra_exclusive if c not in exclusive_configs]
    exclusive = run_exclusive(search, exclusive_configs) if exclusive_configs else {}
    speed_source = "exclusive" if exclusive and n_concurrent > 1 else \
        "packed (one trial at a time: uncontended)" if n_concurrent == 1 else "packed (contended)"
    outcome = Outcome(inner, exclusive=exclusive, speed_source=speed_source)
    ranked = sorted(finalists, key=outcome.speed, reverse=True)
    outcome.winner = ranked[0] if ranked else None
    return outcome


def run_exclusive(search: Search, configs: list[Config]) -> dict[str, dict]:
    """Re-measure configs one at a time (a whole GPU each) for their speed without contention."""
    print(f"exclusive phase: {', '.join(c.key for c in configs)}", flush=True)
    alone = replace(search, job=_alone(search.job))
    return {c.key: measure(alone, c, "exclusive", f"exclusive-{c.key}") for c in configs}


def quality_runs(search: Search, finalists: list[Config], outcome: Outcome | None = None) -> dict[str, float]:
    """Each rank's finalist trained `space.quality_steps` optimizer steps at the job's global batch (so
    the same tokens, in the same order, from the same seed), one at a time, then evaluated on the job's
    eval split: {config key: eval loss}. Each is a child run (phase `quality`); a resumed search
    reuses a finished one. Nothing when the job has no eval split. The winner's adapter becomes its run's
    MLflow model (registered when the job asks)."""
    from runner.train.driver import Stopped, log_model, make_trainer
    from runner.tune.search import apply_config

    space, job = search.space, search.job
    if not space.quality_steps or not job.data.val_fraction or not finalists:
        return {}
    print(f"quality: {space.quality_steps} steps each, then the eval loss: {', '.join(c.key for c in finalists)}",
          flush=True)
    losses = {}
    for c in finalists:
        done = search.find_child(c, "quality", status="FINISHED")
        if done and "eval_loss" in (metrics := done.latest_metrics()):
            losses[c.key] = metrics["eval_loss"]
            continue
        stale = search.find_child(c, "quality", status="RUNNING")
        if stale:  # its driver died mid-run (SIGKILL): this resumed search runs it again
            stale.end(ok=False, status="KILLED", reason="the search's driver died during this run; "
                                                        "the resumed search ran it again")
        spec = _alone(apply_config(job, c, space.lora_alpha_rule))
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={
            "max_steps": space.quality_steps, "save_steps": None, "eval_steps": None, "max_failures": 0})})
        logger = search.child(c, "quality")
        try:
            result = make_trainer(spec, f"quality-{c.key}", str(search.storage / "train"), search.uri, logger.run_id).fit()
            metrics = result.metrics or {}
        except Stopped as e:
            logger.end(ok=False, status="KILLED", reason=f"stopped by {e}")
            raise
        except Exception as e:  # a finalist that fails here is reported, not fatal: the search is done
            print(f"quality run {c.key} failed: {str(e)[-300:]}", flush=True)
            logger.end(ok=False, reason=str(e)[-2000:])
            continue
        logger.metrics({"eval_loss": metrics.get("eval_loss")}, step=space.quality_steps)
        winner = outcome.winner if outcome else None
        if winner and winner["config"] == c and result.checkpoint is not None:
            measured = {"tokens_per_s": outcome.speed(winner), "peak_gib": winner["peak_gib"], **metrics}
            with result.checkpoint.as_directory() as final:
                log_model(spec, Path(final) / "adapter", search.out, logger, measured,
                          winner={"key": c.key, "config": asdict(c), "speed_source": outcome.speed_source})
        logger.end(ok="eval_loss" in metrics)
        if "eval_loss" in metrics:
            losses[c.key] = metrics["eval_loss"]
    return losses
