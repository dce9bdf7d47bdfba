"""History across sweeps: per-config series of timings and step-change detection.

`flexbench history` reads every config run of an experiment (through `query`, so a database
store is read with plain SQL), groups them into one *series* per config identity
(`report.match_key`: shape, mod, dtype, compile and timer options; not the environment), one
*point* per sweep in time order, and judges the newest state of each timing:

- only *comparable* points count: the same GPU and measurement regime (`comparable_on` adds
  driver, cuda, torch or triton for a stricter history), and never a point whose series ran
  throttled or unconverged (`*_throttled` / `*_unconverged` = 1). A torch, triton, driver or
  CUDA change does not break a series: it is what a history should catch, so it is noted at
  the point where it happened (and named at the step it caused);
- on the log of the median, the newest *level* (the points since the latest step) is compared
  with the `lookback` comparable points before that step: a z-score against their spread (the
  larger of their standard deviation and their own p20-p80 noise), as conbench's lookback
  z-score, with the step found as asv finds steps (each point after it nearer the new level);
- statuses: regressed, improved, stable, insufficient history, not comparable.

The statistics are pure functions over plain floats (tested against hand-computed numbers).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from tabulate import tabulate

from flexbench import html_report, query, report, schema
from flexbench.schema import SWEEP_ID_TAG

TIMINGS = schema.TIMINGS
ENV_KEYS = ("gpu", "driver", "cuda", "torch", "triton", "regime")  # shown when they change
COMPARABLE_ON = ("gpu", "regime")  # by default, a change of these breaks the series
FLAG_SUFFIXES = ("_throttled", "_unconverged")
Z80 = 0.8416212335729143  # standard normal quantile at 0.8: p20-p80 = +/- Z80 sigma
STATUSES = ("regressed", "improved", "stable", "insufficient history", "not comparable")
SPARK = "▁▂▃▄▅▆▇█"
SPARK_POINTS = 30  # the table's trend column: the last 30 sweeps
# The metrics history reads (SQL LIKE patterns): timings, their spread, the series flags.
METRICS = (
    *TIMINGS,
    *(f"{t}_p20" for t in TIMINGS),
    *(f"{t}_p80" for t in TIMINGS),
    *(f"%{suffix}" for suffix in FLAG_SUFFIXES),
)


# --- statistics (pure) -----------------------------------------------------------------------


def stdev(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1); 0 for fewer than two values. In floats: the
    statistics module's exact fractions are slow over a long history (BENCHMARKS.md,
    "Figures the code cites")."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = math.fsum(values) / n
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def run_sigma(p20: float | None, p80: float | None) -> float:
    """One run's own noise on the log scale: its p20-p80 spread is +/- Z80 sigma of a normal.
    0 when the spread was not logged."""
    if not p20 or not p80 or p20 <= 0 or p80 <= 0:
        return 0.0
    return (math.log(p80) - math.log(p20)) / (2 * Z80)


def baseline_sigma(levels: Sequence[float], noises: Sequence[float]) -> float:
    """Spread of a baseline on the log scale: the larger of the standard deviation of its
    points and the median noise of its runs (a few identical medians do not make a zero
    spread)."""
    noise = statistics.median(noises) if noises else 0.0
    return max(stdev(levels), noise)


def z_score(level: float, baseline: Sequence[float], sigma: float) -> float:
    """(level - mean of baseline) / sigma; +/-inf for a change against a zero spread."""
    delta = level - statistics.fmean(baseline)
    if sigma > 0:
        return delta / sigma
    return 0.0 if delta == 0 else math.copysign(math.inf, delta)


@dataclass(frozen=True)
class Rule:
    """When a change counts: |z| >= z and |relative change| >= min_change, against the
    `lookback` comparable points before the step, of which at least `min_history`."""

    lookback: int = 10
    z: float = 5.0
    min_change: float = 0.05
    min_history: int = 3

    def check(self) -> None:
        """ValueError naming a bad setting."""
        if self.lookback < 1 or self.min_history < 1:
            raise ValueError("--lookback and the minimum history must be at least 1")
        if self.min_history > self.lookback:
            raise ValueError(f"--lookback must be at least {self.min_history}")
        if self.z <= 0 or self.min_change < 0:
            raise ValueError("--z must be > 0 and --min-change >= 0")


@dataclass(frozen=True)
class Step:
    """A judged change: z-score, relative change of the level (above 0 = slower), the index
    of the first point of the new level, and the baseline's mean (log scale)."""

    z: float
    change: float
    since: int
    baseline: float


def candidate(levels: Sequence[float], noises: Sequence[float], k: int, rule: Rule) -> Step:
    """The new level y[k:] (its median) against the up to `lookback` points before k."""
    lo = max(0, k - rule.lookback)
    base = levels[lo:k]
    sigma = baseline_sigma(base, noises[lo:k])
    level = statistics.median(levels[k:])
    z = z_score(level, base, sigma)
    return Step(z, math.exp(level - statistics.fmean(base)) - 1, k, statistics.fmean(base))


def is_step(levels: Sequence[float], step: Step) -> bool:
    """Every point since the step lies on the new level's side, nearer it than the old one."""
    half = abs(math.log1p(step.change)) / 2
    sign = math.copysign(1.0, step.change)
    return all((y - step.baseline) * sign >= half for y in levels[step.since :])


def significant(step: Step, rule: Rule) -> bool:
    return abs(step.z) >= rule.z and abs(step.change) >= rule.min_change


def detect(levels: Sequence[float], noises: Sequence[float], rule: Rule) -> tuple[str, Step | None]:
    """Status of the newest point of a comparable series (log medians, oldest first, with each
    run's log noise) and the step that decided it (None with too little history).

    Tries every start k of the newest level (at most `lookback` points long, at least
    `min_history` points before it) and keeps the significant step with the largest |z|;
    without one, the newest point against the `lookback` before it (conbench's rule)."""
    n = len(levels)
    if n - 1 < rule.min_history:
        return "insufficient history", None
    best = None
    for k in range(n - 1, rule.min_history - 1, -1):
        if n - k > rule.lookback:
            break
        step = candidate(levels, noises, k, rule)
        if significant(step, rule) and is_step(levels, step):
            if best is None or abs(step.z) > abs(best.z):
                best = step
    if best is None:
        return "stable", candidate(levels, noises, n - 1, rule)
    return ("regressed" if best.change > 0 else "improved"), best


def sparkline(values: Sequence[float]) -> str:
    """Unicode blocks scaled between the series' min and max (flat: all lowest)."""
    if not values:
        return ""
    lo, hi = min(values), max(values)
    scale = (len(SPARK) - 1) / (hi - lo) if hi > lo else 0.0
    return "".join(SPARK[round((v - lo) * scale)] for v in values)


# --- points and series -----------------------------------------------------------------------


@dataclass
class Point:
    """One config in one sweep: its timings (median, p20, p80), environment and flags."""

    sweep_id: str
    start_ms: int
    run_id: str
    timings: dict[str, tuple[float, float | None, float | None]]
    env: dict[str, str]
    flagged: list[str] = field(default_factory=list)  # e.g. fwd_compiled_throttled
    env_change: str = ""  # what changed since the previous point, e.g. torch 2.10.0 -> 2.11.0

    @property
    def when(self) -> str:
        return datetime.fromtimestamp(self.start_ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M")


def point_of(row: dict, sweep_id: str) -> Point:
    timings = {
        t: (float(row[t]), _float(row.get(f"{t}_p20")), _float(row.get(f"{t}_p80")))
        for t in TIMINGS
        if _float(row.get(t))
    }
    flagged = [k for k in row if k.endswith(FLAG_SUFFIXES) and _float(row[k]) == 1.0]
    env = {k: str(row[k]) for k in ENV_KEYS if row.get(k) not in (None, "")}
    return Point(
        sweep_id,
        int(row.get("start_time") or 0),
        str(row.get("run_id", "")),
        timings,
        env,
        sorted(flagged),
    )


def _float(value: object) -> float | None:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def env_diff(before: dict[str, str], after: dict[str, str]) -> str:
    """`torch 2.10.0 -> 2.11.0, gpu A -> B`: keys whose value differs ('' when none)."""
    keys = [k for k in ENV_KEYS if before.get(k, "") != after.get(k, "")]
    return ", ".join(f"{k} {before.get(k) or '-'} -> {after.get(k) or '-'}" for k in keys)


@dataclass
class Judgement:
    """One timing of one config: status, the step behind it, the points it was judged on."""

    timing: str
    status: str
    step: Step | None
    comparable: list[Point]
    note: str = ""  # why not comparable, or the environment change at the step

    @property
    def newest_us(self) -> float:
        return self.comparable[-1].timings[self.timing][0] if self.comparable else math.nan

    @property
    def baseline_us(self) -> float:
        return math.exp(self.step.baseline) if self.step else math.nan

    @property
    def since(self) -> Point | None:
        """The first point of the new level, for a regression or improvement."""
        if self.status in ("regressed", "improved") and self.step:
            return self.comparable[self.step.since]
        return None


@dataclass
class Series:
    """One config identity across sweeps: its points (oldest first) and judgements."""

    key: tuple[str, ...]
    label: str
    identity: dict[str, str]
    points: list[Point]
    judgements: list[Judgement] = field(default_factory=list)

    @property
    def status(self) -> str:
        """The worst status of its timings, in STATUSES order."""
        found = {j.status for j in self.judgements}
        return next((s for s in STATUSES if s in found), "insufficient history")

    @property
    def deciding(self) -> Judgement | None:
        """The judgement that gave the status (the largest |z| among equals)."""
        same = [j for j in self.judgements if j.status == self.status]
        return max(same, key=lambda j: abs(j.step.z) if j.step else 0.0) if same else None

    def values(self, timing: str) -> list[float]:
        return [p.timings[timing][0] for p in self.points if timing in p.timings]


def comparable_key(point: Point, keys: Sequence[str]) -> tuple[str, ...]:
    return tuple(point.env.get(k, "") for k in keys)


def judge(points: Sequence[Point], timing: str, rule: Rule, keys: Sequence[str]) -> Judgement:
    """The newest point's status for one timing against the earlier comparable points."""
    measured = [p for p in points if timing in p.timings]
    newest = measured[-1]
    if newest.flagged:
        return Judgement(timing, "not comparable", None, [newest], ", ".join(newest.flagged))
    want = comparable_key(newest, keys)
    same = [p for p in measured if not p.flagged and comparable_key(p, keys) == want]
    if len(same) == 1 and len(measured) > 1:
        note = env_diff(measured[-2].env, newest.env) or "earlier points flagged"
        return Judgement(timing, "not comparable", None, same, note)
    levels = [math.log(p.timings[timing][0]) for p in same]
    noises = [run_sigma(*p.timings[timing][1:]) for p in same]
    status, step = detect(levels, noises, rule)
    out = Judgement(timing, status, step, same)
    since = out.since
    out.note = since.env_change if since else newest.env_change
    return out


def build(
    rows: Sequence[dict],
    rule: Rule = Rule(),
    comparable_on: Sequence[str] = COMPARABLE_ON,
    timings: Sequence[str] = TIMINGS,
) -> list[Series]:
    """Series per config identity from config-run rows (any order), judged by `rule`; points
    are comparable when their environment agrees on the `comparable_on` keys."""
    keys = list(comparable_on)
    groups: dict[tuple[str, ...], dict[str, dict]] = {}
    for row in sorted(rows, key=lambda r: (r.get("start_time") or 0, r.get("run_name", ""))):
        if row.get("status") != "FINISHED" or row.get(schema.TUNE_KEY_TAG):
            continue
        sweep = str(row.get(SWEEP_ID_TAG) or row.get("sweep_run_id") or row.get("run_id"))
        groups.setdefault(report.match_key(row), {})[sweep] = row  # the latest run per sweep
    out = []
    for key, by_sweep in groups.items():
        points = sorted((point_of(r, s) for s, r in by_sweep.items()), key=lambda p: p.start_ms)
        for before, after in zip(points, points[1:]):
            after.env_change = env_diff(before.env, after.env)
        last = list(by_sweep.values())[-1]
        identity = {k: str(last.get(k, "")) for k in schema.identity_params()}
        series = Series(key, str(last.get("run_name", "")), identity, points)
        present = [t for t in timings if t in points[-1].timings]
        series.judgements = [judge(points, t, rule, keys) for t in present]
        out.append(series)
    return sorted(out, key=lambda s: s.label)


def select_sweeps(
    rows: Sequence[dict], since_ms: int | None = None, last: int | None = None
) -> list[dict]:
    """Rows of runs started at or after `since_ms`, of the `last` N sweeps (by start time)."""
    if since_ms is not None:
        rows = [r for r in rows if int(r.get("start_time") or 0) >= since_ms]
    if last:
        starts: dict[str, int] = {}
        for r in rows:
            sweep = str(r.get(SWEEP_ID_TAG, ""))
            starts[sweep] = min(starts.get(sweep, 1 << 62), int(r.get("start_time") or 0))
        keep = set(sorted(starts, key=starts.__getitem__)[-last:])
        rows = [r for r in rows if str(r.get(SWEEP_ID_TAG, "")) in keep]
    return list(rows)


# --- flexbench history -----------------------------------------------------------------------


@dataclass
class History:
    """Every judged series of a selection, with where it came from and the rule."""

    series: list[Series]
    source: str
    rule: Rule
    comparable_on: tuple[str, ...] = COMPARABLE_ON

    @property
    def regressed(self) -> list[Series]:
        return [s for s in self.series if s.status == "regressed"]

    @property
    def exit_code(self) -> int:
        """1 when any config regressed (a CI gate), else 0."""
        return 1 if self.regressed else 0

    def headline(self) -> str:
        counts = {s: sum(x.status == s for x in self.series) for s in STATUSES}
        sweeps = len({p.sweep_id for x in self.series for p in x.points})
        parts = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        return (
            f"{len(self.series)} configs over {sweeps} sweeps: {parts} (newest level vs the "
            f"{self.rule.lookback} comparable points before it; |z| >= {self.rule.z:g} and "
            f"change >= {self.rule.min_change:.0%})"
        )


def history(
    tracking_uri: str | None = None,
    experiment: str = "flexbench",
    where: Sequence[str] = (),
    since: datetime | None = None,
    last: int | None = None,
    rule: Rule = Rule(),
    comparable_on: Sequence[str] = COMPARABLE_ON,
    timings: Sequence[str] = TIMINGS,
) -> History:
    """`flexbench history`: every config's series over the experiment's sweeps (narrowed by
    --where, --since, --last), judged. ValueError for bad input; query.NotFound when nothing
    matches; tracking.TrackingError when the store fails."""
    rule.check()
    if last is not None and last < 1:
        raise ValueError(f"--last must be at least 1, got {last}")
    unknown = [k for k in comparable_on if k not in ENV_KEYS]
    if unknown:
        raise ValueError(f"--comparable-on: unknown key '{unknown[0]}'; use {', '.join(ENV_KEYS)}")
    bad = [t for t in timings if t not in TIMINGS]
    if bad:
        raise ValueError(f"--timing: unknown timing '{bad[0]}'; use {', '.join(TIMINGS)}")
    sel = query.Selection("all", None, tuple(where))
    rows, label = query.read(sel, tracking_uri, experiment, METRICS)
    rows = select_sweeps(rows, epoch_ms(since) if since else None, last)
    if not rows:
        raise query.NotFound(f"no config runs in {label} since {since:%Y-%m-%d}: relax --since")
    if since:
        label += f" since {since:%Y-%m-%d}"
    if last:
        label += f", last {last} sweeps"
    series = build(rows, rule, comparable_on, timings)
    return History(series, label, rule, tuple(comparable_on))


def epoch_ms(when: datetime) -> int:
    """Milliseconds since the epoch; a date without a zone is UTC."""
    return int(when.replace(tzinfo=when.tzinfo or timezone.utc).timestamp() * 1000)


def _us(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.2f}"


def summary_row(s: Series) -> dict:
    """One config's line: newest µs (p20-p80), baseline, change, z, status, since, note."""
    j = s.deciding
    newest = j.comparable[-1] if j and j.comparable else s.points[-1]
    t = j.timing if j else ""
    med, p20, p80 = newest.timings.get(t, (math.nan, None, None))
    spread = f" ({p20:.2f}-{p80:.2f})" if p20 is not None and p80 is not None else ""
    step = j.step if j else None
    return {
        "config": s.label,
        "sweeps": len(s.points),
        "timing": t,
        "newest_us": _us(med) + spread,
        "baseline_us": _us(j.baseline_us) if j else "",
        "change": f"{step.change:+.1%}" if step else "",
        "z": f"{step.z:+.1f}" if step and math.isfinite(step.z) else ("inf" if step else ""),
        "trend": sparkline(s.values(t)[-SPARK_POINTS:]) if t else "",
        "status": s.status,
        "since": f"{j.since.when} ({j.since.sweep_id})" if j and j.since else "",
        "note": j.note if j else "",
    }


def render(h: History, fmt: str = "table") -> str:
    """The history in a format of `FORMATS` (ValueError for another): a table (one line per
    config, a sparkline of the deciding timing), `markdown`, `csv` (one line per config,
    timing and point) or `json`."""
    return report.renderer(FORMATS, fmt)(h)


def _text(h: History, bold: str = "") -> str:
    body = [summary_row(s) for s in h.series]
    table = tabulate(body, headers="keys", tablefmt="github")
    out = f"{bold}flexbench history{bold} of {h.source}\n{h.headline()}\n\n{table}\n"
    changes = env_changes(h.series)
    if changes:
        out += f"\n{bold}Environment changes{bold}\n\n" + "\n".join(f"- {c}" for c in changes)
        out += "\n"
    return out


def env_changes(series: Sequence[Series]) -> list[str]:
    """Each environment change once, at the first sweep that shows it, with how many configs
    it reached: `2026-06-03 20:26 nightly-6: torch 2.10.0 -> 2.11.0 (3 configs)`."""
    seen: dict[str, tuple[Point, int]] = {}
    for s in series:
        for p in s.points:
            if p.env_change:
                first, count = seen.get(p.env_change, (p, 0))
                seen[p.env_change] = (min(first, p, key=lambda x: x.start_ms), count + 1)
    ordered = sorted(seen.items(), key=lambda item: item[1][0].start_ms)
    return [f"{p.when} {p.sweep_id}: {change} ({n} configs)" for change, (p, n) in ordered]


def _point_data(p: Point, timing: str) -> dict:
    med, p20, p80 = p.timings[timing]
    return {
        "sweep_id": p.sweep_id,
        "time": p.when,
        "run_id": p.run_id,
        "median_us": med,
        "p20_us": p20,
        "p80_us": p80,
        **p.env,
        "env_change": p.env_change,
        "flagged": p.flagged,
    }


def _judgement_data(s: Series, j: Judgement) -> dict:
    return {
        "status": j.status,
        "z": j.step.z if j.step else None,
        "change": j.step.change if j.step else None,
        "baseline_us": None if math.isnan(j.baseline_us) else j.baseline_us,
        "since_sweep": j.since.sweep_id if j.since else None,
        "note": j.note,
        "points": [_point_data(p, j.timing) for p in s.points if j.timing in p.timings],
    }


def data(h: History) -> dict:
    """JSON form: the rule, counts and, per config, each timing's judgement and points."""
    return {
        "source": h.source,
        "rule": vars(h.rule),
        "comparable_on": list(h.comparable_on),
        "regressed": len(h.regressed),
        "configs": [
            {
                "config": s.label,
                **s.identity,
                "status": s.status,
                "timings": {j.timing: _judgement_data(s, j) for j in s.judgements},
            }
            for s in h.series
        ],
    }


CSV_KEYS = (
    "config",
    "timing",
    "status",
    "sweep_id",
    "time",
    "median_us",
    "p20_us",
    "p80_us",
    *ENV_KEYS,
    "env_change",
    "run_id",
)


def to_csv(h: History) -> str:
    """One line per (config, timing, point), with the timing's status on every line."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_KEYS, extrasaction="ignore")
    writer.writeheader()
    for s in h.series:
        for j in s.judgements:
            for p in s.points:
                if j.timing in p.timings:
                    row = {"config": s.label, "timing": j.timing, "status": j.status}
                    writer.writerow({**row, **_point_data(p, j.timing)})
    return buf.getvalue()


FORMATS: dict[str, Callable[[History], str]] = {
    "table": _text,
    "csv": to_csv,
    "json": lambda h: report.to_json(data(h)),
    "markdown": lambda h: _text(h, "**"),
}


# --- trends for report.html ------------------------------------------------------------------

TREND_TIMING = "fwd_compiled_us"
TREND_SWEEPS = 30  # sweeps read for report.html's sparklines


def trends(rows: Sequence[dict], timing: str = TREND_TIMING) -> dict[str, list[float]]:
    """Per config run name, `timing` over the sweeps in `rows`, oldest first (a name that
    several identities share keeps the series measured last)."""
    series = sorted(build(rows, timings=(timing,)), key=lambda s: s.points[-1].start_ms)
    return {s.label: s.values(timing) for s in series if s.values(timing)}


def recent_trends(tracking_uri: str | None, experiment_id: str) -> dict[str, list[float]]:
    """`trends` over the experiment's last TREND_SWEEPS sweeps; {} when they cannot be read
    (report.html then has no sparklines: never a reason to fail a sweep)."""
    try:
        return trends(query.read_recent(tracking_uri, experiment_id, TREND_SWEEPS, METRICS))
    except (query.NotFound, query.tracking.TrackingError):
        return {}


def page(
    sel: query.Selection, tracking_uri: str | None = None, experiment: str = "flexbench"
) -> str:
    """`flexbench report --html`: report.html of a selection (summary's), with sparklines of
    the experiment's recent sweeps. ValueError, query.NotFound, TrackingError as `summary`."""
    rows, label = query.read(sel, tracking_uri, experiment)
    with query.reader(tracking_uri) as r:
        exp_id = r.experiment(experiment)
    recent = recent_trends(tracking_uri, exp_id) if exp_id else {}
    return html_report.render(rows, f"flexbench report: {label}", recent)
