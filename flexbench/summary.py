"""`flexbench summary`: one sweep's (or a selection's) tables, read back from MLflow.

Reads config runs through `query` and never re-measures; renders them through a table of
formats (`FORMATS`: name -> renderer), so a new format is one entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flexbench import query, report


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


FORMATS: dict[str, Callable[[Summary], str]] = {
    "table": lambda s: f"{s.source}: {len(s.rows)} configs\n\n{report.seed_tables(s.rows)}",
    "csv": lambda s: report.to_csv(s.rows),
    "json": lambda s: report.to_json({"rows": s.rows, "aggregates": report.aggregates(s.rows)}),
    "markdown": lambda s: report.summary_markdown(s.rows, f"flexbench summary of {s.source}"),
}


def render_summary(s: Summary, fmt: str = "table") -> str:
    """The summary in a format of `FORMATS` (ValueError for another): the seed's tables
    (`table`), `markdown`, `csv` or `json` ({"rows": [...], "aggregates": {...}})."""
    return report.renderer(FORMATS, fmt)(s)
