"""Predict peak training memory on a CPU, in seconds, without weights or a GPU.

Method: build the job's real model class (transformers + peft, same LoRA targets, dtype, checkpoint
placement and loss) on fake tensors, run one forward + backward through the same `CausalLMLoss`
the worker uses, and count live tensor bytes with `memory.TensorMemory`. Nothing is computed. Only
a few decoder layers are traced (the first, the last, one middle layer of each kind); the step's
byte timeline is cut at layer boundaries and replayed at full depth, which equals tracing every
layer byte for byte (tests/test_estimate.py) at a fraction of the time (about 1 s for the 8B, warm).
What a trace cannot see is added analytically and stated as such: optimizer state (AdamW: two
tensors per trainable parameter, present from step two), DDP gradient buckets, offloaded inputs, and
the CUDA caching allocator's overhead (reserved / allocated, calibrated on H200 measurements:
bench/results/).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from peft import PeftModel
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

from runner.memory import GIB, TensorMemory
from runner.model import Trainable, build_trainable, model_config, resolve_dtype
from runner.recompute import decoder_layers, offload_applies, resolve_layers
from runner.spec import ActivationCheckpointingSpec, JobSpec

# CUDA-only terms, fitted to the five runs of bench/results/train-placements-2026-11-29.md (8B, H200):
# measured allocated = traced + 0.22 GiB in all five (cuBLAS workspaces, fused-AdamW scratch), and
# reserved / allocated = 1.032 .. 1.069, mean 1.049 (the caching allocator's rounding and blocks).
CUDA_EXTRA_GIB = 0.22
RESERVED_OVERHEAD = 0.049
# Saved activations of non-checkpointed layers relative to the eager trace when the layers run
# fused: inductor's partitioner (training.compile) recomputes cheap elementwise ops in backward
# instead of saving their outputs, and Liger's RMSNorm/SwiGLU (training.kernels: liger) keep fewer
# tensors. Neither can run on fake tensors, so the eager trace is scaled by the ratio measured on the
# 8B (mixed adapters, micro-batch 1 and 2, bench/results/levers-8b-2026-11-29.md): 0.75 and 0.73.
FUSED_SAVED_RATIO = {"compile": 0.75, "liger": 0.73}
# Bytes per weight of a quantized frozen linear (model.quantization), from bitsandbytes' layouts:
# nf4 packs two weights a byte, plus an 8-bit absmax per 64 weights and, double-quantized, an fp32
# scale per 256 absmax values; int8 and fp8 are one byte plus an fp32 scale per row (not counted:
# < 0.1%). The transient: bitsandbytes dequantizes one weight at a time to the model dtype; fp8's
# input-gradient matmul takes one weight transposed, a copy at 1 byte per weight. Measured on the
# 8B (bench/results/quant-2026-11-30.md): fp8 -1.5..+1.8%, nf4 -1.4..+2.4% of the peak reserved.
# FSDP2: whole decoder layers in memory at once besides the shards (the one running, its all-gather
# output before the copy-out, the prefetched next one); and the blocks the caching allocator keeps
# for the all-gather stream, which the compute stream cannot reuse, in decoder layers' worth of
# bytes on top of RESERVED_OVERHEAD: 5.1 fitted to the two 2-GPU FSDP runs of the 24 GiB job (k=11:
# 16.44 allocated / 19.82 reserved; k=0: 19.20 / 21.73; bench/results/multigpu-2026-11-30.md).
FSDP_GATHERED_LAYERS = 3
FSDP_STREAM_POOL_LAYERS = 5.1
# LLM.int8() (bitsandbytes' MatMul8bitLt) keeps, for each frozen linear, the input columns holding an
# outlier (|x| > 6) in the model dtype: the union over the micro-batch's tokens, so how many depends on
# the weights and the data. It keeps them, and its input, as plain attributes of its autograd context,
# which non-reentrant checkpointing cannot drop: eager, a recomputed layer still holds every linear's
# distinct input and its outliers. Under torch.compile the outliers are recomputed, not saved, and a
# recomputed layer costs a small constant. Fitted to six 8B runs (bench/results/quant-2026-11-30.md;
# random weights, which have more outlier columns than a pretrained Llama is reported to): the outliers
# as a fraction of every linear's whole input, from the eager run with no recompute; the compiled
# constant per recomputed layer, from the micro-batch 1 and 2 compiled runs.
INT8_OUTLIER_FRACTION = 0.58
INT8_COMPILED_RECOMPUTED_LAYER_GIB = 0.021
QUANTIZED_BYTES_PER_WEIGHT = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0, "fp8": 1.0}
TRANSIENT_BYTES_PER_WEIGHT = {"nf4": None, "int8": None, "fp8": 1.0}  # None: the model dtype's


def _count_cpu_attention() -> None:
    """FlopCounterMode knows the CUDA attention kernels, not the CPU flash kernel the fake-tensor trace dispatches
    to: count it the same way, halved when causal (a causal kernel skips the masked half). Backward: two matmuls
    recomputed and three for the gradients, 2.5x the forward, as torch counts the CUDA ones."""
    aten = torch.ops.aten
    forward, backward = aten._scaled_dot_product_flash_attention_for_cpu, \
        aten._scaled_dot_product_flash_attention_for_cpu_backward
    if forward in flop_registry:
        return

    def gqa(query, *kv):  # grouped-query attention (enable_gqa): each key/value head serves several query heads
        return [(*t[:1], query[1], *t[2:]) for t in kv]

    @register_flop_formula(forward)
    def _forward(query, key, value, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, *gqa(query, key, value)) // (2 if is_causal else 1)

    @register_flop_formula(backward)
    def _backward(grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False, *args,
                  out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, *gqa(query, key, value)) * 5 // (4 if is_causal else 2)


_count_cpu_attention()


WORK_KEYS = ("flops", "gemm_flops", "attention_flops", "memory_bytes", "ops")
"""What `_Flops` counts per segment: every FLOP torch's formulas know (matmuls and attention); of them, the
compute-bound matmuls' and attention's; the bytes that every other kernel reads and writes (the skinny LoRA
matmuls included: they are bound by memory, not tensor cores); and the kernels an eager step launches."""
GEMM_MIN_INTENSITY = 64  # FLOPs per byte moved: below it a matmul is bound by memory (LoRA's rank-r factors)
_METADATA_OPS = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
                 torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default,
                 torch.ops.aten._unsafe_view.default}  # (no kernel: an allocation, a read of one value, a view)
_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
              torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward,
              torch.ops.aten._scaled_dot_product_flash_attention, torch.ops.aten._scaled_dot_product_flash_attention_backward,
              torch.ops.aten._scaled_dot_product_efficient_attention,
              torch.ops.aten._scaled_dot_product_efficient_attention_backward}


def _tensor_bytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor))


class _Flops(TorchDispatchMode):
    """The work of the ops run under it (`WORK_KEYS`): FLOPs by torch's own formulas (`torch.utils.flop_counter`:
    matmuls, attention), bytes and kernel launches of the rest. No module hooks (FlopCounterMode's would change
    what the byte trace sees); `_Timeline` cuts it by layer. The step-time model (`runner.estimate.speed`) prices it."""

    def __init__(self):
        super().__init__()
        self.work = dict.fromkeys(WORK_KEYS, 0)

    @property
    def total(self) -> int:
        return self.work["flops"]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func in _METADATA_OPS or func.namespace != "aten" or not (written := _tensor_bytes(out)):
            return out
        work = self.work
        work["ops"] += 1
        formula = flop_registry.get(func._overloadpacket)
        flops = formula(*args, **kwargs, out_val=out) if formula is not None else 0
        work["flops"] += flops
        if func._overloadpacket in _ATTENTION:
            work["attention_flops"] += flops
            return out
        moved = written + _tensor_bytes((args, kwargs))
        if flops and flops >= GEMM_MIN_INTENSITY * moved:
            work["gemm_flops"] += flops
        else:
            work["memory_bytes"] += moved
        return out


@dataclass
class Estimate:
    target: str
    num_checkpointed_layers: int
    components_gib: dict[str, float] = field(default_factory=dict)
    peak_allocated_gib: float = 0.0
    peak_reserved_gib: float = 0.0
    unmodelled: str | None = None
    """Why this lever combination is not modelled to 3% on CUDA (`unmodelled_reason`), or None."""
    step_flops: float = 0.0
    """Floating-point operations of one micro-batch's forward + backward (recompute included) at full depth:
    matmuls and attention by torch's formulas (`_Flops`), replayed from the traced layers as the bytes are."""
    tokens: int = 0
    """Token positions per micro-batch (micro_batch_size x sequence_len)."""
    work: dict[str, float] = field(default_factory=dict)
    """One micro-batch's work at full depth, what the step-time model prices (`runner.estimate.speed`):
    `WORK_KEYS` from the trace, and the frozen linears' shape: `layer_linear_weights` (one decoder layer's frozen
    linear weights), `num_layers`, `head_weights` (the output projection's)."""

    @property
    def flops_per_token(self) -> float:
        return self.step_flops / self.tokens if self.tokens else 0.0

    @property
    def modelled(self) -> bool:
        return self.unmodelled is None

    @property
    def peak_gib(self) -> float:
        """The number a ceiling is compared with: reserved on CUDA, tensor bytes on CPU."""
        return self.peak_reserved_gib

    def to_dict(self) -> dict:
        return {**asdict(self), "peak_gib": self.peak_gib, "modelled": self.modelled,
                "flops_per_token": self.flops_per_token}


# Lever combinations the CUDA estimate is not modelled for to 3%, from 21 random valid combinations measured on
# an H200 (bench/results/estimate-random-2026-12-06.md: estimate / measured peak reserved - 1). The first three
# rules were written from the first 13 runs; of the 8 held out, the two they let through were an exact 0.0% and
# an int8 base under torch.compile at -26% (it kept far more than INT8_COMPILED_RECOMPUTED_LAYER_GIB says): the
# fourth rule. The four combinations no rule catches were within 3% (+2.6, +1.9, +1.6, 0.0%).
UNMODELLED = [
    (lambda s: s.activation_checkpointing.policy == "selective" and (s.training.compile or s.training.kernels == "liger"),
     "selective recompute under torch.compile or Liger kernels (measured +4% to +65%)"),
    (lambda s: s.activation_checkpointing.offload, "activation offload (measured -8% and +5%)"),
    (lambda s: s.training.kernels == "liger" and s.model.quantization in ("nf4", "int8"),
     "Liger kernels on a bitsandbytes base (measured -15% to -2%)"),
    (lambda s: s.model.quantization == "int8" and s.training.compile,
     "an int8 base under torch.compile (measured -26%)"),
]


def unmodelled(spec: JobSpec, target: str = "cuda") -> str | None:
    """Why the estimate of `spec` is not trusted to 3% (the tuner then measures instead of pruning), or None.
    The CPU estimate counts tensor bytes exactly and is always modelled."""
    if target != "cuda":
        return None
    reasons = [why for applies, why in UNMODELLED if applies(spec)]
    return "; ".join(reasons) or None


def _fake_trainable(spec: JobSpec, target: str, layers: list[int], depth: int, fake: FakeTensorMode) -> Trainable:
    """The job's real model classes and levers, built on the meta device with `depth` decoder layers
    (`layers` of them recompute), then given fake tensors."""
    trainable = build_trainable(spec, torch.device("meta"), layers=layers, target=target, depth=depth)
    with fake:
        for mod in trainable.model.modules():
            for n, p in list(mod._parameters.items()):
                if p is not None:
                    mod._parameters[n] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                            requires_grad=p.requires_grad)
            for n, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[n] = torch.empty(b.shape, dtype=b.dtype)
    return trainable


def traced_layers(num_layers: int, layers: list[int], config=None) -> list[int]:
    """The decoder layers the trace builds: the first and the last (their neighbours differ: the
    embedding's output needs no gradient, the final norm reads the last output) and, of the layers
    between, the first that recomputes and the first that does not. Every middle layer of one kind
    allocates and frees the same bytes at the same points of the step, so `_Timeline.replay` can
    stand that one in for the others. Non-uniform attention kinds (sliding-window layers): all."""
    kinds = getattr(config, "layer_types", None) or []
    if len(set(kinds)) > 1:
        return list(range(num_layers))
    chosen = set(layers)
    middle = range(1, num_layers - 1)
    keep = {0, num_layers - 1}
    for recomputes in (True, False):
        keep.update([i for i in middle if (i in chosen) == recomputes][:1])
    return sorted(keep)


class _Timeline:
    """A traced step cut into segments at the decoder-layer boundaries: the prelude (embedding,
    rotary tables), each layer's forward (from its call to the next layer's call; the last one's
    runs on through the head and the loss), the head's backward, then each layer's backward (from
    its output's gradient to its input's; layer 0's with the rest). A segment is (bytes live at its
    start, its peak, its end). Cut at the calls, a layer's segment frees what the model loop lets go
    of once that layer has run, so it depends on that layer's kind alone."""

    def __init__(self, memory: TensorMemory, layers: list[torch.nn.Module], flops: _Flops):
        self.memory, self.segments, self.in_backward, self.depth = memory, {}, False, len(layers)
        self.flops, self.segment_work, self._work_start = flops, {}, dict(flops.work)
        self._handles = []
        for j, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(partial(self._before_layer, j)))
            self._handles.append(layer.register_forward_hook(partial(self._after_layer, j)))
        self._start = memory.current
        memory.reset_peak()

    def cut(self, label) -> None:
        self.segments[label] = (self._start, self.memory.peak, self.memory.current)
        self._start = self.memory.current
        now = dict(self.flops.work)
        self.segment_work[label] = {k: now[k] - self._work_start[k] for k in now}
        self._work_start = now
        self.memory.reset_peak()

    def _before_layer(self, j: int, module, args) -> None:
        if not self.in_backward:  # (a checkpointed layer's recompute calls it again in backward)
            self.cut(("forward", j - 1) if j else "prelude")

    def _after_layer(self, j: int, module, args, output) -> None:
        out = output[0] if isinstance(output, tuple) else output
        if not self.in_backward and out.requires_grad:  # its gradient ends the next layer's backward
            out.register_hook(lambda grad: self.cut(("backward", j + 1) if j + 1 < self.depth else "head_backward"))

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def _play(self, labels: list, current: int, peak: int) -> tuple[int, int]:
        for label in labels:
            begin, top, end = self.segments[label]
            current, peak = current + end - begin, max(peak, current + top - begin)
        return current, peak

    def replay(self, sources: list[int], extra_bytes: int) -> tuple[int, int, int, dict[str, int]]:
        """(bytes live after the forward, the forward's peak, the step's peak, the step's work: `WORK_KEYS`) of
        the full model, whose layer i behaves as traced layer sources[i]; `extra_bytes`: the untraced layers'
        parameters."""
        start = self.segments["prelude"][0] + extra_bytes
        forward = ["prelude", *[("forward", j) for j in sources]]
        after_forward, forward_peak = self._play(forward, start, start)
        backward = ["head_backward", *[("backward", j) for j in reversed(sources[1:])], ("backward", 0)]
        work = {k: sum(self.segment_work[label][k] for label in forward + backward) for k in WORK_KEYS}
        return after_forward, forward_peak, self._play(backward, after_forward, forward_peak)[1], work


@contextmanager
def _as_eager_run():
    """transformers materialises the causal mask when it sees fake tensors (an export guard); a real
    run on full sequences passes none and uses SDPA's is_causal. Trace what the real run does."""
    from transformers import masking_utils

    saved = masking_utils.is_tracing, masking_utils.find_packed_sequence_indices
    masking_utils.is_tracing = lambda tensor=None: False
    masking_utils.find_packed_sequence_indices = lambda position_ids: None  # positions are 0..s-1 here
    try:
        yield
    finally:
        masking_utils.is_tracing, masking_utils.find_packed_sequence_indices = saved


def _fsdp_terms(trace: "_Trace", workers: int, target: str) -> tuple[float, float, float]:
    """FSDP2 (runner.parallel): the embedding and each decoder layer hold 1/N of their frozen weights
    and adapters; the root (norm, lm_head) stays whole. A layer is gathered just before it runs (its
    all-gather buffer, its unsharded copy, the next layer's prefetch: FSDP_GATHERED_LAYERS at once);
    gradients accumulate unsharded until the step's last micro-batch; AdamW state is sharded.
    Returns (frozen bytes no longer on this GPU, gathered-layer bytes, the all-gather stream's pool)."""
    embed = trace.model.get_base_model().model.embed_tokens
    frozen = sum(p.numel() * p.element_size() for p in embed.parameters() if not p.requires_grad)
    frozen += trace.full_bytes(lambda m: (p for layer in decoder_layers(m) for p in layer.parameters()
                                          if not p.requires_grad))
    layer = sum(p.numel() * p.element_size() for p in decoder_layers(trace.model)[0].parameters())
    stream_pool = FSDP_STREAM_POOL_LAYERS * layer if target == "cuda" else 0
    return frozen * (1 - 1 / workers), FSDP_GATHERED_LAYERS * layer, stream_pool


@dataclass
class _Trace:
    """One traced step: the short model, the full model's layer count, and its replayed byte counts."""
    model: PeftModel
    layers: list[int]          # the full model's recomputed layers
    untraced: int              # full-model layers the trace stood a copy in for
    after_forward: int
    forward_peak: int
    peak: int
    work: dict[str, int]       # the step's work at full depth (`WORK_KEYS`)

    def full_bytes(self, select) -> int:
        """Bytes of the tensors `select(module)` yields, over the full model (untraced layers are
        copies of layer 0 as far as their parameters go)."""
        def size(module):
            return sum(t.numel() * t.element_size() for t in select(module))
        return size(self.model) + self.untraced * size(decoder_layers(self.model)[0])


def _trace(spec: JobSpec, target: str, layers: list[int] | None, trace_all_layers: bool) -> _Trace:
    """One forward + backward of the job's model on fake tensors, a few layers deep
    (`traced_layers`), replayed at full depth."""
    with warnings.catch_warnings():  # build_trainable says it once
        warnings.simplefilter("ignore")
        config = model_config(spec.model, allow_builtin=True)
    num_layers = config.num_hidden_layers
    layers = resolve_layers(spec.activation_checkpointing, num_layers) if layers is None else layers
    keep = list(range(num_layers)) if trace_all_layers else traced_layers(num_layers, layers, config)
    chosen, stand_in = set(layers), {}
    for j, i in enumerate(keep):
        if 0 < i < num_layers - 1:
            stand_in.setdefault(i in chosen, j)
    sources = [keep.index(i) if i in keep else stand_in[i in chosen] for i in range(num_layers)]
    fake = FakeTensorMode()
    built = _fake_trainable(spec, target, [j for j, i in enumerate(keep) if i in chosen], len(keep), fake)
    b, s = spec.training.micro_batch_size, spec.data.sequence_len
    with fake:
        ids = torch.randint(0, 100, (b, s))
        # Unpacked data is padded: a mask changes the attention path (and what it saves).
        mask = None if spec.data.packing else torch.ones(b, s, dtype=torch.long).index_fill_(1, torch.tensor([s - 1]), 0)
        memory = TensorMemory(list(built.model.parameters()))
        flops = _Flops()
        timeline = _Timeline(memory, decoder_layers(built.model), flops)
        with memory, flops, sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]), \
                (_as_eager_run() if mask is None else nullcontext()):
            loss = built.net(input_ids=ids, labels=ids, attention_mask=mask)
            timeline.cut(("forward", timeline.depth - 1))  # the last layer, the head and the loss
            timeline.in_backward = True
            loss.backward()
            timeline.cut(("backward", 0))
        timeline.close()
    untraced = num_layers - len(keep)
    per_layer = sum(p.numel() * p.element_size() for p in decoder_layers(built.model)[0].parameters())
    return _Trace(built.model, layers, untraced, *timeline.replay(sources, untraced * per_layer))


def estimate(spec: JobSpec, target: str | None = None, layers: list[int] | None = None,
             trace_all_layers: bool = False) -> Estimate:
    """Peak memory of one training step of `spec` on `target` ('cuda' or 'cpu'; default from the spec).
    Long on purpose: the trace and the analytic terms read as one accounting, top to bottom."""
    target = target or ("cuda" if spec.resources.use_gpu else "cpu")
    dtype = resolve_dtype(spec.model, target)
    trace = _trace(spec, target, layers, trace_all_layers)
    model, layers = trace.model, trace.layers
    after_forward, forward_peak, peak = trace.after_forward, trace.forward_peak, trace.peak

    weights = trace.full_bytes(lambda m: (p for p in m.parameters() if not p.requires_grad))
    quantization = spec.model.quantization
    dequantized = 0
    if quantization != "none":  # the trace holds the linears in the model dtype; quantization packs them
        def frozen_linears(module):
            return [m.weight for layer in decoder_layers(module) for m in _frozen_linears(layer).values()]
        linear_bytes = trace.full_bytes(frozen_linears)
        packed = linear_bytes / dtype.itemsize * QUANTIZED_BYTES_PER_WEIGHT[quantization]
        weights -= linear_bytes - packed
        peak -= linear_bytes - packed
        after_forward -= linear_bytes - packed
        forward_peak -= linear_bytes - packed
        per_weight = TRANSIENT_BYTES_PER_WEIGHT[quantization] or dtype.itemsize
        dequantized = max(w.numel() * per_weight for w in frozen_linears(model))  # one at a time
        peak += dequantized
    lora = trace.full_bytes(lambda m: (p for p in m.parameters() if p.requires_grad))
    optimizer_state = 2 * lora  # AdamW exp_avg + exp_avg_sq, in the parameters' dtype
    workers = spec.resources.num_workers
    ddp_buckets = lora if workers > 1 and spec.resources.parallelism == "ddp" else 0
    gathered = stream_pool = 0
    lora_resident = lora
    if workers > 1 and spec.resources.parallelism == "fsdp":
        sharded, gathered, stream_pool = _fsdp_terms(trace, workers, target)
        weights -= sharded
        lora_resident = lora / workers
        moved = sharded + lora - lora_resident - gathered
        peak, after_forward, forward_peak = peak - moved, after_forward - moved, forward_peak - moved
        optimizer_state = 2 * lora_resident
    saved = after_forward - weights - lora_resident - gathered
    # What a checkpointed layer keeps: its input.
    b, s = spec.training.micro_batch_size, spec.data.sequence_len
    checkpointed_inputs = len(layers) * b * s * model.get_base_model().config.hidden_size * dtype.itemsize
    fused = "compile" if spec.training.compile else ("liger" if spec.training.kernels == "liger" else None)
    if fused:
        # Only the non-checkpointed layers' share changes; checkpointed layers save just their inputs.
        fewer = max(0, saved - checkpointed_inputs) * (1 - FUSED_SAVED_RATIO[fused])
        saved, after_forward, forward_peak, peak = saved - fewer, after_forward - fewer, forward_peak - fewer, peak - fewer
    int8_kept = 0.0
    if quantization == "int8":
        int8_kept = _int8_kept(model, len(decoder_layers(model)) + trace.untraced, len(layers), b * s * dtype.itemsize,
                              compiled=spec.training.compile)
        after_forward, forward_peak, peak = after_forward + int8_kept, forward_peak + int8_kept, peak + int8_kept
    offloaded = checkpointed_inputs if offload_applies(spec.activation_checkpointing, target) else 0
    cuda_extra = CUDA_EXTRA_GIB * GIB if target == "cuda" else 0.0
    allocated = peak + optimizer_state + ddp_buckets - offloaded + cuda_extra
    overhead = allocated * RESERVED_OVERHEAD + stream_pool if target == "cuda" else 0.0
    components = {
        "weights": weights,
        "fsdp_gathered_layers": gathered,
        "lora_params": lora_resident,
        "grads": lora,
        "optimizer_state": optimizer_state,
        "saved_activations": saved - offloaded,
        "logits_loss_transient": forward_peak - after_forward,
        "backward_transient": peak - after_forward - lora,
        "ddp_buckets": ddp_buckets,
        "dequantized_weight": dequantized,
        "int8_kept_inputs": int8_kept,
        "cuda_workspaces": cuda_extra,
        "allocator_overhead": overhead,
    }
    return Estimate(target=target, num_checkpointed_layers=len(layers),
                    components_gib={k: v / GIB for k, v in components.items()},
                    peak_allocated_gib=allocated / GIB, peak_reserved_gib=(allocated + overhead) / GIB,
                    unmodelled=unmodelled(spec, target), step_flops=trace.work["flops"], tokens=b * s,
                    work=_shape_of_work(trace))


def _frozen_linears(layer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """A decoder layer's frozen linears (what quantization packs), by projection name (q_proj, ...)."""
    return {n.removesuffix(".base_layer").rsplit(".", 1)[-1]: m for n, m in layer.named_modules()
            if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad}


def _shape_of_work(trace: _Trace) -> dict[str, float]:
    base = trace.model.get_base_model()
    layer_linears = sum(m.weight.numel() for m in _frozen_linears(decoder_layers(trace.model)[0]).values())
    head = base.get_output_embeddings()
    return {**trace.work, "layer_linear_weights": layer_linears, "head_weights": head.weight.numel(),
            "num_layers": len(decoder_layers(trace.model)) + trace.untraced}


def _int8_kept(model, num_layers: int, recomputed: int, token_bytes: int, compiled: bool) -> float:
    """Bytes LLM.int8()'s autograd contexts keep beyond what the trace sees (INT8_OUTLIER_FRACTION)."""
    if compiled:
        return INT8_COMPILED_RECOMPUTED_LAYER_GIB * GIB * recomputed
    linears = _frozen_linears(decoder_layers(model)[0])
    outlier_columns = INT8_OUTLIER_FRACTION * sum(m.in_features for m in linears.values())
    # q, k and v read one tensor, gate and up another: a recomputed layer keeps each distinct input once.
    distinct_inputs = sum(m.in_features for n, m in linears.items() if n not in ("k_proj", "v_proj", "up_proj"))
    return token_bytes * (num_layers * outlier_columns + recomputed * distinct_inputs)


def k_anchors(ks: list[int]) -> list[int]:
    """The k values to trace; memory is piecewise linear in k (each checkpointed layer trades its
    saved activations for its input), so every 8th k and the ends are enough."""
    ks = sorted(set(ks))
    return ks if len(ks) <= 3 else sorted({ks[0], ks[-1], *[k for k in ks if k % 8 == 0]})


def interpolate_k(traced: dict[int, Estimate], ks: list[int]) -> dict[int, Estimate]:
    """Estimates at every k from the traced anchors, linear in between."""
    anchors = sorted(traced)
    out = {}
    for k in sorted(set(ks)):
        if k in traced:
            out[k] = traced[k]
            continue
        lo = max(a for a in anchors if a < k)
        hi = min(a for a in anchors if a > k)
        w = (k - lo) / (hi - lo)
        a, c = traced[lo], traced[hi]
        out[k] = Estimate(target=a.target, num_checkpointed_layers=k,
                          components_gib={n: a.components_gib[n] * (1 - w) + c.components_gib[n] * w
                                          for n in a.components_gib},
                          peak_allocated_gib=a.peak_allocated_gib * (1 - w) + c.peak_allocated_gib * w,
                          peak_reserved_gib=a.peak_reserved_gib * (1 - w) + c.peak_reserved_gib * w,
                          unmodelled=a.unmodelled, step_flops=a.step_flops * (1 - w) + c.step_flops * w,
                          tokens=a.tokens, work={n: a.work[n] * (1 - w) + c.work[n] * w for n in a.work})
    return out


def estimate_at_k(spec: JobSpec, k: int, placement: str, num_layers: int, target: str | None = None) -> Estimate:
    layers = resolve_layers(ActivationCheckpointingSpec(count=k, placement=placement), num_layers)
    return estimate(spec, target, layers)


def sweep_k(spec: JobSpec, ks: list[int], target: str | None = None, placement: str | None = None,
            exact: bool = False) -> dict[int, Estimate]:
    """Estimates for several checkpointed-layer counts: the anchors traced, the rest interpolated
    (every k traced if `exact`)."""
    placement = placement or spec.activation_checkpointing.placement
    num_layers = model_config(spec.model, allow_builtin=True).num_hidden_layers
    traced = {k: estimate_at_k(spec, k, placement, num_layers, target) for k in (ks if exact else k_anchors(ks))}
    return interpolate_k(traced, ks)


def parse_sweep(text: str) -> list[int]:
    """`k=0..32` or `k=0,8,16`."""
    name, _, values = text.partition("=")
    if name.strip() != "k" or not values:
        raise ValueError(f"--sweep: expected k=A..B or k=A,B,C, got {text!r}")
    if ".." in values:
        lo, hi = values.split("..")
        return list(range(int(lo), int(hi) + 1))
    return [int(v) for v in values.split(",")]
