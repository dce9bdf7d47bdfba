"""Tables, aggregates and plots from results (records or MLflow runs): the seed's tables.

A *row* is one config as a flat dict of strings/floats: its params, metrics, `run_name`,
`status` and `error`. Rows come from journal records (`row_from_record`) or from MLflow runs
(`row_from_run`), so the console, the sweep run's artifacts and `flexbench summary` all print
the same tables.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence

from tabulate import tabulate

from flexbench.flops import geomean

KINDS = ("fwd", "bwd")
IDENTITY = ("shape", "kv_heads", "kv_len", "score_mod", "dtype")
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
    "sparsity",
    "max_abs_err",
)


def row_from_record(record: dict) -> dict:
    """A journal record (or result entry) as a row."""
    return {
        **record["params"],
        **record["metrics"],
        "run_name": record["run_name"],
        "status": record["status"],
        "error": record.get("error") or "",
    }


def row_from_run(run) -> dict:
    """An MLflow config run as a row (tags kept for filtering)."""
    data = run.data
    return {
        **data.tags,
        **data.params,
        **data.metrics,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "error": data.tags.get("flexbench.error", ""),
        "run_id": run.info.run_id,
    }


def ok_rows(rows: Sequence[dict]) -> list[dict]:
    """Rows that passed (their speedups count)."""
    return [r for r in rows if r.get("status") == "FINISHED" and "fwd_speedup" in r]


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
    return out


def _columns(rows: Sequence[dict]) -> list[str]:
    present = {k for r in rows for k in r}
    cols = [c for c in TABLE_COLUMNS if c in present]
    if all(r.get("kv_heads") == r.get("heads") for r in rows):
        cols.remove("kv_heads") if "kv_heads" in cols else None
    if all(r.get("kv_len") == r.get("q_len") for r in rows):
        cols.remove("kv_len") if "kv_len" in cols else None
    return cols


def results_table(rows: Sequence[dict], fmt: str = "github") -> str:
    """The seed's per-config table (passing configs)."""
    good = ok_rows(rows)
    cols = _columns(good)
    body = [[_num(r.get(c, "")) for c in cols] for r in good]
    return tabulate(body, headers=cols, tablefmt=fmt, floatfmt=".3f")


def _num(value: object) -> object:
    try:
        return float(value)
    except (TypeError, ValueError):
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
    for kind in KINDS:
        agg = aggregate_rows(rows, kind)
        if agg:
            title = f"{kind.upper()} Speedups"
            parts.append(f"\n{title.center(100, '=')}\n")
            parts.append(tabulate(agg, headers="keys", tablefmt=fmt, floatfmt=".3f"))
    failed = failed_table(rows, fmt)
    if failed:
        parts.append(f"\n{'Failed configs'.center(100, '=')}\n")
        parts.append(failed)
    return "\n".join(parts)


def summary_markdown(rows: Sequence[dict]) -> str:
    """The sweep run's description and summary.md."""
    m = sweep_metrics(rows)
    head = (
        f"**flexbench sweep**: {int(m['configs_total'])} configs, {int(m['configs_failed'])} failed"
    )
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


def speedup_figure(rows: Sequence[dict]):
    """Bar chart of speedup per config (fwd, and bwd where measured); None with no data."""
    good = ok_rows(rows)
    if not good:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.get("run_name", "") for r in good]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(good) + 2), 4.5))
    kinds = [k for k in KINDS if any(f"{k}_speedup" in r for r in good)]
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        values = [float(r.get(f"{kind}_speedup", math.nan)) for r in good]
        ax.bar([x + i * width for x in range(len(good))], values, width, label=kind)
    ax.axhline(1.0, color="gray", linewidth=1, linestyle="--")
    ax.set_xticks([x + width * (len(kinds) - 1) / 2 for x in range(len(good))])
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speedup (SDPA time / flex time)")
    ax.set_title("FlexAttention speedup over SDPA computing the same function")
    ax.legend()
    fig.tight_layout()
    return fig


def close(figure) -> None:
    import matplotlib.pyplot as plt

    plt.close(figure)


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
