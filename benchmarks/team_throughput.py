"""Throughput of the authenticated team server (deploy/start-server.sh: PostgreSQL, basic auth).

Starts the server as the deploy script does (a fresh PostgreSQL database on 127.0.0.1:5432),
creates a user with EDIT on one experiment, then:
  * the mean latency of one authenticated request (get_experiment_by_name), 50 in a row;
  * CLIENTS processes that each log synthetic config runs with flexbench's own `log_child`
    (create_run, one log_batch, set_terminated) for SECONDS; config runs/s over all of them.

    python benchmarks/team_throughput.py OUT_DIR [--clients 4] [--seconds 60] [--workers N]
        [--auth-cache-ttl S]

Writes OUT_DIR/team_throughput.json and prints it. --auth-cache-ttl 0 is MLflow's default
(every request re-hashes the password); the deploy script's default is its own.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import secrets
import statistics
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flexbench.record import RunRecord  # noqa: E402
from tests.servers import MlflowServer  # noqa: E402
from tests.test_team_server import START  # noqa: E402

PG = "postgresql+psycopg2://postgres@127.0.0.1:5432"


class TeamServer(MlflowServer):
    """deploy/start-server.sh on a free loopback port."""

    def start(self) -> TeamServer:
        import subprocess

        log = (self.root / "server.log").open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        env.update(self.env, FLEXBENCH_SERVER_PORT=str(self.port))
        self.proc = subprocess.Popen(
            ["bash", str(START)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self._wait_healthy()
        return self


def synthetic_entry(sweep_id: str, part_id: str, i: int) -> RunRecord:
    """A result record shaped like a real config's (15 params, 20 metrics, 10 env tags)."""
    now = int(time.time() * 1000)
    return RunRecord(
        config_key=f"key{i}",
        run_name=f"config {i}",
        params={f"p{k}": str(k * i) for k in range(15)},
        metrics={f"m{k}": float(k + i) for k in range(20)},
        tags={f"env{k}": f"value{k}" for k in range(10)},
        record_id=uuid.uuid4().hex,
        sweep_id=sweep_id,
        part_id=part_id,
        start_ms=now,
        end_ms=now,
    )


def client_loop(uri: str, user: str, password: str, experiment: str, seconds: float, q) -> None:
    os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    from flexbench import tracking

    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    client = tracking.client_for(uri)
    exp_id = tracking.experiment_id(client, experiment)
    sweep = {
        "sweep_id": uuid.uuid4().hex[:12],
        "part_id": uuid.uuid4().hex,
        "params": {},
        "tags": {},
        "run_name": "bench sweep",
        "start_ms": int(time.time() * 1000),
    }
    parent = tracking.start_sweep_run(client, exp_id, sweep)
    done, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        tracking.log_child(
            client, exp_id, parent, synthetic_entry(sweep["sweep_id"], sweep["part_id"], done)
        )
        done += 1
    q.put(done)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--workers", default=None, help="FLEXBENCH_SERVER_WORKERS (default: script's)")
    ap.add_argument("--auth-cache-ttl", default=None, help="FLEXBENCH_SERVER_AUTH_CACHE_TTL")
    args = ap.parse_args()
    import psycopg2
    from mlflow.tracking import MlflowClient

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    db = f"flexbench_bench_{secrets.token_hex(4)}"
    conn = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres")
    conn.autocommit = True
    conn.cursor().execute(f"CREATE DATABASE {db}")
    admin_pw = secrets.token_urlsafe(16)
    env = {
        "FLEXBENCH_SERVER_DB": f"{PG}/{db}",
        "FLEXBENCH_SERVER_ARTIFACTS": str(out / "artifacts"),
        "FLEXBENCH_SERVER_HOST": "127.0.0.1",
        "FLEXBENCH_SERVER_PYTHON": sys.executable,
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_pw,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    if args.workers:
        env["FLEXBENCH_SERVER_WORKERS"] = args.workers
    if args.auth_cache_ttl is not None:
        env["FLEXBENCH_SERVER_AUTH_CACHE_TTL"] = args.auth_cache_ttl
    server = TeamServer(out / "server", backend_uri=f"{PG}/{db}", env=env).start()
    try:
        import mlflow.server

        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=admin_pw)
        auth = mlflow.server.get_app_client("basic-auth", tracking_uri=server.uri)
        user_pw = secrets.token_urlsafe(16)
        auth.create_user("bench", user_pw)
        exp_id = MlflowClient(server.uri).create_experiment("bench")
        auth.grant_user_permission("bench", "experiment", exp_id, "EDIT")
        os.environ.update(MLFLOW_TRACKING_USERNAME="bench", MLFLOW_TRACKING_PASSWORD=user_pw)
        client = MlflowClient(server.uri)
        lat = []
        for _ in range(50):
            t = time.perf_counter()
            client.get_experiment_by_name("bench")
            lat.append(time.perf_counter() - t)
        q = mp.get_context("spawn").Queue()
        procs = [
            mp.get_context("spawn").Process(
                target=client_loop, args=(server.uri, "bench", user_pw, "bench", args.seconds, q)
            )
            for _ in range(args.clients)
        ]
        start = time.perf_counter()
        for p in procs:
            p.start()
        counts = [q.get() for _ in procs]
        wall = time.perf_counter() - start
        for p in procs:
            p.join()
        result = {
            "workers": args.workers or "script default",
            "auth_cache_ttl_s": args.auth_cache_ttl
            if args.auth_cache_ttl is not None
            else "script default",
            "request_latency_s_mean": statistics.mean(lat),
            "request_latency_s_median": statistics.median(lat),
            "clients": args.clients,
            "seconds": args.seconds,
            "config_runs": sum(counts),
            "wall_s": wall,  # includes client start-up (imports, first requests)
            "config_runs_per_s": sum(counts) / args.seconds,
            "cpu_count": os.cpu_count(),
        }
    finally:
        server.stop()
        conn.cursor().execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    (out / "team_throughput.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
