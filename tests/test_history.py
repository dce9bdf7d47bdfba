"""`flexbench history`: the statistics against hand-computed numbers, then a real SQLite store
holding 8 nightly sweeps written the way `flexbench run` logs them (read back through the
direct-SQL path), in which causal got 30% slower from sweep 6 on, with a torch upgrade."""

from __future__ import annotations

import json
import math
import uuid

import pytest

from flexbench import history, tracking
from flexbench.config import BenchConfig
from flexbench.record import RunRecord
from tests.test_report import flexbench

DAY_MS = 86_400_000
START_MS = 1_780_000_000_000  # 2026-05-28
ENV = {
    "gpu": "NVIDIA H200",
    "driver": "570.1",
    "cuda": "12.8",
    "torch": "2.10.0",
    "triton": "3.5.0",
    "python": "3.11.9",
    "host": "node",
}
SWEEPS = 8
SLOW_FROM = 6  # 1-based: sweeps 6, 7, 8 ran causal 30% slower, on torch 2.11.0
SLOWDOWN = 1.3
JITTER = (0.0, 0.004, -0.006, 0.002, -0.003, 0.005, -0.001, 0.003)  # relative, per sweep


# --- statistics by hand ----------------------------------------------------------------------


def test_run_sigma_is_the_log_spread_over_two_z80():
    # ln(110/90) = 0.2006707; 2 * 0.8416212 = 1.6832425
    assert history.run_sigma(90.0, 110.0) == pytest.approx(0.2006707 / 1.6832425, rel=1e-6)
    assert history.run_sigma(None, 110.0) == 0.0


def test_baseline_sigma_takes_the_larger_of_spread_and_run_noise():
    assert history.baseline_sigma([0.0, 0.0, 0.0], [0.01, 0.02, 0.03]) == 0.02  # median noise
    # values 1, 2, 3: sample sd = 1
    assert history.baseline_sigma([1.0, 2.0, 3.0], [0.01]) == pytest.approx(1.0)


def test_step_found_where_it_started():
    levels = [0.0] * 5 + [0.2] * 3  # +0.2 on the log scale from the 6th point
    status, step = history.detect(levels, [0.01] * 8, history.Rule())
    # k=5: baseline mean 0, sigma = max(sd 0, noise 0.01); level 0.2 -> z = 20
    assert status == "regressed" and step.since == 5
    assert step.z == pytest.approx(20.0)
    assert step.change == pytest.approx(math.exp(0.2) - 1)  # +22.14%
    # Against the 7 points before the newest alone (conbench's plain rule) the step hides:
    # mean 0.0571, sd 0.0976, z = (0.2 - 0.0571) / 0.0976 = 1.46.
    plain = history.candidate(levels, [0.01] * 8, 7, history.Rule())
    assert plain.z == pytest.approx(1.464, abs=1e-3)


def test_noise_is_stable_and_short_series_insufficient():
    levels = [0.0, 0.01, -0.01, 0.005, 0.0]
    status, step = history.detect(levels, [0.01] * 5, history.Rule())
    # baseline mean 0.00125, sd 0.00854 < noise 0.01: z = (0 - 0.00125) / 0.01 = -0.125
    assert status == "stable" and step.z == pytest.approx(-0.125)
    assert history.detect(levels[:3], [0.01] * 3, history.Rule())[0] == "insufficient history"


def test_faster_is_improved_and_small_changes_do_not_count():
    levels = [0.0] * 4 + [-0.3] * 2
    assert history.detect(levels, [0.01] * 6, history.Rule())[0] == "improved"
    tiny = [0.0] * 4 + [0.02] * 2  # z = 2 / 0.01... = 2.0 under 5, and +2% under 5%
    assert history.detect(tiny, [0.01] * 6, history.Rule())[0] == "stable"


def test_sparkline_scales_between_min_and_max():
    assert history.sparkline([1.0, 2.0, 3.0]) == "▁▅█"
    assert history.sparkline([5.0, 5.0]) == "▁▁"


# --- a real store ----------------------------------------------------------------------------


def record(config: BenchConfig, sweep: int) -> RunRecord:
    """A config's result in sweep `sweep` (1-based): steady timings with a little jitter;
    causal 30% slower from SLOW_FROM on."""
    jitter = 1 + JITTER[sweep - 1]
    fwd = 100.0 * config.q_len / 128 * jitter
    if config.score_mod == "causal" and sweep >= SLOW_FROM:
        fwd *= SLOWDOWN
    eager = 150.0 * jitter
    metrics = {"fwd_eager_us": eager, "fwd_compiled_us": fwd, "fwd_speedup": eager / fwd}
    for name in ("fwd_eager_us", "fwd_compiled_us"):
        metrics[f"{name}_p20"], metrics[f"{name}_p80"] = metrics[name] * 0.99, metrics[name] * 1.01
    return RunRecord(config.config_key(), config.run_name(), config.params(), metrics)


def log_sweep(
    client, exp_id: str, sweep: int, configs: list[BenchConfig], env: dict, suffix: str = ""
) -> None:
    """Sweep run `sweep` and one child per config, logged as `flexbench run` logs them."""
    start = START_MS + sweep * DAY_MS + (3_600_000 if suffix else 0)
    entry = {
        "sweep_id": f"nightly-{sweep}{suffix}",
        "part_id": uuid.uuid4().hex,
        "experiment": "h",
        "params": {},
        "tags": env,
        "run_name": f"nightly {sweep}",
        "start_ms": start,
        "run_id": None,
    }
    parent = tracking.start_sweep_run(client, exp_id, entry)
    for i, c in enumerate(configs):
        result = tracking.result_entry(record(c, sweep), entry, env, start + i, start + i + 1)
        tracking.log_child(client, exp_id, parent, result)


def cfg(mod: str, q_len: int = 128) -> BenchConfig:
    return BenchConfig(1, 2, q_len, 16, dtype="float32", score_mod=mod, device="cpu")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """8 nightly sweeps of noop and causal (torch 2.11.0 and causal slower from sweep 6);
    noop at s256 only in the last two; alibi's newest run on another GPU."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('history') / 'mlflow.db'}"
    client = tracking.client_for(uri)
    exp_id = tracking.experiment_id(client, "history")
    for sweep in range(1, SWEEPS + 1):
        env = {**ENV, "torch": "2.11.0"} if sweep >= SLOW_FROM else ENV
        configs = [cfg("noop"), cfg("causal"), cfg("alibi")]
        if sweep >= SWEEPS - 1:
            configs.append(cfg("noop", 256))
        if sweep == SWEEPS:  # alibi measured elsewhere: not comparable
            log_sweep(client, exp_id, sweep, configs[-1:] + configs[:2], env)
            b200 = {**env, "gpu": "NVIDIA B200"}
            log_sweep(client, exp_id, sweep, [cfg("alibi")], b200, "-b200")
        else:
            log_sweep(client, exp_id, sweep, configs, env)
    return uri


def by_name(data: dict) -> dict[str, dict]:
    return {c["config"]: c for c in data["configs"]}


def test_history_flags_the_step_and_exits_1(store, capsys):
    code, out, err = flexbench(capsys, f"history --tracking-uri {store} --experiment history")
    assert code == 1, err
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if "|" in line}
    causal = lines["causal b1 h2 s128 d16 fp32"]
    assert "regressed" in causal and "+30." in causal and "nightly-6" in causal
    assert "torch 2.10.0 -> 2.11.0" in causal  # the environment change at the step
    assert "stable" in lines["noop b1 h2 s128 d16 fp32"]
    assert "insufficient history" in lines["noop b1 h2 s256 d16 fp32"]
    alibi = lines["alibi b1 h2 s128 d16 fp32"]
    assert "not comparable" in alibi and "gpu NVIDIA H200 -> NVIDIA B200" in alibi


def test_history_json_has_every_point_in_time_order(store, capsys):
    code, out, _ = flexbench(
        capsys, f"history --tracking-uri {store} --experiment history --format json"
    )
    data = by_name(json.loads(out))
    causal = data["causal b1 h2 s128 d16 fp32"]["timings"]["fwd_compiled_us"]
    assert [p["sweep_id"] for p in causal["points"]] == [f"nightly-{i}" for i in range(1, 9)]
    assert causal["points"][5]["env_change"] == "torch 2.10.0 -> 2.11.0"
    assert causal["since_sweep"] == "nightly-6" and causal["change"] == pytest.approx(
        0.30, abs=0.01
    )
    eager = data["causal b1 h2 s128 d16 fp32"]["timings"]["fwd_eager_us"]
    assert eager["status"] == "stable"  # SDPA's time did not move
    assert code == 1 and json.loads(out)["regressed"] == 1


def test_history_selection_narrows_and_strict_env_breaks_the_series(store, capsys):
    base = f"history --tracking-uri {store} --experiment history"
    code, out, _ = flexbench(capsys, f"{base} --where score_mod=noop --format json")
    assert code == 0 and set(by_name(json.loads(out))) == {
        "noop b1 h2 s128 d16 fp32",
        "noop b1 h2 s256 d16 fp32",
    }
    # The last 4 sweeps: 3 comparable points before the step is too few -> not flagged.
    code, out, _ = flexbench(capsys, f"{base} --last 4 --where score_mod=causal --format json")
    assert code == 0
    assert by_name(json.loads(out))["causal b1 h2 s128 d16 fp32"]["status"] != "regressed"
    code, out, _ = flexbench(capsys, f"{base} --since 2026-06-03 --format csv")  # sweeps 6-8
    assert code == 0 and "nightly-5" not in out and "nightly-6" in out
    # torch must agree: sweeps 6-8 are a history of their own, too short to judge.
    code, out, _ = flexbench(capsys, f"{base} --comparable-on gpu,torch --format json")
    causal = by_name(json.loads(out))["causal b1 h2 s128 d16 fp32"]
    assert code == 0 and causal["status"] == "insufficient history"


@pytest.mark.parametrize(
    "args, named",
    [
        ("--comparable-on colour", "colour"),
        ("--last 0", "--last"),
        ("--since yesterday", "--since"),
    ],
)
def test_history_bad_input_is_one_line_exit_2(store, capsys, args, named):
    code, _, err = flexbench(capsys, f"history --tracking-uri {store} {args}")
    assert code == 2 and named in err and len(err.strip().splitlines()) == 1


def test_report_html_of_a_sweep_has_heatmap_and_history_sparklines(store, capsys, tmp_path):
    path = tmp_path / "report.html"
    code, out, err = flexbench(
        capsys,
        f"report --html {path} --tracking-uri {store} --experiment history --sweep-id nightly-8",
    )
    assert code == 0, err
    page = path.read_text()
    assert 'id="heatmap"' in page and "sweep id nightly-8" in page
    assert "<title>8 sweeps" in page  # causal's flex time over all 8 sweeps as a sparkline
    assert "alibi" not in page  # measured on the other GPU, in another sweep


def flagged_rows(newest: dict) -> list[dict]:
    """Five sweeps of one config at 100 µs; the newest with `newest` merged in."""
    base = {"status": "FINISHED", "run_name": "noop", "shape": "1,2,128,16", "gpu": "H200"}
    rows = [
        {**base, "fwd_compiled_us": 100.0, "start_time": i, "flexbench.sweep_id": f"s{i}"}
        for i in range(5)
    ]
    rows[-1] |= newest
    return rows


@pytest.mark.parametrize(
    ("newest", "note"),
    [
        ({"fwd_compiled_us": 200.0, "fwd_compiled_throttled": 1.0}, "fwd_compiled_throttled"),
        ({"fwd_compiled_us": 200.0, "fwd_compiled_unconverged": 1.0}, "unconverged"),
        ({"fwd_compiled_us": 200.0, "regime": "burst"}, "regime - -> burst"),
    ],
)
def test_throttled_unconverged_or_other_regime_is_not_comparable(newest, note):
    (series,) = history.build(flagged_rows(newest))
    assert series.status == "not comparable" and note in series.deciding.note
    (plain,) = history.build(flagged_rows({"fwd_compiled_us": 200.0}))
    assert plain.status == "regressed"  # the same doubling, comparable: a regression


def test_environment_changes_listed_once_with_their_reach(store, capsys):
    _, out, _ = flexbench(capsys, f"history --tracking-uri {store} --experiment history")
    changes = out.split("Environment changes")[1]
    assert "nightly-6: torch 2.10.0 -> 2.11.0 (3 configs)" in changes  # noop, causal, alibi


def test_report_html_to_an_unwritable_path_is_one_line(store, capsys):
    args = f"--tracking-uri {store} --experiment history --sweep-id nightly-8"
    code, _, err = flexbench(capsys, f"report --html /proc/nope/report.html {args}")
    assert (
        code == 1
        and err.startswith("Error: --html /proc/nope/report.html: ")
        and err.count("\n") == 1
    )
