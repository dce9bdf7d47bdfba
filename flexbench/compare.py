"""`flexbench compare`: two sets of config runs matched by identity, regressions flagged.

Reads both sides from the tracking server (`query.read`) and never re-measures; the pairing
and judging (`pair`) are pure functions of rows, the renderers a table of formats.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tabulate import tabulate

from flexbench import query, report, schema
from flexbench.report import (
    KINDS,
    baseline_family,
    baseline_names,
    baseline_word,
    flagged,
    match_key,
    primary_name,
    side_header,
    to_json,
)

DEFAULT_THRESHOLD = 0.05
REGRESSIONS = ("regression", "now fails")
NOT_COMPARABLE = "not comparable"


def spread(row: dict, timing: str) -> float:
    """The measured p20–p80 spread of one timing, µs (0 when not logged)."""
    lo, hi = row.get(f"{timing}_p20"), row.get(f"{timing}_p80")
    return float(hi) - float(lo) if lo is not None and hi is not None else 0.0


def verdict(
    base: float, contender: float, base_spread: float, contender_spread: float, threshold: float
) -> str:
    """`regression` (slower) or `improvement` (faster) when the change exceeds both the
    threshold (a fraction of base) and the p20–p80 spread of each run; else ``."""
    delta = contender - base
    if abs(delta) <= threshold * base or abs(delta) <= max(base_spread, contender_spread):
        return ""
    return "regression" if delta > 0 else "improvement"


@dataclass
class Change:
    """One timing of one config in both runs."""

    timing: str
    base_us: float
    contender_us: float
    base_spread_us: float
    contender_spread_us: float
    verdict: str

    @property
    def ratio(self) -> float:
        """contender / base: above 1 is slower."""
        return self.contender_us / self.base_us if self.base_us else math.nan


@dataclass
class Match:
    """One config found on both sides."""

    base: dict
    contender: dict
    changes: list[Change] = field(default_factory=list)
    ignore_clocks: bool = False

    @property
    def name(self) -> str:
        return str(self.base.get("run_name", ""))

    @property
    def status(self) -> str:
        """regression, improvement, unchanged, now fails, now passes or fails in both."""
        ok = (self.base.get("status") == "FINISHED", self.contender.get("status") == "FINISHED")
        if ok != (True, True):
            return {(True, False): "now fails", (False, True): "now passes"}.get(
                ok, "fails in both"
            )
        if self.incomparable():
            return NOT_COMPARABLE
        verdicts = {c.verdict for c in self.changes}
        return next((v for v in ("regression", "improvement") if v in verdicts), "unchanged")

    def incomparable(self) -> str:
        """Why the two timings cannot be judged (regimes differ, a side ran throttled or
        unconverged), or '' (always '' with ignore_clocks)."""
        if self.ignore_clocks:
            return ""
        regimes = (str(self.base.get("regime", "")), str(self.contender.get("regime", "")))
        if regimes[0] != regimes[1]:
            return f"regime {regimes[0] or '?'} vs {regimes[1] or '?'}"
        for side, row in (("base", self.base), ("contender", self.contender)):
            if f := flagged(row):
                return f"{side}: {', '.join(f)}"
        return ""

    def detail(self) -> str:
        """The status with what changed, e.g. `regression: fwd_compiled_us +20.0%`."""
        if self.status == "now fails":
            return f"now fails: {self.contender.get('error', '')}"
        if self.status == NOT_COMPARABLE:
            return f"{NOT_COMPARABLE}: {self.incomparable()} (--ignore-clocks to judge anyway)"
        word = baseline_family(str(self.base.get("baseline", "")))
        flagged = [
            f"{side_header(c.timing, word)} {c.ratio - 1:+.1%}" for c in self.changes if c.verdict
        ]
        return f"{self.status}: {', '.join(flagged)}" if flagged else self.status


def timings(base: dict, contender: dict) -> list[str]:
    """The timings to compare: flex's; the seed's eager ones when both ran the same first
    baseline the same way (`baseline` param); and every named baseline both ran, matched by
    name (`fwd_<name>_us`), but for a first baseline that the eager ones already cover."""
    same_first = str(base.get("baseline", "")) == str(contender.get("baseline", ""))
    out = [t for t in schema.TIMINGS if same_first or "_eager_" not in t]
    shared = [n for n in baseline_names([base]) if n in baseline_names([contender])]
    covered = primary_name(base) if same_first else ""
    out += [f"{kind}_{n}_us" for n in shared if n != covered for kind in KINDS]
    return out


def changes(base: dict, contender: dict, threshold: float) -> list[Change]:
    """Every timing both runs logged, judged against the threshold and spreads."""
    out = []
    for t in timings(base, contender):
        if t in base and t in contender:
            b, c = float(base[t]), float(contender[t])
            sb, sc = spread(base, t), spread(contender, t)
            out.append(Change(t, b, c, sb, sc, verdict(b, c, sb, sc, threshold)))
    return out


def latest_by_config(rows: Sequence[dict]) -> dict[tuple[str, ...], dict]:
    """One row per config identity: the latest run (rows are in the order they ran)."""
    return {match_key(r): r for r in rows}


@dataclass
class Comparison:
    """Two sets of config runs matched by identity."""

    base_label: str
    contender_label: str
    threshold: float
    matches: list[Match]
    only_base: list[dict]
    only_contender: list[dict]

    @property
    def regressions(self) -> list[Match]:
        return [m for m in self.matches if m.status in REGRESSIONS]

    @property
    def exit_code(self) -> int:
        """1 when any config regressed (or none matched: nothing was compared), else 0."""
        return 1 if self.regressions or not self.matches else 0

    def headline(self) -> str:
        improved = sum(m.status == "improvement" for m in self.matches)
        incomparable = sum(m.status == NOT_COMPARABLE for m in self.matches)
        return (
            f"{len(self.matches)} configs matched, {len(self.regressions)} regressed, "
            f"{improved} improved, {incomparable} not comparable (regime, throttled or "
            f"unconverged); {len(self.only_base)} only in base, "
            f"{len(self.only_contender)} only in contender (threshold {self.threshold:.0%} "
            "and the p20-p80 spread of both runs)"
        )


def pair(
    base_rows: Sequence[dict],
    contender_rows: Sequence[dict],
    threshold: float = DEFAULT_THRESHOLD,
    labels: tuple[str, str] = ("base", "contender"),
    ignore_clocks: bool = False,
) -> Comparison:
    """Match configs by identity (the latest run of each per side) and judge every timing;
    a pair measured in different regimes, or throttled or unconverged, is not comparable
    unless `ignore_clocks`."""
    base, contender = latest_by_config(base_rows), latest_by_config(contender_rows)
    matches = [
        Match(b, contender[k], changes(b, contender[k], threshold), ignore_clocks)
        for k, b in base.items()
        if k in contender
    ]
    return Comparison(
        *labels,
        threshold,
        matches,
        [r for k, r in base.items() if k not in contender],
        [r for k, r in contender.items() if k not in base],
    )


def sides(
    base: str | None,
    contender: str | None,
    base_where: Sequence[str] = (),
    contender_where: Sequence[str] = (),
    where: Sequence[str] = (),
) -> tuple[query.Selection, query.Selection]:
    """The two selections of `compare`: each a sweep (run id, latest, all) or, without one,
    all sweeps narrowed by its own --*-where; `where` narrows both. ValueError if unset."""
    out = []
    for name, sweep, own in (("base", base, base_where), ("contender", contender, contender_where)):
        if not sweep and not own:
            raise ValueError(
                f"no {name}: give BASE and CONTENDER sweep run ids, or --base-where and "
                "--contender-where (e.g. torch=2.10.0 vs torch=2.11.0)"
            )
        out.append(query.Selection(sweep or "all", None, (*where, *own)))
    return out[0], out[1]


def compare(
    base: query.Selection,
    contender: query.Selection,
    tracking_uri: str | None = None,
    experiment: str = "flexbench",
    threshold: float = DEFAULT_THRESHOLD,
    ignore_clocks: bool = False,
) -> Comparison:
    """`flexbench compare`: read both selections from MLflow and pair them.

    ValueError for bad input; query.NotFound when a side has no runs; TrackingError on server
    failure.
    """
    if threshold < 0:
        raise ValueError(f"--threshold must be >= 0, got {threshold:.0%}")
    base_rows, base_label = query.read(base, tracking_uri, experiment)
    contender_rows, contender_label = query.read(contender, tracking_uri, experiment)
    labels = (base_label, contender_label)
    return pair(base_rows, contender_rows, threshold, labels, ignore_clocks)


def _timings_present(c: Comparison) -> list[str]:
    """Timings compared in any match, in the order first compared."""
    return list(dict.fromkeys(ch.timing for m in c.matches for ch in m.changes))


def _ratio_table(c: Comparison, fmt: str) -> str:
    timings = _timings_present(c)
    body = []
    for m in c.matches:
        ratios = {ch.timing: ch.ratio for ch in m.changes}
        body.append([m.name, *(ratios.get(t, "") for t in timings), m.detail()])
    word = baseline_word([m.base for m in c.matches])
    headers = ["config", *(f"{side_header(t, word)} ratio" for t in timings), "status"]
    return tabulate(body, headers=headers, tablefmt=fmt, floatfmt=".3f")


def _unmatched_table(rows: Sequence[dict], fmt: str) -> str:
    """Unmatched configs: run name (mod, shape, dtype) plus what the name does not show."""
    extra = [k for k in ("device", "timer", "dynamic", "max_autotune") if any(k in r for r in rows)]
    extra += sorted({k for r in rows for k in r if k.startswith("ko_")})
    body = [
        [r.get("run_name", ""), *(r.get(k, "") for k in extra), r.get("status", "")] for r in rows
    ]
    return tabulate(body, headers=["config", *extra, "status"], tablefmt=fmt)


def render_compare(c: Comparison, fmt: str = "table") -> str:
    """The comparison in a format of `FORMATS` (ValueError for another): a table of per-config
    ratios (contender/base, above 1 = slower) with unmatched configs listed, as `markdown` for
    a pull request, or as `json`/`csv`."""
    return report.renderer(FORMATS, fmt)(c)


def _text(c: Comparison, bold: str = "") -> str:
    tablefmt = "github"
    parts = [
        f"{bold}flexbench compare{bold}: base {c.base_label} vs contender {c.contender_label}",
        f"{c.headline()}; ratios are contender/base times (above 1 = slower)",
        "",
        _ratio_table(c, tablefmt),
    ]
    for title, rows in (("Only in base", c.only_base), ("Only in contender", c.only_contender)):
        if rows:
            parts += [
                "",
                f"{bold}{title} ({len(rows)}){bold}",
                "",
                _unmatched_table(rows, tablefmt),
            ]
    return "\n".join(parts) + "\n"


def _compare_data(c: Comparison) -> dict:
    def config(r: dict) -> dict:
        return {
            "run_name": r.get("run_name", ""),
            "run_id": r.get("run_id", ""),
            **{k: r.get(k, "") for k in schema.identity_params()},
        }

    return {
        "base": c.base_label,
        "contender": c.contender_label,
        "threshold": c.threshold,
        "regressions": len(c.regressions),
        "matched": [
            {
                **config(m.base),
                "contender_run_id": m.contender.get("run_id", ""),
                "status": m.status,
                "timings": {ch.timing: {**vars(ch), "ratio": ch.ratio} for ch in m.changes},
            }
            for m in c.matches
        ],
        "only_base": [config(r) for r in c.only_base],
        "only_contender": [config(r) for r in c.only_contender],
    }


def _compare_csv(c: Comparison) -> str:
    """One line per (config, timing); unmatched configs with their side and no timings."""
    keys = [
        "config",
        "status",
        "timing",
        "base_us",
        "contender_us",
        "ratio",
        "base_spread_us",
        "contender_spread_us",
        "verdict",
    ]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for m in c.matches:
        for ch in m.changes or [None]:
            timing = {**vars(ch), "ratio": ch.ratio} if ch else {}
            writer.writerow({"config": m.name, "status": m.status, **timing})
    for side, rows in (("only in base", c.only_base), ("only in contender", c.only_contender)):
        writer.writerows({"config": r.get("run_name", ""), "status": side} for r in rows)
    return buf.getvalue()


FORMATS: dict[str, Callable[[Comparison], str]] = {
    "table": _text,
    "csv": _compare_csv,
    "json": lambda c: to_json(_compare_data(c)),
    "markdown": lambda c: _text(c, "**"),
}
