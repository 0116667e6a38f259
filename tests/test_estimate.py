"""The memory estimate against measured tensor memory on CPU (same accounting as the GPU allocator)."""

import pytest
from conftest import measure_in_process

from runner.estimate import estimate, parse_sweep, sweep_k
from runner.spec import load_job


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
