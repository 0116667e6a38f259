"""Data parallelism across Ray Train workers (`resources.parallelism`): the one place that wraps the
model for several workers, and that gathers and scatters its state for checkpoints.

- `ddp`: every worker holds the whole model; the LoRA gradients are all-reduced once per optimizer
  step (the other micro-batches run under `no_sync`). The gradients live in DDP's buckets
  (`gradient_as_bucket_view`), so DDP adds no second copy of them; with compiled layers, dynamo's
  DDP graph splitting is off: each decoder layer is already its own graph, a natural bucket.
- `fsdp`: FSDP2 (`fully_shard`), one unit per decoder layer plus the embedding, the rest (norm,
  lm_head, which the chunked loss reads directly) in the root unit. Frozen base weights and LoRA
  parameters are sharded; a layer's weights are gathered just before it runs and freed after.

Checkpoints hold full (unsharded) tensors in the single-worker format, so a run can resume at
another world size or strategy and the adapter is plain PEFT.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch

from runner.quant import Fp8Linear
from runner.recompute import decoder_layers


def distribute(net: torch.nn.Module, model: torch.nn.Module, parallelism: str, device: torch.device) -> torch.nn.Module:
    """`net` (model + loss) wrapped for the job's parallelism; call after every lever is applied and
    before the optimizer is built (FSDP replaces the parameters)."""
    if parallelism == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
        # Parameters keep their own dtypes (bf16 base, fp32 or bf16 adapters); gradients reduce in fp32.
        policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        base = model.get_base_model()
        fully_shard(base.model.embed_tokens, mesh=mesh, mp_policy=policy)
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(net, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
        return net
    import torch._dynamo as dynamo
    from torch.nn.parallel import DistributedDataParallel

    # FITRUN_DDP_GRAPH_SPLIT=1 keeps dynamo's default, for the A/B arm of bench/multigpu.py.
    dynamo.config.optimize_ddp = os.environ.get("FITRUN_DDP_GRAPH_SPLIT") == "1"
    ids = [device.index] if device.type == "cuda" else None
    # fp8 weights cannot be broadcast (gloo and older NCCL have no fp8 type) and need not be: every
    # rank quantized the same weights (one seed, or one pretrained checkpoint).
    fp8 = [f"{prefix}.{name}" for prefix, m in net.named_modules() if isinstance(m, Fp8Linear)
           for name, _ in [*m.named_parameters(), *m.named_buffers()]]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(net, fp8)
    wrapped = DistributedDataParallel(net, device_ids=ids, gradient_as_bucket_view=True, broadcast_buffers=False)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the parameter broadcast's 250 MB flat buckets
    return wrapped


@contextmanager
def gradient_sync(net: torch.nn.Module, sync: bool):
    """Accumulate locally on all but the last micro-batch of a step (DDP `no_sync`, FSDP2's
    `set_requires_gradient_sync`); one worker: nothing to do."""
    if hasattr(net, "no_sync"):
        with (nullcontext() if sync else net.no_sync()):
            yield
    elif hasattr(net, "set_requires_gradient_sync"):
        net.set_requires_gradient_sync(sync)
        yield
    else:
        yield


def _is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: a DTensor (FSDP's grad norm, a sharded parameter) gathered in full. Collective."""
    return t.full_tensor() if _is_sharded(t) else t


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by state-dict name, in full, on CPU. Collective under FSDP: every
    rank calls it, in the same order."""
    return {name: local_value(p.detach()).cpu() for name, p in model.named_parameters() if p.requires_grad}


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict; under FSDP in full, keyed by parameter name (collective)."""
    if not any(_is_sharded(p) for p in model.parameters()):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if not any(_is_sharded(p) for p in model.parameters()):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Full tensors into the (possibly sharded) trainable parameters."""
    from torch.distributed.tensor import distribute_tensor

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            p = params[name]
            if _is_sharded(p):
                value = distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements)
                p.to_local().copy_(value.to_local())
            else:
                p.copy_(value)
