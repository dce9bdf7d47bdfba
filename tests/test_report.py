"""`flexbench summary` and `flexbench compare` reading a real loopback `mlflow server`.

One real tiny CPU sweep (2 configs, forward only) gives the measured records. Further sweeps
are written through `tracking` (sweep run + one child per record, as `flexbench run` logs
them) from those records: an identical copy, timings scaled by 1.2, a quiet or noisy spread,
another torch version. That is real MLflow data, only not re-measured.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import re
import shlex
import time
import uuid
from dataclasses import replace

import pytest

from flexbench import (
    artifacts,
    cli,
    compare,
    history,
    query,
    report,
    repro,
    summary,
    sweep,
    tracking,
)
from flexbench.config import BenchConfig
from flexbench.record import RunRecord
from flexbench.spec import SweepSpec
from flexbench.tracking_settings import TrackingSettings
from tests.servers import free_port

OLD_TORCH = "2.10.0"
SLOWDOWN = 1.2


# --- helpers ---------------------------------------------------------------------------------


def flexbench(capsys: pytest.CaptureFixture, command: str) -> tuple[int, str, str]:
    """Run `flexbench <command>` in process: (exit code, stdout, stderr)."""
    try:
        cli.main(shlex.split(command))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def record_of(record: RunRecord) -> RunRecord:
    """The measured part of a sweep's record (what `RunRecord.from_result` gave, no tags)."""
    r = record
    return RunRecord(r.config_key, r.run_name, dict(r.params), dict(r.metrics), r.status, r.error)


def with_spread(record: RunRecord, relative: float) -> RunRecord:
    """p20/p80 of every forward timing set to median -/+ relative*median, converged (a CPU
    sweep on a busy machine may not be)."""
    m = dict(record.metrics)
    for t in [k for k in m if k.startswith("fwd_") and k.endswith("_us")]:  # every series
        m[f"{t}_p20"], m[f"{t}_p80"] = m[t] * (1 - relative), m[t] * (1 + relative)
        m[f"{t[:-3]}_unconverged"] = 0.0
    return record.with_run(metrics=m)


def slower(record: RunRecord, factor: float) -> RunRecord:
    """Compiled flex `factor` times slower (median and spread), speedup to match."""
    m = dict(record.metrics)
    for key in ("fwd_compiled_us", "fwd_compiled_us_p20", "fwd_compiled_us_p80"):
        m[key] *= factor
    m["fwd_compiled_tflops"] /= factor
    m["fwd_speedup"] = m["fwd_eager_us"] / m["fwd_compiled_us"]
    return record.with_run(metrics=m)


def longer(record: RunRecord, q_len: int) -> RunRecord:
    """The same record as if measured at another sequence length (another config)."""
    p = dict(record.params)
    p["q_len"] = p["kv_len"] = str(q_len)
    p["shape"] = f"{p['batch']},{p['heads']},{q_len},{p['head_dim']}"
    return record.with_run(
        params=p,
        run_name=record.run_name.replace(" s128 ", f" s{q_len} "),
        config_key=uuid.uuid4().hex[:16],
    )


def log_sweep(
    uri: str,
    experiment: str,
    records: list[RunRecord],
    tags: dict[str, str],
    name: str,
    sweep_id: str | None = None,
) -> str:
    """A sweep run with one child run per record, logged through `tracking` like `flexbench
    run` logs a sweep. Returns the sweep run id."""
    client = tracking.client_for(uri)
    exp_id = tracking.experiment_id(client, experiment)
    now = int(time.time() * 1000)
    sweep_entry = {
        "sweep_id": sweep_id or uuid.uuid4().hex[:12],
        "part_id": uuid.uuid4().hex,
        "experiment": experiment,
        "params": {"configs": str(len(records))},
        "tags": tags,
        "run_name": name,
        "start_ms": now,
        "run_id": None,
    }
    parent = tracking.start_sweep_run(client, exp_id, sweep_entry)
    entries = [tracking.result_entry(r, sweep_entry, tags, now, now + 1) for r in records]
    for entry in entries:
        tracking.log_child(client, exp_id, parent, entry)
    tracking.finish_sweep_run(client, parent, artifacts.for_sweep(entries), terminate=True)
    return parent


# --- data: one real sweep, synthetic sweeps from its records ---------------------------------


@pytest.fixture(scope="module")
def measured(mlflow_server, tmp_path_factory):
    """A real CPU sweep (noop, causal; b1 h2 s128 d16 fp32) in experiment `summary`."""
    spec = SweepSpec([1], [2], [128], [16], ["noop", "causal"], ["float32"], device="cpu")
    configs = spec.configs()
    journal = tmp_path_factory.mktemp("journal") / "journal.jsonl"
    out = sweep.measure_and_track(
        configs,
        TrackingSettings("summary", mlflow_server.uri, str(journal)),
        progress=False,
        warn=print,
    )
    assert out.offline is None and out.failed == 0
    return out


@pytest.fixture(scope="module")
def two_sweeps(mlflow_server, measured):
    """Experiment `summary`: the real sweep, then the same records under torch 2.10.0."""
    records = [record_of(r) for r in measured.records]
    tags = {**measured.records[0].tags, "torch": OLD_TORCH}
    old = log_sweep(mlflow_server.uri, "summary", records, tags, "older torch")
    return {"real": measured.run_id, "old": old, "torch": measured.records[0].tags["torch"]}


@pytest.fixture(scope="module")
def compared(mlflow_server, measured):
    """Experiment `compare`: sweeps derived from the real records, one per comparison."""
    real = [record_of(r) for r in measured.records]
    tags = measured.records[0].tags
    quiet = [with_spread(r, 0.01) for r in real]  # a quiet GPU's 1% spread
    noisy = [with_spread(r, 0.25) for r in real]  # wider than the 20% change
    sweeps = {
        "base": (quiet, "2.10.0"),
        "copy": (copy.deepcopy(quiet), "2.10.0+copy"),
        "slow": ([slower(r, SLOWDOWN) for r in quiet], "2.11.0"),
        "noisy": (noisy, "2.10.0+noisy"),
        "noisy_slow": ([slower(r, SLOWDOWN) for r in noisy], "2.11.0+noisy"),
        "partial": ([quiet[0], longer(quiet[0], 256)], "2.11.0+partial"),
    }
    return {
        name: log_sweep(mlflow_server.uri, "compare", recs, {**tags, "torch": torch}, name)
        for name, (recs, torch) in sweeps.items()
    }


# --- pure functions --------------------------------------------------------------------------


def test_where_keeps_commas_in_values_and_maps_params_and_tags():
    clauses = query.parse_where(["shape=1,16,512,64,dtype=bf16", "torch!=2.10.0,gpu=H100"])
    assert [(c.key, c.op, c.value) for c in clauses] == [
        ("shape", "=", "1,16,512,64"),
        ("dtype", "=", "bfloat16"),
        ("torch", "!=", "2.10.0"),
        ("gpu", "=", "H100"),
    ]
    assert clauses[0].filter() == "params.`shape` = '1,16,512,64'"
    assert clauses[2].filter() == "tags.`torch` != '2.10.0'"


@pytest.mark.parametrize(
    "where, named", [("colour=red", "colour"), ("score_mod", "score_mod"), ("dtype=", "dtype=")]
)
def test_where_rejects_bad_clauses_naming_them(where, named):
    with pytest.raises(ValueError, match=named):
        query.parse_where([where])


def test_verdict_needs_both_threshold_and_spread():
    # +20% with 2 µs spreads: beyond 5% and beyond the spread.
    assert compare.verdict(100.0, 120.0, 2.0, 2.4, 0.05) == "regression"
    # +4%: under the threshold.
    assert compare.verdict(100.0, 104.0, 0.5, 0.5, 0.05) == ""
    # +20% but the contender's p20-p80 spans 30 µs: within the noise.
    assert compare.verdict(100.0, 120.0, 10.0, 30.0, 0.05) == ""
    # -20%, tight: an improvement.
    assert compare.verdict(100.0, 80.0, 1.0, 1.0, 0.05) == "improvement"


def test_pair_counts_a_config_that_now_fails_as_a_regression():
    base = {
        "shape": "1,2,128,16",
        "run_name": "causal",
        "status": "FINISHED",
        "fwd_compiled_us": 10.0,
        "torch": "2.10.0",
    }
    failed = {**base, "status": "FAILED", "error": "OutOfMemoryError: boom", "torch": "2.11.0"}
    del failed["fwd_compiled_us"]
    result = compare.pair([base], [failed])
    assert [m.status for m in result.matches] == ["now fails"]  # environment is not identity
    assert result.exit_code == 1 and "OutOfMemoryError" in result.matches[0].detail()
    assert compare.pair([failed], [base]).exit_code == 0  # now passes


def test_table_keeps_fractional_speedups():
    rows = [
        {
            "shape": "1,2,128,16",
            "score_mod": "noop",
            "dtype": "float32",
            "fwd_speedup": 2.345,
            "status": "FINISHED",
        }
    ]
    assert "2.345" in report.results_table(rows)


def table_row(mod: str, baseline: str) -> dict:
    return {
        "shape": "1,2,128,16",
        "score_mod": mod,
        "dtype": "float32",
        "baseline": baseline,
        "fwd_eager_us": 20.0,
        "fwd_compiled_us": 10.0,
        "fwd_speedup": 2.0,
        "max_abs_err": 3.5e-7,
        "run_name": mod,
        "status": "FINISHED",
    }


def test_table_headers_name_the_sides_and_errors_are_scientific():
    sdpa = report.seed_tables([table_row("noop", "sdpa"), table_row("causal", "sdpa_is_causal")])
    header = sdpa.splitlines()[0]
    assert "fwd_sdpa_us" in header and "fwd_flex_us" in header and "eager" not in header
    assert "| baseline" in header and "sdpa_is_causal" in sdpa  # which SDPA form ran
    assert sdpa.count("3.50e-07") == 2 and not re.search(r"\|\s+0\.000 \|", sdpa)
    assert "\n### FWD Speedups (sdpa time / flex time)\n" in sdpa and "=====" not in sdpa
    math_only = report.results_table([table_row("softcap", "eager_math")]).splitlines()[0]
    assert "fwd_eager_math_us" in math_only and "fwd_flex_us" in math_only
    mixed = report.results_table([table_row("noop", "sdpa"), table_row("softcap", "eager_math")])
    assert "fwd_baseline_us" in mixed.splitlines()[0] and "eager_math" in mixed


# --- summary ---------------------------------------------------------------------------------


def test_summary_table_is_the_sweeps_tables_from_mlflow(mlflow_server, measured, capsys):
    code, out, _ = flexbench(
        capsys,
        f"summary --tracking-uri {mlflow_server.uri} --experiment summary "
        f"--sweep {measured.run_id}",
    )
    assert code == 0
    assert f"sweep run {measured.run_id}" in out
    assert "FWD Speedups" in out and "Average" in out
    for record in measured.records:
        assert record.params["score_mod"] in out
        assert f"{record.metrics['fwd_speedup']:.3f}" in out


def test_summary_json_rows_and_aggregates(mlflow_server, measured, capsys):
    code, out, _ = flexbench(
        capsys,
        f"summary --tracking-uri {mlflow_server.uri} --experiment summary "
        f"--sweep {measured.run_id} --format json",
    )
    assert code == 0
    data = json.loads(out)
    by_name = {r["run_name"]: r for r in data["rows"]}
    assert set(by_name) == {r.run_name for r in measured.records}
    speedups = []
    for record in measured.records:
        row = by_name[record.run_name]
        assert row["fwd_speedup"] == pytest.approx(record.metrics["fwd_speedup"])
        assert row["shape"] == "1,2,128,16" and row["batch"] == 1
        assert row["flexbench.sweep_id"] == measured.sweep_id
        speedups.append(record.metrics["fwd_speedup"])
    agg = data["aggregates"]
    assert agg["configs_total"] == 2 and agg["configs_failed"] == 0
    assert agg["fwd"]["average"] == pytest.approx(sum(speedups) / 2)
    assert agg["fwd"]["max"]["speedup"] == pytest.approx(max(speedups))
    assert "bwd" not in agg


def test_summary_markdown_and_csv(mlflow_server, measured, capsys):
    base = f"summary --tracking-uri {mlflow_server.uri} --experiment summary"
    code, md, _ = flexbench(capsys, f"{base} --sweep {measured.run_id} --format markdown")
    assert code == 0
    assert md.startswith("**flexbench summary of sweep run")
    assert "| shape" in md and "|--" in md and "FWD Speedups" in md
    code, text, _ = flexbench(capsys, f"{base} --sweep {measured.run_id} --format csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert code == 0 and {r["score_mod"] for r in rows} == {"noop", "causal"}


def test_summary_defaults_to_latest_sweep(mlflow_server, two_sweeps):
    result = summary.summary(mlflow_server.uri, "summary")
    assert {r["torch"] for r in result.rows} == {OLD_TORCH}
    assert {r["sweep_run_id"] for r in result.rows} == {two_sweeps["old"]}
    assert result.source.startswith("latest sweep")


def test_filters_across_two_sweeps(mlflow_server, two_sweeps):
    uri = mlflow_server.uri
    new = summary.summary(uri, "summary", "all", [f"torch={two_sweeps['torch']}"])
    assert {r["sweep_run_id"] for r in new.rows} == {two_sweeps["real"]}
    causal = summary.summary(uri, "summary", "all", ["score_mod=causal,dtype=float32"])
    assert len(causal.rows) == 2
    assert {r["torch"] for r in causal.rows} == {two_sweeps["torch"], OLD_TORCH}
    assert all(r["score_mod"] == "causal" for r in causal.rows)
    table = summary.render_summary(causal, "table")
    assert "torch" in table.splitlines()[2]  # torch differs between rows: it gets a column
    narrowed = summary.summary(uri, "summary", "all", [f"torch={OLD_TORCH}", "score_mod=noop"])
    assert [r["sweep_run_id"] for r in narrowed.rows] == [two_sweeps["old"]]


def test_summary_by_sweep_id_unites_shards(mlflow_server, measured):
    records = [record_of(r) for r in measured.records]
    tags = measured.records[0].tags
    shared = uuid.uuid4().hex[:12]
    shards = [
        log_sweep(mlflow_server.uri, "shards", [rec], tags, f"shard {i}", sweep_id=shared)
        for i, rec in enumerate(records)
    ]
    result = summary.summary(mlflow_server.uri, "shards", sweep_id=shared)
    assert {r["sweep_run_id"] for r in result.rows} == set(shards)
    latest = summary.summary(mlflow_server.uri, "shards")
    assert len(latest.rows) == len(records)


def test_summary_reads_its_experiment_under_mlflow_run(
    mlflow_server, two_sweeps, monkeypatch, capsys
):
    """`mlflow run -e summary` sets the tracking URI, experiment and run of its own run."""
    client = tracking.client_for(mlflow_server.uri)
    other = tracking.experiment_id(client, "mlproject-summary")
    own_run = client.create_run(other).info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", other)
    monkeypatch.setenv("MLFLOW_RUN_ID", own_run)
    code, out, _ = flexbench(capsys, "summary --experiment summary --format json")
    assert code == 0
    assert {r["sweep_run_id"] for r in json.loads(out)["rows"]} == {two_sweeps["old"]}


def test_summary_errors_are_one_line(mlflow_server, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    code, out, err = flexbench(capsys, f"summary --tracking-uri {dead}")
    assert code == 1 and out == ""
    assert err.startswith("Error: tracking server unreachable at http://127.0.0.1:")
    assert len(err.strip().splitlines()) == 1
    live = f"summary --tracking-uri {mlflow_server.uri}"
    code, _, err = flexbench(capsys, f"{live} --where score_mod")
    assert code == 2 and "--where: 'score_mod' is not KEY=VALUE" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = flexbench(capsys, f"{live} --experiment no-such-experiment")
    assert code == 1 and "no experiment 'no-such-experiment'" in err
    code, _, err = flexbench(capsys, f"{live} --sweep {'0' * 32}")
    assert code == 1 and f"no such run '{'0' * 32}'" in err


# --- compare ---------------------------------------------------------------------------------


def test_compare_flags_a_20_percent_slowdown(mlflow_server, compared, capsys):
    code, out, _ = flexbench(
        capsys,
        f"compare {compared['base']} {compared['slow']} --tracking-uri {mlflow_server.uri} "
        "--format markdown",
    )
    assert code == 1
    assert out.startswith("**flexbench compare**") and "2 regressed" in out
    assert out.count("regression: fwd_flex_us +20.0%") == 2
    assert "fwd_sdpa_us +" not in out  # SDPA did not change
    lines = [line for line in out.splitlines() if line.startswith("| causal")]
    assert lines and "1.200" in lines[0]


def test_compare_calls_other_regimes_and_throttled_runs_not_comparable():
    base = {"run_name": "causal", "status": "FINISHED", "regime": "burst",
            "fwd_compiled_us": 100.0, "fwd_compiled_sm_mhz": 1980.0}
    slow = {**base, "fwd_compiled_us": 150.0}
    assert compare.pair([base], [slow]).matches[0].status == "regression"
    for contender, why in [({**slow, "regime": "sustained"}, "regime burst vs sustained"),
                           ({**slow, "fwd_compiled_throttled": 1.0, "fwd_compiled_sm_mhz": 1695.0},
                            "contender: fwd_flex throttled (1695 MHz)"),
                           ({**slow, "fwd_compiled_unconverged": 1.0,
                             "fwd_compiled_noise_pct": 1.5},
                            "contender: fwd_flex unconverged (noise 1.50%)")]:
        c = compare.pair([base], [contender])
        assert c.matches[0].status == "not comparable" and c.exit_code == 0
        assert why in c.matches[0].detail() and "1 not comparable" in c.headline()
        assert compare.pair([base], [contender], ignore_clocks=True).exit_code == 1


def test_summary_lists_throttled_and_unconverged_series():
    rows = [{"run_name": "noop b1", "status": "FINISHED", "fwd_speedup": 1.0,
             "fwd_eager_throttled": 1.0, "fwd_eager_sm_mhz": 1695.0,
             "fwd_compiled_throttled": 0.0, "bwd_compiled_unconverged": 1.0,
             "bwd_compiled_noise_pct": 0.8},
            {"run_name": "causal b1", "status": "FINISHED", "fwd_speedup": 1.0}]
    text = report.seed_tables(rows)
    assert "Timing conditions" in text
    line = next(x for x in text.splitlines() if "noop b1" in x and "throttled" in x)
    assert "fwd_eager throttled (1695 MHz)" in line and "bwd_flex unconverged" in line
    assert "fwd_flex throttled" not in text and "causal b1 " not in text.split("conditions")[1]


def test_compare_by_filters_is_the_ci_gate(mlflow_server, compared, capsys):
    code, out, _ = flexbench(
        capsys,
        f"compare --tracking-uri {mlflow_server.uri} --experiment compare --format json "
        "--base-where torch=2.10.0 --contender-where torch=2.11.0",
    )
    data = json.loads(out)
    assert code == 1 and data["regressions"] == 2
    timing = data["matched"][0]["timings"]["fwd_compiled_us"]
    assert timing["ratio"] == pytest.approx(SLOWDOWN)
    assert timing["verdict"] == "regression"


def test_compare_identical_data_passes(mlflow_server, compared, capsys):
    code, out, _ = flexbench(
        capsys, f"compare {compared['base']} {compared['copy']} --tracking-uri {mlflow_server.uri}"
    )
    assert code == 0
    assert "2 configs matched, 0 regressed" in out and out.count("unchanged") == 2
    code, text, _ = flexbench(
        capsys,
        f"compare {compared['base']} {compared['copy']} --tracking-uri {mlflow_server.uri} "
        "--format csv",
    )
    lines = list(csv.DictReader(io.StringIO(text)))
    assert code == 0 and {line["timing"] for line in lines} == {"fwd_eager_us", "fwd_compiled_us"}
    assert all(float(line["ratio"]) == 1.0 and line["verdict"] == "" for line in lines)


def test_compare_ignores_a_slowdown_within_the_spread(mlflow_server, compared):
    result = compare.compare(
        query.Selection(compared["noisy"]),
        query.Selection(compared["noisy_slow"]),
        mlflow_server.uri,
    )
    assert [m.status for m in result.matches] == ["unchanged", "unchanged"]
    assert result.exit_code == 0
    strict = compare.compare(
        query.Selection(compared["base"]),
        query.Selection(compared["slow"]),
        mlflow_server.uri,
        threshold=0.25,
    )
    assert strict.exit_code == 0  # 20% is under a 25% threshold


def test_compare_lists_unmatched_configs(mlflow_server, compared, capsys):
    code, out, _ = flexbench(
        capsys,
        f"compare {compared['base']} {compared['partial']} --tracking-uri {mlflow_server.uri}",
    )
    assert code == 0
    assert "1 only in base, 1 only in contender" in out
    base_only = out.split("Only in base (1)")[1].split("Only in contender")[0]
    assert "causal b1 h2 s128 d16 fp32" in base_only
    assert "noop b1 h2 s256 d16 fp32" in out.split("Only in contender (1)")[1]


def test_compare_needs_two_sides(mlflow_server, compared, capsys):
    code, _, err = flexbench(
        capsys, f"compare {compared['base']} --tracking-uri {mlflow_server.uri}"
    )
    assert code == 2 and "no contender" in err


def test_database_reader_matches_the_server(mlflow_server, two_sweeps):
    """A database URI is read with plain SQL; the server with search_runs: same rows."""
    assert query.is_database(mlflow_server.backend_uri)
    selections = [
        query.Selection(),
        query.Selection(two_sweeps["real"]),
        query.Selection("all", where=("score_mod=causal", "status=finished")),
        query.Selection("all", where=(f"torch!={OLD_TORCH}",)),
    ]
    for sel in selections:
        via_server = query.read(sel, mlflow_server.uri, "summary")
        via_database = query.read(sel, mlflow_server.backend_uri, "summary")
        assert via_database == via_server
        assert via_server[0]
    exp_id = query.read(selections[0], mlflow_server.uri, "summary")[0][0]["run_id"]
    exp_id = tracking.client_for(mlflow_server.uri).get_run(exp_id).info.experiment_id
    recent = [
        query.read_recent(uri, exp_id, 2) for uri in (mlflow_server.uri, mlflow_server.backend_uri)
    ]
    assert recent[0] == recent[1] and {r["sweep_run_id"] for r in recent[0]} >= {
        two_sweeps["real"],
        two_sweeps["old"],
    }
    trends = history.trends(recent[0])  # noop and causal, measured in both sweeps
    assert len(trends) == 2 and all(len(t) == 2 for t in trends.values())


# --- repro -----------------------------------------------------------------------------------


def test_repro_command_spells_out_every_field_of_the_config():
    c = BenchConfig(
        2,
        8,
        1,
        64,
        kv_heads=2,
        kv_len=4096,
        dtype="float16",
        score_mod="sliding_window:128",
        calculate_bwd=True,
        device="cuda",
        timer="do_bench",
        kernel_options={"BLOCK_M": 64},
    )
    cmd = repro.command(c, "nightly")
    assert cmd == (
        "flexbench run -b 2 -nh 8 -s 1 -d 64 --kv-heads 2 --kv-len 4096 -dtype float16 "
        "-mods sliding_window:128 --calculate-bwd --device cuda --timer do_bench "
        "--kernel-options '{\"BLOCK_M\":64}' --regime burst --max-noise 0.5 --min-samples 10 "
        "--max-time 2.0 --throttle-threshold 90 --experiment nightly"
    )
    named = replace(c, baselines="sdpa,eager_math", flex_backend="flash")
    assert repro.command(named).endswith(
        "--baseline sdpa,eager_math --flex-backend flash"
    )
    for config in (c, named):  # the command's flags, as the CLI hands them to the API
        p = cli.run.make_context("run", shlex.split(repro.command(config))[2:]).params
        again = cli.api_options(p)["spec"].configs()
        assert [x.config_key() for x in again] == [config.config_key()]


def test_repro_reruns_the_config_and_resume_skips_it(mlflow_server, measured, capsys):
    uri = mlflow_server.uri
    rows, _ = query.read(query.Selection(measured.run_id), uri, "summary")
    causal = next(r for r in rows if r["score_mod"] == "causal")
    code, out, _ = flexbench(capsys, f"repro {causal['run_id']} --tracking-uri {uri}")
    assert code == 0 and out.startswith("flexbench run ") and "-mods causal" in out
    assert out.strip() == causal[repro.REPRO_TAG]
    # The same config in an experiment of its own, then the printed command with --resume.
    record = next(r for r in measured.records if r.params["score_mod"] == "causal")
    log_sweep(uri, "repro", [record_of(record)], record.tags, "measured once")
    again = f"{out.strip().removeprefix('flexbench ')} --experiment repro --resume --quiet"
    code, _, err = flexbench(capsys, f"{again} --tracking-uri {uri}")
    assert code == 0 and "resume: skipped 1 of 1 configs already measured" in err
    code, _, err = flexbench(capsys, f"repro {measured.run_id} --tracking-uri {uri}")
    assert code == 1 and "has no flexbench.repro tag" in err  # a sweep run, not a config run


def test_summary_shows_the_regime_when_sweeps_differ():
    rows = [{"shape": "1,2,128,16", "dtype": "bfloat16", "regime": regime, "status": "FINISHED",
             "fwd_speedup": 1.0, "run_name": regime} for regime in ("burst", "sustained")]
    assert "regime" in report._columns(rows)
    assert "regime" not in report._columns(rows[:1])
