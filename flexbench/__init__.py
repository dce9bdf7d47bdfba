"""flexbench from Python: the functions the CLI's commands call, and their options objects.

    import flexbench
    spec = flexbench.SweepSpec([1], [4], [256], [64], ["causal"], ["float32"], device="cpu")
    out = flexbench.run(spec, flexbench.TrackingSettings(tracking_uri="sqlite:///runs.db"))

Names load on first use, so `import flexbench` imports neither torch nor MLflow. The
`tune`, `summary`, `compare` and `history` commands are `run_tune`, `summarize`,
`compare_runs` and `read_history` here: `flexbench.tune`, `flexbench.summary`, ... are the
modules (importing a submodule sets that attribute of the package).
"""

from __future__ import annotations

from importlib import import_module

# public name -> (module, attribute)
EXPORTS = {
    "run": ("flexbench.sweep", "run"),
    "run_tune": ("flexbench.tune", "run"),
    "summarize": ("flexbench.summary", "summary"),
    "compare_runs": ("flexbench.compare", "compare"),
    "read_history": ("flexbench.history", "history"),
    "SweepSpec": ("flexbench.spec", "SweepSpec"),
    "TrackingSettings": ("flexbench.tracking_settings", "TrackingSettings"),
    "BenchConfig": ("flexbench.config", "BenchConfig"),
    "Selection": ("flexbench.query", "Selection"),
    "RunRecord": ("flexbench.record", "RunRecord"),  # a config run: Outcome.records
}
__all__ = list(EXPORTS)


def __getattr__(name: str) -> object:
    if name not in EXPORTS:
        raise AttributeError(f"module 'flexbench' has no attribute {name!r}")
    module, attr = EXPORTS[name]
    value = getattr(import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *EXPORTS])
