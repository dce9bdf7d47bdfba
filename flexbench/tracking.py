"""MLflow side: sweep (parent) run, config (child) runs, journal, resume, sync.

Knows nothing of torch: it logs plain records (`Result.record()` plus bookkeeping). Every
record reaches the local journal before MLflow; a tracking failure turns the `Tracker` offline
(one warning) and `sync` later uploads what is missing, exactly once per tracking server.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from flexbench import html_report, leftovers, mlflow_view, patience, report

SWEEP_ID_TAG = "flexbench.sweep_id"
CONFIG_KEY_TAG = "flexbench.config_key"
RECORD_ID_TAG = "flexbench.record_id"
PART_TAG = "flexbench.part_id"  # one per process: shards of a sweep share sweep_id, not part_id
KIND_TAG = "flexbench.kind"
ERROR_TAG = "flexbench.error"
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
RESUME_MATCH = ("torch", "triton", "gpu")
DEFAULT_JOURNAL = Path(".flexbench") / "journal.jsonl"
MLFLOW_NAME = re.compile(r"[a-z]+-[a-z]+-\d{1,3}")  # MLflow's random run names: learned-slug-384
NOTE_MAX_CHARS = 7900  # MLflow rejects tag values over 8000 characters
SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
PAGE = 1000
BACKGROUND = "flexbench-tracking"  # name prefix of the thread that logs child runs


class TrackingError(Exception):
    """The tracking server could not be used; the message is one line, secrets redacted."""


# --- secrets ---------------------------------------------------------------------------------


def redact(text: str) -> str:
    """Remove URL credentials and the values of secret environment variables from text."""
    text = re.sub(r"(\w+://)[^/\s]*@", r"\1***@", text)
    for name in SECRET_ENV:
        secret = os.environ.get(name)
        if secret:
            text = text.replace(secret, "***")
    return text


def resolve_uri(uri: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db)."""
    import mlflow

    return uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


def describe_failure(
    exc: BaseException, uri: str, timeout_s: float = patience.DEFAULT_TIMEOUT_S
) -> str:
    """One line naming what went wrong with the tracking server and how to fix it."""
    text = redact(" ".join(str(exc).split()))
    where = redact(uri)
    if patience.is_busy(exc):
        return (
            f"tracking server at {where} did not answer within {timeout_s:g} s (busy): "
            "raise --tracking-timeout"
        )
    if re.search(r"\b401\b|unauthori[sz]ed|not authenticated", text, re.I):
        return (
            f"authentication failed at {where}: check MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD"
        )
    if re.search(r"\b403\b|permission", text, re.I):
        return f"permission denied at {where}: ask the server admin for EDIT on the experiment"
    if re.search(r"connect|refused|max retries|timed? ?out|resolve", text, re.I):
        return f"tracking server unreachable at {where}: start it or fix --tracking-uri"
    return f"tracking failed at {where}: {text[:200]}"


def fast_http(timeout_s: float = patience.DEFAULT_TIMEOUT_S):
    """MLflow HTTP settings of a tracking step (see `patience`)."""
    return patience.patient_http(timeout_s)


# --- journal ---------------------------------------------------------------------------------


def journal_path(path: str | Path | None = None) -> Path:
    """--journal, else FLEXBENCH_JOURNAL, else ./.flexbench/journal.jsonl."""
    return Path(path or os.environ.get("FLEXBENCH_JOURNAL") or DEFAULT_JOURNAL)


class Journal:
    """Append-only JSONL: `sweep` and `result` entries, and `synced` marks per server."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = journal_path(path)

    def append(self, entry: dict) -> None:
        """Write one entry and force it to disk before returning.

        An exclusive lock keeps whole lines when shards or GPU workers share one journal.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def entries(self) -> list[dict]:
        """Every complete entry (a torn last line from a crash is skipped)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def mark_synced(self, record_id: str, target: str, run_id: str) -> None:
        self.append({"type": "synced", "record_id": record_id, "target": target, "run_id": run_id})

    def mark_finished(self, part_id: str, target: str, run_id: str) -> None:
        """The sweep run of `part_id` got its aggregates and artifacts on `target`."""
        self.append({"type": "finished", "part_id": part_id, "target": target, "run_id": run_id})


def target_id(uri: str) -> str:
    """The identity of a tracking server for synced marks (credentials removed)."""
    return redact(uri)


# --- MLflow ----------------------------------------------------------------------------------


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(client, name: str) -> str:
    """Get or create the experiment (safe when several processes race to create it)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags=experiment_tags())
        except MlflowException:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(
            f"experiment '{name}' is deleted: restore it in the MLflow UI or pass --experiment"
        )
    tag_experiment_kind(client, exp)
    return exp.experiment_id


def experiment_tags() -> dict[str, str]:
    """Open the experiment on its runs table in MLflow 3's UI (not the GenAI overview), and
    offer flexbench's view of that table (`mlflow_view`)."""
    return {**EXPERIMENT_KIND, mlflow_view.VIEW_TAG: mlflow_view.view_state()}


def tag_experiment_kind(client, exp) -> None:
    """`experiment_tags` on an experiment that lacks them (one call each, once)."""
    for key, value in experiment_tags().items():
        if exp.tags.get(key) is None:
            client.set_experiment_tag(exp.experiment_id, key, value)


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
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def batch(
    metrics: dict[str, float], params: dict[str, str], tags: dict[str, str], timestamp_ms: int
) -> tuple[list, list, list]:
    from mlflow.entities import Metric, Param, RunTag

    return (
        [Metric(k, float(v), timestamp_ms, 0) for k, v in metrics.items()],
        [Param(k, str(v)) for k, v in params.items()],
        [RunTag(k, str(v)) for k, v in tags.items()],
    )


def log_child(client, exp_id: str, parent_id: str, entry: dict) -> str:
    """One config's run: create, one log_batch, terminate. Returns its run id.

    Its flexbench.kind is the entry's `kind` (default `config`; `tune` skips are `skipped`)."""
    tags = {
        **entry["tags"],
        PARENT_TAG: parent_id,
        SWEEP_ID_TAG: entry["sweep_id"],
        PART_TAG: entry["part_id"],
        CONFIG_KEY_TAG: entry["config_key"],
        RECORD_ID_TAG: entry["record_id"],
        KIND_TAG: entry.get("kind", "config"),
    }
    if entry.get("error"):
        tags[ERROR_TAG] = redact(entry["error"])
    run = client.create_run(
        exp_id, start_time=entry["start_ms"], tags=tags, run_name=entry["run_name"]
    )
    complete_child(client, run.info.run_id, entry)
    return run.info.run_id


def log_child_once(client, exp_id: str, parent_id: str, entry: dict) -> str:
    """`log_child` that is safe to repeat: a run with the entry's record id (an earlier try
    the server did not answer in time) is completed, not logged twice."""
    run = find_run(client, exp_id, RECORD_ID_TAG, entry["record_id"])
    if run is None:
        return log_child(client, exp_id, parent_id, entry)
    if run.info.status == "RUNNING":
        complete_child(client, run.info.run_id, entry)
    return run.info.run_id


def complete_child(client, run_id: str, entry: dict) -> None:
    """Params and metrics in one log_batch, then the final status (safe to repeat)."""
    metrics, params, _ = batch(entry["metrics"], entry["params"], {}, entry["end_ms"])
    client.log_batch(run_id, metrics=metrics, params=params)
    client.set_terminated(run_id, entry["status"], end_time=entry["end_ms"])


def start_nested_run(client, exp_id: str, parent_id: str, run: dict) -> str:
    """A RUNNING run under `parent_id` (`run`: run_name, tags, params, start_ms), e.g. one
    config's tune run under the tune sweep run; `end_run` finishes it. Returns its run id."""
    tags = {**run["tags"], PARENT_TAG: parent_id}
    created = client.create_run(
        exp_id, start_time=run["start_ms"], tags=tags, run_name=run["run_name"]
    )
    _, params, _ = batch({}, run["params"], {}, run["start_ms"])
    client.log_batch(created.info.run_id, params=params)
    return created.info.run_id


def end_run(
    client, run_id: str, metrics: dict[str, float], tags: dict[str, str], status: str, end_ms: int
) -> None:
    """Metrics and tags in one log_batch, then the final status."""
    m, _, t = batch(metrics, {}, tags, end_ms)
    client.log_batch(run_id, metrics=m, tags=t)
    client.set_terminated(run_id, status, end_time=end_ms)


def set_tags(client, run_id: str, tags: dict[str, str]) -> None:
    """Tags on an existing (possibly finished) run, one log_batch."""
    _, _, t = batch({}, {}, tags, 0)
    client.log_batch(run_id, tags=t)


def find_run(client, exp_id: str, tag: str, value: str, more: str = ""):
    """A run in the experiment carrying tag=value (and the `more` clause), or None."""
    runs = client.search_runs([exp_id], f"tags.`{tag}` = {quote(value)}{more}", max_results=1)
    return runs[0] if runs else None


def existing_run(client, exp_id: str, tag: str, value: str, more: str = "") -> str | None:
    """Run id of a run in the experiment carrying tag=value (and the `more` clause), if any."""
    run = find_run(client, exp_id, tag, value, more)
    return run.info.run_id if run else None


def start_sweep_run(client, exp_id: str, sweep: dict) -> str:
    """The sweep run: MLFLOW_RUN_ID's run under `mlflow run` (renamed from MLflow's random
    name to the sweep's, unless the user named it), else a new top-level run.

    Its tags go in with `create_run`, so a later `sync` finds it even if the server died
    right after; a sweep run that already exists (by part id) is reused, never duplicated.
    """
    tags = {
        **sweep["tags"],
        SWEEP_ID_TAG: sweep["sweep_id"],
        PART_TAG: sweep["part_id"],
        KIND_TAG: "sweep",
    }
    run_id = sweep.get("run_id") or existing_run(
        client, exp_id, PART_TAG, sweep["part_id"], f" and tags.`{KIND_TAG}` = 'sweep'"
    )
    if run_id is None:
        run = client.create_run(
            exp_id, start_time=sweep["start_ms"], tags=tags, run_name=sweep["run_name"]
        )
        run_id, existing = run.info.run_id, {}
    else:
        run = client.get_run(run_id)
        existing = run.data.params
        if sweep.get("run_id") and MLFLOW_NAME.fullmatch(run.info.run_name or ""):
            client.update_run(run_id, name=sweep["run_name"])  # `sweep <id>`, as on the CLI
    params = {k: v for k, v in sweep["params"].items() if k not in existing}
    _, p, t = batch({}, params, tags, sweep["start_ms"])
    client.log_batch(run_id, params=p, tags=t)
    return run_id


def description(markdown: str) -> str:
    """The run description: the summary, cut to what MLflow accepts as a tag value."""
    if len(markdown) <= NOTE_MAX_CHARS:
        return markdown
    cut = markdown[: NOTE_MAX_CHARS - 100].rsplit("\n", 1)[0]
    return cut + "\n\n*(table truncated: the full summary is the artifact summary.md)*\n"


def finish_sweep_run(
    client,
    run_id: str,
    results: list[dict],
    terminate: bool,
    end_ms: int | None = None,
    failed: bool | None = None,
    trends: Callable[[], dict[str, list[float]]] | None = None,
    extra: dict[str, float] | None = None,
) -> None:
    """Aggregates (and `extra` metrics, e.g. phase_*_s), summary artifacts (summary.md,
    results.csv, heatmap.png, report.html with `trends()`' sparklines) and description on the
    sweep run; it ends FAILED when `failed` (default: when a config failed)."""
    rows = [report.row_from_record(r) for r in results]
    metrics = {**report.sweep_metrics(rows), **(extra or {})}
    markdown = report.summary_markdown(rows)
    end_ms = end_ms or int(time.time() * 1000)
    m, _, t = batch(metrics, {}, {NOTE_TAG: description(markdown)}, end_ms)
    client.log_batch(run_id, metrics=m, tags=t)
    client.log_text(run_id, markdown, "summary.md")
    client.log_text(run_id, report.to_csv(rows), "results.csv")
    figure = html_report.heatmap_figure(rows)
    if figure is not None:
        client.log_figure(run_id, figure, "heatmap.png")
        report.close(figure)
    with_env = [{**r.get("tags", {}), **row} for r, row in zip(results, rows)]
    title = f"flexbench sweep {results[0]['sweep_id']}" if results else "flexbench sweep"
    client.log_text(run_id, html_report.render(with_env, title, trends and trends()), "report.html")
    if terminate:
        failed = metrics.get("configs_failed", 0) > 0 if failed is None else failed
        client.set_terminated(run_id, "FAILED" if failed else "FINISHED", end_time=end_ms)


def resume_keys(client, exp_id: str, env: dict[str, str]) -> set[str]:
    """Config keys with a FINISHED config run under the same torch, triton and GPU."""
    clauses = ["attributes.status = 'FINISHED'", f"tags.`{KIND_TAG}` = 'config'"]
    clauses += [f"tags.`{k}` = {quote(env[k])}" for k in RESUME_MATCH]
    runs = search_all(client, [exp_id], " and ".join(clauses))
    return {r.data.tags[CONFIG_KEY_TAG] for r in runs if CONFIG_KEY_TAG in r.data.tags}


# --- one sweep -------------------------------------------------------------------------------


@dataclass
class Tracker:
    """Logs one sweep to MLflow; after the first failure it goes offline and only journals.

    `tracking_s` is the time the sweep itself waited on MLflow; `background_s` the time child
    runs took on the background thread (`log_later`), overlapped with measuring.
    """

    uri: str
    experiment: str
    journal: Journal
    offline: str | None = None
    client: object = None
    exp_id: str = ""
    run_id: str = ""
    under_mlflow_run: bool = False
    timeout_s: float = patience.DEFAULT_TIMEOUT_S
    waits: int = 0  # tracking steps tried again because the server was slow
    closed: list[str] = field(default_factory=list)  # runs a failed `mlflow run` left RUNNING
    tracking_s: float = 0.0
    background_s: float = 0.0
    _sweep: dict = field(default_factory=dict)
    _pool: ThreadPoolExecutor | None = None
    _pending: list[Future] = field(default_factory=list)

    def _call(self, fn, *args, again=None) -> object:
        """Run one tracking step; on failure remember why and go offline. A busy server (slow
        answers, 429/5xx) is tried again with backoff for up to `timeout_s`, then with
        `again` (default `fn`): a form of the step that is safe to repeat."""
        if self.offline:
            return None
        start = time.perf_counter()
        try:
            for attempt in itertools.count():
                try:
                    with fast_http(self.timeout_s):
                        return (again or fn)(*args) if attempt else fn(*args)
                except Exception as exc:  # noqa: BLE001 - any failure: keep measuring, journal
                    wait = patience.backoff_s(attempt)
                    spent = time.perf_counter() - start
                    if not patience.is_busy(exc) or spent + wait > self.timeout_s:
                        self.offline = describe_failure(exc, self.uri, self.timeout_s)
                        return None
                    self.waits += 1
                    time.sleep(wait)
        finally:
            spent = time.perf_counter() - start
            if threading.current_thread().name.startswith(BACKGROUND):
                self.background_s += spent
            else:
                self.tracking_s += spent

    def connect(self) -> bool:
        """Reach the server and the experiment (the run's own under `mlflow run`)."""

        def go() -> None:
            self.client = client_for(self.uri)
            parent = os.environ.get("MLFLOW_RUN_ID")
            if parent:
                self.under_mlflow_run = True
                self.run_id = parent
                self.exp_id = self.client.get_run(parent).info.experiment_id
                tag_experiment_kind(self.client, self.client.get_experiment(self.exp_id))
            else:
                self.exp_id = experiment_id(self.client, self.experiment)

        self._call(go)
        if not self.offline:
            self._close_leftovers()
        return not self.offline

    def _close_leftovers(self) -> None:
        """Close the runs a failed `mlflow run` left RUNNING in this experiment (`leftovers`).
        A courtesy to the experiment: its failure never takes this sweep offline."""
        try:
            with fast_http(self.timeout_s):
                self.closed = leftovers.close_leftovers(self.client, self.exp_id, self.run_id)
        except Exception:  # noqa: BLE001 - e.g. no permission on someone's run: leave it
            self.closed = []

    def resume_keys(self, env: dict[str, str]) -> set[str] | None:
        keys = self._call(resume_keys, self.client, self.exp_id, env)
        return None if keys is None else set(keys)

    def start(self, sweep: dict) -> None:
        """Journal the sweep entry, then create (or adopt) the sweep run."""
        sweep = {**sweep, "run_id": self.run_id or None}
        self._sweep = sweep
        self.journal.append({"type": "sweep", **sweep})
        run_id = self._call(start_sweep_run, self.client, self.exp_id, sweep)
        if run_id:
            self.run_id = run_id

    def log(self, entry: dict, parent: str | None = None) -> str | None:
        """Journal one result entry (flushed), then log it as a child run of `parent` (default:
        the sweep run); its run id, or None when offline. `sync` logs it under the sweep run."""
        self.journal.append(entry)
        return self._log_marked(entry, parent)

    def log_later(self, entry: dict) -> None:
        """Journal one result entry (flushed) now; log it as a child of the sweep run on one
        background thread, so MLflow's round trips overlap the next config's measurement."""
        self.journal.append(entry)
        if self.offline:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=BACKGROUND)
        self._pending.append(self._pool.submit(self._log_marked, entry))

    def _log_marked(self, entry: dict, parent: str | None = None) -> str | None:
        """Log a journalled entry as a child run and mark it synced; None when offline."""
        args = (self.client, self.exp_id, parent or self.run_id, entry)
        run_id = self._call(log_child, *args, again=log_child_once)
        if run_id:
            self.journal.mark_synced(entry["record_id"], target_id(self.uri), run_id)
        return run_id

    def drain(self) -> None:
        """Wait for every child run handed to the background thread."""
        start = time.perf_counter()
        for future in self._pending:
            future.result()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self.tracking_s += time.perf_counter() - start

    def call(self, fn, *args) -> object:
        """One more tracking step (e.g. `start_nested_run`) with this tracker's failure handling:
        its result, or None once offline."""
        return self._call(fn, *args)

    def finish(
        self,
        entries: list[dict],
        failed: bool | None = None,
        trends: Callable[[], dict[str, list[float]]] | None = None,
        metrics: dict | None = None,
    ) -> None:
        """Aggregates, `metrics` (journalled for sync) and artifacts on the sweep run (not
        ended under `mlflow run`); FAILED when `failed` (default: when a config failed);
        `trends()`, called once every child run is logged, gives report.html's sparklines."""
        self.drain()
        if metrics:
            part = self._sweep["part_id"]
            self.journal.append({"type": "sweep_metrics", "part_id": part, "metrics": metrics})
        terminate = not self.under_mlflow_run
        args = (self.client, self.run_id, entries, terminate, None, failed, trends, metrics)
        self._call(finish_sweep_run, *args)
        if not self.offline:
            self.journal.mark_finished(self._sweep["part_id"], target_id(self.uri), self.run_id)


def result_entry(
    record: dict, sweep: dict, tags: dict[str, str], start_ms: int, end_ms: int
) -> dict:
    """A journal `result` entry: the record plus what sync needs to log it later; its tags
    are `tags` (environment) and the record's own (kernels, skipped baselines)."""
    return {
        "type": "result",
        "record_id": uuid.uuid4().hex,
        "sweep_id": sweep["sweep_id"],
        "part_id": sweep["part_id"],
        "experiment": sweep["experiment"],
        "start_ms": start_ms,
        "end_ms": end_ms,
        **record,
        "tags": {**tags, **record.get("tags", {})},
    }


# --- sync ------------------------------------------------------------------------------------


@dataclass
class SyncReport:
    uploaded: int = 0
    already: int = 0
    sweeps: int = 0


def pending(entries: Iterable[dict], target: str) -> tuple[dict[str, dict], list[dict], set[str]]:
    """Sweep entries by part id, result entries not yet synced to `target`, and the part ids
    whose sweep run was never finished there."""
    entries = list(entries)
    done = {e["record_id"] for e in entries if e["type"] == "synced" and e["target"] == target}
    finished = {e["part_id"] for e in entries if e["type"] == "finished" and e["target"] == target}
    sweeps = {e["part_id"]: e for e in entries if e["type"] == "sweep"}
    todo = [e for e in entries if e["type"] == "result" and e["record_id"] not in done]
    return sweeps, todo, set(sweeps) - finished


def sync(journal: Journal, uri: str) -> SyncReport:
    """Log every journalled result not yet on this server, exactly once; raises TrackingError.

    Idempotent: a result already on the server (found by its record id) is not logged again,
    a half-logged one (server lost between create and terminate) is completed. Run it after
    the sweep has ended, not while it still writes the journal.
    """
    target = target_id(uri)
    entries = journal.entries()
    sweeps, todo, unfinished = pending(entries, target)
    results = [e for e in entries if e["type"] == "result"]
    extra = {e["part_id"]: e["metrics"] for e in entries if e["type"] == "sweep_metrics"}
    out = SyncReport()
    try:
        with fast_http():
            client = client_for(uri)
            for part_id in _parts(todo, unfinished):
                mine = [e for e in results if e["part_id"] == part_id]
                sweep = sweeps.get(part_id) or _orphan_sweep(mine[0])
                _sync_part(client, journal, target, sweep, todo, mine, out, extra.get(part_id))
    except TrackingError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line for the CLI
        raise TrackingError(describe_failure(exc, uri)) from None
    return out


def _parts(todo: list[dict], unfinished: set[str]) -> list[str]:
    """Part ids to sync, in journal order: those with pending results, then unfinished ones."""
    parts = list(dict.fromkeys(e["part_id"] for e in todo))
    return parts + sorted(unfinished - set(parts))


def _sync_part(
    client,
    journal: Journal,
    target: str,
    sweep: dict,
    todo: list[dict],
    mine: list[dict],
    out: SyncReport,
    extra: dict[str, float] | None = None,
) -> None:
    """One sweep part: its sweep run, its missing children, then its aggregates (+ `extra`)."""
    exp_id = _sync_experiment(client, sweep)
    parent = start_sweep_run(client, exp_id, sweep)
    out.sweeps += 1
    for entry in (e for e in todo if e["part_id"] == sweep["part_id"]):
        run_id = _sync_child(client, exp_id, parent, entry, out)
        journal.mark_synced(entry["record_id"], target, run_id)
    finish_sweep_run(client, parent, mine, terminate=not sweep.get("run_id"), extra=extra)
    journal.mark_finished(sweep["part_id"], target, parent)


def _sync_child(client, exp_id: str, parent: str, entry: dict, out: SyncReport) -> str:
    """Log one result unless the server has it; complete it if it was left half-logged."""
    run = find_run(client, exp_id, RECORD_ID_TAG, entry["record_id"])
    if run is None:
        out.uploaded += 1
        return log_child(client, exp_id, parent, entry)
    if run.info.status == "RUNNING":
        complete_child(client, run.info.run_id, entry)
        out.uploaded += 1
    else:
        out.already += 1
    return run.info.run_id


def _sync_experiment(client, sweep: dict) -> str:
    """The experiment of the `mlflow run` run, if this server has it; else by name."""
    from mlflow.exceptions import MlflowException

    if sweep.get("run_id"):
        try:
            return client.get_run(sweep["run_id"]).info.experiment_id
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            sweep["run_id"] = None  # that run is on another server: a sweep run of our own
    return experiment_id(client, sweep["experiment"])


def _orphan_sweep(entry: dict) -> dict:
    """A sweep entry for results whose sweep entry is missing from the journal."""
    return {
        "sweep_id": entry["sweep_id"],
        "part_id": entry["part_id"],
        "experiment": entry["experiment"],
        "params": {},
        "tags": entry["tags"],
        "run_name": f"sweep {entry['sweep_id']}",
        "start_ms": entry["start_ms"],
        "run_id": None,
    }
