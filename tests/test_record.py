"""`RunRecord`: one row model, whether a run comes from the journal or back from MLflow; the
format tables of summary, compare and history."""

from __future__ import annotations

import json
import uuid

import pytest

from flexbench import compare, history, query, schema, summary, tracking
from flexbench.cli import main
from flexbench.record import RunRecord

PARAMS = {
    "shape": "2,4,128,16",
    "batch": "2",
    "heads": "4",
    "kv_heads": "4",
    "q_len": "128",
    "kv_len": "128",
    "head_dim": "16",
    "dtype": "float32",
    "score_mod": "causal",
    "max_noise": "0.02",
    "calculate_bwd": "false",
    "baseline": "sdpa_is_causal",
}
METRICS = {"fwd_eager_us": 120.5, "fwd_compiled_us": 80.25, "fwd_speedup": 120.5 / 80.25}


def sweep_of() -> dict:
    return {"sweep_id": uuid.uuid4().hex[:12], "part_id": uuid.uuid4().hex, "experiment": "rec"}


def measured(status: str = "FINISHED", error: str = "", sweep: dict | None = None) -> RunRecord:
    """A record as a sweep journals it: measured, then with its sweep's bookkeeping."""
    record = RunRecord(
        uuid.uuid4().hex[:16],
        "causal b2 h4 s128 d16 fp32",
        dict(PARAMS),
        dict(METRICS) if status == "FINISHED" else {},
        status,
        error,
        {"flexbench.flex_kernels": "triton_tem_fused"},
    )
    env = {"gpu": "cpu", "torch": "2.11.0"}
    return tracking.result_entry(
        record, sweep or sweep_of(), env, 1_700_000_000_000, 1_700_000_000_500
    )


def journalled(record: RunRecord, versioned: bool = True) -> RunRecord:
    """The record written to a journal line and read back (an old line: no version, no crc)."""
    entry = record.to_journal()
    line = tracking.encode(entry) if versioned else (json.dumps(entry) + "\n").encode()
    decoded = tracking.decode(line)
    assert decoded is not None and decoded["v"] == (tracking.JOURNAL_VERSION if versioned else 0)
    return RunRecord.from_journal(decoded)


def test_journal_round_trip_keeps_the_record():
    record = measured()
    assert journalled(record) == record
    assert journalled(record, versioned=False) == record  # unversioned lines still read


def test_a_gpu_workers_outcome_crosses_json_as_journal_entries():
    from flexbench import sweep

    out = sweep.Outcome("s1", [measured(), measured("FAILED", "boom")], skipped=1, run_id="r1")
    wire = json.loads(json.dumps(sweep.to_wire(out)))
    assert wire["records"][1] == out.records[1].to_journal()  # the journal's form on the wire
    back = sweep.from_wire(wire)
    assert back == out and all(isinstance(r, RunRecord) for r in back.records)
    assert back.failed == 1


def test_rows_convert_whole_number_params_once():
    row = journalled(measured(), versioned=False).to_row()
    assert row["batch"] == 2 and row["q_len"] == 128 and row["shape"] == "2,4,128,16"
    assert row["max_noise"] == "0.02" and row["calculate_bwd"] == "false"
    assert row[schema.SWEEP_ID_TAG] and row["gpu"] == "cpu" and row["error"] == ""


def test_a_failed_record_keeps_its_error_as_row_and_tag():
    record = measured("FAILED", "RuntimeError: boom")
    row = journalled(record).to_row()
    assert row["status"] == "FAILED" and row["error"] == "RuntimeError: boom"
    assert row[schema.ERROR_TAG] == "RuntimeError: boom" and "fwd_speedup" not in row
    assert record.to_journal()["error"] == "RuntimeError: boom"
    assert measured().to_journal()["error"] is None  # as journals always held it


@pytest.fixture(scope="module")
def logged(mlflow_server):
    """Two records logged as a sweep logs them; (records, sweep run id)."""
    client = tracking.client_for(mlflow_server.uri)
    exp_id = tracking.experiment_id(client, "records")
    part = sweep_of()
    records = [measured(sweep=part), measured("FAILED", "ValueError: no", part)]
    sweep = tracking.sweep_entry(
        part["sweep_id"], "records", {}, {}, "sweep rec", 0, part["part_id"]
    )
    parent = tracking.start_sweep_run(client, exp_id, {**sweep, "run_id": None})
    runs = [tracking.log_child(client, exp_id, parent, r) for r in records]
    mine = [r.with_run(run_id=run, sweep_run_id=parent) for r, run in zip(records, runs)]
    return mine, parent


@pytest.mark.parametrize("store", ["server", "database"])
def test_rows_from_the_journal_equal_rows_from_mlflow(mlflow_server, logged, store):
    """Over HTTP (MlflowReader) and straight from the database (SqlReader): the same rows as
    the journal's records give, types included."""
    records, parent = logged
    uri = mlflow_server.uri if store == "server" else mlflow_server.backend_uri
    rows, _ = query.read(query.Selection(parent), uri, "records")
    # the journal's record, with the run ids its `synced` mark and sweep run give
    ids = [{"run_id": r.run_id, "sweep_run_id": r.sweep_run_id} for r in records]
    from_journal = [journalled(r).with_run(**i).to_row() for r, i in zip(records, ids)]
    by_name = {r["status"]: r for r in rows}
    for want in from_journal:
        got = by_name[want["status"]]
        assert got == want
        assert [type(got[k]) for k in sorted(got)] == [type(want[k]) for k in sorted(want)]


# --- format tables ---------------------------------------------------------------------------


@pytest.mark.parametrize("module", [summary, compare, history])
def test_every_command_offers_the_same_formats(module):
    assert list(module.FORMATS) == ["table", "csv", "json", "markdown"]


def test_an_unknown_format_is_an_error_not_silence():
    empty = compare.pair([], [])
    for render, value in (
        (compare.render_compare, empty),
        (summary.render_summary, summary.Summary([], "nothing")),
        (history.render, history.History([], "nothing", history.Rule())),
    ):
        with pytest.raises(ValueError, match=r"format must be one of table, csv, json, markdown"):
            render(value, "yaml")


def test_the_cli_takes_its_format_choices_from_the_tables(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["summary", "--format", "yaml"])
    assert exit_.value.code == 2
    assert "'yaml' is not one of 'table', 'csv', 'json', 'markdown'" in capsys.readouterr().err
