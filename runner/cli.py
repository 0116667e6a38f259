"""The command line: fitrun validate | train | tune | estimate | generate | export | sync | submit | status | logs | stop.
Nothing else imports this module."""

from __future__ import annotations

import argparse
import json
import sys

from runner.loading import load_job, load_search_space
from runner.spec import JobSpec, SearchSpaceSpec, SpecError, space_for_card


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="job spec YAML (jobs/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set training.max_steps=50 (repeatable)")
    p.add_argument("--gpu", metavar="NAME", help="the card the job is for, from the catalogue (L4, A10G, RTX-4090, "
                   "T4, ...; `fitrun estimate JOB --cards` lists them): the same as resources.gpu: NAME")


def _parser() -> argparse.ArgumentParser:
    """Every command's arguments. Long on purpose: one block per command, in the order `--help` lists them."""
    parser = argparse.ArgumentParser(prog="fitrun", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a job spec (or search space): every problem at once")
    _job_args(p)
    p.add_argument("--space", help="also validate this search space YAML, as `fitrun tune` would")
    p.add_argument("--gpu-memory-gib", type=float, help="memory ceiling for the space (as `fitrun tune` takes it)")

    p = sub.add_parser("train", help="run a LoRA job through Ray Train, logged to MLflow")
    _job_args(p)
    p.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    p.add_argument("--allow-changes", action="store_true",
                   help="resume even though the spec changed since the checkpoint (recorded in MLflow)")
    _register_arg(p)

    p = sub.add_parser("tune", help="search for the fastest config under a memory ceiling")
    _job_args(p)
    p.add_argument("space", help="search space YAML (search_spaces/*.yaml)")
    p.add_argument("--gpu-memory-gib", type=float,
                   help="a card not in the catalogue, by its total in GiB (a GPU job; on CPU: the tensor-byte ceiling)")
    p.add_argument("--gpu-hour-price", type=float, help="$/GPU-hour, to report cost per 1M tokens")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search")
    p.add_argument("--out", help="where to write the winner job YAML (default: <output_dir>/winner.yaml)")
    p.add_argument("--exhaustive", action="store_true",
                   help="search every column, probes packed on the card (default: the step-time model orders the "
                        "columns, skips those that cannot win, and probes run one at a time)")
    p.add_argument("--gpus", metavar="A,B,...", help="also rank these catalogued cards by $ per 1M trained tokens: "
                   "each card's fastest config that fits it (measured on the card in hand, predicted elsewhere)")
    p.add_argument("--prices", metavar="FILE", help="YAML of $ per hour by card name, over the catalogue's prices")
    p.add_argument("--cheapest", action="store_true",
                   help="the fastest config at any LoRA rank (default: at the highest rank listed that fits); "
                        "a smaller rank trades adapter capacity, i.e. quality, for speed")
    _register_arg(p)

    p = sub.add_parser("estimate", help="predict peak GPU memory without a GPU or weights")
    _job_args(p)
    p.add_argument("--gpu-memory-gib", type=float,
                   help="a card not in the catalogue, by its total (GiB, as the driver reports it)")
    p.add_argument("--sweep", help="sweep checkpointed layers, e.g. k=0..32")
    p.add_argument("--cards", action="store_true", help="every catalogued card: fits?, headroom, what it needs")
    p.add_argument("--max", metavar="FIELD", help="the largest value that fits the card: sequence_len")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("generate", help="the finished job's base + adapter answering a prompt, streamed")
    p.add_argument("output_dir", help="the job's output_dir (where `fitrun train` wrote adapter/)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sampled")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("export", help="the adapter merged into its base, saved as a plain Transformers model")
    p.add_argument("output_dir", help="the job's output_dir (where `fitrun train` wrote adapter/)")
    p.add_argument("--merged", required=True, metavar="DIR", help="where to write the merged model")

    p = sub.add_parser("sync", help="deliver to MLflow what a job kept while its tracking server was away")
    p.add_argument("output_dir", help="the job's output_dir (it holds mlflow-pending.jsonl)")

    p = sub.add_parser("submit", help="submit a job (or, with --tune, a search) to a Ray cluster (Ray Jobs)")
    _job_args(p)
    p.add_argument("space", nargs="?", help="search space YAML (with --tune)")
    p.add_argument("--tune", action="store_true", help="submit `fitrun tune JOB SPACE` instead of `fitrun train JOB`")
    p.add_argument("--address", help="the cluster's dashboard address (default: RAY_ADDRESS, else a head on this machine: "
                        "http://127.0.0.1:8265)")
    for name, help_text in (("status", "a submitted job's state"), ("logs", "a submitted job's output"),
                            ("stop", "stop a submitted job (its MLflow run is marked KILLED)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("id", help="the submission id `fitrun submit` printed")
        p.add_argument("--address", help="the cluster's dashboard address")
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    return parser


def _register_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--register", metavar="NAME", help="register the adapter's MLflow model as a new version of NAME "
                   "(for a search: the winner's quality run); the same as tracking.registered_model_name: NAME")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "submit" and args.space is None and len(rest) == 1 and not rest[0].startswith("-"):
        args.space = rest[0]  # `submit --tune JOB --set k=v SPACE`: argparse takes the optional SPACE as absent
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Parse, validate and preflight, then the command. A user's mistake exits 2 with one message."""
    args = _parse(argv)
    try:
        if args.command in ("status", "logs", "stop"):
            return _job_command(args)
        if args.command in ("generate", "export", "sync"):
            return _after_the_run(args)
        overrides = list(args.overrides)
        if getattr(args, "gpu", None):  # a card replaces an allocator cap the job file may hold
            overrides += [f"resources.gpu={args.gpu}", "resources.gpu_memory_gib=null"]
        if getattr(args, "register", None):
            overrides += [f"tracking.registered_model_name={json.dumps(args.register)}"]
        job = load_job(args.job, overrides)
        space = load_search_space(args.space) if getattr(args, "space", None) else None
        if space is not None:
            space = space_for_card(job, space, getattr(args, "gpu_memory_gib", None))
        if args.command in ("validate", "train", "tune", "submit"):
            from runner.preflight import preflight  # (imports datasets: not needed by estimate)

            preflight(job, args.job, args.command)  # data, model, Ray, output, tracking: before Ray
            for note in job.ineffective_settings():
                print(f"warning: {note}", file=sys.stderr)
        return COMMANDS[args.command](args, job, space)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _validate(args, job: JobSpec, space: SearchSpaceSpec | None) -> int:
    if space is not None:
        from runner.model import model_config
        from runner.tune.search import expand

        try:  # what `tune` runs first: the space's checks, then its configs (none is an error)
            expand(job, space, model_config(job.model, allow_builtin=True).num_hidden_layers)
        except SpecError as e:
            print(f"error: {args.space}: {e}", file=sys.stderr)
            return 2
    print(f"{args.job}: ok (global batch {job.global_batch_size})" + (f"; {args.space}: ok" if space else ""))
    return 0


def _train(args, job: JobSpec, space: None) -> int:
    from runner.train.driver import ResumeRefused, Stopped, run_train

    try:
        summary = run_train(job, resume=not args.no_resume, allow_changes=args.allow_changes)
    except (ResumeRefused, SpecError) as e:
        print(f"error: {args.job}: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"stopped by {e}: the MLflow run is marked KILLED; run the same command to resume from the "
              "latest checkpoint", file=sys.stderr, flush=True)
        return 128 + e.signum
    print(json.dumps(summary, indent=2))
    return 0


def _tune(args, job: JobSpec, space: SearchSpaceSpec) -> int:
    from runner.tune.driver import run_tune
    from runner.tune.report import TuneOptions

    run_tune(job, space, TuneOptions(resume=args.resume, gpu_hour_price=args.gpu_hour_price, winner_path=args.out,
                                     file_init=load_job(args.job).model.init, cheapest=args.cheapest,
                                     exhaustive=args.exhaustive, gpus=args.gpus, prices=args.prices))
    return 0


def _submit(args, job: JobSpec, space: SearchSpaceSpec | None) -> int:
    from runner import submit

    if args.tune != bool(args.space):
        print("error: `fitrun submit --tune JOB SPACE` submits a search; `fitrun submit JOB` a training job",
              file=sys.stderr)
        return 2
    submit.submit(args.job, job, args.overrides, args.address, space=args.space)
    return 0


def _estimate(args, job: JobSpec, space: None) -> int:
    # transformers imports scikit-learn (MLflow's dependency) and scipy when they are installed, for
    # assisted generation and object-detection losses alone: 1.8 s and 0.8 s of the estimate's
    # 10 s on 2 cores. Marked absent in this process, transformers' availability checks skip them.
    for unused in ("sklearn", "scipy"):
        sys.modules.setdefault(unused, None)
    from runner.estimate.report import run_estimate_cli

    return run_estimate_cli(job, args.gpu_memory_gib, args.sweep, args.json, all_cards=args.cards, maximise=args.max)


COMMANDS = {"validate": _validate, "train": _train, "tune": _tune, "submit": _submit, "estimate": _estimate}


def _after_the_run(args) -> int:
    if args.command == "sync":
        from runner.train.driver import sync

        return 1 if sync(args.output_dir) else 0
    if args.command == "generate":
        from runner.inference.generate import generate

        generate(args.output_dir, args.prompt, args.max_new_tokens, args.temperature, args.seed)
        print()
        return 0
    from runner.inference.export import export_merged

    export_merged(args.output_dir, args.merged)
    return 0


def _job_command(args) -> int:
    from runner import submit

    if args.command == "status":
        print(submit.status(args.id, args.address, reason=True))
    elif args.command == "logs":
        submit.logs(args.id, args.address, args.follow)
    else:
        state = submit.stop(args.id, args.address)
        print(f"{args.id}: {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
