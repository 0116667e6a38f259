"""The job spec and the search-space schema: typed fields, their ranges and the checks across them.

Loading them (YAML, `--set`, paths, error messages) is `runner.loading`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from runner.cards import Card, allocator_budget_gib, custom_card, find_card, load_catalogue, unknown_card_message


class SpecError(ValueError):
    """A user-facing spec problem; `problems` lists each as 'dotted.path: message'."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


class _Strict(BaseModel):
    # allow_inf_nan=False: `1e400` reads as infinity in YAML; no field of a job means that.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------
# Job spec


PRESET_NUM_LAYERS = {"tiny": 4, "llama3-8b": 32}  # model.preset -> decoder layers (runner.model builds them)
PRESETS = tuple(PRESET_NUM_LAYERS)


BITSANDBYTES = ("nf4", "int8")  # model.quantization values that run bitsandbytes' CUDA kernels
CREDENTIAL_OPTIONS = "access_key|secret_key|session_token"  # pyarrow URI options that carry secrets


class ModelSpec(_Strict):
    name_or_path: str | None = None
    """HF hub id or local directory with config.json (+ weights unless init=random)."""
    preset: Literal["tiny", "llama3-8b"] | None = None
    """Architecture preset, used instead of name_or_path when no config is at hand."""
    init: Literal["pretrained", "random"] = "pretrained"
    """`random` builds the architecture with seeded random weights (dry runs, benchmarks)."""
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    """Weight and compute dtype; `auto` is bfloat16 on GPU and float32 on CPU."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel, as transformers names it."""
    quantization: Literal["none", "nf4", "int8", "fp8"] = "none"
    """Frozen base weights in fewer bytes; LoRA adapters stay in their own dtype. `nf4` (4-bit
    NormalFloat, double quantization, compute in the model dtype) and `int8` are bitsandbytes' (QLoRA),
    CUDA only (`pip install bitsandbytes`). `fp8` keeps the decoder layers' linears in float8 e4m3
    with a scale per row and runs their matmuls on fp8 tensor cores (compute capability 8.9+: L4,
    RTX 4090, H100, H200); it also runs, slowly, on CPU."""

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if (self.name_or_path is None) == (self.preset is None):
            raise ValueError("set exactly one of model.name_or_path (HF id or local path) or model.preset "
                             f"({' | '.join(PRESETS)})")
        if self.preset is not None and self.init != "random":
            raise ValueError("a model.preset has no weights: set model.init: random")
        return self


class TokenizerSpec(_Strict):
    name_or_path: str | None = None
    """HF id or local directory; defaults to the model's."""
    chat_template: str | None = None
    """Jinja chat template overriding the tokenizer's own (for `messages` data)."""

    @field_validator("chat_template")
    @classmethod
    def _compiles(cls, template: str | None) -> str | None:
        if template is not None:
            import jinja2

            try:
                jinja2.Environment().parse(template)
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(f"not a Jinja template ({e.message}, line {e.lineno})") from None
        return template


class DataSpec(_Strict):
    path: str
    """Local .jsonl/.json/.parquet file (or directory of them), or an HF dataset id."""
    format: Literal["alpaca", "messages", "sharegpt", "text"] = "alpaca"
    """Row layout: alpaca (instruction/input/output); messages (`messages: [{role, content}]`, loss on
    assistant turns); sharegpt (`conversations: [{from, value}]`, roles by `roles`); text."""
    field_messages: str | None = None
    """Column holding the conversation (default `messages`, or `conversations` for sharegpt)."""
    message_field_role: str | None = None
    """Key of a turn's role (default `role`, or `from` for sharegpt)."""
    message_field_content: str | None = None
    """Key of a turn's text (default `content`, or `value` for sharegpt)."""
    roles: dict[Literal["system", "user", "assistant"], list[str]] = {
        "system": ["system"], "user": ["user", "human"],
        "assistant": ["assistant", "gpt", "model", "chatgpt", "bing", "bard"]}
    """Which role names in the data mean system, user and assistant (axolotl/LLaMA-Factory aliases)."""
    bad_turns: Literal["drop_turn", "drop_row", "refuse"] = "drop_turn"
    """What to do with a conversation's unusable turns (an unknown role, empty or missing text, turns
    before the first user turn other than a leading system turn): drop the turn, drop the whole row,
    or refuse the file (preflight names the row). Every drop is counted in the data accounting."""
    split: str = "train"
    """Split to read from an HF dataset id."""
    sequence_len: int = Field(2048, ge=2)
    """Tokens per sequence; longer rows are truncated (and counted)."""
    packing: bool = False
    """Concatenate rows into full `sequence_len` blocks: no padding, constant memory per step."""
    pad_to_sequence_len: bool = False
    """Pad every micro-batch to `sequence_len` (constant memory without packing)."""
    train_on_inputs: bool = False
    """Also compute loss on prompt tokens (alpaca/messages)."""
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Held-out fraction for evaluation."""
    max_rows: int | None = Field(None, gt=0)
    """Use only the first N rows."""


class LoraSpec(_Strict):
    r: int = Field(16, gt=0)
    """LoRA rank."""
    lora_alpha: float = Field(32, gt=0)
    """LoRA scaling numerator (scale = lora_alpha / r)."""
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", min_length=1)
    """peft module names (q_proj, v_proj, ...) or `all-linear`."""
    adapter_dtype: Literal["float32", "model", "mixed"] = "float32"
    """`float32`: peft's default, fp32 adapters computed in fp32 (each adapter saves its own fp32 copy
    of its input); `model`: adapters stored and computed in the model dtype (least memory, bf16
    optimizer state); `mixed`: fp32 adapters and optimizer state, computed in the model dtype (the
    rank-r weights are cast in the forward), one shared input per layer (the numerics of HF Trainer's
    `bf16=True`, without its per-adapter input copies)."""


def compute_dtype(dtype: str, quantization: str, use_gpu: bool) -> str:
    """The dtype a job computes in: `auto` is bfloat16 on a GPU (float32 on CPU); an fp8 base computes
    in bfloat16 on a GPU."""
    if quantization == "fp8" and use_gpu:
        return "bfloat16"
    if dtype == "auto":
        return "bfloat16" if use_gpu else "float32"
    return dtype


def job_card(job: "JobSpec", total_gib: float | None = None) -> tuple[Card | None, dict[str, Card]]:
    """The card a GPU job is for: a card of `total_gib` (`--gpu-memory-gib`), else its resources.gpu; and
    the catalogue it was found in."""
    catalogue = load_catalogue(job.resources.gpu_catalogue)
    if total_gib is not None:
        return custom_card(total_gib), catalogue
    return (find_card(job.resources.gpu, catalogue) if job.resources.gpu else None), catalogue


def space_for_card(job: "JobSpec", space: "SearchSpaceSpec", total_gib: float | None = None) -> "SearchSpaceSpec":
    """The space with its ceiling (an allocator cap) set for the card the job is for: the card's total less
    what lives outside the allocator, so a probe on a bigger card runs out of memory where that card
    would. On CPU, `total_gib` is the tensor-byte ceiling itself."""
    if not job.resources.use_gpu:
        return space if total_gib is None else space.model_copy(update={"gpu_memory_gib": total_gib})
    card, catalogue = job_card(job, total_gib)
    if card is None:
        return space
    return space.model_copy(update={"gpu_memory_gib": round(allocator_budget_gib(card, catalogue), 3)})


def lever_conflicts(quantization: str, parallelism: str, offload: bool, policy: str) -> list[str]:
    """Lever pairs that cannot run together. The one rule: the job's validation and the search's
    `Config.valid` both call it, so a search never proposes a job that would not validate."""
    problems = []
    if offload and policy == "selective":
        problems.append("activation_checkpointing.offload works with policy: full only")
    if parallelism == "fsdp" and quantization != "none":
        problems.append("resources.parallelism: fsdp with model.quantization: quantized frozen weights (packed "
                        "4-bit, int8, fp8 with scales) are not sharded by FSDP2 here; use parallelism: ddp for a "
                        "quantized base")
    return problems


def layer_range_problems(ac: "ActivationCheckpointingSpec", num_layers: int) -> list[str]:
    """What in `ac` the model's `num_layers` decoder layers cannot hold. The one check: the spec (presets,
    whose depth is known), preflight (the real config) and `recompute.resolve_layers` all call it."""
    problems = []
    if isinstance(ac.layers, list) and ac.layers and max(ac.layers) >= num_layers:
        problems.append(f"activation_checkpointing.layers: the model has {num_layers} layers "
                        f"(0..{num_layers - 1}), got index {max(ac.layers)}")
    if ac.count is not None and ac.count > num_layers:
        problems.append(f"activation_checkpointing.count: the model has {num_layers} layers, got {ac.count}")
    return problems


class ActivationCheckpointingSpec(_Strict):
    layers: Literal["none", "all"] | list[int] = "none"
    """`none`, `all`, or explicit 0-based decoder-layer indices to recompute."""
    count: int | None = Field(None, ge=0)
    """Checkpoint this many layers, placed by `placement` (instead of `layers`)."""
    placement: Literal["first", "last", "every_n"] = "first"
    """Where `count` layers go: the first k, the last k, or evenly spaced."""
    offload: bool = False
    """Keep checkpointed layer inputs in pinned CPU memory instead of on the GPU."""
    policy: Literal["full", "selective"] = "full"
    """Inside a checkpointed layer: `full` recomputes everything; `selective` keeps matmul and
    attention outputs and recomputes only the cheap ops (norms, activations, casts, RoPE)."""

    @model_validator(mode="after")
    def _count_or_layers(self) -> "ActivationCheckpointingSpec":
        if self.count is not None and self.layers != "none":
            raise ValueError("set either activation_checkpointing.layers or activation_checkpointing.count, not both")
        if isinstance(self.layers, list):
            if len(set(self.layers)) != len(self.layers) or any(i < 0 for i in self.layers):
                raise ValueError("activation_checkpointing.layers must be distinct non-negative layer indices")
        return self


class TrainingSpec(_Strict):
    micro_batch_size: int = Field(1, gt=0)
    """Sequences per forward/backward on one worker."""
    gradient_accumulation_steps: int = Field(1, gt=0)
    """Micro-batches per optimizer step; global batch = micro × accum × workers."""
    learning_rate: float = Field(2e-4, gt=0, le=10)
    """Peak learning rate (AdamW). Above 10 it overflows the update in float32: no job means that."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps; overrides num_epochs when set."""
    num_epochs: float = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Gradient clipping; null disables it."""
    seed: int = 0
    loss: Literal["hf", "chunked", "liger"] = "chunked"
    """`hf`: the model's loss on full fp32 logits; `chunked`: linear+CE in chunks, logits never whole;
    `liger`: Liger's fused linear+cross-entropy kernel (CUDA, `pip install liger-kernel`)."""
    loss_chunk_tokens: int = Field(1024, gt=0)
    """Tokens per chunk of the chunked loss."""
    kernels: Literal["eager", "liger"] = "eager"
    """`liger`: Liger's fused Triton kernels for RMSNorm, SwiGLU and RoPE (CUDA, `pip install
    liger-kernel`): the same math, fewer saved activations and kernel launches."""
    compile: bool = False
    """torch.compile each decoder layer: fuses the elementwise ops around the matmuls and saves fewer
    activations. The first step pays the compile (tens of seconds); on CPU it needs a C++ compiler."""
    expandable_segments: bool = False
    """CUDA: the caching allocator grows one mapped segment per stream (PyTorch's `expandable_segments`, what
    torchtune and vLLM turn on by default) instead of carving fixed blocks, so less of what it reserves sits
    unused between them. Not yet measured here: the memory estimate still predicts the default allocator's
    overhead (an over-estimate, if anything). `PYTORCH_CUDA_ALLOC_CONF` set by hand is left as it is."""
    logging_steps: int = Field(1, gt=0)
    eval_steps: int | None = Field(None, gt=0)
    save_steps: int | None = Field(None, gt=0)
    """Save a resumable checkpoint every N optimizer steps (and at the end)."""
    check_gradient_flow: bool = True
    """Before training, verify every LoRA parameter gets a non-zero gradient (fail fast)."""
    measure_warmup_steps: int = Field(1, ge=0)
    """Optimizer steps excluded from the steady-state tokens/s summary."""
    on_oom: Literal["fallback", "fail"] = "fallback"
    """Out of GPU memory mid-run: `fallback` resumes from the latest checkpoint with more recomputed layers
    (then half the micro-batch, twice the accumulation: the same global batch), said in the console and
    MLflow; `fail` ends the run."""
    max_failures: int | None = Field(None, ge=-1)
    """Automatic restarts after a worker dies (Ray Train's FailureConfig), each from the latest
    checkpoint; -1 is unlimited. Default: 3 on a cluster (resources.address set, or inside a Ray job),
    else 0."""


class ResourcesSpec(_Strict):
    address: str | None = None
    """Ray address (`auto`, `ray://...`); null starts a local Ray."""
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, gt=0, le=1)
    """Fraction of a GPU per worker (several probes may share one card)."""
    gpu_memory_gib: float | None = Field(None, gt=0)
    """Per-process allocator cap (torch.cuda.set_per_process_memory_fraction), for a card not in the
    catalogue; `gpu` is the way for a real card."""
    gpu: str | None = None
    """The card the job is for, by catalogue name (`L4`, `A10G`, `RTX-4090`, `T4`, ...; `fitrun estimate
    --cards` lists them). The job must fit its whole-process memory; on a bigger card the allocator is
    capped where that card would run out, and levers the card cannot run (fp8 below compute capability
    8.9, bf16 below 8.0) are refused before anything runs."""
    gpu_catalogue: str | None = None
    """A YAML file of more cards (the shape of runner/cards.yaml); a card of a known name replaces it."""
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    """How several workers share the job: `ddp` keeps a whole model on each worker and all-reduces the
    LoRA gradients once per optimizer step; `fsdp` (FSDP2, one `fully_shard` unit per decoder layer)
    shards the frozen base and the adapters, so each GPU holds 1/N of the weights plus the layer
    being computed. Ignored with one worker."""


TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


class TrackingSpec(_Strict):
    tracking_uri: str | None = None

    @field_validator("tracking_uri")
    @classmethod
    def _known_scheme(cls, uri: str | None) -> str | None:
        scheme = uri.split("://", 1)[0] if uri and "://" in uri else None
        if scheme and scheme.split("+")[0] not in TRACKING_SCHEMES:
            raise ValueError(f"MLflow stores runs in {', '.join(TRACKING_SCHEMES)} URIs (or a local path), "
                             f"not {scheme}://")
        return uri
    """MLflow tracking URI; default: sqlite:///mlflow.db in the working directory."""
    experiment_name: str = Field("fitrun", min_length=1)
    run_name: str | None = None
    log_model: bool = True
    """The adapter as an MLflow model (transformers flavor, PEFT form; `runner.registry`), beside its files."""
    retry_every_s: float = Field(15.0, gt=0, le=3600)
    """While the tracking server does not answer, one delivery attempt of the waiting records per this many
    seconds (training never waits on it)."""
    registered_model_name: str | None = Field(None, min_length=1, max_length=256, pattern=r"^[^/:%]+$")
    """Registers that model as a new version of this registered model (`--register NAME`); for a search,
    the winner's quality run."""

    @model_validator(mode="after")
    def _register_needs_model(self) -> "TrackingSpec":
        if self.registered_model_name and not self.log_model:
            raise ValueError("tracking.registered_model_name needs tracking.log_model: true (the version registered "
                             "is that model)")
        return self


class JobSpec(_Strict):
    name: str = "job"
    """Job name: the Ray run name, the default MLflow run name and the `{name}` of output_dir; letters,
    digits, `.`, `_` and `-` only, so it can never leave the output root."""
    model: ModelSpec
    tokenizer: TokenizerSpec = TokenizerSpec()
    data: DataSpec
    lora: LoraSpec = LoraSpec()
    training: TrainingSpec = TrainingSpec()
    activation_checkpointing: ActivationCheckpointingSpec = ActivationCheckpointingSpec()
    resources: ResourcesSpec = ResourcesSpec()
    tracking: TrackingSpec = TrackingSpec()
    output_dir: str = "outputs/{name}"
    """Adapters, checkpoints and Ray storage; `{name}` is replaced by the job name."""

    @field_validator("output_dir")
    @classmethod
    def _no_credentials_in_output_dir(cls, output_dir: str) -> str:
        if re.search(rf"://[^/?#]*@|[?&]({CREDENTIAL_OPTIONS})=", output_dir):
            raise ValueError("holds credentials, and it is recorded as an MLflow param and printed: give them to "
                             "the storage through its environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                             "GOOGLE_APPLICATION_CREDENTIALS) or the node's role")
        return output_dir

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
            raise ValueError("use letters, digits, '.', '_' and '-' (starting with a letter or digit): the name is a "
                             "directory under the output root and must not leave it")
        return name

    @model_validator(mode="after")
    def _cross_checks(self) -> "JobSpec":
        problems = []
        if self.model.quantization in BITSANDBYTES and not self.resources.use_gpu:
            problems.append(f"model.quantization: {self.model.quantization} runs bitsandbytes kernels: it needs "
                            "resources.use_gpu: true")
        if self.model.quantization == "fp8" and self.resources.use_gpu and self.model.dtype not in ("auto", "bfloat16"):
            problems.append(f"model.quantization: fp8 computes in bfloat16 on CUDA (fp8 matmuls with row scales "
                            f"return bf16), not {self.model.dtype}: set model.dtype: bfloat16")
        ac = self.activation_checkpointing
        problems += lever_conflicts(self.model.quantization, self.resources.parallelism, ac.offload, ac.policy)
        if self.resources.gpu_memory_gib is not None and not self.resources.use_gpu:
            problems.append("resources.gpu_memory_gib needs resources.use_gpu: true")
        problems += self._card_problems()
        liger = [f for f, on in (("training.kernels: liger", self.training.kernels == "liger"),
                                  ("training.loss: liger", self.training.loss == "liger")) if on]
        if liger and not self.resources.use_gpu:
            problems.append(f"{' and '.join(liger)} run Triton kernels: they need resources.use_gpu: true")
        if self.data.packing and self.data.pad_to_sequence_len:
            problems.append("data.packing and data.pad_to_sequence_len are exclusive: packed blocks are always full")
        num_layers = preset_num_layers(self.model.preset)
        if num_layers is not None:
            problems += layer_range_problems(self.activation_checkpointing, num_layers)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _card_problems(self) -> list[str]:
        """`resources.gpu`: a known card, on a GPU job, that can run the job's compute dtype and quantization."""
        res = self.resources
        if res.gpu is None:
            return []
        if res.gpu_catalogue is not None and not Path(res.gpu_catalogue).is_file():
            return [f"resources.gpu_catalogue: {res.gpu_catalogue!r} is not a file"]
        catalogue = load_catalogue(res.gpu_catalogue)
        card = find_card(res.gpu, catalogue)
        if card is None:
            return [f"resources.gpu: {unknown_card_message(res.gpu, catalogue)}"]
        problems = []
        if not res.use_gpu:
            problems.append("resources.gpu needs resources.use_gpu: true")
        if res.gpu_memory_gib is not None:
            problems.append("set resources.gpu (a catalogued card: its whole-process budget) or "
                            "resources.gpu_memory_gib (an allocator cap), not both")
        reason = card.can_run(self.compute_dtype, self.model.quantization)
        if reason:
            problems.append(f"resources.gpu: {reason}")
        return problems

    def ineffective_settings(self) -> list[str]:
        """Settings that validate but cannot take effect in this job: each is said once, before it runs."""
        t, notes = self.training, []
        if t.max_steps is not None and t.warmup_steps >= t.max_steps:
            notes.append(f"training.warmup_steps ({t.warmup_steps}) >= training.max_steps ({t.max_steps}): the "
                         f"learning rate never reaches {t.learning_rate:g}")
        if t.expandable_segments and not self.resources.use_gpu:
            notes.append("training.expandable_segments is set but the job runs on the CPU: it is a CUDA allocator "
                         "setting")
        if t.eval_steps and not self.data.val_fraction:
            notes.append("training.eval_steps is set but data.val_fraction is 0: there is no eval split, nothing is "
                         "evaluated")
        return notes

    @property
    def compute_dtype(self) -> str:
        return compute_dtype(self.model.dtype, self.model.quantization, self.resources.use_gpu)

    @property
    def global_batch_size(self) -> int:
        t = self.training
        return t.micro_batch_size * t.gradient_accumulation_steps * self.resources.num_workers

    def resolved_output_dir(self) -> str:
        """`output_dir` with the job's name: a local path or an object-store URI (see runner.storage)."""
        return self.output_dir.replace("{name}", self.name)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def preset_num_layers(preset: str | None) -> int | None:
    return PRESET_NUM_LAYERS.get(preset) if preset else None


# ---------------------------------------------------------------------------------------------
# Search space


class CheckpointDimension(_Strict):
    k: list[NonNegativeInt] | dict[str, int] | None = Field(None, min_length=1)
    """Checkpointed-layer counts: a list, or {min, max} (inclusive). Default: 0..num_layers."""
    placements: list[Literal["first", "last", "every_n"]] = Field(["first"], min_length=1)
    """Placement strategies to try for each k."""
    policies: list[Literal["full", "selective"]] | None = Field(None, min_length=1)
    """Recompute policies to try (default: the job's): selective keeps matmul outputs, costs memory, saves time."""
    offloads: list[bool] | None = Field(None, min_length=1)
    """Offload checkpointed inputs to pinned host memory or not (default: the job's): less memory, some time."""

    def values(self, num_layers: int) -> list[int]:
        """The k values to search, sorted (a well-formed `k`; `check_space` says when it is not)."""
        if self.k is None:
            return list(range(num_layers + 1))
        if isinstance(self.k, dict):
            return list(range(self.k["min"], self.k["max"] + 1))
        return sorted(set(self.k))


class SearchSpaceSpec(_Strict):
    activation_checkpointing: CheckpointDimension = CheckpointDimension()
    lora_r: list[PositiveInt] | None = Field(None, min_length=1)
    """LoRA ranks to try; default: the job's."""
    adapter_dtypes: list[Literal["float32", "model", "mixed"]] | None = Field(None, min_length=1)
    """LoRA adapter dtypes to try (default: the job's); `mixed` and `model` save memory (see lora.adapter_dtype)."""
    quantizations: list[Literal["none", "nf4", "int8", "fp8"]] | None = Field(None, min_length=1)
    """Base-weight quantizations to try (default: the job's; see model.quantization)."""
    parallelisms: list[Literal["ddp", "fsdp"]] | None = Field(None, min_length=1)
    """With several workers: data-parallel strategies to try (default: the job's; see resources.parallelism)."""
    lora_alpha_rule: str = "2*r"
    """lora_alpha as a function of r: `2*r`, `r`, `16` (a constant), ..."""
    gradient_accumulation_steps: list[PositiveInt] | None = Field(None, min_length=1)
    """Accumulation steps to try; micro-batch = global batch / (accum × workers)."""
    gpu_memory_gib: float | None = Field(None, gt=0)
    """Memory ceiling; on CPU it bounds measured tensor memory."""
    safety_margin_gib: float = Field(0.5, ge=0)
    """Headroom kept below the ceiling (CUDA context, fragmentation)."""
    searcher: Literal["fit", "random"] = "fit"
    """`fit`: structured smallest-k-that-fits search; `random`: generic sampling of the grid, for comparison."""
    num_samples: int = Field(20, gt=0)
    """Trials for the generic searchers."""
    probe_warmup_steps: int = Field(1, ge=0)
    probe_steps: int = Field(3, gt=0)
    """Measured optimizer steps per probe trial."""
    prune_with_estimate: bool = True
    """Skip configs the memory estimate puts over the ceiling by more than `prune_margin_pct`."""
    prune_margin_pct: float = Field(10.0, ge=0)
    prune_dominated: bool = True
    """Skip a rank column once a smaller rank at the same micro-batch fits with no more checkpointed
    layers (it cannot be faster); off to measure every rank's boundary for the loss frontier."""
    max_concurrent_trials: int | None = Field(None, gt=0)
    exclusive_finalists: int = Field(3, ge=0)
    """Re-measure the top N feasible configs alone on the device (uncontended speed)."""
    quality_steps: int = Field(20, ge=0)
    """Where the job has an eval split (`data.val_fraction`): each rank's fastest config that fits
    trains this many optimizer steps at the job's global batch (the same tokens, seed and data order
    for every rank), then its eval loss is reported beside its speed. 0: off."""

    @model_validator(mode="after")
    def _margin_below_ceiling(self) -> "SearchSpaceSpec":
        if self.gpu_memory_gib is not None and self.safety_margin_gib >= self.gpu_memory_gib:
            raise ValueError(f"safety_margin_gib ({self.safety_margin_gib}) must be less than gpu_memory_gib "
                             f"({self.gpu_memory_gib}): nothing could fit")
        return self

    @property
    def limit_gib(self) -> float | None:
        """The largest peak that counts as fitting: the ceiling less the safety margin."""
        return None if self.gpu_memory_gib is None else self.gpu_memory_gib - self.safety_margin_gib


def alpha_for(rule: str, r: int) -> float:
    """`2*r`, `r`, `16`: lora_alpha as an arithmetic expression of r (nothing else is allowed)."""
    allowed = set("0123456789.*+-/() r")
    if not set(rule) <= allowed:
        raise SpecError("search space", [f"lora_alpha_rule: only numbers, r and + - * / ( ), got {rule!r}"])
    return float(eval(rule, {"__builtins__": {}}, {"r": r}))  # noqa: S307 - characters checked above


def space_accumulations(job: JobSpec, space: SearchSpaceSpec) -> list[int]:
    """The accumulation steps a search tries: the space's list, else the job's own."""
    return space.gradient_accumulation_steps or [job.training.gradient_accumulation_steps]


def micro_batch_for(job: JobSpec, accumulation: int) -> int | None:
    """The micro-batch that keeps the job's global batch at `accumulation` steps per optimizer step
    (micro x accumulation x workers = global), or None where that does not divide. The one rule:
    `check_space` refuses what `tune.search.expand` could not build."""
    per_step = accumulation * job.resources.num_workers
    if accumulation <= 0 or job.global_batch_size % per_step:
        return None
    return job.global_batch_size // per_step


def check_space(job: JobSpec, space: SearchSpaceSpec, num_layers: int) -> None:
    """Everything about a space that needs the job and the model's depth; all problems at once.
    `fitrun validate --space` and `fitrun tune` both call this, so they accept the same spaces."""
    problems = []
    workers, global_batch = job.resources.num_workers, job.global_batch_size
    bad = [a for a in space_accumulations(job, space) if micro_batch_for(job, a) is None]
    if bad:
        problems.append(f"gradient_accumulation_steps: {bad} do not divide the job's global batch {global_batch} "
                        f"(= micro {job.training.micro_batch_size} x accum {job.training.gradient_accumulation_steps}"
                        f" x workers {workers}); use divisors of {global_batch // workers}")
    k = space.activation_checkpointing.k
    if isinstance(k, dict) and set(k) != {"min", "max"}:
        problems.append(f"activation_checkpointing.k: a range is {{min: A, max: B}}, got {k}")
    else:
        ks = space.activation_checkpointing.values(num_layers)
        if not ks:
            problems.append(f"activation_checkpointing.k: empty, got {k}")
        elif min(ks) < 0 or max(ks) > num_layers:
            problems.append(f"activation_checkpointing.k: must lie in 0..{num_layers} (the model's layers), "
                            f"got {min(ks)}..{max(ks)}")
    if space.gpu_memory_gib is None:
        problems.append("gpu_memory_gib: set a ceiling (in the space file), or name the card: --gpu NAME "
                        "(--gpu-memory-gib for a card not in the catalogue)")
    quantized = [q for q in (space.quantizations or []) if q in BITSANDBYTES]
    if quantized and not job.resources.use_gpu:
        problems.append(f"quantizations: {quantized} need resources.use_gpu: true in the job")
    if "fsdp" in (space.parallelisms or []) and job.resources.num_workers < 2:
        problems.append("parallelisms: fsdp shards across workers: it needs resources.num_workers >= 2 in the job")
    if job.tracking.registered_model_name and not (space.quality_steps and job.data.val_fraction):
        problems.append(f"tracking.registered_model_name: {job.tracking.registered_model_name!r}: a search registers "
                        "its winner's quality run, the one that trains an adapter: set quality_steps in the space and "
                        "data.val_fraction in the job")
    try:
        alpha_for(space.lora_alpha_rule, 8)
    except SpecError as e:
        problems += e.problems
    except Exception as e:  # a malformed expression
        problems.append(f"lora_alpha_rule: cannot evaluate {space.lora_alpha_rule!r}: {e}")
    if problems:
        raise SpecError("search space", problems)
