"""Read config runs back from the tracking server: --where filters, sweep selection, rows.

Never re-measures and never writes. A *selection* names a sweep (`latest`, `all`, a sweep run
id) or every shard of one `flexbench.sweep_id`, narrowed by `--where` clauses; `read` returns
the matching config runs as report rows, in the order they ran.

Two readers give the same rows for the same filters:

- `MlflowReader` (any tracking URI): paginated `search_runs`, filtered on the server.
- `SqlReader` (a database store: sqlite, postgresql, mysql): reads MLflow's own tables
  (`runs`, `tags`, `params`, `latest_metrics`) with four plain queries. MLflow's SQL store
  builds dozens of ORM objects per run and expires them all on commit, so search_runs is
  many times slower over thousands of runs (BENCHMARKS.md, "Figures the code cites").
"""

from __future__ import annotations

import gc
import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flexbench import mlflow_search, schema, tracking
from flexbench.env import ENV_TAGS
from flexbench.record import RunRecord
from flexbench.schema import KIND_TAG, PARENT_TAG, PART_TAG, SWEEP_ID_TAG

ATTRIBUTES = {"status": "r.status", "run_name": "r.name"}  # --where key -> runs column
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
WHERE_CLAUSE = re.compile(r"\s*([A-Za-z_][\w.]*)\s*(!=|=)\s*(.*?)\s*")
WHERE_EXAMPLE = "e.g. --where score_mod=causal,dtype=bfloat16,torch=2.11.0"
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql")
SWEEPS = ("latest", "all")
READ_TIMEOUT_ENV, READ_TIMEOUT_S = "MLFLOW_HTTP_REQUEST_TIMEOUT", "120"


class NotFound(Exception):
    """Nothing to read: no store, experiment, sweep or matching runs. One line."""


# --- --where ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clause:
    """One condition on a param, tag or run attribute: `key=value` or `key!=value`."""

    key: str
    op: str
    value: str

    def target(self) -> tuple[str, str]:
        """(`params` | `tags` | `attributes`, name); ValueError naming the valid keys."""
        prefix, _, name = self.key.partition(".")
        if prefix in ("params", "tags") and name:
            return prefix, name
        if self.key in schema.param_keys() or self.key.startswith(schema.OPTIONS_PREFIX):
            return "params", self.key
        if self.key in ENV_TAGS or (prefix in ("flexbench", "mlflow") and name):
            return "tags", self.key
        if self.key in ATTRIBUTES:
            return "attributes", self.key
        raise ValueError(
            f"--where: unknown key '{self.key}'; use a param ({', '.join(schema.param_keys())}, "
            "ko_*), "
            f"an environment tag ({', '.join(ENV_TAGS)}), status, run_name, or params.NAME / "
            "tags.NAME"
        )

    def filter(self) -> str:
        """As an MLflow search filter."""
        kind, name = self.target()
        field = f"attributes.{name}" if kind == "attributes" else f"{kind}.`{name}`"
        return f"{field} {self.op} {mlflow_search.quote(self.value)}"


def tag_is(tag: str, value: str) -> Clause:
    return Clause(f"tags.{tag}", "=", value)


def _value(key: str, value: str) -> str:
    """Values as logged: lower-case booleans, torch dtype names, upper-case status."""
    if key in schema.bool_params():
        return value.lower()
    if key == "dtype":
        return DTYPE_ALIASES.get(value, value)
    return value.upper() if key == "status" else value


def parse_where(texts: Sequence[str]) -> list[Clause]:
    """`key=value` (or `key!=value`) clauses, comma separated; all clauses of all texts ANDed.

    A comma inside a value stays in it: `shape=1,16,512,64,dtype=float32` is two clauses.
    Raises ValueError naming the bad clause and the fix.
    """
    clauses = []
    for text in texts:
        pieces: list[str] = []
        for token in str(text).split(","):
            if "=" in token or not pieces:
                pieces.append(token)
            elif token.strip():
                pieces[-1] += "," + token.strip()
        clauses += [_clause(p) for p in pieces if p.strip()]
    return clauses


def _clause(piece: str) -> Clause:
    m = WHERE_CLAUSE.fullmatch(piece)
    if not m or not m.group(3):
        raise ValueError(f"--where: '{piece.strip()}' is not KEY=VALUE ({WHERE_EXAMPLE})")
    key, op, value = m.groups()
    clause = Clause(key, op, _value(key, value))
    clause.target()
    return clause


# --- selections ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """Which config runs to read: a sweep (`latest`, `all` or a sweep run id) or every shard
    of one `flexbench.sweep_id`, narrowed by --where texts."""

    sweep: str = "latest"
    sweep_id: str | None = None
    where: tuple[str, ...] = ()

    def clauses(self) -> list[Clause]:
        """The parsed --where clauses; ValueError for bad input."""
        if self.sweep_id and self.sweep not in SWEEPS:
            raise ValueError("pass either --sweep RUN_ID or --sweep-id ID, not both")
        return parse_where(self.where)


@dataclass(frozen=True)
class RunRef:
    """A run's id, experiment, name, flexbench kind (sweep / config / '') and part id."""

    run_id: str
    experiment_id: str
    name: str
    kind: str
    part_id: str = ""


@dataclass
class Scope:
    """Where a selection's config runs are: experiments, clauses, a readable label."""

    experiment_ids: list[str]
    clauses: list[Clause]
    label: str


def row_from_run(info: dict, tags: dict, params: dict, metrics: dict) -> dict:
    """One config run as a report row (`RunRecord.to_row`)."""
    return RunRecord.from_mlflow(info, tags, params, metrics).to_row()


@contextmanager
def no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many objects (a large read otherwise
    spends much of its time in collections that find nothing: BENCHMARKS.md, "Figures the
    code cites")."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# --- readers ---------------------------------------------------------------------------------


@dataclass
class MlflowReader:
    """Config runs through MLflow's client: works for every tracking URI."""

    client: object
    uri: str

    def experiment(self, name: str) -> str | None:
        exp = self.client.get_experiment_by_name(name)
        return exp.experiment_id if exp and exp.lifecycle_stage == "active" else None

    def latest_sweep_id(self, exp_id: str) -> str | None:
        """The sweep id of the sweep run that started last, None without sweep runs."""
        sweeps = self.latest_sweeps(exp_id, 1)
        return sweeps[0][0] if sweeps else None

    def latest_sweeps(self, exp_id: str, count: int) -> list[tuple[str, int]]:
        """(sweep id, start time) of the `count` sweep runs that started last, newest first."""
        runs = self.client.search_runs(
            [exp_id],
            tag_is(KIND_TAG, "sweep").filter(),
            max_results=count,
            order_by=["attributes.start_time DESC"],
        )
        return [(r.data.tags.get(SWEEP_ID_TAG, ""), r.info.start_time) for r in runs]

    def run(self, run_id: str) -> RunRef | None:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            # the basic-auth app answers 403 for a run id it does not know
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED"):
                raise
            return None
        tags = run.data.tags
        kind, part = tags.get(KIND_TAG, ""), tags.get(PART_TAG, "")
        return RunRef(run.info.run_id, run.info.experiment_id, run.info.run_name, kind, part)

    def tag(self, run_id: str, key: str) -> str | None:
        """One tag of an existing run (None when it has none)."""
        return self.client.get_run(run_id).data.tags.get(key)

    def rows(
        self,
        experiment_ids: list[str],
        clauses: Sequence[Clause],
        since_ms: int | None = None,
        metrics: Sequence[str] | None = None,
    ) -> list[dict]:
        """Every metric whatever `metrics` says (search_runs returns them all anyway)."""
        flt = " and ".join(c.filter() for c in clauses)
        flt += f" and attributes.start_time >= {int(since_ms)}" if since_ms is not None else ""
        with no_gc():
            return [
                row_from_run(_info(r.info), r.data.tags, r.data.params, r.data.metrics)
                for r in mlflow_search.search_all(self.client, experiment_ids, flt)
            ]


def _info(info) -> dict:
    return {
        "run_id": info.run_id,
        "run_name": info.run_name,
        "status": info.status,
        "start_time": info.start_time,
    }


@dataclass
class SqlReader:
    """Config runs straight from a database store's MLflow tables (see the module doc)."""

    engine: object
    uri: str

    def _all(self, conn, sql: str, params: dict) -> list:
        from sqlalchemy import text

        return conn.execute(text(sql), params).all()

    def _one(self, sql: str, params: dict) -> tuple | None:
        with self.engine.connect() as conn:
            rows = self._all(conn, sql, params)
        return tuple(rows[0]) if rows else None

    def experiment(self, name: str) -> str | None:
        row = self._one(
            "SELECT experiment_id, lifecycle_stage FROM experiments WHERE name = :name",
            {"name": name},
        )
        return str(row[0]) if row and row[1] == "active" else None

    def latest_sweep_id(self, exp_id: str) -> str | None:
        sweeps = self.latest_sweeps(exp_id, 1)
        return sweeps[0][0] if sweeps else None

    def latest_sweeps(self, exp_id: str, count: int) -> list[tuple[str, int]]:
        sub, params = matching([exp_id], [tag_is(KIND_TAG, "sweep")])
        with self.engine.connect() as conn:
            rows = self._all(
                conn,
                "SELECT t.value, r.start_time FROM runs r LEFT JOIN tags t ON "
                f"t.run_uuid = r.run_uuid AND t.key = :sweep_tag WHERE r.run_uuid IN ({sub}) "
                "ORDER BY r.start_time DESC LIMIT :count",
                {**params, "sweep_tag": SWEEP_ID_TAG, "count": count},
            )
        return [(row[0] or "", int(row[1] or 0)) for row in rows]

    def run(self, run_id: str) -> RunRef | None:
        row = self._one(
            "SELECT r.run_uuid, r.experiment_id, r.name, t.value, p.value FROM runs r "
            "LEFT JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = :kind "
            "LEFT JOIN tags p ON p.run_uuid = r.run_uuid AND p.key = :part WHERE r.run_uuid = :id",
            {"id": run_id, "kind": KIND_TAG, "part": PART_TAG},
        )
        return (
            RunRef(row[0], str(row[1]), row[2] or "", row[3] or "", row[4] or "") if row else None
        )

    def tag(self, run_id: str, key: str) -> str | None:
        """One tag of a run (None when it has none)."""
        row = self._one(
            "SELECT value FROM tags WHERE run_uuid = :id AND key = :key", {"id": run_id, "key": key}
        )
        return row[0] if row else None

    def rows(
        self,
        experiment_ids: list[str],
        clauses: Sequence[Clause],
        since_ms: int | None = None,
        metrics: Sequence[str] | None = None,
    ) -> list[dict]:
        """Four queries (runs, tags, params, latest metrics) over the matching run ids; only
        the metrics whose names match one of the SQL LIKE patterns `metrics`, if given."""
        sub, params = matching(experiment_ids, clauses, since_ms)
        where = f"WHERE run_uuid IN ({sub})"
        if metrics:
            params = {**params, **{f"m{i}": m for i, m in enumerate(metrics)}}
            only = " OR ".join(f"key LIKE :m{i}" for i in range(len(metrics)))
        with self.engine.connect() as conn, no_gc():

            def select(columns: str, table: str, extra: str = "") -> list:
                sql = f"SELECT run_uuid, {columns} FROM {table} {where}{extra}"
                return self._all(conn, sql, params)

            runs = select("name, status, start_time", "runs")
            parts = {run[0]: ({}, {}, {}) for run in runs}  # tags, params, metrics
            for i, table in enumerate(("tags", "params")):
                for run_id, key, value in select("key, value", table):
                    parts[run_id][i][key] = value
            extra = f" AND ({only})" if metrics else ""
            for run_id, key, value, is_nan in select("key, value, is_nan", "latest_metrics", extra):
                parts[run_id][2][key] = math.nan if is_nan else value
            return [row_from_run(_sql_info(run), *parts[run[0]]) for run in runs]


def _sql_info(run: tuple) -> dict:
    return {"run_id": run[0], "run_name": run[1] or "", "status": run[2], "start_time": run[3]}


def matching(
    experiment_ids: Sequence[str], clauses: Sequence[Clause], since_ms: int | None = None
) -> tuple[str, dict]:
    """SQL selecting the run ids of active runs in the experiments (started at or after
    `since_ms`) that satisfy every clause (a tag/param clause, as in MLflow's search, needs the
    run to have that key), and its bound parameters."""
    params: dict = {f"e{i}": int(e) for i, e in enumerate(experiment_ids)}
    conditions = [
        f"r.experiment_id IN ({', '.join(':' + k for k in params)})",
        "r.lifecycle_stage = 'active'",
    ]
    if since_ms is not None:
        params["since"] = int(since_ms)
        conditions.append("r.start_time >= :since")
    for i, clause in enumerate(clauses):
        kind, name = clause.target()
        params[f"k{i}"], params[f"v{i}"] = name, clause.value
        if kind == "attributes":
            conditions.append(f"{ATTRIBUTES[name]} {clause.op} :v{i}")
        else:  # kind is 'tags' or 'params': a table name from this code, never from input
            conditions.append(
                f"EXISTS (SELECT 1 FROM {kind} x WHERE x.run_uuid = r.run_uuid "
                f"AND x.key = :k{i} AND x.value {clause.op} :v{i})"
            )
    return "SELECT r.run_uuid FROM runs r WHERE " + " AND ".join(conditions), params


# --- reading ---------------------------------------------------------------------------------


def resolve_uri(uri: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI (without importing mlflow), else MLflow's
    default."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking.resolve_uri(None)


def mlflow_run_experiment() -> str | None:
    """Name of the experiment `mlflow run` runs this process in (MLFLOW_EXPERIMENT_ID), or
    None outside `mlflow run` or when the server cannot say."""
    exp_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if not exp_id:
        return None
    try:
        with tracking.fast_http():
            return tracking.client_for(resolve_uri(None)).get_experiment(exp_id).name
    except Exception:  # noqa: BLE001 - then the default experiment; the read names any failure
        return None


def is_database(uri: str) -> bool:
    """A database store (`sqlite:///…`, `postgresql+psycopg2://…`) rather than a server."""
    return uri.split(":", 1)[0].split("+", 1)[0] in DATABASE_SCHEMES


@contextmanager
def reader(tracking_uri: str | None = None) -> Iterator[MlflowReader | SqlReader]:
    """The reader for --tracking-uri / MLFLOW_TRACKING_URI; any store failure becomes a
    one-line `tracking.TrackingError`. Never creates a store: a missing SQLite file is
    NotFound."""
    uri = resolve_uri(tracking_uri)
    path = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
    if path is not None and not Path(path).exists():
        raise NotFound(f"no MLflow store at {path}: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    try:
        with read_timeout(), tracking.fast_http():
            yield _open(uri)
    except (NotFound, tracking.TrackingError):
        raise
    except Exception as exc:  # noqa: BLE001 - one line for the CLI, secrets redacted
        raise tracking.TrackingError(tracking.describe_failure(exc, uri)) from None


@contextmanager
def read_timeout() -> Iterator[None]:
    """A per-request HTTP timeout long enough for a search page of a big experiment (unless
    the user set one): fast_http's few seconds suit logging, not a 1,000-run page from a
    loaded `mlflow server` (BENCHMARKS.md, "Figures the code cites"). A dead server still
    fails at once (refused)."""
    added = READ_TIMEOUT_ENV not in os.environ
    os.environ.setdefault(READ_TIMEOUT_ENV, READ_TIMEOUT_S)
    try:
        yield
    finally:
        if added:
            os.environ.pop(READ_TIMEOUT_ENV, None)


def _open(uri: str) -> MlflowReader | SqlReader:
    if is_database(uri):
        from sqlalchemy import create_engine

        return SqlReader(create_engine(uri), uri)
    return MlflowReader(tracking.client_for(uri), uri)


def scope(r: MlflowReader | SqlReader, experiment: str, sel: Selection) -> Scope:
    """The experiments, clauses and label of a selection's config runs."""
    if sel.sweep not in SWEEPS:
        run = r.run(sel.sweep)
        if run is None:
            raise NotFound(
                f"no such run '{sel.sweep}' (that you may read) at {tracking.redact(r.uri)}: "
                "pass a sweep run id, latest or all"
            )
        if run.kind != "sweep":
            raise NotFound(f"run '{sel.sweep}' is not a sweep run (flexbench.kind={run.kind})")
        label = f"sweep run {run.run_id} ({run.name})"
        # Its config runs carry its part id, also a tune's candidates (children of tune runs).
        mine = tag_is(PART_TAG, run.part_id) if run.part_id else tag_is(PARENT_TAG, run.run_id)
        return Scope([run.experiment_id], [mine], label)
    exp_id = r.experiment(experiment)
    if exp_id is None:
        raise NotFound(
            f"no experiment '{experiment}' at {tracking.redact(r.uri)}: run `flexbench run` "
            "first, or pass --experiment / --tracking-uri"
        )
    if sel.sweep_id:
        label = f"sweep id {sel.sweep_id}"
        return Scope([exp_id], [tag_is(SWEEP_ID_TAG, sel.sweep_id)], label)
    if sel.sweep == "all":
        return Scope([exp_id], [], f"all sweeps of experiment '{experiment}'")
    sweep_id = r.latest_sweep_id(exp_id)
    if sweep_id is None:
        raise NotFound(f"no sweep runs in experiment '{experiment}': run `flexbench run` first")
    return Scope([exp_id], [tag_is(SWEEP_ID_TAG, sweep_id)], f"latest sweep {sweep_id}")


def read(
    sel: Selection,
    tracking_uri: str | None = None,
    experiment: str = "flexbench",
    metrics: Sequence[str] | None = None,
) -> tuple[list[dict], str]:
    """The selection's config runs as rows (in the order they ran) and a label; `metrics`
    (SQL LIKE patterns) may leave out metrics the caller does not need.

    ValueError for a bad selection; NotFound when nothing matches; tracking.TrackingError when
    the store fails.
    """
    where = sel.clauses()
    with reader(tracking_uri) as r:
        s = scope(r, experiment, sel)
        clauses = [tag_is(KIND_TAG, "config"), *s.clauses, *where]
        rows = r.rows(s.experiment_ids, clauses, None, metrics)
    narrowed = f" where {', '.join(sel.where)}" if sel.where else ""
    if not rows:
        raise NotFound(f"no config runs in {s.label}{narrowed}: relax --where or --sweep")
    return sorted(rows, key=lambda row: (row["start_time"], row["run_name"])), s.label + narrowed


def read_recent(
    tracking_uri: str | None,
    experiment_id: str,
    sweeps: int,
    metrics: Sequence[str] | None = None,
) -> list[dict]:
    """Config runs started since the experiment's `sweeps`-th latest sweep run began, in the
    order they ran; [] without sweep runs. One read, cheap on a big experiment behind a server
    where reading every run is not."""
    with reader(tracking_uri) as r:
        latest = r.latest_sweeps(experiment_id, sweeps)
        if not latest:
            return []
        since = min(start for _, start in latest)
        rows = r.rows([experiment_id], [tag_is(KIND_TAG, "config")], since, metrics)
    return sorted(rows, key=lambda row: (row["start_time"], row["run_name"]))
