"""Sweep wall time on a GPU (issue 13): the seed's method vs `flexbench run`, side by side.

The 16 configs (b=8, h=16, s=1024,4096, d=64,128, noop/causal/rel/head_bias, fwd+bwd, bf16),
or with `--sweep default` the seed's 72-config sweep; each method in its own process and its
own inductor/triton cache directory, `cold` from an empty cache, then `warm` on the cache the
cold run left. Wall time is the whole process (imports, compile, measuring, MLflow to SQLite).

methods: `probe` (cold only: two fwd+bwd configs, one compile worker; per config the
measuring process's FX-graph/AOT-autograd cache hits and misses: the worker's config must miss
nothing), `seed` (a new torch.compile per config, do_bench, no check; ported to the public API
in h100_validation.py), `flexbench` (`flexbench run --calculate-bwd` with its defaults: compile
workers auto, every config checked), `flexbench_w0` (warm only, on flexbench's cache: the
same with `--compile-workers 0`; its timed medians against flexbench's show whether compile
workers change what is measured).

Usage (GPU machine, from the repository root; MLflow importable, e.g. the carried wheels):
    python benchmarks/sweep_speed_gpu.py --out DIR [--methods seed,flexbench] [--sweep headline]
Writes DIR/sweep_speed.json after every run and DIR/sweep_speed.md (the table) at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE_ROOT = Path("/tmp/flexbench-sweep-speed-cache")  # per method; never under --out
WORK = Path("/tmp/flexbench-sweep-speed-work")  # journals
SWEEPS = {
    "headline": dict(b="8", nh="16", s="1024,4096", d="64,128", mods="noop,causal,rel,head_bias"),
    "default": dict(
        b="2,8,16", nh="16", s="512,1024,4096", d="64,128", mods="noop,causal,rel,head_bias"
    ),
}
METHODS = ("probe", "seed", "flexbench", "flexbench_w0")
PHASES = ("cold", "warm")
RUN_TIMEOUT_S = 420
BUDGET_S = 540  # start no run after this (s from the script's start)
DEADLINE_S = 585  # kill a run still going: the GPU machine's command limit is 600 s
TARGETS = {"cold": 0.5, "warm": 0.8}  # flexbench wall / seed wall, at most
CLOSING = re.compile(
    r"sweep (?P<sweep_id>\S+): (?P<configs>\d+) configs, (?P<failed>\d+) failed, "
    r"\d+ skipped, (?P<inner_s>[\d.]+) s(?: \((?P<phases>[^)]*) s\))?"
)


def flexbench_cmd(sweep: dict, out: Path, method: str, phase: str) -> list[str]:
    """`flexbench run` as a user types it, tracked to SQLite under `out`."""
    args = [sys.executable, "-m", "flexbench", "run", "--calculate-bwd", "-dtype", "bfloat16"]
    for flag, value in sweep.items():
        args += [f"-{flag}", value]
    args += ["--tracking-uri", f"sqlite:///{out.resolve()}/speed.db", "--quiet"]
    args += ["--journal", str(WORK / f"{method}-{phase}.jsonl"), "--run-name", f"{method} {phase}"]
    return args + (["--compile-workers", "0"] if method == "flexbench_w0" else [])


def parse_closing(stderr: str) -> dict:
    """The closing line's counts, inner wall time and phase seconds."""
    found = list(CLOSING.finditer(stderr))
    if not found:
        return {}
    m = found[-1]
    entry = {k: m[k] for k in ("sweep_id",)}
    entry.update(configs=int(m["configs"]), failed=int(m["failed"]), inner_s=float(m["inner_s"]))
    if m["phases"]:
        for part in m["phases"].split(", "):
            name, seconds = part.rsplit(" ", 1)
            entry[f"phase_{name}_s"] = float(seconds)
    return entry


def run_one(method: str, phase: str, sweep_name: str, out: Path, timeout: float) -> dict:
    """One method, one cache state, in a fresh process with its own cache directories."""
    cache = CACHE_ROOT / sweep_name / ("flexbench" if method == "flexbench_w0" else method)
    if phase == "cold":
        shutil.rmtree(cache, ignore_errors=True)
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0],
        "PYTHONUNBUFFERED": "1",
    }
    if method in ("seed", "probe"):
        cmd = [sys.executable, __file__, f"--child-{method}", sweep_name]
    else:
        cmd = flexbench_cmd(SWEEPS[sweep_name], out, method, phase)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        code, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr or ""
        code, stderr = "timeout", err if isinstance(err, str) else err.decode(errors="replace")
    entry = {"wall_s": time.perf_counter() - start, "returncode": code}
    if method in ("seed", "probe") and code == 0:
        entry.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    elif method not in ("seed", "probe"):
        entry.update(parse_closing(stderr))
    if code != 0:
        entry["stderr_tail"] = stderr[-1500:]
    return entry


def seed_child(sweep_name: str) -> None:
    """The seed's loop over the sweep's configs (its own process)."""
    sys.path.insert(0, str(HERE))
    from h100_validation import seed_method

    from flexbench.spec import SweepSpec

    s = SWEEPS[sweep_name]
    ints = {k: [int(x) for x in s[k].split(",")] for k in ("b", "nh", "s", "d")}
    configs = SweepSpec(
        ints["b"],
        ints["nh"],
        ints["s"],
        ints["d"],
        s["mods"].split(","),
        ["bfloat16"],
        calculate_bwd=True,
        device="cuda",
    ).configs()
    print(json.dumps({"inner_s": seed_method(configs), "configs": len(configs)}))


def probe_child() -> None:
    """Two fwd+bwd configs, one compile worker, fresh cache: per config, the measuring process's
    FX-graph and AOT-autograd cache hits and misses (the worker's config should miss nothing)."""
    from torch._dynamo.utils import counters

    from flexbench import pipeline
    from flexbench.spec import SweepSpec

    configs = SweepSpec(
        [8],
        [16],
        [1024],
        [64],
        ["causal", "noop"],
        ["bfloat16"],
        calculate_bwd=True,
        device="cuda",
    ).configs()
    names = ("fxgraph_cache_hit", "fxgraph_cache_miss")
    auto = ("autograd_cache_hit", "autograd_cache_miss")
    seen = []

    def snap(result=None) -> None:
        seen.append(
            {
                **{n: counters["inductor"][n] for n in names},
                **{n: counters["aot_autograd"][n] for n in auto},
                "compile_s": (result.metrics.get("compile_s") if result else None),
                "error": result.error if result else None,
            }
        )

    snap()
    pipeline.measure_configs(configs, snap, progress=False, compile_workers=1)
    rows = []
    for c, before, after in zip(configs, seen, seen[1:]):
        delta = {n: after[n] - before[n] for n in (*names, *auto)}
        rows.append(
            {
                "config": c.run_name(),
                **delta,
                "compile_s": after["compile_s"],
                "error": after["error"],
            }
        )
    print(json.dumps({"probe": rows}))


TIMED = ("fwd_compiled_us", "bwd_compiled_us", "fwd_eager_us", "bwd_eager_us")


def medians(out: Path, sweep_id: str) -> dict[str, dict[str, float]]:
    """Per config run name, the timed medians a flexbench run logged to out/speed.db."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out.resolve()}/speed.db")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"tags.`flexbench.sweep_id` = '{sweep_id}' and tags.`flexbench.kind` = 'config'",
        max_results=1000,
    )
    return {
        r.info.run_name: {k: r.data.metrics[k] for k in TIMED if k in r.data.metrics} for r in runs
    }


def agreement(a: dict, b: dict) -> dict[str, float]:
    """|a - b| / b over every config and timed median both runs have: median and max, %."""
    diffs = sorted(
        abs(a[n][k] - b[n][k]) / b[n][k] * 100
        for n in a.keys() & b.keys()
        for k in a[n].keys() & b[n].keys()
        if b[n][k] > 0
    )
    if not diffs:
        return {}
    return {"n": len(diffs), "median_pct": diffs[len(diffs) // 2], "max_pct": diffs[-1]}


def compare_runs(result: dict, out: Path) -> None:
    """Timed medians of each flexbench run against `flexbench.warm` (workers on vs off, cold
    vs warm): do compile workers change what is measured?"""
    try:
        logged = {
            key: medians(out, e["sweep_id"])
            for key, e in result["runs"].items()
            if e.get("sweep_id")
        }
    except ImportError:
        return
    base = logged.get("flexbench.warm")
    if base:
        result["agreement_vs_flexbench_warm"] = {
            key: agreement(m, base) for key, m in logged.items() if key != "flexbench.warm"
        }


def table(result: dict) -> str:
    """Markdown: wall time per method and cache state, ratio to the seed, phases."""
    runs = result["runs"]
    lines = [
        "| method | cache | wall s | / seed | target | configs failed | compile | check | "
        "timing | tracking | wait |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, e in runs.items():
        method, phase = key.split(".")
        if method == "probe":
            continue
        seed = runs.get(f"seed.{phase}", {})
        killed = e.get("returncode") == "timeout"
        ratio = None
        if seed.get("returncode", 0) == 0 and "wall_s" in seed and method != "seed" and not killed:
            ratio = e["wall_s"] / seed["wall_s"]
        target = TARGETS[phase] if method == "flexbench" else None
        met = (
            ""
            if ratio is None or target is None
            else (f"≤ {target} {'met' if ratio <= target else 'MISSED'}")
        )
        phases = [e.get(f"phase_{p}_s") for p in ("compile", "check", "timing", "tracking", "wait")]
        cells = [
            method,
            phase,
            f"killed at {e['wall_s']:.1f}" if killed else f"{e['wall_s']:.1f}",
            f"{ratio:.2f}" if ratio else "",
            met,
            str(e.get("failed", "")),
            *(f"{p:.1f}" if p is not None else "" for p in phases),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for key, agree in result.get("agreement_vs_flexbench_warm", {}).items():
        lines.append(f"\n{key} timed medians vs flexbench.warm: {json.dumps(agree)}")
    for row in runs.get("probe.cold", {}).get("probe", []):
        lines.append(f"\nprobe {json.dumps(row)}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"of {','.join(METHODS)}")
    ap.add_argument("--phases", default="cold,warm")
    ap.add_argument("--sweep", choices=SWEEPS, default="headline")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="start no run after this")
    ap.add_argument(
        "--deadline-s", type=float, default=DEADLINE_S, help="kill a run still going after this"
    )
    ap.add_argument("--child-seed", choices=SWEEPS, help=argparse.SUPPRESS)
    ap.add_argument("--child-probe", choices=SWEEPS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_seed:
        seed_child(args.child_seed)
        return
    if args.child_probe:
        probe_child()
        return
    if args.out is None:
        ap.error("--out DIR is required")
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method {bad[0]}; use {', '.join(METHODS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    result = {
        "sweep": args.sweep,
        "configs": SWEEPS[args.sweep],
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(sys.argv),
        "runs": {},
    }
    path = args.out / "sweep_speed.json"
    begin = time.monotonic()
    budget, deadline = begin + args.budget_s, begin + max(args.deadline_s, args.budget_s)
    for phase in args.phases.split(","):
        for method in methods:
            if (method, phase) in (("probe", "warm"), ("flexbench_w0", "cold")):
                continue
            if budget - time.monotonic() < 30:
                print(f"{method} {phase}: skipped, out of time (--budget-s)", flush=True)
                continue
            left = deadline - time.monotonic()  # a started run may use the time to the deadline
            entry = run_one(method, phase, args.sweep, args.out, min(RUN_TIMEOUT_S, left))
            result["runs"][f"{method}.{phase}"] = entry
            print(f"{method} {phase}: {json.dumps(entry)}", flush=True)
            path.write_text(json.dumps(result, indent=1))
    compare_runs(result, args.out)
    path.write_text(json.dumps(result, indent=1))
    (args.out / "sweep_speed.md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
