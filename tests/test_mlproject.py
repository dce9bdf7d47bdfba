"""The MLflow project: `mlflow run .` end to end, and conda.yaml agreeing with pyproject."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MLFLOW_RUN_TIMEOUT_S = 600
CPU_PARAMS = {"mods": "causal", "device": "cpu", "b": "1", "nh": "2", "s": "128", "d": "16",
              "dtype": "float32"}
SEED_DEFAULTS = {"mods": "noop,causal,rel,head_bias", "b": "2,8,16", "nh": "16",
                 "s": "512,1024,4096", "d": "64,128", "dtype": "bfloat16",
                 "calculate_bwd": "false", "dynamic": "false", "max_autotune": "false",
                 "device": "auto", "timer": "auto", "baseline": "sdpa", "flex_backend": "auto"}


def load_yaml(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


@pytest.fixture(scope="module")
def mlflow_run(mlflow_server, tmp_path_factory) -> dict:
    """`mlflow run . --env-manager local` on a tiny CPU sweep, into its own experiment."""
    experiment = f"mlproject-{uuid.uuid4().hex[:8]}"
    params = [arg for k, v in CPU_PARAMS.items() for arg in ("-P", f"{k}={v}")]
    cmd = [str(BIN / "mlflow"), "run", ".", "--env-manager", "local",
           "--experiment-name", experiment, *params]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLEXBENCH_JOURNAL": str(tmp_path_factory.mktemp("journal") / "journal.jsonl")}
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=MLFLOW_RUN_TIMEOUT_S)
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return {"proc": proc, "runs": runs}


def test_mlflow_run_is_the_sweep_run_holding_the_config_runs(mlflow_run):
    proc, runs = mlflow_run["proc"], mlflow_run["runs"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(top) == 1, [r.info.run_name for r in top]
    sweep = top[0]
    assert sweep.data.tags.get("mlflow.project.entryPoint") == "main"  # the run mlflow created
    assert sweep.data.tags.get("flexbench.kind") == "sweep"
    assert sweep.info.status == "FINISHED"
    assert sweep.data.params["mods"] == "causal" and sweep.data.params["device"] == "cpu"
    assert sweep.data.metrics["configs_total"] == 1
    assert len(children) == 1
    child = children[0]
    assert child.data.tags["mlflow.parentRunId"] == sweep.info.run_id
    assert child.info.run_name == "causal b1 h2 s128 d16 fp32"
    assert child.data.params["shape"] == "1,2,128,16"
    assert child.data.metrics["fwd_compiled_us"] > 0


def test_mlproject_main_parameters_are_the_seed_defaults():
    main = load_yaml("MLproject")["entry_points"]["main"]
    defaults = {k: str(v["default"]) for k, v in main["parameters"].items()}
    assert defaults == SEED_DEFAULTS
    for name in SEED_DEFAULTS:
        assert "{" + name + "}" in main["command"]


def test_mlproject_has_summary_entry_point_and_conda_env():
    project = load_yaml("MLproject")
    assert project["conda_env"] == "conda.yaml"
    assert (REPO / project["conda_env"]).exists()
    assert "flexbench summary" in project["entry_points"]["summary"]["command"]


def test_conda_env_agrees_with_pyproject():
    """Same packages and version floors; torch is conda-forge's CUDA build `pytorch-gpu`."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {Requirement(d).name: str(Requirement(d).specifier) for d in deps}
    conda = load_yaml("conda.yaml")
    assert conda["channels"] == ["conda-forge"]
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    got = {Requirement(d).name: str(Requirement(d).specifier) for d in pip}
    conda_pkgs = [d for d in conda["dependencies"] if isinstance(d, str)]
    torch = next(d for d in conda_pkgs if d.startswith("pytorch-gpu"))
    got["torch"] = torch.removeprefix("pytorch-gpu")
    assert got == wanted
    assert any(d.startswith("python=3.") for d in conda_pkgs)
