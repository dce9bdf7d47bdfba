"""Runs that `mlflow run` left RUNNING before flexbench ever started, and closing them.

`mlflow run .` creates its run first and builds the project's environment after; when that fails
(no conda: "Could not find Conda executable"), MLflow exits and the run stays RUNNING forever.
The next flexbench command that opens the experiment closes such a run as FAILED, with a tag
saying why, but only when no process on this host can still own it: no process carrying its
MLFLOW_RUN_ID, and no `mlflow run` started before it that runs no entry point yet (it may still
be building its environment; one whose entry point runs owns that run). Runs flexbench has
started (tag flexbench.kind) are never touched here, nor runs of another user or of a project
path this host does not have. Linux only (/proc); elsewhere nothing is closed.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from flexbench.mlflow_search import quote, search_all
from flexbench.schema import CLOSED_TAG, KIND_TAG, SOURCE_NAME_TAG, SOURCE_TYPE_TAG, USER_TAG

REASON = (
    "left RUNNING by `mlflow run`, whose process ended before flexbench started (e.g. "
    "'Could not find Conda executable': add --env-manager local); closed by flexbench"
)
STARTED_SLACK_S = 1.0  # /proc start times are whole seconds after boot: allow one
ANCESTORS = 8  # levels from an entry point's process up to its `mlflow run` (bash, python)
PROC = Path("/proc")
LEFT = (
    f"attributes.status = 'RUNNING' and tags.`{SOURCE_TYPE_TAG}` = 'PROJECT' "
    f"and tags.`{USER_TAG}` = {{user}}"
)


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    argv: list[str]
    env: dict[str, str]
    started: float  # seconds since the epoch


def close_leftovers(client, exp_id: str, own_run_id: str = "") -> list[str]:
    """Close (FAILED, tag `flexbench.closed_reason`) every run of the experiment that a failed
    `mlflow run` left RUNNING; returns their run ids."""
    if not PROC.is_dir():
        return []
    query = LEFT.format(user=quote(getpass.getuser()))
    left = [
        r
        for r in search_all(client, [exp_id], query)
        if KIND_TAG not in r.data.tags and r.info.run_id != own_run_id and _from_here(r)
    ]
    if not left:
        return []
    processes = list(_processes())
    owning = _owning_mlflow_runs(processes)
    closed = []
    for run in left:
        if not any(_may_own(p, run, owning) for p in processes):
            client.set_tag(run.info.run_id, CLOSED_TAG, REASON)
            client.set_terminated(run.info.run_id, "FAILED")
            closed.append(run.info.run_id)
    return closed


def _from_here(run) -> bool:
    """The run's project is a directory on this host (`mlflow.source.name` file:// or path)."""
    source = run.data.tags.get(SOURCE_NAME_TAG, "")
    path = urlparse(source).path if source.startswith("file:") else source
    return bool(path) and Path(path.split("#")[0]).exists()


def _processes() -> Iterator[Process]:
    """Each process this user may read (not this one)."""
    boot = _boot_time()
    ticks = os.sysconf("SC_CLK_TCK")
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        env = dict(v.decode(errors="replace").partition("=")[::2] for v in environ if v)
        args = [a.decode(errors="replace") for a in argv if a]
        yield Process(int(entry.name), int(stat[1]), args, env, boot + int(stat[19]) / ticks)


def _owning_mlflow_runs(processes: list[Process]) -> set[int]:
    """`mlflow run` processes already running an entry point: an ancestor of a process with
    MLFLOW_RUN_ID. Such a process owns that run, not a run left behind."""
    parent = {p.pid: p.ppid for p in processes}
    starts = [p.ppid for p in processes if "MLFLOW_RUN_ID" in p.env]
    if "MLFLOW_RUN_ID" in os.environ:  # this process is an entry point too (not in the list)
        starts.append(os.getppid())
    owning = set()
    for pid in starts:
        for _ in range(ANCESTORS):
            owning.add(pid)
            pid = parent.get(pid, 0)
    return owning


def _boot_time() -> float:
    for line in (PROC / "stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


def _may_own(process: Process, run, owning: set[int]) -> bool:
    """The process runs the run's entry point (its MLFLOW_RUN_ID), or is an `mlflow run`
    started before the run that runs no entry point yet (it may be building the environment)."""
    if process.env.get("MLFLOW_RUN_ID") == run.info.run_id:
        return True
    names = [os.path.basename(a) for a in process.argv]
    is_mlflow_run = any(n == "mlflow" and nxt == "run" for n, nxt in zip(names, names[1:]))
    started_before = process.started <= run.info.start_time / 1000 + STARTED_SLACK_S
    return is_mlflow_run and process.pid not in owning and started_before
