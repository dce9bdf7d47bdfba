"""Searching an experiment's runs: every page of a filter, and quoting values into filters.

Shared by `tracking` (resume, sync), `query` (reading runs back) and `leftovers` (runs a
failed `mlflow run` left RUNNING), so none of them imports another for it.
"""

from __future__ import annotations

from collections.abc import Iterator

PAGE = 1000  # runs per search page


def search_all(client, experiment_ids: list[str], filter_string: str = "") -> Iterator:
    """Every run matching the filter, page by page."""
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=PAGE, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def quote(value: str) -> str:
    """A value as a quoted string of an MLflow search filter."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
