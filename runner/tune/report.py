"""What a search reports: the trial table, the frontier (table and plot), the winner's job YAML and
its cost; printed, and logged to the search's parent MLflow run."""

from __future__ import annotations

import copy
import datetime
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runner.loading import dump_yaml, job_from_dict, map_local_paths
from runner.spec import JobSpec
from runner.storage import Location, is_uri, sibling
from runner.tracking import RunLogger
from runner.tune.search import Config, FitSearcher, apply_config, pareto
from runner.tune.session import Search


@dataclass(frozen=True)
class TuneOptions:
    """What the user asked of the search beyond its job and space (`fitrun tune`'s flags)."""

    resume: bool = False
    gpu_hour_price: float | None = None          # $/GPU-hour: the winner's cost per 1M tokens and per epoch
    winner_path: str | None = None               # `--out`: where the winner's job file goes (default: the output folder)
    extra_exclusive: tuple[Config, ...] = ()     # configs re-measured alone in any case
    file_init: str | None = None                 # the job file's model.init, when a dry run overrode it
    cheapest: bool = False                       # the fastest config at any LoRA rank, not the highest rank's
    exhaustive: bool = False                     # search every column (no step-time model), probes packed
    gpus: str | None = None                      # `--gpus L4,A10G,H100`: rank these cards by $ per 1M tokens
    prices: str | None = None                    # `--prices FILE`: $/hour per card, over the catalogue's
    winner_base: JobSpec | None = None           # the job as given (paths as written), set by run_tune


@dataclass
class Outcome:
    """What a finished search found: the searcher's results, the exclusive re-measurements, the winner,
    each rank's eval loss, and the search's size and start."""

    inner: FitSearcher
    exclusive: dict[str, dict] = field(default_factory=dict)
    speed_source: str = "packed"
    winner: dict | None = None
    quality: dict[str, float] = field(default_factory=dict)
    grid_size: int = 0
    started: datetime.datetime = field(default_factory=datetime.datetime.now)

    def speed(self, res: dict) -> float:
        """Uncontended tokens/s: the exclusive re-measurement, else the probe's own (one trial at a time)."""
        ex = self.exclusive.get(res["config"].key)
        if ex is not None:
            return ex["tokens_per_s"] if ex["feasible"] else 0.0
        return res["tokens_per_s"]


def summarise(search: Search, outcome: Outcome, options: TuneOptions) -> dict[str, Any]:
    """Print and log the search's outcome; write the winner's job YAML. Returns the summary dict."""
    inner, space, parent, out, exclusive = outcome.inner, search.space, search.parent, search.out, outcome.exclusive
    wall_s = (datetime.datetime.now() - outcome.started).total_seconds()
    results = list(inner.results.values())
    counts = search_counts(inner, outcome.grid_size, len(exclusive))
    front = pareto([r for r in results if r["feasible"]])
    table = trial_table(inner, exclusive)
    front_lines = ["| config | peak GiB | tokens/s |", "| --- | --- | --- |"] + \
        [f"| {p['config'].key} | {p['peak_gib']:.3f} | {p['tokens_per_s']:,.0f} |" for p in front]
    print("\n" + table, flush=True)
    print("\nfrontier (memory vs packed speed):\n" + "\n".join(front_lines))
    print(f"\n{json.dumps(counts)}; tune_wall_s: {wall_s:.0f}")
    summary: dict[str, Any] = {**counts, "tune_wall_s": wall_s, "frontier": [p["config"].key for p in front],
                               "speed_source": outcome.speed_source, "table": table}
    parent.metrics({k: float(v) for k, v in counts.items()} | {"tune_wall_s": wall_s})
    parent.text(table, "trials.md")
    parent.table(trial_rows(inner, exclusive), "trials.json")  # the MLflow UI shows it as a table
    parent.text("\n".join(front_lines), "frontier.md")
    ranks = rank_lines(inner, outcome.quality, space.quality_steps)
    print("\nthe cost of each LoRA rank (its fastest config that fits):\n" + "\n".join(ranks))
    parent.text("\n".join(ranks), "ranks.md")
    per_rank = fastest_per_rank(inner)
    summary["per_rank"] = {res["config"].r: res["config"].key for res in per_rank}
    summary["ranks_table"] = "\n".join(ranks)
    if outcome.quality:
        summary["eval_loss_per_rank"] = {res["config"].r: outcome.quality[res["config"].key] for res in per_rank
                                         if res["config"].key in outcome.quality}
        parent.metrics({f"eval_loss_r{r}": v for r, v in summary["eval_loss_per_rank"].items()})
    winner = outcome.winner
    _plot(results, front, parent, out, space, winner)
    if winner is None:
        print("no configuration fits the ceiling: raise gpu_memory_gib, allow more checkpointed layers, "
              "or smaller micro-batches (larger accumulation)")
        parent.tags({"winner": "none"})
        return summary
    c, tokens_per_s = winner["config"], outcome.speed(winner)
    header = f"# fitrun tune winner: {c.key}, {tokens_per_s:,.0f} tokens/s ({outcome.speed_source}), " \
             f"peak {winner['peak_gib']:.2f} GiB under {space.gpu_memory_gib} GiB\n"
    path = Location(options.winner_path) if options.winner_path else out / "winner.yaml"
    write_winner(options.winner_base or search.job, c, space.lora_alpha_rule, header, path, parent)
    parent.tags({"winner": c.key})
    parent.metrics({"winner_tokens_per_s": tokens_per_s, "winner_peak_gib": winner["peak_gib"]})
    # The runs table shows names without configuring it (metric columns must be picked by hand): the winner's
    # config, speed and peak in the parent's name.
    parent.rename(f"tune-{search.job.name}: {tokens_per_s:,.0f} tok/s, {winner['peak_gib']:.2f} GiB, {c.key}")
    print(f"\nwinner: {c.key}  {tokens_per_s:,.0f} tokens/s ({outcome.speed_source}), peak {winner['peak_gib']:.3f} "
          f"GiB; job written to {path}  " + (f"(fitrun train {path})" if not is_uri(str(path)) else
                                              "(a job file in the object store: copy it here, or tune with --out FILE)"))
    print(rank_choice_note(inner, c, options.cheapest))
    print(f"MLflow: {parent.runs_link()}")
    if options.gpu_hour_price:
        summary.update(cost(search.job, tokens_per_s, options.gpu_hour_price))
    summary.update(winner=c.key, winner_config=asdict(c), winner_tokens_per_s=tokens_per_s,
                   winner_peak_gib=winner["peak_gib"], winner_path=str(path), exclusive=dict(exclusive))
    return summary


def search_counts(inner, grid_size: int, exclusive_runs: int) -> dict[str, float]:
    """What the search ran, ruled out and found, and the step-time model's error over it."""
    results = list(inner.results.values())
    return {"trials_run": len(results), "grid_size": grid_size, "pruned": len(inner.pruned),
            "dominated_columns": len(inner.dominated), "infeasible": sum(r["status"] == "infeasible" for r in results),
            "errors": sum(r["status"] == "error" for r in results), "exclusive_runs": exclusive_runs,
            "outpaced_columns": len(inner.outpaced), **speed_model_errors(results)}


def speed_model_errors(results: list[dict]) -> dict[str, float]:
    """The step-time model's error over the search: each feasible probe's prediction (made before it ran, by
    the model as refitted so far) against its measured speed."""
    errors = sorted(abs(r["predicted_tokens_per_s"] / r["tokens_per_s"] - 1) * 100 for r in results
                    if r["feasible"] and r.get("predicted_tokens_per_s") and r["tokens_per_s"])
    if not errors:
        return {}
    return {"speed_model_error_median_pct": errors[len(errors) // 2], "speed_model_error_max_pct": errors[-1],
            "speed_model_predicted_probes": len(errors)}


def fastest_per_rank(inner) -> list[dict]:
    """For each LoRA rank measured, its fastest config that fits (probe speed), smallest rank first."""
    best: dict[int, dict] = {}
    for res in inner.best_per_column():
        r = res["config"].r
        if r not in best or res["tokens_per_s"] > best[r]["tokens_per_s"]:
            best[r] = res
    return [best[r] for r in sorted(best)]


def rank_lines(inner, quality: dict[str, float] | None = None, quality_steps: int = 0) -> list[str]:
    """The cost of each rank: its fastest config that fits, and (where measured) that config's eval
    loss after `quality_steps` steps at the job's global batch."""
    quality = quality or {}
    ranks = sorted({c.r for c in inner.columns})
    found = {res["config"].r: res for res in fastest_per_rank(inner)}
    loss_head = f" eval loss after {quality_steps} steps |" if quality else ""
    lines = [f"| rank | fastest config that fits | tokens/s | peak GiB |{loss_head}",
             "| --- | --- | --- | --- |" + (" --- |" if quality else "")]
    for r in ranks:
        res = found.get(r)
        if res is None:
            why = "not measured (dominated)" if any(c.r == r for c in inner.dominated) else "none fits"
            lines.append(f"| r{r} | {why} | - | - |" + (" - |" if quality else ""))
            continue
        loss = quality.get(res["config"].key)
        loss_cell = (f" {loss:.4f} |" if loss is not None else " - |") if quality else ""
        lines.append(f"| r{r} | {res['config'].key} | {res['tokens_per_s']:,.0f} | {res['peak_gib']:.3f} |{loss_cell}")
    return lines


def rank_choice_note(inner, winner, cheapest: bool) -> str:
    """What the rank choice traded, in one sentence."""
    fastest = max(fastest_per_rank(inner), key=lambda res: res["tokens_per_s"])
    if cheapest:
        return (f"--cheapest: the fastest config at any rank (r{winner.r}); a smaller LoRA rank trades adapter "
                "capacity (quality) for speed")
    listed = max(c.r for c in inner.columns)
    note = f"rank: r{winner.r}, the highest listed rank that fits" if winner.r == listed else \
        f"rank: r{winner.r}; r{listed} (the highest listed) does not fit the ceiling"
    if fastest["config"].r != winner.r:
        note += (f"; --cheapest would pick r{fastest['config'].r} ({fastest['config'].key}, "
                 f"{fastest['tokens_per_s']:,.0f} tokens/s), trading quality for speed")
    return note


TRIAL_COLUMNS = ("config", "status", "peak_gib", "tokens_per_s_packed", "tokens_per_s_exclusive", "loss")


def decisions(inner, exclusive: dict[str, dict]) -> list[tuple]:
    """Every config the search decided on, measured or pruned, one row of TRIAL_COLUMNS each
    (None where a pruned config has no measurement)."""
    rows = [(r["config"].key, r["status"], r.get("peak_gib"), r.get("measured_tokens_per_s", 0),
             (exclusive.get(r["config"].key) or {}).get("tokens_per_s"), r.get("loss"))
            for r in sorted(inner.results.values(), key=lambda r: r["config"])]
    rows += [(key, f"pruned (predicted {gib:.3f} GiB)", None, None, None, None) for key, gib in sorted(inner.pruned.items())]
    rows += [(f"{column.key}-*", "pruned (dominated by a smaller rank)", None, None, None, None)
             for column in inner.dominated]
    return rows


def trial_table(inner, exclusive: dict[str, dict]) -> str:
    """`decisions` as a markdown table."""
    def cell(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = ["| config | status | peak GiB | tokens/s (packed) | tokens/s (exclusive) | loss |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {key} | {status} | {cell(peak, '.3f')} | {cell(packed, ',.0f')} | {cell(ex, ',.0f')} | "
              f"{cell(loss, '.4f')} |" for key, status, peak, packed, ex, loss in decisions(inner, exclusive)]
    return "\n".join(lines)


def trial_rows(inner, exclusive: dict[str, dict]) -> dict[str, list]:
    """`decisions` as columns, for `mlflow.log_table` (the UI shows it as a table)."""
    rows = decisions(inner, exclusive)
    return {name: [row[i] for row in rows] for i, name in enumerate(TRIAL_COLUMNS)}


def write_winner(job, c, alpha_rule: str, header: str, path: Location, parent: RunLogger) -> None:
    """The winner as a ready job file (and an artifact of the search's run): the user's job (paths as
    given, its own model.init) with the config's values, under its own name and output directory, so
    running it never touches the base job's adapter, checkpoints or DONE marker."""
    raw = apply_config(job, c, alpha_rule).to_dict()
    raw["name"] = f"{job.name}-tuned"
    if "{name}" not in job.output_dir:
        raw["output_dir"] = sibling(job.output_dir, "{name}")
    absolute = map_local_paths(copy.deepcopy(raw), lambda value: str(Path(value).resolve()))
    if is_uri(str(path)):  # a job file in an object store: its local paths absolute, as this machine sees them
        raw = absolute
    else:  # its paths are relative to its own folder, as in any job file
        folder = Path(str(path)).parent.resolve()
        map_local_paths(raw, lambda value: os.path.relpath(Path(value).resolve(), folder))
    path.write_text(header + dump_yaml(job_from_dict(raw)))
    # The copy a user downloads from the MLflow UI lands anywhere: absolute paths, so it validates there.
    parent.text(header + "# paths: absolute, as the machine that ran the search saw them\n"
                + dump_yaml(job_from_dict(absolute)), "winner.yaml")


def cost(job, tokens_per_s: float, price: float) -> dict[str, float]:
    """$ per 1M tokens and per epoch at `price` $/GPU-hour."""
    from runner.data import tokenize
    from runner.model import build_tokenizer

    per_m = price / 3600 / tokens_per_s * 1e6
    # The worker's split: the same seed, so the epoch counts the rows the job trains on.
    tokens_per_epoch = tokenize(job.data, build_tokenizer(job.tokenizer, job.model), seed=job.training.seed).num_train_tokens
    gpus = job.resources.num_workers if job.resources.use_gpu else 1
    per_epoch = price * gpus / 3600 * tokens_per_epoch / tokens_per_s
    print(f"cost: ${per_m:.4f} per 1M tokens, ${per_epoch:.4f} per epoch ({tokens_per_epoch:,} tokens) "
          f"at ${price}/GPU-hour")
    return {"usd_per_million_tokens": per_m, "usd_per_epoch": per_epoch}


def _plot(results, front, parent: RunLogger, out: Path, space, winner: dict | None) -> None:
    """Memory vs speed: every measured config, labelled; the frontier; the ceiling and the line a peak
    must stay under (ceiling - margin); the winner starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for status, colour in (("ok", "tab:blue"), ("infeasible", "tab:red")):
        pts = [r for r in results if r["status"] == status and r.get("peak_gib") is not None]
        ax.scatter([r["peak_gib"] for r in pts], [r.get("measured_tokens_per_s", 0) for r in pts], c=colour,
                   label=status, s=18)
        for r in pts:
            ax.annotate(r["config"].key, (r["peak_gib"], r.get("measured_tokens_per_s", 0)), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.plot([p["peak_gib"] for p in front], [p["tokens_per_s"] for p in front], "k--", marker="o", mfc="none",
            lw=1, label="frontier")
    ax.axvline(space.gpu_memory_gib, color="tab:red", lw=1, label=f"ceiling {space.gpu_memory_gib:g} GiB")
    if space.safety_margin_gib:
        ax.axvline(space.limit_gib, color="tab:orange", ls=":", lw=1, label=f"ceiling - margin {space.limit_gib:g} GiB")
    if winner is not None:
        ax.scatter([winner["peak_gib"]], [winner["tokens_per_s"]], marker="*", s=180, c="gold", edgecolors="k",
                   zorder=5, label=f"winner {winner['config'].key}")
    ax.set_xlabel("peak memory (GiB; reserved on GPU, tensor bytes on CPU)")
    ax.set_ylabel("tokens/s (packed probes)")
    ax.legend(fontsize=7)
    ax.set_title("fitrun tune: memory vs speed")
    path = out / "frontier.png"
    path.save_figure(fig, dpi=110, bbox_inches="tight")
    parent.figure(fig, path.name)
    plt.close(fig)
