"""Tables and aggregates from results (records or MLflow runs): the seed's tables.

A *row* is one config as a flat dict of strings/floats: its params, metrics, `run_name`,
`status` and `error`. Rows come from journal records (`row_from_record`) or from MLflow runs
(`query.row_from_run`), so the console, the sweep run's artifacts and `flexbench summary` all
print the same tables.

`summary` and `compare` read config runs back from the tracking server (`query.read`) and
never re-measure: `summary` prints one sweep's tables, `compare` matches two sets of runs by
config identity and flags regressions.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from tabulate import tabulate

from flexbench import kernels, query  # query imports tracking, which imports this module
from flexbench.flops import geomean

KINDS = ("fwd", "bwd")
IDENTITY = ("shape", "kv_heads", "kv_len", "score_mod", "dtype")
# Shown in the table only when they differ between rows (e.g. `--sweep all` over two stacks).
VARYING = (
    "baseline",
    "device",
    "timer",
    "regime",
    "dynamic",
    "max_autotune",
    "gpu",
    "torch",
    "triton",
    "cuda",
)
TABLE_COLUMNS = (
    "shape",
    "kv_heads",
    "kv_len",
    "score_mod",
    "dtype",
    "fwd_eager_us",
    "fwd_compiled_us",
    "fwd_speedup",
    "fwd_eager_tflops",
    "fwd_compiled_tflops",
    "bwd_eager_us",
    "bwd_compiled_us",
    "bwd_speedup",
    "bwd_eager_tflops",
    "bwd_compiled_tflops",
    "fwd_eager_tbps",
    "fwd_compiled_tbps",
    "sparsity",
    "max_abs_err",
)
INEXACT_TAG = "flexbench.baseline_inexact"  # = measure.INEXACT_TAG (measure imports torch)
SKIPPED_TAG_BASELINE = "flexbench.baseline_skipped"  # = measure.SKIPPED_TAG
KERNELS_TAG = "flexbench.{}_kernels"  # = measure.KERNELS_TAG


def row_from_record(record: dict) -> dict:
    """A journal record (or result entry) as a row, with its flexbench tags (as MLflow's)."""
    tags = record.get("tags", {})
    return {
        **{k: v for k, v in tags.items() if k.startswith("flexbench.")},
        **record["params"],
        **record["metrics"],
        "run_name": record["run_name"],
        "status": record["status"],
        "error": record.get("error") or "",
    }


def ok_rows(rows: Sequence[dict]) -> list[dict]:
    """Rows that passed (their speedups count; one whose baselines were all skipped has
    none)."""
    timed = ("fwd_speedup", "fwd_compiled_us")
    return [r for r in rows if r.get("status") == "FINISHED" and any(k in r for k in timed)]


# --- named baselines -------------------------------------------------------------------------


def baseline_names(rows: Sequence[dict]) -> list[str]:
    """Baselines the rows' `baselines` params name, in order of first appearance."""
    out: dict[str, None] = {}
    for r in rows:
        for name in str(r.get("baselines", "")).split(","):
            if name:
                out.setdefault(name)
    return list(out)


def primary_name(row: dict) -> str:
    """The baseline in the row's seed columns (fwd_eager_us): the named one whose form the
    `baseline` param holds (`sdpa_attn_mask` -> sdpa); '' for a run before named baselines."""
    form = str(row.get("baseline", ""))
    names = [n for n in baseline_names([row]) if form == n or form.startswith(n + "_")]
    return max(names, key=len, default="")


def tag_entries(row: dict, tag: str) -> dict[str, str]:
    """`name: text; name: text` tag values (skipped, inexact) by baseline name."""
    names, out, last = baseline_names([row]), {}, None
    for piece in str(row.get(tag, "")).split("; "):
        name, sep, text = piece.partition(": ")
        if sep and name in names:
            out[name], last = text, name
        elif last is not None:  # a '; ' inside the text
            out[last] += "; " + piece
    return out


def approximate(row: dict, name: str) -> str:
    """`approximate (bf16 mask)` when the baseline was over tolerance in this row, else ''."""
    entry = tag_entries(row, INEXACT_TAG).get(name, "")
    return entry.split("),", 1)[0] + ")" if entry.startswith("approximate (") else ""


def baseline_label(row: dict) -> str:
    """The table's `baseline` cell: how the first baseline computed the mod, its kernel family
    and, when over tolerance, its approximation: `sdpa_attn_mask [flash] approximate (bf16
    mask)`."""
    name = primary_name(row)
    family = kernels.family(str(row.get(KERNELS_TAG.format(name), ""))) if name else ""
    label = " ".join(filter(None, (str(row.get("baseline", "")), f"[{family}]" if family else "")))
    return " ".join(filter(None, (label, approximate(row, name) if name else "")))


def baseline_summary(rows: Sequence[dict]) -> list[dict]:
    """Per named baseline over the passing rows: configs timed and skipped (with the first
    reason), kernel families, approximate configs, fwd/bwd speedup geomeans."""
    good, out = ok_rows(rows), []
    for name in baseline_names(good):
        skips = [tag_entries(r, SKIPPED_TAG_BASELINE).get(name) for r in good]
        reasons = [s for s in skips if s]
        families = {kernels.family(str(r.get(KERNELS_TAG.format(name), ""))) for r in good}
        entry = {
            "baseline": name,
            "timed": sum(f"fwd_{name}_us" in r for r in good),
            "skipped": f"{len(reasons)} ({reasons[0]})" if reasons else "0",
            "kernels": ",".join(sorted(f for f in families if f)),
            "approximate": sum(bool(approximate(r, name)) for r in good),
        }
        for kind in KINDS:
            values = [
                float(r[f"{kind}_speedup_{name}"]) for r in good if f"{kind}_speedup_{name}" in r
            ]
            entry[f"{kind}_speedup_geomean"] = geomean(values) if values else None
        out.append(entry)
    return out


def baselines_table(rows: Sequence[dict], fmt: str = "github") -> str:
    """`baseline_summary` as a table; '' when the rows name one baseline that always ran."""
    summary = baseline_summary(rows)
    if len(summary) < 2 and not any(s["skipped"] != "0" or s["approximate"] for s in summary):
        return ""
    keys = [k for k in summary[0] if any(s[k] is not None for s in summary)]
    body = [[_blank(s[k]) for k in keys] for s in summary]
    return tabulate(body, headers=keys, tablefmt=fmt, floatfmt=".3f")


def speedups(rows: Sequence[dict], kind: str) -> list[float]:
    return [float(r[f"{kind}_speedup"]) for r in ok_rows(rows) if f"{kind}_speedup" in r]


def sweep_metrics(rows: Sequence[dict]) -> dict[str, float]:
    """The sweep run's metrics: speedup mean/geomean/min/max per kind, config counts."""
    out = {
        "configs_total": float(len(rows)),
        "configs_failed": float(sum(r.get("status") != "FINISHED" for r in rows)),
    }
    for kind in KINDS:
        values = speedups(rows, kind)
        if values:
            out[f"{kind}_speedup_mean"] = sum(values) / len(values)
            out[f"{kind}_speedup_geomean"] = geomean(values)
            out[f"{kind}_speedup_min"] = min(values)
            out[f"{kind}_speedup_max"] = max(values)
    for entry in baseline_summary(rows):
        for kind in KINDS:
            if entry[f"{kind}_speedup_geomean"] is not None:
                out[f"{kind}_speedup_{entry['baseline']}_geomean"] = entry[
                    f"{kind}_speedup_geomean"
                ]
    return out


def _columns(rows: Sequence[dict]) -> list[str]:
    """Table columns present in the rows; kv_heads/kv_len only when they differ from heads/
    q_len; options, kernel options and environment only when they differ between rows."""
    present = {k for r in rows for k in r}
    cols = [c for c in TABLE_COLUMNS if c in present]
    names = baseline_names(rows)
    if len(names) > 1:  # every baseline's speedup after the seed's (the first's)
        for kind in reversed(KINDS):
            extra = [f"{kind}_speedup_{n}" for n in names if f"{kind}_speedup_{n}" in present]
            at = cols.index(f"{kind}_speedup") + 1 if f"{kind}_speedup" in cols else len(cols)
            cols[at:at] = extra
    if all(r.get("kv_heads") == r.get("heads") for r in rows):
        cols.remove("kv_heads") if "kv_heads" in cols else None
    if all(r.get("kv_len") == r.get("q_len") for r in rows):
        cols.remove("kv_len") if "kv_len" in cols else None
    options = [*VARYING, *sorted(k for k in present if k.startswith("ko_"))]
    varying = [k for k in options if len({str(r.get(k, "")) for r in rows}) > 1]
    at = cols.index("dtype") + 1 if "dtype" in cols else len(cols)
    return cols[:at] + varying + cols[at:]


def results_table(rows: Sequence[dict], fmt: str = "github") -> str:
    """The seed's per-config table (passing configs), its headers naming the sides; the
    `baseline` column (when it varies, or says more than the param: kernel family, approximate)
    labels each row's first baseline."""
    good = ok_rows(rows)
    labelled = [{**r, "baseline": baseline_label(r)} if "baseline" in r else r for r in good]
    cols = _columns(labelled)
    if "baseline" not in cols and any(
        r.get("baseline") != b.get("baseline") for r, b in zip(labelled, good)
    ):
        at = cols.index("dtype") + 1 if "dtype" in cols else len(cols)
        cols.insert(at, "baseline")
    word = baseline_word(good)
    body = [[_num(r.get(c, "")) for c in cols] for r in labelled]
    headers = [side_header(c, word) for c in cols]
    return tabulate(body, headers=headers, tablefmt=fmt, floatfmt=float_formats(cols))


# The metric names keep the seed's words (the MLflow contract); tables say which side is which.
FLEX_WORD = "flex"
# What follows `<kind>_eager_` in a seed name (`fwd_eager_math_us` is a baseline's own).
SIDE_UNITS = ("us", "us_p20", "us_p80", "tflops", "tbps")
MIXED_BASELINES = "baseline"


def baseline_family(name: str) -> str:
    """`sdpa` for every SDPA form (plain, is_causal, attn_mask); other baselines by name
    (`eager_math`); `baseline` when the row does not say."""
    if not name:
        return MIXED_BASELINES
    return "sdpa" if name.startswith("sdpa") else name


def baseline_word(rows: Sequence[dict]) -> str:
    """The baseline's name shared by all rows (from their `baseline` param), else `baseline`
    (the table then has a `baseline` column)."""
    names = {primary_name(r) or baseline_family(str(r.get("baseline", ""))) for r in rows}
    return names.pop() if len(names) == 1 else MIXED_BASELINES


def side_header(metric: str, baseline: str) -> str:
    """A metric's table header: `fwd_eager_us` -> `fwd_sdpa_us`, `fwd_compiled_us` ->
    `fwd_flex_us`; other names as they are."""
    kind, _, rest = metric.partition("_")
    side, _, unit = rest.partition("_")
    words = {"eager": baseline, "compiled": FLEX_WORD}
    if kind in KINDS and side in words and unit in SIDE_UNITS:
        return f"{kind}_{words[side]}_{unit}"
    return metric


def float_formats(cols: Sequence[str]) -> list[str]:
    """Errors in scientific notation (3.5e-07, not 0.000); everything else to 3 decimals."""
    return [".2e" if c.endswith("_err") else ".3f" for c in cols]


def heading(title: str) -> str:
    """A markdown heading between tables (the terminal prints markdown tables too)."""
    return f"\n### {title}\n"


def _num(value: object) -> object:
    """Numbers stay as they are (int(2.7) would truncate a speedup to 2); strings that hold a
    number (MLflow params) become int or float, so tabulate aligns and formats them."""
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


def aggregate_rows(rows: Sequence[dict], kind: str) -> list[dict]:
    """The seed's Average / Max / Min speedup rows, Max and Min with their config."""
    good = [r for r in ok_rows(rows) if f"{kind}_speedup" in r]
    if not good:
        return []
    values = [float(r[f"{kind}_speedup"]) for r in good]
    hi = good[max(range(len(values)), key=values.__getitem__)]
    lo = good[min(range(len(values)), key=values.__getitem__)]
    blank = dict.fromkeys(IDENTITY, "")
    return [
        {"Type": "Average", "Speedup": sum(values) / len(values), **blank},
        {"Type": "Max", "Speedup": max(values), **{k: hi.get(k, "") for k in IDENTITY}},
        {"Type": "Min", "Speedup": min(values), **{k: lo.get(k, "") for k in IDENTITY}},
    ]


def failed_table(rows: Sequence[dict], fmt: str = "github") -> str:
    bad = [r for r in rows if r.get("status") != "FINISHED"]
    body = [[r.get("run_name", ""), r.get("error", "")] for r in bad]
    return tabulate(body, headers=["config", "error"], tablefmt=fmt) if bad else ""


def seed_tables(rows: Sequence[dict], fmt: str = "github") -> str:
    """Results table, then FWD (and BWD) Average/Max/Min tables, then failures."""
    parts = [results_table(rows, fmt)]
    word = baseline_word(ok_rows(rows))
    for kind in KINDS:
        agg = aggregate_rows(rows, kind)
        if agg:
            parts.append(heading(f"{kind.upper()} Speedups ({word} time / {FLEX_WORD} time)"))
            parts.append(tabulate(agg, headers="keys", tablefmt=fmt, floatfmt=".3f"))
    named = baselines_table(rows, fmt)
    if named:
        parts.append(heading("Baselines"))
        parts.append(named)
    failed = failed_table(rows, fmt)
    if failed:
        parts.append(heading("Failed configs"))
        parts.append(failed)
    conditions = conditions_table(rows, fmt)
    if conditions:
        parts.append(heading("Timing conditions"))
        parts.append(conditions)
    return "\n".join(parts)


# Per timed series (e.g. fwd_eager): 0/1 metrics that make its median less than a clean result.
CONDITION_FLAGS = ("throttled", "unconverged")


def flagged(row: dict) -> list[str]:
    """The row's series that ran throttled or did not converge, e.g. `fwd_eager throttled
    (1695 MHz)` or `bwd_flex unconverged (noise 1.2%)` (the compiled side named flex, as in the
    tables); with named baselines the first one by its name (`fwd_sdpa`), not again as
    `fwd_eager`."""
    out = []
    copy = primary_name(row)  # the seed's `<kind>_eager` series repeats this baseline's
    for key in sorted(row):
        series, _, flag = key.rpartition("_")
        if flag not in CONDITION_FLAGS or not _is_set(row[key]):
            continue
        if copy and series in (f"{kind}_eager" for kind in KINDS):
            continue
        name = series.replace("_compiled", f"_{FLEX_WORD}")  # the side, as the tables name it
        if flag == "throttled":
            mhz = row.get(f"{series}_sm_mhz")
            out.append(f"{name} throttled ({float(mhz):.0f} MHz)" if mhz else key)
        else:
            noise = row.get(f"{series}_noise_pct")
            out.append(f"{name} unconverged (noise {float(noise):.2f}%)" if noise else key)
    return out


def _is_set(value: object) -> bool:
    try:
        return float(value) >= 0.5
    except (TypeError, ValueError):
        return False


def conditions_table(rows: Sequence[dict], fmt: str = "github") -> str:
    """Configs whose timings ran throttled or unconverged: one line each ('' when none)."""
    body = [[r.get("run_name", ""), "; ".join(f)] for r in rows if (f := flagged(r))]
    return tabulate(body, headers=["config", "series"], tablefmt=fmt) if body else ""


def summary_markdown(rows: Sequence[dict], title: str = "flexbench sweep") -> str:
    """The sweep run's description and summary.md (and `summary --format markdown`)."""
    m = sweep_metrics(rows)
    head = f"**{title}**: {int(m['configs_total'])} configs, {int(m['configs_failed'])} failed"
    for kind in KINDS:
        if f"{kind}_speedup_geomean" in m:
            head += f"; {kind} speedup geomean {m[f'{kind}_speedup_geomean']:.3f}"
    return head + "\n\n" + seed_tables(rows, "github") + "\n"


def to_csv(rows: Sequence[dict]) -> str:
    """Every row, every key (union, sorted after the identity columns)."""
    keys = ["run_name", "status", *IDENTITY]
    keys += sorted({k for r in rows for k in r} - set(keys))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def close(figure) -> None:
    import matplotlib.pyplot as plt

    plt.close(figure)


FORMATS = ("table", "csv", "json", "markdown")


# --- flexbench summary -----------------------------------------------------------------------


@dataclass
class Summary:
    """One summary: config rows and where they came from."""

    rows: list[dict]
    source: str


def summary(
    tracking_uri: str | None = None,
    experiment: str = "flexbench",
    sweep: str = "latest",
    where: Sequence[str] = (),
    sweep_id: str | None = None,
) -> Summary:
    """`flexbench summary`: config runs of the latest sweep (or `all`, a sweep run id, or every
    shard of a sweep id), narrowed by --where, read from MLflow alone.

    ValueError for a bad --where; query.NotFound when there is nothing to show;
    tracking.TrackingError when the server fails.
    """
    selection = query.Selection(sweep, sweep_id, tuple(where))
    rows, label = query.read(selection, tracking_uri, experiment)
    return Summary(rows, label)


def aggregates(rows: Sequence[dict]) -> dict:
    """Config counts and, per kind, the speedup average and geomean, and the max and min with
    their config (the seed's Average/Max/Min tables as data)."""
    m = sweep_metrics(rows)
    out: dict = {k: int(m[k]) for k in ("configs_total", "configs_failed")}
    for kind in KINDS:
        agg = aggregate_rows(rows, kind)
        if agg:
            average, hi, lo = agg
            out[kind] = {
                "average": average["Speedup"],
                "geomean": m[f"{kind}_speedup_geomean"],
                "max": {"speedup": hi["Speedup"], **{k: hi[k] for k in IDENTITY}},
                "min": {"speedup": lo["Speedup"], **{k: lo[k] for k in IDENTITY}},
            }
    named = baseline_summary(rows)
    if named:
        out["baselines"] = named
    return out


def to_json(data: object) -> str:
    """JSON with non-finite floats (an infinite error) as null: strict parsers accept it."""

    def clean(x: object) -> object:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(data), indent=2)


def render_summary(s: Summary, fmt: str = "table") -> str:
    """The summary as the seed's tables (`table`), `markdown`, `csv` or `json`
    ({"rows": [...], "aggregates": {...}})."""
    if fmt == "json":
        return to_json({"rows": s.rows, "aggregates": aggregates(s.rows)})
    if fmt == "csv":
        return to_csv(s.rows)
    if fmt == "markdown":
        return summary_markdown(s.rows, f"flexbench summary of {s.source}")
    if fmt == "table":
        return f"{s.source}: {len(s.rows)} configs\n\n{seed_tables(s.rows)}"
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")


# --- flexbench compare -----------------------------------------------------------------------

TIMINGS = ("fwd_eager_us", "fwd_compiled_us", "bwd_eager_us", "bwd_compiled_us")
# A config's identity across sweeps and software stacks: what was measured and how, not on
# which torch/GPU (plus kernel options, ko_*). Not calculate_bwd: fwd compares either way.
MATCH = (
    "shape",
    "kv_heads",
    "kv_len",
    "dtype",
    "score_mod",
    "device",
    "dynamic",
    "max_autotune",
    "timer",
)
DEFAULT_THRESHOLD = 0.05
REGRESSIONS = ("regression", "now fails")
NOT_COMPARABLE = "not comparable"


def match_key(row: dict) -> tuple[str, ...]:
    """Shape, kv heads/length, dtype, mod (and a user mod's source hash, alignment), device,
    compile options, timer and kernel options: equal for the same config measured under any
    torch/GPU (environment is not identity). Runs logged before `align` existed aligned end."""
    options = sorted(f"{k}={row[k]}" for k in row if k.startswith("ko_"))
    mod = (str(row.get("mod_sha", "")), str(row.get("align") or "end"))
    return (*(str(row.get(k, "")) for k in MATCH), *mod, *options)


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
    out = [t for t in TIMINGS if same_first or "_eager_" not in t]
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
    """The comparison as a table of per-config ratios (contender/base, above 1 = slower) with
    unmatched configs listed, as `markdown` for a pull request, or as `json`/`csv`."""
    if fmt == "json":
        return to_json(_compare_data(c))
    if fmt == "csv":
        return _compare_csv(c)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    tablefmt = "github"
    bold = "**" if fmt == "markdown" else ""
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
            **{k: r.get(k, "") for k in MATCH},
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


# --- flexbench tune: default vs best kernel options ------------------------------------------

TUNE_KEY_TAG = "flexbench.tune_key"  # the tuned config's key: its candidates share it
TUNE_CONFIG_TAG = "flexbench.tune_config"  # the tuned config's run name
CANDIDATE_TAG = "flexbench.candidate"  # default, max-autotune, or e.g. BLOCK_M=64 BLOCK_N=64
BEST_TAG = "flexbench.best"  # "true" on the fastest passing candidate of a config
SKIPPED_TAG = "flexbench.skipped"  # why a candidate was not measured (its run is KILLED)
DEFAULT_CANDIDATE = "default"
TUNE_COLUMNS = {  # default_vs_best key -> table header
    "config": "config",
    "baseline_us": "baseline_us",
    "default_us": "default_us",
    "best_us": "best_us",
    "best_gain": "gain",
    "best_speedup": "best_speedup",
    "best": "best",
    "measured": "measured",
    "skipped": "skipped",
    "failed": "failed",
}


def tune_us(row: dict, side: str = "compiled") -> float | None:
    """A tune candidate's objective: fwd µs, plus bwd µs where measured, of compiled flex
    (`side="eager"`: of its baseline); None unless the candidate passed."""
    if row.get("status") != "FINISHED" or f"fwd_{side}_us" not in row:
        return None
    return float(row[f"fwd_{side}_us"]) + float(row.get(f"bwd_{side}_us", 0.0))


def best_row(rows: Sequence[dict]) -> dict | None:
    """The fastest passing candidate (the earlier one on a tie), or None."""
    passed = [r for r in rows if tune_us(r) is not None]
    return min(passed, key=tune_us) if passed else None


def tune_groups(rows: Sequence[dict]) -> list[list[dict]]:
    """Candidate rows grouped per tuned config (sweep id, tune key), in order; rows without
    a tune key (plain `run` configs) are left out."""
    from flexbench.tracking import SWEEP_ID_TAG  # tracking imports report: import late

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r.get(TUNE_KEY_TAG):
            key = (str(r.get(SWEEP_ID_TAG, "")), str(r[TUNE_KEY_TAG]))
            groups.setdefault(key, []).append(r)
    return list(groups.values())


def default_vs_best(rows: Sequence[dict]) -> list[dict]:
    """Per tuned config: the default candidate against the fastest passing one.

    `rows` are candidate rows (from MLflow runs or tune records) carrying the tune tags;
    skipped candidates (status KILLED, flexbench.skipped) are counted, not compared.
    µs are fwd (+ bwd where measured) medians; best_gain = default / best, best_speedup =
    the best candidate's baseline / flex; None where a side did not pass.
    """
    return [_default_vs_best(group) for group in tune_groups(rows)]


def _default_vs_best(group: list[dict]) -> dict:
    measured = [r for r in group if not r.get(SKIPPED_TAG)]
    default = next((r for r in measured if r.get(CANDIDATE_TAG) == DEFAULT_CANDIDATE), {})
    best = best_row(measured) or {}
    d, b, base = tune_us(default), tune_us(best), tune_us(best, "eager")
    out = {
        "config": group[0].get(TUNE_CONFIG_TAG, ""),
        "tune_key": group[0][TUNE_KEY_TAG],
        "baseline_us": base,
        "default_us": d,
        "best_us": b,
        "best_gain": d / b if d and b else None,
        "best_speedup": base / b if base and b else None,
        "best": best.get(CANDIDATE_TAG),
        "best_run_id": best.get("run_id", ""),
        "measured": len(measured),
        "skipped": len(group) - len(measured),
        "failed": sum(r.get("status") != "FINISHED" for r in measured),
    }
    for name, row in (("default", default), ("best", best)):
        for kind in KINDS:
            if tune_us(row) is not None and f"{kind}_compiled_us" in row:
                out[f"{name}_{kind}_compiled_us"] = float(row[f"{kind}_compiled_us"])
    return out


def tune_table(results: Sequence[dict], fmt: str = "github") -> str:
    """`default_vs_best` as a table: config, baseline, default and best µs, gain, best."""
    body = [[_blank(r.get(k)) for k in TUNE_COLUMNS] for r in results]
    return tabulate(body, headers=list(TUNE_COLUMNS.values()), tablefmt=fmt, floatfmt=".3f")


def _blank(value: object) -> object:
    return "" if value is None else value
