"""One tracked sweep: measure every config, journal each result, log it to MLflow.

The glue between `measure` (torch) and `tracking` (MLflow); the CLI's `run` calls `run`.
A sweep can be split: `--shard I/N` measures one of N disjoint slices (config.shard), and
`--gpus` starts one worker process per local GPU (`python -m flexbench.sweep JOB`), each on
its slice with CUDA_VISIBLE_DEVICES set. All parts of a sweep share one sweep id.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from flexbench import (
    artifacts,
    env,
    history,
    measuring,
    mlflow_view,
    pipeline,
    precompile,
    report,
    repro,
    schema,
    tracking,
)
from flexbench.config import BenchConfig, peak_bytes, shard
from flexbench.record import RunRecord, rows
from flexbench.spec import SweepSpec
from flexbench.tracking_settings import TrackingSettings

if TYPE_CHECKING:
    from flexbench.result import Result


@dataclass
class Outcome:
    """What a sweep did: its records, counts, and why tracking went offline (if it did)."""

    sweep_id: str
    records: list[RunRecord] = field(default_factory=list)  # in sweep order
    skipped: int = 0
    offline: str | None = None
    run_id: str = ""
    experiment_id: str = ""
    journal: str = ""
    wall_s: float = 0.0
    tracking_s: float = 0.0  # the sweep waited on MLflow this long
    background_s: float = 0.0  # child runs logged on the background thread, overlapped
    problems: list[str] = field(default_factory=list)  # e.g. a GPU worker that died
    phases: dict[str, float] = field(default_factory=dict)  # phase_*_s: where the time went
    planned: int = 0  # configs this sweep set out to measure (after --resume)
    interrupted: str = ""  # SIGINT / SIGTERM when the sweep was stopped
    uri: str = ""  # the tracking URI given (redacted), for the sync hint
    idle: bool = False  # nothing was left to measure: no sweep run was created

    @property
    def failed(self) -> int:
        return sum(not r.ok for r in self.records)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 128 + int(getattr(signal, self.interrupted, signal.SIGINT))
        return 1 if self.failed or self.offline or self.problems else 0

    def tables(self) -> str:
        return report.seed_tables(rows(self.records))


def now_ms() -> int:
    return int(time.time() * 1000)


def new_sweep_id() -> str:
    return uuid.uuid4().hex[:12]


def measure_and_track(
    configs: Sequence[BenchConfig],
    track: TrackingSettings | None = None,
    *,
    sweep_params: dict[str, str] | None = None,
    progress: bool = True,
    warn: Callable[[str], None] = print,
    on_result: Callable[[RunRecord], None] | None = None,
    compile_workers: int = 0,
    compile_cache: str | None = None,
    isolate: bool | None = None,
    child: measuring.Child | None = None,
) -> Outcome:
    """Measure, journal and log every config under one sweep run; never loses a result.

    `on_result` sees each record once it is journalled; its child run is logged on a
    background thread (`Tracker.log_later`), all of them before this returns.
    `compile_workers` processes compile configs ahead of measuring; `compile_cache` is a file
    of torch cache artifacts loaded before and saved after (precompile.compile_cache).
    SIGINT/SIGTERM stop the sweep after logging what was measured: its sweep run ends KILLED
    (`Outcome.interrupted`). ValueError for a name or URI MLflow would refuse.

    `isolate`: measure in a child process (`measuring`) while this one tracks; None: as
    `measuring.wanted` says (on CUDA). `child`: such a process already started (sweep.run
    starts it first). One that dies is a problem of the outcome, its results kept.
    """
    start = time.perf_counter()
    track = track or TrackingSettings()
    experiment, sweep_id = track.experiment, track.sweep_id or new_sweep_id()
    run_name = track.run_name or f"sweep {sweep_id}"
    check_tracking(track, run_name)
    device = configs[0].device if configs else "cpu"
    with measuring.process(configs, isolate, child) as child:
        if child is not None and not track.resume:  # --resume: the configs left, once connected
            child.send_job(configs, compile_workers, compile_cache)  # compiles while we connect
        tracker, tags = connect(track, device, warn, child)
        journal, uri = str(tracker.journal.path), _hint_uri(track.tracking_uri)
        out = Outcome(sweep_id, journal=journal, uri=uri)
        configs = _resume(configs, tracker, tags, out, warn) if track.resume else list(configs)
        if not configs:
            return _nothing_to_do(out, warn, start)
        out.planned = len(configs)
        sweep = tracking.sweep_entry(out.sweep_id, experiment, sweep_params, tags, run_name)
        tracker.start({**sweep, "planned": len(configs)})
        warn_offline(tracker, out, warn)
        last = [sweep["start_ms"]]
        phases = dict.fromkeys(PHASES, 0.0)

        def log_result(result: Result) -> None:
            start_log = time.perf_counter()
            for name, seconds in result.phases.items():
                phases[name] = phases.get(name, 0.0) + seconds
            end = now_ms()
            mine = {**tags, repro.REPRO_TAG: repro.command(result.config, experiment)}
            entry = RunRecord.from_result(result)
            record = tracking.result_entry(entry, sweep, mine, last[0], end)
            last[0] = end
            tracker.log_later(record)
            out.records.append(record)
            warn_offline(tracker, out, warn)
            warn_journal(tracker, out, warn)
            if on_result is not None:
                on_result(record)
            phases["tracking"] += time.perf_counter() - start_log

        # Measuring here (no measuring process), workers start once connected: started before,
        # they slowed the H200 sweep's start-up, cold and warm (BENCHMARKS.md §13).
        compiling = {"compile_workers": compile_workers, "compile_cache": compile_cache}
        _measure(out, configs, child, log_result, progress, compiling, warn)
    tracker.drain()
    phases["tracking"] += tracker.tracking_s
    out.phases = phase_metrics(phases)
    tracker.finish(
        lambda: artifacts.for_sweep(
            out.records, history.recent_trends(tracker.uri, tracker.exp_id)
        ),
        metrics=out.phases,
        status="KILLED" if out.interrupted else None,
    )
    warn_offline(tracker, out, warn)
    warn_journal(tracker, out, warn)
    out.run_id, out.tracking_s = tracker.run_id, tracker.tracking_s
    out.experiment_id = tracker.exp_id
    out.background_s = tracker.background_s
    out.wall_s = time.perf_counter() - start
    return out


PHASES = ("compile", "check", "timing", "tracking", "wait")


def _measure(
    out: Outcome,
    configs: Sequence[BenchConfig],
    child: measuring.Child | None,
    log_result: Callable[[Result], None],
    progress: bool,
    compiling: dict,
    warn: Callable[[str], None],
) -> None:
    """Measure here, or in the measuring process `child`; note in `out` what stopped it."""
    if child is None:
        out.interrupted = pipeline.measure_sweep(
            configs, log_result, progress, **compiling, warn=warn
        )
        return
    ending = child.measure(configs, log_result, progress, **compiling, warn=warn)
    out.interrupted = ending.interrupted
    if ending.died:
        out.problems.append(
            f"measuring process died ({ending.died}) after {len(out.records)} of {out.planned} "
            f"configs; measure the rest with `{resume_command(None, out.sweep_id)}`"
        )


def phase_metrics(phases: dict[str, float]) -> dict[str, float]:
    """The sweep run's phase_*_s metrics: the measuring process's seconds in first (compiling)
    calls, setup and checks, timers, tracking (journal, MLflow waits), waiting for workers."""
    return {f"phase_{name}_s": phases.get(name, 0.0) for name in PHASES}


def check_tracking(track: TrackingSettings, run_name: str) -> None:
    """ValueError (one line) for a name or tracking URI MLflow would refuse."""
    tracking.check_names(track.experiment, run_name)
    tracking.check_uri(tracking.resolve_uri(track.tracking_uri))


def _hint_uri(tracking_uri: str | None) -> str:
    """The --tracking-uri the user gave, redacted, for the `flexbench sync` hint."""
    return tracking.redact(tracking_uri) if tracking_uri else ""


def _nothing_to_do(out: Outcome, warn: Callable[[str], None], start: float) -> Outcome:
    """No config left to measure: say so, create no sweep run."""
    warn(f"sweep {out.sweep_id}: nothing to do, no sweep run created")
    out.idle = True
    out.wall_s = time.perf_counter() - start
    return out


def warn_journal(tracker: tracking.Tracker, out: Outcome, warn: Callable[[str], None]) -> None:
    """Warn once when the journal could not be written; the sweep then ends with exit 1,
    naming where its results are."""
    note = tracker.journal_note
    if note and out.journal != str(tracker.journal.path):
        warn(f"warning: {note}; measuring goes on")
        out.journal = str(tracker.journal.path)
        sync = f"flexbench sync --journal {out.journal}{uri_option(out)}"
        out.problems.append(f"{note} (upload them with `{sync}`)")
    lost = f"{len(tracker.unjournalled)} result(s) are in no journal file"
    if tracker.unjournalled and not any(p.endswith("no journal file") for p in out.problems):
        out.problems.append(lost)


def _resume(
    configs: Sequence[BenchConfig],
    tracker: tracking.Tracker,
    tags: dict[str, str],
    out: Outcome,
    warn: Callable[[str], None],
) -> list[BenchConfig]:
    done = tracker.resume_keys(tags)
    todo = [c for c in configs if c.config_key() not in done]
    out.skipped = len(configs) - len(todo)
    where = "journal" if tracker.offline else "server or journal"
    warn(
        f"resume: skipped {out.skipped} of {len(configs)} configs already measured "
        f"(in the {where}; same torch {tags['torch']}, triton {tags['triton']}, gpu {tags['gpu']})"
    )
    note = tracker.journal.bad_note()
    if note:
        warn(note)
    return todo


def connect(
    track: TrackingSettings,
    device: str,
    warn: Callable[[str], None] | None = None,
    child: measuring.Child | None = None,
) -> tuple[tracking.Tracker, dict[str, str]]:
    """A Tracker that has tried to reach the server (offline if not), and the env tags (from
    the measuring process `child` if there is one: RuntimeError if it cannot measure);
    `track.tracking_timeout` is how long one tracking step may wait on a busy server. `warn`
    hears of runs a failed `mlflow run` had left RUNNING, now closed."""
    tracker = tracker_of(track)
    tracker.connect()
    tags = child.hello() if child is not None else env.capture(device)
    if tracker.closed and warn is not None:
        warn(
            f"note: closed {len(tracker.closed)} run(s) that a failed `mlflow run` had left "
            f"RUNNING ({', '.join(tracker.closed)}) as FAILED, tag {schema.CLOSED_TAG}"
        )
    return tracker, tags


def tracker_of(track: TrackingSettings) -> tracking.Tracker:
    """A (not yet connected) Tracker for these settings."""
    uri = tracking.resolve_uri(track.tracking_uri)
    journal = tracking.Journal(track.journal)
    return tracking.Tracker(uri, track.experiment, journal, timeout_s=track.tracking_timeout)


def warn_offline(
    tracker: tracking.Tracker,
    out: Outcome,
    warn: Callable[[str], None],
    going_on: str = "measuring goes on, every result is kept in",
) -> None:
    """Warn once when tracking goes offline (`out` is any outcome with offline and journal)."""
    if tracker.offline and not out.offline:
        out.offline = tracker.offline
        warn(
            f"warning: {tracker.offline}; {going_on} {out.journal} "
            "(upload later with `flexbench sync`)"
        )


def run(
    spec: SweepSpec | None = None,
    tracking: TrackingSettings | None = None,
    *,
    shard: tuple[int, int] | None = None,
    gpus: Sequence[int] | str | None = None,
    compile_workers: int | str | None = precompile.AUTO,
    compile_cache: str | None = None,
    quiet: bool = False,
    warn: Callable[[str], None] | None = None,
    isolate: bool | None = None,
) -> Outcome:
    """`flexbench run`: expand `spec` (ValueError on bad input), check the device
    (RuntimeError), then measure and track it as `tracking` says: all of it, its `shard`
    (I, N) slice, or that slice spread over local `gpus` (ids or "all"), one worker process
    per GPU; each measuring process with `compile_workers` compile workers (a count or auto).

    Device "auto" (the spec's default) is cuda when there is one (or `gpus`), else cpu. Sizes
    and dtypes left empty take the device's defaults (`config.SIZE_DEFAULTS`: the seed's sweep
    on CUDA, one small float32 shape on CPU); a CPU sweep first says its size and memory per
    config. `isolate`: measure in a child process (measure_and_track); None: on CUDA, or as
    FLEXBENCH_MEASURE_PROCESS says."""
    warn = warn or warn_stderr
    env.check_switches()
    spec, track = spec or SweepSpec(), tracking or TrackingSettings()
    auto = spec.device == "auto"
    spec = spec.resolved(gpus)
    gpu_ids = visible_gpus(gpus) if gpus else []
    if gpu_ids and spec.device != "cuda":
        raise ValueError("--gpus runs one CUDA worker per GPU; drop --device cpu")
    if gpu_ids and compile_cache:
        raise ValueError("--compile-cache is for one measuring process; drop it or --gpus")
    with ExitStack() as stack:
        child = _start_measuring(stack, spec, bool(gpu_ids), isolate)
        filled = spec.size_defaults()
        configs, args = spec.expand()
        workers = precompile.resolve_workers(compile_workers, configs, len(gpu_ids) or 1)
        params = sweep_params(**args, compile_workers=workers, compile_cache=compile_cache or "")
        track = replace(track, sweep_id=track.sweep_id or new_sweep_id())
        check_tracking(track, track.run_name or f"sweep {track.sweep_id}")
        line = plan_line(configs, spec.device, filled, auto)
        if line:
            warn(line)
        compiling = {"compile_workers": workers, "compile_cache": compile_cache}
        measured = {"isolate": isolate, "child": child}
        return run_parts(
            configs, params, track, shard, gpu_ids, not quiet, warn, compiling, **measured
        )


def _start_measuring(
    stack: ExitStack, spec: SweepSpec, gpus: bool, isolate: bool | None
) -> measuring.Child | None:
    """The measuring process, started first (it imports torch while this process goes on),
    when `measuring.wanted` (never with `gpus`: their workers measure); else the device is
    checked here (RuntimeError, one line)."""
    bwd = bool(spec.setting("calculate_bwd"))
    if not gpus and measuring.wanted(isolate, spec.device):
        return stack.enter_context(measuring.Child.start(spec.device, bwd))
    from flexbench import measure  # torch: after `import flexbench.sweep`, which is light

    measure.check_runtime(spec.device, bwd)
    return None


LARGE_CPU_BYTES = 2**30  # a CPU sweep this big per config says so up front


def plan_line(
    configs: Sequence[BenchConfig], device: str, filled: Sequence[str], auto: bool
) -> str:
    """A CPU sweep's first line: the defaults it took (and how to choose others), how many
    configs and the memory of the largest. '' on CUDA, and for a small CPU sweep whose device
    and sizes were all given."""
    if device != "cpu" or not configs:
        return ""
    big = max(configs, key=peak_bytes)
    if not (auto or filled or peak_bytes(big) >= LARGE_CPU_BYTES):
        return ""
    where = "no CUDA device here, running on CPU" if auto else "CPU sweep"
    if filled:
        flags = "/".join(f.split()[0] for f in filled)
        where += f" with CPU-sized defaults {' '.join(filled)} (give {flags} to choose)"
    return (
        f"{where}: {len(configs)} configs, forward only, each up to about "
        f"{human_bytes(peak_bytes(big))} of memory ({big.run_name()})"
    )


def human_bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{max(1, round(n / 2**20))} MB"


# --- sharding: one slice here, or one worker process per local GPU ---------------------------


def run_parts(
    configs: Sequence[BenchConfig],
    params: dict[str, str],
    track: TrackingSettings,
    part: tuple[int, int] | None,
    gpus: Sequence[str],
    progress: bool,
    warn: Callable[[str], None],
    compiling: dict | None = None,
    *,
    isolate: bool | None = None,
    child: measuring.Child | None = None,
) -> Outcome:
    """Measure the whole sweep here, its `part` (I, N) slice, or that slice spread over local
    `gpus` (CUDA_VISIBLE_DEVICES values). `track.sweep_id` must be set; `compiling` holds
    measure_and_track's compile_workers and compile_cache, `isolate` and `child` its own
    (not used with `gpus`)."""
    compiling = compiling or {}
    if part:
        configs = shard_of(configs, part, track.sweep_id, warn)
    if gpus:
        workers = compiling.get("compile_workers", 0)
        return run_on_gpus(configs, gpus, track, params, part or (0, 1), warn, workers)
    if part:
        label = f"{part[0]}/{part[1]}"
        params = {**params, "shard": label}
        track = replace(track, run_name=part_name(track, label))
    return measure_and_track(
        configs,
        track,
        sweep_params=params,
        progress=progress,
        warn=warn,
        isolate=isolate,
        child=child,
        **compiling,
    )


def part_name(track: TrackingSettings, label: str) -> str:
    """`sweep 3f2a9c1b7e4d shard 1/4` (or the --run-name with the shard)."""
    return f"{track.run_name or 'sweep ' + str(track.sweep_id)} shard {label}"


def shard_of(
    configs: Sequence[BenchConfig], part: tuple[int, int], sweep_id: str, warn: Callable
) -> list[BenchConfig]:
    """This host's slice of the sweep; says which sweep id the other shards must share."""
    mine = shard(configs, *part)
    warn(
        f"shard {part[0]}/{part[1]} of sweep {sweep_id}: {len(mine)} of {len(configs)} configs; "
        f"run the other shards with --sweep-id {sweep_id}"
    )
    return mine


def visible_gpus(gpus: Sequence[int] | str) -> list[str]:
    """CUDA_VISIBLE_DEVICES values for `--gpus` ids (indices among the GPUs torch sees here)
    or "all"; RuntimeError without CUDA, ValueError for an id that is not here."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            "--gpus needs CUDA GPUs and torch sees none on this machine; "
            "drop --gpus (use --shard I/N to split a sweep across machines)"
        )
    count = torch.cuda.device_count()
    ids = list(range(count)) if gpus == "all" else list(gpus)
    missing = [g for g in ids if g >= count]
    if missing:
        raise ValueError(
            f"--gpus {missing[0]} is not here: torch sees {count} GPU(s), ids 0-{count - 1}"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [v.strip() for v in visible.split(",")] if visible else [str(g) for g in range(count)]
    return [names[g] for g in ids]


def run_on_gpus(
    configs: Sequence[BenchConfig],
    devices: Sequence[str],
    track: TrackingSettings,
    params: dict[str, str],
    part: tuple[int, int] = (0, 1),
    warn: Callable[[str], None] | None = None,
    compile_workers: int = 0,
) -> Outcome:
    """One worker process per device (CUDA_VISIBLE_DEVICES=device) on its round-robin slice of
    `configs`, all under `track.sweep_id`, each with `compile_workers`; waits for all, returns
    their union.

    `part` (I, N) is this host's shard, so worker k records shard I + N*k of N*len(devices).
    """
    start, warn = time.perf_counter(), warn or warn_stderr
    check_tracking(track, part_name(track, "0/0"))
    out = Outcome(str(track.sweep_id), journal=str(tracking.journal_path(track.journal)))
    out.planned, out.uri = len(configs), _hint_uri(track.tracking_uri)
    warn(f"sweep {out.sweep_id}: {len(configs)} configs over GPUs {','.join(devices)}")
    prepare_store(track)
    with tempfile.TemporaryDirectory(prefix="flexbench-gpus-") as tmp:
        workers = []
        for k, device in enumerate(devices):
            mine = shard(configs, k, len(devices))
            if mine:
                index, count = part[0] + part[1] * k, part[1] * len(devices)
                job = _job(mine, track, params, f"{index}/{count}", device)
                job["compile_workers"] = compile_workers
                workers.append(_spawn(Path(tmp) / f"worker{k}", job, device, warn))
        for device, proc, result in workers:
            _collect(out, device, proc.wait(), result)
    order = {c.config_key(): i for i, c in enumerate(configs)}
    out.records.sort(key=lambda r: order.get(r.config_key, len(order)))
    out.wall_s = time.perf_counter() - start
    return out


def prepare_store(track: TrackingSettings) -> None:
    """Create the tracking store and the experiment once, before workers race to do it (two
    processes initialising a new SQLite store fail with 'duplicate column name')."""
    tracker_of(track).connect()


def _job(
    mine: list[BenchConfig],
    track: TrackingSettings,
    params: dict[str, str],
    label: str,
    device: str,
) -> dict:
    """What one worker needs: its configs, the sweep's tracking settings and params."""
    return {
        "configs": [asdict(c) for c in mine],  # every field: identity() drops the settings
        "track": asdict(replace(track, run_name=part_name(track, label))),
        "sweep_params": {**params, "shard": label, "cuda_visible_devices": device},
    }


def _spawn(base: Path, job: dict, device: str, warn: Callable) -> tuple:
    """Start `python -m flexbench.sweep JOB RESULT` on one device."""
    job_path, result = base.with_suffix(".job.json"), base.with_suffix(".out.json")
    job_path.write_text(json.dumps(job), encoding="utf-8")
    env_ = {**os.environ, "CUDA_VISIBLE_DEVICES": device, "FLEXBENCH_WORKER": device}
    env_.pop("MLFLOW_RUN_ID", None)  # each worker logs its own sweep run, not `mlflow run`'s
    warn(f"[gpu {device}] {len(job['configs'])} configs, {job['track']['run_name']}")
    cmd = [sys.executable, "-m", "flexbench.sweep", str(job_path), str(result)]
    return device, subprocess.Popen(cmd, env=env_, stdout=subprocess.DEVNULL), result


def _collect(out: Outcome, device: str, code: int, result: Path) -> None:
    """Fold one worker's outcome into the union (or name the worker that died)."""
    if not result.exists():
        out.problems.append(
            f"worker on GPU {device} exited with code {code} before finishing "
            "(its results so far are in the journal)"
        )
        return
    part = from_wire(json.loads(result.read_text(encoding="utf-8")))
    out.records += part.records
    out.skipped += part.skipped
    out.offline = out.offline or part.offline
    out.interrupted = out.interrupted or part.interrupted
    out.run_id = ",".join(filter(None, (out.run_id, part.run_id)))
    out.experiment_id = out.experiment_id or part.experiment_id
    out.tracking_s += part.tracking_s
    out.background_s += part.background_s
    out.problems += part.problems
    for name, seconds in part.phases.items():
        out.phases[name] = out.phases.get(name, 0.0) + seconds


def worker(job_path: str, result_path: str) -> int:
    """A `--gpus` worker: measure the job's configs, write the Outcome as JSON."""
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    configs = [BenchConfig(**c) for c in job["configs"]]
    prefix = f"[gpu {os.environ.get('FLEXBENCH_WORKER', '?')}] "
    outcome = measure_and_track(
        configs,
        TrackingSettings(**job["track"]),
        sweep_params=job["sweep_params"],
        compile_workers=job.get("compile_workers", 0),
        isolate=False,  # this worker is the measuring process of its GPU
        progress=False,
        warn=lambda m: warn_stderr(prefix + m),
    )
    Path(result_path).write_text(json.dumps(to_wire(outcome)), encoding="utf-8")
    return 0


def to_wire(out: Outcome) -> dict:
    """A worker's Outcome as JSON: its records as journal entries (`RunRecord.to_journal`)."""
    return {**asdict(out), "records": [r.to_journal() for r in out.records]}


def from_wire(data: dict) -> Outcome:
    """The Outcome a worker wrote with `to_wire`."""
    records = [RunRecord.from_journal(e) for e in data["records"]]
    return Outcome(**{**data, "records": records})


def warn_stderr(message: str) -> None:
    """A line on stderr that does not tear the tqdm progress bar."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def sweep_params(**args: object) -> dict[str, str]:
    """The sweep's arguments as MLflow params: lists comma-joined, booleans lower-case."""
    out = {}
    for key, value in args.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        out[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return {k: v for k, v in out.items() if v != ""}


def closing_line(out: Outcome, argv: Sequence[str] | None = None) -> str:
    """One line: what ran, what failed, where the results are; after an interruption the
    command that measures the rest (`argv`: the interrupted command's arguments)."""
    if out.idle:
        return f"sweep {out.sweep_id}: nothing to do ({out.skipped} configs already measured)"
    line = (
        f"sweep {out.sweep_id}: {len(out.records)} configs, {out.failed} failed, "
        f"{out.skipped} skipped, {out.wall_s:.1f} s"
    )
    if any(out.phases.values()):
        spent = (f"{k[6:-2]} {v:.1f}" for k, v in out.phases.items())  # phase_compile_s: compile
        line += f" ({', '.join(spent)} s)"
    if out.interrupted:
        line += (
            f"; stopped by {out.interrupted} after {len(out.records)} of {out.planned or '?'} "
            f"configs, sweep run {out.run_id or '(offline)'} KILLED; measure the rest with "
            f"`{resume_command(argv, out.sweep_id)}`"
        )
    if out.problems:
        line += "; " + "; ".join(out.problems)
    if out.offline:
        sync = f"flexbench sync --journal {out.journal}{uri_option(out)}"
        return line + f"; NOT all logged ({out.offline}): run `{sync}`"
    if out.interrupted:
        return line
    runs = out.run_id.split(",")
    return line + (f"; sweep runs {', '.join(runs)}" if len(runs) > 1 else f"; sweep run {runs[0]}")


def next_commands(out: Outcome, experiment: str, tracking_uri: str | None = None) -> str:
    """Two lines: the command that prints these tables again, and where to see the runs
    ('' when the sweep did not reach the tracking server)."""
    if out.offline or not out.run_id:
        return ""
    runs = out.run_id.split(",")
    if len(runs) == 1:
        pick = f"--sweep {runs[0]}"
    else:
        pick = f"--sweep-id {out.sweep_id}"
        pick += f" --experiment {experiment}" if experiment != "flexbench" else ""
    uri = tracking.resolve_uri(tracking_uri)
    if tracking_uri:
        pick += f" --tracking-uri {tracking.redact(uri)}"
    return (
        f"next: flexbench summary {pick}   # these tables again, read from MLflow\n"
        f"      {ui_hint(uri, out.experiment_id)}"
    )


def ui_hint(uri: str, experiment_id: str) -> str:
    """Where the runs table of the experiment is: a server's page, or `mlflow ui` on a store."""
    here = f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    uri = "sqlite:///mlflow.db" if uri == here else uri  # MLflow's default, as README has it
    web = uri.startswith(("http://", "https://"))
    base = tracking.redact(uri) if web else "http://127.0.0.1:5000"
    page = mlflow_view.runs_page(base, experiment_id) if experiment_id else base
    if web:
        return f"the runs: {page}"
    return f"mlflow ui --backend-store-uri {uri}   # then open {page}"


def uri_option(out: Outcome) -> str:
    """` --tracking-uri URI` when the sweep was given one (so sync goes to the same server)."""
    return f" --tracking-uri {shlex.quote(out.uri)}" if out.uri else ""


def resume_command(argv: Sequence[str] | None, sweep_id: str) -> str:
    """`flexbench run ... --resume --sweep-id ID` from the interrupted command's arguments
    (credentials redacted); `argv` defaults to this process's."""
    args = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--resume",):
            continue
        elif arg == "--sweep-id":
            skip = True
        elif not arg.startswith("--sweep-id="):
            kept.append(tracking.redact(arg))
    return shlex.join(["flexbench", *kept, "--resume", "--sweep-id", sweep_id])


if __name__ == "__main__":
    sys.exit(worker(*sys.argv[1:3]))
