"""The memory estimate against measured tensor memory on CPU (same accounting as the GPU allocator)."""

import pytest
from conftest import measure_in_process

from runner.estimate.trace import estimate, parse_sweep, sweep_k
from runner.loading import load_job

CASES = {
    "none": ["activation_checkpointing.count=0"],
    "first-2": ["activation_checkpointing.count=2", "activation_checkpointing.placement=first"],
    "last-2": ["activation_checkpointing.count=2", "activation_checkpointing.placement=last"],
    "every_n-3": ["activation_checkpointing.count=3", "activation_checkpointing.placement=every_n"],
    "all": ["activation_checkpointing.count=4"],
    "selective-4": ["activation_checkpointing.count=4", "activation_checkpointing.policy=selective"],
    "hf-loss-packed-r16": ["activation_checkpointing.count=1", "training.loss=hf", "data.packing=true",
                           "lora.r=16", "data.format=alpaca", "data.path=data/instructions.alpaca.jsonl"],
}


@pytest.mark.parametrize("case", CASES)
def test_estimate_within_5pct_of_measured_cpu_tensor_memory(root, monkeypatch, case):
    monkeypatch.chdir(root)
    spec = load_job("jobs/tiny-cpu.yaml", ["training.gradient_accumulation_steps=1", *CASES[case]])
    predicted = estimate(spec, "cpu").peak_gib
    measured, _ = measure_in_process(spec)
    assert abs(predicted - measured) / measured <= 0.05, (predicted, measured)


def test_more_checkpointed_layers_never_more_memory(root, monkeypatch):
    monkeypatch.chdir(root)
    spec = load_job("jobs/tiny-cpu.yaml", ["training.micro_batch_size=8"])
    peaks = [e.peak_gib for e in sweep_k(spec, list(range(5)), "cpu", "first", exact=True).values()]
    assert all(a > b for a, b in zip(peaks, peaks[1:])), peaks


def test_estimate_components_and_cli(root, monkeypatch, capsys):
    from runner.cli import main

    monkeypatch.chdir(root)
    assert parse_sweep("k=0..3") == [0, 1, 2, 3] and parse_sweep("k=1,5") == [1, 5]
    assert main(["estimate", "jobs/tiny-cpu.yaml", "--gpu-memory-gib", "0.001", "--set", "resources.use_gpu=false"]) == 0
    out = capsys.readouterr().out
    for word in ("weights", "lora_params", "optimizer_state", "saved_activations", "does NOT fit"):
        assert word in out


def test_estimate_json_and_sweep(root, monkeypatch, capsys):
    """`--json` for scripts (peak, components, the verdict against the ceiling) and `--sweep k=...`
    (one estimate per number of checkpointed layers; more recompute, never more memory)."""
    import json

    from runner.cli import main

    monkeypatch.chdir(root)
    assert main(["estimate", "jobs/tiny-cpu.yaml", "--gpu-memory-gib", "1", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["fits"] is True and one["ceiling_gib"] == 1 and one["margin_gib"] == pytest.approx(1 - one["peak_gib"])
    assert {"weights", "lora_params", "optimizer_state"} <= set(one["components_gib"])
    assert main(["estimate", "jobs/tiny-cpu.yaml", "--sweep", "k=0..4", "--json"]) == 0
    swept = json.loads(capsys.readouterr().out)
    assert list(swept) == ["0", "1", "2", "3", "4"]
    peaks = [swept[k]["peak_gib"] for k in swept]
    assert all(a >= b for a, b in zip(peaks, peaks[1:])), peaks
    # the job's own k is 2; the sweep traces a few anchors and interpolates between them
    assert swept["2"]["peak_gib"] == pytest.approx(one["peak_gib"], rel=0.02)
    assert main(["estimate", "jobs/tiny-cpu.yaml", "--sweep", "k=0..2", "--gpu-memory-gib", "1"]) == 0
    table = capsys.readouterr().out
    assert "peak GiB" in table and table.count("yes") == 3
    assert main(["estimate", "jobs/tiny-cpu.yaml", "--sweep", "k=two"]) == 2


DEEP_CASES = {
    "none": ["activation_checkpointing.count=0"],
    "even-3": ["activation_checkpointing.count=3"],
    "last-3": ["activation_checkpointing.count=3", "activation_checkpointing.placement=last"],
    "layers-1-5-8": ["activation_checkpointing.count=null", "activation_checkpointing.layers=[1,5,8]"],
    "selective-unpacked": ["activation_checkpointing.count=5", "activation_checkpointing.policy=selective",
                           "data.packing=false"],
    "2-workers-fsdp": ["activation_checkpointing.count=2", "resources.num_workers=2", "resources.parallelism=fsdp"],
}


@pytest.fixture(scope="module")
def ten_layer_model(tmp_path_factory):
    """A local model directory (config.json) with the tiny widths and 10 decoder layers."""
    from runner.model import preset_config

    config = preset_config("tiny")
    config.num_hidden_layers = 10
    path = tmp_path_factory.mktemp("tiny-10-layers")
    config.save_pretrained(path)
    return path


@pytest.mark.parametrize("case", DEEP_CASES)
def test_a_few_traced_layers_replay_the_full_trace_exactly(root, monkeypatch, ten_layer_model, case):
    """The estimate traces the first, the last and one middle layer of each kind; the replay at full
    depth must equal tracing all 10 layers, byte for byte, for every placement."""
    monkeypatch.chdir(root)
    spec = load_job("jobs/tiny-cpu.yaml", ["model.preset=null", f"model.name_or_path={ten_layer_model}",
                                           "training.gradient_accumulation_steps=1", *DEEP_CASES[case]])
    short, full = estimate(spec, "cuda"), estimate(spec, "cuda", trace_all_layers=True)
    assert short.components_gib == full.components_gib
    assert (short.peak_allocated_gib, short.peak_reserved_gib) == (full.peak_allocated_gib, full.peak_reserved_gib)
    assert short.step_flops == full.step_flops > 0  # the FLOPs replay exactly too
    assert short.work == full.work  # and every count the step-time model prices


def test_ten_layer_estimate_within_5pct_of_measured(root, monkeypatch, ten_layer_model):
    monkeypatch.chdir(root)
    spec = load_job("jobs/tiny-cpu.yaml", ["model.preset=null", f"model.name_or_path={ten_layer_model}",
                                           "training.gradient_accumulation_steps=1", "activation_checkpointing.count=3"])
    predicted = estimate(spec, "cpu").peak_gib
    measured, _ = measure_in_process(spec)
    assert abs(predicted - measured) / measured <= 0.05, (predicted, measured)


@pytest.mark.parametrize("sets", [[], ["activation_checkpointing.count=4"], ["activation_checkpointing.count=0",
                                                                          "training.micro_batch_size=2"]])
def test_the_estimates_flops_are_a_real_steps(root, monkeypatch, sets):
    """The estimate's FLOPs per micro-batch (matmuls and attention, recompute included, counted on the fake
    trace) equal torch's FlopCounterMode over a real forward + backward of the same model on the CPU (packed
    rows: causal attention, no mask)."""
    import torch
    from conftest import tiny_batch
    from torch.utils.flop_counter import FlopCounterMode

    from runner.model import build_trainable

    monkeypatch.chdir(root)
    spec = load_job("jobs/tiny-cpu.yaml", ["data.packing=true", *sets])
    trainable = build_trainable(spec, torch.device("cpu"))
    batch = tiny_batch(batch=spec.training.micro_batch_size, seq=spec.data.sequence_len)
    with FlopCounterMode(display=False) as counter:
        trainable.net(batch["input_ids"], batch["labels"]).backward()
    predicted = estimate(spec, "cpu")
    assert predicted.step_flops == counter.get_total_flops() > 0
    assert predicted.flops_per_token == predicted.step_flops / (spec.training.micro_batch_size * spec.data.sequence_len)


def test_grouped_query_attention_counts_every_query_heads_flops():
    """transformers passes key/value with fewer heads (enable_gqa) on some versions and devices, repeated ones on
    others: the CPU attention kernel's FLOP formula counts both alike."""
    import torch
    from torch.utils.flop_counter import flop_registry

    formula = flop_registry[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu]
    q, kv = torch.empty(1, 32, 64, 16), torch.empty(1, 8, 64, 16)
    assert formula(q, kv, kv, 0.0, True, out_val=None) == formula(q, q, q, 0.0, True, out_val=None) > 0
