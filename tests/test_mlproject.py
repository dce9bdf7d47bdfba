"""The MLflow project: `mlflow run .` end to end, and conda.yaml agreeing with pyproject."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MLFLOW_RUN_TIMEOUT_S = 600
# On this CPU machine `device` auto resolves to cpu and the sizes to the CPU-sized defaults.
MLFLOW_RUN_PARAMS = {"mods": "causal"}
CPU_DEFAULT_SHAPE = "1,4,256,64"
MAIN_DEFAULTS = {"mods": "noop,causal,rel,head_bias", "b": "auto", "nh": "auto", "s": "auto",
                 "d": "auto", "dtype": "auto", "kv_heads": "auto", "kv_len": "auto",
                 "decode": "false", "calculate_bwd": "false", "dynamic": "false",
                 "max_autotune": "false", "kernel_options": "{}", "device": "auto",
                 "timer": "auto", "baseline": "sdpa", "flex_backend": "auto", "run_name": "",
                 "resume": "false", "sweep_id": "", "tracking_timeout": "120",
                 "regime": "auto", "max_noise": "auto", "min_samples": "10", "max_time": "auto",
                 "sample_ms": "auto",
                 "throttle_threshold": "90", "compile_workers": "auto", "compile_cache": "",
                 "align": "end", "reference": ""}
# `flexbench run` options that MLproject leaves to `mlflow run` itself (--experiment-name,
# MLFLOW_TRACKING_URI), that make no sense there (one process per host or GPU, terminal), or
# that replace the size options MLproject always passes (--config).
NOT_IN_MLPROJECT = {"experiment", "tracking_uri", "journal", "shard", "gpus", "quiet",
                    "config_file"}
MLPROJECT_NAME = {"batch": "b", "heads": "nh", "seq_lens": "s", "head_dims": "d",
                  "score_mods": "mods", "dtypes": "dtype", "kv_lens": "kv_len",
                  "baselines": "baseline", "flex_backends": "flex_backend"}


def load_yaml(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


@pytest.fixture(scope="module")
def mlflow_run(mlflow_server, tmp_path_factory) -> dict:
    """`mlflow run . --env-manager local` on a tiny CPU sweep, into its own experiment."""
    experiment = f"mlproject-{uuid.uuid4().hex[:8]}"
    params = [arg for k, v in MLFLOW_RUN_PARAMS.items() for arg in ("-P", f"{k}={v}")]
    cmd = [str(BIN / "mlflow"), "run", ".", "--env-manager", "local",
           "--experiment-name", experiment, *params]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLEXBENCH_JOURNAL": str(tmp_path_factory.mktemp("journal") / "journal.jsonl")}
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)
    # The README's order where conda is missing: the conda form fails, then the local one.
    failed = failed_mlflow_run(mlflow_server.uri, experiment, tmp_path_factory.mktemp("conda"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=MLFLOW_RUN_TIMEOUT_S)
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(experiment)
    every = client.search_runs([exp.experiment_id]) if exp else []
    left = [r for r in every if r.data.tags.get("mlflow.project.env") == "conda"]
    runs = [r for r in every if r not in left]
    summary = subprocess.run([*cmd[:7], "-e", "summary"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=MLFLOW_RUN_TIMEOUT_S)
    return {"proc": proc, "runs": runs, "summary": summary, "failed": failed, "left": left}


def test_mlflow_run_is_the_sweep_run_holding_the_config_runs(mlflow_run):
    """`mlflow run . --env-manager local -P mods=causal` on a CPU machine: the CPU-sized
    default sweep (one small float32 shape), finished, named like a CLI sweep."""
    proc, runs = mlflow_run["proc"], mlflow_run["runs"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "running on CPU with CPU-sized defaults -b 1 -nh 4 -s 256 -d 64 -dtype float32" in (
        proc.stderr
    )
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(top) == 1, [r.info.run_name for r in top]
    sweep = top[0]
    assert sweep.data.tags.get("mlflow.project.entryPoint") == "main"  # the run mlflow created
    assert sweep.data.tags.get("flexbench.kind") == "sweep"
    assert sweep.info.run_name == f"sweep {sweep.data.tags['flexbench.sweep_id']}"
    assert sweep.info.status == "FINISHED"
    assert sweep.data.params["mods"] == "causal" and sweep.data.params["b"] == "auto"
    assert sweep.data.params["configs"] == "1" and sweep.data.metrics["configs_total"] == 1
    assert len(children) == 1
    child = children[0]
    assert child.data.tags["mlflow.parentRunId"] == sweep.info.run_id
    assert child.info.run_name == "causal b1 h4 s256 d64 fp32"
    assert child.data.params["shape"] == CPU_DEFAULT_SHAPE and child.data.params["device"] == "cpu"
    assert child.data.metrics["fwd_compiled_us"] > 0


def test_conda_run_left_running_is_closed_by_the_local_run(mlflow_run):
    """`mlflow run .` without conda leaves its run RUNNING; the `--env-manager local` run
    that follows (flexbench inside a live `mlflow run`) closes it."""
    from flexbench import schema

    assert "Could not find Conda executable" in mlflow_run["failed"].stderr
    (left,) = mlflow_run["left"]
    assert left.info.status == "FAILED" and schema.CLOSED_TAG in left.data.tags
    note = f"note: closed 1 run(s) that a failed `mlflow run` had left RUNNING ({left.info.run_id})"
    assert note in mlflow_run["proc"].stderr


def test_mlflow_run_summary_reads_the_experiment_it_runs_in(mlflow_run):
    summary = mlflow_run["summary"]
    assert summary.returncode == 0, summary.stderr[-3000:]
    sweep_id = next(r for r in mlflow_run["runs"] if "flexbench.kind" in r.data.tags).data.tags[
        "flexbench.sweep_id"
    ]
    assert f"latest sweep {sweep_id}" in summary.stdout and CPU_DEFAULT_SHAPE in summary.stdout


def test_mlproject_main_parameters_and_defaults():
    main = load_yaml("MLproject")["entry_points"]["main"]
    defaults = {k: str(v["default"]) for k, v in main["parameters"].items()}
    assert {k: v.removesuffix(".0") for k, v in defaults.items()} == MAIN_DEFAULTS
    for name in MAIN_DEFAULTS:
        assert "{" + name + "}" in main["command"]


def test_mlproject_main_takes_every_run_option():
    from flexbench.cli import run

    main = load_yaml("MLproject")["entry_points"]["main"]
    options = {MLPROJECT_NAME.get(p.name, p.name) for p in run.params} - NOT_IN_MLPROJECT
    missing = sorted(options - set(main["parameters"]))
    assert not missing, f"add these `flexbench run` options to MLproject's main: {missing}"


def test_mlproject_summary_defaults_to_the_experiment_mlflow_run_uses():
    summary = load_yaml("MLproject")["entry_points"]["summary"]
    defaults = {k: str(v["default"]) for k, v in summary["parameters"].items()}
    assert defaults == {"experiment": "", "sweep": "latest", "format": "table", "where": ""}


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


# --- a run left RUNNING by an `mlflow run` that failed before flexbench started -------------


def failed_mlflow_run(uri: str, experiment: str, where: Path) -> subprocess.CompletedProcess:
    """The README's conda form where conda is missing (MLFLOW_CONDA_HOME points nowhere):
    MLflow creates the run, cannot build the environment, exits and leaves it RUNNING."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_CONDA_HOME": str(where / "none")}
    cmd = [str(BIN / "mlflow"), "run", ".", "--experiment-name", experiment, "-P", "mods=causal"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def sleeper(argv: tuple[str, ...] = (), env: dict[str, str] | None = None) -> subprocess.Popen:
    code = "import time; time.sleep(300)"
    return subprocess.Popen([sys.executable, "-c", code, *argv], env={**os.environ, **(env or {})})


def mlflow_run_with_entry_point(run_id: str) -> subprocess.Popen:
    """A process named like `mlflow run .` whose child runs an entry point (MLFLOW_RUN_ID)."""
    code = (
        "import os, subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], "
        f"env={{**os.environ, 'MLFLOW_RUN_ID': '{run_id}'}}); time.sleep(300)"
    )
    return subprocess.Popen([sys.executable, "-c", code, "mlflow", "run", "."],
                            start_new_session=True)


def test_run_left_by_failed_mlflow_run_is_closed_and_live_ones_are_not(mlflow_server, tmp_path):
    import getpass

    from flexbench import leftovers, schema, sweep
    from flexbench.tracking_settings import TrackingSettings

    experiment = f"leftover-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(mlflow_server.uri)
    exp_id = client.create_experiment(experiment)
    project_tags = {"mlflow.user": getpass.getuser(), "mlflow.source.type": "PROJECT",
                    "mlflow.source.name": REPO.as_uri(), "mlflow.project.entryPoint": "main"}
    entry = client.create_run(exp_id, tags=project_tags).info.run_id
    running = mlflow_run_with_entry_point(entry)  # started before the failed one: owns `entry`
    procs = [running]
    try:
        failed = failed_mlflow_run(mlflow_server.uri, experiment, tmp_path)
        assert failed.returncode != 0 and "Could not find Conda executable" in failed.stderr
        (left,) = [r for r in client.search_runs([exp_id]) if r.info.run_id != entry]
        assert left.info.status == "RUNNING"  # what MLflow leaves behind
        while time.time() < left.info.start_time / 1000 + leftovers.STARTED_SLACK_S + 1:
            time.sleep(0.2)
        procs.append(sleeper(("mlflow", "run", ".")))  # an `mlflow run` building its env
        time.sleep(1)
        young = client.create_run(exp_id, tags=project_tags).info.run_id
        notes: list[str] = []
        track = TrackingSettings(experiment, mlflow_server.uri, str(tmp_path / "j.jsonl"))
        sweep.connect(track, "cpu", warn=notes.append)
        status = {r.info.run_id: r.info.status for r in client.search_runs([exp_id])}
    finally:
        os.killpg(running.pid, 9)  # with its entry point child
        for proc in procs:
            proc.kill()
            proc.wait()
    assert status == {left.info.run_id: "FAILED", young: "RUNNING", entry: "RUNNING"}
    closed = client.get_run(left.info.run_id)
    assert "--env-manager local" in closed.data.tags[schema.CLOSED_TAG]
    assert notes == [
        f"note: closed 1 run(s) that a failed `mlflow run` had left RUNNING "
        f"({left.info.run_id}) as FAILED, tag {schema.CLOSED_TAG}"
    ]
