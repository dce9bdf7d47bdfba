"""Compile workers: configs compiled in other processes while the measuring process measures.

One tracked CPU sweep with one worker, in a fresh inductor cache: the worker compiles the graph
the measuring process runs (its compile is an FX-graph cache hit, nothing compiled anew), a
config whose worker raises fails as it fails without workers, one whose worker dies fails alone,
results match `--compile-workers 0`, and the sweep run has its phase metrics. Ctrl-C on
`flexbench run` leaves no worker behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch._dynamo.utils import counters

from flexbench import pipeline, precompile, sweep
from flexbench.config import BenchConfig
from flexbench.tracking_settings import TrackingSettings

REPO = Path(__file__).resolve().parents[1]
CPU = dict(batch=1, heads=2, head_dim=16, dtype="float32", device="cpu")
OWN = BenchConfig(q_len=128, score_mod="tests.user_mods:explode", **CPU)  # measuring process's
# Given to the worker when it starts; a shape no other test compiles, so this process's dynamo
# has no graph for it and must look it up in the (fresh) FX-graph cache.
NOOP = BenchConfig(**{**CPU, "head_dim": 32}, q_len=128)
RAISES = BenchConfig(q_len=256, score_mod="tests.user_mods:explode", **CPU)
CRASH = BenchConfig(q_len=128, score_mod="tests.crash_mod:plain", **CPU)  # kills its worker
SWEEP = [OWN, NOOP, RAISES, CRASH]
PHASES = {f"phase_{p}_s" for p in ("compile", "check", "timing", "tracking", "wait")}
COMPARED = ("sparsity", "max_abs_err", "fwd_max_abs_err", "baseline_max_abs_err")


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory: pytest.TempPathFactory):
    """An empty inductor cache for this module's sweeps and their workers (which import
    tests.*): what the measuring process finds there, a worker put there."""
    root = tmp_path_factory.mktemp("precompile")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
        mp.setenv("PYTHONPATH", str(REPO))
        yield root


def _cache_counts() -> tuple[int, int]:
    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


_real_take = precompile.Pool.take


def _take_once_ready(pool: precompile.Pool, index: int) -> precompile.Ready:
    """Pool.take, but config 2 waits until the worker is ready (has taken a config): a config
    goes only to a ready worker, and the first config here fails at once, before the worker
    has even imported torch; the sweep would then compile config 2 itself."""
    deadline = time.monotonic() + 120
    while index == 1 and time.monotonic() < deadline:
        if any(w.ready for w in pool._live) or not pool._live:
            break
        time.sleep(0.05)
    return _real_take(pool, index)


@pytest.fixture(scope="module")
def swept(fresh_cache, mlflow_server):
    """SWEEP tracked with one compile worker (cache hits and misses seen after each config),
    then its first three configs again without workers, on the cache the first run left."""
    seen = [_cache_counts()]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(precompile.Pool, "take", _take_once_ready)
        out = sweep.measure_and_track(
            SWEEP,
            TrackingSettings("precompile", mlflow_server.uri, str(fresh_cache / "journal.jsonl")),
            progress=False,
            warn=print,
            on_result=lambda record: seen.append(_cache_counts()),
            compile_workers=1,
        )
    plain = pipeline.measure_configs(SWEEP[:3], progress=False)
    deltas = [(h1 - h0, m1 - m0) for (h0, m0), (h1, m1) in zip(seen, seen[1:])]
    return {"out": out, "plain": plain, "deltas": deltas, "uri": mlflow_server.uri}


def test_worker_compiles_the_graph_the_sweep_measures(swept):
    records = swept["out"].records
    assert [r.status for r in records] == ["FAILED", "FINISHED", "FAILED", "FAILED"]
    hits, misses = swept["deltas"][1]
    assert hits >= 1 and misses == 0  # NOOP: the worker's graph, nothing compiled anew here


def test_results_match_a_sweep_without_workers(swept):
    records, plain = swept["out"].records, swept["plain"]
    for record, result in zip(records, plain):
        assert record.error == (result.error or "")  # a record has "" for no error
        assert {k: record.metrics.get(k) for k in COMPARED} == {
            k: result.metrics.get(k) for k in COMPARED
        }
    assert "boom from a user score_mod" in records[2].error  # raised in the worker
    assert records[1].metrics.keys() == plain[1].metrics.keys()


def test_a_dead_worker_fails_its_config_only(swept):
    error = swept["out"].records[3].error
    assert error.startswith("compile worker died (killed by SIGKILL) compiling this config")
    assert swept["out"].records[1].status == "FINISHED"  # measured before and unharmed


def test_sweep_run_has_phase_metrics(swept):
    run = MlflowClient(swept["uri"]).get_run(swept["out"].run_id)
    phases = {k: v for k, v in run.data.metrics.items() if k.startswith("phase_")}
    assert phases.keys() == PHASES
    assert phases["phase_wait_s"] > 0 and phases["phase_timing_s"] > 0  # waited for NOOP


def children_of(parent: int, module: str = "flexbench.precompile") -> list[int]:
    """Pids of `python -m <module>` processes whose parent is `parent`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and module.encode() in cmd:
            found.append(int(entry.name))
    return found


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ctrl_c_leaves_no_compile_worker(fresh_cache, mlflow_server):
    args = "run --device cpu -b 1 -nh 2 -s 128 -d 16 -dtype float32 -mods noop,rel,causal"
    args += f" --compile-workers 2 --quiet --tracking-uri {mlflow_server.uri}"
    cmd = [sys.executable, "-m", "flexbench", *args.split()]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, workers = time.monotonic() + 120, []
    while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
        workers = children_of(proc.pid)
    assert len(workers) == 2, proc.stderr.read() if proc.poll() is not None else "no workers"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err
    assert not any(_group_alive(pid) for pid in workers)  # workers and their compilers


def test_compile_workers_count(monkeypatch):
    cuda = [BenchConfig(q_len=s, device="cuda", batch=1, heads=2, head_dim=16) for s in range(1, 9)]
    assert precompile.resolve_workers("auto", SWEEP) == 0  # CPU: compiling would perturb timing
    assert precompile.resolve_workers("auto", cuda[:1]) == 0  # one config: nothing to overlap
    assert 0 <= precompile.resolve_workers("auto", cuda[:2]) <= 1
    monkeypatch.setattr(precompile, "_gpu_free_memory", lambda: 12 * 2**30)  # a small GPU
    assert precompile.resolve_workers("auto", cuda) <= 2  # half of 12 GiB, 3 GiB each
    assert precompile.resolve_workers(3, SWEEP) == 3
    with pytest.raises(ValueError, match="must be >= 0"):
        precompile.resolve_workers(-1, SWEEP)


def test_speed_benchmark_reads_the_closing_line():
    """benchmarks/sweep_speed_gpu.py parses `flexbench run`'s closing line for its table."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import sweep_speed_gpu as bench

    phases = {f"phase_{p}_s": float(i) + 0.25 for i, p in enumerate(("compile", "check",
              "timing", "tracking", "wait"))}
    out = sweep.Outcome("abc123", skipped=0, run_id="r1", wall_s=95.04, phases=phases)
    parsed = bench.parse_closing("progress...\n" + sweep.closing_line(out) + "\n")
    assert parsed == {"sweep_id": "abc123", "configs": 0, "failed": 0, "inner_s": 95.0,
                      **{k: round(v, 1) for k, v in phases.items()}}
    runs = {"seed.cold": {"wall_s": 100.0}, "flexbench.cold": {"wall_s": 40.0, **parsed}}
    assert "| flexbench | cold | 40.0 | 0.40 | ≤ 0.5 met |" in bench.table({"runs": runs})
    runs["flexbench.cold"] = {"wall_s": 30.0, "returncode": "timeout"}  # killed: no ratio
    assert "| flexbench | cold | killed at 30.0 |  |  |" in bench.table({"runs": runs})


def test_a_worker_that_cannot_start_leaves_its_configs_to_the_sweep(tmp_path, monkeypatch, capsys):
    """A worker dying before it is ready (its environment, not a config) fails nothing: the
    measuring process compiles its configs, after one warning."""
    fake = tmp_path / "fake" / "flexbench"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "precompile.py").write_text("import sys\nsys.exit('broken environment')\n")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    configs = [NOOP, OWN, RAISES]
    with precompile.Pool(configs, workers=1) as pool:
        ready = [pool.take(i) for i in range(len(configs))]
    assert [r.failed for r in ready] == [None, None, None]
    assert "exited at start (exit code 1: broken environment)" in capsys.readouterr().err


def test_compile_cache_file_round_trip(swept, tmp_path, monkeypatch):
    """--compile-cache: what this process compiled or loaded, saved to a file, fills an empty
    cache elsewhere; a file torch cannot read is one warning, nothing loaded."""
    path, warnings = tmp_path / "compile.bin", []
    assert precompile.save_artifacts(path, warnings.append) > 0
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(elsewhere))
    assert precompile.load_artifacts(path, warnings.append) > 0
    assert any((elsewhere / "fxgraph").rglob("*"))  # FX-graph entries written into the cache
    path.write_bytes(b"not a cache")
    assert precompile.load_artifacts(path, warnings.append) == 0
    assert warnings == [f"warning: {path} holds no compile cache torch "
                        f"{torch.__version__} can read; ignored (and replaced after the sweep)"]


def _watch_pools(monkeypatch: pytest.MonkeyPatch) -> tuple[list, list]:
    """Every Pool entered (with its workers' processes) and the order of pools and connects."""
    pools, order, enter = [], [], precompile.Pool.__enter__
    connect = sweep.tracking.Tracker.connect

    def entered(self: precompile.Pool) -> precompile.Pool:
        pool = enter(self)
        pools.append((pool, [w.proc for w in pool._live]))
        order.append(("pool", [c.q_len for c in pool.configs]))
        return pool

    def connecting(self) -> bool:
        alive = [p.poll() is None for _, procs in pools for p in procs]
        order.append(("connect", alive))
        return connect(self)

    monkeypatch.setattr(precompile.Pool, "__enter__", entered)
    monkeypatch.setattr(sweep.tracking.Tracker, "connect", connecting)
    return pools, order


def _settings(tmp_path: Path, **kw: object) -> TrackingSettings:
    return TrackingSettings("early", f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "j"), **kw)


def test_workers_start_once_the_tracker_has_connected(fresh_cache, tmp_path, monkeypatch):
    """The compile workers start after this process has connected to MLflow (started before,
    they competed with its start-up on the H200: BENCHMARKS.md §13), and are stopped after."""
    pools, order = _watch_pools(monkeypatch)
    out = sweep.measure_and_track(
        [OWN, RAISES], _settings(tmp_path), progress=False, warn=print, compile_workers=1
    )
    assert order == [("connect", []), ("pool", [128, 256])]
    assert [r.status for r in out.records] == ["FAILED", "FAILED"]
    assert "boom from a user score_mod" in out.records[1].error
    assert all(p.poll() is not None for _, procs in pools for p in procs)


@pytest.mark.parametrize("exc", [RuntimeError("no tracking"), KeyboardInterrupt()])
def test_workers_are_stopped_when_connecting_fails(fresh_cache, tmp_path, monkeypatch, exc):
    """An error (or Ctrl-C) while connecting starts no compile worker, and leaves none."""
    pools, _ = _watch_pools(monkeypatch)

    def fail(self) -> bool:
        raise exc

    monkeypatch.setattr(sweep.tracking.Tracker, "connect", fail)
    with pytest.raises(type(exc)):
        sweep.measure_and_track(
            [OWN, NOOP, RAISES], _settings(tmp_path), progress=False, compile_workers=2
        )
    assert pools == []


def test_resume_starts_the_workers_on_the_configs_left(fresh_cache, tmp_path, monkeypatch):
    """--resume knows what is left after connecting: only those configs are compiled."""
    _, order = _watch_pools(monkeypatch)
    monkeypatch.setattr(
        sweep.tracking.Tracker, "resume_keys", lambda self, tags: {OWN.config_key()}
    )
    left = BenchConfig(q_len=64, score_mod="tests.user_mods:explode", **CPU)
    out = sweep.measure_and_track(
        [OWN, RAISES, left],
        _settings(tmp_path, resume=True),
        progress=False,
        warn=print,
        compile_workers=1,
    )
    assert order == [("connect", []), ("pool", [256, 64])]
    assert out.skipped == 1 and [r.status for r in out.records] == ["FAILED", "FAILED"]


def test_workers_run_at_a_lower_cpu_priority(fresh_cache):
    """A worker (and the compilers it starts) yields the CPU to the measuring process."""
    want = min(19, os.getpriority(os.PRIO_PROCESS, 0) + precompile.WORKER_NICE)
    with precompile.Pool([OWN, NOOP], 1) as pool:
        deadline, seen = time.monotonic() + 60, None
        while time.monotonic() < deadline and seen != want:
            pids = children_of(os.getpid())
            seen = os.getpriority(os.PRIO_PROCESS, pids[0]) if pids else None
            time.sleep(0.05)
        pool.close(graceful=False)
    assert seen == want


def test_a_config_goes_only_to_a_ready_worker(fresh_cache):
    """While the worker imports torch and its compiler, the sweep compiles its configs itself
    (a warm cache's compile takes less than those imports); the worker takes what is left."""
    configs = [OWN, NOOP, RAISES]
    with precompile.Pool(configs, 1) as pool:
        assert pool.take(0) == precompile.Ready() and pool.take(1) == precompile.Ready()
        deadline = time.monotonic() + 120
        while not pool._done[2].is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        taken = pool.take(2)
    assert taken.by_worker and "boom from a user score_mod" in taken.failed.error
