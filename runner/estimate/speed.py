"""Predict training speed (tokens/s) from the estimate's trace and the card's measured rates.

The trace (`runner.estimate.trace`) already counts one micro-batch's work at full depth, recompute included:
the compute-bound matmuls' and attention's FLOPs, the bytes every other kernel moves, the kernels an eager step
launches, and the frozen linears' shape. A `Calibration` prices that work on one card:

- the frozen linears, per kind (bf16, fp8, nf4, int8; eager or compiled): seconds per use as `a * weights +
  b * FLOPs`, from a microbenchmark of one decoder layer's seven linears as fitrun builds them (forward, and
  forward + input gradient) at three token counts (a least-squares line);
- attention: FlashAttention's FLOP rate (forward + backward, causal) at two sequence lengths, log-interpolated;
- a bandwidth-bound op's GB/s and an eager kernel launch's host time;
- per-term coefficients (`PRIORS`), refitted to measured configs (`refit`): what eager elementwise kernels
  and compiled fusion really cost is learned from the card, not assumed.

A micro-batch's time is the sum of its terms, except that the host launching kernels and the GPU running the
small (bandwidth-bound) ones overlap: those two combine as a p-norm (`OVERLAP_P`), between their larger and
their sum. A step's is `accumulation x micro-batch + optimizer + overhead`,
which is how the worker times it (`micro_batch_time_s`, `optimizer_time_s`). `calibrate` runs in seconds and is
cached per card, torch version and model shape; a catalogued card not in hand is predicted from a stored
calibration scaled by the two cards' datasheet figures (`for_card`), and says so.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from runner.cards import Card

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "calibrations"
CACHE_ENV = "FITRUN_CACHE_DIR"
TERMS = ("matmul", "attention", "recompute", "memory", "launch", "optimizer", "overhead")
"""overhead: the host's per-step and per-micro-batch work (the loop, copies to the device, the scheduler)."""
# Coefficients per term before any measured config refits them (1: the microbenchmark's rate as it is).
# Compiled layers fuse most elementwise kernels and launch far fewer: first guesses, refitted on the card.
PRIORS = {"matmul": 1.0, "attention": 1.0, "memory_eager": 1.0, "memory_compiled": 0.4, "launch_eager": 1.0,
          "launch_compiled": 0.15, "optimizer": 1.0, "overhead_s": 0.005, "micro_overhead_s": 0.001}
OVERLAP_P = 3
"""How the host's launch time and the small kernels' GPU time combine: (memory^p + launch^p)^(1/p). An eager step
launches the next kernel while the GPU runs this one, so neither adds in full; p = 3 fitted the H200's eager
configs best of sum, max and p = 2..4 (bench/results/predict-2026-12-07.md: chosen after that run, so its
held-out numbers for this form are not a test; the next card's run is)."""
LINEAR_TOKENS = (1024, 2048, 4096)  # token counts the frozen-linear microbenchmark runs at (a line through them:
# two points split each use's time into per-weight and per-FLOP parts noisily, and datasheet scaling weights
# the two parts differently; 2,048 is also where micro-batch 1 at seq 2048 runs)
ATTENTION_SEQ = (1024, 4096)   # sequence lengths of the attention microbenchmark
OPTIMIZER_BYTES_PER_BYTE = 8   # fused AdamW + clipping: read p, g, m, v, write p, m, v, read g for the norm


@dataclass
class Calibration:
    """Measured rates of one card (or a datasheet-scaled copy of another's), for one model shape."""

    card: str
    torch: str
    source: str                                   # "measured on <card>" or "datasheet-scaled from <card>"
    shape: dict[str, int]                         # hidden, intermediate, heads, kv_heads, head_dim
    linear: dict[str, dict[str, list[float]]]     # kind -> {"forward": [s/weight, s/FLOP], "backward": [...]}
    attention_tflops: dict[str, float]            # str(seq) -> forward + backward TFLOP/s (causal FLOPs)
    bandwidth_gbs: float
    launch_us: float
    coefficients: dict[str, float] = field(default_factory=lambda: dict(PRIORS))
    observations: list[dict] = field(default_factory=list)  # measured configs the coefficients were fitted to
    error_pct: float | None = None                # the largest |error| over `observations` after the fit
    fp8_fast_accum: str | None = None             # FITRUN_FP8_FAST_ACCUM when measured (the fp8 kinds' rates)
    prior: dict[str, float] | None = None         # what `refit` starts from and pulls toward (None: PRIORS)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Calibration":
        return cls(**json.loads(text))

    def attention_rate(self, seq: int) -> float:
        """FLOP/s of attention at sequence length `seq` (log-linear between the measured lengths, flat outside)."""
        points = sorted((int(s), r) for s, r in self.attention_tflops.items())
        if seq <= points[0][0]:
            return points[0][1] * 1e12
        for (s0, r0), (s1, r1) in zip(points, points[1:]):
            if seq <= s1:
                w = math.log(seq / s0) / math.log(s1 / s0)
                return (r0 + w * (r1 - r0)) * 1e12
        return points[-1][1] * 1e12


@dataclass
class Prediction:
    tokens_per_s: float
    step_s: float
    terms_s: dict[str, float]      # seconds per optimizer step, by `TERMS`
    source: str
    error_pct: float | None

    @property
    def dominant(self) -> str:
        return max(self.terms_s, key=self.terms_s.get)

    def to_dict(self) -> dict:
        return {**asdict(self), "dominant": self.dominant}

    def line(self, card: str) -> str:
        band = f"±{self.error_pct:.0f}% (the model's largest error over its measured configs)" \
            if self.error_pct is not None else "error band unknown: no measured config refitted this calibration"
        if self.source.startswith("datasheet-scaled"):
            band += (", plus the datasheet scaling's (H200 to H100, measured: median 9%, max 27%; between other "
                     "cards not measured)")
        total = sum(self.terms_s.values()) or 1.0
        shares = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(self.terms_s.items(), key=lambda kv: -kv[1])
                           if v / total >= 0.01)
        return (f"speed on {card}: ~{self.tokens_per_s:,.0f} tokens/s predicted, {band}; {self.source}\n"
                f"step time by term: {shares} (dominant: {self.dominant})")


def unmodelled(spec) -> str | None:
    """Why the step-time model does not predict this lever combination, or None. It prices what it was built
    and checked for: full recompute, no offload, the eager kernels (Liger's fused ones are not calibrated), one
    worker (gradient communication is not in it)."""
    ac = spec.activation_checkpointing
    if ac.policy != "full" or ac.offload or spec.training.kernels != "eager":
        return "selective recompute, offload and Liger kernels are not in the step-time model"
    if spec.resources.num_workers > 1:
        return "several workers (gradient communication) are not in the step-time model"
    return None


def linear_kind(spec) -> str:
    """Which frozen-linear rate a job's base uses."""
    q = spec.model.quantization
    kind = {"none": {"bfloat16": "bf16", "float16": "fp16"}.get(spec.compute_dtype, "fp32")}.get(q, q)
    return f"{kind}-compile" if spec.training.compile and kind in ("bf16", "fp16", "fp8") else kind


def _work_seconds(est, spec, cal: Calibration) -> dict[str, float]:
    """Seconds per optimizer step of each priced part of the work, before the coefficients: per micro-batch
    for matmul, recompute (its matmul and attention parts), attention, memory, launch; per step for optimizer."""
    w = est.work
    if not w:
        raise ValueError("this estimate has no work counts (an old estimate?): re-run the estimate")
    kind = linear_kind(spec)
    if kind not in cal.linear:
        raise ValueError(f"no {kind} frozen-linear rate in the calibration of {cal.card} ({cal.source}): "
                         f"calibrated kinds: {', '.join(cal.linear)}")
    tokens, layers = est.tokens, w["num_layers"]
    k = est.num_checkpointed_layers
    weights = w["layer_linear_weights"]
    (fa, fb), (ba, bb) = cal.linear[kind]["forward"], cal.linear[kind]["backward"]
    use_fwd = fa * weights + fb * 2 * tokens * weights
    use_bwd = ba * weights + bb * 2 * tokens * weights
    dense = "bf16" if "bf16" in cal.linear else next(iter(cal.linear))
    head_rate = cal.linear[dense]["forward"][1]
    frozen_flops = 2 * tokens * weights * (2 * layers + k)
    head_flops = 2 * 2 * tokens * w["head_weights"]
    other_gemm = max(0.0, w["gemm_flops"] - frozen_flops - head_flops) * head_rate
    attention = w["attention_flops"] / cal.attention_rate(spec.data.sequence_len)
    # attention FLOPs = layers x (forward + 2.5 forward in backward) + k recomputed forwards
    attention_recompute = attention * k / (3.5 * layers + k)
    lora_bytes = est.components_gib.get("lora_params", 0.0) * 1024**3
    return {
        "matmul": layers * (use_fwd + use_bwd) + head_flops * head_rate + other_gemm,
        "recompute_matmul": k * use_fwd,
        "recompute_attention": attention_recompute,
        "attention": attention - attention_recompute,
        "memory": w["memory_bytes"] / (cal.bandwidth_gbs * 1e9),
        "launch": w["ops"] * cal.launch_us * 1e-6,
        "optimizer": OPTIMIZER_BYTES_PER_BYTE * lora_bytes / (cal.bandwidth_gbs * 1e9),
    }


def terms(est, spec, cal: Calibration) -> dict[str, float]:
    """Seconds per optimizer step of the job `spec` with estimate `est`, by term, coefficients applied."""
    return _step_terms(cal.coefficients, _work_seconds(est, spec, cal), spec.training.gradient_accumulation_steps,
                       spec.training.compile)


def _step_terms(c: dict[str, float], raw: dict[str, float], accum: int, compiled: bool) -> dict[str, float]:
    """`terms` from the priced work (`_work_seconds`) and coefficients `c`: the small kernels' memory time and
    the launches overlap (`OVERLAP_P`), their combined time shared out in proportion to their p-th powers."""
    mode = "compiled" if compiled else "eager"
    memory, launch = c[f"memory_{mode}"] * raw["memory"], c[f"launch_{mode}"] * raw["launch"]
    powers = memory**OVERLAP_P + launch**OVERLAP_P
    both = powers ** (1 / OVERLAP_P)
    micro = {
        "matmul": c["matmul"] * raw["matmul"],
        "recompute": c["matmul"] * raw["recompute_matmul"] + c["attention"] * raw["recompute_attention"],
        "attention": c["attention"] * raw["attention"],
        "memory": both * memory**OVERLAP_P / powers if powers else 0.0,
        "launch": both * launch**OVERLAP_P / powers if powers else 0.0,
    }
    step = {name: accum * v for name, v in micro.items()}
    step["optimizer"] = c["optimizer"] * raw["optimizer"]
    step["overhead"] = c["overhead_s"] + accum * c["micro_overhead_s"]
    return step


def predict(est, spec, cal: Calibration) -> Prediction:
    """Tokens/s of one optimizer step of `spec` (every worker alike: one worker's tokens/s times workers)."""
    step = terms(est, spec, cal)
    step_s = sum(step.values())
    tokens = est.tokens * spec.training.gradient_accumulation_steps * spec.resources.num_workers
    return Prediction(tokens / step_s, step_s, step, cal.source, cal.error_pct)


# ---- refitting the coefficients to measured configs ------------------------------------------------------------

ROBUST_ROUNDS = 8
"""`refit` reweights each observation by 1 / max(|its error|, 1%) (the best-fitted one at 1) this many times
(iteratively reweighted least squares toward the least absolute error): one config measured on a noisy step (a
host hiccup, a 30% spread between its micro-batches) no longer tilts every coefficient. Against plain least
squares on the two cards' runs (`bench/results/predict-2026-12-07.md`, chosen after both: not a test) the
held-out median fell from 5.1 to 3.1% (H200) and 7.3 to 3.4% (H100); the largest single miss, a noisy eager
config, grew."""


def refit(cal: Calibration, observations: list[dict], strength: float = 0.3) -> Calibration:
    """The calibration with its coefficients fitted to `observations` (`observation`'s): the least absolute
    relative error of the step time (`ROBUST_ROUNDS` of reweighted least squares), pulled toward the
    calibration's `prior` (else `PRIORS`: a coefficient no observation informs stays there), each round by
    Gauss-Newton with damping (the step is linear in every coefficient but the overlapping memory and launch
    ones), coefficients kept >= 0.
    `error_pct` is the fit's largest |error| over the observations."""
    observations = [o for o in observations if "work_s" in o]  # (a calibration stored before this form: refit anew)
    if not observations:
        return cal
    weights = [1.0] * len(observations)
    prior = cal.prior or PRIORS
    for _ in range(ROBUST_ROUNDS):
        coef = _least_squares(observations, weights, strength, prior)
        errors = [abs(_step_s(coef, o) / o["step_s"] - 1) for o in observations]
        least = max(min(errors), 0.01)  # the best-fitted observation keeps weight 1 against the priors' pull
        weights = [least / max(e, 0.01) for e in errors]
    fitted = replace(cal, coefficients=coef, observations=list(observations))
    fitted.error_pct = 100 * max(errors)
    return fitted


def _step_s(c: dict[str, float], o: dict) -> float:
    return sum(_step_terms(c, o["work_s"], o["accum"], o["compiled"]).values())


def _least_squares(observations: list[dict], weights: list[float], strength: float,
                   prior: dict[str, float]) -> dict[str, float]:
    """Coefficients minimising the weighted squared relative errors plus the pull toward `prior`."""
    import numpy as np

    names = list(PRIORS)
    # (a coefficient a fit drove to 0 pulls toward a hundredth of its default instead)
    p = np.maximum(np.array([prior.get(n, PRIORS[n]) for n in names]), 0.01 * np.array([PRIORS[n] for n in names]))
    root_w = np.sqrt(np.array(weights))

    def residuals(x: np.ndarray) -> np.ndarray:
        c = dict(zip(names, x))
        fit = root_w * np.array([_step_s(c, o) / o["step_s"] - 1 for o in observations])
        return np.concatenate([fit, strength * (x / p - 1)])

    x = p.copy()
    damping = 1e-3
    for _ in range(100):
        r = residuals(x)
        h = 1e-6 * np.maximum(np.abs(x), p)
        jac = np.stack([(residuals(x + h[i] * np.eye(len(x))[i]) - r) / h[i] for i in range(len(x))], axis=1)
        step = np.linalg.solve(jac.T @ jac + damping * np.diag(np.diag(jac.T @ jac) + 1e-12), -jac.T @ r)
        trial = np.maximum(x + step, 0.0)
        if (residuals(trial) ** 2).sum() < (r**2).sum():
            x, damping = trial, damping / 10
            if np.abs(step).max() < 1e-10 * max(1.0, np.abs(x).max()):
                break
        else:
            damping *= 10
            if damping > 1e8:
                break
    return {n: float(v) for n, v in zip(names, x)}


def observation(est, spec, cal: Calibration, tokens_per_s: float, name: str = "") -> dict:
    """A measured config as `refit` takes it: tokens/s as the worker reports it (the true accumulation)."""
    tokens = est.tokens * spec.training.gradient_accumulation_steps * spec.resources.num_workers
    return {"name": name, "work_s": _work_seconds(est, spec, cal), "accum": spec.training.gradient_accumulation_steps,
            "compiled": spec.training.compile, "step_s": tokens / tokens_per_s, "tokens_per_s": tokens_per_s}


# ---- other cards: datasheet-scaled -----------------------------------------------------------------------------

def for_card(cal: Calibration, measured_on: Card, card: Card) -> Calibration:
    """`cal` (measured on `measured_on`) scaled to `card` by their datasheet figures: tensor-core rates by the
    dtype's TFLOP/s ratio, per-weight (dequantize) and bandwidth terms by the bandwidth ratio, attention by the
    bf16 ratio; host-side launch time and the coefficients unchanged."""
    if card.name == measured_on.name:
        return cal

    def ratio(attr: str) -> float:
        a, b = getattr(card, attr), getattr(measured_on, attr)
        if not a or not b:
            raise ValueError(f"no {attr} for the {card.name if not a else measured_on.name} in the catalogue: "
                             "cannot scale the calibration")
        return a / b

    dense = "fp16_tflops" if card.bf16_tflops is None else "bf16_tflops"
    bw = ratio("bandwidth_gbs")
    linear = {}
    for kind, rates in cal.linear.items():
        flops_attr = "fp8_tflops" if kind.startswith("fp8") else dense
        if kind.startswith("fp8") and not card.fp8_tflops:
            continue
        r = ratio(flops_attr)
        if card.bf16_tflops is None:  # no bf16 on this card: its jobs compute in fp16, at the fp16 rate
            kind = kind.replace("bf16", "fp16")
        linear[kind] = {d: [a / bw, b / r] for d, (a, b) in rates.items()}
    att = ratio(dense)
    return replace(cal, card=card.name, source=f"datasheet-scaled from {cal.card} ({cal.source})", linear=linear,
                   attention_tflops={s: v * att for s, v in cal.attention_tflops.items()},
                   bandwidth_gbs=cal.bandwidth_gbs * bw)


# ---- the microbenchmark ----------------------------------------------------------------------------------------

def shape_of(config) -> dict[str, int]:
    heads = config.num_attention_heads
    return {"hidden": config.hidden_size, "intermediate": config.intermediate_size, "heads": heads,
            "kv_heads": getattr(config, "num_key_value_heads", heads),
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads}


class _LayerLinears(torch.nn.Module):
    """One decoder layer's seven frozen linears, chained as the layer chains them (no compiler can drop one)."""

    def __init__(self, shape: dict[str, int], dtype: torch.dtype, device: torch.device):
        super().__init__()
        h, i, q, kv = shape["hidden"], shape["intermediate"], shape["heads"] * shape["head_dim"], \
            shape["kv_heads"] * shape["head_dim"]
        dims = {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h), "gate": (h, i), "up": (h, i), "down": (i, h)}
        self.proj = torch.nn.ModuleDict({n: torch.nn.Linear(a, b, bias=False, device=device, dtype=dtype)
                                         for n, (a, b) in dims.items()})
        self.requires_grad_(False)
        self.rep = q // kv

    def forward(self, x):
        p = self.proj
        attn = p["o"](p["q"](x) + (p["k"](x) + p["v"](x)).repeat(1, self.rep))
        return p["down"](torch.nn.functional.silu(p["gate"](x)) * p["up"](x)) + attn

    @staticmethod
    def weights_of(shape: dict[str, int]) -> int:
        h, i = shape["hidden"], shape["intermediate"]
        q, kv = shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
        return 2 * h * q + 2 * h * kv + 3 * h * i


def _timer(device: torch.device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def measure(fn, repeat: int) -> float:
        fn()
        fn()
        sync()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        sync()
        return (time.perf_counter() - start) / repeat
    return measure


def _linear_module(kind: str, shape: dict[str, int], dtype: torch.dtype, device: torch.device):
    from runner.quant import Fp8Linear, bnb_linear

    m = _LayerLinears(shape, dtype, device)
    base = kind.removesuffix("-compile")
    if base == "fp8":
        for n, lin in list(m.proj.items()):
            m.proj[n] = Fp8Linear(lin)
    elif base in ("nf4", "int8"):
        for n, lin in list(m.proj.items()):
            m.proj[n] = bnb_linear(lin, base, dtype, device)
    if kind.endswith("-compile"):
        m.forward = torch.compile(m.forward)
    return m


def _bench_linear(kind: str, shape: dict[str, int], dtype: torch.dtype, device: torch.device,
                  tokens: tuple[int, ...], repeat: int) -> dict[str, list[float]]:
    measure = _timer(device)
    m = _linear_module(kind, shape, dtype, device)
    weights = _LayerLinears.weights_of(shape)
    fwd, fb = [], []
    for n in tokens:
        x = torch.randn(n, shape["hidden"], device=device, dtype=dtype, requires_grad=True)
        with torch.no_grad():
            fwd.append(measure(lambda: m(x), repeat))
        fb.append(measure(lambda: m(x).sum().backward(), repeat))
        x.grad = None
    out = {}
    for name, times in (("forward", fwd), ("backward", [b - f for b, f in zip(fb, fwd)])):
        per_token, fixed = _line(tokens, times)
        out[name] = [fixed / weights, per_token / (2 * weights)]
    return out


def _line(xs: tuple[int, ...], ys: list[float]) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line through the points, both kept >= 0 (a time)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs))
    return slope, max(0.0, my - slope * mx)


def _bench_attention(shape: dict[str, int], dtype: torch.dtype, device: torch.device, seqs: tuple[int, ...],
                     tokens: int, repeat: int) -> dict[str, float]:
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    measure = _timer(device)
    out = {}
    for s in seqs:
        b = max(1, tokens // s)
        q = torch.randn(b, shape["heads"], s, shape["head_dim"], device=device, dtype=dtype, requires_grad=True)
        kv = [torch.randn(b, shape["kv_heads"], s, shape["head_dim"], device=device, dtype=dtype, requires_grad=True)
              for _ in range(2)]
        t = measure(lambda: sdpa(q, *kv, is_causal=True, enable_gqa=True).sum().backward(), repeat)
        flops = 4 * b * shape["heads"] * s * s * shape["head_dim"]  # QK^T and PV, forward, full square
        out[str(s)] = flops * (0.5 + 1.25) / t / 1e12  # causal forward + backward, as the trace counts them
    return out


def _bench_bandwidth(dtype: torch.dtype, device: torch.device, repeat: int) -> float:
    n = (1 << 27) if device.type == "cuda" else (1 << 23)
    x = torch.empty(n, device=device, dtype=dtype)
    y = torch.empty_like(x)
    t = _timer(device)(lambda: torch.mul(x, 2, out=y), repeat)
    return 2 * n * x.element_size() / t / 1e9


def _bench_launch(device: torch.device) -> float:
    """Host time per kernel of a chain of tiny autograd-recorded ops, forward and backward: what an eager step
    pays per kernel when the GPU work per kernel is shorter than the launch."""
    x = torch.zeros(8, device=device, requires_grad=True)

    def chain():
        y = x
        for _ in range(100):
            y = y * 1.0001
        y.sum().backward()
    return _timer(device)(chain, 5) / 200 * 1e6


def available_kinds(device: torch.device, dtype: torch.dtype) -> list[str]:
    dense = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    if device.type != "cuda":
        return [dense]
    kinds = [dense, f"{dense}-compile"]
    if torch.cuda.get_device_capability(device) >= (8, 9):
        kinds += ["fp8", "fp8-compile"]
    try:
        import bitsandbytes  # noqa: F401

        kinds += ["nf4", "int8"]
    except Exception:
        pass
    return kinds


def calibrate(config, device: torch.device, dtype: torch.dtype, kinds: list[str] | None = None,
              card: str | None = None) -> Calibration:
    """Measure this device's rates for a model of `config`'s shape: seconds on a GPU (compile included)."""
    shape = shape_of(config)
    cuda = device.type == "cuda"
    repeat = 10 if cuda else 3
    tokens = LINEAR_TOKENS if cuda else (64, 256)  # a CPU: the tiny models it trains
    linear = {kind: _bench_linear(kind, shape, dtype, device, tokens, repeat)
              for kind in (kinds or available_kinds(device, dtype))}
    seqs = ATTENTION_SEQ if cuda else (64, 256)
    attention = _bench_attention(shape, dtype, device, seqs, max(tokens), repeat)
    name = card or (torch.cuda.get_device_name(device) if cuda else "CPU")
    from runner.quant import FAST_ACCUM_MODE

    cal = Calibration(card=name, torch=torch.__version__, source=f"measured on {name}", shape=shape, linear=linear,
                      attention_tflops=attention, bandwidth_gbs=_bench_bandwidth(dtype, device, repeat),
                      launch_us=_bench_launch(device), fp8_fast_accum=FAST_ACCUM_MODE)
    if cuda:
        torch.cuda.empty_cache()
    return cal


# ---- where calibrations live -----------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in ".-" else "-" for ch in text)


def cache_path(card: str, shape: dict[str, int]) -> Path:
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fitrun") / "calibration"
    dims = "-".join(str(shape[k]) for k in ("hidden", "intermediate", "heads", "kv_heads", "head_dim"))
    from runner.quant import FAST_ACCUM_MODE  # the fp8 kinds' rates depend on it

    return root / f"{_slug(card)}-torch{_slug(torch.__version__)}-{dims}-fp8acc-{FAST_ACCUM_MODE}.json"


def cached(card: str, shape: dict[str, int]) -> Calibration | None:
    path = cache_path(card, shape)
    return Calibration.from_json(path.read_text()) if path.is_file() else None


def store(cal: Calibration) -> Path:
    path = cache_path(cal.card, cal.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(cal.to_json())
    tmp.replace(path)
    return path


def shipped() -> list[Calibration]:
    """Calibrations measured on the device and shipped in the package (runner/calibrations/*.json)."""
    return [Calibration.from_json(p.read_text()) for p in sorted(SHIPPED_DIR.glob("*.json"))]


def _reference(shape: dict[str, int], card: Card | None, catalogue: dict[str, Card]) -> Calibration | None:
    """The shipped calibration to predict `card` from: its own where one was measured on it (no datasheet
    scaling), else the one with the smallest measured error band; a model of this shape first (rates per FLOP,
    weight and byte carry over between shapes roughly). None where none is shipped."""
    from runner.cards import find_card

    ships = sorted(shipped(), key=lambda c: (c.shape != shape, c.error_pct if c.error_pct is not None else 1e9))
    own = [c for c in ships if card is not None and find_card(c.card, catalogue) == card]
    return (own or ships or [None])[0]


def shipped_for(card: Card, shape: dict[str, int], kinds: list[str], catalogue: dict[str, Card]) -> Calibration | None:
    """A shipped calibration measured on this card with this torch, model shape and fp8 accumulation mode that
    has every kind asked for, as this machine's cached one (stored): a fresh machine skips the microbenchmark
    and starts from coefficients fitted to that run's configs. None where none matches."""
    from runner.cards import find_card
    from runner.quant import FAST_ACCUM_MODE

    for c in shipped():
        if (find_card(c.card, catalogue) == card and c.torch == torch.__version__ and c.shape == shape
                and c.fp8_fast_accum == FAST_ACCUM_MODE and all(k in c.linear for k in kinds)):
            # Its fitted coefficients become this machine's prior; its observations (another host's) and their
            # error band stay behind: this machine's own measurements refit it and set its margin.
            return _stored(replace(c, card=card.name, source=f"shipped with fitrun: {c.source}",
                                   prior=dict(c.coefficients), observations=[], error_pct=None))
    return None


def calibration_for(job, card: Card | None, catalogue: dict[str, Card], kinds: set[str] = frozenset()) -> Calibration:
    """The calibration that predicts `job` on `card` (default: the job's own device): on a CPU job, this CPU's
    (measured once, cached); with a catalogued GPU in hand, its own (measured once per torch version and model
    shape, cached, refitted by `fitrun tune`'s measurements), scaled to `card` if that is another; else the
    calibration shipped with fitrun, scaled to `card`. ValueError, saying why, where none applies.
    On the card in hand only the frozen-linear kinds asked for (the job's and `kinds`) are benchmarked, each
    once: a kind takes seconds, most of them compiling."""
    from runner.cards import card_in_hand, find_card
    from runner.model import model_config, resolve_dtype

    config = model_config(job.model, allow_builtin=True)
    shape = shape_of(config)
    if not job.resources.use_gpu:
        return cached("CPU", shape) or _stored(calibrate(config, torch.device("cpu"), resolve_dtype(job.model, "cpu"),
                                                         card="CPU"))
    in_hand = card_in_hand() if torch.cuda.is_available() else None
    if in_hand is not None:
        measured_on = in_hand
        dtype = resolve_dtype(job.model, "cuda")
        dense = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
        needed = sorted({linear_kind(job), dense, *kinds} & set(available_kinds(torch.device("cuda"), dtype)))
        cal = cached(in_hand.name, shape) or shipped_for(in_hand, shape, needed, catalogue)
        if cal is None:
            cal = _stored(calibrate(config, torch.device("cuda"), dtype, kinds=needed, card=in_hand.name))
        elif missing := [k for k in needed if k not in cal.linear]:
            device = torch.device("cuda")
            cal.linear.update({k: _bench_linear(k, shape, dtype, device, LINEAR_TOKENS, 10) for k in missing})
            _stored(cal)
    else:
        cal = _reference(shape, card, catalogue)
        measured_on = find_card(cal.card, catalogue) if cal else None
        if measured_on is None:
            raise ValueError("no calibration: no catalogued GPU here and none shipped; run `fitrun estimate` on a "
                             "machine with one (it calibrates that card in seconds)")
    target = card or measured_on
    if target.compute_capability >= 99:  # --gpu-memory-gib: a card known only by its total
        raise ValueError("a card known only by its memory total has no datasheet figures to scale a calibration by: "
                         "name it (--gpu NAME; add it to a catalogue file)")
    return for_card(cal, measured_on, target)


def _stored(cal: Calibration) -> Calibration:
    store(cal)
    return cal


def predict_job(job, est, card: Card | None, catalogue: dict[str, Card]) -> tuple[Prediction | None, str]:
    """(the prediction, the card's name) for `fitrun estimate` and the tuner, or (None, why not)."""
    if reason := unmodelled(job):
        return None, reason
    try:
        cal = calibration_for(job, card, catalogue)
    except ValueError as e:
        return None, str(e)
    try:
        return predict(est, job, cal), cal.card
    except ValueError as e:
        return None, str(e)
