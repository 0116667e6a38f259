"""The command line: fitrun validate | train | tune | estimate. Nothing else imports this module."""

from __future__ import annotations

import argparse
import json
import sys

from runner.spec import SpecError, load_job, load_search_space


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="job spec YAML (jobs/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set training.max_steps=50 (repeatable)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fitrun", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a job spec (or search space): every problem at once")
    _job_args(p)
    p.add_argument("--space", help="also validate this search space YAML")

    p = sub.add_parser("train", help="run a LoRA job through Ray Train, logged to MLflow")
    _job_args(p)
    p.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")

    p = sub.add_parser("tune", help="search for the fastest config under a memory ceiling")
    _job_args(p)
    p.add_argument("space", help="search space YAML (search_spaces/*.yaml)")
    p.add_argument("--gpu-memory-gib", type=float, help="memory ceiling (overrides the space's)")
    p.add_argument("--gpu-hour-price", type=float, help="$/GPU-hour, to report cost per 1M tokens")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search")
    p.add_argument("--out", help="where to write the winner job YAML (default: <output_dir>/winner.yaml)")

    p = sub.add_parser("estimate", help="predict peak GPU memory without a GPU or weights")
    _job_args(p)
    p.add_argument("--gpu-memory-gib", type=float, help="report fit / margin against this ceiling")
    p.add_argument("--sweep", help="sweep checkpointed layers, e.g. k=0..32")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    args = parser.parse_args(argv)
    try:
        job = load_job(args.job, args.overrides)
        space = load_search_space(args.space) if getattr(args, "space", None) else None
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.command == "validate":
        print(f"{args.job}: ok (global batch {job.global_batch_size})" + (f"; {args.space}: ok" if space else ""))
        return 0
    if args.command == "train":
        from runner.train import run_train

        summary = run_train(job, resume=not args.no_resume)
        print(json.dumps(summary, indent=2))
        return 0
    if args.command == "tune":
        from runner.tune import run_tune

        if args.gpu_memory_gib is not None:
            space = space.model_copy(update={"gpu_memory_gib": args.gpu_memory_gib})
        try:
            run_tune(job, space, resume=args.resume, gpu_hour_price=args.gpu_hour_price, winner_path=args.out)
        except SpecError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "estimate":
        from runner.estimate import run_estimate_cli

        return run_estimate_cli(job, args.gpu_memory_gib, args.sweep, args.json)
    return 1


if __name__ == "__main__":
    sys.exit(main())
