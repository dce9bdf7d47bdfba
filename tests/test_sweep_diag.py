"""benchmarks/sweep_diag_gpu.py: its arguments, and its tables built from a fake run (no GPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flexbench.record import RunRecord

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import sweep_diag_gpu as diag  # noqa: E402


def metrics(fwd_us: float, samples: float, unconverged: float = 0.0) -> dict[str, float]:
    """A config's journal metrics: flex and sdpa forward, sdpa again as eager."""
    m = {}
    for name, us in (("fwd_compiled", fwd_us), ("fwd_sdpa", 2 * fwd_us), ("fwd_eager", 2 * fwd_us)):
        m |= {f"{name}_us": us, f"{name}_samples": samples, f"{name}_noise_pct": 0.4}
        m |= {f"{name}_unconverged": unconverged, f"{name}_retaken": 1.0}
    return m


def result(name: str, m: dict) -> RunRecord:
    return RunRecord(f"key-{name}", name, metrics=m)


def ev(name: str, t0: float, t1: float, **extra: object) -> dict:
    return {"name": name, "t0": t0, "t1": t1, "thread": "MainThread", **extra}


EVENTS = [
    ev("python started", 0.05, 0.05),
    ev("import torch", 0.05, 2.0),
    ev("import flexbench", 2.0, 2.5),
    ev("import mlflow", 2.5, 3.5),
    ev("flexbench.sweep:measure_and_track", 3.6, 20.0),
    ev("flexbench.sweep:connect", 3.6, 4.0),
    ev("flexbench.pipeline:measure_configs", 4.2, 15.0),
    ev("flexbench.precompile:Pool.take", 6.0, 6.5, index=0),
    ev(
        "flexbench.measure:Bench.run",
        6.5,
        9.0,
        config="a",
        body="measure",
        error=None,
        phases={"compile": 0.4, "check": 0.6, "timing": 1.5},
    ),
    ev("flexbench.timing:time_all", 7.5, 8.0, series={"compiled": [12, True, 0]}),
    ev("flexbench.timing:time_all", 8.0, 9.0, series={"compiled": [30, False, 2]}),
    ev("on_result", 9.0, 9.2, config="a", phases={}),
    ev("flexbench.precompile:Pool.take", 9.3, 9.3, index=1),
    ev(
        "flexbench.measure:Bench.run",
        9.3,
        14.0,
        config="b",
        body="measure",
        error=None,
        phases={"compile": 3.0, "check": 0.2, "timing": 1.5},
    ),
    ev("on_result", 14.0, 14.1, config="b", phases={}),
    ev("flexbench.tracking:Tracker.finish", 15.5, 19.0),
    ev("cli end", 20.5, 20.5),
]


def test_series_are_read_from_journal_metrics_without_the_eager_duplicate():
    s = diag.series_of(metrics(100.0, 12))
    assert set(s) == {"fwd_compiled", "fwd_sdpa"}
    assert s["fwd_sdpa"] == {
        "median_us": 200.0,
        "samples": 12,
        "noise_pct": 0.4,
        "retaken": 1.0,
        "unconverged": 0.0,
    }
    only_eager = {k: v for k, v in metrics(100.0, 12).items() if not k.startswith("fwd_sdpa")}
    assert set(diag.series_of(only_eager)) == {"fwd_compiled", "fwd_eager"}


def test_agreement_and_totals_against_the_default_run():
    base = diag.run_series([result("a", metrics(100.0, 10)), result("b", metrics(50.0, 10))])
    run = diag.run_series([result("a", metrics(101.0, 5, 1.0)), result("b", metrics(50.0, 5))])
    agree = diag.agreement(run, base)
    assert agree["n"] == 4 and agree["max_pct"] == pytest.approx(1.0)
    assert agree["median_pct"] == pytest.approx(1.0)  # upper median of 0, 0, 1, 1
    assert agree["over_1pct"] == 0 and agree["worst"].startswith("a fwd_")
    totals = diag.sampling_totals(run)
    assert totals == {
        "series": 4,
        "samples": 20,
        "retaken": 4.0,
        "unconverged": 2.0,
        "noise_pct_median": 0.4,
    }
    assert diag.agreement({}, base) == {}


def test_timeline_adds_up_to_the_wall_time_and_per_config_rows():
    segments = dict(diag.timeline(EVENTS, wall_s=21.0))
    assert sum(s for s in segments.values() if s is not None) == pytest.approx(21.0)
    assert segments["import torch"] == pytest.approx(1.95)
    assert segments["worker pool start + warm_gpu, until config 1"] == pytest.approx(1.8)
    assert segments["measuring loop (configs)"] == pytest.approx(14.1 - 6.0)
    assert segments["interpreter teardown (after exit handlers)"] == pytest.approx(0.5)
    rows = diag.per_config(EVENTS, {"a": diag.series_of(metrics(1.0, 3, 1.0))})
    assert [r["config"] for r in rows] == ["a", "b"]
    a, b = rows
    assert a["wait"] == pytest.approx(0.5) and a["tracking"] == pytest.approx(0.2)
    assert a["timed_s"] == [0.5, 1.0] and a["samples"] == [{"compiled": 12}, {"compiled": 30}]
    assert a["gap_to_next_s"] == pytest.approx(0.1) and a["retaken"] == 2.0
    assert a["unconverged"] == ["fwd_compiled", "fwd_sdpa"]
    assert b["wait"] == 0.0 and b["gap_to_next_s"] is None and b["timed_s"] == []


def test_report_tables_from_a_fake_result():
    base = diag.run_series([result("a", metrics(100.0, 10))])
    fast = diag.run_series([result("a", metrics(103.0, 5))])
    runs = {
        "default": {
            "variant": "default",
            "wall_s": 58.6,
            "flags": [],
            "series": base,
            "sampling": diag.sampling_totals(base),
            "phase_timing_s": 24.5,
            "timeline": diag.timeline(EVENTS, 21.0),
            "spans": diag.spans(EVENTS),
            "per_config": diag.per_config(EVENTS, base),
            "missing_hooks": ["x:y"],
        },
        "min_samples5": {
            "variant": "min_samples5",
            "wall_s": 50.0,
            "series": fast,
            "flags": ["--min-samples", "5"],
            "returncode": 1,
            "stderr_tail": "boom",
            "top_cumulative": [
                {
                    "function": "measure.py:1(measure)",
                    "calls": 16,
                    "tottime": 0.5,
                    "cumulative": 30.0,
                }
            ],
        },
    }
    out = {"sweep": "headline", "date": "today", "runs": runs}
    diag.compare(out)
    assert out["agreement"]["min_samples5"]["max_pct"] == pytest.approx(3.0)
    text = diag.report(out)
    assert "| default |  | 58.6 |  |  |  | 24.5 |  |  | 2 | 20 | 0 | 2 |" in text
    assert "| min_samples5 | --min-samples 5 | 50.0 |" in text and "| 3.00 | 3.00 | 2 |" in text
    assert "| import torch | 1.95 |" in text
    assert "| a | 0.50 | 0.40 | 0.60 | 1.50 | 0.20 | 0.10 | 0.50/1.00 | 12 / 30 |" in text
    assert "| flexbench.sweep:connect | 1 | 0.40 | 3.60 | 4.00 |" in text
    assert (
        "hooks not found: x:y" in text and "| measure.py:1(measure) | 16 | 0.50 | 30.00 |" in text
    )
    assert "min_samples5 exited 1:" in text


def test_arguments(monkeypatch, tmp_path):
    monkeypatch.setattr(diag, "CACHE", tmp_path / "empty")
    args = diag.parse_args(["--out", str(tmp_path), "--variants", "default,burst_gap0.25"])
    assert args.variants == ["cold", "default", "burst_gap0.25"]  # warm needs a cache
    (tmp_path / "empty" / "inductor").mkdir(parents=True)
    assert diag.parse_args(["--out", "x", "--variants", "default"]).variants == ["default"]
    again = diag.parse_args(["--out", "x", "--variants", "default,max_time0.5,default,default"])
    assert again.variants == ["default", "max_time0.5", "default#2", "default#3"]
    with pytest.raises(SystemExit):
        diag.parse_args(["--out", "x", "--variants", "default,nope"])
    argv = diag.flexbench_args("headline", tmp_path, "max_time0.5", ["--max-time", "0.5"])
    assert argv[:2] == ["run", "--calculate-bwd"] and argv[-2:] == ["--max-time", "0.5"]
    assert f"sqlite:///{tmp_path}/diag.db" in argv and "-mods" in argv


def test_help_starts():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "sweep_diag_gpu.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "--variants" in proc.stdout
