"""The team server as deploy/start-server.sh starts it: PostgreSQL backend, proxied artifacts,
basic auth. A fresh database per module, the real script, real `flexbench` processes.

Skipped only when no PostgreSQL answers on 127.0.0.1:5432; FLEXBENCH_REQUIRE_POSTGRES=1 (CI)
turns that skip into a failure.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from flexbench.spec import SweepSpec
from tests.servers import MlflowServer

REPO = Path(__file__).resolve().parents[1]
START = REPO / "deploy" / "start-server.sh"
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "postgres"}
TINY = ["--device", "cpu", "-nh", "2", "-s", "128", "-d", "16", "-dtype", "float32", "--quiet"]
ADMIN = "admin"
RUN_TIMEOUT_S = 300


def postgres_or_skip():
    """A connection to the server's `postgres` database, or skip (fail when required)."""
    import psycopg2

    try:
        return psycopg2.connect(connect_timeout=3, **PG)
    except psycopg2.OperationalError as exc:
        reason = f"no PostgreSQL at {PG['host']}:{PG['port']} ({' '.join(str(exc).split())})"
        if os.environ.get("FLEXBENCH_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"FLEXBENCH_REQUIRE_POSTGRES=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def database():
    """A fresh database `flexbench_test_<random>`, dropped afterwards."""
    conn = postgres_or_skip()
    conn.autocommit = True
    name = f"flexbench_test_{secrets.token_hex(4)}"
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg2://{PG['user']}@{PG['host']}:{PG['port']}/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()


class TeamServer(MlflowServer):
    """deploy/start-server.sh on a free loopback port (the settings a LAN admin would set)."""

    def start(self) -> TeamServer:
        log = (self.root / "server.log").open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        env.update(self.env, FLEXBENCH_SERVER_PORT=str(self.port))
        self.proc = subprocess.Popen(["bash", str(START)], stdout=log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        self._wait_healthy()
        return self


@pytest.fixture(scope="module")
def team(database, tmp_path_factory):
    """The started server, its admin password and its artifact directory."""
    try:
        import flask_wtf  # noqa: F401 - what `mlflow server --app-name basic-auth` needs
    except ImportError:
        pytest.fail("the basic-auth app needs Flask-WTF: pip install 'mlflow[auth]'")
    root = tmp_path_factory.mktemp("team-server")
    password = secrets.token_urlsafe(16)
    env = {
        "FLEXBENCH_SERVER_DB": database,
        "FLEXBENCH_SERVER_ARTIFACTS": str(root / "artifacts"),
        "FLEXBENCH_SERVER_HOST": "127.0.0.1",
        "FLEXBENCH_SERVER_WORKERS": "1",
        "FLEXBENCH_SERVER_PYTHON": sys.executable,
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job runner: starts faster
    }
    server = TeamServer(root, backend_uri=database, env=env).start()
    yield {"uri": server.uri, "password": password, "artifacts": root / "artifacts",
           "server": server}
    server.stop()


def as_user(team: dict, username: str, password: str) -> dict[str, str]:
    """Environment for a client process logged in as `username`."""
    return {**os.environ, "MLFLOW_TRACKING_URI": team["uri"],
            "MLFLOW_TRACKING_USERNAME": username, "MLFLOW_TRACKING_PASSWORD": password}


def admin_client(team: dict, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", team["password"])
    return MlflowClient(team["uri"])


def auth_client(team: dict, monkeypatch: pytest.MonkeyPatch):
    """mlflow's basic-auth admin client (users, permissions)."""
    import mlflow.server

    admin_client(team, monkeypatch)
    return mlflow.server.get_app_client("basic-auth", tracking_uri=team["uri"])


def add_user(team: dict, monkeypatch: pytest.MonkeyPatch, name: str) -> str:
    password = secrets.token_urlsafe(16)
    auth_client(team, monkeypatch).create_user(name, password)
    return password


def start_run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flexbench", "run", *TINY, *args], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    return proc.returncode, out, err


def journal(path: Path) -> list[dict]:
    """Every line of a journal, parsed (a torn or interleaved line fails the test)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def runs(client: MlflowClient, experiment: str, kind: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.`flexbench.kind` = '{kind}'",
                              max_results=1000)


def assert_no_traceback(err: str) -> list[str]:
    assert "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()


# --- the start script's settings --------------------------------------------------------------

MISSING = {
    "no database": ({}, "start-server: set FLEXBENCH_SERVER_DB, e.g. postgresql+psycopg2://"),
    "no artifacts": ({"FLEXBENCH_SERVER_DB": "postgresql+psycopg2://h/db"},
                     "start-server: set FLEXBENCH_SERVER_ARTIFACTS to a directory or an s3:// URI"),
    "no secret key": ({"FLEXBENCH_SERVER_DB": "postgresql+psycopg2://h/db",
                       "FLEXBENCH_SERVER_ARTIFACTS": "/srv/a"},
                      "start-server: set MLFLOW_FLASK_SERVER_SECRET_KEY"),
    "not postgres": ({"FLEXBENCH_SERVER_DB": "sqlite:///x.db", "FLEXBENCH_SERVER_ARTIFACTS": "a",
                      "MLFLOW_FLASK_SERVER_SECRET_KEY": "k"},
                     "start-server: FLEXBENCH_SERVER_DB must be a postgresql URI, got 'sqlite://...'"),
}


@pytest.mark.parametrize("env,needle", MISSING.values(), ids=MISSING.keys())
def test_start_script_names_a_missing_setting_in_one_line(env, needle, tmp_path):
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("FLEXBENCH_SERVER_", "MLFLOW_FLASK_"))}
    done = subprocess.run(["bash", str(START)], env={**clean, **env}, capture_output=True,
                          text=True, timeout=30, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(needle), done.stderr


# --- concurrency: 4 sweeps from 4 processes into one experiment -------------------------------

BATCHES = (1, 2, 3, 4)  # one config per process, each a different batch


@pytest.fixture(scope="module")
def concurrent(team, tmp_path_factory):
    """4 `flexbench run` processes at once, as non-admin user alice, in one directory (one
    journal), into experiment `team` that none of them has created yet."""
    with pytest.MonkeyPatch.context() as mp:
        password = add_user(team, mp, "alice")
    where = tmp_path_factory.mktemp("concurrent")
    env = as_user(team, "alice", password)
    procs = [start_run(["-b", str(b), "-mods", "noop", "--experiment", "team"], env, where)
             for b in BATCHES]
    return {"done": [finish(p) for p in procs], "where": where}


def test_four_concurrent_sweeps_each_config_once_under_its_sweep(team, concurrent, monkeypatch):
    for code, _, err in concurrent["done"]:
        assert code == 0, err[-3000:]
        assert_no_traceback(err)
    client = admin_client(team, monkeypatch)
    sweeps = {r.info.run_id: r for r in runs(client, "team", "sweep")}
    configs = runs(client, "team", "config")
    assert len(sweeps) == 4
    assert {s.info.status for s in sweeps.values()} == {"FINISHED"}
    assert len({s.data.tags["flexbench.sweep_id"] for s in sweeps.values()}) == 4

    specs = [SweepSpec([b], [2], [128], [16], ["noop"], ["float32"], device="cpu") for b in BATCHES]
    wanted = {c.config_key() for spec in specs for c in spec.configs()}
    keys = [r.data.tags["flexbench.config_key"] for r in configs]
    assert sorted(keys) == sorted(wanted)  # every config exactly once
    parents = [r.data.tags["mlflow.parentRunId"] for r in configs]
    assert sorted(parents) == sorted(sweeps)  # each under its own sweep run
    for run in configs:
        parent = sweeps[run.data.tags["mlflow.parentRunId"]]
        assert run.data.tags["flexbench.part_id"] == parent.data.tags["flexbench.part_id"]
        assert run.info.status == "FINISHED" and "fwd_speedup" in run.data.metrics


def test_one_shared_journal_stays_whole(concurrent):
    entries = journal(concurrent["where"] / ".flexbench" / "journal.jsonl")
    kinds = [e["type"] for e in entries]
    assert kinds.count("sweep") == 4 and kinds.count("result") == 4
    assert kinds.count("synced") == 4 and kinds.count("finished") == 4


def test_artifacts_are_proxied_to_the_artifact_store(team, concurrent, monkeypatch, tmp_path):
    client = admin_client(team, monkeypatch)
    sweep = runs(client, "team", "sweep")[0]
    assert sweep.info.artifact_uri.startswith("mlflow-artifacts:")  # clients never see the store
    local = client.download_artifacts(sweep.info.run_id, "summary.md", str(tmp_path))
    stored = list(team["artifacts"].rglob(f"{sweep.info.run_id}/artifacts/summary.md"))
    assert len(stored) == 1 and stored[0].read_text() == Path(local).read_text()
    assert "noop" in stored[0].read_text()


# --- authentication and permissions ---------------------------------------------------------


def test_wrong_password_keeps_results_then_sync_uploads(team, monkeypatch, tmp_path):
    password = add_user(team, monkeypatch, "bob")
    code, out, err = finish(start_run(["-b", "1", "-mods", "noop", "--experiment", "bob"],
                                      as_user(team, "bob", "not-" + password), tmp_path))
    assert code == 1
    lines = assert_no_traceback(err)
    assert len(lines) == 2, err  # the warning when it happens, then the closing line
    assert lines[0].startswith("warning: authentication failed at http://127.0.0.1:")
    assert "MLFLOW_TRACKING_PASSWORD" in lines[0] and "flexbench sync" in lines[1]
    assert "fwd_speedup" in out  # measured all the same
    path = tmp_path / ".flexbench" / "journal.jsonl"
    results = [e for e in journal(path) if e["type"] == "result"]
    assert len(results) == 1 and results[0]["status"] == "FINISHED"

    def sync(pw: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flexbench", "sync", "--journal", str(path)],
                              env=as_user(team, "bob", pw), capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S)

    again = sync("not-" + password)
    assert again.returncode == 1
    assert assert_no_traceback(again.stderr) == [
        f"Error: authentication failed at {team['uri']}: check MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD"]
    good = sync(password)
    assert good.returncode == 0, good.stderr
    assert "synced 1 new results" in good.stdout
    client = admin_client(team, monkeypatch)
    [run] = runs(client, "bob", "config")
    assert run.data.tags["flexbench.record_id"] == results[0]["record_id"]
    assert run.data.metrics["fwd_compiled_us"] == results[0]["metrics"]["fwd_compiled_us"]


@pytest.fixture(scope="module")
def read_only(team):
    """Experiment `shared` made by the admin; user carol may only READ it."""
    with pytest.MonkeyPatch.context() as mp:
        password = add_user(team, mp, "carol")
        exp_id = admin_client(team, mp).create_experiment("shared")
        auth_client(team, mp).grant_user_permission("carol", "experiment", exp_id, "READ")
    return {"password": password, "exp_id": exp_id}


def test_read_permission_cannot_write_directly(team, read_only, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "carol")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", read_only["password"])
    client = MlflowClient(team["uri"])
    assert client.get_experiment(read_only["exp_id"]).name == "shared"  # she can read
    with pytest.raises(MlflowException, match="Permission denied"):
        client.create_run(read_only["exp_id"])


def test_read_permission_flexbench_run_fails_and_keeps_results(team, read_only, monkeypatch,
                                                               tmp_path):
    code, out, err = finish(start_run(["-b", "1", "-mods", "noop", "--experiment", "shared"],
                                      as_user(team, "carol", read_only["password"]), tmp_path))
    assert code == 1
    lines = assert_no_traceback(err)
    assert lines[0] == (f"warning: permission denied at {team['uri']}: ask the server admin for "
                        "EDIT on the experiment; measuring goes on, every result is kept in "
                        ".flexbench/journal.jsonl (upload later with `flexbench sync`)")
    assert "fwd_speedup" in out
    entries = journal(tmp_path / ".flexbench" / "journal.jsonl")
    assert [e["type"] for e in entries].count("result") == 1
    client = admin_client(team, monkeypatch)
    assert client.search_runs([read_only["exp_id"]]) == []  # nothing written


def test_summary_of_an_unknown_run_id_says_no_such_run(team, read_only, tmp_path):
    """The auth app answers 403 for a run id it does not know: not a permission problem."""
    done = subprocess.run(
        [sys.executable, "-m", "flexbench", "summary", "--sweep", "0" * 32],
        env=as_user(team, "carol", read_only["password"]),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        cwd=tmp_path,
    )
    assert done.returncode == 1
    (line,) = assert_no_traceback(done.stderr)
    assert f"no such run '{'0' * 32}'" in line and "EDIT" not in line
