import subprocess
import sys
from pathlib import Path

import pytest

from runner.loading import load_job, load_search_space, parse_overrides
from runner.spec import SpecError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = load_job(path)
    assert spec.global_batch_size >= 1


@pytest.mark.parametrize("path", sorted((ROOT / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_search_space_validates(path):
    load_search_space(path)


def test_all_problems_reported_at_once_with_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.yaml"
    bad.write_text("""
model: {preset: tiny, init: random, dtyp: float32}
data: {path: data/instructions.alpaca.jsonl, sequence_len: 0}
lora: {r: -4}
training: {micro_batch_size: 0, lr_scheduler: wavy}
activation_checkpointing: {layers: [0, 9]}
""")
    with pytest.raises(SpecError) as e:
        load_job(bad)
    msg = str(e.value)
    for expected in ("model.dtyp: unknown key", "data.sequence_len", "lora.r: Input should be greater than 0, got -4",
                     "training.micro_batch_size", "training.lr_scheduler"):
        assert expected in msg, msg
    assert len(e.value.problems) >= 5


def test_cross_field_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SpecError, match=r"model has 4 layers"):
        load_job(ROOT / "jobs/tiny-cpu.yaml", ["activation_checkpointing.count=null", "activation_checkpointing.layers=[0,7]"])
    with pytest.raises(SpecError, match="either activation_checkpointing.layers or"):
        load_job(ROOT / "jobs/tiny-cpu.yaml", ["activation_checkpointing.layers=all"])
    with pytest.raises(SpecError, match="gpu_memory_gib needs resources.use_gpu"):
        load_job(ROOT / "jobs/tiny-cpu.yaml", ["resources.gpu_memory_gib=24"])
    with pytest.raises(SpecError, match="does not exist"):
        load_job(ROOT / "jobs/tiny-cpu.yaml", ["data.path=./nope.jsonl"])


def test_overrides_parse_yaml_values():
    assert parse_overrides(["training.max_steps=50", "activation_checkpointing.layers=[1, 2]", "a.b=true"]) == {
        "training": {"max_steps": 50}, "activation_checkpointing": {"layers": [1, 2]}, "a": {"b": True}}


def test_cli_validate_exits_2_without_starting_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {preset: tiny}\ndata: {path: x.jsonl}\nbogus: 1\n")
    out = subprocess.run([sys.executable, "-m", "runner", "validate", str(bad)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert "bogus: unknown key" in out.stderr
    assert "model: set model.init: random" in out.stderr or "model.init: random" in out.stderr
    assert "ray" not in out.stdout.lower()


def test_validate_space_rejects_what_tune_rejects(root, monkeypatch, tmp_path, capsys):
    """`fitrun validate --space` runs the same space checks as `fitrun tune`: exit 2, every problem."""
    from runner.cli import main

    monkeypatch.chdir(root)
    bad = tmp_path / "space.yaml"
    bad.write_text("gradient_accumulation_steps: [3]\nactivation_checkpointing: {k: {min: 0, max: 99}}\n"
                   "lora_alpha_rule: import os\n")
    assert main(["validate", "jobs/tiny-cpu.yaml", "--space", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "[3] do not divide" in err and "must lie in 0..4" in err and "gpu_memory_gib: set a ceiling" in err
    assert "lora_alpha_rule" in err
    assert main(["validate", "jobs/tiny-cpu.yaml", "--space", str(bad), "--gpu-memory-gib", "1"]) == 2
    assert "gpu_memory_gib" not in capsys.readouterr().err
    layer_sets = tmp_path / "layer_sets.yaml"
    layer_sets.write_text("gpu_memory_gib: 1\nactivation_checkpointing: {layer_sets: [[0, 1]]}\n")
    assert main(["validate", "jobs/tiny-cpu.yaml", "--space", str(layer_sets)]) == 2
    assert "layer_sets: unknown key" in capsys.readouterr().err
    for space in sorted((root / "search_spaces").glob("*.yaml")):
        job = "jobs/tiny-cpu.yaml" if "tiny" in space.name else "jobs/llama3-8b-lora.yaml"
        two = ["--set", "resources.num_workers=2", "--set", "training.gradient_accumulation_steps=8"] \
            if "2gpu" in space.name else []
        # A card's space: the ceiling comes from the card.
        card = {"fit-l4.yaml": ["--gpu", "L4"], "fit-a10g.yaml": ["--gpu", "A10G"],
                "fit-16gb-card.yaml": ["--gpu", "RTX-4080"]}.get(space.name, [])
        assert main(["validate", job, "--set", "model.init=random", *two, *card, "--space", str(space)]) == 0, space


def test_paths_in_a_job_file_are_relative_to_its_folder(root, tmp_path, monkeypatch):
    """jobs/x.yaml says ../data/...; a job elsewhere reads files beside it; --set paths are the shell's."""
    monkeypatch.chdir(root)
    job = load_job("jobs/tiny-cpu.yaml")
    assert job.data.path == "data/instructions.messages.jsonl" and job.tokenizer.name_or_path == "data/tokenizer"
    (tmp_path / "d").mkdir()
    (tmp_path / "d/rows.jsonl").write_text((root / "data/instructions.messages.jsonl").read_text())
    text = (root / "jobs/tiny-cpu.yaml").read_text().replace("../data/instructions.messages.jsonl", "d/rows.jsonl")
    (tmp_path / "job.yaml").write_text(text.replace("../data/tokenizer", str(root / "data/tokenizer")))
    elsewhere = load_job(tmp_path / "job.yaml")
    assert elsewhere.data.path == str(tmp_path / "d/rows.jsonl")  # outside the current directory: absolute
    assert load_job(tmp_path / "job.yaml", ["data.path=data/instructions.alpaca.jsonl"]).data.path == \
        "data/instructions.alpaca.jsonl"
    (tmp_path / "old.yaml").write_text(text.replace("d/rows.jsonl", "data/instructions.messages.jsonl")
                                       .replace("../data/tokenizer", str(root / "data/tokenizer")))
    with pytest.raises(SpecError) as e:
        load_job(tmp_path / "old.yaml")  # written relative to the current directory: refused with the fix
    assert "relative to the file's folder" in str(e.value) and "data/instructions.messages.jsonl" in str(e.value)
    assert "hub" not in str(e.value)


def test_registering_a_model_is_checked_before_anything_runs(root, tmp_path, monkeypatch, capsys):
    """`--register NAME` (tracking.registered_model_name): a name MLflow accepts, a model to register, and for a
    search a winner that trains an adapter (its quality run)."""
    from runner.cli import main

    monkeypatch.chdir(root)
    assert main(["validate", "jobs/tiny-cpu.yaml", "--set", "tracking.registered_model_name=ok-name"]) == 0
    assert main(["validate", "jobs/tiny-cpu.yaml", "--set", "tracking.registered_model_name=a/b"]) == 2
    assert "registered_model_name" in capsys.readouterr().err
    assert main(["validate", "jobs/tiny-cpu.yaml", "--set", "tracking.registered_model_name=x",
                 "--set", "tracking.log_model=false"]) == 2
    assert "needs tracking.log_model: true" in capsys.readouterr().err
    space = tmp_path / "no-quality.yaml"
    space.write_text((root / "search_spaces/tiny-cpu.yaml").read_text().replace("quality_steps: 5", "quality_steps: 0"))
    assert main(["validate", "jobs/tiny-cpu.yaml", "--set", "tracking.registered_model_name=x", "--space", str(space)]) == 2
    assert "registers its winner's quality run" in capsys.readouterr().err
    assert main(["validate", "jobs/tiny-cpu.yaml", "--set", "tracking.registered_model_name=x",
                 "--space", "search_spaces/tiny-cpu.yaml"]) == 0


def test_expandable_segments_is_a_cuda_allocator_lever(monkeypatch):
    """On a CPU job it is said to have no effect; a hand-set PYTORCH_CUDA_ALLOC_CONF naming it is left alone."""
    from runner.memory import use_expandable_segments

    cpu = load_job("jobs/tiny-cpu.yaml", ["training.expandable_segments=true"])
    assert any("expandable_segments" in n for n in cpu.ineffective_settings())
    assert not load_job("jobs/tiny-cpu.yaml").ineffective_settings()
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    assert use_expandable_segments() is False


def test_a_field_added_since_a_run_started_is_no_change_at_its_default():
    """Resuming a run whose saved spec predates a field: absent and at its default is no change; set is."""
    from runner.train.driver import spec_changes

    spec = load_job("jobs/tiny-cpu.yaml")
    saved = spec.to_dict()
    del saved["training"]["expandable_segments"]
    assert spec_changes(saved, spec) == []
    changed = load_job("jobs/tiny-cpu.yaml", ["training.expandable_segments=true"])
    assert spec_changes(saved, changed) == ["training.expandable_segments: None -> True"]
