"""The tuner's speed guide: the step-time model (`runner.estimate.speed`) over a search's grid.

It predicts every config's tokens/s on the card the probes run on (the card in hand, or this CPU), from the
estimates the memory prediction traced anyway; after each uncontended measurement it refits the calibration's
coefficients to everything measured so far (and stores it: `fitrun estimate` on this card then uses the fit and
its error band) and predicts again. `FitSearcher` uses the predictions to try the
fastest columns first and to skip columns that cannot beat the best measured speed.
"""

from __future__ import annotations

from typing import Any

from runner.estimate import speed
from runner.estimate.speed import unmodelled
from runner.spec import JobSpec, SearchSpaceSpec
from runner.tune.search import Config, apply_config

DEFAULT_ERROR = 0.10
"""The margin a prediction gets until measurements say more: bench/results/predict-*.md's held-out error."""
RECENT = 3
"""How many of the latest before-measurement misses bound the margin (older ones predate later refits)."""


class SpeedGuide:
    def __init__(self, job: JobSpec, space: SearchSpaceSpec, cal: speed.Calibration, estimates: dict[str, Any],
                 configs: list[Config]):
        self.cal, self.estimates = cal, estimates
        self.specs = {c.key: apply_config(job, c, space.lora_alpha_rule) for c in configs}
        self.specs = {k: s for k, s in self.specs.items() if k in estimates and unmodelled(s) is None}
        self.observations: list[dict] = list(cal.observations)
        self.misses: list[float] = []  # |prediction made before measuring / measured - 1|, in measuring order

    def predictions(self) -> dict[str, float]:
        out = {}
        for key, spec in self.specs.items():
            try:
                out[key] = speed.predict(self.estimates[key], spec, self.cal).tokens_per_s
            except ValueError:  # a kind this card's calibration lacks (int8 where bitsandbytes is missing)
                continue
        return out

    @property
    def error(self) -> float:
        """The relative margin a prediction gets: at least DEFAULT_ERROR, the model's largest error over what it
        was fitted to, and its largest miss on the last RECENT configs it predicted before they were measured (a
        fit to a handful of configs can be exact on them and still err elsewhere: a search whose predictions
        keep missing prunes nothing on them)."""
        return max(DEFAULT_ERROR, (self.cal.error_pct or 0.0) / 100, *self.misses[-RECENT:])

    def observe(self, c: Config, tokens_per_s: float) -> None:
        """A measured config: refit the coefficients to every measurement so far."""
        if c.key not in self.specs or tokens_per_s <= 0 or \
                any(o["name"] == c.key and o["tokens_per_s"] == tokens_per_s for o in self.observations):
            return  # (a resumed search sees its earlier results again: each counts once)
        try:
            predicted = speed.predict(self.estimates[c.key], self.specs[c.key], self.cal).tokens_per_s
            self.misses.append(abs(predicted / tokens_per_s - 1))
        except ValueError:
            pass
        self.observations.append(speed.observation(self.estimates[c.key], self.specs[c.key], self.cal, tokens_per_s,
                                                   c.key))
        self.cal = speed.refit(self.cal, self.observations)
        if self.cal.source.startswith("measured on"):  # this card's own calibration: the next estimate uses the fit
            speed.store(self.cal)
