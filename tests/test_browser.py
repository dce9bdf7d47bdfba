"""The MLflow UI shows a real sweep: headless Debian Chromium (Playwright) on `mlflow server`.

Opens the experiment's runs table on flexbench's saved view (the link a sweep prints), expands
the sweep run (children sit collapsed under it), and checks that the preset columns are there
without picking any (speedup, shape) and that every child run's readable name and its speedup
are on screen. Leaves a screenshot in the test's temp dir (README's docs/mlflow-runs.png is
one).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from flexbench import mlflow_view, sweep
from flexbench.spec import SweepSpec
from flexbench.tracking_settings import TrackingSettings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UI_TIMEOUT_MS = 120_000  # the first page load compiles the UI's bundle on a busy 2-core machine
EXPERIMENT = "browser"
SPEEDUP_COL = mlflow_view.column("metrics", "fwd_speedup")  # the runs table's column id
SHAPE_COL = mlflow_view.column("params", "shape")

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium")


@pytest.fixture(scope="module")
def ui_sweep(mlflow_server, tmp_path_factory):
    """A real tiny CPU sweep (noop, causal) in its own experiment."""
    spec = SweepSpec([1], [2], [128], [16], ["noop", "causal"], ["float32"], device="cpu")
    configs = spec.configs()
    journal = tmp_path_factory.mktemp("journal") / "journal.jsonl"
    out = sweep.measure_and_track(
        configs,
        TrackingSettings(EXPERIMENT, mlflow_server.uri, str(journal), run_name="ui sweep"),
        progress=False,
    )
    assert out.offline is None and out.failed == 0
    return out


@contextmanager
def ui_page(viewport: dict, shot: Path) -> Iterator:
    """A page of headless Debian Chromium; a screenshot at the end, also when the test failed
    (it shows what the UI showed)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=viewport)
        page.set_default_timeout(30_000)
        try:
            yield page
        finally:
            page.screenshot(path=str(shot))
            browser.close()
    assert shot.stat().st_size > 10_000


def cell(page, run_name: str, col_id: str) -> str:
    """Text of one run's cell: the pinned name and the metric sit in separate ag-grid row
    elements that share a row-index."""
    index = page.locator(".ag-row").filter(has_text=run_name).first.get_attribute("row-index")
    target = page.locator(f'.ag-row[row-index="{index}"] [col-id="{col_id}"]')
    assert target.is_visible()
    return target.inner_text()


def widen_run_names(page) -> None:
    """Auto-size the Run Name column (double-click its resize handle) so names show whole."""
    header = page.get_by_role("columnheader", name="Run Name")
    handle = header.locator(".ag-header-cell-resize")
    if handle.count():
        handle.first.dblclick()


def test_child_runs_and_speedup_visible_in_mlflow_ui(mlflow_server, ui_sweep, tmp_path):
    from mlflow.tracking import MlflowClient

    exp_id = MlflowClient(mlflow_server.uri).get_experiment_by_name(EXPERIMENT).experiment_id
    names = [r.run_name for r in ui_sweep.records]
    # The table prints the full float (JS and Python print the same shortest repr): a prefix.
    speedups = [str(r.metrics["fwd_speedup"])[:6] for r in ui_sweep.records]
    with ui_page({"width": 1920, "height": 900}, tmp_path / "mlflow-runs.png") as page:
        page.goto(mlflow_view.runs_page(mlflow_server.uri, exp_id))
        parent = page.get_by_role("row").filter(has_text="ui sweep")
        parent.wait_for(timeout=UI_TIMEOUT_MS)
        assistant = page.get_by_role("button", name="Close")
        if assistant.count():
            assistant.first.click()
        parent.locator('[data-component-id*="runnamecellrenderer"]').first.click()
        for name in names:
            page.get_by_text(name, exact=True).wait_for()
        for col in (SPEEDUP_COL, SHAPE_COL):  # preset by the view: nothing picked here
            page.locator(f'[role="columnheader"][col-id="{col}"]').wait_for()
        widen_run_names(page)
        for name, speedup in zip(names, speedups):
            assert page.get_by_text(name, exact=True).is_visible()
            assert cell(page, name, SPEEDUP_COL).startswith(speedup)
            assert cell(page, name, SHAPE_COL) == "1,2,128,16"


def test_report_html_opens_from_the_artifact_view(mlflow_server, ui_sweep, tmp_path):
    """The sweep run's report.html, opened in the run's Artifacts tab, shows its heatmap."""
    from mlflow.tracking import MlflowClient

    exp_id = MlflowClient(mlflow_server.uri).get_experiment_by_name(EXPERIMENT).experiment_id
    shot = tmp_path / "mlflow-report-html.png"
    with ui_page({"width": 1600, "height": 1200}, shot) as page:
        page.goto(f"{mlflow_server.uri}/#/experiments/{exp_id}/runs/{ui_sweep.run_id}/artifacts")
        entry = page.get_by_text("report.html", exact=True)
        entry.wait_for(timeout=UI_TIMEOUT_MS)
        entry.click()
        report = page.frame_locator("iframe").first
        heatmap = report.locator("img#heatmap")
        heatmap.wait_for()
        assert heatmap.evaluate("img => img.complete && img.naturalWidth > 300")
        assert report.get_by_text("Speedup of compiled flex over SDPA").is_visible()
        for record in ui_sweep.records:
            assert report.get_by_text(record.run_name, exact=True).count() == 1
