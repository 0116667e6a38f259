"""One measurement of one config, alone or packed beside others: the job cut to a probe, a TorchTrainer
fitted (Ray's Train-inside-Tune pattern), the outcome classified once and logged to the config's child
run. `probe_trial` is the Ray Tune function of the packed phase; the exclusive phase calls `measure`
itself, one config at a time."""

from __future__ import annotations

import copy

from runner.loading import job_from_dict
from runner.spec import JobSpec, SearchSpaceSpec
from runner.train.driver import make_trainer
from runner.train.worker import Probe
from runner.tune.search import Config, classify, set_config
from runner.tune.session import Search

# What a trial reports to Tune and the searcher records: classify()'s outcome.
OUTCOME_KEYS = ("feasible", "status", "peak_gib", "tokens_per_s", "measured_tokens_per_s", "loss", "oom", "message")


def probe_spec(job: dict, c: Config, space: SearchSpaceSpec) -> tuple[JobSpec, Probe]:
    """The job at config `c`, cut to a probe: `probe_warmup_steps + probe_steps` steps of at most 2
    micro-batches, no checkpoints, eval or restarts, the ceiling as the CUDA cap, and (unpacked data)
    every sequence padded to full length, the worst case for memory."""
    raw = set_config(copy.deepcopy(job), c, space.lora_alpha_rule)
    raw["training"].update(gradient_accumulation_steps=min(c.gradient_accumulation_steps, 2), logging_steps=1,
                           save_steps=None, eval_steps=None, max_failures=0,
                           max_steps=space.probe_warmup_steps + space.probe_steps,
                           measure_warmup_steps=space.probe_warmup_steps)
    if raw["resources"]["use_gpu"]:  # the ceiling is the card's allocator budget (spec.space_for_card)
        raw["resources"].update(gpu_memory_gib=space.gpu_memory_gib, gpu=None)
    if not raw["data"]["packing"]:
        raw["data"]["pad_to_sequence_len"] = True
    probe = Probe(true_accum=c.gradient_accumulation_steps,
                  cpu_limit_gib=None if raw["resources"]["use_gpu"] else space.gpu_memory_gib)
    return job_from_dict(raw, "probe"), probe


def measure(search: Search, c: Config, phase: str, run_name: str, predicted_gib: float | None = None,
            predicted_tokens_per_s: float | None = None) -> dict:
    """Probe config `c` and log it to its `phase` child run (a resumed search reuses that run), beside what
    the estimate and the step-time model predicted. Returns classify()'s outcome."""
    spec, probe = probe_spec(search.job.to_dict(), c, search.space)
    logger = search.child(c, phase, reuse=True)
    trainer = make_trainer(spec, run_name, str(search.storage / "train"), search.uri, logger.run_id, probe)
    try:
        summary = dict(trainer.fit().metrics)  # the worker's summary: peak_gib is reserved on GPU, tensor bytes on CPU
    except Exception as e:  # an OOM outside the loop (model build) is a result too; anything else is an error
        text = str(e)
        oom = "OutOfMemory" in text or "out of memory" in text
        summary = {"oom": 1.0 if oom else 0.0, "status": None if oom else "error", "message": text[-500:],
                   "tokens_per_s": 0.0}
    outcome = classify(summary, search.space.limit_gib)
    logger.prediction(predicted_gib, outcome["peak_gib"])
    logger.metrics({"predicted_tokens_per_s": predicted_tokens_per_s})
    # At the probe's last step, logged after its per-step values: MLflow shows the latest value of a
    # metric, so the run's tokens_per_s is the summary the search ranks (true accumulation), not step 3's.
    logger.metrics({"feasible": float(outcome["feasible"]), "tokens_per_s": outcome.get("measured_tokens_per_s", 0.0),
                    **({"peak_gib": outcome["peak_gib"]} if outcome["peak_gib"] is not None else {})},
                   step=int(summary.get("step") or 0))
    logger.tags({"status": outcome["status"]})
    logger.end(ok=outcome["status"] != "error")
    return outcome


def probe_trial(config: dict, search: dict) -> None:
    """The packed phase's Ray Tune function: one config, reported to Tune for the searcher."""
    import ray.tune

    c = Config(**config["config"])
    outcome = measure(Search.from_dict(search), c, "packed", f"packed-{ray.tune.get_context().get_trial_id()}",
                      config.get("predicted_peak_gib"), config.get("predicted_tokens_per_s"))
    ray.tune.report({"score": outcome["tokens_per_s"], **{k: v for k, v in outcome.items() if v is not None}})
