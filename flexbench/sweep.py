"""One tracked sweep: measure every config, journal each result, log it to MLflow.

The glue between `measure` (torch) and `tracking` (MLflow); the CLI's `run` calls `run_sweep`.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from flexbench import env, measure, report, tracking
from flexbench.config import BenchConfig, expand_sweep


@dataclass
class Outcome:
    """What a sweep did: its records, counts, and why tracking went offline (if it did)."""

    sweep_id: str
    records: list[dict] = field(default_factory=list)
    skipped: int = 0
    offline: str | None = None
    run_id: str = ""
    journal: str = ""
    wall_s: float = 0.0
    tracking_s: float = 0.0

    @property
    def failed(self) -> int:
        return sum(r["status"] != "FINISHED" for r in self.records)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.offline else 0

    def tables(self) -> str:
        return report.seed_tables([report.row_from_record(r) for r in self.records])


def now_ms() -> int:
    return int(time.time() * 1000)


def new_sweep_id() -> str:
    return uuid.uuid4().hex[:12]


def run_sweep(
    configs: Sequence[BenchConfig],
    experiment: str = "flexbench",
    tracking_uri: str | None = None,
    journal: str | None = None,
    resume: bool = False,
    sweep_id: str | None = None,
    run_name: str | None = None,
    sweep_params: dict[str, str] | None = None,
    progress: bool = True,
    warn: Callable[[str], None] = print,
    on_result: Callable[[dict], None] | None = None,
) -> Outcome:
    """Measure, journal and log every config under one sweep run; never loses a result.

    `on_result` sees each journal entry once it is journalled and (if online) logged.
    """
    start = time.perf_counter()
    uri = tracking.resolve_uri(tracking_uri)
    tracker = tracking.Tracker(uri, experiment, tracking.Journal(journal))
    tags = env.capture(configs[0].device if configs else "cpu")
    out = Outcome(sweep_id or new_sweep_id(), journal=str(tracker.journal.path))
    tracker.connect()
    configs = _resume(configs, tracker, tags, out, warn) if resume else list(configs)
    sweep = {
        "sweep_id": out.sweep_id,
        "part_id": uuid.uuid4().hex,
        "experiment": experiment,
        "params": sweep_params or {},
        "tags": tags,
        "run_name": run_name or f"sweep {out.sweep_id}",
        "start_ms": now_ms(),
    }
    tracker.start(sweep)
    _warn_offline(tracker, out, warn)
    last = [sweep["start_ms"]]

    def log_result(result: measure.Result) -> None:
        end = now_ms()
        entry = tracking.result_entry(result.record(), sweep, tags, last[0], end)
        last[0] = end
        tracker.log(entry)
        out.records.append(entry)
        _warn_offline(tracker, out, warn)
        if on_result is not None:
            on_result(entry)

    measure.run_sweep(configs, log_result, progress=progress)
    tracker.finish(out.records)
    _warn_offline(tracker, out, warn)
    out.run_id, out.tracking_s = tracker.run_id, tracker.tracking_s
    out.wall_s = time.perf_counter() - start
    return out


def _resume(
    configs: Sequence[BenchConfig],
    tracker: tracking.Tracker,
    tags: dict[str, str],
    out: Outcome,
    warn: Callable[[str], None],
) -> list[BenchConfig]:
    done = tracker.resume_keys(tags) if not tracker.offline else None
    if done is None:
        return list(configs)
    todo = [c for c in configs if c.config_key() not in done]
    out.skipped = len(configs) - len(todo)
    warn(
        f"resume: skipped {out.skipped} of {len(configs)} configs already measured "
        f"(same torch {tags['torch']}, triton {tags['triton']}, gpu {tags['gpu']})"
    )
    return todo


def _warn_offline(tracker: tracking.Tracker, out: Outcome, warn: Callable[[str], None]) -> None:
    """Warn once when tracking goes offline."""
    if tracker.offline and not out.offline:
        out.offline = tracker.offline
        warn(
            f"warning: {tracker.offline}; measuring goes on, every result is kept in "
            f"{out.journal} (upload later with `flexbench sync`)"
        )


def run(
    batch: Sequence[int],
    heads: Sequence[int],
    seq_lens: Sequence[int],
    head_dims: Sequence[int],
    score_mods: Sequence[str],
    dtypes: Sequence[str] = ("bfloat16",),
    kv_heads: Sequence[int] = (),
    kv_lens: Sequence[int] = (),
    decode: bool = False,
    calculate_bwd: bool = False,
    dynamic: bool = False,
    max_autotune: bool = False,
    kernel_options: str = "",
    device: str = "cuda",
    timer: str = "auto",
    experiment: str = "flexbench",
    tracking_uri: str | None = None,
    run_name: str | None = None,
    resume: bool = False,
    journal: str | None = None,
    sweep_id: str | None = None,
    quiet: bool = False,
    warn: Callable[[str], None] | None = None,
) -> Outcome:
    """`flexbench run`: expand the sweep (ValueError on bad input), check the device
    (RuntimeError), then measure and track it."""
    measure.check_runtime(device, calculate_bwd)
    if decode:
        seq_lens, kv_lens = [1], list(kv_lens) or list(seq_lens)
    configs = expand_sweep(
        batch,
        heads,
        seq_lens,
        head_dims,
        score_mods,
        dtypes,
        kv_heads=list(kv_heads) or [None],
        kv_lens=list(kv_lens) or [None],
        calculate_bwd=calculate_bwd,
        dynamic=dynamic,
        max_autotune=max_autotune,
        kernel_options=kernel_options,
        device=device,
        timer=timer,
    )
    params = sweep_params(
        mods=score_mods,
        b=batch,
        nh=heads,
        s=seq_lens,
        d=head_dims,
        dtype=dtypes,
        kv_heads=kv_heads,
        kv_len=kv_lens,
        decode=decode,
        calculate_bwd=calculate_bwd,
        dynamic=dynamic,
        max_autotune=max_autotune,
        kernel_options=kernel_options,
        device=device,
        timer=timer,
        configs=len(configs),
    )
    return run_sweep(
        configs,
        experiment,
        tracking_uri,
        journal,
        resume,
        sweep_id,
        run_name,
        params,
        progress=not quiet,
        warn=warn or warn_stderr,
    )


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


def closing_line(out: Outcome) -> str:
    """One line: what ran, what failed, where the results are."""
    line = (
        f"sweep {out.sweep_id}: {len(out.records)} configs, {out.failed} failed, "
        f"{out.skipped} skipped, {out.wall_s:.1f} s"
    )
    if out.offline:
        return (
            line + f"; NOT all logged ({out.offline}): run `flexbench sync --journal {out.journal}`"
        )
    return line + f"; sweep run {out.run_id}"
