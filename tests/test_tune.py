"""The search under a memory ceiling: the structured searcher's logic, and a real search on CPU."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from browser import check_search_in_ui, chromium
from conftest import measure_in_process, serve_mlflow
from mlflow.tracking import MlflowClient

from runner.loading import load_job, load_search_space
from runner.spec import SpecError
from runner.tune.search import Config, FitSearcher, apply_config, at_k, classify, expand

CEILING = 24.0


def oracle_gib(c: Config) -> float:
    """An 8B-shaped memory surface: falls with k, rises with r and micro-batch."""
    return 15.0 + 0.004 * c.r + c.micro_batch_size * (0.55 * (32 - c.k) + 1.5) + 0.3


def brute_force_min_k(columns, ks, limit):
    best = {}
    for col in columns:
        fits = [k for k in ks if oracle_gib(at_k(col, k)) <= limit]
        best[col] = min(fits) if fits else None
    return best


def drive(searcher: FitSearcher, check_pruning: bool = True) -> list[Config]:
    launched = []
    while True:
        c = searcher.next_config()
        if c == "done":
            return launched
        assert c is not None  # sequential driving never waits
        for res in searcher.results.values() if check_pruning else ():  # never launch what is ruled out
            m = res["config"]
            assert res["feasible"] or not (m.placement == c.placement and c.r >= m.r and
                                           c.micro_batch_size >= m.micro_batch_size and c.k <= m.k)
        launched.append(c)
        peak = oracle_gib(c)
        searcher.record(c, classify({"peak_gib": peak, "tokens_per_s": 1000.0 / (1 + 0.02 * c.k), "oom": 0}, searcher.limit_gib))


@pytest.mark.parametrize("use_estimate", [True, False])
def test_fit_searcher_finds_every_columns_smallest_fitting_k(use_estimate):
    columns = [Config(r, 16 // a, a, "first", None) for r in (8, 16, 32, 64) for a in (16, 8, 4, 2)]
    ks = list(range(33))
    rng = random.Random(0)
    predicted = {at_k(col, k).key: oracle_gib(at_k(col, k)) * rng.uniform(0.97, 1.03)
                 for col in columns for k in ks} if use_estimate else {}
    searcher = FitSearcher(columns, ks, CEILING - 0.5, predicted, prune_margin_pct=8, prune_dominated=False)
    launched = drive(searcher)
    truth = brute_force_min_k(columns, ks, CEILING - 0.5)
    found = {res["config"].column: res["config"].k for res in searcher.best_per_column()}
    assert found == {col: k for col, k in truth.items() if k is not None}
    grid = len(columns) * len(ks)
    assert len(launched) <= 0.4 * grid, (len(launched), grid)
    if use_estimate:
        assert len(launched) <= 2.5 * len(columns)  # the estimate puts probes next to the boundary


def test_columns_without_a_prediction_are_measured_not_pruned():
    """Columns of a lever combination the estimate does not model get no prediction (predict_all): the searcher
    bisects them by measurement and still finds their boundary, while a wildly wrong prediction elsewhere would
    have pruned them."""
    columns = [Config(r, 16 // a, a, "first", None) for r in (8, 16) for a in (16, 8)]
    ks = list(range(33))
    modelled, unmodelled = columns[:2], columns[2:]
    predicted = {at_k(col, k).key: oracle_gib(at_k(col, k)) for col in modelled for k in ks}
    searcher = FitSearcher(columns, ks, CEILING - 0.5, predicted, prune_margin_pct=8, prune_dominated=False)
    drive(searcher)
    truth = brute_force_min_k(columns, ks, CEILING - 0.5)
    found = {res["config"].column: res["config"].k for res in searcher.best_per_column()}
    assert found == {col: k for col, k in truth.items() if k is not None}
    assert not any(key.startswith(tuple(c.at_k(0).key.rsplit("-k", 1)[0] for c in unmodelled))
                   for key in searcher.pruned)


def test_the_estimate_says_which_lever_combinations_it_does_not_model():
    from runner.estimate.trace import unmodelled
    from runner.loading import load_job

    def job(*sets):
        return load_job("jobs/llama3-8b-lora.yaml", ["model.init=random", *sets])
    assert unmodelled(job()) is None and unmodelled(job("model.quantization=fp8", "training.compile=true")) is None
    assert "selective" in unmodelled(job("activation_checkpointing.policy=selective", "training.compile=true"))
    assert "offload" in unmodelled(job("activation_checkpointing.offload=true"))
    assert "bitsandbytes" in unmodelled(job("model.quantization=nf4", "training.kernels=liger"))
    assert "int8" in unmodelled(job("model.quantization=int8", "training.compile=true"))
    assert unmodelled(job("activation_checkpointing.offload=true"), target="cpu") is None


def test_dominated_ranks_are_not_probed():
    columns = [Config(r, 1, 16, "first", None) for r in (8, 16, 64)]
    searcher = FitSearcher(columns, list(range(33)), CEILING - 0.5)
    launched = drive(searcher)
    assert {c.r for c in launched} == {8}
    assert set(searcher.dominated) == {Config(16, 1, 16, "first", None), Config(64, 1, 16, "first", None)}


def test_space_problems_reported_before_anything_runs(root, monkeypatch, tmp_path):
    monkeypatch.chdir(root)
    job = load_job("jobs/tiny-cpu.yaml")  # global batch 8
    bad = tmp_path / "space.yaml"
    bad.write_text("gradient_accumulation_steps: [3, 2]\nactivation_checkpointing: {k: {min: 0, max: 9}}\n"
                   "lora_alpha_rule: import os\n")
    with pytest.raises(SpecError) as e:
        expand(job, load_search_space(bad), num_layers=4)  # the same check as `fitrun validate --space`
    text = str(e.value)
    assert "[3] do not divide the job's global batch 8" in text
    assert "must lie in 0..4" in text and "gpu_memory_gib: set a ceiling" in text and "lora_alpha_rule" in text


def test_lever_dimensions_expand_into_columns_and_trial_jobs(root, monkeypatch, tmp_path):
    from runner.tune.search import apply_config, at_k

    monkeypatch.chdir(root)
    job = load_job("jobs/tiny-cpu.yaml")
    space = tmp_path / "space.yaml"
    space.write_text("gpu_memory_gib: 1\ngradient_accumulation_steps: [8]\nadapter_dtypes: [float32, mixed]\n"
                     "activation_checkpointing: {policies: [full, selective], offloads: [false, true]}\n")
    columns, _ = expand(job, load_search_space(space), num_layers=4)
    # 2 adapter dtypes x (full, full+offload, selective): offload works with full recompute only
    assert len(columns) == 6
    for column in columns:
        c = at_k(column, 2)
        trial = apply_config(job, c, "2*r")  # a valid job, carrying every lever of the config
        ac = trial.activation_checkpointing
        assert (ac.count, ac.policy, ac.offload, trial.lora.adapter_dtype) == (2, c.policy, c.offload, c.adapter_dtype)
    assert len({at_k(col, 2).key for col in columns}) == 6


# ---------------------------------------------------------------------------------------------
# A real search: CLI -> Ray Tune -> Train-inside-Tune probes on a local CPU cluster -> MLflow


def _measure(spec) -> tuple[float, float]:
    """Brute force, in-process and single-threaded like a one-CPU Ray worker: (peak GiB, s/micro-batch)."""
    torch.set_num_threads(1)
    return measure_in_process(spec, steps=4, pad_to_full=True)


def _tune_cli(tmp_path, tracking_uri: str | None = None, space: str = "search_spaces/tiny-cpu.yaml") -> list[str]:
    """`fitrun tune` on the tiny CPU job and space, writing only under tmp_path (and to `tracking_uri`)."""
    return [sys.executable, "-m", "runner", "tune", "jobs/tiny-cpu.yaml", str(space),
            "--set", f"output_dir={tmp_path}/out",
            "--set", f"tracking.tracking_uri={tracking_uri or f'sqlite:///{tmp_path}/mlflow.db'}"]


def _rest(url: str, endpoint: str, body: dict | None = None, **query) -> dict:
    """One call to MLflow's REST API, as the UI or a script reads a finished search."""
    import urllib.parse
    import urllib.request

    full = f"{url}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(full, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _rest_runs(url: str, experiment: str) -> list[dict]:
    exp = _rest(url, "experiments/get-by-name", experiment_name=experiment)["experiment"]
    runs = _rest(url, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 500}).get("runs", [])
    for r in runs:  # key/value lists as dicts
        for part in ("params", "tags", "metrics"):
            r["data"][part] = {x["key"]: x["value"] for x in r["data"].get(part, [])}
    return runs


@pytest.fixture(scope="module")
def search_on_server(root, tmp_path_factory):
    """A finished tiny search on CPU against a real `mlflow server`, its winner registered as `tiny-winner`:
    (folder, server URL, `fitrun tune` args, its output). Read by the REST and the browser tests."""
    tmp_path = tmp_path_factory.mktemp("search")
    env = {**os.environ, "FITRUN_PROGRESS": "0"}
    with serve_mlflow(tmp_path) as url:
        args = _tune_cli(tmp_path, url) + ["--cheapest"]  # the fastest at any rank: the brute force checks it
        out = subprocess.run(args + ["--gpu-hour-price", "2.5", "--register", "tiny-winner"], cwd=root,
                             capture_output=True, text=True, timeout=900, env=env)
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
        yield tmp_path, url, args, out


@pytest.mark.ray
@pytest.mark.slow
def test_cpu_search_matches_brute_force(root, search_on_server):
    """A real search on CPU against a real `mlflow server`, read back through its REST API."""
    from runner.tune.search import apply_config

    tmp_path, mlflow_server, args, out = search_on_server
    env = {**os.environ, "FITRUN_PROGRESS": "0"}
    assert "per 1M tokens" in out.stdout and "per epoch" in out.stdout
    assert "--cheapest: the fastest config at any rank" in out.stdout and "cost of each LoRA rank" in out.stdout
    counts = json.loads(next(line for line in out.stdout.splitlines() if line.startswith('{"trials_run"')).split("; ")[0])

    # Brute force over the whole grid, in this process.
    os.chdir(root)
    job = load_job("jobs/tiny-cpu.yaml", ["data.pad_to_sequence_len=true"])
    space = load_search_space("search_spaces/tiny-cpu.yaml")
    columns, ks = expand(job, space, 4)
    limit = space.gpu_memory_gib - space.safety_margin_gib
    grid = {at_k(col, k): _measure(apply_config(job, at_k(col, k), space.lora_alpha_rule))
            for col in columns for k in ks}
    truth = {col: min((k for k in ks if grid[at_k(col, k)][0] <= limit), default=None) for col in columns}

    assert counts["trials_run"] <= 0.4 * counts["grid_size"] == 0.4 * len(grid)
    assert counts["infeasible"] >= 1
    winner = load_job(tmp_path / "out/winner.yaml")  # a ready job file
    # Portable: paths as the job file gives them, its own name and outputs (never the base job's).
    assert winner.name == "tiny-cpu-tuned" and winner.data.path == "data/instructions.messages.jsonl"
    assert winner.resolved_output_dir() == str(tmp_path / "tiny-cpu-tuned")
    w = Config(winner.lora.r, winner.training.micro_batch_size, winner.training.gradient_accumulation_steps,
               winner.activation_checkpointing.placement, winner.activation_checkpointing.count,
               policy=winner.activation_checkpointing.policy, adapter_dtype=winner.lora.adapter_dtype)
    assert truth[w.column] == w.k, (w, truth)  # the winner is its column's smallest fitting k
    # The brute-force optimum is a column's smallest fitting k at the smallest rank (larger ranks are
    # never faster); when the in-process speeds separate the candidates clearly, it must be the winner.
    r_min = min(col.r for col in columns)
    candidates = {at_k(col, truth[col]) for col in columns if col.r == r_min and truth[col] is not None}
    assert w in candidates
    speed = {c.key: c.micro_batch_size / grid[c][1] for c in candidates}
    best = max(speed, key=speed.get)
    if all(speed[best] > 1.5 * s for k, s in speed.items() if k != best):  # CPU timing is noisy: only clear cases
        assert w.key == best, speed

    # What a user sees in the UI, read over REST: one parent, every trial and pruned config under it.
    runs = _rest_runs(mlflow_server, "fitrun-tiny")
    parents = [r for r in runs if r["data"]["tags"].get("fitrun.kind") == "tune"]
    assert len(parents) == 1 and parents[0]["data"]["tags"]["winner"] == w.key
    assert parents[0]["info"]["run_name"].startswith("tune-tiny-cpu: ")  # the winner, in the runs table
    assert parents[0]["info"]["run_name"].endswith(f" tok/s, {parents[0]['data']['metrics']['winner_peak_gib']:.2f} GiB, {w.key}")
    parent_id = parents[0]["info"]["run_id"]
    assert parents[0]["info"]["status"] == "FINISHED" and "winner_tokens_per_s" in parents[0]["data"]["metrics"]
    children = [r for r in runs if r["data"]["tags"].get("mlflow.parentRunId") == parent_id]
    assert len(children) == len(runs) - 1
    statuses = [r["data"]["tags"].get("status") for r in children]
    assert statuses.count("infeasible") == counts["infeasible"] and "ok" in statuses and "pruned" in statuses
    assert len({frozenset(r["data"]["params"]) for r in children}) == 1  # one param set: the UI charts them all
    assert {r["info"]["status"] for r in children if r["data"]["tags"].get("status") == "pruned"} == {"KILLED"}
    probes = [r for r in children if r["data"]["tags"].get("fitrun_phase") != "quality"]
    assert all("predicted_peak_gib" in r["data"]["metrics"] for r in probes
               if r["data"]["tags"].get("status") != "pruned" or r["data"]["tags"].get("reason") == "estimate")
    # The step-time model beside each measurement, and its error over the search on the parent.
    assert all("predicted_tokens_per_s" in r["data"]["metrics"] for r in probes if r["data"]["tags"].get("status") == "ok")
    assert {"speed_model_error_median_pct", "speed_model_error_max_pct"} <= set(parents[0]["data"]["metrics"])
    # Rank as a quality choice: each rank's fastest config trained the same tokens, then evaluated.
    quality = {r["data"]["tags"]["fitrun_config"]: r for r in children if r["data"]["tags"].get("fitrun_phase") == "quality"}
    fitting_ranks = {r["data"]["params"]["r"] for r in probes if r["data"]["tags"].get("status") == "ok"}
    assert len(quality) == len(fitting_ranks) and all(r["info"]["status"] == "FINISHED" for r in quality.values())
    losses = {key: r["data"]["metrics"]["eval_loss"] for key, r in quality.items()}
    assert all(0 < v < 10 for v in losses.values())
    assert {f"eval_loss_r{int(r['data']['params']['r'])}" for r in quality.values()} <= set(parents[0]["data"]["metrics"])
    assert "eval loss after 5 steps" in out.stdout
    artifacts = {f["path"] for f in _rest(mlflow_server, "artifacts/list", run_id=parent_id).get("files", [])}
    assert {"winner.yaml", "frontier.png", "frontier.md", "trials.md", "trials.json", "ranks.md"} <= artifacts
    # A measured trial's tokens_per_s (its latest value, what the runs table shows) is the ranked summary,
    # the same number as in the parent's trial table; its per-step values stay in the history.
    table = {row[0]: row for row in _trial_rows(mlflow_server, parent_id)}
    ok = next(r for r in children if r["data"]["tags"].get("status") == "ok"
              and r["data"]["tags"].get("fitrun_phase") == "packed")
    key = ok["data"]["tags"]["fitrun_config"]
    shown = ok["data"]["metrics"]["tokens_per_s"]
    assert shown == pytest.approx(table[key][3], rel=1e-6)
    history = _rest(mlflow_server, "metrics/get-history", run_id=ok["info"]["run_id"], metric_key="tokens_per_s")
    assert len(history["metrics"]) > 1  # the probe's steps, then the summary

    # --resume continues the same search: no new parent, no duplicate trial runs, same winner.
    # --out writes the winner's job file elsewhere, its paths relative to that folder.
    elsewhere = tmp_path / "elsewhere" / "chosen.yaml"
    again = subprocess.run(args + ["--resume", "--out", str(elsewhere)], cwd=root, capture_output=True, text=True,
                           timeout=900, env=env)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert f"resuming search: {counts['trials_run']} trials done" in again.stdout
    assert len(_rest_runs(mlflow_server, "fitrun-tiny")) == len(runs)
    assert f"job written to {elsewhere}" in again.stdout
    chosen = load_job(elsewhere)
    assert chosen.activation_checkpointing.count == w.k
    assert Path(chosen.data.path).resolve() == root / "data/instructions.messages.jsonl"
    assert "data/instructions.messages.jsonl" in elsewhere.read_text() and "../" in elsewhere.read_text()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="needs the system's Chromium: apt-get install chromium (.ci/run does)")
def test_the_search_in_the_mlflow_ui(search_on_server):
    """Issue 28, as a user sees it in headless Chromium: the experiment opens on its runs from the link fitrun
    printed, the parent (named with its winner) expands to its children, the frontier image renders, and the
    registered model's version links to the winner's quality run. Screenshots: <tmp>/ui-shots/."""
    tmp_path, url, _, out = search_on_server
    link = next(line.split("MLflow: ", 1)[1] for line in out.stdout.splitlines() if line.startswith("MLflow: "))
    assert link.startswith(f"{url}/#/experiments/") and link.endswith("/runs?workflowType=machine_learning")
    runs = _rest_runs(url, "fitrun-tiny")
    parent = next(r for r in runs if r["data"]["tags"].get("fitrun.kind") == "tune")
    (version,) = _rest(url, "model-versions/search", filter="name='tiny-winner'")["model_versions"]
    winner_run = next(r for r in runs if r["info"]["run_id"] == version["run_id"])
    assert winner_run["data"]["tags"]["fitrun_phase"] == "quality"
    assert winner_run["data"]["tags"]["fitrun_config"] == parent["data"]["tags"]["winner"]
    check_search_in_ui(url, parent["info"]["experiment_id"], parent["info"]["run_name"], "tiny-winner",
                       version["run_id"], tmp_path / "ui-shots")


def _trial_rows(url: str, run_id: str) -> list[list]:
    """The parent's trials.json (an MLflow table artifact), downloaded through the server."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/get-artifact?path=trials.json&run_uuid={run_id}", timeout=30) as r:
        table = json.loads(r.read())
    return table["data"]


def test_random_searcher_is_a_plain_baseline():
    from runner.tune.search import RandomSearcher

    columns = [Config(r, 16 // a, a, "first", None) for r in (8, 16) for a in (16, 8)]
    searcher = RandomSearcher(columns, list(range(33)), CEILING - 0.5, num_samples=10, seed=1)
    launched = drive(searcher, check_pruning=False)  # a baseline: it uses no structure
    assert len(launched) == len({c.key for c in launched}) == 10


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_search_resumes_without_duplicates(root, tmp_path):
    import signal
    from collections import Counter

    env = {**os.environ, "FITRUN_PROGRESS": "0"}
    space = tmp_path / "space.yaml"  # the tiny space cut to two ranks, one accumulation, no quality runs
    raw = yaml.safe_load((root / "search_spaces/tiny-cpu.yaml").read_text())
    space.write_text(yaml.safe_dump({**raw, "lora_r": [4, 8], "gradient_accumulation_steps": [1],
                                     "exclusive_finalists": 0, "quality_steps": 0}))
    args = _tune_cli(tmp_path, space=space) + ["--cheapest"]
    proc = subprocess.Popen(args, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    for line in proc.stdout:  # Ctrl-C as soon as the first trial is done
        seen.append(line)
        if line.startswith("trial "):
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, "".join(seen)[-3000:] + rest[-3000:]
    assert "search interrupted after 1 trial(s)" in rest

    out = subprocess.run(args + ["--resume"], cwd=root, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "resuming search: 1 trials done" in out.stdout and "winner: " in out.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("fitrun-tiny").experiment_id], max_results=500)
    per_config = Counter((r.data.tags.get("fitrun_config"), r.data.tags.get("fitrun_phase")) for r in runs
                         if r.data.tags.get("fitrun.kind") == "trial")
    assert per_config and max(per_config.values()) == 1  # the interrupted trial's run was reused, not duplicated
    assert sum(r.data.tags.get("fitrun.kind") == "tune" for r in runs) == 1
    assert all(r.info.status == ("KILLED" if r.data.tags.get("status") == "pruned" else "FINISHED") for r in runs)


def test_quantization_is_one_more_search_dimension(root, monkeypatch, tmp_path):
    """A lever dimension is one `lever(...)` field on Config: it expands, keys, and reaches the trial job."""
    monkeypatch.chdir(root)
    job = load_job("jobs/llama3-8b-lora.yaml")
    space = tmp_path / "space.yaml"
    space.write_text("gpu_memory_gib: 16\nquantizations: [none, nf4, fp8]\nactivation_checkpointing: {k: [0, 32]}\n")
    columns, ks = expand(job, load_search_space(space), num_layers=32)
    assert len(columns) == 3 and ks == [0, 32]
    assert {c.at_k(4).key for c in columns} == {"r16-mb1-acc16-first-k4", "r16-mb1-acc16-first-nf4-k4",
                                                "r16-mb1-acc16-first-fp8-k4"}
    for quantization in ("nf4", "fp8"):
        column = next(c for c in columns if c.quantization == quantization)
        assert apply_config(job, column.at_k(4), "2*r").model.quantization == quantization
    cpu_space = tmp_path / "cpu.yaml"
    cpu_space.write_text("gpu_memory_gib: 1\nquantizations: [nf4]\n")
    with pytest.raises(SpecError, match="quantizations"):  # bitsandbytes needs CUDA; fp8 also runs on CPU
        expand(load_job("jobs/tiny-cpu.yaml"), load_search_space(cpu_space), num_layers=4)
    cpu_space.write_text("gpu_memory_gib: 1\nquantizations: [none, fp8]\n")
    assert len(expand(load_job("jobs/tiny-cpu.yaml"), load_search_space(cpu_space), num_layers=4)[0]) == 2


@pytest.mark.parametrize("ceiling", ["16gb", "24gb"])
def test_shipped_quantization_spaces_and_jobs_fit_their_ceiling(root, monkeypatch, ceiling):
    """The shipped jobs (the winners of these spaces' searches on the H200) are predicted to fit their
    cards with the search's safety margin, and the spaces expand."""
    from runner.estimate.trace import estimate

    monkeypatch.chdir(root)
    job = load_job("jobs/llama3-8b-lora.yaml", ["model.init=random", "lora.adapter_dtype=mixed", "training.compile=true"])
    space = load_search_space(f"search_spaces/fit-{ceiling}-quant.yaml")
    columns, _ = expand(job, space, num_layers=32)
    assert {c.quantization for c in columns} == set(space.quantizations)
    shipped = load_job(f"jobs/llama3-8b-lora-{ceiling}.yaml", ["model.init=random"])
    assert shipped.model.quantization == "fp8" and shipped.training.micro_batch_size == 2
    assert estimate(shipped, "cuda").peak_reserved_gib <= space.limit_gib
    assert space.gpu_memory_gib == shipped.resources.gpu_memory_gib


def test_searcher_state_round_trips_through_json():
    columns = [Config(r, 1, 16, "first", None, adapter_dtype="mixed") for r in (8, 16)]
    searcher = FitSearcher(columns, list(range(33)), CEILING - 0.5, {"x": 1.0})
    drive(searcher)
    again = FitSearcher(columns, list(range(33)), CEILING - 0.5)
    again.load_state_dict(json.loads(json.dumps(searcher.state_dict())))
    assert again.results.keys() == searcher.results.keys() and again.dominated == searcher.dominated
    assert again.best_per_column() == searcher.best_per_column() and again.next_config() == "done"


def test_parallelism_is_a_search_dimension_at_the_jobs_world_size(root, monkeypatch, tmp_path):
    monkeypatch.chdir(root)
    job = load_job("jobs/llama3-8b-lora-24gb-bf16.yaml", ["resources.num_workers=2", "training.gradient_accumulation_steps=8"])
    space = tmp_path / "space.yaml"
    space.write_text("gpu_memory_gib: 24\nparallelisms: [ddp, fsdp]\nquantizations: [none, nf4]\n"
                     "activation_checkpointing: {k: [0, 11]}\n")
    columns, _ = expand(job, load_search_space(space), num_layers=32)
    # fsdp x nf4 is not a valid pair (bitsandbytes' packed weights and FSDP2 sharding): 3 columns
    assert sorted(c.at_k(0).key for c in columns) == [
        "r8-mb1-acc8-first-mixedadapters-fsdp-k0", "r8-mb1-acc8-first-mixedadapters-k0",
        "r8-mb1-acc8-first-mixedadapters-nf4-k0"]
    fsdp = next(c for c in columns if c.parallelism == "fsdp")
    tuned = apply_config(job, fsdp.at_k(0), "2*r")
    assert tuned.resources.parallelism == "fsdp" and tuned.resources.num_workers == 2 and tuned.global_batch_size == 16
    with pytest.raises(SpecError, match="parallelisms: fsdp"):
        expand(load_job("jobs/llama3-8b-lora-24gb-bf16.yaml"), load_search_space(space), num_layers=32)


@pytest.mark.parametrize("n_concurrent,exclusive_finalists", [(1, 0), (1, 2), (2, 0)])
def test_winner_without_re_measurement_is_the_fastest_fit(root, monkeypatch, n_concurrent, exclusive_finalists):
    """One trial at a time (a 2-worker search on 2 GPUs), or no re-measurement asked: the probes rank."""
    from runner.tune.driver import rank_finalists
    from runner.tune.report import TuneOptions
    from runner.tune.session import Search

    monkeypatch.chdir(root)
    job = load_job("jobs/llama3-8b-lora-24gb-bf16.yaml")
    columns = [Config(8, 1, 16, "first", None, parallelism=p) for p in ("ddp", "fsdp")]
    searcher = FitSearcher(columns, [0, 11, 16], CEILING - 0.5)
    for c, peak, speed in ((columns[0].at_k(11), 23.4, 23000.0), (columns[0].at_k(16), 22.1, 20700.0),
                           (columns[1].at_k(0), 21.7, 12500.0)):
        searcher.record(c, classify({"peak_gib": peak, "tokens_per_s": speed, "oom": 0}, searcher.limit_gib))
    space = load_search_space(os.path.join(root, "search_spaces/fit-24gb-2gpu.yaml"),
                              [f"exclusive_finalists={exclusive_finalists}"])
    outcome = rank_finalists(Search(job, space, "", "", None), searcher, n_concurrent, TuneOptions(cheapest=True))
    winner = outcome.winner
    assert winner["config"] == columns[0].at_k(11) and outcome.speed(winner) == 23000.0 and outcome.exclusive == {}
    assert outcome.speed_source.startswith("packed")


def test_rank_is_a_quality_choice(root, monkeypatch):
    """Every rank is measured; the winner is at the highest rank that fits unless --cheapest; the
    report gives each rank's fastest fitting config."""
    from runner.tune.driver import rank_finalists
    from runner.tune.report import TuneOptions, rank_choice_note, rank_lines
    from runner.tune.session import Search

    monkeypatch.chdir(root)
    job = load_job("jobs/llama3-8b-lora.yaml")
    space = load_search_space("search_spaces/fit-24gb-2gpu.yaml")  # exclusive_finalists: 0
    columns = [Config(r, 1, 16, "first", None) for r in (8, 16, 64)]
    searcher = FitSearcher(columns, list(range(33)), CEILING - 0.5)
    assert FitSearcher(columns, [0], 1.0, prune_dominated=False).prune_dominated is False
    for c, peak, speed in ((columns[0].at_k(11), 23.3, 12500.0), (columns[1].at_k(13), 23.4, 11800.0),
                           (columns[2].at_k(32), 25.0, 0.0)):
        searcher.record(c, classify({"peak_gib": peak, "tokens_per_s": speed, "oom": 0}, searcher.limit_gib))
    search = Search(job, space, "", "", None)
    default = rank_finalists(search, searcher, 1, TuneOptions(cheapest=False)).winner
    cheapest = rank_finalists(search, searcher, 1, TuneOptions(cheapest=True)).winner
    assert default["config"].key == "r16-mb1-acc16-first-k13" and cheapest["config"].key == "r8-mb1-acc16-first-k11"
    note = rank_choice_note(searcher, default["config"], cheapest=False)
    assert "r64 (the highest listed) does not fit" in note and "--cheapest would pick r8" in note
    assert "trading quality for speed" in note
    table = "\n".join(rank_lines(searcher))
    assert "| r8 | r8-mb1-acc16-first-k11 | 12,500 |" in table and "| r16 | r16-mb1-acc16-first-k13 | 11,800 |" in table
    assert "| r64 | none fits |" in table


@pytest.mark.ray
@pytest.mark.slow
def test_resumed_quality_phase_replaces_the_run_a_dead_driver_left_running(root, monkeypatch, tmp_path):
    """A search driver killed (SIGKILL) during its quality phase leaves that child run RUNNING. On
    --resume the quality phase reuses a finished rank's eval loss, marks the stale run KILLED with the
    reason, and trains that rank again in a new run."""
    import ray

    from runner.storage import Location
    from runner.tracking import RunLogger, start_run
    from runner.train.driver import absolute_paths, init_ray
    from runner.tune.driver import quality_runs
    from runner.tune.session import Search

    monkeypatch.chdir(root)
    monkeypatch.setenv("FITRUN_PROGRESS", "0")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    job = absolute_paths(load_job("jobs/tiny-cpu.yaml", [f"tracking.tracking_uri={uri}", f"output_dir={tmp_path}/out"]))
    space = load_search_space("search_spaces/tiny-cpu.yaml", ["quality_steps=2"])
    done, stale = (Config(r, 4, 2, "every_n", 2) for r in (4, 8))
    parent = start_run(uri, "fitrun-tiny", "tune-x", tags={"fitrun.kind": "tune"})

    def child(c):
        return start_run(uri, "fitrun-tiny", f"quality-{c.key}", parent_run_id=parent,
                         tags={"fitrun_config": c.key, "fitrun_phase": "quality", "fitrun.kind": "trial"})
    finished = RunLogger(uri, child(done))
    finished.metrics({"eval_loss": 1.25}, step=2)
    finished.end(ok=True)
    left_running = child(stale)

    init_ray(None)
    try:
        losses = quality_runs(Search(job, space, uri, parent, Location(f"{tmp_path}/out")), [done, stale])
    finally:
        ray.shutdown()
    assert losses[done.key] == 1.25 and losses[stale.key] > 0
    client = MlflowClient(uri)
    old = client.get_run(left_running)
    assert old.info.status == "KILLED" and "driver died" in old.data.tags["fitrun.end_reason"]
    runs = client.search_runs([client.get_experiment_by_name("fitrun-tiny").experiment_id],
                              filter_string=f"tags.fitrun_config = '{stale.key}' and attributes.status = 'FINISHED'")
    assert len(runs) == 1 and runs[0].data.metrics["eval_loss"] == pytest.approx(losses[stale.key])


def test_the_winner_logged_to_mlflow_validates_wherever_it_is_downloaded(root, tmp_path, monkeypatch):
    """The winner.yaml beside the search keeps paths relative to its folder; the copy logged to MLflow
    (what a user downloads from the UI) holds absolute paths, so it validates in any folder."""
    from runner.storage import Location
    from runner.tracking import RunLogger, start_run
    from runner.tune.report import write_winner

    monkeypatch.chdir(root)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = RunLogger(uri, start_run(uri, "x", "tune"))
    job = load_job("jobs/tiny-cpu.yaml")
    write_winner(job, Config(4, 4, 2, "every_n", 2), "2*r", "# winner\n", Location(str(tmp_path / "w" / "winner.yaml")),
                 parent)
    assert "../" in (tmp_path / "w" / "winner.yaml").read_text()
    downloads = tmp_path / "downloads" / "deep"
    downloads.mkdir(parents=True)
    downloaded = MlflowClient(uri).download_artifacts(parent.run_id, "winner.yaml", str(downloads))
    monkeypatch.chdir(tmp_path)
    assert load_job(downloaded).activation_checkpointing.count == 2
