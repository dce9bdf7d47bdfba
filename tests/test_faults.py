"""Nothing lost, nothing doubled: the journal and sync against torn writes, garbage and poison
entries, a journal that fails mid-sweep, kill -9, SIGINT and offline -> --resume -> sync.

Real files, a real `mlflow server` (the session's), real signals. Sweeps are 1-2 tiny CPU
configs of `noop`/`causal`, whose compiled callables the rest of the suite shares.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import tempfile
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flexbench import artifacts, sweep, tracking
from flexbench.cli import main
from flexbench.record import RunRecord
from flexbench.tracking_settings import TrackingSettings
from tests.test_tracking import children, dead_uri, runs_of_kind, tiny

TINY = ["--device", "cpu", "-b", "1", "-nh", "2", "-s", "128", "-d", "16", "-dtype", "float32"]
TINY += ["-mods", "noop", "--quiet"]


def config_keys(client: MlflowClient, experiment: str) -> list[str]:
    """The config key of every config run in the experiment (duplicates kept)."""
    return sorted(
        r.data.tags["flexbench.config_key"] for r in runs_of_kind(client, experiment, "config")
    )


def cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """The console entry point in-process: exit code, stdout, stderr."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """One offline sweep of noop: its journal lines (sweep entry, result entry)."""
    where = tmp_path_factory.mktemp("offline")
    out = sweep.measure_and_track(
        tiny("noop"),
        TrackingSettings("faults", dead_uri(), journal=str(where / "j.jsonl")),
        progress=False,
        warn=lambda m: None,
    )
    lines = Path(out.journal).read_bytes().splitlines(keepends=True)
    assert [json.loads(x)["type"] for x in lines][:2] == ["sweep", "result"]
    assert out.exit_code == 1
    return lines[:2]


def another_part(lines: list[bytes], experiment: str, **result: object) -> list[dict]:
    """The offline sweep's entries as a new sweep part in `experiment` (new ids)."""
    sweep_e, result_e = (copy.deepcopy(tracking.decode(x)) for x in lines)
    part, sweep_id = uuid.uuid4().hex, uuid.uuid4().hex[:12]
    sweep_e.update(part_id=part, sweep_id=sweep_id, experiment=experiment)
    result_e.update(
        part_id=part, sweep_id=sweep_id, experiment=experiment, record_id=uuid.uuid4().hex, **result
    )
    return [sweep_e, result_e]


# --- 1. the journal format --------------------------------------------------------------------


def test_torn_last_line_never_swallows_the_next_entry(offline, tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_bytes(offline[0] + offline[1][:57])  # crash / full disk mid-line
    journal = tracking.Journal(path)
    journal.mark_synced("r1", "http://x", "run1")
    entries = journal.entries()
    assert [e["type"] for e in entries] == ["sweep", "synced"]
    assert journal.bad_lines == [2]
    assert entries[1]["v"] == tracking.JOURNAL_VERSION


@pytest.mark.parametrize(
    "garbage",
    [
        b"42",
        b"null",
        b"\xff\xfe not utf-8 \x80",
        b"[1, 2]",
        b'{"type": "result"}',
        b'{"v": 9, "type": "synced"}',
    ],
)
def test_garbage_line_is_skipped_and_named_and_the_rest_syncs(
    offline, garbage, mlflow_server, tmp_path, capsys
):
    experiment = f"garbage-{uuid.uuid4().hex[:6]}"
    entries = another_part(offline, experiment)
    legacy = {k: v for k, v in entries[0].items() if k not in ("v", "crc")}  # unversioned
    path = tmp_path / "j.jsonl"
    body = json.dumps(legacy).encode() + b"\n" + garbage + b"\n" + tracking.encode(entries[1])
    path.write_bytes(body)
    code, out, err = cli(
        ["sync", "--journal", str(path), "--tracking-uri", mlflow_server.uri], capsys
    )
    assert code == 0 and "Traceback" not in err
    assert "synced 1 new results" in out
    assert "skipped 1 unreadable line(s)" in err and "(line 2)" in err
    assert len(config_keys(MlflowClient(mlflow_server.uri), experiment)) == 1


def test_checksum_catches_a_changed_line(offline):
    entry = json.loads(offline[1])
    entry["metrics"]["fwd_speedup"] = 99.0
    assert tracking.decode(json.dumps(entry).encode()) is None
    assert tracking.decode(offline[1])["record_id"] == entry["record_id"]


# --- 2. poison entries --------------------------------------------------------------------------


def test_poison_records_are_quarantined_and_good_ones_upload(
    offline, mlflow_server, tmp_path, capsys
):
    """An empty experiment name (refused locally) and a param MLflow refuses (server 400)
    come first; the good result after them uploads, `sync --status` names both."""
    good = f"good-{uuid.uuid4().hex[:6]}"
    path = tmp_path / "j.jsonl"
    journal = tracking.Journal(path)
    poison_name = another_part(offline, "")
    poison_param = another_part(offline, good, run_name="bad param", params={"sh@pe!": "x"})
    for entry in [*poison_name, *poison_param, *another_part(offline, good)]:
        journal.append(entry)
    args = ["sync", "--journal", str(path), "--tracking-uri", mlflow_server.uri]
    code, out, err = cli(args, capsys)
    assert code == 1 and "Traceback" not in err
    assert "synced 1 new results" in out
    assert err.count("refused: ") == 2 and "experiment name is empty" in err
    assert "bad param" in err and "--retry-failed" in err
    client = MlflowClient(mlflow_server.uri)
    assert len(config_keys(client, good)) == 1
    assert {r.info.status for r in runs_of_kind(client, good, "sweep")} == {"FINISHED"}

    code, out, err = cli([*args, "--status"], capsys)
    assert code == 0
    assert "1 synced, 0 pending, 2 refused" in out
    assert "experiment name is empty" in out and "bad param" in out
    code, out, err = cli(args, capsys)  # quarantined: not retried, not blocking
    assert code == 0 and "synced 0 new results" in out and "2 refused earlier" in out
    assert len(config_keys(client, good)) == 1


def test_bad_names_are_refused_before_measuring(capsys):
    code, _, err = cli(["run", "--device", "cpu", "--experiment", ""], capsys)
    assert code == 2 and "experiment name is empty" in err and len(err.splitlines()) == 1
    code, _, err = cli(["run", "--device", "cpu", "--run-name", "n" * 251], capsys)
    assert code == 2 and "251 characters, over 250" in err and len(err.splitlines()) == 1


# --- 3. exactly once ------------------------------------------------------------------------------


def test_offline_then_resume_online_then_sync_gives_each_config_once(mlflow_server, tmp_path):
    journal = str(tmp_path / "j.jsonl")
    experiment = "resume-journal"
    first = sweep.measure_and_track(
        tiny("noop"),
        TrackingSettings(experiment, dead_uri(), journal=journal),
        progress=False,
        warn=lambda m: None,
    )
    assert first.exit_code == 1 and len(first.records) == 1
    warnings: list[str] = []
    second = sweep.measure_and_track(
        tiny("noop", "causal"),
        TrackingSettings(experiment, mlflow_server.uri, journal=journal, resume=True),
        progress=False,
        warn=warnings.append,
    )
    assert second.skipped == 1 and [r.params["score_mod"] for r in second.records] == ["causal"]
    assert any("skipped 1 of 2" in w and "journal" in w for w in warnings)
    report = artifacts.sync(tracking.Journal(journal), mlflow_server.uri)
    assert report.uploaded == 1
    client = MlflowClient(mlflow_server.uri)
    assert config_keys(client, experiment) == sorted(c.config_key() for c in tiny("noop", "causal"))

    # a resume with nothing left creates no sweep run and says so
    third = sweep.measure_and_track(
        tiny("noop", "causal"),
        TrackingSettings(experiment, mlflow_server.uri, journal=journal, resume=True),
        progress=False,
        warn=warnings.append,
    )
    assert (third.records, third.run_id, third.exit_code) == ([], "", 0)
    assert "nothing to do" in sweep.closing_line(third)
    assert len(runs_of_kind(client, experiment, "sweep")) == 2


def test_killed_between_journal_and_log_then_resume_and_sync_once(offline, mlflow_server, tmp_path):
    """What kill -9 after the journal write leaves: a RUNNING sweep run on the server, the
    result only in the journal. --resume skips it, sync uploads it once and ends that sweep
    run KILLED (1 of its 2 configs recorded)."""
    experiment = "killed"
    journal = tracking.Journal(tmp_path / "j.jsonl")
    tracker = tracking.Tracker(mlflow_server.uri, experiment, journal)
    assert tracker.connect()
    sweep_e, result_e = another_part(offline, experiment)
    tracker.start({**sweep_e, "planned": 2, "pid": os.getpid()})
    journal.append(result_e)  # ... and the process dies here

    out = sweep.measure_and_track(
        tiny("noop", "causal"),
        TrackingSettings(experiment, mlflow_server.uri, journal=str(journal.path), resume=True),
        progress=False,
        warn=lambda m: None,
    )
    assert out.skipped == 1 and [r.params["score_mod"] for r in out.records] == ["causal"]
    first = artifacts.sync(journal, mlflow_server.uri)
    again = artifacts.sync(journal, mlflow_server.uri)
    assert (first.uploaded, again.uploaded, again.already) == (1, 0, 0)
    client = MlflowClient(mlflow_server.uri)
    assert config_keys(client, experiment) == sorted(c.config_key() for c in tiny("noop", "causal"))
    assert client.get_run(tracker.run_id).info.status == "KILLED"
    assert client.get_run(out.run_id).info.status == "FINISHED"


def test_sync_finds_a_result_logged_under_another_record_id(offline, mlflow_server, tmp_path):
    """Same config key in the same sweep already on the server: never logged twice."""
    experiment = "same-key"
    journal = tracking.Journal(tmp_path / "j.jsonl")
    sweep_e, result_e = another_part(offline, experiment)
    for entry in (sweep_e, result_e, {**result_e, "record_id": uuid.uuid4().hex}):
        journal.append(entry)
    report = artifacts.sync(journal, mlflow_server.uri)
    assert (report.uploaded, report.already) == (1, 1)
    assert len(config_keys(MlflowClient(mlflow_server.uri), experiment)) == 1


# --- 4. durability: the journal fails mid-sweep ------------------------------------------------


def test_journal_failing_mid_sweep_loses_nothing(mlflow_server, tmp_path, monkeypatch):
    """After the first config the journal's disk is full (a symlink turned to /dev/full):
    the sweep goes on in a fallback journal in $TMPDIR, every result reaches the server, the
    sweep run ends, exit 1 names the fallback."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    real, link = tmp_path / "real.jsonl", tmp_path / "journal.jsonl"
    real.touch()
    link.symlink_to(real)

    def fill_disk(record: RunRecord) -> None:
        link.unlink()
        link.symlink_to("/dev/full")

    warnings: list[str] = []
    out = sweep.measure_and_track(
        tiny("noop", "causal"),
        TrackingSettings("disk-full", mlflow_server.uri, journal=str(link)),
        progress=False,
        warn=warnings.append,
        on_result=fill_disk,
    )
    assert len(out.records) == 2 and out.exit_code == 1
    fallback = Path(out.journal)
    assert fallback.parent == tmp_path and fallback.name.startswith("flexbench-journal-")
    assert any("No space left" in w and str(fallback) in w for w in warnings)
    line = sweep.closing_line(out)
    assert f"flexbench sync --journal {fallback}" in line
    client = MlflowClient(mlflow_server.uri)
    assert client.get_run(out.run_id).info.status == "FINISHED"
    assert len(children(client, out.run_id)) == 2
    kept = [e["type"] for e in tracking.Journal(fallback).entries()]
    assert kept.count("sweep") == 1 and kept.count("result") == 1
    for path in (real, fallback):  # nothing left to upload, nothing doubled
        report = artifacts.sync(tracking.Journal(path), mlflow_server.uri)
        assert report.uploaded == 0
    assert len(children(client, out.run_id)) == 2


# --- 5. clean interruption ------------------------------------------------------------------------


def test_sigint_ends_the_sweep_run_killed_with_a_resume_line(mlflow_server, tmp_path):
    def interrupt(record: RunRecord) -> None:
        os.kill(os.getpid(), signal.SIGINT)

    out = sweep.measure_and_track(
        tiny("noop", "causal"),
        TrackingSettings("interrupted", mlflow_server.uri, journal=str(tmp_path / "j.jsonl")),
        progress=False,
        warn=lambda m: None,
        on_result=interrupt,
    )
    assert out.interrupted == "SIGINT" and out.exit_code == 130
    assert len(out.records) == 1
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(out.run_id)
    assert run.info.status == "KILLED" and run.data.metrics["configs_total"] == 1
    assert {a.path for a in client.list_artifacts(out.run_id)} >= {"summary.md", "results.csv"}
    line = sweep.closing_line(out, ["run", "-mods", "noop,causal", "--sweep-id", "x"])
    assert "stopped by SIGINT after 1 of 2 configs" in line and "KILLED" in line
    assert f"flexbench run -mods noop,causal --resume --sweep-id {out.sweep_id}" in line


# --- 6. bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["-b", ""], ["-b", ",,,"], ["-mods", ""], ["-dtype", " , "]])
def test_empty_list_is_a_usage_error(args, capsys):
    code, _, err = cli(["run", "--device", "cpu", *args], capsys)
    assert code == 2 and "is empty" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("password", ["pa/ss", "pa ss", "p@ss/w rd", "p%2Fss%20x"])
def test_any_password_in_a_tracking_uri_is_redacted(password, tmp_path, capsys):
    uri = f"http://alice:{password}@127.0.0.1:{1}"
    for args in (
        ["run", *TINY, "--journal", str(tmp_path / "j.jsonl"), "--tracking-uri", uri],
        ["sync", "--journal", os.devnull, "--tracking-uri", uri],
    ):
        code, out, err = cli(args, capsys)
        assert password not in out + err and "alice" not in out + err
    text = tracking.redact(f"failed at {uri}/api/2.0 with {password}")
    assert password not in text and "http://***@127.0.0.1:1/api" in text


@pytest.mark.parametrize("uri", ["ftp://host/x", "garbage uri!!", "http://:5000"])
def test_bad_tracking_uri_is_refused_before_measuring(uri, capsys):
    code, _, err = cli(["run", "--device", "cpu", "--tracking-uri", uri], capsys)
    assert code == 2 and "tracking URI" in err and len(err.splitlines()) == 1
