"""Scale benchmark: `flexbench history` over 100 sweeps x 72 configs (7,200 config runs).

Writes 100 synthetic nightly sweeps of the seed's 72-config sweep (b 2,8,16 x s 512,1024,4096
x d 64,128 x noop,causal,rel,head_bias, fwd+bwd) into one SQLite store, each child run logged
the way a real sweep logs it (`tracking.log_child`, one `log_batch` per run; metrics as
`summary_scale.record` makes them, steady per config with 1% jitter per sweep). torch changes
at sweep 50; one config (causal b8 s4096 d128) runs 25% slower from sweep 95. Then times
`history` over it, in process and as the `flexbench history` command, and checks that exactly
that config is flagged. Writing takes several minutes; an existing store is reused.

    python benchmarks/history_scale.py                      # /tmp/flexbench-history.db
    python benchmarks/history_scale.py --sweeps 20 --db /dev/shm/h.db

Target (issue 17): 100 sweeps x 72 configs read from the database in <= 5 s.
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

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from summary_scale import ENV, record  # noqa: E402

from flexbench import history, tracking  # noqa: E402
from flexbench.config import BenchConfig  # noqa: E402
from flexbench.record import RunRecord  # noqa: E402
from flexbench.spec import SweepSpec

TARGET_S = 5.0
DEFAULT_DB = Path(tempfile.gettempdir()) / "flexbench-history.db"
EXPERIMENT = "flexbench"
DAY_MS = 86_400_000
NEW_TORCH_FROM, SLOW_FROM, SLOWDOWN = 50, 95, 1.25
SLOW_CONFIG = "causal b8 h16 s4096 d128 bf16"


def seed_configs() -> list[BenchConfig]:
    """The seed's 72 configs, forward and backward."""
    return SweepSpec(
        [2, 8, 16],
        [16],
        [512, 1024, 4096],
        [64, 128],
        ["noop", "causal", "rel", "head_bias"],
        ["bfloat16"],
        device="cuda",
        calculate_bwd=True,
    ).configs()


def nightly(c: BenchConfig, index: int, sweep: int) -> RunRecord:
    """The config's steady record (seeded per config) with this sweep's 1% jitter."""
    rec = record(c, random.Random(index))
    jitter = random.Random(index * 1000 + sweep).uniform(0.99, 1.01)
    slow = SLOWDOWN if c.run_name() == SLOW_CONFIG and sweep >= SLOW_FROM else 1.0
    metrics = dict(rec.metrics)
    for key in metrics:
        if key.endswith(("_us", "_us_p20", "_us_p80")):
            metrics[key] *= jitter * (slow if "compiled" in key else 1.0)
    return rec.with_run(metrics=metrics)


def write(uri: str, sweeps: int) -> None:
    client = tracking.client_for(uri)
    exp_id = tracking.experiment_id(client, EXPERIMENT)
    start0, configs = int(time.time() * 1000) - sweeps * DAY_MS, seed_configs()
    began = time.perf_counter()
    for s in range(1, sweeps + 1):
        env = {**ENV, "torch": "2.12.0" if s >= NEW_TORCH_FROM else ENV["torch"]}
        start = start0 + s * DAY_MS
        sweep = {
            "sweep_id": f"nightly-{s:03d}",
            "part_id": uuid.uuid4().hex,
            "experiment": EXPERIMENT,
            "params": {"configs": str(len(configs))},
            "tags": env,
            "run_name": f"nightly {s}",
            "start_ms": start,
            "run_id": None,
        }
        parent = tracking.start_sweep_run(client, exp_id, sweep)
        for i, c in enumerate(configs):
            entry = tracking.result_entry(nightly(c, i, s), sweep, env, start + i, start + i + 1)
            tracking.log_child(client, exp_id, parent, entry)
        client.set_terminated(parent, "FINISHED", end_time=start + len(configs))
        rate = s * len(configs) / (time.perf_counter() - began)
        print(f"  wrote sweep {s}/{sweeps} ({rate:.0f} runs/s)", file=sys.stderr)


def sweeps_in(uri: str) -> int:
    try:
        h = history.history(uri, EXPERIMENT)
    except Exception:  # noqa: BLE001 - no store or experiment yet
        return 0
    return len({p.sweep_id for s in h.series for p in s.points})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", type=int, default=100)
    parser.add_argument("--db", type=Path, default=DEFAULT_DB, help=f"default {DEFAULT_DB}")
    args = parser.parse_args()
    uri = f"sqlite:///{args.db.resolve()}"
    if (sweeps_in(uri) if args.db.exists() else 0) != args.sweeps:
        args.db.unlink(missing_ok=True)
        print(f"writing {args.sweeps} sweeps x 72 configs to {uri} ...", file=sys.stderr)
        began = time.perf_counter()
        write(uri, args.sweeps)
        print(f"wrote in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    began = time.perf_counter()
    h = history.history(uri, EXPERIMENT)
    text = history.render(h, "table")
    seconds = time.perf_counter() - began
    points = sum(len(s.points) for s in h.series)
    print(f"history in process: {len(h.series)} configs, {points} points in {seconds:.2f} s")
    flagged = [s.label for s in h.regressed]
    print(f"regressed: {flagged} (expected [{SLOW_CONFIG!r}] when sweeps >= {SLOW_FROM + 2})")
    cmd = [sys.executable, "-m", "flexbench", "history", "--tracking-uri", uri]
    began = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, check=False)
    cmd_s = time.perf_counter() - began
    verdict = "meets" if cmd_s <= TARGET_S else "MISSES"
    print(
        f"flexbench history (command, exit {done.returncode}, {points} runs): {cmd_s:.2f} s, "
        f"{verdict} {TARGET_S} s"
    )
    print(text.splitlines()[1])


if __name__ == "__main__":
    main()
