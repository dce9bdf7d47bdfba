"""MLflow side: sweep (parent) run, config (child) runs, journal, resume, sync.

Knows nothing of torch nor of reports: it logs `RunRecord`s and the finished artifacts the
sweep hands it (`SweepArtifacts`). Every record reaches the local journal before MLflow; a
tracking failure turns the `Tracker` offline (one warning) and `sync` later uploads what is
missing, exactly once per tracking server.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import socket
import tempfile
import threading
import time
import urllib.parse
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from flexbench import leftovers, mlflow_view, patience
from flexbench.mlflow_search import quote, search_all
from flexbench.record import CONFIG, RunRecord
from flexbench.schema import (
    CONFIG_KEY_TAG,
    ERROR_TAG,
    EXPERIMENT_KIND_TAG,
    KIND_TAG,
    NOTE_TAG,
    PARENT_TAG,
    PART_TAG,
    RECORD_ID_TAG,
    SWEEP_ID_TAG,
)

EXPERIMENT_KIND = {EXPERIMENT_KIND_TAG: "custom_model_development"}
RESUME_MATCH = ("torch", "triton", "gpu")
DEFAULT_JOURNAL = Path(".flexbench") / "journal.jsonl"
MLFLOW_NAME = re.compile(r"[a-z]+-[a-z]+-\d{1,3}")  # MLflow's random run names: learned-slug-384
NOTE_MAX_CHARS = 7900  # MLflow rejects tag values over 8000 characters
SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
# Error codes that stop a sync (the server is down, busy, or refuses us), never quarantine.
STOP_CODES = {
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "ENDPOINT_NOT_FOUND",
    "REQUEST_LIMIT_EXCEEDED",
    "TEMPORARILY_UNAVAILABLE",
}
MAX_EXPERIMENT_NAME = 500  # mlflow.utils.validation.MAX_EXPERIMENT_NAME_LENGTH
MAX_RUN_NAME = 250  # the runs.name column (PostgreSQL refuses longer names)
BACKGROUND = "flexbench-tracking"  # name prefix of the thread that logs child runs


class TrackingError(Exception):
    """The tracking server could not be used; the message is one line, secrets redacted."""


# --- secrets ---------------------------------------------------------------------------------


# scheme://USERINFO@host: USERINFO may hold '@' and '/' (raw, unencoded) but ends at the first
# '@' that a host (and port) and then the end, a path, a quote or a space follow.
USERINFO = re.compile(r"""(\w[\w+.-]*://)([^\s]*?)@(?=[\w.\-]+(?::\d+)?(?:[/?#\s'"),;]|$))""")
HOST_PORT = re.compile(r"[\w.\-]+(?::\d+)?")
KNOWN_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks")
_secrets: set[str] = set()  # credentials of the tracking URIs seen, removed from every text


def _userinfo(match: re.Match) -> str:
    user = match.group(2)
    if "/" in user and HOST_PORT.fullmatch(user.split("/", 1)[0]):
        return match.group(0)  # host/path@x: an '@' in a path, not credentials
    return match.group(1) + "***@"


def redact(text: str) -> str:
    """Remove URL credentials (any userinfo: '/', '@', spaces, percent-escapes) and the values
    of secret environment variables from text."""
    secrets = [os.environ.get(name) or "" for name in SECRET_ENV]
    for secret in sorted({*_secrets, *secrets}, key=len, reverse=True):
        if len(secret) >= 3:
            text = text.replace(secret, "***")
    return USERINFO.sub(_userinfo, text)


def remember_secrets(uri: str) -> None:
    """Redact this URI's userinfo (and password, raw and percent-decoded) from every text.
    With raw '@' or '/' in a password the userinfo is ambiguous: both readings are kept (up
    to the first '@' before a host, and up to the last '@'), the longer redacted first."""
    _, sep, rest = uri.partition("://")
    if not sep or "@" not in rest:
        return
    users = {rest[: rest.rfind("@")]}
    match = re.match(r"(.*?)@(?=[\w.\-]+(?::\d+)?(?:[/?#]|$))", rest)
    if match and not ("/" in match.group(1) and HOST_PORT.fullmatch(match.group(1).split("/")[0])):
        users.add(match.group(1))
    for user in users:
        for secret in (user, user.partition(":")[2]):
            _secrets.update({secret, urllib.parse.unquote(secret)} - {""})


def check_uri(uri: str) -> str:
    """The tracking URI if it names a scheme flexbench can log to (and a host for http);
    ValueError with one line otherwise."""
    remember_secrets(uri)
    scheme = uri.partition("://")[0].split("+")[0].lower() if "://" in uri else ""
    hint = "use e.g. http://HOST:5000, sqlite:///mlflow.db or postgresql://USER@HOST/DB"
    if scheme not in KNOWN_SCHEMES and uri not in ("databricks", "databricks-uc"):
        raise ValueError(f"tracking URI '{redact(uri)}' has no known scheme; {hint}")
    if scheme in ("http", "https"):
        try:
            parts = urllib.parse.urlsplit(uri)
            host, _ = parts.hostname, parts.port
        except ValueError:
            host = None
        if not host or any(c.isspace() for c in uri):
            raise ValueError(
                f"tracking URI '{redact(uri)}' has no valid host[:port]; {hint} "
                "(percent-encode '/', '@', ':' and spaces in a password: %2F %40 %3A %20)"
            )
    return uri


def resolve_uri(uri: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db);
    its credentials are redacted from every text from then on."""
    import mlflow

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    remember_secrets(uri)
    return uri


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


JOURNAL_VERSION = 1  # "v" of every line written; lines without it are version 0 (read as is)
# The keys an entry of each type needs before sync can use it; other lines are skipped.
ENTRY_KEYS = {
    "sweep": ("sweep_id", "part_id", "experiment", "params", "tags", "run_name", "start_ms"),
    "result": (
        *("record_id", "sweep_id", "part_id", "experiment", "tags", "start_ms", "end_ms"),
        *("run_name", "status", "params", "metrics", "config_key"),
    ),
    "synced": ("record_id", "target", "run_id"),
    "finished": ("part_id", "target", "run_id"),
    "failed": ("record_id", "part_id", "target", "reason"),
    "sweep_metrics": ("part_id", "metrics"),
}


def checksum(entry: dict) -> str:
    """CRC-32 (hex) of the entry's canonical JSON without its `crc` field."""
    body = {k: v for k, v in entry.items() if k != "crc"}
    return format(zlib.crc32(json.dumps(body, sort_keys=True).encode("utf-8")), "08x")


def encode(entry: dict) -> bytes:
    """One journal line: the entry with its format version and checksum, newline-ended."""
    entry = {**entry, "v": JOURNAL_VERSION}
    return (json.dumps({**entry, "crc": checksum(entry)}, sort_keys=True) + "\n").encode("utf-8")


def decode(line: bytes) -> dict | None:
    """The entry a journal line holds, or None for a torn, garbled or foreign line."""
    try:
        entry = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(entry, dict) or entry.get("type") not in ENTRY_KEYS:
        return None
    if "v" in entry and (entry["v"] != JOURNAL_VERSION or entry.get("crc") != checksum(entry)):
        return None
    if any(k not in entry for k in ENTRY_KEYS[entry["type"]]):
        return None
    return migrate(entry)


def migrate(entry: dict) -> dict:
    """A version-0 (unversioned) entry in today's shape; version-1 entries pass unchanged."""
    entry = {k: v for k, v in entry.items() if k != "crc"}
    entry.setdefault("v", 0)
    return entry


class Journal:
    """Append-only JSONL: `sweep` and `result` entries, and `synced`, `finished` and `failed`
    marks per server. Each line carries its format version and a checksum; unreadable lines
    (torn by a crash or a full disk, garbage) are skipped and counted in `bad_lines`."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = journal_path(path)
        self.bad_lines: list[int] = []

    def append(self, entry: dict) -> None:
        """Write one entry and force it to disk before returning.

        An exclusive lock keeps whole lines when shards or GPU workers share one journal; a
        file left without its last newline (a torn write) gets one first, so the torn line
        never swallows this entry.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = encode(entry)
            if not ends_with_newline(self.path):
                data = b"\n" + data
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def entries(self) -> list[dict]:
        """Every readable entry; the line numbers of unreadable ones go to `bad_lines`."""
        self.bad_lines = []
        if not self.path.exists():
            return []
        out = []
        for number, line in enumerate(self.path.read_bytes().split(b"\n"), 1):
            if not line.strip():
                continue
            entry = decode(line)
            if entry is None:
                self.bad_lines.append(number)
            else:
                out.append(entry)
        return out

    def bad_note(self) -> str | None:
        """One line about the skipped lines of the last `entries()`, or None."""
        if not self.bad_lines:
            return None
        shown = ", ".join(str(n) for n in self.bad_lines[:10])
        more = ", ..." if len(self.bad_lines) > 10 else ""
        return (
            f"warning: skipped {len(self.bad_lines)} unreadable line(s) of {self.path} "
            f"(line {shown}{more}): torn or not flexbench entries; every other entry is used"
        )

    def mark_synced(self, record_id: str, target: str, run_id: str) -> None:
        self.append({"type": "synced", "record_id": record_id, "target": target, "run_id": run_id})

    def mark_finished(self, part_id: str, target: str, run_id: str) -> None:
        """The sweep run of `part_id` got its aggregates and artifacts on `target`."""
        self.append({"type": "finished", "part_id": part_id, "target": target, "run_id": run_id})

    def mark_failed(self, record_id: str, part_id: str, target: str, reason: str) -> None:
        """`target` refused this result for good (`record_id` "" : the whole part)."""
        entry = {"record_id": record_id, "part_id": part_id, "target": target, "reason": reason}
        self.append({"type": "failed", **entry})


def ends_with_newline(path: Path) -> bool:
    """True for an empty file or one whose last byte is a newline (not a regular file: True)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return True
            f.seek(size - 1)
            return f.read(1) == b"\n"
    except OSError:
        return True


def names_problem(experiment: str, run_name: str) -> str | None:
    """Why MLflow would refuse this experiment or run name (its rules and lengths), or None."""
    if not experiment.strip():
        return "the experiment name is empty: pass --experiment NAME"
    if len(experiment) > MAX_EXPERIMENT_NAME:
        return f"the experiment name is {len(experiment)} characters, over {MAX_EXPERIMENT_NAME}"
    if len(run_name) > MAX_RUN_NAME:
        return f"the run name is {len(run_name)} characters, over {MAX_RUN_NAME}: shorten it"
    return None


def check_names(experiment: str, run_name: str) -> None:
    """ValueError (one line) for a name MLflow would refuse, before anything is measured."""
    why = names_problem(experiment, run_name)
    if why:
        raise ValueError(why)


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


def mlflow_entities(
    metrics: Mapping[str, float],
    params: Mapping[str, str],
    tags: Mapping[str, str],
    timestamp_ms: int,
) -> tuple[list, list, list]:
    """MLflow's Metric, Param and RunTag entities of one log_batch."""
    from mlflow.entities import Metric, Param, RunTag

    return (
        [Metric(k, float(v), timestamp_ms, 0) for k, v in metrics.items()],
        [Param(k, str(v)) for k, v in params.items()],
        [RunTag(k, str(v)) for k, v in tags.items()],
    )


def log_child(client, exp_id: str, parent_id: str, record: RunRecord) -> str:
    """One config's run: create, one log_batch, terminate. Returns its run id.

    Its flexbench.kind is the record's `kind` (`config`; tune's skips are `skipped`)."""
    tags = {**record.logged_tags(), PARENT_TAG: parent_id}
    if record.error:
        tags[ERROR_TAG] = redact(record.error)
    run = client.create_run(exp_id, start_time=record.start_ms, tags=tags, run_name=record.run_name)
    try:
        complete_child(client, run.info.run_id, record)
    except Exception as exc:
        if refusal(exc):  # refused for good: leave no half-logged run behind
            client.delete_run(run.info.run_id)
        raise
    return run.info.run_id


def log_child_once(client, exp_id: str, parent_id: str, record: RunRecord) -> str:
    """`log_child` that is safe to repeat: a run with the record's id (an earlier try the
    server did not answer in time) is completed, not logged twice."""
    run = find_run(client, exp_id, RECORD_ID_TAG, record.record_id)
    if run is None:
        return log_child(client, exp_id, parent_id, record)
    if run.info.status == "RUNNING":
        complete_child(client, run.info.run_id, record)
    return run.info.run_id


def complete_child(client, run_id: str, record: RunRecord) -> None:
    """Params and metrics in one log_batch, then the final status (safe to repeat)."""
    metrics, params, _ = mlflow_entities(record.metrics, record.params, {}, record.end_ms)
    client.log_batch(run_id, metrics=metrics, params=params)
    client.set_terminated(run_id, record.status, end_time=record.end_ms)


def start_nested_run(client, exp_id: str, parent_id: str, run: RunRecord) -> str:
    """A RUNNING run under `parent_id` with the record's name, tags, params and start, e.g. one
    config's tune run under the tune sweep run; `end_run` finishes it. Returns its run id."""
    tags = {**run.logged_tags(), PARENT_TAG: parent_id}
    created = client.create_run(exp_id, start_time=run.start_ms, tags=tags, run_name=run.run_name)
    _, params, _ = mlflow_entities({}, run.params, {}, run.start_ms)
    client.log_batch(created.info.run_id, params=params)
    return created.info.run_id


def end_run(
    client, run_id: str, metrics: dict[str, float], tags: dict[str, str], status: str, end_ms: int
) -> None:
    """Metrics and tags in one log_batch, then the final status."""
    m, _, t = mlflow_entities(metrics, {}, tags, end_ms)
    client.log_batch(run_id, metrics=m, tags=t)
    client.set_terminated(run_id, status, end_time=end_ms)


def set_tags(client, run_id: str, tags: dict[str, str]) -> None:
    """Tags on an existing (possibly finished) run, one log_batch."""
    _, _, t = mlflow_entities({}, {}, tags, 0)
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
    _, p, t = mlflow_entities({}, params, tags, sweep["start_ms"])
    client.log_batch(run_id, params=p, tags=t)
    return run_id


def description(markdown: str) -> str:
    """The run description: the summary, cut to what MLflow accepts as a tag value."""
    if len(markdown) <= NOTE_MAX_CHARS:
        return markdown
    cut = markdown[: NOTE_MAX_CHARS - 100].rsplit("\n", 1)[0]
    return cut + "\n\n*(table truncated: the full summary is the artifact summary.md)*\n"


@dataclass(frozen=True)
class SweepArtifacts:
    """What a sweep run gets when it ends, finished by the caller (`artifacts.for_sweep`):
    its aggregate metrics, the summary (markdown: the run description) and its artifact files
    (name -> text, or bytes for an image)."""

    metrics: dict[str, float]
    summary: str
    files: dict[str, str | bytes] = field(default_factory=dict)


# Builds a sweep part's artifacts from its records (sync has only the journal's).
ArtifactBuilder = Callable[[list[RunRecord]], SweepArtifacts]


def finish_sweep_run(
    client,
    run_id: str,
    artifacts: SweepArtifacts,
    terminate: bool,
    end_ms: int | None = None,
    failed: bool | None = None,
    extra: dict[str, float] | None = None,
    status: str | None = None,
) -> None:
    """The artifacts' metrics (and `extra` metrics, e.g. phase_*_s), files (summary.md,
    results.csv, heatmap.png, report.html) and description on the sweep run; it ends `status`
    if given, else FAILED when `failed` (default: when a config failed), else FINISHED."""
    metrics = {**artifacts.metrics, **(extra or {})}
    end_ms = end_ms or int(time.time() * 1000)
    m, _, t = mlflow_entities(metrics, {}, {NOTE_TAG: description(artifacts.summary)}, end_ms)
    client.log_batch(run_id, metrics=m, tags=t)
    for name, content in artifacts.files.items():
        log_file(client, run_id, name, content)
    if terminate:
        failed = metrics.get("configs_failed", 0) > 0 if failed is None else failed
        status = status or ("FAILED" if failed else "FINISHED")
        client.set_terminated(run_id, status, end_time=end_ms)


def log_file(client, run_id: str, name: str, content: str | bytes) -> None:
    """One artifact file at the run's artifact root."""
    if isinstance(content, str):
        client.log_text(run_id, content, name)
        return
    with tempfile.TemporaryDirectory(prefix="flexbench-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(content)
        client.log_artifact(run_id, str(path))


def resume_keys(client, exp_id: str, env: dict[str, str]) -> set[str]:
    """Config keys with a FINISHED config run under the same torch, triton and GPU."""
    clauses = ["attributes.status = 'FINISHED'", f"tags.`{KIND_TAG}` = 'config'"]
    clauses += [f"tags.`{k}` = {quote(env[k])}" for k in RESUME_MATCH]
    runs = search_all(client, [exp_id], " and ".join(clauses))
    return {r.data.tags[CONFIG_KEY_TAG] for r in runs if CONFIG_KEY_TAG in r.data.tags}


def journal_keys(entries: list[dict], experiment: str, env: dict[str, str], target: str) -> set:
    """Config keys with a FINISHED result in the journal (same experiment, torch, triton and
    GPU) that is neither synced to `target` nor refused by it: `sync` will upload them."""
    owed = pending(entries, target).todo
    return {
        r.config_key
        for r in owed
        if r.ok
        and r.kind == CONFIG
        and r.experiment == experiment
        and all(r.tags.get(k) == env.get(k) for k in RESUME_MATCH)
    }


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
    journal_note: str | None = None  # set once the journal could not be written
    unjournalled: list[dict] = field(default_factory=list)  # entries no journal took
    _sweep: dict = field(default_factory=dict)
    _pool: ThreadPoolExecutor | None = None
    _pending: list[Future] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def step(self, fn, *args, again=None) -> object:
        """Run one tracking step (e.g. `start_nested_run`): its result, or None once offline.
        On failure remember why and go offline. A busy server (slow answers, 429/5xx) is tried
        again with backoff for up to `timeout_s`, then with `again` (default `fn`): a form of
        the step that is safe to repeat."""
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

        self.step(go)
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

    def resume_keys(self, env: dict[str, str]) -> set[str]:
        """Config keys measured on this stack: FINISHED on the server (when reachable) or
        journalled and not yet synced there (so `sync` never adds a second run of them)."""
        keys = self.step(resume_keys, self.client, self.exp_id, env) or set()
        entries = self.journal.entries()
        return set(keys) | journal_keys(entries, self.experiment, env, target_id(self.uri))

    def start(self, sweep: dict) -> None:
        """Journal the sweep entry (OSError if the journal cannot be written: nothing is
        measured yet), then create (or adopt) the sweep run."""
        sweep = {**sweep, "run_id": self.run_id or None}
        self._sweep = sweep
        self.journal.append({"type": "sweep", **sweep})
        run_id = self.step(start_sweep_run, self.client, self.exp_id, sweep)
        if run_id:
            self.run_id = run_id

    def write(self, entry: dict) -> None:
        """Journal an entry; never drops it. When the journal cannot be written (read-only,
        disk full) the sweep goes on in a fallback journal in $TMPDIR (`journal_note` says
        where); when that fails too the entry stays in `unjournalled`."""
        with self._lock:
            try:
                self.journal.append(entry)
                return
            except OSError as exc:
                if self.journal_note is None:
                    self._fall_back(exc)
                    try:
                        self.journal.append(entry)
                        return
                    except OSError:
                        pass
            self.unjournalled.append(entry)

    def _fall_back(self, exc: OSError) -> None:
        """Switch to `$TMPDIR/flexbench-journal-<part id>.jsonl`, with the sweep entry."""
        old = self.journal.path
        part = self._sweep.get("part_id") or uuid.uuid4().hex
        self.journal = Journal(Path(tempfile.gettempdir()) / f"flexbench-journal-{part}.jsonl")
        why = exc.strerror or str(exc)
        self.journal_note = (
            f"journal {old} could not be written ({why}); results from then on are kept in "
            f"{self.journal.path}"
        )
        try:
            self.journal.append({"type": "sweep", **self._sweep})
        except OSError as again:
            self.journal_note = (
                f"journal {old} ({why}) and {self.journal.path} "
                f"({again.strerror or again}) could not be written"
            )

    def log(self, record: RunRecord, parent: str | None = None) -> str | None:
        """Journal one result (flushed), then log it as a child run of `parent` (default: the
        sweep run); its run id, or None when offline. `sync` logs it under the sweep run."""
        self.write(record.to_journal())
        return self._log_marked(record, parent)

    def log_later(self, record: RunRecord) -> None:
        """Journal one result (flushed) now; log it as a child of the sweep run on one
        background thread, so MLflow's round trips overlap the next config's measurement."""
        self.write(record.to_journal())
        if self.offline:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=BACKGROUND)
        self._pending.append(self._pool.submit(self._log_marked, record))

    def _log_marked(self, record: RunRecord, parent: str | None = None) -> str | None:
        """Log a journalled result as a child run and mark it synced; None when offline."""
        args = (self.client, self.exp_id, parent or self.run_id, record)
        run_id = self.step(log_child, *args, again=log_child_once)
        if run_id:
            mark = {"record_id": record.record_id, "target": target_id(self.uri)}
            self.write({"type": "synced", **mark, "run_id": run_id})
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

    def finish(
        self,
        artifacts: Callable[[], SweepArtifacts],
        failed: bool | None = None,
        metrics: dict | None = None,
        status: str | None = None,
    ) -> None:
        """`artifacts()` (called once every child run is logged, only while online: it may
        read the server) and `metrics` (journalled for sync) on the sweep run (not ended under
        `mlflow run`); it ends `status` if given, else FAILED when `failed` (default: when a
        config failed)."""
        self.drain()
        if metrics:
            part = self._sweep["part_id"]
            self.write({"type": "sweep_metrics", "part_id": part, "metrics": metrics})
        terminate = not self.under_mlflow_run

        def finish() -> None:
            args = (self.client, self.run_id, artifacts(), terminate, None, failed, metrics)
            finish_sweep_run(*args, status)

        self.step(finish)
        if not self.offline:
            mark = {"part_id": self._sweep["part_id"], "target": target_id(self.uri)}
            self.write({"type": "finished", **mark, "run_id": self.run_id})


def result_entry(
    record: RunRecord, sweep: dict, tags: dict[str, str], start_ms: int, end_ms: int
) -> RunRecord:
    """The record with what sync needs to log it later (record id, sweep, part, experiment,
    times); its tags are `tags` (environment) and the record's own (kernels, skipped
    baselines)."""
    return record.with_run(
        record_id=uuid.uuid4().hex,
        sweep_id=sweep["sweep_id"],
        part_id=sweep["part_id"],
        experiment=sweep["experiment"],
        start_ms=start_ms,
        end_ms=end_ms,
        tags={**tags, **record.tags},
    )


def sweep_entry(
    sweep_id: str,
    experiment: str,
    params: dict[str, str] | None,
    tags: dict[str, str],
    run_name: str,
    start_ms: int | None = None,
    part_id: str | None = None,
) -> dict:
    """The journal's `sweep` entry: what sync needs to (re)create this process's sweep run;
    the host and pid of this process unless `part_id` is given (a part of another process)."""
    entry = {
        "sweep_id": sweep_id,
        "part_id": part_id or uuid.uuid4().hex,  # this process's part (shards share sweep_id)
        "experiment": experiment,
        "params": params or {},
        "tags": tags,
        "run_name": run_name,
        "start_ms": int(time.time() * 1000) if start_ms is None else start_ms,
    }
    if part_id is None:  # with pid: sync leaves a sweep that still runs alone
        entry.update(host=socket.gethostname(), pid=os.getpid())
    return entry


# --- sync ------------------------------------------------------------------------------------


@dataclass
class SyncReport:
    uploaded: int = 0
    already: int = 0
    sweeps: int = 0
    quarantined: list[str] = field(default_factory=list)  # refused for good by this sync
    held: int = 0  # refused by an earlier sync: skipped (see `sync --status`)
    running: int = 0  # sweep parts still being measured here: left alone


@dataclass
class Pending:
    """What a journal still owes one tracking server."""

    sweeps: dict[str, dict]  # sweep entries by part id
    todo: list[RunRecord]  # results neither synced nor refused
    unfinished: set[str]  # part ids whose sweep run was not finished there
    failed: dict[str, str]  # record id (or part id) -> why the server refused it
    results: list[RunRecord]  # every result
    extra: dict[str, dict]  # sweep metrics (e.g. phase_*_s) by part id


def pending(entries: Iterable[dict], target: str, retry_failed: bool = False) -> Pending:
    """The journal's entries as what is still to do for `target`."""
    entries = list(entries)
    mine = [e for e in entries if e.get("target") == target]
    done = {e["record_id"] for e in mine if e["type"] == "synced"}
    finished = {e["part_id"] for e in mine if e["type"] == "finished"}
    failed = (
        {}
        if retry_failed
        else {e["record_id"] or e["part_id"]: e["reason"] for e in mine if e["type"] == "failed"}
    )
    sweeps = {e["part_id"]: e for e in entries if e["type"] == "sweep"}
    results = [RunRecord.from_journal(e) for e in entries if e["type"] == "result"]
    todo = [r for r in results if r.record_id not in done and not _refused(r, failed)]
    extra = {e["part_id"]: e["metrics"] for e in entries if e["type"] == "sweep_metrics"}
    return Pending(sweeps, todo, set(sweeps) - finished - set(failed), failed, results, extra)


def _refused(record: RunRecord, failed: dict[str, str]) -> bool:
    return record.record_id in failed or record.part_id in failed


def sync(
    journal: Journal, uri: str, retry_failed: bool = False, *, build: ArtifactBuilder
) -> SyncReport:
    """Log every journalled result not yet on this server, exactly once; raises TrackingError
    when the server is unreachable or refuses us (auth, permission).

    Idempotent: a result already on the server (by its record id, or by its config key in the
    same sweep) is not logged again, a half-logged one is completed. A result (or sweep part)
    the server refuses for good is marked failed with the reason and skipped from then on
    (`--status` lists it, `retry_failed` tries again); the rest goes on. A sweep run left
    RUNNING ends FINISHED only when every config of it is recorded, else KILLED. Parts of a
    sweep still running on this host are left alone. `build` makes a sweep part's artifacts
    from its records (`artifacts.for_sweep`; `artifacts.sync` passes it).
    """
    target = target_id(uri)
    todo = pending(journal.entries(), target, retry_failed)
    out = SyncReport(held=sum(_refused(e, todo.failed) for e in todo.results))
    try:
        with fast_http():
            client = client_for(uri)
            for part_id in _parts(todo.todo, todo.unfinished):
                sweep = todo.sweeps.get(part_id) or _orphan_sweep(
                    next(r for r in todo.results if r.part_id == part_id)
                )
                if still_running(sweep):
                    out.running += 1
                    continue
                _sync_part_or_refuse(client, journal, target, sweep, todo, out, build)
    except TrackingError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line for the CLI
        raise TrackingError(describe_failure(exc, uri)) from None
    return out


def _parts(todo: list[RunRecord], unfinished: set[str]) -> list[str]:
    """Part ids to sync, in journal order: those with pending results, then unfinished ones."""
    parts = list(dict.fromkeys(r.part_id for r in todo))
    return parts + sorted(unfinished - set(parts))


def still_running(sweep: dict) -> bool:
    """The sweep entry's process is alive on this host (another process than this one)."""
    pid = sweep.get("pid")
    if not pid or sweep.get("host") != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def refusal(exc: BaseException) -> str | None:
    """Why the server refused a request for good (a validation error, a 4xx other than
    auth/permission/rate limit), as one line; None for a failure worth stopping on."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, TrackingError) and "is deleted" in str(exc):
        return str(exc)
    if not isinstance(exc, MlflowException) or exc.error_code in STOP_CODES:
        return None
    status = exc.get_http_status_code()
    if not 400 <= status < 500 or status in (401, 403, 408, 429):
        return None
    return redact(" ".join(str(exc).split()))[:300]


def _sync_part_or_refuse(
    client,
    journal: Journal,
    target: str,
    sweep: dict,
    todo: Pending,
    out: SyncReport,
    build: ArtifactBuilder,
) -> None:
    """One sweep part; if the server refuses the part itself (its experiment or sweep run),
    mark the part and its pending results failed and go on."""
    part_id = sweep["part_id"]
    why = names_problem(sweep["experiment"], sweep["run_name"])
    if why is None:
        try:
            _sync_part(client, journal, target, sweep, todo, out, build)
            return
        except Exception as exc:  # noqa: BLE001 - classified: refused for good, or stop
            why = refusal(exc)
            if why is None:
                raise
    journal.mark_failed("", part_id, target, why)
    out.quarantined += [f"{r.run_name}: {why}" for r in todo.todo if r.part_id == part_id] or [
        f"{sweep['run_name']}: {why}"
    ]


def _sync_part(
    client,
    journal: Journal,
    target: str,
    sweep: dict,
    todo: Pending,
    out: SyncReport,
    build: ArtifactBuilder,
) -> None:
    """One sweep part: its sweep run, its missing children, then its aggregates (+ `extra`)."""
    exp_id = _sync_experiment(client, sweep)
    parent = start_sweep_run(client, exp_id, sweep)
    out.sweeps += 1
    mine = [r for r in todo.results if r.part_id == sweep["part_id"]]
    known = ServerRuns(client, exp_id, sweep["sweep_id"]) if todo.todo else None
    for record in (r for r in todo.todo if r.part_id == sweep["part_id"]):
        try:
            run_id = _sync_child(client, exp_id, parent, record, known, out)
        except Exception as exc:  # noqa: BLE001 - classified: refused for good, or stop
            why = refusal(exc)
            if why is None:
                raise
            journal.mark_failed(record.record_id, record.part_id, target, why)
            out.quarantined.append(f"{record.run_name}: {why}")
            continue
        journal.mark_synced(record.record_id, target, run_id)
    if client.get_run(parent).info.status == "RUNNING":  # ended already: its sweep ended it
        status = part_status(sweep, mine)
        extra = todo.extra.get(sweep["part_id"])
        terminate = not sweep.get("run_id")
        finish_sweep_run(client, parent, build(mine), terminate, extra=extra, status=status)
    journal.mark_finished(sweep["part_id"], target, parent)


def part_status(sweep: dict, results: list[RunRecord]) -> str | None:
    """KILLED when the part recorded fewer configs than it planned; else None (FINISHED, or
    FAILED when a config failed)."""
    planned = sweep.get("planned")
    if planned is not None and len({r.config_key for r in results}) < planned:
        return "KILLED"
    return None


class ServerRuns:
    """The runs a server holds for one sweep id, as (run id, status), looked up by record id
    or by config key (kind, config key, status); `add` records a run this sync logged."""

    def __init__(self, client, exp_id: str, sweep_id: str) -> None:
        runs = search_all(client, [exp_id], f"tags.`{SWEEP_ID_TAG}` = {quote(sweep_id)}")
        self.by_record: dict[str, tuple[str, str]] = {}
        self.by_config: dict[tuple, tuple[str, str]] = {}
        for run in runs:
            tags = run.data.tags
            if RECORD_ID_TAG in tags:
                self.by_record[tags[RECORD_ID_TAG]] = (run.info.run_id, run.info.status)
            if run.info.status != "RUNNING" and CONFIG_KEY_TAG in tags:
                key = (tags.get(KIND_TAG, "config"), tags[CONFIG_KEY_TAG], run.info.status)
                self.by_config[key] = (run.info.run_id, run.info.status)

    @staticmethod
    def key(record: RunRecord) -> tuple:
        return record.kind, record.config_key, record.status

    def find(self, record: RunRecord) -> tuple[str, str] | None:
        """The server's run of this result: same record id, else same config in the sweep."""
        return self.by_record.get(record.record_id) or self.by_config.get(self.key(record))

    def add(self, record: RunRecord, run_id: str) -> None:
        self.by_record[record.record_id] = self.by_config[self.key(record)] = (
            run_id,
            record.status,
        )


def _sync_child(
    client, exp_id: str, parent: str, record: RunRecord, known: ServerRuns, out: SyncReport
) -> str:
    """Log one result unless the server has it; complete it if it was left half-logged."""
    found = known.find(record)
    if found is None:
        run_id = log_child(client, exp_id, parent, record)
        known.add(record, run_id)
        out.uploaded += 1
        return run_id
    run_id, status = found
    if status == "RUNNING":
        complete_child(client, run_id, record)
        known.add(record, run_id)
        out.uploaded += 1
    else:
        out.already += 1
    return run_id


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


def _orphan_sweep(record: RunRecord) -> dict:
    """A sweep entry for results whose sweep entry is missing from the journal."""
    name = f"sweep {record.sweep_id}"
    entry = sweep_entry(
        record.sweep_id,
        record.experiment,
        {},
        dict(record.tags),
        name,
        record.start_ms,
        record.part_id,
    )
    return {**entry, "run_id": None}


@dataclass
class SyncStatus:
    """Per tracking server: results synced, pending, refused (with why)."""

    target: str
    synced: int
    pending: int
    refused: list[tuple[str, str]]  # (what, why)


def sync_status(journal: Journal) -> list[SyncStatus]:
    """What the journal holds for each server it has synced to (or tried)."""
    entries = journal.entries()
    targets = dict.fromkeys(e["target"] for e in entries if "target" in e)
    out = []
    for target in targets:
        todo = pending(entries, target)
        names = {r.record_id: r.run_name for r in todo.results}
        parts = {k: f"sweep {v['run_name']}" for k, v in todo.sweeps.items()}
        refused = [(names.get(k) or parts.get(k, k), why) for k, why in todo.failed.items()]
        synced = sum(e["type"] == "synced" and e["target"] == target for e in entries)
        out.append(SyncStatus(target, synced, len(todo.todo), refused))
    return out
