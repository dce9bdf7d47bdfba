"""Tables, aggregates and figures from rows: pure (rows in, text out; reads nothing).

A *row* is one config run's `record.RunRecord.to_row()`: its tags, params, metrics,
`run_name`, `status` and `error`. The console, the sweep run's artifacts, `flexbench summary`
(`summary`), `compare` (`compare`) and `history` print the same tables from the same rows.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence

from tabulate import tabulate

from flexbench import kernels, schema
from flexbench.flops import geomean
from flexbench.schema import (
    BASELINE_SKIPPED_TAG,
    CANDIDATE_TAG,
    DEFAULT_CANDIDATE,
    INEXACT_TAG,
    KINDS,
    SKIPPED_TAG,
    SWEEP_ID_TAG,
    TUNE_CONFIG_TAG,
    TUNE_KEY_TAG,
)

IDENTITY = schema.TABLE_IDENTITY
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
    family = kernels.family(str(row.get(schema.kernels_tag(name), ""))) if name else ""
    label = " ".join(filter(None, (str(row.get("baseline", "")), f"[{family}]" if family else "")))
    return " ".join(filter(None, (label, approximate(row, name) if name else "")))


def baseline_summary(rows: Sequence[dict]) -> list[dict]:
    """Per named baseline over the passing rows: configs timed and skipped (with the first
    reason), kernel families, approximate configs, fwd/bwd speedup geomeans."""
    good, out = ok_rows(rows), []
    for name in baseline_names(good):
        skips = [tag_entries(r, BASELINE_SKIPPED_TAG).get(name) for r in good]
        reasons = [s for s in skips if s]
        families = {kernels.family(str(r.get(schema.kernels_tag(name), ""))) for r in good}
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
    options = [*schema.varying_columns(), *sorted(k for k in present if k.startswith("ko_"))]
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
    body = [[r.get(c, "") for c in cols] for r in labelled]
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


def renderer(formats: Mapping[str, Callable], fmt: str) -> Callable:
    """The renderer of `fmt` in a table of formats (name -> renderer); ValueError naming the
    formats for an unknown one."""
    if fmt not in formats:
        raise ValueError(f"format must be one of {', '.join(formats)}, got {fmt!r}")
    return formats[fmt]


def close(figure) -> None:
    import matplotlib.pyplot as plt

    plt.close(figure)


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


# --- a config's identity across sweeps -------------------------------------------------------


def match_key(row: dict) -> tuple[str, ...]:
    """Shape, kv heads/length, dtype, mod (and a user mod's source hash, alignment), device,
    compile options, timer and kernel options: equal for the same config measured under any
    torch/GPU (environment is not identity). Runs logged before `align` existed aligned end."""
    options = sorted(f"{k}={row[k]}" for k in row if k.startswith("ko_"))
    mod = (str(row.get("mod_sha", "")), str(row.get("align") or "end"))
    return (*(str(row.get(k, "")) for k in schema.identity_params()), *mod, *options)


# --- flexbench tune: default vs best kernel options ------------------------------------------

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
