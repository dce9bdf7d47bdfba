"""Scale benchmark: `flexbench summary` over 10,000 config runs in one SQLite experiment.

Writes one synthetic sweep (a sweep run and N config child runs, each logged the way a real
sweep logs it: `tracking.log_child`, one `log_batch` per run) into a SQLite store through
`MlflowClient`, then times `summary` over it, in process and as the `flexbench` command.
Writing 10,000 runs takes several minutes; an existing store with enough runs is reused.

    python benchmarks/summary_scale.py                  # 10,000 runs in /tmp/flexbench-scale.db
    python benchmarks/summary_scale.py --runs 2000 --db /dev/shm/scale.db --generic --server

Target (issue 5): summary over 10,000 runs in <= 5 s.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

# Writing 10,000 runs makes 30,000 store calls: don't send usage telemetry for each.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from flexbench import artifacts, query, summary, tracking  # noqa: E402
from flexbench.config import BenchConfig  # noqa: E402
from flexbench.record import RunRecord  # noqa: E402
from flexbench.spec import SweepSpec  # noqa: E402

TARGET_S = 5.0
DEFAULT_DB = Path(tempfile.gettempdir()) / "flexbench-scale.db"  # reused; not in the checkout
EXPERIMENT = "flexbench"
SWEEP_ID = "scale0000001"
ENV = {
    "gpu": "NVIDIA H100 80GB HBM3",
    "driver": "570.86.15",
    "cuda": "12.8",
    "torch": "2.11.0",
    "triton": "3.5.0",
    "python": "3.11.9",
    "flexbench": "0.1.0",
    "git_sha": "0" * 40,
    "host": "bench-node",
}


def configs(n: int) -> list[BenchConfig]:
    """The first n configs of a large realistic grid."""
    grid = SweepSpec(
        [1, 2, 4, 8, 16, 32],
        [16],
        [256, 512, 1024, 2048, 4096, 8192],
        [64, 128],
        [
            "noop",
            "causal",
            "rel",
            "head_bias",
            "alibi",
            "sliding_window:256",
            "prefix_lm",
            "document_mask",
            "softcap",
            "sliding_window:1024",
        ],
        ["bfloat16", "float16"],
        kv_heads=[16, 8, 4, 2],
        kv_lens=[None, 16384],
        device="cuda",
        calculate_bwd=True,
    ).configs()
    if len(grid) < n:
        raise SystemExit(f"--runs at most {len(grid)}")
    return grid[:n]


def timings(rng: random.Random, prefix: str, base_us: float) -> dict[str, float]:
    """Median and p20/p80 of eager and compiled timings, with speedup and TFLOP/s."""
    out = {}
    for name, us in (("eager", base_us), ("compiled", base_us / rng.uniform(0.7, 2.5))):
        spread = us * rng.uniform(0.005, 0.03)
        out |= {
            f"{prefix}_{name}_us": us,
            f"{prefix}_{name}_us_p20": us - spread,
            f"{prefix}_{name}_us_p80": us + spread,
            f"{prefix}_{name}_tflops": rng.uniform(50, 600),
        }
    out[f"{prefix}_speedup"] = out[f"{prefix}_eager_us"] / out[f"{prefix}_compiled_us"]
    return out


def record(c: BenchConfig, rng: random.Random) -> RunRecord:
    """A synthetic result record, as `RunRecord.from_result` makes them."""
    work = c.batch * c.heads * c.q_len * c.kv_len * c.head_dim
    metrics = {
        **timings(rng, "fwd", work / 2e7),
        **timings(rng, "bwd", work / 8e6),
        "sparsity": 0.5 if "causal" in c.score_mod else 0.0,
        "max_abs_err": rng.uniform(1e-3, 1e-2),
        "baseline_max_abs_err": rng.uniform(1e-3, 1e-2),
        "compile_s": rng.uniform(2, 9),
        "peak_mem_mb": work / 1e5,
    }
    params = {**c.params(), "baseline": "sdpa_attn_mask"}
    return RunRecord(c.config_key(), c.run_name(), params, metrics)


def write(uri: str, n: int) -> str:
    """One sweep run with n config children; returns the sweep run id."""
    client = tracking.client_for(uri)
    exp_id = tracking.experiment_id(client, EXPERIMENT)
    now = int(time.time() * 1000)
    sweep = {
        "sweep_id": SWEEP_ID,
        "part_id": uuid.uuid4().hex,
        "experiment": EXPERIMENT,
        "params": {"configs": str(n)},
        "tags": ENV,
        "run_name": f"scale sweep of {n}",
        "start_ms": now,
        "run_id": None,
    }
    parent = tracking.start_sweep_run(client, exp_id, sweep)
    rng, start, entries = random.Random(0), time.perf_counter(), []
    for i, c in enumerate(configs(n)):
        entries.append(tracking.result_entry(record(c, rng), sweep, ENV, now + i, now + i + 1))
        tracking.log_child(client, exp_id, parent, entries[-1])
        if (i + 1) % 1000 == 0:
            rate = (i + 1) / (time.perf_counter() - start)
            print(f"  wrote {i + 1}/{n} runs ({rate:.0f} runs/s)", file=sys.stderr)
    tracking.finish_sweep_run(client, parent, artifacts.for_sweep(entries), terminate=True)
    return parent


def existing(uri: str) -> int:
    """Config runs already in the store's experiment (0 without one)."""
    try:
        return len(query.read(query.Selection("all"), uri, EXPERIMENT)[0])
    except query.NotFound:
        return 0


def time_in_process(uri: str, sweep: str, where: list[str]) -> tuple[float, int]:
    """Seconds for `summary.summary` (query + tables) in this process, and rows it read."""
    start = time.perf_counter()
    result = summary.summary(uri, EXPERIMENT, sweep=sweep, where=where)
    summary.render_summary(result, "table")
    return time.perf_counter() - start, len(result.rows)


def time_generic(uri: str) -> tuple[float, int]:
    """Seconds to read the latest sweep through MLflow's search_runs (the path every non-
    database tracking URI takes), for comparison with the database reader."""
    start = time.perf_counter()
    mlflow_reader = query.MlflowReader(tracking.client_for(uri), uri)
    scope = query.scope(mlflow_reader, EXPERIMENT, query.Selection())
    clauses = [query.tag_is(tracking.KIND_TAG, "config"), *scope.clauses]
    rows = mlflow_reader.rows(scope.experiment_ids, clauses)
    return time.perf_counter() - start, len(rows)


def time_command(uri: str, args: list[str]) -> float:
    """Wall seconds of the `flexbench summary` command, interpreter start included."""
    cmd = [sys.executable, "-m", "flexbench", "summary", "--tracking-uri", uri, *args]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def time_server(db: Path) -> float:
    """`flexbench summary` against an `mlflow server` on the same SQLite store."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.servers import MlflowServer

    server = MlflowServer(db.parent / "scale-server", backend_uri=f"sqlite:///{db.resolve()}")
    server.start()
    try:
        return time_command(server.uri, [])
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--db", type=Path, default=DEFAULT_DB, help=f"default {DEFAULT_DB}")
    parser.add_argument("--generic", action="store_true", help="also time MLflow's search_runs")
    parser.add_argument("--server", action="store_true", help="also time via `mlflow server`")
    args = parser.parse_args()
    uri = f"sqlite:///{args.db.resolve()}"
    if (existing(uri) if args.db.exists() else 0) != args.runs:
        args.db.unlink(missing_ok=True)
        print(f"writing {args.runs} config runs to {uri} ...", file=sys.stderr)
        start = time.perf_counter()
        write(uri, args.runs)
        print(f"wrote {args.runs} runs in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    for sweep, where in (("latest", []), ("all", []), ("all", ["score_mod=causal,dtype=bf16"])):
        seconds, rows = time_in_process(uri, sweep, where)
        label = f"--sweep {sweep}" + "".join(f" --where {w}" for w in where)
        print(f"summary {label}: {rows} rows in {seconds:.2f} s (in process, database reader)")
    if args.generic:
        seconds, rows = time_generic(uri)
        print(f"search_runs (MLflow client on {uri}): {rows} rows in {seconds:.2f} s")
    cmd_s = time_command(uri, [])
    verdict = "meets" if cmd_s <= TARGET_S else "MISSES"
    print(f"flexbench summary (command, {args.runs} runs): {cmd_s:.2f} s, {verdict} {TARGET_S} s")
    if args.server:
        print(f"flexbench summary via mlflow server: {time_server(args.db):.2f} s")


if __name__ == "__main__":
    main()
