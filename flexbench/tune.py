"""`flexbench tune`: search flex's kernel options per config; the fastest passing candidate wins.

Candidates per config (shape/mod/dtype options as for `run`): `default` (no kernel options),
`max-autotune` (compile mode max-autotune, no options) and one per point of a grid of kernel
options (`DEFAULT_GRID`, or `--grid` JSON). Grid points that cannot work are skipped with their
reason (`skip_reasons`); every other candidate goes through `measure` like any config: checked
against the reference, then timed. The fastest passing candidate (least fwd_compiled_us; fwd +
bwd compiled µs with backward; the earlier on a tie, default first) is the config's best.

MLflow layout, three levels linked by mlflow.parentRunId:

- tune sweep run (flexbench.kind=sweep, flexbench.command=tune): the arguments as params, the
  aggregates of all measured candidates as for `run`, summary.md, and tune.md (default vs best);
  FAILED only when a config has no passing candidate (a failed candidate is a finding);
- tune run, one per config (flexbench.kind=tune, a child of the sweep run): the config's params;
  metrics default_fwd_compiled_us, best_fwd_compiled_us, best_gain (= default / best, on the
  objective), best_speedup, candidates_measured/_skipped/_failed (and *_bwd_compiled_us);
  tags flexbench.best_candidate, flexbench.best_run_id; FAILED when no candidate passed;
- candidate runs, children of the tune run: measured ones are config runs like `run`'s
  (flexbench.kind=config) tagged flexbench.candidate, flexbench.tune_key, flexbench.tune_config,
  the best also flexbench.best=true; skipped ones have flexbench.kind=skipped, status KILLED,
  tag flexbench.skipped=<reason>, the candidate's params and no metrics.

Option names: flex applies plain num_warps/num_stages to forward and backward kernels, plain
BLOCK_M/BLOCK_N to the forward only (the backward reads BLOCK_M1/N1/M2/N2), and `fwd_`/`bwd_`
prefixed names to one kernel. A plain num_warps point can slow the backward down
(BENCHMARKS.md §7): tune the forward with `fwd_` names to keep the backward's defaults.

Time: every candidate compiles once (seconds each on a GPU, max-autotune minutes), so the
default grid (56 candidates a config) takes long: narrow --grid, or tune one -mods at a time.

Offline (server unreachable): measured candidates are journalled like `run`'s results and
`flexbench sync` uploads them under the tune sweep run, without the tune level or best tag;
skipped candidates and tune runs are logged only while the server is reachable.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from flexbench import (
    artifacts,
    env,
    measure,
    mods,
    pipeline,
    report,
    repro,
    schema,
    sweep,
    tracking,
)
from flexbench.config import KERNEL_OPTION_TYPES, BenchConfig, with_options
from flexbench.record import RunRecord
from flexbench.spec import SweepSpec
from flexbench.tracking_settings import TrackingSettings

DEFAULT_GRID: dict[str, list] = {
    "BLOCK_M": [32, 64, 128],
    "BLOCK_N": [32, 64, 128],
    "num_warps": [4, 8],
    "num_stages": [1, 2, 3],
}
GRID_EXAMPLE = '{"BLOCK_M": [64, 128], "BLOCK_N": [64], "num_warps": [4, 8]}'
DEFAULT = schema.DEFAULT_CANDIDATE
MAX_AUTOTUNE = "max-autotune"
# Skip rules (`skip_reasons`), for flex's Triton forward kernel:
MIN_BLOCK = 16  # tl.dot's smallest tile; BLOCK_M/BLOCK_N must be powers of two >= this
MASK_BLOCK = 128  # block size of the BlockMasks measure builds (create_block_mask's default):
# flex refuses kernel blocks that do not divide it ("Q and KV block size must be divisible")
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}


# --- the grid and its skip rules -------------------------------------------------------------


def parse_grid(grid: str | dict | None) -> dict[str, list]:
    """`--grid` JSON (an object of lists; a lone value counts as a list of one), or the
    default grid when empty; ValueError naming the problem and an example."""
    if not grid:
        return {k: list(v) for k, v in DEFAULT_GRID.items()}
    if isinstance(grid, str):
        try:
            grid = json.loads(grid)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--grid is not JSON ({exc}); e.g. {GRID_EXAMPLE}") from None
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"--grid must be a non-empty JSON object of lists, e.g. {GRID_EXAMPLE}")
    out = {}
    for key, values in grid.items():
        values = values if isinstance(values, list) else [values]
        if not values or not all(isinstance(v, KERNEL_OPTION_TYPES) for v in values):
            raise ValueError(
                f"--grid[{key}] must be a non-empty list of numbers, bools or strings, "
                f"e.g. {GRID_EXAMPLE}"
            )
        out[key] = list(dict.fromkeys(values))
    return out


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, in the grid's key order."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*grid.values())]


def label(options: dict) -> str:
    """A candidate's name: `BLOCK_M=64 BLOCK_N=64 num_warps=4 num_stages=3`."""
    return " ".join(
        f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in options.items()
    )


def padded(length: int) -> int:
    """A sequence length rounded up to a power of two, at least MIN_BLOCK."""
    return max(MIN_BLOCK, 1 << (length - 1).bit_length())


def _power_of_two(block: object) -> bool:
    ok = isinstance(block, int) and not isinstance(block, bool)
    return ok and block >= MIN_BLOCK and block & (block - 1) == 0


def _smem_bytes(c: BenchConfig, fwd: dict) -> int | None:
    """Shared memory of the forward kernel, estimated: a Q tile plus num_stages K and V tiles
    (itemsize · head_dim · (BLOCK_M + 2 · BLOCK_N · num_stages)); None unless all are set."""
    m, n, stages = fwd.get("BLOCK_M"), fwd.get("BLOCK_N"), fwd.get("num_stages")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (m, n, stages)):
        return None
    return ITEMSIZE[c.dtype] * c.head_dim * (m + 2 * n * stages)


def skip_reasons(
    c: BenchConfig, options: dict, has_mask: bool, smem_limit: int | None = None
) -> list[str]:
    """Why a grid point cannot work for config `c` (empty: measure it). The rules, simple on
    purpose, read forward options (plain or `fwd_` names; `bwd_` ones are not checked):

    1. BLOCK_M / BLOCK_N must be powers of two >= 16 (Triton tiles);
    2. BLOCK_M <= q_len and BLOCK_N <= kv_len, each rounded up (`padded`): a bigger block
       only computes padding;
    3. with a mask (a BlockMask of MASK_BLOCK blocks), BLOCK_M and BLOCK_N must divide it;
    4. on a GPU, the estimated shared memory (`_smem_bytes`) must fit its per-block limit.

    A candidate that passes them may still fail to compile; it is then a FAILED run.
    """
    fwd = {k.removeprefix("fwd_"): v for k, v in options.items() if not k.startswith("bwd_")}
    reasons = []
    for name, length, what in (("BLOCK_M", c.q_len, "q_len"), ("BLOCK_N", c.kv_len, "kv_len")):
        block = fwd.get(name)
        if block is None:
            continue
        if not _power_of_two(block):
            reasons.append(f"{name} {block} is not a power of two >= {MIN_BLOCK}")
            continue
        if block > padded(length):
            reasons.append(f"{name} {block} > {what} {length} rounded up to {padded(length)}")
        if has_mask and MASK_BLOCK % block:
            reasons.append(f"{name} {block} does not divide the BlockMask block size {MASK_BLOCK}")
    smem = _smem_bytes(c, fwd)
    if smem_limit and smem and smem > smem_limit:
        reasons.append(
            f"head_dim {c.head_dim} needs ~{smem // 1024} KiB shared memory at these blocks "
            f"and stages, the GPU has {smem_limit // 1024} KiB"
        )
    return reasons


def smem_limit(device: str) -> int | None:
    """Shared memory per block (opt-in maximum) of the current GPU; None on CPU."""
    if device != "cuda":
        return None
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return getattr(props, "shared_memory_per_block_optin", None)


def has_mask(c: BenchConfig) -> bool:
    """Whether the config's mod has a mask_mod (flex then gets a BlockMask)."""
    built = mods.resolve(c.score_mod).build(mods.Dims(c.heads, c.q_len, c.kv_len, "cpu"))
    return built.mask_mod is not None


# --- candidates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One way to run a config: its name, its config, and why it is skipped (None: measure)."""

    label: str
    config: BenchConfig
    skipped: str | None = None


@dataclass(frozen=True)
class Plan:
    """One config to tune: its base config (no kernel options, no max-autotune), candidates."""

    base: BenchConfig
    candidates: tuple[Candidate, ...]

    @property
    def measured(self) -> list[Candidate]:
        return [c for c in self.candidates if c.skipped is None]

    @property
    def skipped(self) -> list[Candidate]:
        return [c for c in self.candidates if c.skipped is not None]


def plan(
    config: BenchConfig,
    grid: dict[str, list],
    autotune: bool = True,
    smem: int | None = None,
) -> Plan:
    """default, max-autotune (if `autotune`), then every grid point, skipped ones with why."""
    base = with_options(config, kernel_options="", max_autotune=False)
    out = [Candidate(DEFAULT, base)]
    if autotune:
        out.append(Candidate(MAX_AUTOTUNE, with_options(base, max_autotune=True)))
    mask = has_mask(base)
    for options in grid_points(grid):
        why = "; ".join(skip_reasons(base, options, mask, smem)) or None
        out.append(Candidate(label(options), with_options(base, kernel_options=options), why))
    return Plan(base, tuple(out))


# --- one tune sweep --------------------------------------------------------------------------


@dataclass
class TuneOutcome:
    """What a tune did: candidate records (measured, skipped), default vs best per config."""

    sweep_id: str
    records: list[RunRecord] = field(default_factory=list)
    skipped: list[RunRecord] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)
    offline: str | None = None
    run_id: str = ""
    journal: str = ""
    wall_s: float = 0.0
    interrupted: str = ""  # SIGINT / SIGTERM when the tune was stopped

    @property
    def failed(self) -> int:
        return sum(not r.ok for r in self.records)

    @property
    def unsolved(self) -> bool:
        """A config has no passing candidate (a failed candidate alone is a finding)."""
        return any(r["best_us"] is None for r in self.results)

    @property
    def exit_code(self) -> int:
        """128 + the signal when stopped, 1 when tracking went offline or a config has no
        passing candidate, else 0."""
        if self.interrupted:
            return 130 if self.interrupted == "SIGINT" else 143
        return 1 if self.offline or self.unsolved else 0

    def table(self) -> str:
        return report.tune_table(self.results)


def candidate_row(record: RunRecord) -> dict:
    """A candidate as a report row, with its tags."""
    return record.to_row()


def tune_metrics(result: dict) -> dict[str, float]:
    """The tune run's metrics from its `report.default_vs_best` result."""
    keys = [k for k in result if k.startswith(("default_", "best_")) and k.endswith("_us")]
    keys += ["best_gain", "best_speedup"]
    out = {k: result[k] for k in keys if isinstance(result.get(k), float)}
    out.pop("default_us", None)
    out.pop("best_us", None)
    for n in ("measured", "skipped", "failed"):
        out[f"candidates_{n}"] = float(result[n])
    return out


class Session:
    """Logs one tune sweep: per config a tune run, its candidates, then the best."""

    def __init__(self, tracker: tracking.Tracker, sweep_entry: dict, tags: dict, out: TuneOutcome):
        self.tracker, self.sweep, self.tags, self.out = tracker, sweep_entry, tags, out
        self.tune_run: str | None = None
        self.open = False  # a config's tune run begun and not yet ended
        self.entries: list[RunRecord] = []
        self.last_ms = sweep_entry["start_ms"]

    def _entry(
        self, p: Plan, cand: Candidate, record: RunRecord, start_ms: int, end_ms: int
    ) -> RunRecord:
        record = record.with_run(run_name=f"{p.base.run_name()} [{cand.label}]")
        tags = {
            **self.tags,
            schema.TUNE_KEY_TAG: p.base.config_key(),
            schema.TUNE_CONFIG_TAG: p.base.run_name(),
            schema.CANDIDATE_TAG: cand.label,
        }
        if cand.skipped:
            tags[schema.SKIPPED_TAG] = cand.skipped
        else:
            tags[schema.REPRO_TAG] = repro.command(cand.config, self.sweep["experiment"])
        return tracking.result_entry(record, self.sweep, tags, start_ms, end_ms)

    def begin(self, p: Plan) -> None:
        """The config's tune run, and its skipped candidates (logged, not journalled)."""
        self.entries, self.open = [], True
        run = RunRecord(
            config_key=p.base.config_key(),
            run_name=f"tune {p.base.run_name()}",
            params=p.base.params(),
            tags={**self.tags, schema.TUNE_KEY_TAG: p.base.config_key()},
            kind="tune",
            sweep_id=self.out.sweep_id,
            part_id=self.sweep["part_id"],
            start_ms=self.last_ms,  # when this config's first candidate started
        )
        t = self.tracker
        self.tune_run = t.step(tracking.start_nested_run, t.client, t.exp_id, t.run_id, run)
        for cand in p.skipped:
            config = cand.config
            record = RunRecord(config.config_key(), "", config.params(), status="KILLED")
            entry = self._entry(p, cand, record, self.last_ms, self.last_ms)
            entry = entry.with_run(kind="skipped")
            if self.tune_run:
                t.step(tracking.log_child, t.client, t.exp_id, self.tune_run, entry)
            self.out.skipped.append(entry)
            self.entries.append(entry)

    def log(self, p: Plan, cand: Candidate, result: measure.Result) -> None:
        """One measured candidate: journalled, then logged under the tune run."""
        end = sweep.now_ms()
        record = self._entry(p, cand, RunRecord.from_result(result), self.last_ms, end)
        self.last_ms = end
        record = record.with_run(run_id=self.tracker.log(record, self.tune_run) or "")
        self.out.records.append(record)
        self.entries.append(record)

    def stop(self) -> None:
        """Stopped mid-config: its tune run ends KILLED (its candidates so far are logged)."""
        if self.open and self.tune_run:
            t = self.tracker
            t.step(tracking.end_run, t.client, self.tune_run, {}, {}, "KILLED", sweep.now_ms())

    def end(self, p: Plan) -> None:
        """Default vs best: the best tag, and the tune run's metrics."""
        self.open = False
        rows = [candidate_row(e) for e in self.entries]
        (result,) = report.default_vs_best(rows)
        self.out.results.append(result)
        t = self.tracker
        if result["best_run_id"]:
            t.step(tracking.set_tags, t.client, result["best_run_id"], {schema.BEST_TAG: "true"})
        if not self.tune_run:
            return
        tags = {schema.BEST_CANDIDATE_TAG: result["best"] or ""}
        tags[schema.BEST_RUN_ID_TAG] = result["best_run_id"]
        if result["best_us"] is None:
            tags[schema.ERROR_TAG] = "no candidate passed"
        status = "FINISHED" if result["best_us"] is not None else "FAILED"
        end = sweep.now_ms()
        t.step(tracking.end_run, t.client, self.tune_run, tune_metrics(result), tags, status, end)


def _plans_in_order(plans: Sequence[Plan]) -> Iterator[tuple[Plan, Candidate, bool, bool]]:
    """Each measured candidate with its plan, and whether it is the plan's first / last."""
    for p in plans:
        todo = p.measured
        for i, cand in enumerate(todo):
            yield p, cand, i == 0, i == len(todo) - 1


def tune_sweep(
    plans: Sequence[Plan],
    track: TrackingSettings | None = None,
    *,
    sweep_params: dict[str, str] | None = None,
    progress: bool = True,
    warn: Callable[[str], None] = print,
) -> TuneOutcome:
    """Measure every plan's candidates (one `pipeline.measure_configs`, so compiled callables
    are shared), log them as described in the module docstring, tag each config's best."""
    start = time.perf_counter()
    track = track or TrackingSettings()
    if track.resume:
        raise ValueError("tune measures every candidate again: it has no resume")
    sweep_id = track.sweep_id or sweep.new_sweep_id()
    run_name = track.run_name or f"tune {sweep_id}"
    sweep.check_tracking(track, run_name)
    device = plans[0].base.device if plans else "cpu"
    tracker, tags = sweep.connect(track, device, warn)
    out = TuneOutcome(sweep_id, journal=str(tracker.journal.path))
    tags_ = {**tags, schema.COMMAND_TAG: "tune"}
    entry = tracking.sweep_entry(out.sweep_id, track.experiment, sweep_params, tags_, run_name)
    tracker.start(entry)
    session = Session(tracker, entry, tags, out)
    order = _plans_in_order(plans)

    def on_result(result: measure.Result) -> None:
        p, cand, first, last = next(order)
        if first:
            session.begin(p)
        session.log(p, cand, result)
        if last:
            session.end(p)
        _warn_offline(tracker, out, warn)

    configs = [cand.config for p in plans for cand in p.measured]
    with pipeline.stoppable() as stopped:
        pipeline.measure_configs(configs, on_result, progress=progress)
    out.interrupted = stopped[0] if stopped else ""
    if out.interrupted:
        session.stop()
    status = "KILLED" if out.interrupted else None
    tracker.finish(lambda: artifacts.for_sweep(out.records), failed=out.unsolved, status=status)
    if not tracker.offline and tracker.run_id:
        tracker.step(tracker.client.log_text, tracker.run_id, tune_markdown(out), "tune.md")
    _warn_offline(tracker, out, warn)
    out.run_id, out.wall_s = tracker.run_id, time.perf_counter() - start
    return out


def tune_markdown(out: TuneOutcome) -> str:
    return f"**flexbench tune {out.sweep_id}**: default vs best per config\n\n{out.table()}\n"


def _warn_offline(tracker: tracking.Tracker, out: TuneOutcome, warn: Callable) -> None:
    sweep.warn_offline(tracker, out, warn, "tuning goes on, measured candidates are kept in")


def run(
    spec: SweepSpec | None = None,
    tracking: TrackingSettings | None = None,
    grid: str | dict | None = None,
    autotune: bool = True,
    *,
    quiet: bool = False,
    warn: Callable[[str], None] | None = None,
) -> TuneOutcome:
    """`flexbench tune`: expand `spec` as `run` does (its kernel_options and max_autotune are
    what tune varies), plan each config's candidates over `grid` (ValueError on bad input),
    check the device (RuntimeError), then measure and log as `tracking` says."""
    env.check_switches()
    spec = (spec or SweepSpec()).resolved()
    measure.check_runtime(spec.device, bool(spec.setting("calculate_bwd")))
    grid_ = parse_grid(grid)
    configs, args = spec.expand()
    smem = smem_limit(spec.device)
    plans = [plan(c, grid_, autotune, smem) for c in configs]
    params = sweep.sweep_params(
        command="tune",
        **args,
        grid=json.dumps(grid_, separators=(",", ":")),
        autotune_candidate=autotune,
        candidates=sum(len(p.candidates) for p in plans),
    )
    return tune_sweep(
        plans,
        tracking,
        sweep_params=params,
        progress=not quiet,
        warn=warn or sweep.warn_stderr,
    )


def closing_line(out: TuneOutcome) -> str:
    """One line: configs, candidates measured / failed / skipped, where the runs are."""
    line = (
        f"tune {out.sweep_id}: {len(out.results)} configs, {len(out.records)} candidates "
        f"measured ({out.failed} failed), {len(out.skipped)} skipped, {out.wall_s:.1f} s"
    )
    if out.interrupted:
        line += f"; stopped by {out.interrupted}"
    if out.offline:
        sync = f"flexbench sync --journal {out.journal}"
        return line + f"; NOT all logged ({out.offline}): run `{sync}`"
    return line + f"; tune sweep run {out.run_id}" + (" KILLED" if out.interrupted else "")
