"""ahead: flex aot-compiled (torch.compile(...).aot_compile), and the next config compiled on a
thread while this one is timed. On CPU for real (forward only, aot compiles take seconds);
the overlap itself is on only for CUDA-graph timers, so the tests that exercise the thread here
allow it on CPU by patching `ahead.may_overlap`.
"""

from __future__ import annotations

import sys
import threading

import pytest

from flexbench import ahead, measure, pipeline, precompile, timing
from flexbench.config import BenchConfig, with_options

pytestmark = pytest.mark.slow

CPU = dict(batch=1, heads=2, head_dim=16, q_len=128, dtype="float32", device="cpu")
CAUSAL = BenchConfig(score_mod="causal", **CPU)
BIAS = BenchConfig(score_mod="head_bias", **CPU)
ERRORS = ("max_abs_err", "fwd_max_abs_err", "sparsity")

needs_aot = pytest.mark.skipif(not ahead._torch_has_aot(), reason="torch without aot_compile")


@needs_aot
@pytest.mark.parametrize("c", [CAUSAL, BIAS], ids=lambda c: c.mod_name)
def test_aot_compiled_flex_gives_what_dynamo_compiled_flex_gives(c):
    aot, dynamo = measure.Bench(aot=True).run(c), measure.Bench(aot=False).run(c)
    assert aot.ok and dynamo.ok, (aot.error, dynamo.error)
    assert {k: aot.metrics[k] for k in ERRORS} == {k: dynamo.metrics[k] for k in ERRORS}


@needs_aot
def test_the_next_config_compiles_on_a_thread_while_this_one_is_timed(monkeypatch):
    monkeypatch.setattr(ahead, "may_overlap", lambda c: True)
    started = []
    real_start = ahead.start
    monkeypatch.setattr(
        ahead, "start", lambda setup: started.append(setup.flex) or real_start(setup)
    )
    bench = measure.Bench(aot=True)
    bench.upcoming = BIAS
    first = bench.run(CAUSAL)
    assert first.ok, first.error
    assert len(started) == 1 and started[0].kwargs["score_mod"] is not None  # BIAS's flex
    assert sys.getswitchinterval() == pytest.approx(timing.HostGuard.SWITCH_S)  # guarded
    second = bench.run(BIAS)
    assert second.ok, second.error
    assert timing.GUARD.saved_interval is None  # guard off again
    assert second.metrics["compile_s"] >= started[0].compile_s > 0  # its thread's compile
    alone = measure.Bench(aot=True).run(BIAS)
    assert {k: second.metrics[k] for k in ERRORS} == {k: alone.metrics[k] for k in ERRORS}


@needs_aot
def test_a_compile_that_fails_on_the_thread_is_done_again_in_line(monkeypatch):
    monkeypatch.setattr(ahead, "may_overlap", lambda c: True)
    real_compile = ahead.AotFlex.compile

    def failing_on_thread(self):
        if threading.current_thread().name == "flexbench-compile-ahead":
            raise RuntimeError("boom on the thread")
        real_compile(self)

    monkeypatch.setattr(ahead.AotFlex, "compile", failing_on_thread)
    bench = measure.Bench(aot=True)
    bench.upcoming = BIAS
    assert bench.run(CAUSAL).ok
    second = bench.run(BIAS)
    assert second.ok, second.error  # compiled again in its turn


def test_overlap_only_beside_cuda_graph_timers_and_eager_baselines():
    gpu = with_options(CAUSAL, device="cuda", calculate_bwd=True, timer="cudagraph")
    assert ahead.may_overlap(gpu)
    assert not ahead.may_overlap(with_options(gpu, timer="do_bench"))  # host time is timed
    assert not ahead.may_overlap(with_options(gpu, timer="cudagraph_fwd"))  # bwd by do_bench
    assert ahead.may_overlap(with_options(gpu, timer="cudagraph_fwd", calculate_bwd=False))
    assert not ahead.may_overlap(with_options(gpu, baselines="sdpa,inductor_math"))  # dynamo


def test_aot_is_opt_in_for_static_default_mode_cuda_configs(monkeypatch):
    bench = measure.Bench()
    assert not bench.uses_aot(CAUSAL)  # CPU: dynamo's first call, as the CPU timer sees it
    forced = measure.Bench(aot=True)
    assert forced.uses_aot(CAUSAL)
    assert not forced.uses_aot(with_options(CAUSAL, dynamic=True))
    assert not forced.uses_aot(with_options(CAUSAL, max_autotune=True))
    gpu = with_options(CAUSAL, device="cuda")
    monkeypatch.delenv(ahead.ENV, raising=False)
    assert not ahead.uses_aot(gpu)  # off unless asked for
    monkeypatch.setenv(ahead.ENV, "1")
    assert ahead.uses_aot(gpu) == ahead._torch_has_aot()
    monkeypatch.setenv(ahead.ENV, "0")
    assert not ahead.uses_aot(gpu)


def test_host_guard_shortens_the_switch_interval_and_restores_it():
    before = sys.getswitchinterval()
    guard = timing.HostGuard()
    guard.on()
    guard.on()  # twice: still restores the original
    assert sys.getswitchinterval() == pytest.approx(timing.HostGuard.SWITCH_S)
    guard.off()
    assert sys.getswitchinterval() == before


def test_a_config_is_compiled_ahead_only_if_no_worker_has_it_or_failed_it():
    configs = [CAUSAL, BIAS, CAUSAL]
    with precompile.Pool(configs, workers=0) as pool:
        assert pool.claim(1)  # nobody else compiles: the measuring process may
    pool = precompile.Pool(configs, workers=0)
    pool._state = [precompile.MAIN, precompile.WORKER, precompile.DONE]
    pool._failed = {2: measure.Result(CAUSAL, error="boom")}
    assert not pool.claim(1) and not pool.claim(2)
    pool._failed = {2: None}
    assert pool.claim(2)


def test_upcoming_needs_an_overlapping_pair(monkeypatch):
    with precompile.Pool([CAUSAL, BIAS], workers=0) as pool:
        bench = measure.Bench(aot=True)
        assert pipeline.upcoming([CAUSAL, BIAS], 1, pool, bench) is None  # CPU timer
        monkeypatch.setattr(ahead, "may_overlap", lambda c: True)
        assert pipeline.upcoming([CAUSAL, BIAS], 1, pool, bench) is BIAS
        assert pipeline.upcoming([CAUSAL, BIAS], 2, pool, bench) is None  # no config 2
