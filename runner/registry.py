"""The adapter as an MLflow model: MLflow's transformers flavor in its PEFT form (the adapter weights and the
tokenizer; the base referenced by its local path or hub id, never copied), linked to the run that trained it,
and registered as a new model version when asked (`--register NAME`).

Nothing of the base is loaded to log it: the flavor needs the model's architecture and the adapter's weights,
so the base is built on the meta device and only the adapter's tensors are real. `mlflow.transformers.load_model`
then loads the base from the reference and puts the adapter on it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from runner.model import build_base, build_tokenizer, hub_reachable, resolve_dtype
from runner.spec import JobSpec

MODEL_NAME = "model"                 # the logged model's name in its run (and its artifact folder)
SMALL_RANDOM_BASE = 100_000_000     # parameters: a random-init base this small is saved beside the adapter
BASE_DIR = "base"                   # ... in <output_dir>/base, so the model loads (the tiny CPU job)


@dataclass
class BaseReference:
    """Where the logged model's base comes from at load time: a local folder (`path`), or the hub id in the
    job (`path` None). `why_not` says why no model can be logged (a big random-init dry run)."""

    path: str | None = None
    why_not: str | None = None

    @property
    def where(self) -> str:
        return self.path or "the Hugging Face Hub"


def base_reference(spec: JobSpec, out: Path | None, tok=None) -> BaseReference:
    """The base the logged model names: a random-init base that is small is saved to `out/base` (its weights
    are reproducible from the job's seed, and loading needs them); a big one is not (a dry run's random 8B is
    no model anyone loads). A local folder is named as is; a hub id by the hub, or by its folder in the local
    Hugging Face cache where the hub is unreachable."""
    m = spec.model
    if m.init == "random":
        tok = tok or build_tokenizer(spec.tokenizer, m)
        meta = build_base(m.model_copy(update={"quantization": "none"}), torch.device("meta"), len(tok))
        n = sum(p.numel() for p in meta.parameters())
        if n > SMALL_RANDOM_BASE:
            return BaseReference(why_not=f"the base is a random-init dry run ({n / 1e9:.1f}B parameters): no model "
                                         "to load, so the adapter is logged as files only")
        if out is None:
            return BaseReference(why_not="a random-init base is saved beside the adapter, and output_dir is in an "
                                         "object store")
        dest = out / BASE_DIR
        if not (dest / "config.json").is_file():
            base = build_base(m.model_copy(update={"quantization": "none"}), torch.device("cpu"), len(tok),
                              spec.training.seed)
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # a tiny base: no "Writing model shards" bar in the run's output
            try:
                base.save_pretrained(dest)
            finally:
                hf_logging.enable_progress_bar()
            tok.save_pretrained(dest)
        return BaseReference(path=str(dest.resolve()))
    if Path(m.name_or_path).is_dir():
        return BaseReference(path=str(Path(m.name_or_path).resolve()))
    if hub_reachable():
        return BaseReference()
    try:
        from huggingface_hub import snapshot_download

        return BaseReference(path=snapshot_download(m.name_or_path, local_files_only=True))
    except Exception:
        return BaseReference(why_not=f"{m.name_or_path} is neither a local folder nor in the local Hugging Face "
                                     "cache, and the hub is unreachable")


def _adapter_on_meta_base(spec: JobSpec, adapter_dir: Path, tok):
    """The PEFT model with the base on the meta device and the adapter's own tensors loaded (assigned)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    model_spec = spec.model.model_copy(update={"quantization": "none"})
    meta = build_base(model_spec, torch.device("meta"), len(tok))
    meta.name_or_path = spec.model.name_or_path or ""
    model = PeftModel.from_pretrained(meta, str(adapter_dir), low_cpu_mem_usage=True)
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    # peft saves `...lora_A.weight`; in the model the adapter is named: `...lora_A.default.weight`.
    named = {re.sub(r"\.(lora_[A-Za-z_]+)\.weight$", r".\1.default.weight", k): v for k, v in saved.items()}
    missing = model.load_state_dict(named, strict=False, assign=True).unexpected_keys
    if missing:
        raise ValueError(f"adapter tensors that match no module of the base: {missing[:3]}")
    return model


def _requirements() -> list[str]:
    """Pinned from what is installed (MLflow's own guess imports torchvision, which fitrun does not need)."""
    pins = []
    for pkg in ("torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            pins.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            pass
    return pins


def log_adapter_model(spec: JobSpec, adapter_dir: Path, out: Path | None, uri: str, run_id: str,
                      measured: dict[str, Any], register: str | None = None,
                      winner: dict[str, Any] | None = None) -> str | None:
    """Logs the adapter in `adapter_dir` as the run's MLflow model (`models:/<id>`, returned), with the job,
    its data digest, the measured speed and peak and, for a search, the winner's config; registers it under
    `register` (a new version). Returns None, saying why, where no model can be logged."""
    import mlflow
    from transformers import pipeline

    from runner.data import content_digest

    tok = build_tokenizer(spec.tokenizer, spec.model)
    ref = base_reference(spec, out, tok)
    if ref.why_not:
        print(f"MLflow model: not logged ({ref.why_not})", flush=True)
        if register:
            raise ValueError(f"--register {register}: {ref.why_not}")
        return None
    model = _adapter_on_meta_base(spec, Path(adapter_dir), tok)
    pipe = pipeline("text-generation", model=model, tokenizer=tok, device=torch.device("meta"))
    quantized = spec.model.quantization
    tags = {"fitrun.job": spec.name, "fitrun.data_digest": content_digest(spec.data), "fitrun.base": ref.where,
            **{f"fitrun.{k}": f"{v:.6g}" for k, v in measured.items() if isinstance(v, (int, float))}}
    if quantized != "none":
        tags["fitrun.trained_on"] = f"a {quantized} base; the model loads the adapter onto the unquantized base"
    if winner:
        tags["fitrun.winner"] = winner["key"]
    metadata = {"fitrun_job": json.loads(json.dumps(spec.to_dict(), default=str)), **({"winner": winner} if winner else {})}
    mlflow.set_tracking_uri(uri)
    logging.getLogger("mlflow.transformers").setLevel(logging.WARNING)  # its INFO lines restate what we print
    with mlflow.start_run(run_id=run_id):
        info = mlflow.transformers.log_model(pipe, name=MODEL_NAME, base_model_path=ref.path,
                                             torch_dtype=resolve_dtype(spec.model, "cuda" if spec.resources.use_gpu
                                                                       else "cpu"),
                                             pip_requirements=_requirements(), metadata=metadata, tags=tags,
                                             registered_model_name=register)
    version_note = f"; registered as {register} version {info.registered_model_version}" if register else ""
    print(f"MLflow model {info.model_uri} (base from {ref.where}){version_note}", flush=True)
    return info.model_uri
