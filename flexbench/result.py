"""`Result`: one measured config as the measuring loop returns it, and its JSON form for a pipe
between processes (the measuring process sends each one to the process that tracks it).

Imports no torch: a process that only logs results never loads it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from flexbench.config import BenchConfig


@dataclass
class Result:
    """One config's outcome: contract metrics, or a one-line error."""

    config: BenchConfig
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    baseline: str = ""
    phases: dict[str, float] = field(default_factory=dict)  # seconds per sweep phase, not logged
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


def to_wire(result: Result) -> dict:
    """A Result as JSON: the config's every field (`BenchConfig(**fields)` builds it again)."""
    return {**asdict(result), "config": asdict(result.config)}


def from_wire(data: dict) -> Result:
    """The Result `to_wire` wrote."""
    return Result(**{**data, "config": BenchConfig(**data["config"])})
