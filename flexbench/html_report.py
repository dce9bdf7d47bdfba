"""One self-contained HTML page for a sweep: what a person opens in the MLflow artifact view.

From report rows (params, metrics, status, error, environment tags): a heatmap of fwd and bwd
speedups (mods x shapes, a diverging colour scale around 1.0), TFLOP/s against the GPU's
datasheet peak where it is known (roofline-style), a history sparkline per config where
earlier sweeps measured it, the environment, and the failed configs with their errors.
Plots are embedded (PNG as data URIs, sparklines as inline SVG): no server, no other files.

Pure rendering: it reads nothing and imports nothing of flexbench's tracking side, so the
sweep (tracking) and `flexbench report` (history) both call it.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence

KINDS = ("fwd", "bwd")
ENV_KEYS = ("gpu", "driver", "cuda", "torch", "triton", "python", "flexbench", "git_sha", "host")
# GPU name (as torch reports it) -> (dense 16-bit tensor-core TFLOP/s, memory TB/s), from the
# vendors' datasheets; first match wins. Peaks are shown only for float16/bfloat16 configs.
PEAKS = (
    ("H200", (989.0, 4.8)),
    ("H100 NVL", (835.0, 3.9)),
    ("H100 PCIe", (756.0, 2.0)),
    ("H100", (989.0, 3.35)),
    ("A100-SXM4-80GB", (312.0, 2.039)),
    ("A100", (312.0, 1.555)),
    ("L40S", (362.0, 0.864)),
    ("B200", (2250.0, 8.0)),
)
PEAK_DTYPES = ("float16", "bfloat16")
MAX_ANNOTATED = 400  # cells in a heatmap panel beyond which values are not printed in cells
MAX_LABELS = 80  # heatmap columns beyond which their labels are unreadable
FIGURE_MAX_IN = 40.0
SPARK_W, SPARK_H = 120, 24
STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3}td.num{text-align:right}.failed{color:#b00}
img{max-width:100%}code{background:#f6f6f6;padding:1px 4px}
"""


# --- figures ---------------------------------------------------------------------------------


def passed(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "FINISHED" and "fwd_speedup" in r]


def column_label(row: dict, dtypes: int) -> str:
    """Shape `B,H,S,D`, plus kv heads/length where they differ, plus dtype if several."""
    label = str(row.get("shape", ""))
    if str(row.get("kv_heads", "")) != str(row.get("heads", "")):
        label += f" kvh{row.get('kv_heads')}"
    if str(row.get("kv_len", "")) != str(row.get("q_len", "")):
        label += f" kv{row.get('kv_len')}"
    return label + (f" {row.get('dtype')}" if dtypes > 1 else "")


def grid(rows: Sequence[dict], kind: str) -> tuple[list[str], list[str], list[list[float]]]:
    """Mods (rows), shape columns, and speedups (nan: not measured; -inf marks a failure)."""
    dtypes = len({r.get("dtype") for r in rows})
    mods = list(dict.fromkeys(str(r.get("score_mod", "")) for r in rows))
    cols = list(dict.fromkeys(column_label(r, dtypes) for r in rows))
    values = [[math.nan] * len(cols) for _ in mods]
    for r in rows:
        i, j = mods.index(str(r.get("score_mod", ""))), cols.index(column_label(r, dtypes))
        if r.get("status") != "FINISHED":
            values[i][j] = -math.inf
        elif f"{kind}_speedup" in r:
            values[i][j] = float(r[f"{kind}_speedup"])
    return mods, cols, values


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap_figure(rows: Sequence[dict]):
    """fwd (and bwd) speedup per mod x shape on a log2 scale centred on 1.0 (blue: flex
    faster, red: slower; grey x: failed); None when nothing passed."""
    if not passed(rows):
        return None
    plt = _pyplot()
    import numpy as np

    kinds = [k for k in KINDS if any(f"{k}_speedup" in r for r in passed(rows))]
    mods, cols, _ = grid(rows, "fwd")
    width = min(FIGURE_MAX_IN, max(6.0, 2.5 + 0.55 * len(cols)))
    height = len(kinds) * (1.2 + 0.4 * len(mods)) + (1.5 if len(cols) <= MAX_LABELS else 0.5)
    fig, axes = plt.subplots(len(kinds), 1, figsize=(width, height), squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        _, _, values = grid(rows, kind)
        logs = np.log2(np.where(np.array(values) > 0, values, np.nan))
        bound = max(float(np.nanmax(np.abs(logs))) if np.isfinite(logs).any() else 0, 0.35)
        cmap = plt.get_cmap("RdBu").with_extremes(bad="#e4e4e4")  # grey: failed or not run
        image = ax.imshow(logs, cmap=cmap, vmin=-bound, vmax=bound, aspect="auto")
        _label_axes(ax, kind, mods, cols, values)
        bar = fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
        ticks = [bound * f for f in (-1, -0.5, 0, 0.5, 1)]
        bar.set_ticks(ticks, labels=[f"{2**t:.2f}x" for t in ticks])
    fig.tight_layout()
    return fig


def _label_axes(ax, kind: str, mods: list[str], cols: list[str], values) -> None:
    ax.set_title(f"{kind} speedup (SDPA time / flex time)", fontsize=10)
    ax.set_yticks(range(len(mods)), labels=mods, fontsize=8)
    if len(cols) <= MAX_LABELS:
        ax.set_xticks(range(len(cols)), labels=cols, rotation=60, ha="right", fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{len(cols)} shapes (B,H,S,D; names in summary.md)")
    if len(mods) * len(cols) > MAX_ANNOTATED:
        return
    for i, line in enumerate(values):
        for j, v in enumerate(line):
            if v == -math.inf:
                ax.text(j, i, "✗", ha="center", va="center", color="dimgray", fontsize=9)
            elif not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)


def peak(gpu: str, dtype: str) -> tuple[float, float] | None:
    """(TFLOP/s, TB/s) of the GPU's datasheet for 16-bit dtypes, None where not known."""
    if dtype not in PEAK_DTYPES:
        return None
    return next((p for name, p in PEAKS if name in gpu), None)


def roofline_figure(rows: Sequence[dict]):
    """fwd TFLOP/s against arithmetic intensity (FLOP per byte moved) for flex and its
    baseline, with the GPU's compute and bandwidth roofs where known; None without data."""
    good = [r for r in passed(rows) if r.get("fwd_compiled_tbps") and r.get("fwd_eager_tbps")]
    if not good:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for side, marker in (("compiled", "o"), ("eager", "x")):
        xs = [float(r[f"fwd_{side}_tflops"]) / float(r[f"fwd_{side}_tbps"]) for r in good]
        ys = [float(r[f"fwd_{side}_tflops"]) for r in good]
        name = "flex (compiled)" if side == "compiled" else "SDPA baseline"
        ax.scatter(xs, ys, marker=marker, label=name)
    roof = peak(str(good[0].get("gpu", "")), str(good[0].get("dtype", "")))
    if roof:
        xs = sorted(float(r["fwd_compiled_tflops"]) / float(r["fwd_compiled_tbps"]) for r in good)
        knee = roof[0] / roof[1]
        grid_x = [min(xs[0], knee) / 2, knee, max(xs[-1], knee) * 2]
        ax.plot(
            grid_x,
            [min(roof[0], roof[1] * x) for x in grid_x],
            "k--",
            linewidth=1,
            label=f"roof: {roof[0]:g} TFLOP/s, {roof[1]:g} TB/s",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FLOP per byte (forward)")
    ax.set_ylabel("TFLOP/s (forward)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def png_bytes(figure) -> bytes:
    """The figure as PNG, closed afterwards."""
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=100)
    _pyplot().close(figure)
    return buf.getvalue()


def png_uri(png: bytes) -> str:
    """PNG bytes as a data: URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode()


def heatmap_png(rows: Sequence[dict]) -> bytes | None:
    """The speedup heatmap as PNG, or None without passing configs."""
    figure = heatmap_figure(rows)
    return None if figure is None else png_bytes(figure)


def sparkline_svg(values: Sequence[float]) -> str:
    """A polyline of the values, oldest left, higher = slower; the newest point marked."""
    if len(values) < 2:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    pts = [
        (2 + i * (SPARK_W - 4) / (len(values) - 1), SPARK_H - 2 - (v - lo) / span * (SPARK_H - 4))
        for i, v in enumerate(values)
    ]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
    x, y = pts[-1]
    return (
        f'<svg class="spark" width="{SPARK_W}" height="{SPARK_H}" role="img">'
        f"<title>{len(values)} sweeps, {lo:.2f}-{hi:.2f} µs</title>"
        f'<polyline fill="none" stroke="#36c" stroke-width="1.5" points="{line}"/>'
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="#c33"/></svg>'
    )


# --- the page --------------------------------------------------------------------------------


def _cell(value: object) -> str:
    if isinstance(value, float):
        text = f"{value:.3f}" if abs(value) >= 1 or value == 0 else f"{value:.3g}"
        return f'<td class="num">{text}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _table(headers: Sequence[str], body: Sequence[Sequence[object]], raw: int = -1) -> str:
    """An HTML table; column `raw` holds trusted markup (a sparkline), the rest is escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    trs = [
        "<tr>" + "".join(f"<td>{v}</td>" if i == raw else _cell(v) for i, v in enumerate(line))
        for line in body
    ]
    return f"<table><tr>{head}</tr>" + "</tr>".join(trs) + ("</tr>" if trs else "") + "</table>"


def environment(rows: Sequence[dict]) -> str:
    """The environment tags, each with every value seen."""
    body = []
    for key in ENV_KEYS:
        values = sorted({str(r[key]) for r in rows if r.get(key) not in (None, "")})
        if values:
            body.append([key, ", ".join(values)])
    return _table(["", "value"], body) if body else "<p>not recorded</p>"


def config_table(rows: Sequence[dict], trends: Mapping[str, Sequence[float]]) -> str:
    """Per passing config: speedups, flex TFLOP/s, % of the GPU's peak, history."""
    body = []
    for r in passed(rows):
        roof = peak(str(r.get("gpu", "")), str(r.get("dtype", "")))
        flops = r.get("fwd_compiled_tflops")
        share = f"{float(flops) / roof[0]:.1%}" if roof and flops else ""
        trend = trends.get(str(r.get("run_name", "")), ())
        body.append(
            [
                str(r.get("run_name", "")),
                float(r["fwd_speedup"]),
                float(r["bwd_speedup"]) if "bwd_speedup" in r else "",
                float(r["fwd_compiled_us"]) if "fwd_compiled_us" in r else "",
                float(flops) if flops is not None else "",
                share,
                sparkline_svg(trend),
            ]
        )
    headers = [
        "config",
        "fwd speedup",
        "bwd speedup",
        "fwd flex µs",
        "fwd flex TFLOP/s",
        "of peak",
        "fwd flex µs over sweeps",
    ]
    return _table(headers, body, raw=len(headers) - 1)


def failures(rows: Sequence[dict]) -> str:
    bad = [
        [r.get("run_name", ""), r.get("error", "")] for r in rows if r.get("status") != "FINISHED"
    ]
    return _table(["config", "error"], bad) if bad else "<p>none</p>"


def _figure(title: str, png: bytes | None, alt: str) -> str:
    if png is None:
        return ""
    return f'<h2>{title}</h2><img id="{alt}" alt="{alt}" src="{png_uri(png)}">'


def render(
    rows: Sequence[dict],
    title: str = "flexbench sweep",
    trends: Mapping[str, Sequence[float]] | None = None,
    heatmap: bytes | None = None,
) -> str:
    """The whole page (one string, every plot embedded); `heatmap`: the heatmap's PNG when
    the caller has drawn it already (heatmap_png), else drawn here."""
    roofline = roofline_figure(rows)
    roofline_png = None if roofline is None else png_bytes(roofline)
    good = passed(rows)
    head = f"{len(rows)} configs, {len(rows) - len(good)} failed"
    for kind in KINDS:
        values = [float(r[f"{kind}_speedup"]) for r in good if f"{kind}_speedup" in r]
        if values:
            geo = math.exp(sum(math.log(v) for v in values) / len(values))
            head += f"; {kind} speedup geomean {geo:.3f} (min {min(values):.3f})"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><p>{head}</p>",
        _figure("Speedup of compiled flex over SDPA", heatmap or heatmap_png(rows), "heatmap"),
        _figure("Forward throughput (roofline)", roofline_png, "roofline"),
        "<h2>Configs</h2>",
        config_table(rows, trends or {}),
        "<h2>Failed configs</h2>",
        failures(rows),
        "<h2>Environment</h2>",
        environment(rows),
        "</body></html>\n",
    ]
    return "\n".join(p for p in parts if p)
