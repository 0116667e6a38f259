"""The step-time model (runner.estimate.speed): exact properties of its accounting on CPU, its calibration on
this CPU, and the tuner's use of it. Its accuracy on GPUs is measured in bench/results/predict-*.md."""

import random
import statistics
from dataclasses import replace

import pytest
import torch

from runner.cards import find_card, load_catalogue
from runner.estimate import speed
from runner.estimate.trace import estimate
from runner.loading import load_job
from runner.tune.search import Config, FitSearcher, at_k, classify

JOB = "jobs/llama3-8b-lora.yaml"


def job(*sets):
    return load_job(JOB, ["model.init=random", *sets])


def h100_like() -> speed.Calibration:
    """A calibration with round H100-like rates (not a measurement: the tests check the accounting)."""
    per_flop = {"bf16": 1 / 600e12, "bf16-compile": 1 / 600e12, "fp8": 1 / 800e12, "fp8-compile": 1 / 1000e12,
                "nf4": 1 / 550e12}
    per_weight = {"nf4": 3e-12}
    linear = {k: {d: [per_weight.get(k, 0.0), f] for d in ("forward", "backward")} for k, f in per_flop.items()}
    return speed.Calibration(card="H100", torch=torch.__version__, source="test", shape={}, linear=linear,
                             attention_tflops={"1024": 300.0, "4096": 450.0}, bandwidth_gbs=3000.0, launch_us=5.0)


@pytest.fixture(scope="module")
def estimates():
    specs = {name: job(*sets) for name, sets in {
        "k0": ["activation_checkpointing.layers=all", "activation_checkpointing.layers=none"],
        "k32": ["activation_checkpointing.layers=all"],
        "fp8-k12": ["model.quantization=fp8", "training.compile=true", "training.micro_batch_size=2",
                    "training.gradient_accumulation_steps=8", "activation_checkpointing.layers=none",
                    "activation_checkpointing.count=12"],
    }.items()}
    return {name: (spec, estimate(spec)) for name, spec in specs.items()}


def test_terms_add_up_and_recompute_costs_time(estimates):
    cal = h100_like()
    for spec, est in estimates.values():
        p = speed.predict(est, spec, cal)
        assert p.step_s == pytest.approx(sum(p.terms_s.values()))
        tokens = est.tokens * spec.training.gradient_accumulation_steps
        assert p.tokens_per_s == pytest.approx(tokens / p.step_s)
        assert set(p.terms_s) == set(speed.TERMS)
    (s0, e0), (s32, e32) = estimates["k0"], estimates["k32"]
    p0, p32 = speed.predict(e0, s0, cal), speed.predict(e32, s32, cal)
    assert p0.terms_s["recompute"] == 0 < p32.terms_s["recompute"]
    assert p32.tokens_per_s < p0.tokens_per_s
    # every layer recomputed: one more forward of each frozen linear per layer, on top of forward + backward
    assert p32.terms_s["recompute"] > 0.4 * p32.terms_s["matmul"] / 2


def test_refit_recovers_the_coefficients_that_made_the_measurements(estimates):
    """Measurements made by the model itself with known coefficients: the refit (no pull toward the priors)
    finds them, and predicts every config exactly."""
    cal = h100_like()
    truth = {**speed.PRIORS, "matmul": 1.15, "attention": 1.3, "memory_eager": 0.8, "memory_compiled": 0.3,
             "launch_eager": 2.0, "launch_compiled": 0.5, "optimizer": 1.0, "overhead_s": 0.02, "micro_overhead_s": 0.002}
    true_cal = replace(cal, coefficients=truth)
    rng = random.Random(0)
    observations, specs = [], []
    for i in range(14):
        levers = dict(q=rng.choice(["none", "fp8"]), compile=rng.choice([True, False]), k=rng.choice([0, 8, 16, 32]),
                      mb=rng.choice([1, 2]), seq=rng.choice([1024, 2048]))
        spec = job(f"model.quantization={levers['q']}", f"training.compile={str(levers['compile']).lower()}",
                   "activation_checkpointing.layers=none", f"activation_checkpointing.count={levers['k']}",
                   f"training.micro_batch_size={levers['mb']}", f"training.gradient_accumulation_steps={16 // levers['mb']}",
                   f"data.sequence_len={levers['seq']}")
        est = estimate(spec)
        observations.append(speed.observation(est, spec, cal, speed.predict(est, spec, true_cal).tokens_per_s, str(i)))
        specs.append((spec, est))
    fitted = speed.refit(cal, observations, strength=0.0)
    # (the optimizer's and the per-step overhead's shares are alike at one rank: only their sum is identified)
    for name in ("matmul", "attention", "memory_eager", "memory_compiled", "launch_eager"):
        assert fitted.coefficients[name] == pytest.approx(truth[name], rel=1e-3), name
    assert fitted.error_pct < 1e-6
    for spec, est in specs:
        assert speed.predict(est, spec, fitted).tokens_per_s == pytest.approx(speed.predict(est, spec, true_cal).tokens_per_s)


def test_another_card_is_the_calibration_scaled_by_the_datasheets(estimates):
    catalogue = load_catalogue()
    h100, l4 = find_card("H100", catalogue), find_card("L4", catalogue)
    cal = h100_like()
    scaled = speed.for_card(cal, h100, l4)
    assert scaled.source.startswith("datasheet-scaled from H100")
    assert scaled.bandwidth_gbs == pytest.approx(cal.bandwidth_gbs * l4.bandwidth_gbs / h100.bandwidth_gbs)
    fwd = scaled.linear["fp8-compile"]["forward"][1]
    assert fwd == pytest.approx(cal.linear["fp8-compile"]["forward"][1] * h100.fp8_tflops / l4.fp8_tflops)
    spec, est = estimates["fp8-k12"]
    slow, fast = speed.predict(est, spec, scaled), speed.predict(est, spec, cal)
    assert slow.tokens_per_s < fast.tokens_per_s
    t4 = speed.for_card(cal, h100, find_card("T4", catalogue))  # no bf16: its jobs run fp16, at the fp16 rate
    assert "fp16" in t4.linear and "bf16" not in t4.linear and "fp8" not in t4.linear
    a10g = find_card("A10G", catalogue)  # no fp8 tensor cores: no fp8 rate to predict with
    with pytest.raises(ValueError, match="fp8"):
        speed.predict(est, spec, speed.for_card(cal, h100, a10g))


def test_this_cpus_calibration_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(speed.CACHE_ENV, str(tmp_path))
    spec = load_job("jobs/tiny-cpu.yaml")
    cal = speed.calibration_for(spec, None, load_catalogue())
    assert cal.source == "measured on CPU" and cal.bandwidth_gbs > 0 and cal.launch_us > 0
    assert all(r > 0 for r in cal.attention_tflops.values())
    again = speed.calibration_for(spec, None, load_catalogue())
    assert again == cal  # read back from the cache, not measured again
    p, card = speed.predict_job(spec, estimate(spec), None, load_catalogue())
    assert card == "CPU" and p.tokens_per_s > 0


def test_a_gpu_job_without_a_card_in_hand_uses_the_shipped_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv(speed.CACHE_ENV, str(tmp_path))
    if not speed.shipped():
        pytest.skip("no calibration shipped yet")
    spec = load_job("jobs/llama3-8b-lora-l4.yaml", ["model.init=random"])
    catalogue = load_catalogue()
    assert all(find_card(c.card, catalogue) for c in speed.shipped())  # each names a catalogued card
    p, card = speed.predict_job(spec, estimate(spec), find_card("L4", catalogue), catalogue)
    assert card == "L4" and "datasheet-scaled" in p.source and p.tokens_per_s > 0


def test_a_card_with_its_own_shipped_calibration_is_predicted_from_it_unscaled(tmp_path, monkeypatch):
    monkeypatch.setenv(speed.CACHE_ENV, str(tmp_path))
    catalogue = load_catalogue()
    ships = {find_card(c.card, catalogue).name: c for c in speed.shipped()}
    if len(ships) < 2:
        pytest.skip("fewer than two cards' calibrations shipped")
    spec = load_job("jobs/llama3-8b-lora-24gb.yaml", ["model.init=random"])
    for name, cal in ships.items():
        p, _ = speed.predict_job(spec, estimate(spec), find_card(name, catalogue), catalogue)
        assert p.source == cal.source and "datasheet-scaled" not in p.source


def oracle_speed(c: Config) -> float:
    return 10000.0 / (1 + 0.02 * c.k) * (1 + 0.1 * (c.micro_batch_size - 1)) * (1 - 0.001 * c.r)


def oracle_gib(c: Config) -> float:
    return 15.0 + 0.004 * c.r + c.micro_batch_size * (0.55 * (32 - c.k) + 1.5) + 0.3


def run_search(searcher: FitSearcher) -> list[Config]:
    launched = []
    while (c := searcher.next_config()) != "done":
        launched.append(c)
        searcher.record(c, classify({"peak_gib": oracle_gib(c), "tokens_per_s": oracle_speed(c), "oom": 0},
                                    searcher.limit_gib))
    return launched


def test_the_speed_guided_search_probes_fewer_configs_for_the_same_winner():
    """Predicted speeds within 5% of the truth: the searcher tries the fastest columns first and skips the
    columns that cannot beat what it measured; its winner is the exhaustive search's."""
    columns = [Config(r, mb, 16 // mb, "first", None) for r in (8, 16) for mb in (1, 2, 4, 8)]
    ks = list(range(33))
    rng = random.Random(1)
    grid = [at_k(col, k) for col in columns for k in ks]
    predicted = {c.key: oracle_gib(c) for c in grid}
    plain = FitSearcher(columns, ks, 23.5, dict(predicted), prune_dominated=False)
    guided = FitSearcher(columns, ks, 23.5, dict(predicted), prune_dominated=False)
    guided.speed, guided.speed_error = {c.key: oracle_speed(c) * rng.uniform(0.95, 1.05) for c in grid}, 0.05
    all_probes, few_probes = run_search(plain), run_search(guided)

    def winner(s):
        return max(s.best_per_column(), key=lambda r: r["tokens_per_s"])["config"]
    assert winner(guided) == winner(plain)
    assert len(few_probes) < len(all_probes) / 2, (len(few_probes), len(all_probes))
    assert guided.outpaced and not plain.outpaced


def test_fitrun_estimate_prints_the_predicted_speed(root, monkeypatch, tmp_path, capsys):
    import json

    from runner.cli import main

    monkeypatch.chdir(root)
    monkeypatch.setenv(speed.CACHE_ENV, str(tmp_path))
    assert main(["estimate", "jobs/tiny-cpu.yaml"]) == 0
    out = capsys.readouterr().out
    assert "speed on CPU: ~" in out and "tokens/s predicted" in out and "dominant:" in out
    assert main(["estimate", "jobs/tiny-cpu.yaml", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["predicted_tokens_per_s"] > 0 and doc["speed"]["card"] == "CPU"
    assert set(doc["speed"]["terms_s"]) == set(speed.TERMS)


def test_the_cheapest_card_table(tmp_path):
    """--gpus: each card's fastest config that fits it and that it can run, by $ per 1M tokens; prices from the
    catalogue or a file; a card not in hand is predicted, the searched card's measured winner stands."""
    from runner.loading import load_search_space
    from runner.spec import SpecError
    from runner.tune.cheapest import load_prices, parse_cards, rank_cards, table
    from runner.tune.search import expand

    catalogue = load_catalogue()
    base = job()
    space = load_search_space("search_spaces/fit-24gb-quant.yaml")
    columns, ks = expand(base, space, 32)
    columns = [c for c in columns if c.r == 16][:4]
    ks = [0, 16, 32]
    configs = [c.at_k(k) for c in columns for k in ks]
    from runner.tune.search import apply_config
    estimates = {c.key: estimate(apply_config(base, c, space.lora_alpha_rule)) for c in configs}
    cards = parse_cards("L4, A10G,H100", catalogue)
    (tmp_path / "prices.yaml").write_text("L4: 0.5\n")
    prices = load_prices(str(tmp_path / "prices.yaml"), cards, catalogue)
    assert prices["L4"] == 0.5 and prices["A10G"] == find_card("A10G", catalogue).price_usd_hour
    winner = configs[0]
    rows = rank_cards(base, space, configs, estimates, cards, catalogue, prices, h100_like(),
                      measured={"H100": {"config": winner, "tokens_per_s": 12000.0}})
    by_card = {r["gpu"]: r for r in rows}
    assert by_card["H100"]["source"] == "measured" and by_card["H100"]["tokens_per_s"] == 12000.0
    assert by_card["L4"]["source"].startswith("predicted (datasheet-scaled from H100")
    assert "fp8" not in (by_card["A10G"]["config"] or "")  # no fp8 tensor cores on an A10G
    costs = [r.get("usd_per_1m_tokens") or float("inf") for r in rows]
    assert costs == sorted(costs)
    for r in rows:
        if r.get("tokens_per_s"):
            assert r["usd_per_1m_tokens"] == pytest.approx(r["usd_per_hour"] / (r["tokens_per_s"] * 3600) * 1e6)
    assert "$ per 1M tokens" in table(rows)
    with pytest.raises(SpecError, match="unknown GPU"):
        parse_cards("L4,NoSuchCard", catalogue)
    (tmp_path / "bad.yaml").write_text("L4: -1\n")
    with pytest.raises(SpecError, match="positive"):
        load_prices(str(tmp_path / "bad.yaml"), cards, catalogue)


def test_launches_and_small_kernels_overlap_between_their_max_and_their_sum(estimates):
    """An eager step's host launches and its bandwidth-bound kernels overlap: together they cost more than the
    larger and less than the sum, and the two terms still add up to the step."""
    spec, est = estimates["k32"]  # eager bf16: launch-heavy
    cal = h100_like()
    raw = speed._work_seconds(est, spec, cal)
    t = speed.terms(est, spec, cal)
    accum = spec.training.gradient_accumulation_steps
    mode = "compiled" if spec.training.compile else "eager"
    memory = accum * cal.coefficients[f"memory_{mode}"] * raw["memory"]
    launch = accum * cal.coefficients[f"launch_{mode}"] * raw["launch"]
    assert max(memory, launch) < t["memory"] + t["launch"] < memory + launch
    assert speed.predict(est, spec, cal).step_s == pytest.approx(sum(t.values()))


def test_a_guide_whose_predictions_miss_widens_its_margin():
    """The margin a guided search prunes columns by is at least the model's latest misses on configs it predicted
    before measuring them: a model that missed by 3x prunes nothing on its predictions."""
    from runner.loading import load_search_space
    from runner.tune.guide import DEFAULT_ERROR, SpeedGuide
    from runner.tune.search import apply_config, expand

    base = job()
    space = load_search_space("search_spaces/fit-24gb.yaml")
    columns, _ = expand(base, space, 32)
    configs = [columns[0].at_k(32), columns[1].at_k(32)]
    estimates = {c.key: estimate(apply_config(base, c, space.lora_alpha_rule)) for c in configs}
    guide = SpeedGuide(base, space, h100_like(), estimates, configs)
    assert guide.error == DEFAULT_ERROR
    predicted = guide.predictions()
    guide.observe(configs[0], predicted[configs[0].key] * 3)  # the model was 3x too slow
    assert guide.error == pytest.approx(2 / 3)
    assert guide.cal.observations  # and it refitted


def test_refit_is_robust_to_one_config_measured_off_the_line(monkeypatch):
    """Observations made from known coefficients, one of them measured 40% slow (a noisy host): the fit recovers
    the others' step times, where least squares on all of them would tilt every coefficient."""
    import random

    rng = random.Random(0)
    true = {**speed.PRIORS, "matmul": 1.15, "memory_eager": 0.8, "launch_eager": 1.2}
    observations = []
    for i in range(8):
        work = {"matmul": rng.uniform(0.05, 0.3), "recompute_matmul": rng.uniform(0, 0.05),
                "recompute_attention": rng.uniform(0, 0.01), "attention": rng.uniform(0.01, 0.05),
                "memory": rng.uniform(0.01, 0.1), "launch": rng.uniform(0.01, 0.1), "optimizer": 0.01}
        o = {"name": f"c{i}", "work_s": work, "accum": rng.choice([4, 8, 16]), "compiled": i % 2 == 1}
        o["step_s"] = speed._step_s(true, o) * (1.4 if i == 0 else 1.0)
        observations.append(o)
    cal = speed.Calibration(card="X", torch="t", source="s", shape={}, linear={}, attention_tflops={},
                            bandwidth_gbs=1.0, launch_us=1.0)

    def clean_errors(fitted):
        return [abs(speed._step_s(fitted.coefficients, o) / o["step_s"] - 1) for o in observations[1:]]

    robust = speed.refit(cal, observations)
    monkeypatch.setattr(speed, "ROBUST_ROUNDS", 1)  # one round: plain least squares
    squares = speed.refit(cal, observations)
    assert max(clean_errors(robust)) < 0.04  # what is left: the priors' pull (the true coefficients are off them)
    assert max(clean_errors(robust)) < max(clean_errors(squares))
    assert statistics.median(clean_errors(robust)) < statistics.median(clean_errors(squares))
    assert robust.error_pct > squares.error_pct  # the off config is left off, not split among the rest


def test_a_fresh_machine_takes_the_shipped_calibration_of_its_own_card_torch_and_fp8_mode(tmp_path, monkeypatch):
    """The card in hand skips the microbenchmark where fitrun ships a calibration measured on that card with this
    torch, model shape and fp8 accumulation mode holding every kind asked for; anything else is measured."""
    from runner.quant import FAST_ACCUM_MODE

    monkeypatch.setenv(speed.CACHE_ENV, str(tmp_path))
    catalogue = load_catalogue()
    h100 = find_card("H100", catalogue)
    shape = {"hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "head_dim": 16}
    ship = speed.Calibration(card="H100", torch=torch.__version__, source="measured on an H100", shape=shape,
                             linear={"bf16": {}, "fp8-compile": {}}, attention_tflops={"1024": 1.0}, bandwidth_gbs=1.0,
                             launch_us=1.0, fp8_fast_accum=FAST_ACCUM_MODE)
    other_mode = replace(ship, fp8_fast_accum="none" if FAST_ACCUM_MODE != "none" else "all")
    monkeypatch.setattr(speed, "shipped", lambda: [other_mode, ship])
    got = speed.shipped_for(h100, shape, ["bf16", "fp8-compile"], catalogue)
    assert got is not None and got.fp8_fast_accum == FAST_ACCUM_MODE and got.source.startswith("shipped with fitrun")
    # its fitted coefficients are this machine's prior; another host's observations and band stay behind
    assert got.prior == ship.coefficients and got.observations == [] and got.error_pct is None
    assert speed.cached(h100.name, shape) == got  # stored as this machine's calibration
    assert speed.shipped_for(h100, shape, ["bf16", "nf4"], catalogue) is None  # a kind it lacks: measure
    assert speed.shipped_for(find_card("H200", catalogue), shape, ["bf16"], catalogue) is None  # another card
    monkeypatch.setattr(speed, "shipped", lambda: [replace(ship, torch="0.0")])
    assert speed.shipped_for(h100, shape, ["bf16"], catalogue) is None  # another torch


def test_refit_pulls_toward_the_calibrations_own_prior():
    """A calibration that starts from shipped coefficients keeps them where its observations say nothing new."""
    prior = {**speed.PRIORS, "matmul": 1.3, "launch_eager": 0.7}
    work = {"matmul": 0.2, "recompute_matmul": 0.0, "recompute_attention": 0.0, "attention": 0.02, "memory": 0.05,
            "launch": 0.05, "optimizer": 0.01}
    o = {"name": "c", "work_s": work, "accum": 8, "compiled": False}
    o["step_s"] = speed._step_s(prior, o)  # measured exactly as the prior predicts
    cal = speed.Calibration(card="X", torch="t", source="s", shape={}, linear={}, attention_tflops={},
                            bandwidth_gbs=1.0, launch_us=1.0, coefficients=dict(prior), prior=dict(prior))
    fitted = speed.refit(cal, [o])
    assert fitted.coefficients == pytest.approx(prior, rel=1e-4)
    assert speed.refit(replace(cal, prior=None), [o]).coefficients["matmul"] != pytest.approx(1.3, rel=1e-3)


def test_the_linear_microbenchmark_fits_a_line_through_its_token_counts():
    assert speed._line((1024, 2048, 4096), [3.0, 5.0, 9.0]) == pytest.approx((0.001953125, 1.0))
    slope, fixed = speed._line((1, 2, 3), [2.0, 2.1, 1.9])  # noise around a flat line: no negative time
    assert slope >= 0 and fixed >= 0
