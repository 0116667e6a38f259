"""One probe trial: a Ray Tune function that builds and fits a TorchTrainer (Ray's Train-inside-Tune
pattern), classifies the outcome once, logs it to the trial's MLflow run and reports it to Tune."""

from __future__ import annotations

import copy

from runner.loading import job_from_dict
from runner.spec import JobSpec, SearchSpaceSpec
from runner.tracking import RunLogger, find_run, start_run
from runner.train.worker import Probe
from runner.tune.search import LEVERS, Config, classify, set_config

# What a trial reports to Tune and the searcher records: classify()'s outcome.
OUTCOME_KEYS = ("feasible", "status", "peak_gib", "tokens_per_s", "measured_tokens_per_s", "loss", "oom", "message")


def probe_spec(job: dict, c: Config, space: SearchSpaceSpec) -> tuple[JobSpec, Probe]:
    """The job at config `c`, cut to a probe: at most 2 micro-batches a step, no checkpoints or eval,
    and (unpacked data) every sequence padded to full length, the worst case for memory."""
    raw = set_config(copy.deepcopy(job), c, space.lora_alpha_rule)
    raw["training"].update(gradient_accumulation_steps=min(c.gradient_accumulation_steps, 2), logging_steps=1,
                           save_steps=None, eval_steps=None)
    if not raw["data"]["packing"]:
        raw["data"]["pad_to_sequence_len"] = True
    probe = Probe(warmup_steps=space.probe_warmup_steps, steps=space.probe_steps, ceiling_gib=space.gpu_memory_gib,
                  true_accum=c.gradient_accumulation_steps)
    return job_from_dict(raw, "probe"), probe


def trial_params(c: Config, lora_alpha: float) -> dict:
    """The one param set of every child run, measured or pruned, so the UI charts them together."""
    k = "-" if c.k is None else c.k  # a dominated column: no k was ever chosen
    return {"r": c.r, "lora_alpha": lora_alpha, "k": k, "placement": c.placement,
            **{f.name: getattr(c, f.name) for f in LEVERS}, "micro_batch_size": c.micro_batch_size,
            "gradient_accumulation_steps": c.gradient_accumulation_steps,
            "checkpointed_layers": k}


def probe_trial(config: dict, job: dict, space: dict, uri: str, parent_run_id: str, storage: str,
                exclusive: bool = False) -> None:
    import ray.tune

    from runner.train.driver import make_trainer

    sp = SearchSpaceSpec.model_validate(space)
    c = Config(**config["config"])
    spec, probe = probe_spec(job, c, sp)
    phase = "exclusive" if exclusive else "packed"
    run_id = find_run(uri, spec.tracking.experiment_name,
                      f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.fitrun_config = '{c.key}' "
                      f"and tags.fitrun_phase = '{phase}'")
    if run_id is None:  # a resumed search reuses the trial's run: no duplicates
        run_id = start_run(uri, spec.tracking.experiment_name, f"{phase}-{c.key}", parent_run_id=parent_run_id,
                           params=trial_params(c, spec.lora.lora_alpha),
                           tags={"fitrun_config": c.key, "fitrun_phase": phase, "fitrun.kind": "trial"})
    logger = RunLogger(uri, run_id)
    trainer = make_trainer(spec, f"{phase}-{ray.tune.get_context().get_trial_id()}", storage, uri, run_id, probe)
    try:
        summary = dict(trainer.fit().metrics)  # the worker's summary: peak_gib is reserved on GPU, tensor bytes on CPU
    except Exception as e:  # an OOM outside the loop (model build) is a result too; anything else is an error
        text = str(e)
        oom = "OutOfMemory" in text or "out of memory" in text
        summary = {"oom": 1.0 if oom else 0.0, "status": None if oom else "error", "message": text[-500:],
                   "tokens_per_s": 0.0}
    outcome = classify(summary, sp.limit_gib)
    logger.prediction(config.get("predicted_peak_gib"), outcome["peak_gib"])
    # At the probe's last step, logged after its per-step values: MLflow shows the latest value of a
    # metric, so the run's tokens_per_s is the summary the search ranks (true accumulation), not step 3's.
    logger.metrics({"feasible": float(outcome["feasible"]), "tokens_per_s": outcome.get("measured_tokens_per_s", 0.0),
                    **({"peak_gib": outcome["peak_gib"]} if outcome["peak_gib"] is not None else {})},
                   step=int(summary.get("step") or 0))
    logger.tags({"status": outcome["status"]})
    logger.end(ok=outcome["status"] != "error")
    ray.tune.report({"score": outcome["tokens_per_s"], **{k: v for k, v in outcome.items() if v is not None}})
