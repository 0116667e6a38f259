"""Issue 3 benchmark: `fitrun tune` on the 8B job (random init) under a 24 GiB ceiling, and the
seed recipe (all 32 layers checkpointed, micro-batch 1, r16) measured in the same run the same way.

    PYTHONPATH=. python bench/tune_24gb.py --out bench/results/tune-24gb.md

Issue 24: the speed-guided search (one probe at a time on a GPU) against `--exhaustive` over the same space, in
one device session (each half fits one 10-minute command; --json keeps what the comparison needs):

    PYTHONPATH=. python bench/tune_24gb.py --no-seed --space S --set output_dir=/tmp/g --out g.md --json g.json
    PYTHONPATH=. python bench/tune_24gb.py --no-seed --space S --set output_dir=/tmp/e --out e.md --json e.json --exhaustive
    PYTHONPATH=. python bench/tune_24gb.py --compare g.json e.json   # tune_wall_s_unpacked, probes_run, winner_gap_...
"""

import argparse
import datetime
import json
import os
import shutil
import time
from pathlib import Path

from gpu import hardware

from runner.loading import load_job, load_search_space
from runner.spec import space_for_card
from runner.tune.driver import run_tune
from runner.tune.report import TuneOptions
from runner.tune.search import Config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", default="jobs/llama3-8b-lora.yaml")
    ap.add_argument("--space", default="search_spaces/fit-24gb.yaml")
    ap.add_argument("--gpu", help="a catalogued card: the probes' allocator is capped at its budget (fitrun tune --gpu)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--space-set", dest="space_overrides", action="append", default=[])
    ap.add_argument("--out", help="the results file (required unless --compare)")
    ap.add_argument("--no-seed", action="store_true", help="skip re-measuring the seed recipe (saves device time)")
    ap.add_argument("--winner", help="where to write the winner's job YAML")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted search (same --set output_dir)")
    ap.add_argument("--exhaustive", action="store_true", help="every column, probes packed (fitrun tune --exhaustive)")
    ap.add_argument("--json", help="where to write the search's counts, wall time and winner")
    ap.add_argument("--compare", nargs=2, metavar=("GUIDED", "EXHAUSTIVE"), help="two --json files: the comparison")
    args = ap.parse_args()
    if args.compare:
        print(compare(*args.compare))
        return
    if not args.out:
        ap.error("--out is required")
    card_sets = [f"resources.gpu={args.gpu}", "resources.gpu_memory_gib=null"] if args.gpu else []
    job = load_job(args.job, ["model.init=random", "name=tune-bench", *args.overrides, *card_sets])
    space = space_for_card(job, load_search_space(args.space, args.space_overrides), None)
    seed = Config(r=job.lora.r, micro_batch_size=1, gradient_accumulation_steps=job.global_batch_size,
                  placement="first", k=32 if "8b" in args.job else 4)
    start = time.time()
    s = run_tune(job, space, TuneOptions(resume=args.resume, extra_exclusive=() if args.no_seed else (seed,),
                                         winner_path=args.winner, exhaustive=args.exhaustive))
    wall = time.time() - start
    if args.json:
        keep = ("tune_wall_s", "trials_run", "grid_size", "pruned", "outpaced_columns", "exclusive_runs", "winner",
                "winner_tokens_per_s", "speed_model_error_median_pct", "speed_model_error_max_pct")
        Path(args.json).write_text(json.dumps({"exhaustive": args.exhaustive, "hardware": hardware(),
                                               "space": args.space, "space_sets": args.space_overrides, "gpu": args.gpu,
                                               **{k: s.get(k) for k in keep}}, indent=1) + "\n")
    seed_res = s.get("exclusive", {}).get(seed.key, {})
    seed_tps = seed_res.get("tokens_per_s") or float("nan")
    speedup = s.get("winner_tokens_per_s", float("nan")) / seed_tps

    hw = hardware()
    card = f" ({args.gpu})" if args.gpu else ""
    lines = [f"# fitrun tune under a {space.gpu_memory_gib:g} GiB ceiling{card} ({datetime.date.today()})", "",
             f"- hardware: {hw}",
             f"- job: {args.job} (model.init=random) {' '.join(args.overrides)}, global batch {job.global_batch_size}, "
             f"seq {job.data.sequence_len}{' packed' if job.data.packing else ' padded'}; space: {args.space} "
             f"{' '.join(args.space_overrides)}",
             "- probes run packed several to a card (fit is measured there); the finalists and the seed recipe are "
             "re-measured one at a time (exclusive) and ranked on that speed",
             "- seed recipe: not re-measured (--no-seed)" if args.no_seed else
             f"- seed recipe here: {seed.key} (all layers checkpointed, micro-batch 1, r{job.lora.r}) through the "
             "same probe path, exclusive", "",
             f"tune_wall_s: {s['tune_wall_s']:.0f}",
             f"bench_wall_s: {wall:.0f}",
             f"trials_run: {s['trials_run']}",
             f"grid_size: {s['grid_size']}",
             f"pruned_by_estimate: {s['pruned']}",
             f"dominated_columns: {s['dominated_columns']}",
             f"infeasible: {s['infeasible']}",
             f"errors: {s['errors']}",
             f"winner: {s.get('winner', 'none')}",
             f"winner_tokens_per_s: {s.get('winner_tokens_per_s', float('nan')):.0f}",
             f"seed_recipe_tokens_per_s: {seed_tps:.0f}",
             f"winner_speedup_vs_seed_recipe: {speedup:.2f}", "",
             "## The cost of each rank", "", s.get("ranks_table", ""), "",
             "## Trials", "", s["table"], ""]
    frontier = Path(job.resolved_output_dir()) / "frontier.png"
    if frontier.exists():  # the plot the search logged to MLflow, beside the results
        shutil.copy(frontier, os.path.splitext(args.out)[0] + "-frontier.png")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def compare(guided_path: str, exhaustive_path: str) -> str:
    """The issue-24 lines from a guided and an exhaustive search of the same space on the same card."""
    g, e = json.loads(Path(guided_path).read_text()), json.loads(Path(exhaustive_path).read_text())
    same = [(s["space"], s["space_sets"], s.get("gpu")) for s in (g, e)]
    if g["exhaustive"] or not e["exhaustive"] or same[0] != same[1]:
        raise SystemExit("give a guided and an exhaustive search of the same space")
    spread = 100 * (e["winner_tokens_per_s"] - g["winner_tokens_per_s"]) / e["winner_tokens_per_s"]
    # the same config won both: no gap (the two measurements of it differ by run-to-run noise alone)
    gap = 0.0 if g["winner"] == e["winner"] else spread
    return "\n".join([f"card: {g['hardware']} / {e['hardware']}",
                      f"tune_wall_s_unpacked: {g['tune_wall_s']:.0f}", f"probes_run: {g['trials_run']}",
                      f"outpaced_columns: {g['outpaced_columns']}",
                      f"exhaustive: {e['tune_wall_s']:.0f} s, {e['trials_run']} probes (packed)",
                      f"winner guided: {g['winner']} {g['winner_tokens_per_s']:.0f} tokens/s",
                      f"winner exhaustive: {e['winner']} {e['winner_tokens_per_s']:.0f} tokens/s",
                      f"winner_gap_vs_exhaustive_pct: {gap:.1f}" + (
                          f" (the same config; its two measurements differ by {spread:+.1f}%)"
                          if g["winner"] == e["winner"] else "")])


if __name__ == "__main__":
    main()
