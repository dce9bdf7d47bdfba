"""`flexbench tune` (issue 8, item 4): grid, skip rules, default vs best, and the bookkeeping
of one real tune on CPU against the real `mlflow server`.

The tune compiles three candidates (default, max-autotune, one grid point) of one tiny causal
config; three more grid points are skipped, for two different reasons.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from flexbench import artifacts, query, report, schema, tracking, tune
from flexbench.cli import cli, main
from flexbench.config import BenchConfig
from flexbench.spec import SweepSpec
from flexbench.tracking_settings import TrackingSettings

SHAPE = dict(batch=[1], heads=[2], seq_lens=[64], head_dims=[16], dtypes=["float32"])
GRID = {"BLOCK_M": [32, 128], "BLOCK_N": [32, 1024], "num_warps": [4], "num_stages": [1]}
GRID_POINT = "BLOCK_M=32 BLOCK_N=32 num_warps=4 num_stages=1"
TOO_LONG_M = "BLOCK_M 128 > q_len 64 rounded up to 64"
TOO_LONG_N = "BLOCK_N 1024 > kv_len 64 rounded up to 64"
NOT_DIVIDING_N = "BLOCK_N 1024 does not divide the BlockMask block size 128"
EXPECTED_SKIPS = {
    "BLOCK_M=32 BLOCK_N=1024 num_warps=4 num_stages=1": f"{TOO_LONG_N}; {NOT_DIVIDING_N}",
    "BLOCK_M=128 BLOCK_N=32 num_warps=4 num_stages=1": TOO_LONG_M,
    "BLOCK_M=128 BLOCK_N=1024 num_warps=4 num_stages=1": (
        f"{TOO_LONG_M}; {TOO_LONG_N}; {NOT_DIVIDING_N}"
    ),
}
H100_SMEM = 232448  # shared_memory_per_block_optin of an H100 (227 KiB)


def cfg(**kw) -> BenchConfig:
    base = dict(batch=1, heads=2, q_len=64, head_dim=16, dtype="float32", device="cpu")
    return BenchConfig(**{**base, **kw})


# --- grid and skip rules (no compiling) --------------------------------------------------------


def test_default_grid_is_the_issues_54_points():
    grid = tune.parse_grid(None)
    assert grid == {
        "BLOCK_M": [32, 64, 128],
        "BLOCK_N": [32, 64, 128],
        "num_warps": [4, 8],
        "num_stages": [1, 2, 3],
    }
    points = tune.grid_points(grid)
    assert len(points) == 54
    assert points[0] == {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    assert tune.label(points[-1]) == "BLOCK_M=128 BLOCK_N=128 num_warps=8 num_stages=3"


def test_grid_json_lone_values_and_duplicates():
    assert tune.parse_grid('{"BLOCK_M": 64, "num_warps": [4, 8, 4]}') == {
        "BLOCK_M": [64],
        "num_warps": [4, 8],
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{BLOCK_M: [64]}", r"^--grid is not JSON \(.*\); e\.g\. \{"),
        ("[64, 128]", r"^--grid must be a non-empty JSON object of lists"),
        ("{}", r"^--grid must be a non-empty JSON object of lists"),  # not the default grid
        ('{"BLOCK_M": []}', r"^--grid\[BLOCK_M\] must be a non-empty list"),
        ('{"BLOCK_M": [[64]]}', r"^--grid\[BLOCK_M\] must be a non-empty list"),
    ],
)
def test_bad_grid_names_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        tune.parse_grid(text)


def test_padded_lengths():
    assert [tune.padded(n) for n in (1, 16, 17, 64, 65, 4096)] == [16, 16, 32, 64, 128, 4096]


@pytest.mark.parametrize(
    ("config", "options", "mask", "smem", "reasons"),
    [
        (cfg(), {"BLOCK_M": 64, "BLOCK_N": 64}, True, None, []),
        (
            cfg(),
            {"BLOCK_M": 128, "BLOCK_N": 1024},
            True,
            None,
            [TOO_LONG_M, TOO_LONG_N, NOT_DIVIDING_N],
        ),
        (cfg(), {"BLOCK_N": 48}, False, None, ["BLOCK_N 48 is not a power of two >= 16"]),
        (cfg(), {"BLOCK_M": 8}, False, None, ["BLOCK_M 8 is not a power of two >= 16"]),
        # 256-blocks are fine without a mask, not with one (flex's BlockMask has 128-blocks).
        (cfg(q_len=4096), {"BLOCK_N": 256}, False, None, []),
        (
            cfg(q_len=4096),
            {"BLOCK_N": 256},
            True,
            None,
            ["BLOCK_N 256 does not divide the BlockMask block size 128"],
        ),
        # decoding: one query, so any BLOCK_M above 16 computes padding only
        (
            cfg(q_len=1, kv_len=512),
            {"BLOCK_M": 32, "BLOCK_N": 128},
            False,
            None,
            ["BLOCK_M 32 > q_len 1 rounded up to 16"],
        ),
        # fwd_ options are checked as forward ones; bwd_ options are not checked
        (cfg(), {"fwd_BLOCK_M": 128, "bwd_BLOCK_M1": 4096}, False, None, [TOO_LONG_M]),
        # shared memory: 2 B · 128 · (128 + 2·128·3) = 224 KiB fits an H100's 227 KiB ...
        (
            cfg(q_len=4096, head_dim=128, dtype="bfloat16"),
            {"BLOCK_M": 128, "BLOCK_N": 128, "num_stages": 3},
            False,
            H100_SMEM,
            [],
        ),
        # ... head_dim 256 does not; and on CPU (no limit) the rule is off
        (
            cfg(q_len=4096, head_dim=256, dtype="bfloat16"),
            {"BLOCK_M": 128, "BLOCK_N": 128, "num_stages": 3},
            False,
            H100_SMEM,
            [
                "head_dim 256 needs ~448 KiB shared memory at these blocks and stages, the GPU has "
                "227 KiB"
            ],
        ),
        (
            cfg(q_len=4096, head_dim=256, dtype="bfloat16"),
            {"BLOCK_M": 128, "BLOCK_N": 128, "num_stages": 3},
            False,
            None,
            [],
        ),
    ],
)
def test_skip_rules(config, options, mask, smem, reasons):
    assert tune.skip_reasons(config, options, mask, smem) == reasons


def test_plan_lists_default_max_autotune_then_the_grid():
    p = tune.plan(cfg(score_mod="causal"), GRID)
    assert [c.label for c in p.candidates][:3] == ["default", "max-autotune", GRID_POINT]
    assert {c.label: c.skipped for c in p.skipped} == EXPECTED_SKIPS
    default, autotune, point = (c.config for c in p.measured)
    assert default.kernel_options == "" and not default.max_autotune
    assert autotune.max_autotune and autotune.kernel_options == ""
    assert json.loads(point.kernel_options) == {
        "BLOCK_M": 32,
        "BLOCK_N": 32,
        "num_warps": 4,
        "num_stages": 1,
    }
    assert default.config_key() == cfg(score_mod="causal").config_key()  # the plain config
    # noop has no mask: BLOCK_N 1024 is then only too long, and without max-autotune
    p = tune.plan(cfg(), GRID, autotune=False)
    assert [c.label for c in p.measured] == ["default", GRID_POINT]
    assert p.skipped[0].skipped == TOO_LONG_N


# --- default vs best from rows (pure) ----------------------------------------------------------


def row(
    candidate: str,
    fwd: float | None,
    bwd: float | None = None,
    key: str = "k1",
    status: str = "FINISHED",
    **extra,
) -> dict:
    r = {
        schema.TUNE_KEY_TAG: key,
        schema.TUNE_CONFIG_TAG: f"cfg {key}",
        schema.CANDIDATE_TAG: candidate,
        "status": status,
        "flexbench.sweep_id": "s1",
        **extra,
    }
    if fwd is not None:
        r.update(fwd_compiled_us=fwd, fwd_eager_us=2 * fwd)
    if bwd is not None:
        r.update(bwd_compiled_us=bwd, bwd_eager_us=3 * bwd)
    return r


def test_default_vs_best_picks_the_fastest_passing_candidate():
    rows = [
        row("default", 100.0),
        row("max-autotune", 90.0),
        row("A", 80.0, run_id="ra"),
        row("B", 80.0),  # a tie: the earlier candidate wins
        row("C", 10.0, status="FAILED"),  # failed its check: never the best
        row("D", None, status="KILLED", **{schema.SKIPPED_TAG: "too long"}),
        {"fwd_compiled_us": 1.0, "status": "FINISHED"},  # a plain `run` config: ignored
    ]
    (r,) = report.default_vs_best(rows)
    assert (r["config"], r["best"], r["best_run_id"]) == ("cfg k1", "A", "ra")
    assert (r["default_us"], r["best_us"]) == (100.0, 80.0)
    assert r["best_gain"] == pytest.approx(1.25) and r["best_speedup"] == pytest.approx(2.0)
    assert (r["measured"], r["skipped"], r["failed"]) == (5, 1, 1)
    assert (r["default_fwd_compiled_us"], r["best_fwd_compiled_us"]) == (100.0, 80.0)
    assert report.best_row(rows[:6]) is rows[2]


def test_default_vs_best_with_backward_and_per_config_groups():
    rows = [
        row("default", 100.0, 300.0),
        row("A", 80.0, 400.0),  # faster forward, slower total
        row("B", 120.0, 200.0),  # the best: 320 µs against the default's 400
        row("default", 50.0, key="k2", status="FAILED"),
        row("A", 60.0, key="k2"),
        row("default", 70.0, key="k2", **{"flexbench.sweep_id": "s2"}),  # another tune sweep
    ]
    first, second, third = report.default_vs_best(rows)
    assert (first["best"], first["default_us"], first["best_us"]) == ("B", 400.0, 320.0)
    assert first["best_gain"] == pytest.approx(1.25)
    assert first["best_speedup"] == pytest.approx((240 + 600) / 320)
    assert (first["best_fwd_compiled_us"], first["best_bwd_compiled_us"]) == (120.0, 200.0)
    assert first["default_bwd_compiled_us"] == 300.0
    assert (second["best"], second["default_us"], second["best_gain"]) == ("A", None, None)
    assert "default_fwd_compiled_us" not in second  # the default failed
    assert (third["best"], third["measured"]) == ("default", 1)
    table = report.tune_table([first, second]).splitlines()
    headers = [h.strip() for h in table[0].strip("|").split("|")]
    assert headers == [
        "config",
        "baseline_us",
        "default_us",
        "best_us",
        "gain",
        "best_speedup",
        "best",
        "measured",
        "skipped",
        "failed",
    ]
    assert [c.strip() for c in table[3].strip("|").split("|")][2:5] == ["", "60.000", ""]


def test_no_passing_candidate_has_no_best():
    (r,) = report.default_vs_best([row("default", 1.0, status="FAILED")])
    assert (r["best"], r["best_us"], r["best_gain"], r["best_run_id"]) == (None, None, None, "")


# --- a real tune against the real server -------------------------------------------------------

EXPERIMENT = "tune-test"


@pytest.fixture(scope="module")
def tuned(mlflow_server, tmp_path_factory):
    journal = tmp_path_factory.mktemp("tune") / "journal.jsonl"
    out = tune.run(
        SweepSpec(**SHAPE, score_mods=["causal"], device="cpu"),
        TrackingSettings(EXPERIMENT, mlflow_server.uri, str(journal)),
        grid=json.dumps(GRID),
        quiet=True,
    )
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = list(tracking.search_all(client, [exp.experiment_id]))
    return {"out": out, "client": client, "runs": runs, "journal": journal}


def kind(tuned, name: str) -> list:
    return [r for r in tuned["runs"] if r.data.tags.get(tracking.KIND_TAG) == name]


def test_tune_run_tree(tuned):
    (sweep_run,) = kind(tuned, "sweep")
    (tune_run,) = kind(tuned, "tune")
    measured, skipped = kind(tuned, "config"), kind(tuned, "skipped")
    assert sweep_run.data.tags[schema.COMMAND_TAG] == "tune"
    assert sweep_run.data.params["candidates"] == "6"
    assert json.loads(sweep_run.data.params["grid"]) == GRID
    assert tune_run.data.tags[tracking.PARENT_TAG] == sweep_run.info.run_id
    assert tune_run.info.run_name == "tune causal b1 h2 s64 d16 fp32"
    assert tune_run.data.params["shape"] == "1,2,64,16" and "ko_BLOCK_M" not in tune_run.data.params
    assert len(measured) == 3 and len(skipped) == 3
    for r in measured + skipped:
        assert r.data.tags[tracking.PARENT_TAG] == tune_run.info.run_id
        assert r.data.tags[schema.TUNE_KEY_TAG] == tune_run.data.tags[schema.TUNE_KEY_TAG]
    assert tuned["out"].run_id == sweep_run.info.run_id and tuned["out"].exit_code == 0


def test_candidates_are_checked_config_runs_with_their_options(tuned):
    by_label = {r.data.tags[schema.CANDIDATE_TAG]: r for r in kind(tuned, "config")}
    assert set(by_label) == {"default", "max-autotune", GRID_POINT}
    for r in by_label.values():
        assert r.info.status == "FINISHED" and r.data.metrics["max_abs_err"] < 1e-4
        assert r.info.run_name == f"causal b1 h2 s64 d16 fp32 [{r.data.tags[schema.CANDIDATE_TAG]}]"
    assert by_label["max-autotune"].data.params["max_autotune"] == "true"
    assert not any(k.startswith("ko_") for k in by_label["default"].data.params)
    point = by_label[GRID_POINT].data.params
    assert {k: v for k, v in point.items() if k.startswith("ko_")} == {
        "ko_BLOCK_M": "32",
        "ko_BLOCK_N": "32",
        "ko_num_warps": "4",
        "ko_num_stages": "1",
    }


def test_skipped_candidates_are_killed_runs_with_their_reason(tuned):
    skipped = kind(tuned, "skipped")
    assert {
        r.data.tags[schema.CANDIDATE_TAG]: r.data.tags[schema.SKIPPED_TAG] for r in skipped
    } == EXPECTED_SKIPS
    for r in skipped:
        assert r.info.status == "KILLED" and r.data.metrics == {}
        assert r.data.params["ko_BLOCK_N"] in ("32", "1024")


def test_exactly_one_best_and_it_is_the_fastest(tuned):
    measured = kind(tuned, "config")
    best = [r for r in measured if r.data.tags.get(schema.BEST_TAG) == "true"]
    assert len(best) == 1
    fastest = min(measured, key=lambda r: r.data.metrics["fwd_compiled_us"])
    assert best[0].info.run_id == fastest.info.run_id
    assert not any(schema.BEST_TAG in r.data.tags for r in kind(tuned, "skipped"))


def test_tune_run_metrics_default_vs_best(tuned):
    (tune_run,) = kind(tuned, "tune")
    by_label = {r.data.tags[schema.CANDIDATE_TAG]: r for r in kind(tuned, "config")}
    best = next(r for r in by_label.values() if r.data.tags.get(schema.BEST_TAG))
    m, tags = tune_run.data.metrics, tune_run.data.tags
    default_us = by_label["default"].data.metrics["fwd_compiled_us"]
    best_us = best.data.metrics["fwd_compiled_us"]
    assert m["default_fwd_compiled_us"] == pytest.approx(default_us)
    assert m["best_fwd_compiled_us"] == pytest.approx(best_us)
    assert m["best_gain"] == pytest.approx(default_us / best_us) and m["best_gain"] >= 1
    assert (m["candidates_measured"], m["candidates_skipped"], m["candidates_failed"]) == (3, 3, 0)
    assert tags["flexbench.best_candidate"] == best.data.tags[schema.CANDIDATE_TAG]
    assert tags["flexbench.best_run_id"] == best.info.run_id
    assert tune_run.info.status == "FINISHED"


def run_row(run) -> dict:
    """An MLflow run as a report row, as summary reads it: tags, params, metrics, status."""
    info = {"status": run.info.status, "run_id": run.info.run_id, "run_name": run.info.run_name}
    return {**run.data.tags, **run.data.params, **run.data.metrics, **info}


def test_default_vs_best_read_back_from_mlflow_matches_the_tune(tuned):
    rows = [run_row(r) for r in kind(tuned, "config") + kind(tuned, "skipped")]
    (from_runs,) = report.default_vs_best(rows)
    (printed,) = tuned["out"].results
    keys = ("config", "default_us", "best_us", "best_gain", "best", "best_run_id", "measured")
    assert {k: from_runs[k] for k in (*keys, "skipped")} == {
        k: printed[k] for k in (*keys, "skipped")
    }
    assert printed["config"] == "causal b1 h2 s64 d16 fp32" and printed["skipped"] == 3
    # summary's rows are the config runs only: the same comparison, without the skip count
    (measured_only,) = report.default_vs_best([run_row(r) for r in kind(tuned, "config")])
    assert {k: measured_only[k] for k in keys} == {k: printed[k] for k in keys}
    table = tuned["out"].table()
    assert "causal b1 h2 s64 d16 fp32" in table and printed["best"] in table


def test_measured_candidates_are_journalled_and_marked_synced(tuned, mlflow_server):
    entries = tracking.Journal(tuned["journal"]).entries()
    results = [e for e in entries if e["type"] == "result"]
    synced = {e["record_id"] for e in entries if e["type"] == "synced"}
    assert len(results) == 3 and {e["record_id"] for e in results} == synced
    report_ = artifacts.sync(tracking.Journal(tuned["journal"]), mlflow_server.uri)
    assert (report_.uploaded, report_.sweeps) == (0, 0)  # nothing left to upload


def test_summary_of_the_tune_sweep_run_lists_its_candidates(tuned, mlflow_server):
    # Candidates are children of tune runs, not of the sweep run: summary finds them by part id.
    (sweep_run,) = kind(tuned, "sweep")
    sel = query.Selection(sweep=sweep_run.info.run_id)
    rows, label = query.read(sel, mlflow_server.uri, EXPERIMENT)
    assert sorted(r["run_id"] for r in rows) == sorted(r.info.run_id for r in kind(tuned, "config"))
    assert label.startswith(f"sweep run {sweep_run.info.run_id}")


def test_a_failed_candidate_is_a_finding_not_a_failed_tune(mlflow_server, tmp_path):
    # CPU flex validates BACKEND: this candidate fails, the default still gives a best.
    out = tune.run(SweepSpec(**SHAPE, score_mods=["noop"], device="cpu"),
                   TrackingSettings("tune-failed", mlflow_server.uri,
                                    str(tmp_path / "journal.jsonl")),
                   grid='{"BACKEND": ["NO_SUCH"]}', autotune=False, quiet=True)
    assert (len(out.records), out.failed, out.exit_code) == (2, 1, 0)
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("tune-failed")
    status = {r.data.tags.get(tracking.KIND_TAG): r.info.status
              for r in tracking.search_all(client, [exp.experiment_id])
              if r.data.tags.get(schema.CANDIDATE_TAG) != "default"}
    assert status == {"sweep": "FINISHED", "tune": "FINISHED", "config": "FAILED"}


def test_tune_summary_artifact_on_the_sweep_run(tuned):
    (sweep_run,) = kind(tuned, "sweep")
    text = tuned["client"].download_artifacts(sweep_run.info.run_id, "tune.md")
    assert "causal b1 h2 s64 d16 fp32" in open(text).read()


# --- the CLI -----------------------------------------------------------------------------------

TINY = ["--device", "cpu", "-b", "1", "-nh", "2", "-s", "64", "-d", "16", "-dtype", "float32"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--grid", "{BLOCK_M: [64]}"], "Error: --grid is not JSON"),
        (["--grid", '{"BLOCK_M": "x", "BLOCK_N": [[1]]}'], "Error: --grid[BLOCK_N] must be"),
        (["-mods", "nope"], "unknown mod 'nope'"),
    ],
)
def test_tune_bad_input_exits_2_with_one_line(extra, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tune", *TINY, *extra])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and needle in err


def test_tune_cli_prints_default_vs_best(tuned, mlflow_server):
    grid = '{"BLOCK_M": [32], "BLOCK_N": [32], "num_warps": [4], "num_stages": [1]}'
    args = [
        "tune",
        *TINY,
        "-mods",
        "causal",
        "--grid",
        grid,
        "--no-autotune-candidate",
        "--tracking-uri",
        mlflow_server.uri,
        "--experiment",
        "tune-cli",
        "--quiet",
    ]
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 0, done.output
    header = done.stdout.splitlines()[0]
    assert all(h in header for h in ("config", "default_us", "best_us", "gain", "best"))
    assert "causal b1 h2 s64 d16 fp32" in done.stdout
    assert "1 configs, 2 candidates measured (0 failed), 0 skipped" in done.stderr
