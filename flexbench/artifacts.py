"""A sweep run's finished artifacts, built from its records for `tracking` to log.

`tracking` logs what it is handed and imports no report code: the sweep (and `sync`, from the
journal's records) builds the aggregates, summary.md, results.csv, heatmap.png and report.html
here, from the records' rows.
"""

from __future__ import annotations

from collections.abc import Sequence

from flexbench import html_report, report, tracking
from flexbench.record import RunRecord

TITLE = "flexbench sweep"


def for_sweep(
    records: Sequence[RunRecord], trends: dict[str, list[float]] | None = None
) -> tracking.SweepArtifacts:
    """Aggregate metrics, the summary (markdown) and the artifact files of a sweep (part);
    `trends` gives report.html its sparklines (per config run name, oldest first)."""
    rows = [r.to_row() for r in records]
    markdown = report.summary_markdown(rows)
    files: dict[str, str | bytes] = {"summary.md": markdown, "results.csv": report.to_csv(rows)}
    png = html_report.heatmap_png(rows)  # drawn once: the file and report.html's image
    if png is not None:
        files["heatmap.png"] = png
    title = f"{TITLE} {records[0].sweep_id}" if records else TITLE
    files["report.html"] = html_report.render(rows, title, trends, png)
    return tracking.SweepArtifacts(report.sweep_metrics(rows), markdown, files)


def sync(journal: tracking.Journal, uri: str, retry_failed: bool = False) -> tracking.SyncReport:
    """`tracking.sync` with the sweep parts' artifacts built here: what `flexbench sync` does."""
    return tracking.sync(journal, uri, retry_failed, build=for_sweep)
