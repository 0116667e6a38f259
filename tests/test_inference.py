"""After the run (issue 28, a first part): `fitrun generate` is the PEFT model's own greedy decode, and
`fitrun export --merged` writes a plain Transformers model whose logits are the PEFT model's."""

import json
import subprocess
import sys

import pytest
import torch


@pytest.fixture()
def output_dir(root, tmp_path, monkeypatch):
    """An output folder as `fitrun train` leaves it (adapter/ in PEFT format, job.resolved.json), with a
    non-zero adapter, written here from the tiny job without a training run."""
    from runner.loading import load_job
    from runner.model import build_base, build_tokenizer, wrap_lora
    from runner.train.driver import SPEC_FILE, absolute_paths

    monkeypatch.chdir(root)
    spec = absolute_paths(load_job("jobs/tiny-cpu.yaml", [f"output_dir={tmp_path}/out"]))
    tok = build_tokenizer(spec.tokenizer, spec.model)
    model = wrap_lora(build_base(spec.model, torch.device("cpu"), len(tok), spec.training.seed), spec.lora)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    out = tmp_path / "out"
    model.save_pretrained(out / "adapter")
    (out / SPEC_FILE).write_text(json.dumps(spec.to_dict()))
    return out, model, tok, spec


def test_generate_is_the_peft_models_greedy_decode(output_dir):
    from runner.data import prompt_ids
    from runner.inference.generate import generate

    out, model, tok, spec = output_dir
    model.eval()
    ids = prompt_ids(spec.data, tok, "Say hi")
    assert tok.decode(ids).startswith("<|begin_of_text|><|start_header_id|>user")  # the job's chat template
    expected = []
    with torch.no_grad():  # greedy by hand: argmax of the last position, one token at a time
        seq = torch.tensor([ids])
        for _ in range(12):
            nxt = int(model(input_ids=seq).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            expected.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    got = generate(str(out), "Say hi", max_new_tokens=12, stream=False)
    assert got == tok.decode(expected, skip_special_tokens=True)


def test_export_merged_is_a_plain_model_with_the_peft_logits(output_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runner.inference.export import export_merged

    out, model, tok, _ = output_dir
    dest = export_merged(str(out), str(tmp_path / "merged"))
    assert (dest / "model.safetensors").is_file() and (dest / "tokenizer.json").is_file()
    assert "AutoModelForCausalLM.from_pretrained" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(dest)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.tensor([AutoTokenizer.from_pretrained(dest).encode("hello there")])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_an_output_folder_without_an_adapter_is_one_clear_error(root, tmp_path, monkeypatch, capsys):
    from runner.cli import main

    monkeypatch.chdir(root)
    assert main(["generate", str(tmp_path), "--prompt", "hi"]) == 2
    assert "no finished job here" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_generate_and_export_after_fitrun_train(root, finished, tmp_path):
    """The commands on what `fitrun train` really wrote."""
    trained, _ = finished
    env_cmd = [sys.executable, "-m", "runner"]
    gen = subprocess.run([*env_cmd, "generate", str(trained / "out"), "--prompt", "Say hi", "--max-new-tokens", "8"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    exp = subprocess.run([*env_cmd, "export", str(trained / "out"), "--merged", str(tmp_path / "m")], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert exp.returncode == 0 and (tmp_path / "m" / "config.json").is_file(), exp.stderr[-2000:]
    # `fitrun train` logged the adapter as its run's MLflow model, and printed where the runs are.
    summary = json.loads(finished[1].stdout[finished[1].stdout.rindex("\n{\n") + 1:])
    assert summary["mlflow_model_uri"].startswith("models:/")
    assert "#/experiments/" in finished[1].stdout and "workflowType=machine_learning" in finished[1].stdout


def test_the_adapter_is_an_mlflow_model_that_loads_and_registers(output_dir, tmp_path):
    """MLflow's transformers flavor in its PEFT form: adapter weights only, the base referenced (a small random
    base saved beside the output), a registered version linked to the run, and `load_model` giving back the
    PEFT model's logits."""
    import mlflow
    from mlflow import MlflowClient

    from runner.registry import log_adapter_model
    from runner.tracking import start_run

    out, model, tok, spec = output_dir
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = start_run(uri, spec.tracking.experiment_name, "train")
    model_uri = log_adapter_model(spec, out / "adapter", out, uri, run_id, {"tokens_per_s": 1234.5, "peak_gib": 0.01},
                                  register="tiny-adapter")
    assert (out / "base" / "config.json").is_file()  # the random base, from the job's seed
    client = MlflowClient(uri)
    (version,) = client.search_model_versions("name='tiny-adapter'")
    assert version.run_id == run_id and version.source == model_uri
    logged = mlflow.get_logged_model(model_uri.removeprefix("models:/"))
    assert logged.source_run_id == run_id and logged.tags["fitrun.tokens_per_s"] == "1234.5"
    assert len(logged.tags["fitrun.data_digest"]) == 32
    mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "dl"))
    artifacts = {p.name for p in (tmp_path / "dl").rglob("*")}
    assert "adapter_model.safetensors" in artifacts and "model.safetensors" not in artifacts  # no base weights copied

    pipe = mlflow.transformers.load_model(model_uri)
    ids = torch.tensor([tok("hello world, a test").input_ids])
    model.eval()
    with torch.no_grad():
        assert torch.equal(pipe.model(ids).logits, model(ids).logits)


def test_a_big_random_base_is_not_logged_as_a_model(root, monkeypatch, capsys):
    """A dry run of the 8B (random weights) has no model to load: the adapter stays files only, said once."""
    from runner.loading import load_job
    from runner.registry import base_reference

    monkeypatch.chdir(root)
    spec = load_job("jobs/llama3-8b-lora.yaml", ["model.init=random"])
    ref = base_reference(spec, None)
    assert ref.path is None and "random-init dry run (8.0B parameters)" in ref.why_not


def test_an_adapter_trained_on_a_quantized_base_generates_and_exports_on_the_full_base(output_dir, tmp_path, capsys):
    """An nf4-trained job's output (a GPU job): `generate` and `export` load the unquantized base and put the plain
    PEFT adapter on it, here on the CPU; export says what it merged into."""
    from runner.inference.export import export_merged
    from runner.inference.generate import generate
    from runner.train.driver import SPEC_FILE

    out, model, tok, spec = output_dir
    quantized = spec.model_copy(update={"model": spec.model.model_copy(update={"quantization": "nf4"}),
                                        "resources": spec.resources.model_copy(update={"use_gpu": True})})
    (out / SPEC_FILE).write_text(json.dumps(quantized.to_dict()))
    model.eval()
    ids = torch.tensor([tok("hello").input_ids])
    assert generate(str(out), "Say hi", max_new_tokens=4, stream=False) == \
        generate(str(out), "Say hi", max_new_tokens=4, stream=False)  # deterministic, and it runs
    export_merged(str(out), str(tmp_path / "merged"))
    assert "trained on a nf4 base, merged into the unquantized" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").float()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, model(ids).logits, atol=5e-2)
