"""Bad input, second round (issue 27, a first part): each case is one clear exit-2 error from
`fitrun validate` (what `train` and `tune` run first), never a traceback, or a warning where a setting
cannot take effect."""

import json

import pytest

from runner.cli import main

JOB = "jobs/tiny-cpu.yaml"


@pytest.mark.parametrize("override,expected", [
    ("training.learning_rate=.inf", "training.learning_rate: Input should be a finite number"),
    ("training.num_epochs=.inf", "training.num_epochs: Input should be a finite number"),
    ("tracking.experiment_name=''", "tracking.experiment_name: String should have at least 1 character"),
    ("lora.target_modules=[]", "lora.target_modules: Value should have at least 1 item"),
    ("data.sequence_len=1", "data.sequence_len: Input should be greater than or equal to 2"),
    ("tracking.tracking_uri=ftp://host/runs", "not ftp://"),
    ("training.seed=[unclosed", "the value '[unclosed' is not valid YAML"),
])
def test_a_bad_job_field_is_one_clear_error(root, monkeypatch, capsys, override, expected):
    monkeypatch.chdir(root)
    assert main(["validate", JOB, "--set", override]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_a_key_given_twice_names_both_lines(root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(root)
    text = (root / JOB).read_text().replace("data:\n", "data:\n", 1)
    job = tmp_path / "twice.yaml"
    job.write_text(text.replace("../data/", f"{root}/data/") + "training:\n  max_steps: 3\n")
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr().err
    lines = [i + 1 for i, line in enumerate(job.read_text().splitlines()) if line.startswith("training:")]
    assert f"the key 'training' appears twice, on lines {lines[0]} and {lines[1]}" in err


@pytest.mark.parametrize("space,expected", [
    ("activation_checkpointing: {placements: []}", "placements: List should have at least 1 item"),
    ("lora_r: [0, -8, 4]", "lora_r.0: Input should be greater than 0"),
    ("gradient_accumulation_steps: [0, 1]", "gradient_accumulation_steps.0: Input should be greater than 0"),
    ("gpu_memory_gib: 1\nsafety_margin_gib: 2", "safety_margin_gib (2.0) must be less than gpu_memory_gib"),
    ("activation_checkpointing: {policies: [selective], offloads: [true]}", "no configuration to try"),
])
def test_validate_space_refuses_what_tune_would(root, tmp_path, monkeypatch, capsys, space, expected):
    """`validate --space` refuses, with exit 2, every space `tune` could not run, before Ray starts."""
    monkeypatch.chdir(root)
    path = tmp_path / "space.yaml"
    path.write_text(("gpu_memory_gib: 1\n" if "gpu_memory_gib" not in space else "") + space + "\n")
    assert main(["validate", JOB, "--space", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_settings_that_cannot_apply_warn_once(root, monkeypatch, capsys):
    monkeypatch.chdir(root)
    assert main(["validate", JOB, "--set", "training.max_steps=2", "--set", "training.eval_steps=2",
                 "--set", "data.val_fraction=0"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: training.warmup_steps (5) >= training.max_steps (2)") == 1
    assert err.count("no eval split, nothing is evaluated") == 1


def test_what_the_cluster_cannot_provide_is_refused_before_the_job_waits(root, monkeypatch):
    from runner.loading import load_job
    from runner.spec import SpecError
    from runner.train.driver import check_cluster_resources

    monkeypatch.chdir(root)
    two_cores = [{"CPU": 2.0, "memory": 1e10}]
    check_cluster_resources(load_job(JOB), two_cores)
    with pytest.raises(SpecError, match="cpus_per_worker: 64 per worker, but the largest node has 2 CPU"):
        check_cluster_resources(load_job(JOB, ["resources.cpus_per_worker=64"]), two_cores)
    with pytest.raises(SpecError, match="3 workers x 1 CPU = 3, but the cluster has 2 CPU in all"):
        check_cluster_resources(load_job(JOB, ["resources.num_workers=3", "training.gradient_accumulation_steps=1",
                                               "training.micro_batch_size=1"]), two_cores)
    with pytest.raises(SpecError, match="this Ray cluster has no GPU"):
        check_cluster_resources(load_job(JOB, ["resources.use_gpu=true"]), two_cores)


def test_a_busy_cluster_says_what_the_job_waits_for(root, monkeypatch):
    from runner.loading import load_job
    from runner.train.driver import waiting_for

    monkeypatch.chdir(root)
    assert waiting_for(load_job(JOB), {"CPU": 2.0}) is None
    line = waiting_for(load_job(JOB, ["resources.num_workers=2", "training.gradient_accumulation_steps=1"]), {"CPU": 1.0})
    assert line.startswith("waiting for the cluster: this job needs 2 CPU (2 worker(s) x 1), 1 free now;")
    assert "GPU" in waiting_for(load_job(JOB, ["resources.use_gpu=true"]), {"CPU": 4.0})


def test_a_non_finite_loss_stops_training():
    from runner.train.worker import _check_finite

    _check_finite({"loss": 1.0, "grad_norm": 2.0}, 3, scaled=False)
    _check_finite({"loss": 1.0, "grad_norm": float("inf")}, 3, scaled=True)  # the scaler skips that step
    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 7"):
        _check_finite({"loss": float("nan"), "grad_norm": 2.0}, 7, scaled=True)
    with pytest.raises(FloatingPointError, match="grad_norm inf"):
        _check_finite({"loss": 1.0, "grad_norm": float("inf")}, 7, scaled=False)


def test_a_search_that_stops_never_leaves_its_parent_running(root, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from runner.loading import load_job, load_search_space
    from runner.storage import Location
    from runner.tracking import start_run
    from runner.tune.driver import _parent_closed_if_stopped
    from runner.tune.session import Search

    monkeypatch.chdir(root)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    job, space = load_job(JOB), load_search_space("search_spaces/tiny-cpu.yaml")
    for error, status in ((RuntimeError("boom"), "FAILED"), (SystemExit(130), "KILLED")):
        search = Search(job, space, uri, start_run(uri, "x", "tune"), Location(str(tmp_path)))
        with pytest.raises(type(error)), _parent_closed_if_stopped(search):
            raise error
        run = MlflowClient(uri).get_run(search.parent_id)
        assert run.info.status == status and run.data.tags["fitrun.end_reason"]


@pytest.mark.parametrize("files,expected,reads", [
    (["a.jsonl", "b.parquet"], "mixes file types", None),
    (["dev.jsonl"], "holds only held-out files (dev.jsonl)", None),
    (["train.jsonl", "test.jsonl"], "not reading test.jsonl", ["train.jsonl"]),
    (["a.jsonl", "b.jsonl"], None, ["a.jsonl", "b.jsonl"]),
])
def test_preflight_and_the_loader_read_the_same_files(root, tmp_path, monkeypatch, capsys, files, expected, reads):
    """One rule decides what a data directory contributes: preflight counts what the loader reads, and
    a file that will not be read is named."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from runner.data import load_rows
    from runner.loading import load_job

    monkeypatch.chdir(root)
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    data = tmp_path / "d"
    data.mkdir()
    for i, name in enumerate(files):
        rows = [row] * (5 + i)
        if name.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist(rows), data / name)
        else:
            (data / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code = main(["validate", JOB, "--set", f"data.path={data}", "--set", "data.val_fraction=0"])
    err = capsys.readouterr().err
    if reads is None:
        assert code == 2 and expected in err and "Traceback" not in err
        return
    assert code == 0 and (expected is None or expected in err)
    spec = load_job(JOB, [f"data.path={data}"])
    assert len(load_rows(spec.data)) == sum(5 + files.index(name) for name in reads)


def test_alpaca_rows_without_text_are_dropped_not_trained_as_none(root, tmp_path, monkeypatch, tokenizer):
    from runner.data import tokenize
    from runner.loading import load_job

    monkeypatch.chdir(root)
    rows = [{"instruction": None, "input": "", "output": "x"}, {"instruction": "Say hi", "input": None, "output": "hi"},
            {"instruction": "Add", "input": "1+1", "output": None}]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = load_job(JOB, [f"data.path={path}", "data.format=alpaca", "data.val_fraction=0", "data.packing=false"])
    data = tokenize(spec.data, tokenizer)
    assert data.accounting["dropped_missing_text"] == 2 and len(data.train) == 1
    assert "None" not in tokenizer.decode(data.train[0]["input_ids"])


def test_a_chat_template_that_does_not_compile_is_refused(root, monkeypatch, capsys):
    monkeypatch.chdir(root)
    assert main(["validate", JOB, "--set", "tokenizer.chat_template='{% for m in messages %}{{ m.content }'"]) == 2
    assert "tokenizer.chat_template: not a Jinja template" in capsys.readouterr().err
