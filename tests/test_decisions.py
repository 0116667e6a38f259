"""Each rule is decided in one place, and every place that needs it asks that one: where two copies
once disagreed, both callers are checked against the same answer here."""

import json
import warnings

import pytest

from runner.loading import load_job, load_search_space
from runner.spec import SpecError, check_space, layer_range_problems, lever_conflicts, micro_batch_for


def test_layer_range_is_one_check_for_spec_preflight_and_recompute(root, monkeypatch):
    """A preset job (the spec knows its depth), the real config (preflight) and the model build
    (recompute) refuse the same out-of-range layers with the same words."""
    from runner.preflight import _check_architecture
    from runner.recompute import resolve_layers

    monkeypatch.chdir(root)
    sets = ["activation_checkpointing.count=null", "activation_checkpointing.layers=[0,7]"]
    with pytest.raises(SpecError) as spec_error:
        load_job("jobs/tiny-cpu.yaml", sets)
    job = load_job("jobs/tiny-cpu.yaml")
    ac = job.activation_checkpointing.model_copy(update={"count": None, "layers": [0, 7]})
    [expected] = layer_range_problems(ac, 4)
    assert expected in str(spec_error.value)
    with pytest.raises(ValueError, match="the model has 4 layers"):
        resolve_layers(ac, 4)
    # Preflight reads the depth from the model's config; the same job, the check made there.
    unchecked = job.model_copy(update={"activation_checkpointing": ac.model_copy(update={"layers": [0, 3]})})
    assert _check_architecture(unchecked) == []
    assert layer_range_problems(ac.model_copy(update={"layers": [0, 3]}), 4) == []


def test_search_never_proposes_a_lever_pair_the_job_refuses(root, monkeypatch):
    """`Config.valid` and the job's validation are one rule: every pair either refuses, the other refuses."""
    from itertools import product

    from runner.tune.search import Config

    monkeypatch.chdir(root)
    for q, par, off, pol in product(("none", "fp8"), ("ddp", "fsdp"), (False, True), ("full", "selective")):
        c = Config(8, 1, 1, "first", 2, policy=pol, offload=off, quantization=q, parallelism=par)
        sets = [f"model.quantization={q}", f"resources.parallelism={par}", f"activation_checkpointing.offload={off}",
                f"activation_checkpointing.policy={pol}"]
        try:
            load_job("jobs/tiny-cpu.yaml", sets)
            job_ok = True
        except SpecError as e:
            job_ok = False
            assert all(p in str(e) for p in lever_conflicts(q, par, off, pol))
        assert c.valid() == job_ok == (not lever_conflicts(q, par, off, pol)), (q, par, off, pol)


def test_space_global_batch_is_one_rule_for_check_and_expand(root, monkeypatch, tmp_path):
    """What `check_space` accepts, `expand` builds at the job's global batch; what it refuses (a
    non-divisor, zero, a negative) is a clear error, never a ZeroDivisionError."""
    from runner.tune.search import expand

    monkeypatch.chdir(root)
    job = load_job("jobs/tiny-cpu.yaml")
    space = load_search_space("search_spaces/tiny-cpu.yaml")
    columns, _ = expand(job, space, 4)
    assert {c.micro_batch_size * c.gradient_accumulation_steps for c in columns} == {job.global_batch_size}
    assert all(micro_batch_for(job, c.gradient_accumulation_steps) == c.micro_batch_size for c in columns)
    for bad in ([0, 1], [-2], [3]):
        s = space.model_copy(update={"gradient_accumulation_steps": bad})
        with pytest.raises(SpecError, match="do not divide the job's global batch"):
            check_space(job, s, 4)


def test_offload_on_cpu_warns_once_and_the_estimate_agrees(root, monkeypatch):
    """Offload moves inputs off a CUDA device: on the CPU the model build and the estimate both leave it
    out, and the user is told (once)."""
    from runner import recompute
    from runner.recompute import offload_applies

    monkeypatch.chdir(root)
    monkeypatch.setattr(recompute, "_OFFLOAD_WARNED", [])
    ac = load_job("jobs/tiny-cpu.yaml", ["activation_checkpointing.offload=true"]).activation_checkpointing
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert offload_applies(ac, "cpu") is False and offload_applies(ac, "cpu") is False
    assert len([w for w in seen if "offload" in str(w.message)]) == 1
    assert offload_applies(ac, "cuda") is True


def test_cost_counts_the_split_the_worker_trains(root, monkeypatch, capsys):
    """`report.cost` tokenizes with the job's seed, as the worker does: the epoch it prices is the
    train split the job runs (seed 0 and seed 7 split the tiny data differently)."""
    from runner.data import tokenize
    from runner.model import build_tokenizer
    from runner.tune.report import cost

    monkeypatch.chdir(root)
    job = load_job("jobs/tiny-cpu.yaml", ["training.seed=7", "data.val_fraction=0.3"])
    tok = build_tokenizer(job.tokenizer, job.model)
    worker_tokens = tokenize(job.data, tok, seed=job.training.seed).num_train_tokens
    assert worker_tokens != tokenize(job.data, tok, seed=0).num_train_tokens  # the seed matters here
    per_epoch = cost(job, tokens_per_s=1000.0, price=3.6)["usd_per_epoch"]
    assert per_epoch == pytest.approx(3.6 / 3600 * worker_tokens / 1000.0)
    assert json.dumps(per_epoch)
