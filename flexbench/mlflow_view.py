"""The MLflow UI's first view of a flexbench experiment: the columns that matter, preset.

MLflow 3.17's runs table shows no metric or param column until the user picks them (out of
~60 for a sweep). Its "share view" feature reads a view from an experiment tag
`mlflow.sharedViewState.<key>` (JSON of the page's UI state) when the page is opened with
`?viewStateShareKey=<key>`: flexbench tags every experiment it logs to with one such view and
prints that link. The plain runs page keeps the user's own (browser-local) column choice.
"""

from __future__ import annotations

import json

from flexbench.schema import VIEW_TAG_PREFIX

VIEW_KEY = "flexbench"
VIEW_TAG = f"{VIEW_TAG_PREFIX}{VIEW_KEY}"
METRIC_COLUMNS = (
    "fwd_speedup",  # config runs
    "fwd_speedup_geomean",  # sweep runs
    "fwd_compiled_us",
    "fwd_eager_us",
    "max_abs_err",
    "bwd_speedup",
)
PARAM_COLUMNS = ("shape", "score_mod", "dtype", "baseline")


def column(kind: str, name: str) -> str:
    """The runs table's column id, e.g. metrics.`fwd_speedup`."""
    return f"{kind}.`{name}`"


def view_state() -> str:
    """The shared view's JSON: the measurements and identity columns (not Source/Models/
    Dataset, empty for flexbench runs)."""
    columns = [column("metrics", m) for m in METRIC_COLUMNS]
    columns += [column("params", p) for p in PARAM_COLUMNS]
    return json.dumps({"selectedColumns": columns}, separators=(",", ":"))


def runs_page(base_url: str, experiment_id: str) -> str:
    """The experiment's runs table opened on flexbench's view."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"
