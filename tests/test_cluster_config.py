"""cluster.yaml is valid for Ray's cluster launcher (its own JSON schema, after its own defaults) and
makes the choices the README documents."""

import yaml


def test_cluster_yaml_passes_rays_schema(root):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((root / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # raises on unknown keys or wrong types
    docker = config["docker"]
    assert "--gpus all" in docker["worker_run_options"] and not any("--gpus" in o for o in docker["run_options"])
    assert {".venv", "outputs", "mlflow.db", "mlruns"} <= set(config["rsync_exclude"])
    assert all("-c /home/ray/fitrun/constraints.txt" in c for c in config["setup_commands"])
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert any(c.startswith("nohup mlflow server") for c in config["head_start_ray_commands"])
