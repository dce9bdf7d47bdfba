"""The `flexbench run` command that measures one config alone (tag `flexbench.repro`).

Built from every field of the config, so the command's config has the same config key: run
with `--resume` against the same store, it skips the config as already measured. Tracking
settings (URI, credentials) are never part of it; the experiment is, when not the default.
"""

from __future__ import annotations

import shlex
from dataclasses import fields

from flexbench import query
from flexbench.config import KEY_DEFAULTS, BenchConfig
from flexbench.schema import REPRO_TAG

DEFAULT_EXPERIMENT = "flexbench"
# BenchConfig field -> `flexbench run` option; a field not listed is spelled --field-name.
FLAGS = {
    "batch": "-b",
    "heads": "-nh",
    "q_len": "-s",
    "head_dim": "-d",
    "score_mod": "-mods",
    "dtype": "-dtype",
    "baselines": "--baseline",
    "flex_backend": "--flex-backend",
}
PERCENT = ("max_noise", "throttle_threshold")  # fractions in the config, percent on the CLI


def option(name: str, value: object) -> list[str]:
    """One field as command-line words: a true boolean is a bare flag, a false one, an empty
    value and regime `none` (what CPU resolves to) are left out (the defaults), a list is
    comma-joined, fractions the CLI takes in percent are spelled in percent."""
    flag = FLAGS.get(name, "--" + name.replace("_", "-"))
    if isinstance(value, bool):
        return [flag] if value else []
    if isinstance(value, (list, tuple)):  # e.g. several baselines: a comma list, as typed
        value = ",".join(str(v) for v in value)
    if name in PERCENT:
        return [flag, f"{value * 100:g}"]
    return [] if value in ("", None, "none") else [flag, str(value)]


def command(config: BenchConfig, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """`flexbench run ...` measuring exactly `config` (every field spelled out)."""
    words = ["flexbench", "run"]
    for f in fields(config):
        value = getattr(config, f.name)
        if KEY_DEFAULTS.get(f.name, ...) != value:  # a later field at its default: left out
            words += option(f.name, value)
    if experiment != DEFAULT_EXPERIMENT:
        words += ["--experiment", experiment]
    return shlex.join(words)


def lookup(run_id: str, tracking_uri: str | None = None) -> str:
    """The repro command tagged on a config run; query.NotFound when the run or its tag is
    missing, tracking.TrackingError when the store fails."""
    with query.reader(tracking_uri) as r:
        if r.run(run_id) is None:
            raise query.NotFound(
                f"no run '{run_id}': pass a config run id (flexbench summary "
                "--format json lists them)"
            )
        value = r.tag(run_id, REPRO_TAG)
    if not value:
        raise query.NotFound(
            f"run '{run_id}' has no {REPRO_TAG} tag: pass a config run id (not a sweep run) "
            "logged by flexbench run"
        )
    return value
