"""Logging overhead per config: the time flexbench spends in tracking calls per child run.

Logs N synthetic result entries exactly as a sweep does (`tracking.log_child`: create_run with
all tags, one log_batch of params + metrics, set_terminated) under one sweep run, against a
loopback `mlflow server` (SQLite backend) and against a SQLite URI (no server), and prints
milliseconds per config. For contrast it also times the same runs logged one call per param
and metric (what `log_batch` avoids), and the journal append (fsync) each result costs first.

    python benchmarks/tracking_overhead.py [-n 50]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.servers

from tabulate import tabulate  # noqa: E402

from flexbench import env, tracking  # noqa: E402
from flexbench.record import RunRecord  # noqa: E402
from flexbench.spec import SweepSpec  # noqa: E402
from tests.servers import MlflowServer  # noqa: E402

METRICS = (
    "fwd_eager_us", "fwd_compiled_us", "fwd_speedup", "fwd_eager_tflops", "fwd_compiled_tflops",
    "fwd_eager_us_p20", "fwd_eager_us_p80", "fwd_compiled_us_p20", "fwd_compiled_us_p80",
    "sparsity", "max_abs_err", "baseline_max_abs_err", "compile_s", "peak_mem_mb",
)  # fmt: skip
LEAN_SERVER = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def entries(n: int, sweep: dict) -> list[RunRecord]:
    """n result records with the contract's params, metrics and tags."""
    mods = ["noop", "causal", "alibi", "softcap", "sliding_window", "document_mask"]
    configs = SweepSpec([1, 2, 4, 8, 16], [16], [512, 1024, 4096], [64, 128], mods,
                           device="cpu").configs()  # fmt: skip
    now = int(time.time() * 1000)
    out = []
    for c in configs[:n]:
        metrics = {m: random.uniform(0.1, 100.0) for m in METRICS}
        record = RunRecord(c.config_key(), c.run_name(), c.params(), metrics)
        out.append(tracking.result_entry(record, sweep, sweep["tags"], now, now + 1))
    return out


def sweep_entry(tags: dict[str, str]) -> dict:
    return {
        "sweep_id": uuid.uuid4().hex[:12],
        "part_id": uuid.uuid4().hex,
        "experiment": "overhead",
        "params": {"mods": "noop,causal", "configs": "50"},
        "tags": tags,
        "run_name": "overhead",
        "start_ms": int(time.time() * 1000),
        "run_id": None,
    }


def per_call(client, exp_id: str, parent: str, record: RunRecord) -> str:
    """The same child run, one HTTP round trip per param, metric and tag."""
    run_id = client.create_run(exp_id, run_name=record.run_name).info.run_id
    client.set_tag(run_id, tracking.PARENT_TAG, parent)
    for k, v in record.tags.items():
        client.set_tag(run_id, k, v)
    for k, v in record.params.items():
        client.log_param(run_id, k, v)
    for k, v in record.metrics.items():
        client.log_metric(run_id, k, v)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def time_each(fn: Callable[[RunRecord], object], items: list[RunRecord]) -> list[float]:
    """Milliseconds per call."""
    out = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        out.append((time.perf_counter() - start) * 1000)
    return out


def measure(uri: str, n: int, n_per_call: int, tags: dict[str, str]) -> dict[str, list[float]]:
    with tracking.fast_http():
        client = tracking.client_for(uri)
        exp_id = tracking.experiment_id(client, "overhead")
        sweep = sweep_entry(tags)
        parent = tracking.start_sweep_run(client, exp_id, sweep)
        items = entries(n, sweep)
        batched = time_each(lambda e: tracking.log_child(client, exp_id, parent, e), items)
        naive = time_each(lambda e: per_call(client, exp_id, parent, e), items[:n_per_call])
    return {"log_child": batched, "per_call": naive}


def journal_ms(n: int, tags: dict[str, str], root: Path) -> list[float]:
    journal = tracking.Journal(root / "journal.jsonl")
    return time_each(lambda r: journal.append(r.to_journal()), entries(n, sweep_entry(tags)))


def row(where: str, how: str, ms: list[float]) -> list[object]:
    p90 = statistics.quantiles(ms, n=10)[8] if len(ms) > 1 else ms[0]
    return [where, how, len(ms), statistics.median(ms), statistics.fmean(ms), p90]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=50, help="configs (child runs) per backend")
    parser.add_argument("--per-call", type=int, default=10, help="child runs logged per call")
    args = parser.parse_args()
    tags = env.capture("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = MlflowServer(root / "server", env=LEAN_SERVER).start()
        try:
            http = measure(server.uri, args.n, args.per_call, tags)
        finally:
            server.stop()
        sqlite = measure(f"sqlite:///{root / 'mlflow.db'}", args.n, args.per_call, tags)
        journal = journal_ms(args.n, tags, root)
    how = {
        "log_child": "create + 1 log_batch + terminate",
        "per_call": "1 call per param/metric/tag",
    }
    rows = [
        row(where, how[key], ms)
        for where, result in (("loopback mlflow server", http), ("sqlite:///mlflow.db", sqlite))
        for key, ms in result.items()
    ]
    rows.append(row("local journal", "append + fsync (before logging)", journal))
    headers = ["tracking", "per config", "n", "median ms", "mean ms", "p90 ms"]
    print(tabulate(rows, headers=headers, tablefmt="github", floatfmt=".1f"))


if __name__ == "__main__":
    main()
