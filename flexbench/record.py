"""`RunRecord`: one config run, typed, from measurement to report.

Built from a measured `measure.Result` (`from_result`), from a journal `result` entry
(`from_journal`) or from a run read back from MLflow (`from_mlflow`); written to the journal
with `to_journal` and shown through `to_row`, the one flat form that report, summary, compare,
history and report.html read. A record read from the journal and the same run read back from
MLflow give equal rows: params are kept as logged (strings) and `to_row` alone converts them.
Imports neither torch nor mlflow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from flexbench import schema

CONFIG = "config"  # flexbench.kind of a measured config (tune's skipped candidates: skipped)


@dataclass(frozen=True)
class RunRecord:
    """A config run: what was measured (params, metrics, status, error, tags) and where it
    belongs (sweep, part, record id; run ids once logged). `tags` are the run's own tags
    (environment, kernels, tune, repro; read back from MLflow: all of its tags, in MLflow's
    order): `logged_tags` adds the bookkeeping ones."""

    config_key: str
    run_name: str
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    status: str = "FINISHED"
    error: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    kind: str = CONFIG
    record_id: str = ""
    sweep_id: str = ""
    part_id: str = ""
    experiment: str = ""
    start_ms: int = 0
    end_ms: int = 0
    run_id: str = ""
    sweep_run_id: str = ""  # the parent run (a tune run for tune's candidates)

    def __post_init__(self) -> None:
        object.__setattr__(self, "error", self.error or "")

    @property
    def ok(self) -> bool:
        return self.status == "FINISHED"

    @classmethod
    def from_result(cls, result: object) -> RunRecord:
        """A measured `measure.Result` (no torch types kept); bookkeeping left empty."""
        config = result.config  # type: ignore[attr-defined]
        params = config.params()
        if result.baseline:  # type: ignore[attr-defined]
            params["baseline"] = result.baseline  # type: ignore[attr-defined]
        return cls(
            config_key=config.config_key(),
            run_name=config.run_name(),
            params=params,
            metrics=dict(result.metrics),  # type: ignore[attr-defined]
            status="FINISHED" if result.ok else "FAILED",  # type: ignore[attr-defined]
            error=result.error or "",  # type: ignore[attr-defined]
            tags=dict(result.tags),  # type: ignore[attr-defined]
        )

    @classmethod
    def from_journal(cls, entry: Mapping) -> RunRecord:
        """A journal `result` entry (any version `tracking.decode` accepts)."""
        return cls(
            config_key=entry["config_key"],
            run_name=entry["run_name"],
            params=dict(entry["params"]),
            metrics=dict(entry["metrics"]),
            status=entry["status"],
            error=entry.get("error") or "",
            tags=dict(entry.get("tags", {})),
            kind=entry.get("kind", CONFIG),
            record_id=entry.get("record_id", ""),
            sweep_id=entry.get("sweep_id", ""),
            part_id=entry.get("part_id", ""),
            experiment=entry.get("experiment", ""),
            start_ms=int(entry.get("start_ms") or 0),
            end_ms=int(entry.get("end_ms") or 0),
            run_id=entry.get("run_id") or "",
        )

    @classmethod
    def from_mlflow(
        cls, info: Mapping, tags: Mapping[str, str], params: Mapping, metrics: Mapping
    ) -> RunRecord:
        """A run read back from MLflow: `info` has run_id, run_name, status, start_time."""
        return cls(
            config_key=tags.get(schema.CONFIG_KEY_TAG, ""),
            run_name=info["run_name"],
            params=dict(params),
            metrics=dict(metrics),
            status=info["status"],
            error=tags.get(schema.ERROR_TAG, ""),
            tags=dict(tags),
            kind=tags.get(schema.KIND_TAG, CONFIG),
            record_id=tags.get(schema.RECORD_ID_TAG, ""),
            sweep_id=tags.get(schema.SWEEP_ID_TAG, ""),
            part_id=tags.get(schema.PART_TAG, ""),
            start_ms=int(info["start_time"] or 0),
            run_id=info["run_id"],
            sweep_run_id=tags.get(schema.PARENT_TAG, ""),
        )

    def with_run(self, **changes: object) -> RunRecord:
        """A copy with fields changed (e.g. the run id once logged)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def logged_tags(self) -> dict[str, str]:
        """Every tag of the run but its parent: own tags, then sweep, part, config key, record
        id, kind and the error of a failed config (each where it has one)."""
        own = {
            schema.SWEEP_ID_TAG: self.sweep_id,
            schema.PART_TAG: self.part_id,
            schema.CONFIG_KEY_TAG: self.config_key,
            schema.RECORD_ID_TAG: self.record_id,  # none on a tune run
            schema.KIND_TAG: self.kind,
            schema.ERROR_TAG: self.error,
        }
        return {**self.tags, **{k: v for k, v in own.items() if v}}

    def to_row(self) -> dict:
        """The flat row: tags (not MLflow's own), params (whole numbers as int), metrics,
        run_name, status, error, run and sweep run ids, start time (ms)."""
        tags = self.logged_tags()
        if self.sweep_run_id:
            tags[schema.PARENT_TAG] = self.sweep_run_id
        return {
            **{k: v for k, v in tags.items() if not k.startswith(schema.MLFLOW_PREFIX)},
            **{k: number(v) for k, v in self.params.items()},
            **self.metrics,
            "run_name": self.run_name,
            "status": self.status,
            "error": self.error,
            "run_id": self.run_id,
            "sweep_run_id": self.sweep_run_id,
            "start_time": self.start_ms,
        }

    def to_journal(self) -> dict:
        """The journal's `result` entry (`tracking.encode` adds version and checksum)."""
        entry = {
            "type": "result",
            "record_id": self.record_id,
            "sweep_id": self.sweep_id,
            "part_id": self.part_id,
            "experiment": self.experiment,
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "config_key": self.config_key,
            "run_name": self.run_name,
            "params": dict(self.params),
            "metrics": dict(self.metrics),
            "status": self.status,
            "error": self.error or None,
            "tags": dict(self.tags),
        }
        if self.kind != CONFIG:
            entry["kind"] = self.kind
        return entry


def number(value: object) -> object:
    """A param as a row value: a whole number (as MLflow params are strings: '8') as int."""
    return int(value) if isinstance(value, str) and value.isdigit() else value


def rows(records: list[RunRecord]) -> list[dict]:
    """`to_row` of each record."""
    return [r.to_row() for r in records]
