"""The GPU catalogue (runner/cards.yaml) and the rules that make "fits my card" mean the real card: its
total as the driver reports it, less what a process holds outside PyTorch's allocator, less a margin;
and what it can run at all (bf16 needs compute capability 8.0, fp8 tensor cores 8.9).

One owner: the spec's validation, the estimate, the worker's cap, the probes and the report all ask here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

MIB = 1024**2
GIB = 1024**3
SHIPPED = Path(__file__).with_name("cards.yaml")
CATALOGUE_ENV = "FITRUN_GPU_CATALOGUE"
DEFAULT_MARGIN_GIB = 0.25
"""Kept free on the card beyond the predicted whole process: allocator fragmentation between steps, and
what a driver reserves on cards whose reserve was not measured."""
MEASURED_ON = "H100"
"""The card whose outside-allocator bytes stand in for cards where fitrun has not measured them."""
BF16_MIN_CC, FP8_MIN_CC = 8.0, 8.9


@dataclass(frozen=True)
class Card:
    name: str
    memory_total_mib: int
    compute_capability: float
    bandwidth_gbs: float | None = None
    fp16_tflops: float | None = None
    bf16_tflops: float | None = None
    fp8_tflops: float | None = None
    price_usd_hour: float | None = None
    reserved_mib: int | None = None
    outside_allocator_mib: int | None = None
    aliases: tuple[str, ...] = ()
    sources: dict = field(default_factory=dict, compare=False)
    unconfirmed: tuple[str, ...] = ()

    @property
    def total_gib(self) -> float:
        return self.memory_total_mib * MIB / GIB

    def can_run(self, dtype: str, quantization: str) -> str | None:
        """None if this card runs a job of compute `dtype` ('bfloat16', 'float16', 'float32') and
        `quantization`; else the reason, in words a user can act on."""
        cc = self.compute_capability
        if dtype == "bfloat16" and cc < BF16_MIN_CC:
            return (f"the {self.name} (compute capability {cc}) has no bf16: set model.dtype: float16 "
                    "(fitrun trains it with loss scaling)")
        if quantization == "fp8" and cc < FP8_MIN_CC:
            return (f"the {self.name} (compute capability {cc}) has no fp8 tensor cores (8.9+: L4, RTX 4090, "
                    "H100): use quantization nf4 or none")
        return None


def outside_allocator_gib(card: Card, catalogue: dict[str, Card]) -> tuple[float, str]:
    """What a training process holds outside the allocator on `card`, and where the number comes from."""
    if card.outside_allocator_mib is not None:
        return card.outside_allocator_mib * MIB / GIB, f"measured on the {card.name}"
    ref = catalogue[MEASURED_ON]
    return ref.outside_allocator_mib * MIB / GIB, f"the {ref.name}'s measured value (not measured on the {card.name})"


def allocator_budget_gib(card: Card, catalogue: dict[str, Card]) -> float:
    """The allocator cap that makes a bigger card run out of memory where `card` would: its total, less
    the driver's reserve (where measured) and what lives outside the allocator."""
    reserved = (card.reserved_mib or 0) * MIB / GIB
    return card.total_gib - reserved - outside_allocator_gib(card, catalogue)[0]


def allocator_cap_gib(resources) -> float | None:
    """The allocator cap of a job's `resources`: its `gpu_memory_gib`, else its card's budget."""
    if resources.gpu_memory_gib is not None:
        return resources.gpu_memory_gib
    if resources.gpu is None:
        return None
    catalogue = load_catalogue(resources.gpu_catalogue)
    return allocator_budget_gib(find_card(resources.gpu, catalogue), catalogue)


def load_catalogue(extra: str | None = None) -> dict[str, Card]:
    """The shipped cards, then FITRUN_GPU_CATALOGUE's, then `extra`'s (a card of a known name replaces it)."""
    cards: dict[str, Card] = {}
    for path in (SHIPPED, os.environ.get(CATALOGUE_ENV), extra):
        if not path:
            continue
        raw = yaml.safe_load(Path(path).read_text()) or {}
        for entry in raw.get("cards", []):
            entry = dict(entry)
            entry["aliases"] = tuple(str(a) for a in entry.get("aliases") or ())
            entry["unconfirmed"] = tuple(entry.get("unconfirmed") or ())
            cards[entry["name"]] = Card(**entry)
    return cards


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def find_card(name: str, catalogue: dict[str, Card]) -> Card | None:
    """The card called `name` or one of its aliases (case, spaces and dashes ignored), or None."""
    wanted = _key(name)
    for card in catalogue.values():
        if wanted in {_key(card.name), *(_key(a) for a in card.aliases)}:
            return card
    return None


def unknown_card_message(name: str, catalogue: dict[str, Card]) -> str:
    return (f"unknown GPU {name!r}; known: {', '.join(catalogue)} (add yours to a catalogue file: "
            f"resources.gpu_catalogue or {CATALOGUE_ENV}; or give --gpu-memory-gib, the card's total)")


def card_in_hand() -> Card | None:
    """The catalogued card this process sees as GPU 0 (NVML, so no CUDA context), or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
    except Exception:
        return None
    return find_card(name if isinstance(name, str) else name.decode(), load_catalogue())


def custom_card(total_gib: float) -> Card:
    """A card known only by its total (`--gpu-memory-gib`): no capability checks, the measured
    outside-allocator bytes of the catalogue's reference card."""
    return Card(name=f"{total_gib:g} GiB card", memory_total_mib=round(total_gib * GIB / MIB), compute_capability=99.0)


@dataclass(frozen=True)
class Fit:
    """A job's predicted whole process against one card."""

    card: str
    total_gib: float              # memory.total, as the driver reports it
    allocator_gib: float          # the allocator's predicted peak (reserved)
    outside_gib: float            # CUDA context, workspaces, kernels: outside the allocator
    outside_source: str
    reserved_gib: float           # what the driver holds back (where measured)
    margin_gib: float             # kept free
    cannot_run: str | None = None
    not_included: str | None = None  # what the whole process may hold beyond this (unmeasured)

    @property
    def device_gib(self) -> float:
        """The whole process on the card, as nvidia-smi shows it."""
        return self.allocator_gib + self.outside_gib

    @property
    def headroom_gib(self) -> float:
        """What is left on the card after the whole process, its reserve and the margin (negative: over)."""
        return self.total_gib - self.reserved_gib - self.device_gib - self.margin_gib

    @property
    def fits(self) -> bool:
        return self.cannot_run is None and self.headroom_gib >= 0

    def to_dict(self) -> dict:
        return {"gpu": self.card, "card_total_gib": self.total_gib, "peak_reserved_gib": self.allocator_gib,
                "outside_allocator_gib": self.outside_gib, "outside_allocator_source": self.outside_source,
                "device_gib": self.device_gib, "margin_gib": self.margin_gib, "headroom_gib": self.headroom_gib,
                "fits": self.fits, "cannot_run": self.cannot_run, "not_included": self.not_included}

    def line(self) -> str:
        verdict = "fits" if self.fits else "does NOT fit"
        if self.cannot_run:
            return f"{self.card}: cannot run this job: {self.cannot_run}"
        return (f"{self.card} ({self.total_gib:.2f} GiB as the driver reports it): {verdict}; whole process "
                f"{self.device_gib:.2f} GiB (allocator {self.allocator_gib:.2f} + {self.outside_gib:.2f} outside it, "
                f"{self.outside_source}), {self.headroom_gib:+.2f} GiB left after a {self.margin_gib:.2f} GiB margin"
                + (f"; not included: {self.not_included}" if self.not_included else ""))


# Several workers: NCCL's communicator buffers and streams live outside the allocator too. Not measured: no
# multi-GPU machine has been lent to this project since the card catalogue exists (issue 23).
NCCL_UNMEASURED = ("NCCL's buffers for {n} workers (outside the allocator, not yet measured: "
                   "typically a few hundred MiB per GPU)")


def fit_on(card: Card, catalogue: dict[str, Card], peak_reserved_gib: float, dtype: str | None = None,
           quantization: str | None = None, margin_gib: float = DEFAULT_MARGIN_GIB, workers: int = 1) -> Fit:
    outside, source = outside_allocator_gib(card, catalogue)
    return Fit(card.name, card.total_gib, peak_reserved_gib, outside, source, (card.reserved_mib or 0) * MIB / GIB,
               margin_gib, card.can_run(dtype, quantization) if dtype and quantization else None,
               NCCL_UNMEASURED.format(n=workers) if workers > 1 else None)
