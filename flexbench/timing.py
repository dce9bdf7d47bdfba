"""Timers: CUDA graph replay, triton's do_bench, CPU (perf_counter), sampled until converged.

`time_all` times several functions (flex and its baselines) in interleaved rounds, so a clock
or thermal drift hits all alike, and keeps sampling each until its relative noise (IQR /
median) is at the target, has settled above it, or its time is up (`stats.StopRule`,
`stats.settled`). Each series carries its sample
count, noise and the GPU state it ran in (SM clock, power, temperature, from NVML).

Two regimes on CUDA (`--regime`):
- `burst`: short samples (a CUDA graph of ~SAMPLE_MS["burst"]), an idle gap after each round so
  the GPU does not sit at its power limit, and a sample whose clock fell under the throttle
  threshold is dropped and retaken once the clock has recovered (nvbench's method). Measures
  kernel efficiency, as a short torch.profiler run does.
- `sustained`: back-to-back samples of SAMPLE_MS["sustained"] graphs, no gaps: the clock the
  GPU holds under continuous load (what a long training job sees).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from flexbench import stats, timers
from flexbench.flops import quantile
from flexbench.gpustate import Gpu, Reading
from flexbench.timers import SAMPLE_MS

WARMUP_CALLS = 5  # eager calls before any timing (allocator, cuDNN/cuBLAS heuristics)
QUANTILES = (0.2, 0.5, 0.8)
BURST_GAP = 1.0  # burst: idle this many times the round's length after each round
RECOVERY_POLL_S = 0.005  # burst: poll the clock this often while waiting for it to recover
RECOVERY_MAX_S = 1.0  # ... and give up waiting after this long (the sample is kept, throttled)
THROTTLE_THRESHOLD = 0.9  # a clock under 90% of the GPU's maximum is throttled
GPU_WARMUP_S = 1.0  # before a CUDA sweep: idle clocks would slow its first configs
# A GPU sleep of this many cycles (~1 ms at 2 GHz) is queued before each graph sample's start
# event: the sample then starts on a busy GPU, its replay already queued, so neither the host's
# launch (nor a wait for the GIL) nor the GPU's wake from the burst gap is counted as kernel
# time. On the H200 it read medians 0.6-1.6% lower, with 40% fewer samples to converge
# (BENCHMARKS.md §15).
PRESAMPLE_SLEEP_CYCLES = 2_000_000


@dataclass(frozen=True)
class GpuConditions:
    """The GPU state a series ran in: median and lowest SM clock, median power, highest
    temperature, and whether the median clock was under the throttle threshold."""

    sm_mhz: float
    sm_mhz_min: float
    power_w: float
    temp_c: float
    throttled: bool

    @classmethod
    def from_readings(cls, readings: Sequence[Reading], max_mhz: float, threshold: float):
        clocks = [r.sm_mhz for r in readings]
        return cls(
            quantile(clocks, 0.5),
            min(clocks),
            quantile([r.power_w for r in readings], 0.5),
            max(r.temp_c for r in readings),
            stats.throttled(clocks, max_mhz, threshold),
        )


@dataclass(frozen=True)
class Timing:
    """Median and spread of one timed function, µs; how it was sampled and in what state."""

    median_us: float
    p20_us: float
    p80_us: float
    samples: int
    noise_pct: float = 0.0
    converged: bool = True
    retaken: int = 0
    gpu: GpuConditions | None = None

    @classmethod
    def from_ms(cls, samples_ms: Sequence[float], **extra: object) -> Timing:
        us = [s * 1e3 for s in samples_ms]
        p20, p50, p80 = (quantile(us, q) for q in QUANTILES)
        noise = stats.relative_iqr(us) * 100
        return cls(p50, p20, p80, len(us), noise, **extra)

    def metrics(self, prefix: str) -> dict[str, float]:
        """This series' metrics under the MLflow names `<prefix>_us`, `_us_p20`, `_samples`,
        `_noise_pct`, `_unconverged`, and with GPU state `_sm_mhz`, `_sm_mhz_min`,
        `_power_w`, `_temp_c`, `_throttled`, `_retaken`."""
        m = {
            f"{prefix}_us": self.median_us,
            f"{prefix}_us_p20": self.p20_us,
            f"{prefix}_us_p80": self.p80_us,
            f"{prefix}_samples": float(self.samples),
            f"{prefix}_noise_pct": self.noise_pct,
            f"{prefix}_unconverged": float(not self.converged),
        }
        if self.gpu is not None:
            g = self.gpu
            m |= {
                f"{prefix}_sm_mhz": g.sm_mhz,
                f"{prefix}_sm_mhz_min": g.sm_mhz_min,
                f"{prefix}_power_w": g.power_w,
                f"{prefix}_temp_c": g.temp_c,
                f"{prefix}_throttled": float(g.throttled),
                f"{prefix}_retaken": float(self.retaken),
            }
        return m


@dataclass(frozen=True)
class Settings:
    """How to time: the regime, the stopping rule, the throttle threshold, the GPU to read,
    and one sample's length (ms; default: the regime's SAMPLE_MS, burst's on CPU)."""

    regime: str = "burst"
    rule: stats.StopRule = field(default_factory=stats.StopRule)
    throttle: float = THROTTLE_THRESHOLD
    gpu: Gpu | None = None
    sample_ms: float | None = None

    def __post_init__(self) -> None:
        if self.sample_ms is None:  # frozen: fill the default once
            default = SAMPLE_MS.get(self.regime, SAMPLE_MS["burst"])  # CPU: regime 'none'
            object.__setattr__(self, "sample_ms", default)


@dataclass
class HostGuard:
    """While another thread of this process may hold the GIL (a compile-ahead thread), a
    sample's start event could be recorded, the GIL lost, and the graph launched only when it
    comes back. The GPU sleep before each graph sample (PRESAMPLE_SLEEP_CYCLES, ~1 ms) keeps
    the GPU busy meanwhile; `on()` makes the GIL change hands within SWITCH_S (10x shorter than
    that sleep), `off()` restores the switch interval."""

    saved_interval: float | None = None

    SWITCH_S = 1e-4

    def on(self) -> None:
        if self.saved_interval is None:
            self.saved_interval = sys.getswitchinterval()
            sys.setswitchinterval(self.SWITCH_S)

    def off(self) -> None:
        if self.saved_interval is not None:
            sys.setswitchinterval(self.saved_interval)
            self.saved_interval = None


GUARD = HostGuard()


def _clear(grads: Sequence[torch.Tensor]) -> None:
    for g in grads:
        g.grad = None


class CpuSampler:
    """One call a sample, wall time (perf_counter)."""

    def __init__(self, fn: Callable[[], object], grads: Sequence[torch.Tensor], ms: float):
        self.fn, self.grads = fn, grads

    def sample(self) -> list[float]:
        _clear(self.grads)
        start = time.perf_counter()
        self.fn()
        return [(time.perf_counter() - start) * 1e3]


class DoBenchSampler:
    """triton's do_bench over `ms` of calls a sample (every call's time, ms)."""

    def __init__(self, fn: Callable[[], object], grads: Sequence[torch.Tensor], ms: float):
        self.fn, self.grads, self.ms = fn, list(grads) or None, ms

    def sample(self) -> list[float]:
        from triton.testing import do_bench

        return do_bench(self.fn, warmup=1, rep=self.ms, grad_to_none=self.grads, return_mode="all")


class GraphSampler:
    """A CUDA graph of as many calls as fill `ms`, captured on the *current* stream (so a
    backward can be captured on the stream its forward ran on: see side_stream), replayed
    once a sample: ms per call, without host overhead. do_bench_cudagraph's method; `grads`
    are not used: timed calls return their gradients (measure's backward pair)."""

    def __init__(self, fn: Callable[[], object], grads: Sequence[torch.Tensor], ms: float):
        self.start, self.end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        fn()
        self.start.record()
        for _ in range(5):
            fn()
        self.end.record()
        torch.cuda.synchronize()
        estimate_ms = self.start.elapsed_time(self.end) / 5
        self.calls = max(1, int(ms / estimate_ms)) if estimate_ms > 0 else 1000
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a compile-ahead thread's CUDA calls do not void this capture
        stream = torch.cuda.current_stream()
        with torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"):
            for _ in range(self.calls):
                fn()

    def sample(self) -> list[float]:
        torch.cuda._sleep(PRESAMPLE_SLEEP_CYCLES)  # the sample starts on a busy GPU
        self.start.record()
        self.graph.replay()
        self.end.record()
        self.end.synchronize()
        return [self.start.elapsed_time(self.end) / self.calls]


# The class of each sampler of the timer table (timers.SAMPLERS describes them).
SAMPLERS = {
    "cpu": CpuSampler,
    "do_bench": DoBenchSampler,
    "cudagraph": GraphSampler,
}


def sampler_for(timer: str, kind: str) -> str:
    """The name of the sampler a config's timer uses for `kind` (fwd/bwd), from the timer
    table: `cudagraph` replays both from CUDA graphs (backward on its forward's stream),
    `cudagraph_fwd` only the forward."""
    return timers.TIMERS[timer].sampler(kind)


@contextmanager
def side_stream(sampler: str) -> Iterator[None]:
    """Run the block on a new CUDA stream when `sampler` captures graphs (else as is): a graph
    is captured on the current stream, which must not be the default one."""
    if not timers.SAMPLERS[sampler].graph:
        yield
        return
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)


def warm_up(fn: Callable[[], object], device: str) -> None:
    """Run `fn` a few times untimed and wait for the device."""
    for _ in range(WARMUP_CALLS):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class _Series:
    """One function being sampled."""

    sampler: object
    samples_ms: list[float] = field(default_factory=list)
    readings: list[Reading] = field(default_factory=list)
    retaken: int = 0
    stop: str | None = None
    noises: list[float] = field(default_factory=list)  # relative IQR after each round


def _recover(gpu: Gpu, floor_mhz: float) -> None:
    """Wait (at most RECOVERY_MAX_S) for the SM clock to climb back to `floor_mhz`."""
    deadline = time.perf_counter() + RECOVERY_MAX_S
    while gpu.clock() < floor_mhz and time.perf_counter() < deadline:
        time.sleep(RECOVERY_POLL_S)


def _take(s: _Series, settings: Settings, floor_mhz: float, out_of_time: bool) -> None:
    """One sample of `s`, with the GPU state after it. Burst: a sample whose clock fell under
    the threshold is dropped and retaken after the clock recovers, while time allows."""
    gpu = settings.gpu
    for _ in range(settings.rule.min_samples):
        ms = s.sampler.sample()
        reading = gpu.read() if gpu is not None else None
        retake = settings.regime == "burst" and reading is not None and not out_of_time
        if not (retake and stats.below(reading.sm_mhz, floor_mhz, 1.0)):
            break
        s.retaken += 1
        _recover(gpu, floor_mhz)
    s.samples_ms += ms
    if reading is not None:
        s.readings.append(reading)


def _finish(s: _Series, settings: Settings, max_mhz: float) -> Timing:
    gpu = (
        GpuConditions.from_readings(s.readings, max_mhz, settings.throttle) if s.readings else None
    )
    converged = s.stop == stats.CONVERGED
    return Timing.from_ms(s.samples_ms, converged=converged, retaken=s.retaken, gpu=gpu)


def time_all(
    sampler: str,
    fns: dict[str, Callable[[], object]],
    settings: Settings | None = None,
    grads: Sequence[torch.Tensor] = (),
) -> dict[str, Timing]:
    """Time every function in `fns` (name -> call) with `sampler` in interleaved rounds until
    each has converged, settled or hit the time limit; grads are set to None before every
    CPU/do_bench call."""
    settings = settings or Settings()
    device = timers.SAMPLERS[sampler].device
    for fn in fns.values():
        warm_up(fn, device)
    make = SAMPLERS[sampler]
    series = {name: _Series(make(fn, grads, settings.sample_ms)) for name, fn in fns.items()}
    max_mhz = settings.gpu.max_sm_mhz() if settings.gpu is not None else 0.0
    floor_mhz = settings.throttle * max_mhz
    start = time.perf_counter()
    while active := [s for s in series.values() if s.stop is None]:
        round_start = time.perf_counter()
        for s in active:
            out_of_time = round_start - start >= settings.rule.max_time_s
            _take(s, settings, floor_mhz, out_of_time)
        elapsed = time.perf_counter() - start
        for s in active:
            s.noises.append(stats.relative_iqr(s.samples_ms))
            s.stop = stats.stop_reason(s.samples_ms, elapsed, settings.rule, s.noises)
        if settings.regime == "burst" and device == "cuda":
            time.sleep((time.perf_counter() - round_start) * BURST_GAP)
    return {name: _finish(s, settings, max_mhz) for name, s in series.items()}


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
