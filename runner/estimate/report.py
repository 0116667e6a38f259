"""`fitrun estimate`'s answers: the components table, a verdict against the user's real card (whole
process, not only the allocator), every catalogued card at once (`--cards`), a k sweep, and the
longest sequence that fits (`--max sequence_len`)."""

from __future__ import annotations

import json

from runner.cards import Card, Fit, fit_on
from runner.estimate.speed import predict_job
from runner.estimate.trace import Estimate, estimate, parse_sweep, sweep_k
from runner.model import model_config
from runner.spec import JobSpec, SpecError, job_card

SEQUENCE_STEP = 256  # `--max sequence_len` answers in multiples of this
MAX_SEQUENCE_LEN = 1 << 18


def format_table(est: Estimate, ceiling_gib: float | None) -> str:
    unit = "GiB (reserved on CUDA)" if est.target == "cuda" else "GiB (tensor bytes on CPU)"
    lines = [f"{'component':<24}{'GiB':>10}"]
    lines += [f"{k:<24}{v:>10.4g}" for k, v in est.components_gib.items()]
    lines.append(f"{'peak allocated':<24}{est.peak_allocated_gib:>10.4g}")
    lines.append(f"{'predicted peak':<24}{est.peak_gib:>10.4g}  {unit}")
    if ceiling_gib is not None:
        margin = ceiling_gib - est.peak_gib
        verdict = "fits" if margin >= 0 else "does NOT fit"
        lines.append(f"ceiling {ceiling_gib:.2f} GiB: {verdict} (margin {margin:+.2f} GiB)")
    if est.step_flops:
        lines.append(f"compute: {est.flops_per_token / 1e9:.2f} GFLOP per token position (matmuls and attention: "
                     "forward, backward and recompute)")
    if est.unmodelled:
        lines.append(f"note: not modelled to 3% for this lever combination: {est.unmodelled}; measure it "
                     "(`fitrun tune` measures such configs instead of pruning them by this estimate)")
    return "\n".join(lines)


def card_fit(job: JobSpec, est: Estimate, card: Card, catalogue: dict[str, Card]) -> Fit:
    return fit_on(card, catalogue, est.peak_reserved_gib, job.compute_dtype, job.model.quantization,
                  workers=job.resources.num_workers)


def with_sequence_len(job: JobSpec, sequence_len: int) -> JobSpec:
    return job.model_copy(update={"data": job.data.model_copy(update={"sequence_len": sequence_len})})


def longest_sequence(job: JobSpec, card: Card, catalogue: dict[str, Card]) -> tuple[int, Fit | None]:
    """The longest `data.sequence_len` (a multiple of SEQUENCE_STEP) at which the job, with its other
    levers as they are, fits `card`; (0, None) if not even SEQUENCE_STEP does. Doubling, then bisection:
    about a dozen estimates."""
    def fits(n: int) -> Fit | None:
        f = card_fit(job, estimate(with_sequence_len(job, n)), card, catalogue)
        return f if f.fits else None

    lo, best = 0, None
    hi = SEQUENCE_STEP
    while hi <= MAX_SEQUENCE_LEN and (f := fits(hi)):
        lo, best, hi = hi, f, hi * 2
    hi = min(hi, MAX_SEQUENCE_LEN + SEQUENCE_STEP)
    while hi - lo > SEQUENCE_STEP:
        mid = (lo + hi) // 2 // SEQUENCE_STEP * SEQUENCE_STEP
        if (f := fits(mid)):
            lo, best = mid, f
        else:
            hi = mid
    return lo, best


def cards_table(job: JobSpec, catalogue: dict[str, Card]) -> list[dict]:
    """Every catalogued card against the job: fits as it is?, its headroom, and where it does not, the
    fewest checkpointed layers that fit (the job's placement), or what else it needs."""
    num_layers = model_config(job.model, allow_builtin=True).num_hidden_layers
    swept = sweep_k(job, list(range(num_layers + 1)))
    own_k = len(_own_layers(job, num_layers))
    rows = []
    for card in catalogue.values():
        own = card_fit(job, swept[own_k], card, catalogue)
        row = {**own.to_dict(), "k": own_k, "needs": ""}
        if own.cannot_run:
            row["needs"] = own.cannot_run
        elif not own.fits:
            fitting = [k for k in range(own_k, num_layers + 1) if card_fit(job, swept[k], card, catalogue).fits]
            row["needs"] = (f"activation_checkpointing.count: {fitting[0]} (placement {job.activation_checkpointing.placement})"
                            if fitting else "more than recompute: a quantized base (nf4, or fp8 on 8.9+), a smaller "
                            "micro-batch or a shorter sequence_len")
        rows.append(row)
    return rows


def _own_layers(job: JobSpec, num_layers: int) -> list[int]:
    from runner.recompute import resolve_layers

    return resolve_layers(job.activation_checkpointing, num_layers)


def run_estimate_cli(job: JobSpec, total_gib: float | None, sweep: str | None, as_json: bool,
                     all_cards: bool = False, maximise: str | None = None) -> int:
    """`fitrun estimate`. Long on purpose: one branch per question the command answers, each printing
    a table or one JSON document."""
    card, catalogue = job_card(job, total_gib)  # --gpu NAME is resources.gpu; --gpu-memory-gib a card's total
    cap = job.resources.gpu_memory_gib  # an allocator cap, compared with the allocator's peak
    if card is not None and not job.resources.use_gpu:  # a CPU job: tensor bytes against the total, nothing outside
        cap, card = card.total_gib, None
    if maximise is not None and maximise != "sequence_len":
        raise SpecError("--max", [f"only sequence_len can be maximised, got {maximise!r}"])
    if (maximise or all_cards) and not job.resources.use_gpu:
        raise SpecError("estimate", ["--cards and --max judge GPU cards: the job needs resources.use_gpu: true"])
    if all_cards:
        rows = cards_table(job, catalogue)
        if as_json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{'card':<12}{'total GiB':>10}{'whole process':>15}{'left':>8}  fits  needs")
        for r in rows:
            print(f"{r['gpu']:<12}{r['card_total_gib']:>10.2f}{r['device_gib']:>15.2f}{r['headroom_gib']:>+8.2f}  "
                  f"{'yes ' if r['fits'] else 'no  '}  {r['needs']}")
        print(f"(k = {rows[0]['k']} checkpointed layers as the job has them; whole process = the allocator's predicted "
              f"peak + what lives outside it; left = after a {rows[0]['margin_gib']:.2f} GiB margin)")
        return 0
    if maximise:
        if card is None:
            raise SpecError("--max", ["name the card: --gpu NAME (or --gpu-memory-gib, its total)"])
        n, f = longest_sequence(job, card, catalogue)
        out = {"gpu": card.name, "max_sequence_len": n, **({"fit": f.to_dict()} if f else {})}
        print(json.dumps(out, indent=2) if as_json else
              f"longest data.sequence_len that fits the {card.name}: {n:,} tokens (micro-batch "
              f"{job.training.micro_batch_size}, the job's other levers)" + (f"\n{f.line()}" if f else ""))
        return 0
    if sweep:
        try:
            ks = parse_sweep(sweep)
        except ValueError as e:
            print(f"error: {e}")
            return 2
        results = sweep_k(job, ks)
        if as_json:
            print(json.dumps({k: {**e.to_dict(), **(card_fit(job, e, card, catalogue).to_dict() if card else {})}
                              for k, e in results.items()}, indent=2))
        else:
            print(f"{'k':>4}{'peak GiB':>10}" + (f"{'whole process':>15}  fits {card.name}" if card else
                                                  f"  fits {cap:g} GiB" if cap else ""))
            for k, e in results.items():
                f = card_fit(job, e, card, catalogue) if card else None
                print(f"{k:>4}{e.peak_gib:>10.4g}" + (f"{f.device_gib:>15.4g}  {'yes' if f.fits else 'no'}" if f else
                                                      f"  {'yes' if e.peak_gib <= cap else 'no'}" if cap else ""))
        return 0
    est = estimate(job)
    fit = card_fit(job, est, card, catalogue) if card else None
    speed, speed_on = predict_job(job, est, card, catalogue)
    if as_json:
        out = est.to_dict()
        if fit:
            out.update(fit.to_dict())
        elif cap is not None:
            out.update(ceiling_gib=cap, fits=est.peak_gib <= cap, margin_gib=cap - est.peak_gib)
        out.update(predicted_tokens_per_s=speed.tokens_per_s if speed else None,
                   speed={**speed.to_dict(), "card": speed_on} if speed else {"not_predicted": speed_on})
        print(json.dumps(out, indent=2))
    else:
        print(format_table(est, None if fit else cap))
        if fit:
            print(fit.line())
        print(speed.line(speed_on) if speed else f"speed: not predicted: {speed_on}")
    return 0
