"""The MLflow names flexbench writes and reads: tags, param keys, metric names.

The one place that spells them (DESIGN.md, "The MLflow contract": users' dashboards depend on
them, so they never change). Imports neither torch nor mlflow; the param keys are derived from
`config.BenchConfig`, so a new config field is a param, a --where key and part of a config's
identity (compare, history) without editing a list here.
"""

from __future__ import annotations

import functools
from dataclasses import fields

from flexbench.config import SETTINGS, BenchConfig

# --- tags ------------------------------------------------------------------------------------

SWEEP_ID_TAG = "flexbench.sweep_id"
CONFIG_KEY_TAG = "flexbench.config_key"
RECORD_ID_TAG = "flexbench.record_id"
PART_TAG = "flexbench.part_id"  # one per process: shards of a sweep share sweep_id, not part_id
KIND_TAG = "flexbench.kind"  # sweep, config, tune, skipped
ERROR_TAG = "flexbench.error"
COMMAND_TAG = "flexbench.command"  # tune on a tune sweep run
REPRO_TAG = "flexbench.repro"  # the `flexbench run` command of one config
CLOSED_TAG = "flexbench.closed_reason"  # on a run a failed `mlflow run` left RUNNING
KERNELS_TAG = "flexbench.{}_kernels"  # flex, or a baseline's name
INEXACT_TAG = "flexbench.baseline_inexact"
BASELINE_SKIPPED_TAG = "flexbench.baseline_skipped"
# flexbench tune
TUNE_KEY_TAG = "flexbench.tune_key"  # the tuned config's key: its candidates share it
TUNE_CONFIG_TAG = "flexbench.tune_config"  # the tuned config's run name
CANDIDATE_TAG = "flexbench.candidate"  # default, max-autotune, or e.g. BLOCK_M=64 BLOCK_N=64
BEST_TAG = "flexbench.best"  # "true" on the fastest passing candidate of a config
SKIPPED_TAG = "flexbench.skipped"  # why a candidate was not measured (its run is KILLED)
BEST_CANDIDATE_TAG = "flexbench.best_candidate"  # on a tune run
BEST_RUN_ID_TAG = "flexbench.best_run_id"  # on a tune run
DEFAULT_CANDIDATE = "default"
# MLflow's own
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
SOURCE_NAME_TAG = "mlflow.source.name"
SOURCE_TYPE_TAG = "mlflow.source.type"
USER_TAG = "mlflow.user"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
OWN_PREFIX, MLFLOW_PREFIX = "flexbench.", "mlflow."
KINDS_OF_RUN = ("sweep", "config", "tune", "skipped")  # values of flexbench.kind

# --- metrics ---------------------------------------------------------------------------------

KINDS = ("fwd", "bwd")
FLEX = "compiled"  # flex's series in the seed's metric names (fwd_compiled_us)
PRIMARY = "eager"  # the first baseline's series in the seed's metric names (fwd_eager_us)
TIMINGS = tuple(f"{kind}_{side}_us" for kind in KINDS for side in (PRIMARY, FLEX))


def timing(kind: str, series: str) -> str:
    """A series' median µs: `fwd_compiled_us`, `bwd_sdpa_us`."""
    return f"{kind}_{series}_us"


def speedup(kind: str, baseline: str = "") -> str:
    """`fwd_speedup` (the first baseline's), or `fwd_speedup_<baseline>`."""
    return f"{kind}_speedup_{baseline}" if baseline else f"{kind}_speedup"


def kernels_tag(side: str) -> str:
    """The tag naming the kernels a side ran: `flexbench.flex_kernels`."""
    return KERNELS_TAG.format(side)


# --- params ----------------------------------------------------------------------------------

SHAPE_PARAM = "shape"  # B,H,S,D: holds batch, heads, q_len and head_dim
IN_SHAPE = ("batch", "heads", "q_len", "head_dim")
OPTIONS_PREFIX = "ko_"  # a kernel option's param: ko_BLOCK_M (the field kernel_options)
EXTRA_PARAMS = ("mod_sha", "baseline")  # logged where they apply: a user mod's hash, a Result's
# BenchConfig fields that are not part of a config's identity across sweeps and stacks (compare,
# history): how it is timed or checked, which baselines ran (matched by name), the flex backend,
# the kernel options and align (match_key adds those two itself). A field not named here is.
NOT_IDENTITY = (
    *IN_SHAPE,
    "calculate_bwd",  # fwd compares either way
    "regime",  # compare calls pairs of other regimes not comparable instead
    *SETTINGS,  # the stopping rule and sampling: how long to sample, not what is measured
    "baselines",
    "flex_backend",
    "reference",
    "kernel_options",
    "align",
)
# Identity params that the tables show as their own columns (the rest show when they vary).
TABLE_IDENTITY = ("shape", "kv_heads", "kv_len", "score_mod", "dtype")
# Config params the tables never show as a column (how a config was timed, not what ran).
NOT_SHOWN = tuple(k for k in NOT_IDENTITY if k != "regime")
ENV_SHOWN = ("gpu", "torch", "triton", "cuda")  # environment tags the tables show when they vary


@functools.cache
def config_params() -> tuple[str, ...]:
    """The child-run params a BenchConfig logs (`BenchConfig.params()`): `shape`, then one per
    field in field order, but kernel options (logged as `ko_*`)."""
    names = (f.name for f in fields(BenchConfig) if f.name != "kernel_options")
    return (SHAPE_PARAM, *names)


@functools.cache
def param_keys() -> tuple[str, ...]:
    """Every param key of a config run but kernel options (`ko_*`): --where keys."""
    return (*config_params(), *(k for k in EXTRA_PARAMS if k not in config_params()))


@functools.cache
def bool_params() -> tuple[str, ...]:
    """Params of bool fields, logged lower-case (`true`)."""
    return tuple(f.name for f in fields(BenchConfig) if f.type in ("bool", bool))


@functools.cache
def identity_params() -> tuple[str, ...]:
    """A config's identity across sweeps and software stacks: what was measured and how, not
    on which torch/GPU (`report.match_key` adds mod hash, align and kernel options)."""
    return tuple(k for k in config_params() if k not in NOT_IDENTITY)


@functools.cache
def varying_columns() -> tuple[str, ...]:
    """Columns a table shows only when they differ between rows: the baseline's form, config
    options outside the identity columns, the regime, and the software stack."""
    shown = [k for k in config_params() if k not in (*TABLE_IDENTITY, *NOT_SHOWN)]
    return ("baseline", *shown, *ENV_SHOWN)
