"""Shared fixtures: a real loopback `mlflow server` (SQLite), isolated working dirs."""

from __future__ import annotations

import pytest

from tests.servers import MlflowServer


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """One `mlflow server` for the test session (about 20 s to start on 2 cores).

    Without its job runner (7 huey consumers, each importing mlflow): flexbench uses no jobs,
    and the server starts about twice as fast on a busy 2-core machine.
    """
    lean = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), env=lean).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def isolated_cwd(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """Each test runs in its own directory with no tracking URI or journal inherited."""
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID",
                 "FLEXBENCH_JOURNAL", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path
