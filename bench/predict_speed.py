"""Issue 24: the step-time model against measurement, on one card, in one command.

    PYTHONPATH=. python bench/predict_speed.py measure --out DIR [--only NAME ...]   # on the GPU
    PYTHONPATH=. python bench/predict_speed.py report DIR... --md bench/results/predict-DATE.md   # anywhere
    PYTHONPATH=. python bench/predict_speed.py predict DIR --card H100 --out FILE   # the other card, for later

`measure` first calibrates the card (runner.estimate.speed.calibrate: the frozen linears per kind, attention,
bandwidth, launch), writes DIR/calibration.json, then trains every config of CONFIGS in this process, one after
another, as fitrun's worker does (build_trainable, fused AdamW, train_step on the shipped data, packed): 1 warm-up
step and 5 measured ones of 2 micro-batches (the median micro-batch), tokens/s at the job's true accumulation
(global batch 16 sequences), as a tuner probe reports it; an unrecorded config warms the process up first. Each
config appends one line to DIR/measured.jsonl (commit, card, versions, the config, the measurement, the
estimate's work counts), so a cut run keeps what it measured.

`report` refits the calibration's coefficients on the CALIBRATION configs only, predicts every other config
from that, and writes the errors: `speed_error_median_pct`, `speed_error_max_pct` over the held-out configs.
With two directories from two cards, it also predicts the second card's configs from the first card's fitted
calibration scaled by the catalogue (`cross_card_error_pct`).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

JOB = "jobs/llama3-8b-lora.yaml"
SMOKE_JOB, SMOKE_SETS = "jobs/tiny-cpu.yaml", ["resources.use_gpu=false", "model.quantization=none",
                                               "training.compile=false"]
BASE_SETS = ["model.init=random", "lora.adapter_dtype=mixed", "training.warmup_steps=1"]

# name -> levers. The first six fit the coefficients; the rest are held out (never seen by the fit).
CALIBRATION = ["c-none-k32", "c-fp8c-k12", "c-nf4c-k16", "c-nonec-k0-s1024", "c-fp8-k32-s4096", "c-nf4-k8-r64"]
CONFIGS = {
    "c-none-k32": dict(q="none", k=32, mb=1, compile=False),
    "c-fp8c-k12": dict(q="fp8", k=12, mb=2, compile=True),
    "c-nf4c-k16": dict(q="nf4", k=16, mb=1, compile=True),
    "c-nonec-k0-s1024": dict(q="none", k=0, mb=2, compile=True, seq=1024),
    "c-fp8-k32-s4096": dict(q="fp8", k=32, mb=1, compile=False, seq=4096),
    "c-nf4-k8-r64": dict(q="nf4", k=8, mb=1, compile=False, r=64),
    "h-none-k16-r8": dict(q="none", k=16, mb=1, compile=False, r=8),
    "h-nonec-k32-s8192": dict(q="none", k=32, mb=1, compile=True, seq=8192),
    "h-fp8c-k0-mb4-s1024": dict(q="fp8", k=0, mb=4, compile=True, seq=1024),
    "h-fp8-k20-r32": dict(q="fp8", k=20, mb=1, compile=False, r=32),
    "h-fp8c-k32-mb2-s4096-last": dict(q="fp8", k=32, mb=2, compile=True, seq=4096, placement="last"),
    "h-nf4-k32-mb2": dict(q="nf4", k=32, mb=2, compile=False),
    "h-nf4c-k0-s4096-r8": dict(q="nf4", k=0, mb=1, compile=True, seq=4096, r=8),
    "h-nonec-k8-mb2-every": dict(q="none", k=8, mb=2, compile=True, placement="every_n"),
    "h-fp8c-k12-mb2": dict(q="fp8", k=12, mb=2, compile=True, placement="last"),
    "h-nf4c-k16-mb4-s1024-r32": dict(q="nf4", k=16, mb=4, compile=True, seq=1024, r=32),
    "h-none-k24-s4096-r64": dict(q="none", k=24, mb=1, compile=False, seq=4096, r=64),
    "h-fp8c-k4-s8192": dict(q="fp8", k=4, mb=1, compile=True, seq=8192),
}
# Measured in this order: fit and held-out configs alternate, so a command cut short still has both.
ORDER = [name for pair in zip(CALIBRATION, [n for n in CONFIGS if n not in CALIBRATION]) for name in pair] + \
    [n for n in CONFIGS if n not in CALIBRATION][len(CALIBRATION):]
GLOBAL_SEQUENCES = 16
WARMUP, MEASURED = 1, 5  # 3 until the H100 run of 2026-12-07, whose eager configs' micro-batches varied by up to 35%
# The first config trained in a fresh process ran with a 0.29-0.48 s spread between its two measured steps on the
# H200 (2026-12-07; later configs within 5%): the process warms up on an unmeasured config first.
PROCESS_WARMUP = dict(q="none", k=16, mb=1, compile=False)


def sets_of(levers: dict) -> list[str]:
    r = levers.get("r", 16)
    mb = levers["mb"]
    return BASE_SETS + [
        f"model.quantization={levers['q']}", f"training.compile={str(levers['compile']).lower()}",
        f"training.micro_batch_size={mb}", f"training.gradient_accumulation_steps={GLOBAL_SEQUENCES // mb}",
        f"data.sequence_len={levers.get('seq', 2048)}", f"lora.r={r}", f"lora.lora_alpha={2 * r}",
        "activation_checkpointing.layers=none", f"activation_checkpointing.count={levers['k']}",
        f"activation_checkpointing.placement={levers.get('placement', 'first')}"]


def _environment() -> dict:
    from harness import environment

    return environment()


def _measure_one(spec, data_cache: dict, device) -> dict:
    import torch
    from transformers import get_scheduler

    from runner.data import MicroBatches, collate, tokenize
    from runner.model import build_tokenizer, build_trainable
    from runner.train.worker import train_step

    cuda = device.type == "cuda"
    t = spec.training
    tok = build_tokenizer(spec.tokenizer, spec.model)
    key = spec.data.sequence_len
    if key not in data_cache:
        data_cache[key] = tokenize(spec.data, tok, seed=t.seed)
    data = data_cache[key]
    batches = MicroBatches(data.train, t.micro_batch_size, tok.pad_token_id, t.seed, 0, 1, None)
    first = {k: v.to(device) for k, v in collate([batches.rows[0]], batches.pad_id).items()}
    start = time.perf_counter()
    trainable = build_trainable(spec, device, vocab_size=len(tok), check_batch=first)
    params = [p for p in trainable.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, fused=cuda)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=1, num_training_steps=100)
    probe_t = t.model_copy(update={"gradient_accumulation_steps": 2})
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    micro, opt = [], []
    for i in range(WARMUP + MEASURED):
        m = train_step(trainable.net, trainable.model, batches, optimizer, scheduler, probe_t, device, 1)
        if i >= WARMUP:
            micro.append(m["micro_batch_time_s"])
            opt.append(m["optimizer_time_s"])
    micro_s, opt_s = statistics.median(micro), statistics.median(opt)
    tokens_micro = t.micro_batch_size * spec.data.sequence_len
    out = {"tokens_per_s": tokens_micro / (micro_s + opt_s / t.gradient_accumulation_steps),
           "micro_batch_time_s": micro_s, "optimizer_time_s": opt_s, "micro_spread": [min(micro), max(micro)],
           "micro_times_s": micro,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / 1024**3 if cuda else None,
           "setup_and_steps_s": time.perf_counter() - start, "loss": m["loss"]}
    del trainable, optimizer, scheduler, params
    gc.collect()
    torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()
    return out


def measure(out: Path, only: list[str] | None, smoke: bool = False) -> None:
    """`smoke`: the tiny CPU job and its bf16-free configs, to check this script without a GPU."""
    import torch

    from runner.estimate import speed
    from runner.estimate.trace import estimate
    from runner.loading import load_job
    from runner.model import model_config

    out.mkdir(parents=True, exist_ok=True)
    env = _environment()
    job, device = (SMOKE_JOB, torch.device("cpu")) if smoke else (JOB, torch.device("cuda"))
    spec0 = load_job(job, BASE_SETS)
    config = model_config(spec0.model, allow_builtin=True)
    t0 = time.perf_counter()
    cal = speed.calibrate(config, device, torch.float32 if smoke else torch.bfloat16,
                          kinds=None if smoke else ["bf16", "bf16-compile", "fp8", "fp8-compile", "nf4"])
    calib_s = time.perf_counter() - t0
    (out / "calibration.json").write_text(cal.to_json())
    print(f"calibration: {calib_s:.1f} s {json.dumps({k: v for k, v in json.loads(cal.to_json()).items() if k != 'shape'})}",
          flush=True)
    data_cache: dict = {}
    deadline = time.monotonic() + float(os.environ.get("PREDICT_LIMIT_S", "1e9"))
    if not smoke:
        warm = _measure_one(load_job(job, sets_of(PROCESS_WARMUP)), data_cache, device)
        print(f"process warm-up (not recorded): {warm['tokens_per_s']:,.0f} tokens/s", flush=True)
    with (out / "measured.jsonl").open("a") as f:
        for name in ORDER:
            levers = CONFIGS[name]
            if time.monotonic() > deadline:
                print(f"{name}: skipped (PREDICT_LIMIT_S reached)", flush=True)
                continue
            if (only and name not in only) or (smoke and levers["q"] != "none"):
                continue
            smoke_sets = SMOKE_SETS + [f"activation_checkpointing.count={min(levers['k'], 4)}", "data.sequence_len=256"]
            spec = load_job(job, sets_of(levers) + (smoke_sets if smoke else []))
            est = estimate(spec)
            try:
                measured = _measure_one(spec, data_cache, device)
            except torch.OutOfMemoryError as e:
                measured = {"error": str(e)[:200]}
                gc.collect()
                torch.cuda.empty_cache()
            except Exception as e:  # one config's failure must not cost the others' measurements
                measured = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            line = {**env, "suite": "predict-speed", "job": job, "calibration_s": calib_s, "name": name,
                    "levers": levers, "sets": sets_of(levers) + (smoke_sets if smoke else []), "measured": measured,
                    "work": est.work, "tokens": est.tokens,
                    "k": est.num_checkpointed_layers, "lora_params_gib": est.components_gib["lora_params"],
                    "predicted_uncalibrated": speed.predict(est, spec, cal).tokens_per_s,
                    "command": " ".join(sys.argv)}
            f.write(json.dumps(line) + "\n")
            f.flush()
            print(f"{name}: {measured.get('tokens_per_s', 0):,.0f} tokens/s measured, "
                  f"{line['predicted_uncalibrated']:,.0f} uncalibrated prediction "
                  f"({measured.get('setup_and_steps_s', 0):.0f} s)", flush=True)


class _Est:
    """The parts of an Estimate the model reads, from a results line."""

    def __init__(self, line: dict):
        self.work, self.tokens, self.num_checkpointed_layers = line["work"], line["tokens"], line["k"]
        self.components_gib = {"lora_params": line["lora_params_gib"]}


def _lines(directory: Path) -> list[dict]:
    return [json.loads(x) for x in (directory / "measured.jsonl").read_text().splitlines() if x.strip()]


def _fit(cal, lines, specs):
    from runner.estimate import speed

    obs = [speed.observation(_Est(x), specs[x["name"]], cal, x["measured"]["tokens_per_s"], x["name"])
           for x in lines if x["name"] in CALIBRATION and "tokens_per_s" in x["measured"]]
    return speed.refit(cal, obs)


def report(dirs: list[Path], md: Path | None) -> str:
    from runner.cards import find_card, load_catalogue
    from runner.estimate import speed
    from runner.loading import load_job

    catalogue = load_catalogue()
    out = [f"# Step-time prediction against measurement (issue 24), {datetime.date.today()}", ""]
    fitted_by_card = {}
    all_lines = {}
    for d in dirs:
        lines = _lines(d)
        cal = speed.Calibration.from_json((d / "calibration.json").read_text())
        specs = {x["name"]: load_job(x.get("job", JOB), x["sets"]) for x in lines}
        fitted = _fit(cal, lines, specs)
        fitted_by_card[cal.card] = (fitted, d)
        all_lines[cal.card] = (lines, specs)
        (d / "calibration-fitted.json").write_text(fitted.to_json())
        first = lines[0]
        out += [f"## {cal.card}", "",
                f"- commit {first['commit']}, torch {first['torch']}, CUDA {first['cuda']}, driver {first['driver']}, "
                f"{first['date'] if 'date' in first else ''}",
                f"- command: `{first['command']}`; calibration microbenchmark {first['calibration_s']:.1f} s",
                f"- coefficients fitted on {len(fitted.observations)} calibration configs "
                f"({', '.join(CALIBRATION)}): " + ", ".join(f"{k} {v:.3g}" for k, v in fitted.coefficients.items()),
                "", "| config | set | measured tokens/s | steps' spread % | predicted | error % | dominant term |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        errors = []
        for x in lines:
            if "tokens_per_s" not in x["measured"]:
                out.append(f"| {x['name']} | - | {x['measured'].get('error', 'failed')} | | | | |")
                continue
            p = speed.predict(_Est(x), specs[x["name"]], fitted)
            m = x["measured"]["tokens_per_s"]
            err = (p.tokens_per_s / m - 1) * 100
            held = x["name"] not in CALIBRATION
            if held:
                errors.append(abs(err))
            lo, hi = x["measured"]["micro_spread"]
            spread = 100 * (hi - lo) / x["measured"]["micro_batch_time_s"]
            out.append(f"| {x['name']} | {'held out' if held else 'fit'} | {m:,.0f} | {spread:.0f} | {p.tokens_per_s:,.0f} | "
                       f"{err:+.1f} | {p.dominant} |")
        if errors:
            out += ["", f"held-out configs: {len(errors)}",
                    f"speed_error_median_pct: {statistics.median(errors):.1f}",
                    f"speed_error_max_pct: {max(errors):.1f}", ""]
    cards = list(fitted_by_card)
    if len(cards) == 2:
        (a_cal, _), b = fitted_by_card[cards[0]], cards[1]
        lines, specs = all_lines[b]
        scaled = speed.for_card(a_cal, find_card(cards[0], catalogue), find_card(b, catalogue))
        errs = [abs(speed.predict(_Est(x), specs[x["name"]], scaled).tokens_per_s / x["measured"]["tokens_per_s"] - 1) * 100
                for x in lines if "tokens_per_s" in x["measured"]]
        out += [f"## Cross-card: {cards[0]}'s fitted calibration, datasheet-scaled, predicting {b}", "",
                f"cross_card_error_pct: {statistics.median(errs):.1f} (median; max {max(errs):.1f}, {len(errs)} configs)", ""]
    text = "\n".join(out) + "\n"
    if md:
        md.write_text(text)
    return text


def predict_other(directory: Path, card_name: str, out: Path) -> dict:
    """Every config of `directory`'s run predicted on `card_name` from that run's fitted calibration,
    datasheet-scaled: the file a later session measures that card against (`report DIR1 DIR2`)."""
    from runner.cards import find_card, load_catalogue
    from runner.estimate import speed
    from runner.loading import load_job

    catalogue = load_catalogue()
    lines = _lines(directory)
    specs = {x["name"]: load_job(x.get("job", JOB), x["sets"]) for x in lines}
    fitted = _fit(speed.Calibration.from_json((directory / "calibration.json").read_text()), lines, specs)
    card = find_card(card_name, catalogue)
    scaled = speed.for_card(fitted, find_card(fitted.card, catalogue), card)
    result = {"card": card.name, "from": fitted.card, "from_commit": lines[0]["commit"],
              "predicted_at_commit": _environment()["commit"],
              "predicted_tokens_per_s": {x["name"]: speed.predict(_Est(x), specs[x["name"]], scaled).tokens_per_s
                                         for x in lines}}
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--only", nargs="*")
    m.add_argument("--smoke", action="store_true", help="the tiny CPU job, to check this script without a GPU")
    p = sub.add_parser("predict", help="predict another card's speeds from a measured run (for a later session)")
    p.add_argument("dir", type=Path)
    p.add_argument("--card", required=True)
    p.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("report")
    r.add_argument("dirs", type=Path, nargs="+")
    r.add_argument("--md", type=Path)
    a = ap.parse_args()
    if a.cmd == "measure":
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        measure(a.out, a.only, a.smoke)
    elif a.cmd == "predict":
        print(json.dumps(predict_other(a.dir, a.card, a.out), indent=1))
    else:
        print(report(a.dirs, a.md))


if __name__ == "__main__":
    main()
