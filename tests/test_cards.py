"""The GPU catalogue: a fit is the whole process against the card's real total, a search for a card never
proposes what the card cannot run, and every card answers `fitrun estimate --cards`."""

import json

import pytest

from runner.cards import MEASURED_ON, allocator_budget_gib, find_card, fit_on, load_catalogue, outside_allocator_gib
from runner.loading import load_job, load_search_space
from runner.spec import SpecError, space_for_card

REQUIRED = ("T4", "V100-16GB", "V100-32GB", "A10G", "L4", "L40S", "RTX-3090", "RTX-4090", "RTX-5090", "A100-40GB",
            "A100-80GB", "H100-PCIe", "H100", "H200")


def test_catalogue_has_the_cards_and_says_where_each_value_comes_from():
    cards = load_catalogue()
    assert set(REQUIRED) <= set(cards)
    for card in cards.values():
        assert card.sources, card.name  # every card names its sources, and lists what is unconfirmed
        assert set(card.unconfirmed) <= {"memory_total_mib", "fp16_tflops", "bf16_tflops", "fp8_tflops",
                                         "price_usd_hour", "bandwidth_gbs"}
    assert find_card("nvidia h100 80gb hbm3", cards).name == "H100" and find_card("rtx 4090", cards).name == "RTX-4090"
    assert find_card("nope", cards) is None
    # bf16 needs 8.0, fp8 8.9
    assert cards["T4"].can_run("bfloat16", "none") and not cards["T4"].can_run("float16", "nf4")
    assert cards["A10G"].can_run("bfloat16", "fp8") and not cards["A10G"].can_run("bfloat16", "nf4")
    assert not cards["L4"].can_run("bfloat16", "fp8")


def test_a_fit_is_the_whole_process_against_the_drivers_total():
    cards = load_catalogue()
    l4 = cards["L4"]
    outside, source = outside_allocator_gib(l4, cards)
    assert outside == pytest.approx(760 / 1024) and MEASURED_ON in source
    # The issue's own run: the shipped fp8 job at 23.14 GiB reserved does not fit an L4, though 23.14 < 24.
    f = fit_on(l4, cards, 23.14, "bfloat16", "fp8")
    assert not f.fits and f.device_gib == pytest.approx(23.14 + 760 / 1024) and f.total_gib == pytest.approx(22.49, abs=0.01)
    assert fit_on(l4, cards, 20.0, "bfloat16", "fp8").fits
    assert allocator_budget_gib(l4, cards) == pytest.approx((23034 - 760) / 1024)
    assert fit_on(cards["A10G"], cards, 10.0, "bfloat16", "fp8").cannot_run
    # Several workers: NCCL's buffers are not measured, and the fit says so rather than leave them out silently.
    assert f.not_included is None and "NCCL" in fit_on(l4, cards, 20.0, workers=2).line()


def test_a_users_catalogue_adds_and_replaces_cards(tmp_path, monkeypatch):
    extra = tmp_path / "cards.yaml"
    extra.write_text("cards:\n  - {name: L4, memory_total_mib: 20000, compute_capability: 8.9, sources: {x: y}}\n"
                     "  - {name: My-Card, aliases: [mine], memory_total_mib: 12000, compute_capability: 8.6, "
                     "sources: {x: y}}\n")
    cards = load_catalogue(str(extra))
    assert cards["L4"].memory_total_mib == 20000 and find_card("mine", cards).name == "My-Card"
    monkeypatch.setenv("FITRUN_GPU_CATALOGUE", str(extra))
    assert "My-Card" in load_catalogue()


def test_a_job_for_a_card_refuses_what_the_card_cannot_run(root, monkeypatch):
    monkeypatch.chdir(root)
    free = ["resources.gpu_memory_gib=null"]
    with pytest.raises(SpecError, match="A10G .* has no fp8 tensor cores"):
        load_job("jobs/llama3-8b-lora-24gb.yaml", [*free, "resources.gpu=A10G"])
    with pytest.raises(SpecError, match="T4 .* has no bf16: set model.dtype: float16"):
        load_job("jobs/llama3-8b-lora-24gb.yaml", [*free, "resources.gpu=T4", "model.quantization=nf4"])
    with pytest.raises(SpecError, match="unknown GPU 'B300'; known: T4, "):
        load_job("jobs/llama3-8b-lora-24gb.yaml", [*free, "resources.gpu=B300"])
    with pytest.raises(SpecError, match="not both"):
        load_job("jobs/llama3-8b-lora-24gb.yaml", ["resources.gpu=L4"])
    job = load_job("jobs/llama3-8b-lora-24gb.yaml", [*free, "resources.gpu=L4"])
    assert job.resources.gpu == "L4"


@pytest.mark.parametrize("card,dtype", [("A10G", "auto"), ("T4", "float16"), ("L4", "auto")])
def test_a_search_for_a_card_never_proposes_what_it_cannot_run(root, monkeypatch, card, dtype):
    """`--gpu A10G` never yields fp8; `--gpu T4` never yields bf16 (its job computes in float16); the
    ceiling is the card's allocator budget."""
    from runner.spec import compute_dtype
    from runner.tune.search import expand

    monkeypatch.chdir(root)
    job = load_job("jobs/llama3-8b-lora.yaml", ["model.init=random", f"resources.gpu={card}", f"model.dtype={dtype}"])
    space = space_for_card(job, load_search_space("search_spaces/fit-24gb-quant.yaml"))
    columns, _ = expand(job, space, num_layers=32)
    quantizations = {c.quantization for c in columns}
    dtypes = {compute_dtype(job.model.dtype, c.quantization, True) for c in columns}
    cards = load_catalogue()
    assert space.gpu_memory_gib == pytest.approx(allocator_budget_gib(cards[card], cards), abs=1e-3)
    if card == "A10G":
        assert quantizations and "fp8" not in quantizations
    if card == "T4":
        assert dtypes == {"float16"} and "fp8" not in quantizations
    if card == "L4":
        assert "fp8" in quantizations


def test_estimate_for_a_card_and_for_every_card(root, monkeypatch, capsys):
    """`--gpu NAME --json` has device_gib, fits and gpu; `--cards` prints every catalogued card; an
    unknown name is one clear error; `--max sequence_len` is the longest that fits."""
    from runner.cli import main

    monkeypatch.chdir(root)
    tiny_gpu = ["jobs/tiny-cpu.yaml", "--set", "resources.use_gpu=true"]
    assert main(["estimate", *tiny_gpu, "--gpu", "T4", "--set", "model.dtype=float16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpu"] == "T4" and out["fits"] is True
    assert out["device_gib"] == pytest.approx(out["peak_reserved_gib"] + 760 / 1024)
    assert main(["estimate", *tiny_gpu, "--cards"]) == 0
    table = capsys.readouterr().out
    for name in load_catalogue():
        assert f"\n{name} " in table, name
    assert main(["estimate", *tiny_gpu, "--gpu", "B300"]) == 2
    assert "unknown GPU 'B300'" in capsys.readouterr().err
    assert main(["estimate", *tiny_gpu, "--gpu", "T4", "--set", "model.dtype=float16", "--max", "sequence_len",
                 "--json"]) == 0
    longest = json.loads(capsys.readouterr().out)
    assert longest["max_sequence_len"] >= 4096 and longest["fit"]["fits"]


def test_loss_scaling_keeps_the_training_math(root, monkeypatch):
    """A float16 job scales its loss for backward and unscales before clipping: with a power-of-two
    scale the step is the same step (checked in float32 on the CPU, where it is exact)."""
    import torch
    from conftest import tiny_batch, tiny_model

    def one_step(scaler):
        model = tiny_model()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        loss = model(**tiny_batch()).loss
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        return norm, [p.detach().clone() for p in params]

    norm, ref = one_step(None)
    scaled_norm, got = one_step(torch.amp.GradScaler("cpu", init_scale=2.0**10))
    assert torch.equal(norm, scaled_norm) and all(torch.equal(a, b) for a, b in zip(ref, got))
