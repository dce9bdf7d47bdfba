"""Timers: CUDA (triton do_bench), CUDA graph replay (do_bench_cudagraph; backward: the same
method on the stream its forward ran on), CPU (perf_counter).

Each timer returns `Timing`: the median and 20th/80th percentiles in µs over all samples of
`ROUNDS` rounds. Callers interleave rounds of the baseline and flex (`time_pair`), so a clock or
thermal drift hits both alike instead of biasing one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from flexbench.flops import quantile

WARMUP_CALLS = 5  # eager calls before any timing (allocator, cuDNN/cuBLAS heuristics)
ROUNDS = 3  # interleaved rounds of baseline and flex
DO_BENCH_WARMUP_MS = 25
DO_BENCH_REP_MS = 60
CUDAGRAPH_REP_MS = 40  # per graph, replayed 10 times: 400 ms a call (10 or 20 ms: CV up to 2%)
GRAPH_REPLAYS = 10  # as do_bench_cudagraph
CPU_REPEATS = 5  # per round on CPU
QUANTILES = (0.2, 0.5, 0.8)
GPU_WARMUP_S = 1.0  # before a CUDA sweep: idle clocks would slow its first configs


@dataclass(frozen=True)
class Timing:
    """Median and spread of one timed function, µs."""

    median_us: float
    p20_us: float
    p80_us: float
    samples: int

    @classmethod
    def from_ms(cls, samples_ms: Sequence[float]) -> Timing:
        us = [s * 1e3 for s in samples_ms]
        p20, p50, p80 = (quantile(us, q) for q in QUANTILES)
        return cls(p50, p20, p80, len(us))


def _cpu_samples(fn: Callable[[], object], grads: Sequence[torch.Tensor]) -> list[float]:
    out = []
    for _ in range(CPU_REPEATS):
        for g in grads:
            g.grad = None
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def _do_bench_samples(fn: Callable[[], object], grads: Sequence[torch.Tensor]) -> list[float]:
    from triton.testing import do_bench

    return do_bench(
        fn,
        warmup=DO_BENCH_WARMUP_MS,
        rep=DO_BENCH_REP_MS,
        grad_to_none=list(grads) or None,
        return_mode="all",
    )


def _cudagraph_samples(fn: Callable[[], object], grads: Sequence[torch.Tensor]) -> list[float]:
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(
        fn, rep=CUDAGRAPH_REP_MS, grad_to_none=list(grads) or None, return_mode="all"
    )


def _stream_graph_samples(fn: Callable[[], object], grads: Sequence[torch.Tensor]) -> list[float]:
    """do_bench_cudagraph's method on the *current* stream, for a backward: autograd runs it on
    the stream of its forward, so the forward must have run on this (side) stream, and triton's
    timer, which makes a new stream, cannot capture it. `grads` are not used: the backward
    returns its gradients (measure's backward pair), nothing accumulates."""
    del grads
    stream = torch.cuda.current_stream()
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    fn()
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = start.elapsed_time(end) / 5
    calls = max(1, int(CUDAGRAPH_REP_MS / estimate_ms)) if estimate_ms > 0 else 1000
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(calls):
            fn()
    samples = []
    for _ in range(GRAPH_REPLAYS):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / calls)
    return samples


@contextmanager
def side_stream(sampler: str) -> Iterator[None]:
    """Run the block on a new CUDA stream when `sampler` captures there (else as is)."""
    if sampler != "cudagraph_stream":
        yield
        return
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)


SAMPLERS = {
    "cpu": _cpu_samples,
    "do_bench": _do_bench_samples,
    "cudagraph": _cudagraph_samples,
    "cudagraph_stream": _stream_graph_samples,
}


def timer_for(timer: str, kind: str) -> str:
    """The sampler a config's timer uses for `kind` (fwd/bwd): `cudagraph` replays both from
    CUDA graphs (backward on its forward's stream), `cudagraph_fwd` only the forward."""
    if timer == "cudagraph_fwd":
        return "cudagraph" if kind == "fwd" else "do_bench"
    if timer == "cudagraph" and kind == "bwd":
        return "cudagraph_stream"
    return timer


def warm_up(fn: Callable[[], object], device: str) -> None:
    """Run `fn` a few times untimed and wait for the device."""
    for _ in range(WARMUP_CALLS):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()


def time_pair(
    timer: str,
    baseline: Callable[[], object],
    flex: Callable[[], object],
    grads: Sequence[torch.Tensor] = (),
    rounds: int = ROUNDS,
) -> tuple[Timing, Timing]:
    """Time baseline and flex in interleaved rounds; grads are set to None before every call."""
    sample = SAMPLERS[timer]
    device = "cpu" if timer == "cpu" else "cuda"
    warm_up(baseline, device)
    warm_up(flex, device)
    base_ms: list[float] = []
    flex_ms: list[float] = []
    for _ in range(rounds):
        base_ms += sample(baseline, grads)
        flex_ms += sample(flex, grads)
    return Timing.from_ms(base_ms), Timing.from_ms(flex_ms)


def warm_gpu(seconds: float = GPU_WARMUP_S) -> None:
    """Busy the GPU with matmuls so clocks have ramped before the first config is timed."""
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            x @ x
        torch.cuda.synchronize()


def timed_call(fn: Callable[[], object], device: str) -> tuple[object, float]:
    """Call `fn` once, synchronized: (result, seconds). Used for compile time."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start
