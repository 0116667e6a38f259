"""Per-layer activation checkpointing: exact gradients, exact recompute count, gradient flow."""

import pytest
import torch
from conftest import tiny_batch, tiny_model

from runner.model import decoder_layers
from runner.recompute import apply_checkpointing, check_gradient_flow, resolve_layers
from runner.spec import ActivationCheckpointingSpec as AC


@pytest.mark.parametrize("spec,expected", [
    (AC(), []),
    (AC(layers="all"), list(range(8))),
    (AC(layers=[5, 1]), [1, 5]),
    (AC(count=3, placement="first"), [0, 1, 2]),
    (AC(count=3, placement="last"), [5, 6, 7]),
    (AC(count=4, placement="every_n"), [0, 2, 4, 6]),
    (AC(count=3, placement="every_n"), [0, 2, 5]),
    (AC(count=0, placement="every_n"), []),
    (AC(count=8, placement="every_n"), list(range(8))),
])
def test_resolve_layers(spec, expected):
    assert resolve_layers(spec, 8) == expected


def _grads(layers, offload=False, policy="full", hidden_size=None):
    model = tiny_model(num_layers=4, hidden_size=hidden_size)
    apply_checkpointing(model, layers, offload, policy)
    out = model(**tiny_batch())
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("layers,offload", [([0, 1, 2, 3], False), ([1, 3], False), ([2], False),
                                            ([0, 1, 2, 3], True), ([1, 3], True)])
def test_gradients_identical_to_no_checkpointing(layers, offload):
    loss_ref, ref = _grads([])
    loss, got = _grads(layers, offload)  # offload: checkpointed inputs kept in (pinned) host memory
    assert torch.equal(loss_ref, loss)
    assert ref.keys() == got.keys() and len(ref) == 4 * 7 * 2
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("layers", [[], [0], [1, 3], [0, 1, 2, 3]])
def test_layer_forward_calls_equal_num_layers_plus_k(layers):
    model = tiny_model(num_layers=4)
    apply_checkpointing(model, layers)
    calls = [0] * 4
    for i, layer in enumerate(decoder_layers(model)):
        layer.self_attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    model(**tiny_batch()).loss.backward()
    assert sum(calls) == 4 + len(layers)
    assert calls == [2 if i in layers else 1 for i in range(4)]


@pytest.mark.parametrize("layers", [[], [0, 2], [0, 1, 2, 3]])
def test_every_lora_parameter_gets_gradient(layers):
    model = tiny_model(num_layers=4)
    with torch.no_grad():  # fresh-LoRA state: B = 0, the case where A's gradient is exactly zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()
    apply_checkpointing(model, layers)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    check_gradient_flow(model, tiny_batch())
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before), "the check must leave weights as they were"
    assert all(p.grad is None for p in after.values())


def test_gradient_flow_check_catches_a_cut_graph():
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    model = tiny_model(num_layers=4)
    model.get_base_model().model.embed_tokens.register_forward_hook(lambda m, i, o: o.detach())
    for layer in decoder_layers(model)[:2]:  # the classic bug: reentrant checkpoint on inputs without grad
        layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=True)
        layer.gradient_checkpointing = True
    with pytest.raises(RuntimeError, match=r"gradient-flow check failed: 28 of 56 LoRA parameters"):
        check_gradient_flow(model, tiny_batch())


@pytest.mark.parametrize("layers", [[0, 1, 2, 3], [1, 2]])
def test_selective_recompute_same_gradients(layers):
    loss_ref, ref = _grads([])
    loss, got = _grads(layers, policy="selective")
    torch.testing.assert_close(loss, loss_ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-7, msg=n)


def test_selective_saves_frozen_matmuls_on_layers_wider_than_lora(monkeypatch):
    """The selective policy keeps a frozen matmul's output when both its sides are wider than any LoRA
    rank (the 8B's 4096), and recomputes LoRA's rank-r matmuls: on layers 256 wide both branches run,
    and the gradients are those of no checkpointing."""
    from torch.utils.checkpoint import CheckpointPolicy

    from runner import recompute

    mm = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
    decisions = []

    def spy(ctx, op, *args, **kwargs):
        policy = original(ctx, op, *args, **kwargs)
        if op in mm:
            decisions.append(policy)
        return policy
    original = recompute._selective_policy
    monkeypatch.setattr(recompute, "_selective_policy", spy)
    assert 256 > recompute.LORA_MAX_RANK
    loss_ref, ref = _grads([], hidden_size=256)
    loss, got = _grads([0, 1, 2, 3], policy="selective", hidden_size=256)
    assert CheckpointPolicy.MUST_SAVE in decisions and CheckpointPolicy.PREFER_RECOMPUTE in decisions
    torch.testing.assert_close(loss, loss_ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)


def test_selective_recompute_memory_between_full_and_none(root, monkeypatch):
    from conftest import measure_in_process

    from runner.loading import load_job

    monkeypatch.chdir(root)
    peaks = {}
    for name, extra in {"none": ["activation_checkpointing.count=0"],
                        "selective": ["activation_checkpointing.count=4", "activation_checkpointing.policy=selective"],
                        "full": ["activation_checkpointing.count=4"]}.items():
        spec = load_job("jobs/tiny-cpu.yaml", ["training.gradient_accumulation_steps=1", "lora.r=4", *extra])
        peaks[name] = measure_in_process(spec)[0]
    assert peaks["full"] < peaks["selective"] < peaks["none"], peaks
