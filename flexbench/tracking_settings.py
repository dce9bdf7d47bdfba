"""Where and how a sweep is tracked: the options object `run` and `tune` take (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from flexbench.patience import DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class TrackingSettings:
    """The MLflow side of a sweep.

    `tracking_uri` None: $MLFLOW_TRACKING_URI, else MLflow's default (./mlflow.db);
    `journal` None: $FLEXBENCH_JOURNAL, else .flexbench/journal.jsonl; `resume`: skip configs
    already FINISHED on this stack; `sweep_id` None: a new id (give every shard the same one);
    `tracking_timeout`: seconds one tracking step waits on a busy server.
    """

    experiment: str = "flexbench"
    tracking_uri: str | None = None
    journal: str | None = None
    resume: bool = False
    sweep_id: str | None = None
    run_name: str | None = None
    tracking_timeout: float = DEFAULT_TIMEOUT_S

    @classmethod
    def take(cls, options: dict) -> TrackingSettings:
        """The settings among `options` (e.g. a command's flags), removed from it."""
        return cls(**{f.name: options.pop(f.name) for f in fields(cls) if f.name in options})
