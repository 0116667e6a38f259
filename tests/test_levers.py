"""Speed/memory levers compute the same thing as the plain path: mixed-precision adapters and
torch.compile on CPU; Liger's Triton kernels in tests/test_kernels_gpu.py (CUDA only)."""

import shutil

import pytest
import torch
from conftest import tiny_batch, tiny_model

from runner.memory import TensorMemory
from runner.recompute import apply_checkpointing


def _loss_and_grads(model):
    loss = model(**tiny_batch()).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_mixed_adapters_equal_fp32_adapters_in_an_fp32_model():
    loss_ref, ref = _loss_and_grads(tiny_model(adapter_dtype="float32"))
    loss, got = _loss_and_grads(tiny_model(adapter_dtype="mixed"))
    assert torch.equal(loss, loss_ref)
    assert ref.keys() == got.keys()
    for n in ref:
        assert torch.equal(got[n], ref[n]), n


def test_mixed_adapters_keep_fp32_weights_and_share_one_input_in_bf16():
    saved = {}
    for dtype in ("float32", "mixed"):
        model = tiny_model(dtype=torch.bfloat16, adapter_dtype=dtype)
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
        memory = TensorMemory(list(model.parameters()))
        with memory:
            loss = model(**tiny_batch(batch=4, seq=64)).loss
            saved[dtype] = memory.current
        loss.backward()
        assert {p.grad.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
        saved[dtype + "_loss"] = float(loss)
    # peft's default saves an fp32 copy of the input per adapter; mixed saves the shared bf16 input.
    assert saved["mixed"] < 0.8 * saved["float32"], saved
    assert saved["mixed_loss"] == pytest.approx(saved["float32_loss"], rel=2e-3)


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="inductor on CPU needs a C++ compiler")
@pytest.mark.parametrize("layers", [[], [1, 3]])
def test_compiled_layers_give_the_same_loss_and_gradients(layers):
    from runner.kernels import compile_layers

    loss_ref, ref = _loss_and_grads(_checkpointed(layers))
    model = _checkpointed(layers)
    compile_layers(model)
    loss, got = _loss_and_grads(model)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)


def _checkpointed(layers):
    model = tiny_model(num_layers=4)
    apply_checkpointing(model, layers)
    return model


def test_estimate_counts_fewer_saved_activations_when_compiled(root, monkeypatch):
    from runner.estimate.trace import estimate
    from runner.loading import load_job

    monkeypatch.chdir(root)
    base = ["resources.use_gpu=false", "training.micro_batch_size=8"]
    for k, relation in ((0, "less"), (4, "equal")):
        eager = estimate(load_job("jobs/tiny-cpu.yaml", [*base, f"activation_checkpointing.count={k}"]), "cpu")
        compiled = estimate(load_job("jobs/tiny-cpu.yaml", [*base, f"activation_checkpointing.count={k}",
                                                            "training.compile=true"]), "cpu")
        if relation == "less":
            assert compiled.peak_gib < eager.peak_gib
        else:
            assert compiled.peak_gib == pytest.approx(eager.peak_gib, rel=0.02)  # only the loss region differs


def test_liger_needs_a_gpu_and_the_package(root):
    from runner.kernels import check_available
    from runner.loading import load_job
    from runner.spec import SpecError

    with pytest.raises(SpecError, match="training.kernels: liger.*use_gpu"):
        load_job(str(root / "jobs/tiny-cpu.yaml"), ["training.kernels=liger", "resources.use_gpu=false"])
    spec = load_job(str(root / "jobs/llama3-8b-lora.yaml"), ["training.loss=liger"])
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install liger-kernel"):
            check_available(spec.training)
    else:
        check_available(spec.training)


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="inductor on CPU needs a C++ compiler")
def test_compiled_layers_do_not_recompile_per_sequence_length():
    """Unpacked data gives every micro-batch its own length: one static graph, then one dynamic one."""
    import torch._dynamo

    from runner.kernels import compile_layers

    torch._dynamo.reset()
    model = tiny_model(num_layers=2)
    compile_layers(model)
    torch._dynamo.utils.counters.clear()
    for seq in (16, 24, 40, 56, 72, 88, 104):
        model(**tiny_batch(seq=seq)).loss.backward()
    frames = torch._dynamo.utils.counters["frames"]
    assert frames["ok"] <= 4, dict(frames)  # static shapes would compile once per length (7, up to the limit)
