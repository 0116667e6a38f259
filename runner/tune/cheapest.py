"""`fitrun tune --gpus L4,A10G,H100 [--prices prices.yaml]`: the cheapest card x config by $ per 1M trained tokens.

For each named card: the search space's configs that fit it (the memory estimate against the card's whole
process, `runner.cards.fit_on`; configs the card cannot run are out), the fastest of them by the step-time model
on that card (the card in hand's calibration, refitted by the search's probes, scaled by the catalogue), and its
cost at the card's hourly price. Where the search itself ran on that card under its full memory, the measured
winner stands instead, and the table says which numbers are measured and which predicted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from runner.cards import Card, find_card, fit_on, unknown_card_message
from runner.estimate import speed
from runner.spec import SpecError
from runner.tune.search import Config, apply_config


def parse_cards(names: str, catalogue: dict[str, Card]) -> list[Card]:
    cards = []
    for name in (n.strip() for n in names.split(",")):
        if not name:
            continue
        card = find_card(name, catalogue)
        if card is None:
            raise SpecError("--gpus", [unknown_card_message(name, catalogue)])
        cards.append(card)
    if not cards:
        raise SpecError("--gpus", ["name at least one card: --gpus L4,A10G,H100"])
    return cards


def load_prices(path: str | None, cards: list[Card], catalogue: dict[str, Card]) -> dict[str, float]:
    """$/hour per card: the catalogue's typical price, overridden by `path` (YAML: `NAME: price`)."""
    given: dict[str, float] = {}
    if path:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise SpecError(path, ["prices: a mapping of card name to $ per hour, e.g. `L4: 0.80`"])
        for name, price in raw.items():
            card = find_card(str(name), catalogue)
            if card is None:
                raise SpecError(path, [unknown_card_message(str(name), catalogue)])
            if not isinstance(price, (int, float)) or price <= 0:
                raise SpecError(path, [f"{name}: price must be a positive number of $ per hour, got {price!r}"])
            given[card.name] = float(price)
    prices = {}
    for card in cards:
        price = given.get(card.name, card.price_usd_hour)
        if price is None:
            raise SpecError("--prices", [f"no price for the {card.name} in the catalogue: give it in a prices file"])
        prices[card.name] = price
    return prices


def rank_cards(job, space, configs: list[Config], estimates: dict[str, Any], cards: list[Card],
               catalogue: dict[str, Card], prices: dict[str, float], reference: speed.Calibration | None,
               measured: dict[str, dict] | None = None) -> list[dict]:
    """One row per card, cheapest first: its fastest fitting config, tokens/s (measured or predicted), $/1M
    tokens. `measured`: card name -> {"config": Config, "tokens_per_s": ...} where the search measured it."""
    measured = measured or {}
    specs = {c.key: apply_config(job, c, space.lora_alpha_rule) for c in configs if c.key in estimates}
    rows = []
    for card in cards:
        row: dict[str, Any] = {"gpu": card.name, "usd_per_hour": prices[card.name]}
        if card.name in measured:
            m = measured[card.name]
            row.update(config=m["config"].key, tokens_per_s=m["tokens_per_s"], source="measured")
        else:
            best = _fastest_predicted(specs, estimates, card, catalogue, reference)
            if best is None:
                row.update(config=None, tokens_per_s=None, source="nothing in the space fits or runs on this card")
            else:
                row.update(best)
        if row.get("tokens_per_s"):
            row["usd_per_1m_tokens"] = prices[card.name] / (row["tokens_per_s"] * 3600) * 1e6
        rows.append(row)
    return sorted(rows, key=lambda r: r.get("usd_per_1m_tokens") or float("inf"))


def _fastest_predicted(specs: dict, estimates: dict, card: Card, catalogue, reference) -> dict | None:
    measured_on = find_card(reference.card, catalogue) if reference else None
    if reference is None or measured_on is None:
        return None
    try:
        cal = speed.for_card(reference, measured_on, card)
    except ValueError:
        return None
    best = None
    for key, spec in specs.items():
        est = estimates[key]
        fit = fit_on(card, catalogue, est.peak_reserved_gib, spec.compute_dtype, spec.model.quantization,
                     workers=spec.resources.num_workers)
        if not fit.fits or speed.unmodelled(spec) is not None:
            continue
        try:
            p = speed.predict(est, spec, cal)
        except ValueError:
            continue
        if best is None or p.tokens_per_s > best["tokens_per_s"]:
            best = {"config": key, "tokens_per_s": p.tokens_per_s, "device_gib": fit.device_gib,
                    "source": f"predicted ({cal.source})", "dominant": p.dominant}
    return best


def table(rows: list[dict]) -> str:
    lines = ["| card | config | tokens/s | $/hour | $ per 1M tokens | source |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        usd = f"{r['usd_per_1m_tokens']:.3f}" if r.get("usd_per_1m_tokens") else "-"
        lines.append(f"| {r['gpu']} | {r.get('config') or '-'} | {tps} | {r['usd_per_hour']:.2f} | {usd} | {r['source']} |")
    return "\n".join(lines)
