"""MLflow tracking against a real `mlflow server`: sweep run + child runs, failures, resume,
`mlflow run`, offline journal + sync (server dead from the start or lost mid-sweep), secrets.

CPU forward-only sweeps of 1-3 tiny configs; compiled flex callables are reused across tests
in this process, so only the first sweep pays for compiling.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from flexbench import artifacts, sweep, tracking
from flexbench.config import BenchConfig
from flexbench.record import RunRecord
from flexbench.spec import SweepSpec
from flexbench.tracking_settings import TrackingSettings
from tests.servers import MlflowServer, SlowProxy, free_port

FAILING_MOD = "tests.failing_mod:boom"
SECRET_URI_PASSWORD = "s3cret-in-uri"
SECRET_ENV_PASSWORD = "pw-in-env-7431"
# MLflow's defaults (7 retries, backoff factor 2) spend minutes on one dead call; flexbench's
# settings must give up within seconds. Generous bound for a loaded 2-core machine.
DEAD_SERVER_BUDGET_S = 30

CHILD_PARAMS = (
    "shape",
    "batch",
    "heads",
    "kv_heads",
    "q_len",
    "kv_len",
    "head_dim",
    "dtype",
    "score_mod",
    "device",
    "calculate_bwd",
    "dynamic",
    "max_autotune",
    "timer",
)
CHILD_METRICS = (
    "fwd_eager_us",
    "fwd_compiled_us",
    "fwd_speedup",
    "fwd_eager_tflops",
    "fwd_compiled_tflops",
    "sparsity",
    "max_abs_err",
    "compile_s",
    "fwd_eager_us_p20",
    "fwd_eager_us_p80",
    "fwd_compiled_us_p20",
    "fwd_compiled_us_p80",
)
ENV_TAGS = ("gpu", "driver", "cuda", "torch", "triton", "python", "git_sha", "host")
CHILD_TAGS = ("flexbench.sweep_id", "flexbench.config_key", "mlflow.parentRunId", *ENV_TAGS)
SWEEP_METRICS = (
    "fwd_speedup_mean",
    "fwd_speedup_geomean",
    "fwd_speedup_min",
    "fwd_speedup_max",
    "configs_total",
    "configs_failed",
)
LEAN_SERVER = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: starts faster
SWEEP_ARTIFACTS = {"summary.md", "results.csv", "heatmap.png", "report.html"}


def tiny(*mods: str) -> list[BenchConfig]:
    return SweepSpec([1], [2], [128], [16], list(mods), ["float32"], device="cpu").configs()


def children(client: MlflowClient, parent_id: str) -> list:
    exp_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def runs_of_kind(client: MlflowClient, experiment: str, kind: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.`flexbench.kind` = '{kind}'")


def top_level_runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


def leaks(texts: list[str]) -> list[str]:
    """Where a secret shows up in any of the texts (with some context)."""
    found = []
    for text in texts:
        for secret in (SECRET_URI_PASSWORD, SECRET_ENV_PASSWORD):
            at = text.find(secret)
            if at >= 0:
                found.append(text[max(0, at - 200) : at + 50])
    return found


def dead_uri(password: str = "") -> str:
    """A loopback URI where nothing listens (optionally with credentials)."""
    creds = f"user:{password}@" if password else ""
    return f"http://{creds}127.0.0.1:{free_port()}"


# --- one logged sweep: noop, a failing user mod, causal ----------------------------------------


@pytest.fixture(scope="module")
def logged(mlflow_server, tmp_path_factory):
    """`sweep.run` of 3 configs (the middle one fails) against the live server."""
    where = tmp_path_factory.mktemp("logged")
    warnings: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(where)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        out = sweep.run(
            SweepSpec([1], [2], [128], [16], ["noop", FAILING_MOD, "causal"], ["float32"],
                      device="cpu"),
            TrackingSettings("structure", mlflow_server.uri, str(where / "journal.jsonl"),
                             run_name="tiny sweep"),
            quiet=True,
            warn=warnings.append,
        )
    client = MlflowClient(mlflow_server.uri)
    return {"out": out, "warnings": warnings, "client": client, "where": where}


def test_sweep_run_with_one_child_per_config(logged):
    out, client = logged["out"], logged["client"]
    sweeps = runs_of_kind(client, "structure", "sweep")
    assert [r.info.run_id for r in sweeps] == [out.run_id]
    assert [r.info.run_id for r in top_level_runs(client, "structure")] == [out.run_id]
    kids = children(client, out.run_id)
    expected = {c.run_name(): c.config_key() for c in tiny("noop", FAILING_MOD, "causal")}
    assert {r.info.run_name: r.data.tags["flexbench.config_key"] for r in kids} == expected
    assert "causal b1 h2 s128 d16 fp32" in expected
    assert all(r.data.tags["flexbench.kind"] == "config" for r in kids)
    assert all(r.data.tags["flexbench.sweep_id"] == out.sweep_id for r in kids)
    exp = client.get_experiment_by_name("structure")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert logged["warnings"] == []


def test_children_carry_every_contract_name(logged):
    kids = children(logged["client"], logged["out"].run_id)
    ok = [r for r in kids if r.info.status == "FINISHED"]
    assert len(ok) == 2
    for run in ok:
        assert set(CHILD_PARAMS) <= set(run.data.params), run.info.run_name
        assert set(CHILD_METRICS) <= set(run.data.metrics), run.info.run_name
        assert set(CHILD_TAGS) <= set(run.data.tags), run.info.run_name
        assert run.data.params["shape"] == "1,2,128,16"
        assert run.data.params["dtype"] == "float32"
        assert run.data.tags["torch"] == torch.__version__
        m = run.data.metrics
        assert m["fwd_speedup"] == pytest.approx(m["fwd_eager_us"] / m["fwd_compiled_us"])
        assert m["fwd_compiled_us_p20"] <= m["fwd_compiled_us"] <= m["fwd_compiled_us_p80"]
        assert 0.0 <= m["sparsity"] <= 1.0


def test_failed_config_is_a_failed_child_and_the_sweep_goes_on(logged):
    out = logged["out"]
    kids = children(logged["client"], out.run_id)
    failed = [r for r in kids if r.info.status == "FAILED"]
    assert [r.data.params["score_mod"] for r in failed] == [FAILING_MOD]
    error = failed[0].data.tags["flexbench.error"]
    assert error and "\n" not in error
    assert "fwd_speedup" not in failed[0].data.metrics
    # the config after the failing one was still measured and logged
    assert [r.status for r in out.records] == ["FINISHED", "FAILED", "FINISHED"]
    assert (out.failed, out.exit_code, out.offline) == (1, 1, None)


def test_sweep_run_metrics_params_artifacts_description(logged, tmp_path):
    out, client = logged["out"], logged["client"]
    run = client.get_run(out.run_id)
    assert run.info.run_name == "tiny sweep"
    assert run.info.status == "FAILED"  # one config failed
    assert run.data.tags["flexbench.kind"] == "sweep"
    assert set(ENV_TAGS) <= set(run.data.tags)
    assert run.data.params["mods"] == f"noop,{FAILING_MOD},causal"
    assert run.data.params["device"] == "cpu" and run.data.params["configs"] == "3"
    m = run.data.metrics
    assert set(SWEEP_METRICS) <= set(m)
    assert (m["configs_total"], m["configs_failed"]) == (3, 1)
    speedups = [
        r.data.metrics["fwd_speedup"]
        for r in children(client, out.run_id)
        if r.info.status == "FINISHED"
    ]
    assert m["fwd_speedup_min"] == pytest.approx(min(speedups))
    assert m["fwd_speedup_max"] == pytest.approx(max(speedups))
    assert m["fwd_speedup_mean"] == pytest.approx(sum(speedups) / 2)
    assert m["fwd_speedup_geomean"] == pytest.approx(math.sqrt(speedups[0] * speedups[1]))
    assert {a.path for a in client.list_artifacts(out.run_id)} == SWEEP_ARTIFACTS
    summary = Path(client.download_artifacts(out.run_id, "summary.md", str(tmp_path)))
    assert run.data.tags["mlflow.note.content"] == summary.read_text()
    assert "causal" in summary.read_text() and FAILING_MOD in summary.read_text()
    csv = Path(client.download_artifacts(out.run_id, "results.csv", str(tmp_path)))
    assert len(csv.read_text().strip().splitlines()) == 1 + 3
    png = Path(client.download_artifacts(out.run_id, "heatmap.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = Path(client.download_artifacts(out.run_id, "report.html", str(tmp_path))).read_text()
    assert 'id="heatmap"' in page and FAILING_MOD in page and run.data.tags["torch"] in page


def test_resume_skips_finished_configs(logged, mlflow_server):
    client = logged["client"]
    before = len(runs_of_kind(client, "structure", "config"))
    warnings: list[str] = []
    out = sweep.measure_and_track(
        tiny("noop", "causal"),
        TrackingSettings("structure", mlflow_server.uri, resume=True),
        progress=False,
        warn=warnings.append,
    )
    assert (out.skipped, out.records, out.exit_code) == (2, [], 0)
    assert len(runs_of_kind(client, "structure", "config")) == before
    assert any("skipped 2 of 2" in w for w in warnings)
    # a FAILED config is not "done": resume would measure it again
    exp_id = client.get_experiment_by_name("structure").experiment_id
    env = client.get_run(logged["out"].run_id).data.tags
    keys = tracking.resume_keys(client, exp_id, env)
    assert tiny(FAILING_MOD)[0].config_key() not in keys
    assert {c.config_key() for c in tiny("noop", "causal")} <= keys


# --- under `mlflow run` ---------------------------------------------------------------------------


def test_under_mlflow_run_the_sweep_run_is_that_run(mlflow_server, monkeypatch):
    client = MlflowClient(mlflow_server.uri)
    exp_id = client.create_experiment("under-mlflow-run")
    outer = client.create_run(exp_id, run_name="mlflow run").info.run_id
    client.log_param(outer, "b", "1")  # `mlflow run` logs the entry point's params itself
    monkeypatch.setenv("MLFLOW_RUN_ID", outer)
    out = sweep.run(
        SweepSpec([1], [2], [128], [16], ["noop"], ["float32"], device="cpu"),
        TrackingSettings("ignored-under-mlflow-run", mlflow_server.uri),
        quiet=True,
        warn=print,
    )
    assert out.run_id == outer and out.exit_code == 0
    assert [r.info.run_id for r in top_level_runs(client, "under-mlflow-run")] == [outer]
    assert len(children(client, outer)) == 1
    run = client.get_run(outer)
    assert run.info.status == "RUNNING"  # `mlflow run` ends its own run
    assert run.data.tags["flexbench.kind"] == "sweep"
    assert run.data.metrics["configs_total"] == 1 and run.data.params["mods"] == "noop"
    assert client.get_experiment_by_name("ignored-under-mlflow-run") is None
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"


# --- offline journal and sync --------------------------------------------------------------------


def test_server_lost_mid_sweep_then_sync_twice(tmp_path):
    server = MlflowServer(tmp_path / "server", env=LEAN_SERVER).start()
    try:
        client = MlflowClient(server.uri)
        warnings: list[str] = []
        seen: list[RunRecord] = []

        def stop_after_first(record: RunRecord) -> None:
            seen.append(record)
            if len(seen) == 1:
                server.stop()

        out = sweep.measure_and_track(
            tiny("noop", "causal"),
            TrackingSettings("mid-sweep", server.uri),
            progress=False,
            warn=warnings.append,
            on_result=stop_after_first,
        )
        assert len(out.records) == 2 and out.failed == 0
        assert out.exit_code == 1 and out.offline
        assert len(warnings) == 1 and "unreachable" in warnings[0]
        assert "flexbench sync" in sweep.closing_line(out)
        assert out.tracking_s < DEAD_SERVER_BUDGET_S
        journal = tracking.Journal(out.journal)
        types = [e["type"] for e in journal.entries()]
        # Children are logged on a background thread: the first one may or may not have
        # reached the server before it stopped (or only its create_run did); sync mends each.
        assert types.count("sweep") == 1 and types.count("result") == 2
        synced_live = types.count("synced")
        assert synced_live <= 1

        server.start()
        first = artifacts.sync(journal, server.uri)
        second = artifacts.sync(journal, server.uri)
        assert first.uploaded + first.already == 2 - synced_live and first.sweeps == 1
        assert (second.uploaded, second.already, second.sweeps) == (0, 0, 0)
        assert len(runs_of_kind(client, "mid-sweep", "config")) == 2
        assert [r.info.run_id for r in runs_of_kind(client, "mid-sweep", "sweep")] == [out.run_id]
        parent = client.get_run(out.run_id)
        assert parent.info.status == "FINISHED"
        assert parent.data.metrics["configs_total"] == 2
        assert len(children(client, out.run_id)) == 2
    finally:
        server.stop()


def test_unreachable_from_the_start_then_sync(mlflow_server, monkeypatch, capfd):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET_ENV_PASSWORD)
    warnings: list[str] = []
    out = sweep.measure_and_track(
        tiny("noop", "causal"),
        TrackingSettings("offline-start", dead_uri(SECRET_URI_PASSWORD)),
        progress=False,
        warn=warnings.append,
    )
    assert (len(out.records), out.failed, out.exit_code, out.run_id) == (2, 0, 1, "")
    assert len(warnings) == 1 and "http://***@127.0.0.1" in warnings[0]
    assert out.tracking_s < DEAD_SERVER_BUDGET_S
    texts = [*warnings, sweep.closing_line(out), Path(out.journal).read_text()]
    assert leaks([*texts, *capfd.readouterr()]) == []

    journal = tracking.Journal(out.journal)
    first = artifacts.sync(journal, mlflow_server.uri)
    second = artifacts.sync(journal, mlflow_server.uri)
    assert (first.uploaded, first.sweeps) == (2, 1)
    assert (second.uploaded, second.already, second.sweeps) == (0, 0, 0)
    client = MlflowClient(mlflow_server.uri)
    (parent,) = runs_of_kind(client, "offline-start", "sweep")
    assert parent.info.status == "FINISHED" and parent.data.metrics["configs_total"] == 2
    kids = children(client, parent.info.run_id)
    assert sorted(r.info.run_name for r in kids) == sorted(
        c.run_name() for c in tiny("noop", "causal")
    )
    assert all(r.info.status == "FINISHED" and "fwd_speedup" in r.data.metrics for r in kids)
    exp = client.get_experiment_by_name("offline-start")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


SLOW_S = 8.0  # longer than the old fixed 5 s timeout that read a busy server as an outage


def test_a_slow_server_is_waited_for_not_declared_unreachable(mlflow_server):
    """Every run creation answers 8 s late, in the sweep's thread and the background one."""
    warnings: list[str] = []
    with SlowProxy(mlflow_server.uri, SLOW_S, ("runs/create",)) as proxy:
        out = sweep.measure_and_track(
            tiny("noop"),
            TrackingSettings("slow-server", proxy.uri),
            progress=False,
            warn=warnings.append,
        )
    assert (out.offline, warnings, out.exit_code) == (None, [], 0)
    assert proxy.delayed == 2  # the sweep run, then the config run
    assert out.tracking_s + out.background_s >= 2 * SLOW_S
    client = MlflowClient(mlflow_server.uri)
    (parent,) = runs_of_kind(client, "slow-server", "sweep")
    assert parent.info.status == "FINISHED" and parent.info.run_id == out.run_id
    (child,) = children(client, out.run_id)
    assert child.info.status == "FINISHED" and "fwd_speedup" in child.data.metrics


def test_a_busy_server_503_is_tried_again_with_backoff(mlflow_server, tmp_path):
    """More 503 answers than MLflow's own retries of one request: the step is tried again."""
    busy = 4  # MLflow tries a request 3 times: the step's second try meets the 4th 503
    with SlowProxy(mlflow_server.uri, 0, ("experiments/get-by-name",), busy=busy) as proxy:
        tracker = tracking.Tracker(proxy.uri, "busy-server", tracking.Journal(tmp_path / "j"))
        assert tracker.connect(), tracker.offline
    assert (proxy.refused, proxy.delayed) == (busy, 1) and tracker.waits >= 1


def test_sync_completes_a_half_logged_child_and_an_unfinished_sweep_run(mlflow_server):
    """The server died between a child's create_run and its log_batch, then at the end."""
    out = sweep.measure_and_track(
        tiny("noop"),
        TrackingSettings("half-logged", dead_uri()),
        progress=False,
        warn=print,
    )
    journal = tracking.Journal(out.journal)
    sweep_entry, result = (e for e in journal.entries() if e["type"] in ("sweep", "result"))
    client = MlflowClient(mlflow_server.uri)
    exp_id = tracking.experiment_id(client, "half-logged")
    parent = tracking.start_sweep_run(client, exp_id, sweep_entry)
    half = client.create_run(  # what log_child's first call leaves behind
        exp_id,
        run_name=result["run_name"],
        tags={
            "mlflow.parentRunId": parent,
            tracking.SWEEP_ID_TAG: result["sweep_id"],
            tracking.RECORD_ID_TAG: result["record_id"],
            tracking.KIND_TAG: "config",
        },
    ).info.run_id

    first = artifacts.sync(journal, mlflow_server.uri)
    assert (first.uploaded, first.already) == (1, 0)
    assert [r.info.run_id for r in children(client, parent)] == [half]
    child = client.get_run(half)
    assert child.info.status == "FINISHED" and "fwd_speedup" in child.data.metrics

    # the sweep run lost its aggregates: no `finished` mark in the journal, sync redoes them
    lines = journal.path.read_text().splitlines()
    journal.path.write_text("".join(x + "\n" for x in lines if '"finished"' not in x))
    client.update_run(parent, status="RUNNING")
    again = artifacts.sync(journal, mlflow_server.uri)
    assert (again.uploaded, again.already, again.sweeps) == (0, 0, 1)
    assert client.get_run(parent).info.status == "FINISHED"
    assert len(children(client, parent)) == 1


def test_deleted_experiment_is_named_with_the_fix(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.uri)
    client.delete_experiment(client.create_experiment("gone"))
    tracker = tracking.Tracker(mlflow_server.uri, "gone", tracking.Journal(tmp_path / "j"))
    assert not tracker.connect()
    assert "experiment 'gone' is deleted" in tracker.offline and "--experiment" in tracker.offline


def test_description_is_cut_to_mlflow_tag_limit():
    short = "**flexbench sweep**\n\n| a |\n"
    assert tracking.description(short) == short
    long = "**flexbench sweep**\n\n" + "| row |\n" * 5000
    cut = tracking.description(long)
    assert len(cut) <= 8000 and cut.endswith("summary.md)*\n")


def test_redact_removes_uri_credentials_and_secret_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-123456")
    text = "failed at https://alice:pa55@mlflow.lan:5000/api with tok-123456"
    assert tracking.redact(text) == "failed at https://***@mlflow.lan:5000/api with ***"
    # a password holding '@' goes whole; an '@' in the path stays
    assert tracking.redact("http://alice:p@ss@host:5000/x@y") == "http://***@host:5000/x@y"


# --- the CLI: secrets, progress bar ---------------------------------------------------------------


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_USERNAME": "user",
        "MLFLOW_TRACKING_PASSWORD": SECRET_ENV_PASSWORD,
    }
    return subprocess.run(
        [sys.executable, "-m", "flexbench", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_never_leaks_secrets_and_shows_progress(mlflow_server, tmp_path):
    uri = mlflow_server.uri.replace("http://", f"http://user:{SECRET_URI_PASSWORD}@")
    done = cli(
        "run",
        "--device",
        "cpu",
        "-b",
        "1",
        "-nh",
        "2",
        "-s",
        "128",
        "-d",
        "16",
        "-mods",
        "noop",
        "-dtype",
        "float32",
        "--experiment",
        "secrets",
        "--tracking-uri",
        uri,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "noop b1 h2 s128 d16 fp32" in done.stderr and "100%|" in done.stderr  # tqdm bar
    assert "fwd_speedup" in done.stdout
    dead = cli("sync", "--tracking-uri", dead_uri(SECRET_URI_PASSWORD), cwd=tmp_path)
    assert dead.returncode == 1
    assert dead.stderr.startswith("Error: tracking server unreachable at http://***@")
    again = cli("sync", "--tracking-uri", uri, cwd=tmp_path)
    assert again.returncode == 0 and "synced 0 new results" in again.stdout

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("secrets")
    texts = [done.stdout, done.stderr, dead.stdout, dead.stderr, again.stdout, again.stderr]
    texts += [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()]
    for run in client.search_runs([exp.experiment_id]):
        texts.append(json.dumps([run.data.params, run.data.tags, run.info.artifact_uri]))
        for art in client.list_artifacts(run.info.run_id):
            local = client.download_artifacts(run.info.run_id, art.path, str(tmp_path / "dl"))
            texts.append(Path(local).read_text(errors="replace"))
    assert len(texts) > 8
    assert leaks(texts) == []
