"""measure + timing: one compiled CPU sweep (isolation, contract metrics, dynamo settings),
the correctness check, runtime refusals, compiled-callable reuse and the CPU timer.

The sweep compiles flex attention for real (seconds per config on CPU), so it runs once per
module and the tests read its results.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time

import pytest
import torch

from flexbench import flops, kernels, measure, pipeline, stats, timing
from flexbench.config import BenchConfig, with_options
from flexbench.record import RunRecord

CPU = dict(batch=1, heads=2, head_dim=16, dtype="float32", device="cpu")
CAUSAL = BenchConfig(q_len=256, score_mod="causal", **CPU)  # 2×2 blocks, 1 skipped
EXPLODE = BenchConfig(q_len=128, score_mod="tests.user_mods:explode", **CPU)
DECODE = BenchConfig(**{**CPU, "heads": 4}, kv_heads=2, q_len=1, kv_len=128)  # GQA, noop
# ALiBi with its sign flipped, carrying the right ALiBi as its reference: flex computes the mod
# faithfully, the mod is wrong, and the check must say so.
WRONG = BenchConfig(q_len=128, score_mod="tests.user_mods:generate_alibi_flipped({heads})", **CPU)
# A user mask factory filled per config: 2 documents of one 128-block each.
DOCS = BenchConfig(q_len=256, score_mod="tests.user_mods:generate_doc_mask({kv_len}, 2)", **CPU)
SWEEP = [CAUSAL, EXPLODE, DECODE, WRONG, DOCS]
# Settings a caller had before the sweep: the sweep must hand them back unchanged.
OUTER = {"recompile_limit": 5, "accumulated_recompile_limit": 300,
         "fail_on_recompile_limit_hit": False, "automatic_dynamic_shapes": True}


def _dynamo_now() -> dict:
    return {k: getattr(torch._dynamo.config, k) for k in OUTER}


@pytest.fixture(scope="module")
def sweep():
    """Run SWEEP once: results, what on_result saw (with dynamo settings then), settings after."""
    seen = []
    with torch._dynamo.config.patch(OUTER):
        expected_limit = pipeline.default_recompile_limit(len(SWEEP))
        results = pipeline.measure_configs(
            SWEEP, on_result=lambda r: seen.append((r, _dynamo_now())), progress=False
        )
        after = _dynamo_now()
    return {"results": results, "seen": seen, "after": after, "limit": expected_limit}


def test_sweep_gives_one_result_per_config_in_order(sweep):
    results = sweep["results"]
    assert [r.config for r in results] == SWEEP
    assert [r for r, _ in sweep["seen"]] == results  # on_result saw each as it landed
    assert [r.ok for r in results] == [True, False, True, False, True]


def test_failing_config_is_one_line_and_the_sweep_goes_on(sweep):
    failed, after = sweep["results"][1], sweep["results"][2]
    assert "\n" not in failed.error and len(failed.error) <= 300
    assert "boom from a user score_mod" in failed.error  # the user's own message survives
    assert not any(k.startswith("fwd_") for k in failed.metrics)
    record = RunRecord.from_result(failed)
    assert record.status == "FAILED" and record.error == failed.error
    assert after.ok and after.metrics["fwd_speedup"] > 0


def test_contract_metrics_of_a_passing_config(sweep):
    r = sweep["results"][0]
    m = r.metrics
    for kind in ("eager", "compiled"):
        assert {f"fwd_{kind}_us", f"fwd_{kind}_us_p20", f"fwd_{kind}_us_p80",
                f"fwd_{kind}_tflops"} <= m.keys()
        assert 0 < m[f"fwd_{kind}_us_p20"] <= m[f"fwd_{kind}_us"] <= m[f"fwd_{kind}_us_p80"]
    assert m["fwd_speedup"] == pytest.approx(m["fwd_eager_us"] / m["fwd_compiled_us"])
    # causal 256×256 in 128-blocks: 1 of 4 blocks skipped; FLOPs count the 3 computed.
    assert m["sparsity"] == pytest.approx(0.25)
    work = flops.attention_flops(1, 2, 256, 256, 16, density=0.75)
    assert m["fwd_compiled_tflops"] == pytest.approx(flops.tflops(work, m["fwd_compiled_us"]))
    assert m["fwd_eager_tflops"] == pytest.approx(flops.tflops(work, m["fwd_eager_us"]))
    assert 0 <= m["max_abs_err"] < 1e-4 and m["compile_s"] > 0
    assert not any(k.startswith("bwd_") for k in m) and "peak_mem_mb" not in m  # CPU, fwd
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    assert r.baseline == "sdpa_is_causal"
    record = RunRecord.from_result(r)
    assert record.status == "FINISHED" and record.error == ""
    assert record.config_key == CAUSAL.config_key()
    assert record.run_name == "causal b1 h2 s256 d16 fp32"
    assert record.params == {**CAUSAL.params(), "baseline": "sdpa_is_causal"}


def test_decode_gqa_config_reports_bandwidth(sweep):
    m = sweep["results"][2].metrics
    assert m["sparsity"] == 0.0 and m["max_abs_err"] < 1e-4
    nbytes = flops.kv_bytes(1, 2, 128, 16, 4)  # K and V of the 2 kv heads, float32
    assert m["fwd_compiled_tbps"] == pytest.approx(flops.tbps(nbytes, m["fwd_compiled_us"]))
    assert m["fwd_eager_tbps"] == pytest.approx(flops.tbps(nbytes, m["fwd_eager_us"]))


def test_wrong_output_fails_the_check_and_is_never_timed(sweep):
    r = sweep["results"][3]
    assert r.error.startswith("CheckFailed: correctness check failed: out max_abs_err ")
    assert r.error.endswith("(float32); not timed")
    assert r.metrics["max_abs_err"] > 1e-3  # logged, so the failure can be judged
    assert "fwd_speedup" not in r.metrics and "fwd_compiled_us" not in r.metrics


def test_a_user_mask_factory_is_block_sparse_with_an_sdpa_baseline(sweep):
    r = sweep["results"][4]
    assert r.ok and r.baseline == "sdpa_attn_mask"
    assert r.metrics["sparsity"] == pytest.approx(0.5)  # the 2 off-diagonal blocks skipped
    assert r.metrics["max_abs_err"] < 1e-4 and r.metrics["fwd_speedup"] > 0
    params = RunRecord.from_result(r).params
    assert params["score_mod"] == "tests.user_mods:generate_doc_mask(256, 2)"
    assert params["mod_sha"] == DOCS.mod_sha and len(DOCS.mod_sha) == 12


def test_dynamo_settings_hold_during_the_sweep_and_are_restored(sweep):
    during = {k: v for _, state in sweep["seen"] for k, v in state.items()}
    assert during["recompile_limit"] == sweep["limit"] >= 8 + 2 * len(SWEEP)
    assert during["fail_on_recompile_limit_hit"] is True
    assert during["automatic_dynamic_shapes"] is False  # no config asked for dynamic
    assert sweep["after"] == OUTER  # the caller's values, not dynamo's defaults


def test_hitting_the_recompile_limit_fails_that_config_loudly(sweep):
    # CAUSAL's graph is cached from the module sweep; a new shape of the same mod needs a
    # second graph, which a limit of 1 forbids: without the hard failure it would run eager.
    bigger = with_options(CAUSAL, q_len=384)
    before = _dynamo_now()
    cached, over = pipeline.measure_configs([CAUSAL, bigger], progress=False, recompile_limit=1)
    assert cached.ok, cached.error
    assert over.error.startswith("recompile limit (1) hit: torch.compile would fall back")
    assert "fwd_speedup" not in over.metrics
    assert _dynamo_now() == before


def test_default_recompile_limit_counts_graphs_of_earlier_sweeps(sweep):
    # After the module sweep, flex_attention holds graphs; a later sweep's room is on top.
    held = pipeline.cached_graphs()
    assert held >= 2  # CAUSAL and DECODE at least
    assert pipeline.default_recompile_limit(3) == held + 8 + 2 * 3


def test_cached_graphs_does_not_import_dynamo():
    """The sweep sizes its recompile limit before starting compile workers: without a second
    of importing dynamo when nothing in the process compiled yet."""
    code = ("import sys; from flexbench import pipeline; "
            "print(pipeline.cached_graphs(), 'torch._dynamo' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.split() == ["0", "False"], proc.stderr


def test_gpu_warm_up_overlaps_the_first_compile_and_ends_before_kernels_and_timing(
    sweep, monkeypatch
):
    """The GPU warm-up runs while the first config compiles, and is over before its kernels
    profile and timers run (CPU stands in for CUDA: the same order)."""
    log, compiling, gpu_warm_up = [], threading.Event(), pipeline.gpu_warm_up

    def warm() -> None:
        log.append("warm start")
        assert compiling.wait(60), "the first config did not compile during the warm-up"
        time.sleep(0.2)
        log.append("warm end")

    def logged(name, fn, event=None):
        def call(*args, **kwargs):
            log.append(name)
            if event is not None:
                event.set()
            return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(pipeline, "gpu_warm_up", lambda configs: warm)
    monkeypatch.setattr(measure, "_first_calls", logged("compile", measure._first_calls, compiling))
    monkeypatch.setattr(kernels, "profile", logged("kernels", kernels.profile))
    monkeypatch.setattr(timing, "time_all", logged("timing", timing.time_all))
    results = pipeline.measure_configs([CAUSAL, CAUSAL], progress=False)
    assert [r.error for r in results] == [None, None]
    assert log.index("warm start") < log.index("compile") < log.index("warm end")
    assert log.index("warm end") < log.index("kernels") < log.index("timing")
    assert log.count("warm start") == 1 and results[0].phases["warm_up"] > 0
    assert gpu_warm_up([CAUSAL]) is None
    assert gpu_warm_up([CAUSAL, with_options(CAUSAL, device="cuda")]) is timing.warm_gpu


def test_a_max_autotune_sweep_compiles_after_the_warm_up(monkeypatch):
    """Autotuning times candidate kernels while compiling: never beside the GPU warm-up."""
    log = []
    monkeypatch.setattr(pipeline, "gpu_warm_up", lambda configs: lambda: (
        time.sleep(0.2), log.append("warm end")))
    monkeypatch.setattr(measure.Bench, "run", lambda self, c: (
        log.append("run"), measure.Result(c))[1])
    pipeline.measure_configs([with_options(CAUSAL, max_autotune=True)], progress=False)
    assert log == ["warm end", "run"]


def test_a_failing_warm_up_fails_the_config_that_waits_for_it(sweep):
    bench = measure.Bench()
    bench.warm_up(lambda: 1 / 0)
    with measure.dynamo_settings(False, pipeline.default_recompile_limit(1)):
        result = bench.run(CAUSAL)
    assert result.error.startswith("ZeroDivisionError")
    bench.settle()  # raised once: nothing left to wait for


def test_one_compiled_callable_per_dynamic_autotune_and_kernel_options():
    bench = measure.Bench()  # torch.compile is lazy: nothing compiles here
    base = bench.compiled(CAUSAL)
    for same in (DECODE, WRONG, with_options(CAUSAL, q_len=4096, dtype="bfloat16")):
        assert bench.compiled(same) is base
    others = [
        bench.compiled(with_options(CAUSAL, dynamic=True)),
        bench.compiled(with_options(CAUSAL, max_autotune=True)),
        bench.compiled(with_options(CAUSAL, kernel_options='{"BLOCK_M": 64}')),
    ]
    assert len({id(base), *map(id, others)}) == 4
    assert bench.compiled(with_options(CAUSAL, kernel_options={"BLOCK_M": 64})) is others[2]


def test_block_mask_built_once_per_mod_and_lengths():
    bench = measure.Bench()
    built = measure.mods.resolve("causal").build(measure.mods.Dims(2, 256, 256, "cpu"))
    first = bench.block_mask(CAUSAL, built)
    assert bench.block_mask(with_options(CAUSAL, heads=4, batch=3), built) is first
    assert bench.block_mask(with_options(CAUSAL, q_len=128), built) is not first
    assert bench.block_mask(DECODE, measure.mods.resolve("noop").build(
        measure.mods.Dims(4, 1, 128, "cpu"))) is None


def test_backward_on_cpu_is_refused_up_front():
    with pytest.raises(RuntimeError, match=r"^flex attention backward needs CUDA"):
        measure.check_runtime("cpu", calculate_bwd=True)
    seen = []
    bwd = with_options(CAUSAL, calculate_bwd=True)
    with pytest.raises(RuntimeError, match="flex attention backward needs CUDA") as info:
        pipeline.measure_configs([CAUSAL, bwd], on_result=seen.append, progress=False)
    assert seen == [] and "\n" not in str(info.value)  # refused before any config ran
    measure.check_runtime("cpu", calculate_bwd=False)  # forward on CPU is fine


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line():
    with pytest.raises(RuntimeError, match=r"^CUDA is not available on this machine; use "):
        measure.check_runtime("cuda", calculate_bwd=False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        cuda = with_options(CAUSAL, device="cuda", timer="auto")
        pipeline.measure_configs([cuda], progress=False)


def test_check_passes_equal_tensors():
    expected = [torch.randn(2, 2, 8, 4, dtype=torch.float64) for _ in range(4)]
    actual = [e.float() for e in expected]
    err, failure = measure.check(actual, expected, "float32")
    assert failure is None and err < 1e-6


def test_check_reports_the_first_tensor_over_tolerance_and_the_worst_error():
    expected = [torch.zeros(1, 2, 4, 8, dtype=torch.float64) for _ in range(4)]
    expected = [e + 1.0 for e in expected]  # max |reference| = 1: bound = atol + rtol·1
    actual = [e.float().clone() for e in expected]
    actual[2][0, 1, 2, 3] += 0.05  # dk
    actual[3][0, 0, 0, 0] -= 0.2  # dv, the worst
    err, failure = measure.check(actual, expected, "float32")
    assert err == pytest.approx(0.2)
    assert failure == "correctness check failed: dk max_abs_err 0.05 > 0.002"
    # bfloat16's tolerance (0.03 + 0.03·1) lets 0.05 through, not 0.2.
    _, failure = measure.check(actual, expected, "bfloat16")
    assert failure == "correctness check failed: dv max_abs_err 0.2 > 0.06"


def test_check_fails_nan():
    expected = [torch.ones(4, dtype=torch.float64)]
    err, failure = measure.check([torch.tensor([1.0, math.nan, 1.0, 1.0])], expected, "float16")
    assert err == math.inf and failure.startswith("correctness check failed: out max_abs_err nan")


def test_make_inputs_are_seeded_in_the_seeds_layout():
    c = with_options(DECODE, q_len=3, kv_len=5, batch=2)
    q, k, v = measure.make_inputs(c, requires_grad=True)
    assert (q.shape, k.shape, v.shape) == ((2, 4, 3, 16), (2, 2, 5, 16), (2, 2, 5, 16))
    assert q.transpose(1, 2).is_contiguous()  # [B,H,S,D] view of [B,S,H,D] storage
    assert q.dtype == torch.float32 and q.requires_grad and k.requires_grad
    again = measure.make_inputs(c, requires_grad=False)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), again))
    assert not torch.equal(k, v)


def test_one_line_keeps_the_cause():
    try:
        try:
            raise ValueError("inner reason\nmore detail")
        except ValueError as exc:
            raise RuntimeError("outer\nline two") from exc
    except RuntimeError as exc:
        assert measure.one_line(exc) == "RuntimeError: outer (ValueError: inner reason)"
    assert measure.one_line(KeyError()) == "KeyError"
    assert len(measure.one_line(RuntimeError("x" * 1000))) == 300


def test_timing_statistics_from_samples():
    t = timing.Timing.from_ms([0.005, 0.001, 0.004, 0.002, 0.003])  # 1..5 µs, unsorted
    assert (t.median_us, t.p20_us, t.p80_us, t.samples) == pytest.approx((3.0, 1.8, 4.2, 5))


def test_cpu_timer_warms_up_interleaves_and_clears_grads():
    calls = []
    x = torch.zeros(1, requires_grad=True)

    def fn(name):
        def call():
            assert calls[timing.WARMUP_CALLS * 2:] == [] or x.grad is None
            calls.append(name)
            x.grad = torch.ones(1)  # what backward would leave behind

        return call

    rule = stats.StopRule(max_noise=0.5, min_samples=4, max_time_s=60)  # converges at 4
    out = timing.time_all("cpu", {"base": fn("base"), "flex": fn("flex")},
                          timing.Settings("none", rule), grads=(x,))
    base, flex = out["base"], out["flex"]
    w = timing.WARMUP_CALLS
    timed = calls[2 * w:]
    assert calls[:2 * w] == ["base"] * w + ["flex"] * w
    assert timed[:4] == ["base", "flex"] * 2  # one sample of each per round
    assert base.samples == timed.count("base") and flex.samples == timed.count("flex")
    assert base.samples >= 4 and 0 < base.p20_us <= base.median_us <= base.p80_us


def test_timed_call_returns_the_result_and_seconds():
    out, seconds = timing.timed_call(lambda: 42, "cpu")
    assert out == 42 and 0 <= seconds < 60


def _sdpa_pair() -> tuple:
    """An eager SDPA forward on grad-requiring CPU inputs (the seed's layout), and a dout."""
    q, k, v = measure.make_inputs(BenchConfig(q_len=64, **CPU), requires_grad=True)

    def fwd():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return fwd, torch.randn_like(q), (q, k, v)


def test_backward_pair_returns_grads_without_accumulating_and_repeats():
    fwd, dout, inputs = _sdpa_pair()
    expected = torch.autograd.grad(fwd(), inputs, dout)
    eager_bwd, flex_bwd = measure._backward_pair(fwd, fwd, dout, inputs)
    for call in (eager_bwd, eager_bwd, flex_bwd):  # the kept forward graph replays
        grads = call()
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want)
    assert all(t.grad is None for t in inputs)  # a timed call is the backward kernels only


def test_backward_graph_capture_failure_names_the_fallback_timer(monkeypatch):
    import contextlib

    def capture_fails(fn, grads, ms):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")

    monkeypatch.setitem(timing.SAMPLERS, "cudagraph", capture_fails)
    monkeypatch.setattr(timing, "side_stream", lambda sampler: contextlib.nullcontext())
    monkeypatch.setattr(timing, "warm_up", lambda fn, device: None)  # no CUDA to sync here
    fwd, dout, inputs = _sdpa_pair()
    with pytest.raises(RuntimeError) as info:
        measure._time_backward("cudagraph", {"sdpa": fwd, "compiled": fwd}, dout, inputs)
    assert str(info.value) == (
        "backward could not be timed in a CUDA graph (RuntimeError: CUDA error: operation not "
        "permitted when stream is capturing); rerun with --timer cudagraph_fwd (backward with "
        "do_bench)")
    assert info.value.__cause__ is None  # one line: Bench.run must not append the cause again
