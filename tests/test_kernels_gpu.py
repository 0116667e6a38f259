"""Liger's fused kernels and torch.compile against the eager path on CUDA (skipped without a GPU).
Run on the H200: `python -m pytest -q tests/test_kernels_gpu.py`."""

import pytest
import torch
from conftest import tiny_batch, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _run(kernels: str, loss_kind: str, compile: bool = False):
    from runner.kernels import apply_kernels, compile_layers
    from runner.loss import CausalLMLoss

    model = tiny_model(dtype=torch.bfloat16, adapter_dtype="mixed").cuda()
    apply_kernels(model, kernels)
    if compile:
        compile_layers(model)
    batch = {k: v.cuda() for k, v in tiny_batch(batch=2, seq=128).items()}
    loss = CausalLMLoss(model, loss_kind, 64)(**batch)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kernels,loss_kind,compile", [("liger", "liger", False), ("eager", "liger", False),
                                                       ("eager", "chunked", True)])
def test_fused_paths_match_eager_to_bf16_tolerance(kernels, loss_kind, compile):
    if "liger" in (kernels, loss_kind):
        pytest.importorskip("liger_kernel")
    loss_ref, ref = _run("eager", "chunked")
    loss, got = _run(kernels, loss_kind, compile)
    torch.testing.assert_close(loss, loss_ref, rtol=2e-2, atol=1e-2)
    for n, g in ref.items():
        rel = (got[n] - g).norm() / g.norm().clamp_min(1e-12)
        assert rel < 0.1, (n, float(rel))
