"""Where a warm `flexbench run` spends its wall time, and what the timer settings cost (issue 13).

On the 16-config headline sweep (b=8 h=16 s=1024,4096 d=64,128 noop/causal/rel/head_bias,
fwd+bwd, bf16; sweep_speed_gpu.py's), each run a fresh `flexbench run` process with its own
inductor/triton cache directory (filled by the `cold` run first), MLflow to one SQLite file:

(a) breakdown: every run goes through a hook (this script's `--child` mode) that times named
    flexbench functions (imports, env capture, tracker, worker pool, warm-up, each config's
    Bench.run with its phases, each time_all with its sample counts, the check's parts, the
    artifacts after the last config) and writes them as events; the journal gives each
    series' samples, noise, retaken and unconverged flags. `profile` runs the measuring
    process under cProfile (main thread) and lists the top cumulative/own-time functions.
(b) variants of the timer settings, each a warm run of the same configs: wall time, timing
    phase, and every series' median against the `default` run's (median and max |delta| %);
    `default2` repeats `default` for the run-to-run yardstick.

Usage (GPU machine, repository root, MLflow importable; about 7 minutes for the default list):
    python benchmarks/sweep_diag_gpu.py --out DIR [--variants cold,default,...] [--budget-s 520]
Writes DIR/sweep_diag.json after every run and DIR/sweep_diag.md (tables) at the end.
`--sweep cpu-smoke` runs the same plumbing on two tiny CPU configs (a test of the script).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flexbench.record import RunRecord

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path("/tmp/flexbench-sweep-diag-cache")  # inductor/triton, shared by every run
WORK = Path("/tmp/flexbench-sweep-diag-work")  # journals, events, profiles
HEADLINE = dict(b="8", nh="16", s="1024,4096", d="64,128", mods="noop,causal,rel,head_bias")
SWEEPS = {
    "headline": ["--calculate-bwd", "-dtype", "bfloat16"]
    + [x for k, v in HEADLINE.items() for x in (f"-{k}", v)],
    "cpu-smoke": "-b 1 -nh 2 -s 128 -d 32 -mods noop,causal -dtype float32 --device cpu".split(),
}
# name -> extra `flexbench run` flags, BURST_GAP override, cProfile on, environment
VARIANTS = {
    "cold": {"flags": [], "cold": True},
    "default": {"flags": []},
    "profile": {"flags": [], "profile": True},
    "min_samples5": {"flags": ["--min-samples", "5"]},
    "max_time0.5": {"flags": ["--max-time", "0.5"]},
    "burst_gap0.25": {"flags": [], "burst_gap": 0.25},
    "default2": {"flags": []},
    "combo": {"flags": ["--min-samples", "5", "--max-time", "0.5"], "burst_gap": 0.25},
    "ahead": {"flags": [], "env": {"FLEXBENCH_COMPILE_AHEAD": "1"}},  # compile-ahead on
    "default3": {"flags": []},
    # the GPU sleep compile-ahead's guard puts before each graph sample, without compile-ahead
    "sleep": {"flags": [], "guard_sleep": True},
    # compile workers at normal priority (precompile.WORKER_NICE 0)
    "nice0": {"flags": [], "patches": {"flexbench.precompile": {"WORKER_NICE": 0}}},
    "inproc": {"flags": [], "env": {"FLEXBENCH_MEASURE_PROCESS": "0"}},  # no measuring child
    "child": {"flags": [], "env": {"FLEXBENCH_MEASURE_PROCESS": "1"}},  # one, on CPU too
}
DEFAULT_VARIANTS = "cold,default,profile,min_samples5,max_time0.5,burst_gap0.25,default2"
BASE = "default"  # medians are compared against this run's
SITE = HERE / "diag_site"  # sitecustomize: the hooks inside flexbench's own child processes
RUN_TIMEOUT_S = 300
BUDGET_S = 520  # the GPU machine's command limit is 600 s: leave time to write the results
TOP_FUNCTIONS = 50
# module:attribute to time in the measuring process; a missing one is listed, not fatal.
HOOKS = (
    "flexbench.sweep:measure_and_track",
    "flexbench.sweep:connect",
    "flexbench.env:capture",
    "flexbench.tracking:Tracker.connect",
    "flexbench.tracking:Tracker.start",
    "flexbench.precompile:Pool.__enter__",
    "flexbench.precompile:Pool.__exit__",
    "flexbench.precompile:Pool.take",
    "flexbench.timing:warm_gpu",
    "flexbench.pipeline:measure_sweep",
    "flexbench.pipeline:measure_configs",
    "flexbench.measure:Bench.run",
    "flexbench.measure:prepare",
    "flexbench.measure:_first_calls",
    "flexbench.measure:Bench.take_ahead",
    "flexbench.ahead:start",
    "flexbench.ahead:AotFlex.compile",
    "flexbench.measure:reference",
    "flexbench.measure:cross_check",
    "flexbench.measure:checked_baselines",
    "flexbench.measure:_peak_mem_mb",
    "flexbench.measure:record_kernels",
    "flexbench.kernels:profile",
    "flexbench.timing:time_all",
    "flexbench.tracking:Tracker.drain",
    "flexbench.tracking:Tracker.finish",
    "flexbench.tracking:finish_sweep_run",
    "flexbench.html_report:heatmap_figure",
    "flexbench.html_report:render",
    "flexbench.history:recent_trends",
    "flexbench.report:seed_tables",
)


# --- the measuring process (child) -----------------------------------------------------------


def _extra(label: str, args: tuple, out: object) -> dict:
    """What an event keeps of a hooked call besides its times."""
    if label.endswith("Bench.run") and out is not None:
        body = args[2] if len(args) > 2 else None
        return {
            "config": out.config.run_name(),
            "phases": dict(out.phases),
            "error": out.error,
            "body": getattr(body, "__name__", "measure"),
        }
    if label.endswith("time_all") and isinstance(out, dict):
        return {
            "timer": args[0],
            "series": {n: [t.samples, t.converged, t.retaken] for n, t in out.items()},
        }
    if label.endswith("Pool.take") and out is not None:
        return {"index": args[1], "by_worker": getattr(out, "by_worker", None)}
    return {}


class Hooks:
    """Timed wrappers around HOOKS; events are dicts with seconds since the process spawn."""

    def __init__(self, t0: float) -> None:
        self.t0, self.events, self.missing = t0, [], []

    def mark(self, name: str, t_start: float | None = None) -> None:
        now = time.time() - self.t0
        start = now if t_start is None else t_start - self.t0
        self.events.append({"name": name, "t0": start, "t1": now, "thread": "MainThread"})

    def wrap(self, owner: object, attr: str, label: str) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start, out = time.time(), None
            try:
                if label == "flexbench.pipeline:measure_configs":
                    args, kwargs = self._wrap_on_result(args, kwargs)
                out = fn(*args, **kwargs)
                return out
            finally:
                event = {"name": label, "t0": start - self.t0, "t1": time.time() - self.t0}
                event["thread"] = threading.current_thread().name
                try:
                    event.update(_extra(label, args, out))
                except Exception as exc:  # noqa: BLE001 - a diagnostic never breaks the run
                    event["extra_error"] = repr(exc)
                self.events.append(event)

        setattr(owner, attr, timed)

    def _wrap_on_result(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """pipeline.measure_configs's on_result (tracking, journal per config) as events."""
        inner = kwargs.get("on_result", args[1] if len(args) > 1 else None)
        if inner is None:
            return args, kwargs

        def on_result(result):
            start = time.time()
            try:
                return inner(result)
            finally:
                self.events.append(
                    {
                        "name": "on_result",
                        "t0": start - self.t0,
                        "t1": time.time() - self.t0,
                        "thread": threading.current_thread().name,
                        "config": result.config.run_name(),
                        "phases": dict(result.phases),
                    }
                )

        if "on_result" in kwargs:
            return args, {**kwargs, "on_result": on_result}
        return (args[0], on_result, *args[2:]), kwargs

    def install_lazy(self, patches: dict | None = None, guard_sleep: bool = False) -> None:
        """Wrap HOOKS (and apply `patches`, module -> {attribute: value}) as each module is
        first imported, importing nothing early (the parent of a measuring process never
        imports torch); the import of torch is an event. `guard_sleep`: compile-ahead's GPU
        sleep before every graph sample, with or without compile-ahead (flexbench before
        the timer took it for every sample)."""
        import importlib.abc

        wanted: dict[str, list[str]] = {}
        for target in HOOKS:
            module, attr = target.split(":")
            wanted.setdefault(module, []).append(attr)
        patches = patches or {}
        hooks = self

        def loaded(name: str, module: object) -> None:
            for attr_path in wanted.get(name, []):
                *parents, attr = attr_path.split(".")
                owner = module
                try:
                    for p in parents:
                        owner = getattr(owner, p)
                    getattr(owner, attr)
                except AttributeError:
                    hooks.missing.append(f"{name}:{attr_path}")
                    continue
                hooks.wrap(owner, attr, f"{name}:{attr_path}")
            for attr, value in patches.get(name, {}).items():
                setattr(module, attr, value)
            if name == "flexbench.timing" and guard_sleep and hasattr(module.GUARD, "cycles"):
                module.GUARD.cycles = module.HostGuard.CYCLES  # flexbench before 2026-12-02c

        class Finder(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name != "torch" and name not in wanted and name not in patches:
                    return None
                for finder in [f for f in sys.meta_path if f is not self]:
                    found = getattr(finder, "find_spec", lambda *a: None)(name, path, target)
                    if found is not None:
                        break
                else:
                    return None
                loader, start = found.loader, time.time()
                original = loader.exec_module

                def exec_module(module):
                    original(module)
                    if name == "torch":
                        hooks.mark("import torch", start)
                    else:
                        loaded(name, module)

                loader.exec_module = exec_module
                return found

        for name in [n for n in (*wanted, *patches) if n in sys.modules]:
            loaded(name, sys.modules[name])  # imported already (e.g. flexbench.cli's)
        sys.meta_path.insert(0, Finder())

    def install(self, targets: tuple[str, ...] = HOOKS) -> None:
        import importlib

        for target in targets:
            module_name, path = target.split(":")
            try:
                owner = importlib.import_module(module_name)
                *parents, attr = path.split(".")
                for p in parents:
                    owner = getattr(owner, p)
                getattr(owner, attr)
            except (ImportError, AttributeError):
                self.missing.append(target)
                continue
            self.wrap(owner, attr, target)


def child(spec: dict, argv: list[str]) -> None:
    """`flexbench <argv>` in this process, with hooks, BURST_GAP and cProfile as `spec` asks;
    events (and the profile) are written by an exit handler, however it ends."""
    hooks = Hooks(spec["t_spawn"])
    hooks.mark("python started")
    sys.path.insert(0, str(REPO))
    start = time.time()
    import flexbench.cli
    import flexbench.sweep  # noqa: F401 - what `run` imports lazily

    hooks.mark("import flexbench", start)  # not mlflow: `run` imports it after starting
    # its measuring process, and importing it here would delay that
    site = json.loads(os.environ.get("FLEXBENCH_DIAG_SITE", "{}"))  # patches: measured here too
    hooks.install_lazy(site.get("patches"), bool(site.get("guard_sleep")))
    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
    import atexit

    def dump() -> None:  # at exit: main() may end the process itself (fastexit)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(spec["profile"])
        hooks.mark("cli end")
        payload = {"events": hooks.events, "missing_hooks": hooks.missing}
        Path(spec["events"]).write_text(json.dumps(payload))

    atexit.register(dump)  # runs last: after the command's own exit handlers
    sys.argv = ["flexbench", *argv]  # the process's own command line, as `flexbench` runs it
    hooks.mark("cli start")
    if profiler is not None:
        profiler.enable()
    flexbench.cli.main()


# --- reading a run back ----------------------------------------------------------------------


def journal_results(path: Path) -> list[RunRecord]:
    """The results a journal holds (torn lines skipped)."""
    from flexbench import tracking
    from flexbench.record import RunRecord

    entries = tracking.Journal(path).entries()
    return [RunRecord.from_journal(e) for e in entries if e["type"] == "result"]


def series_of(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """Timed series of one config (`<series>_samples` present) -> median_us, samples, noise,
    retaken, unconverged; `<kind>_eager` (the first baseline again) left out when named."""
    names = [k[: -len("_samples")] for k in metrics if k.endswith("_samples")]
    out = {}
    for name in names:
        kind = name.split("_", 1)[0]
        if name == f"{kind}_eager" and any(
            n.startswith(f"{kind}_") and n not in (name, f"{kind}_compiled") for n in names
        ):
            continue
        out[name] = {
            "median_us": metrics.get(f"{name}_us"),
            "samples": metrics[f"{name}_samples"],
            "noise_pct": metrics.get(f"{name}_noise_pct"),
            "retaken": metrics.get(f"{name}_retaken", 0.0),
            "unconverged": metrics.get(f"{name}_unconverged", 0.0),
        }
    return out


def run_series(results: list[RunRecord]) -> dict[str, dict[str, dict[str, float]]]:
    """Per config run name, its series (series_of), for FINISHED results."""
    return {r.run_name: series_of(dict(r.metrics)) for r in results if r.ok}


def sampling_totals(series: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """Over every series of a run: how many, samples, retaken, unconverged, median noise."""
    flat = [s for per in series.values() for s in per.values()]
    if not flat:
        return {}
    noise = sorted(s["noise_pct"] for s in flat if s["noise_pct"] is not None)
    return {
        "series": len(flat),
        "samples": sum(s["samples"] for s in flat),
        "retaken": sum(s["retaken"] or 0 for s in flat),
        "unconverged": sum(s["unconverged"] or 0 for s in flat),
        "noise_pct_median": noise[len(noise) // 2] if noise else None,
    }


def agreement(run: dict, base: dict) -> dict:
    """|run - base| / base of every series median both have: n, median and max %, the worst."""
    diffs = []
    for config in run.keys() & base.keys():
        for name in run[config].keys() & base[config].keys():
            a, b = run[config][name]["median_us"], base[config][name]["median_us"]
            if a is not None and b:
                diffs.append((abs(a - b) / b * 100, f"{config} {name}"))
    if not diffs:
        return {}
    diffs.sort()
    return {
        "n": len(diffs),
        "median_pct": diffs[len(diffs) // 2][0],
        "max_pct": diffs[-1][0],
        "worst": diffs[-1][1],
        "over_1pct": sum(d > 1.0 for d, _ in diffs),
    }


def spans(events: list[dict]) -> dict[str, dict[str, float]]:
    """Per event name: calls, total seconds, first start, last end."""
    out: dict[str, dict[str, float]] = {}
    for e in events:
        s = out.setdefault(e["name"], {"calls": 0, "total_s": 0.0, "first_t0": e["t0"]})
        s["calls"] += 1
        s["total_s"] += e["t1"] - e["t0"]
        s["first_t0"] = min(s["first_t0"], e["t0"])
        s["last_t1"] = max(s.get("last_t1", e["t1"]), e["t1"])
    return out


def _first(events: list[dict], name: str, key: str = "t0", last: bool = False) -> float | None:
    found = [e[key] for e in events if e["name"] == name]
    if not found:
        return None
    return max(found) if last else min(found)


def timeline(events: list[dict], wall_s: float) -> list[tuple[str, float | None]]:
    """Consecutive segments of the run, seconds: start-up until the first config, the
    measuring loop, what follows the last config; their sum is the wall time."""
    t = {
        "python": _first(events, "python started"),
        "torch": _first(events, "import torch", "t1"),
        "flexbench": _first(events, "import flexbench", "t1"),
        "mlflow": _first(events, "import mlflow", "t1"),
        "sweep": _first(events, "flexbench.sweep:measure_and_track"),
        "connected": _first(events, "flexbench.sweep:connect", "t1"),
        "measure": _first(events, "flexbench.pipeline:measure_configs"),
        "first": _first(events, "flexbench.precompile:Pool.take"),
        "last": _first(events, "on_result", "t1", last=True),
        "measured": _first(events, "flexbench.pipeline:measure_configs", "t1", last=True),
        "finish": _first(events, "flexbench.tracking:Tracker.finish", "t1", last=True),
        "returned": _first(events, "flexbench.sweep:measure_and_track", "t1", last=True),
        "cli_end": _first(events, "cli end", "t1"),
    }
    order = [
        ("spawn -> python running this script", "python"),
        ("import torch", "torch"),
        ("import flexbench (cli, sweep, measure)", "flexbench"),
        ("import mlflow", "mlflow"),
        ("cli: parse, expand configs, check names", "sweep"),
        ("env capture + tracker connect", "connected"),
        ("sweep run start, until pipeline.measure_configs", "measure"),
        ("worker pool start + warm_gpu, until config 1", "first"),
        ("measuring loop (configs)", "last"),
        ("after last config: pool shutdown", "measured"),
        ("drain + finish (aggregates, artifacts)", "finish"),
        ("sweep.measure_and_track returns", "returned"),
        ("cli: tables, closing line, exit handlers", "cli_end"),
    ]
    out, prev = [], 0.0
    for label, key in order:
        if t[key] is None:
            out.append((label, None))
            continue
        out.append((label, t[key] - prev))
        prev = t[key]
    out.append(("interpreter teardown (after exit handlers)", wall_s - prev))
    return out


def child_events(name: str) -> list[dict]:
    """The events the measuring process and the compile workers wrote (diag_site)."""
    events = []
    for path in sorted(WORK.glob(f"{name}.*.*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:  # a killed worker's torn last line
                pass
    return events


INSTANTS = (  # (label, event name, start or end, process, first or last)
    ("parent: flexbench imported", "import flexbench", "t1", None, False),
    ("parent: connected (tracker + hello)", "flexbench.sweep:connect", "t1", None, False),
    ("measuring: python started", "python started", "t0", "measuring", False),
    ("measuring: torch imported", "import torch", "t1", "measuring", False),
    ("measuring: hello (env captured)", "flexbench.env:capture", "t1", "measuring", False),
    ("measuring: job in, pool starts", "flexbench.precompile:Pool.__enter__", "t0", "measuring", 0),
    ("measuring: loop starts", "flexbench.pipeline:measure_configs", "t0", "measuring", False),
    ("workers: first torch imported", "import torch", "t1", "worker", False),
    ("workers: first config compiled", "flexbench.measure:Bench.run", "t1", "worker", False),
    ("workers: last config compiled", "flexbench.measure:Bench.run", "t1", "worker", True),
    ("measuring: config 1 starts", "flexbench.measure:Bench.run", "t0", "measuring", False),
    ("measuring: config 1 compiled", "flexbench.measure:_first_calls", "t1", "measuring", False),
    ("measuring: last config done", "flexbench.measure:Bench.run", "t1", "measuring", True),
    ("parent: sweep finished", "flexbench.tracking:Tracker.finish", "t1", None, True),
    ("parent: cli end", "cli end", "t1", None, True),
)


def instants(events: list[dict]) -> list[tuple[str, float | None]]:
    """Seconds since the spawn at which each process reached each point (INSTANTS)."""
    out = []
    for label, name, key, process, last in INSTANTS:
        found = [e[key] for e in events if e["name"] == name and e.get("process") == process]
        out.append((label, (max(found) if last else min(found)) if found else None))
    return out


def per_config(events: list[dict], series: dict) -> list[dict]:
    """One row per config in sweep order: wait, compile, check, timing, tracking, the gap to
    the next config, fwd/bwd timing seconds and samples, unconverged and retaken series."""
    events = [e for e in events if e.get("process") in (None, "measuring")]
    runs = [e for e in events if e["name"] == "flexbench.measure:Bench.run"]
    runs = [e for e in runs if e.get("body") == "measure"]
    takes = sorted(
        (e for e in events if e["name"] == "flexbench.precompile:Pool.take"),
        key=lambda e: e["t0"],
    )
    results = {e["config"]: e for e in events if e["name"] == "on_result"}
    timers = sorted(
        (e for e in events if e["name"] == "flexbench.timing:time_all"), key=lambda e: e["t0"]
    )
    rows = []
    for r in sorted(runs, key=lambda e: e["t0"]):
        row = {"config": r["config"], **{k: r["phases"].get(k) for k in ("compile", "check")}}
        row["timing"] = r["phases"].get("timing")
        took = [t for t in takes if t["t1"] <= r["t0"]]  # the take just before this config
        row["wait"] = took[-1]["t1"] - took[-1]["t0"] if took else None
        done = results.get(r["config"])
        row["tracking"] = done["t1"] - done["t0"] if done else None
        row["bench_run_s"] = r["t1"] - r["t0"]
        inside = [t for t in timers if r["t0"] <= t["t0"] <= r["t1"]]
        row["timed_s"] = [round(t["t1"] - t["t0"], 3) for t in inside]
        row["samples"] = [{n: v[0] for n, v in t.get("series", {}).items()} for t in inside]
        s = series.get(r["config"], {})
        row["unconverged"] = [n for n, v in s.items() if v["unconverged"]]
        row["retaken"] = sum(v["retaken"] or 0 for v in s.values())
        row["error"] = r.get("error")
        rows.append(row)
    for row in rows:
        done = results.get(row["config"])
        later = [t["t0"] for t in takes if done and t["t0"] >= done["t1"]]
        row["gap_to_next_s"] = min(later) - done["t1"] if later else None
    return rows


def top_functions(
    path: Path, n: int = TOP_FUNCTIONS, key: str = "cumulative", under: str = ""
) -> list[dict]:
    """The profile's top `n` functions by cumulative (or own: `tottime`) seconds, of files
    whose path holds `under` (e.g. "/flexbench/") when given."""
    import pstats

    stats = pstats.Stats(str(path)).stats
    rows = [
        {
            "function": f"{Path(file).name}:{line}({func})",
            "calls": nc,
            "tottime": tt,
            "cumulative": ct,
        }
        for (file, line, func), (_, nc, tt, ct, _) in stats.items()
        if under in file
    ]
    rows.sort(key=lambda r: r[key], reverse=True)
    return rows[:n]


# --- running (parent) ------------------------------------------------------------------------


def flexbench_args(sweep: str, out: Path, name: str, flags: list[str]) -> list[str]:
    """`flexbench run` arguments of one variant: tracked to out/diag.db, own journal."""
    uri = f"sqlite:///{out.resolve()}/diag.db"
    return [
        "run",
        *SWEEPS[sweep],
        *("--tracking-uri", uri, "--quiet", "--run-name", f"diag {name}"),
        *("--journal", str(WORK / f"{name}.jsonl")),
        *flags,
    ]


def run_variant(name: str, sweep: str, out: Path, timeout: float) -> dict:
    """One variant in a fresh process (this script's --child) on the shared cache; `name`
    may carry a repeat number (`default#2`)."""
    spec = VARIANTS[name.split("#")[0]]
    if spec.get("cold"):
        shutil.rmtree(CACHE, ignore_errors=True)
    for suffix in (".jsonl", ".events.json", ".prof"):
        (WORK / f"{name}{suffix}").unlink(missing_ok=True)
    for old in WORK.glob(f"{name}.*.*.jsonl"):  # the last run's child-process events
        old.unlink()
    child_spec = {"events": str(WORK / f"{name}.events.json"), "burst_gap": spec.get("burst_gap")}
    if spec.get("profile"):
        child_spec["profile"] = str(WORK / f"{name}.prof")
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(CACHE / "inductor"),
        "TRITON_CACHE_DIR": str(CACHE / "triton"),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0],
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        **spec.get("env", {}),
    }
    argv = flexbench_args(sweep, out, name, spec["flags"])
    start = time.time()
    child_spec["t_spawn"] = start
    patches = dict(spec.get("patches", {}))
    if spec.get("burst_gap") is not None:
        patches["flexbench.timing"] = {"BURST_GAP": float(spec["burst_gap"])}
    site = {"t_spawn": start, "prefix": str(WORK / name), "benchmarks": str(HERE)}
    site |= {"patches": patches, "guard_sleep": bool(spec.get("guard_sleep"))}
    env["FLEXBENCH_DIAG_SITE"] = json.dumps(site)
    env["PYTHONPATH"] = os.pathsep.join([str(SITE), env["PYTHONPATH"]])
    cmd = [sys.executable, __file__, "--child", json.dumps(child_spec), "--", *argv]
    try:
        proc = subprocess.run(
            cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )
        code, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr or ""
        code, stderr = "timeout", err if isinstance(err, str) else err.decode(errors="replace")
    wall = time.time() - start
    return collect(name, spec, wall, code, stderr, child_spec)


def collect(name: str, spec: dict, wall: float, code: object, stderr: str, paths: dict) -> dict:
    """A variant's entry: wall, closing line, sampling totals, timeline, per-config rows."""
    from sweep_speed_gpu import parse_closing

    entry = {"variant": name, "wall_s": wall, "returncode": code, **parse_closing(stderr)}
    entry["flags"] = spec["flags"] + (
        [f"BURST_GAP={spec['burst_gap']}"] if spec.get("burst_gap") is not None else []
    )
    series = run_series(journal_results(WORK / f"{name}.jsonl"))
    entry["series"] = series
    entry["sampling"] = sampling_totals(series)
    events_path = Path(paths["events"])
    if events_path.exists():
        payload = json.loads(events_path.read_text())
        events = payload["events"] + child_events(name)
        entry["missing_hooks"] = payload["missing_hooks"]
        entry["instants"] = instants(events)
        entry["timeline"] = timeline(events, wall)
        entry["spans"] = spans(events)
        entry["per_config"] = per_config(events, series)
    if paths.get("profile") and Path(paths["profile"]).exists():
        entry["top_cumulative"] = top_functions(Path(paths["profile"]))
        entry["top_own"] = top_functions(Path(paths["profile"]), 25, "tottime")
        entry["top_flexbench"] = top_functions(Path(paths["profile"]), 40, under="/flexbench/")
    if code != 0:
        entry["stderr_tail"] = stderr[-2000:]
    return entry


# --- tables ----------------------------------------------------------------------------------


def _f(x: object, digits: int = 1) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and x is not None else ""


def variants_table(result: dict) -> list[str]:
    """One row per run: wall, phases, sampling totals, medians against BASE."""
    lines = [
        "| variant | flags | wall s | inner s | compile | check | timing | tracking | wait | "
        "series | samples | unconverged | retaken | vs default: median |Δ| % | max |Δ| % | "
        "> 1% |",
        "|---" * 17 + "|",
    ]
    for name, e in result["runs"].items():
        agree = result.get("agreement", {}).get(name, {})
        s = e.get("sampling", {})
        cells = [
            name,
            " ".join(e.get("flags", [])),
            _f(e.get("wall_s")),
            _f(e.get("inner_s")),
            *(
                _f(e.get(f"phase_{p}_s"))
                for p in ("compile", "check", "timing", "tracking", "wait")
            ),
            str(s.get("series", "")),
            _f(s.get("samples"), 0),
            _f(s.get("unconverged"), 0),
            _f(s.get("retaken"), 0),
            _f(agree.get("median_pct"), 2),
            _f(agree.get("max_pct"), 2),
            str(agree.get("over_1pct", "")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    worst = [f"{n}: {a['worst']}" for n, a in result.get("agreement", {}).items() if a]
    if worst:
        lines.append("\nLargest |Δ| per variant: " + "; ".join(worst))
    return lines


def breakdown_tables(entry: dict) -> list[str]:
    """The timeline, per-config rows and hooked spans of one run."""
    lines = [f"\n### Breakdown of `{entry['variant']}` (wall {_f(entry['wall_s'])} s)\n"]
    lines += ["| instant | s since spawn |", "|---|---|"]
    lines += [f"| {label} | {_f(s, 2)} |" for label, s in entry.get("instants", [])]
    lines += ["\n| segment (this process) | s |", "|---|---|"]
    lines += [f"| {label} | {_f(s, 2)} |" for label, s in entry.get("timeline", [])]
    lines += [
        "\n| config | wait | compile | check | timing | tracking | gap | timed fwd/bwd s | "
        "samples fwd / bwd | unconverged | retaken |",
        "|---" * 11 + "|",
    ]
    for r in entry.get("per_config", []):
        samples = " / ".join(",".join(f"{int(v)}" for v in s.values()) for s in r["samples"])
        cells = [
            r["config"] + (f" FAILED {r['error'][:60]}" if r.get("error") else ""),
            *(_f(r.get(k), 2) for k in ("wait", "compile", "check", "timing", "tracking")),
            _f(r.get("gap_to_next_s"), 2),
            "/".join(_f(t, 2) for t in r["timed_s"]),
            samples,
            ",".join(r["unconverged"]),
            _f(r["retaken"], 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "\n| hooked function | calls | total s | first start s | last end s |",
        "|---" * 5 + "|",
    ]
    for name, s in sorted(entry.get("spans", {}).items(), key=lambda kv: kv[1]["first_t0"]):
        cells = [name, str(s["calls"]), _f(s["total_s"], 2), _f(s["first_t0"], 2)]
        lines.append("| " + " | ".join([*cells, _f(s.get("last_t1"), 2)]) + " |")
    if entry.get("missing_hooks"):
        lines.append(f"\nhooks not found: {', '.join(entry['missing_hooks'])}")
    return lines


def profile_tables(entry: dict) -> list[str]:
    lines = []
    for key, title in (
        ("top_flexbench", "cumulative, flexbench's functions"),
        ("top_cumulative", "cumulative"),
        ("top_own", "own time"),
    ):
        rows = entry.get(key)
        if not rows:
            continue
        lines += [f"\n### cProfile of `{entry['variant']}`, top by {title} (main thread)\n"]
        lines += ["| function | calls | own s | cumulative s |", "|---|---|---|---|"]
        lines += [
            f"| {r['function']} | {r['calls']} | {r['tottime']:.2f} | {r['cumulative']:.2f} |"
            for r in rows
        ]
    return lines


def report(result: dict) -> str:
    """The markdown: variants, then the breakdown of BASE (and cold), then the profile."""
    lines = [f"## sweep_diag ({result['sweep']}, {result['date']})\n", *variants_table(result)]
    for entry in result["runs"].values():
        if entry.get("timeline"):
            lines += breakdown_tables(entry)
    for entry in result["runs"].values():
        lines += profile_tables(entry)
    for name, e in result["runs"].items():
        if e.get("stderr_tail"):
            lines.append(f"\n{name} exited {e['returncode']}:\n```\n{e['stderr_tail']}\n```")
    return "\n".join(lines) + "\n"


def compare(result: dict) -> None:
    """Each run's series medians against BASE's (`agreement`)."""
    base = result["runs"].get(BASE, {}).get("series")
    if base:
        result["agreement"] = {
            name: agreement(e.get("series", {}), base)
            for name, e in result["runs"].items()
            if name != BASE
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"of {','.join(VARIANTS)}")
    ap.add_argument("--sweep", choices=SWEEPS, default="headline")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="start no run after this")
    args = ap.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    seen: dict[str, int] = {}
    for i, v in enumerate(args.variants):  # a repeated variant runs again as name#2, ...
        seen[v] = seen.get(v, 0) + 1
        args.variants[i] = v if seen[v] == 1 else f"{v}#{seen[v]}"
    bad = [v for v in args.variants if v.split("#")[0] not in VARIANTS]
    if bad:
        ap.error(f"unknown variant {bad[0]}; use {', '.join(VARIANTS)}")
    if not (CACHE / "inductor").exists() and "cold" not in args.variants:
        args.variants.insert(0, "cold")  # warm runs need a filled cache
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(json.loads(argv[1]), argv[3:])  # --child SPEC -- flexbench args
        return
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    args.out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    result = {
        "sweep": args.sweep,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(sys.argv),
        "cpus": os.cpu_count(),
        "runs": {},
    }
    path = args.out / "sweep_diag.json"
    deadline = time.monotonic() + args.budget_s
    for name in args.variants:
        left = deadline - time.monotonic()
        if left < 40:
            print(f"{name}: skipped, out of time (--budget-s)", flush=True)
            continue
        entry = run_variant(name, args.sweep, args.out, min(RUN_TIMEOUT_S, left))
        result["runs"][name] = entry
        brief = {k: entry.get(k) for k in ("wall_s", "returncode", "inner_s", "phase_timing_s")}
        print(f"{name}: {json.dumps({**brief, **entry.get('sampling', {})})}", flush=True)
        path.write_text(json.dumps(result, indent=1))
    compare(result)
    path.write_text(json.dumps(result, indent=1))
    text = report(result)
    (args.out / "sweep_diag.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
