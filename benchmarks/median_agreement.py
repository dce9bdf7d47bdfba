"""Do two kinds of sweep read the same medians? Compare the per-series medians (flex and its
first baseline, fwd and bwd) of sweeps in MLflow SQLite stores: each sweep of kind A against
each of kind B, next to B's sweeps against each other (their run-to-run spread).

Usage: python benchmarks/median_agreement.py A=store.db[,store2.db] B=store3.db[,...]
(every sweep run in a store counts; a name filter: A=store.db:flexbench keeps sweeps whose
run name starts with it). Prints JSON.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import statistics
import sys

KEYS = ("fwd_compiled_us", "fwd_eager_us", "bwd_compiled_us", "bwd_eager_us")


def sweeps(spec: str) -> dict[str, dict]:
    """sweep run name -> {(child run name, metric): median} of one store."""
    db, _, prefix = spec.partition(":")
    con = sqlite3.connect(db)
    names = dict(con.execute("select run_uuid, name from runs"))
    parent = dict(con.execute("select run_uuid, value from tags where key='mlflow.parentRunId'"))
    out: dict[str, dict] = {}
    for run, key, value in con.execute("select run_uuid, key, value from latest_metrics"):
        if key in KEYS and run in parent and names[parent[run]].startswith(prefix):
            out.setdefault(f"{db} {names[parent[run]]}", {})[(names[run], key)] = value
    return out


def delta(a: dict, b: dict) -> list[float]:
    return [(a[k] / b[k] - 1) * 100 for k in set(a) & set(b)]


def summary(pairs: list[list[float]]) -> dict:
    medians = [statistics.median(abs(x) for x in d) for d in pairs]
    return {
        "pairs": len(pairs),
        "median_abs_pct": statistics.median(medians),
        "range": [min(medians), max(medians)],
        "max_abs_pct": max(max(abs(x) for x in d) for d in pairs),
    }


def main(argv: list[str]) -> dict:
    kinds = {}
    for arg in argv:
        label, _, specs = arg.partition("=")
        kinds[label] = {k: v for s in specs.split(",") for k, v in sweeps(s).items()}
    (a, runs_a), (b, runs_b) = kinds.items()
    among = itertools.combinations(runs_b.values(), 2)
    result = {
        f"{b} vs {b}": summary([delta(x, y) for x, y in among]),
        f"{a} vs {b}": summary([delta(x, y) for x in runs_a.values() for y in runs_b.values()]),
    }
    for key in KEYS:  # signed: A's median against the median of B's runs, per series
        signed = []
        for x in runs_a.values():
            for (cfg, k), v in x.items():
                ref = [y[(cfg, k)] for y in runs_b.values() if (cfg, k) in y and k == key]
                if ref:
                    signed.append((v / statistics.median(ref) - 1) * 100)
        result[f"{key}: {a} vs median of {b}, signed median %"] = statistics.median(signed)
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=1))
