"""The measuring process: a sweep measured in a child process while this one tracks it.

Tiny CPU sweeps of built-in mods with the child forced on: the same records as in-process, a
child killed mid-sweep keeps what it sent (one-line problem, exit 1), Ctrl-C to the CLI's
process group ends the sweep run KILLED with no process left, a device that cannot run gives
today's one-line error, and the parent never imports torch. Then `device="auto"` resolved
without torch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flexbench import measuring, spec, sweep
from flexbench.record import RunRecord
from flexbench.spec import SweepSpec
from flexbench.tracking_settings import TrackingSettings
from tests.test_precompile import children_of
from tests.test_tracking import children, tiny

REPO = Path(__file__).resolve().parents[1]
TINY = "run -b 1 -nh 2 -s 128 -d 16 -dtype float32 --quiet".split()


def settings(where: Path, name: str) -> TrackingSettings:
    return TrackingSettings(name, f"sqlite:///{where}/mlflow.db", str(where / "journal.jsonl"))


def measuring_children(parent: int) -> list[int]:
    return children_of(parent, "flexbench.measuring")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def journal_results(path: Path) -> list[dict]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e["type"] == "result"]


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), measuring.ENV: "1", **extra}


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The same two configs tracked in a child process and in this one."""
    out = {}
    for isolate in (True, False):
        where = tmp_path_factory.mktemp(f"isolate-{isolate}")
        out[isolate] = sweep.measure_and_track(
            tiny("noop", "causal"), settings(where, "m"), progress=False, isolate=isolate
        )
    return out


def _shape(record: RunRecord) -> tuple:
    tags = sorted(k for k in record.tags if k != "flexbench.repro")
    return record.config_key, record.status, dict(record.params), sorted(record.metrics), tags


def test_a_child_process_sweep_gives_the_records_of_an_in_process_one(both):
    child, here = both[True], both[False]
    assert [_shape(r) for r in child.records] == [_shape(r) for r in here.records]
    assert [r.status for r in child.records] == ["FINISHED", "FINISHED"]
    assert child.exit_code == 0 and not child.problems
    assert child.phases.keys() == here.phases.keys() and child.phases["phase_compile_s"] > 0
    run = MlflowClient(f"sqlite:///{Path(child.journal).parent}/mlflow.db").get_run(child.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["configs_total"] == 2


def test_a_child_killed_mid_sweep_keeps_the_results_it_sent(tmp_path):
    def kill_child(record: RunRecord) -> None:
        for pid in measuring_children(os.getpid()):
            os.kill(pid, signal.SIGKILL)

    track = settings(tmp_path, "died")
    out = sweep.measure_and_track(
        tiny("noop", "causal", "rel"), track, progress=False, isolate=True, on_result=kill_child
    )
    assert len(out.records) == 1 and out.exit_code == 1 and not out.interrupted
    assert out.problems == [
        "measuring process died (killed by SIGKILL) after 1 of 3 configs; measure the rest "
        f"with `{sweep.resume_command(None, out.sweep_id)}`"
    ]
    assert [e["config_key"] for e in journal_results(tmp_path / "journal.jsonl")] == [
        out.records[0].config_key
    ]
    client = MlflowClient(track.tracking_uri)
    assert len(children(client, out.run_id)) == 1
    assert measuring_children(os.getpid()) == []


def test_ctrl_c_ends_the_sweep_run_killed_and_leaves_no_process(tmp_path):
    uri, journal = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "journal.jsonl"
    args = [
        *TINY,
        "--device",
        "cpu",
        "-mods",
        "noop,causal,rel",
        "--tracking-uri",
        uri,
        "--journal",
        str(journal),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "flexbench", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        cwd=tmp_path,
        start_new_session=True,  # a process group of its own, as a terminal's job is
    )
    deadline, seen = time.monotonic() + 180, set()
    while not journal_results(journal) and time.monotonic() < deadline and proc.poll() is None:
        seen.update(measuring_children(proc.pid))
        time.sleep(0.1)
    assert seen and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole group, parent and child
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "stopped by SIGINT after" in err and "KILLED" in err
    kept = journal_results(journal)
    assert 1 <= len(kept) < 3
    client = MlflowClient(uri)
    sweep_run = client.search_runs(
        [client.get_experiment_by_name("flexbench").experiment_id],
        "tags.`flexbench.kind` = 'sweep'",
    )[0]
    assert sweep_run.info.status == "KILLED"
    assert len(children(client, sweep_run.info.run_id)) == len(kept)
    assert not any(alive(pid) for pid in seen)


@pytest.mark.parametrize("isolate", [True, False])
def test_a_device_that_cannot_run_is_the_same_one_line_error(isolate, tmp_path):
    cuda = SweepSpec([1], [2], [128], [16], ["noop"], ["float32"], device="cuda")
    with pytest.raises(RuntimeError) as err:
        sweep.run(cuda, settings(tmp_path, "nocuda"), isolate=isolate, warn=lambda m: None)
    assert str(err.value) == "CUDA is not available on this machine; use --device cpu"
    assert journal_results(tmp_path / "journal.jsonl") == []
    assert measuring_children(os.getpid()) == []


def test_the_cli_says_so_in_one_line(tmp_path):
    args = [*TINY, "--device", "cuda", "-mods", "noop"]
    args += ["--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    done = subprocess.run(
        [sys.executable, "-m", "flexbench", *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "Error: CUDA is not available on this machine; use --device cpu"
    ]


PROBE = """
import atexit, sys
atexit.register(lambda: print("torch" in sys.modules, "mlflow" in sys.modules, file=sys.stderr))
from flexbench.cli import main
main(sys.argv[1:])
"""


def test_the_parent_of_a_child_process_sweep_never_imports_torch(tmp_path):
    args = [*TINY, "--device", "cpu", "-mods", "noop"]
    args += ["--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "False True"  # no torch; MLflow yes


# --- when, and device "auto" ----------------------------------------------------------------


def test_the_environment_variable_forces_it_and_the_api_overrides_it(monkeypatch):
    monkeypatch.delenv(measuring.ENV, raising=False)
    assert measuring.wanted(None, "cuda") and not measuring.wanted(None, "cpu")
    monkeypatch.setenv(measuring.ENV, "0")
    assert not measuring.wanted(None, "cuda") and measuring.wanted(True, "cpu")
    monkeypatch.setenv(measuring.ENV, "1")
    assert measuring.wanted(None, "cpu") and not measuring.wanted(False, "cuda")


@pytest.mark.parametrize("name", [measuring.ENV, "FLEXBENCH_COMPILE_AHEAD"])
def test_a_switch_set_to_neither_1_nor_0_is_a_one_line_usage_error(name, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "flexbench", *TINY, "--device", "cpu"],
        env={**cli_env(), name: "yes"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{name} must be 1 (on) or 0 (off), got 'yes'" in lines[0]
    assert not (tmp_path / ".flexbench").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("build", "count", "visible", "want"),
    [
        (True, 1, None, True),  # a CUDA build and a GPU: cuda, torch not imported
        (True, 0, None, False),
        (False, 1, None, False),  # a CPU wheel on a GPU host: torch decides (cpu)
        (True, 1, "", False),  # CUDA_VISIBLE_DEVICES hides every GPU
        (True, 1, "-1", False),
    ],
)
def test_cuda_here_without_torch(build, count, visible, want, monkeypatch):
    monkeypatch.setattr(spec, "cuda_build", lambda: build)
    monkeypatch.setattr(spec.gpustate, "device_count", lambda: count)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert spec.cuda_here() is want
    assert spec.resolve_device("auto") == ("cuda" if want else "cpu")  # this machine: no CUDA


def test_nvml_missing_falls_back_to_the_device_file(monkeypatch):
    monkeypatch.setattr(spec, "cuda_build", lambda: True)
    monkeypatch.setattr(spec.gpustate, "device_count", lambda: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert spec.cuda_here() is Path("/dev/nvidia0").exists()


def test_this_torch_is_seen_as_the_build_it_is():
    import torch

    assert spec.cuda_build() is (torch.version.cuda is not None)


def _messages(child: measuring.Child) -> list[dict]:
    out = []
    while (message := child._next()) is not None:
        out.append(message)
    return out


def test_a_gated_job_is_compiled_but_nothing_is_checked_or_timed_before_go():
    """The job goes out before the parent connects; end-of-file instead of `go` (the parent
    gave up) stops the child after its first compile, with no result."""
    configs = tiny("noop", "causal")
    with measuring.Child.start("cpu", False) as child:
        child.hello()
        child.send_job(configs, gated=True)
        time.sleep(0.5)
        child.proc.stdin.close()  # what the parent's exit does, without `go`
        messages = _messages(child)
        assert child.proc.wait(60) == 0
    assert {"start": 0} in messages
    assert not [m for m in messages if "result" in m]
    assert messages[-1] == {"done": {"interrupted": "SIGTERM"}}


def test_go_after_a_gated_job_measures_every_config():
    configs, got = tiny("noop", "causal"), []
    with measuring.Child.start("cpu", False) as child:
        child.hello()
        child.send_job(configs, gated=True)
        ending = child.measure(configs, got.append, progress=False)
    assert ending == measuring.Ending() and [r.config for r in got] == configs
    assert all(r.error is None and "wait" in r.phases for r in got[:1])


def test_a_gate_is_passed_once_before_the_first_check(monkeypatch):
    """In the loop itself: the gate runs after config 1's compile and before any result; a
    gate that stops the sweep leaves nothing measured."""
    from flexbench import measure, pipeline

    order = []
    checks = []
    real_check = measure.check
    monkeypatch.setattr(measure, "check", lambda *a: checks.append(1) or real_check(*a))

    def gate() -> None:
        order.append(("gate", len(checks)))

    results = pipeline.measure_configs(
        tiny("noop", "causal"),
        lambda r: order.append(("result", len(checks))),
        progress=False,
        gate=gate,
    )
    assert [r.error for r in results] == [None, None]
    assert order[0] == ("gate", 0) and [o[0] for o in order] == ["gate", "result", "result"]

    def stop() -> None:
        raise pipeline.Stopped()

    checks.clear()
    with pytest.raises(pipeline.Stopped):
        pipeline.measure_configs(tiny("noop"), order.append, progress=False, gate=stop)
    assert checks == []



def test_a_failed_connect_stops_the_measuring_process_with_nothing_measured(
    tmp_path, monkeypatch
):
    """The job went out before connecting; connecting then fails: the error is raised as
    before, no result was journalled, and no measuring process is left."""

    def refuse(self) -> bool:
        raise RuntimeError("no tracking server")

    monkeypatch.setattr(sweep.tracking.Tracker, "connect", refuse)
    with pytest.raises(RuntimeError, match="no tracking server"):
        sweep.measure_and_track(
            tiny("noop", "causal"), settings(tmp_path, "refused"), progress=False, isolate=True
        )
    assert journal_results(tmp_path / "journal.jsonl") == []
    assert measuring_children(os.getpid()) == []
