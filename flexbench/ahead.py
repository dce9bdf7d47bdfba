"""Compile ahead: the next config's flex compiled on a thread while this config is timed.

`torch.compile(fn).aot_compile(example_inputs)` compiles forward and backward from fake tensors
without running them (on the H200, torch 2.11, its outputs and gradients equal the normally
compiled call's bit for bit: BENCHMARKS.md §14), so it can run beside the timer. A config that
uses it (`uses_aot`) calls its aot-compiled flex for everything -- check, kernels, timing -- in
the measuring process and in the compile workers alike, so the workers fill exactly the cache
entries the measuring process looks up.

Two hazards, and what is done about them:
- dynamo's tracing state is global: a dynamo-compiled function called in one thread while
  another traces raises. So config i+1 is compiled beside config i only when i's timed calls
  never enter dynamo (its flex aot-compiled, no compiled baseline) and are CUDA-graph replays
  (`may_overlap`).
- the timer's events bracket a graph replay; a thread holding the GIL between the start event
  and the replay would count host time as kernel time. Every graph sample is preceded by a GPU
  sleep (timing.PRESAMPLE_SLEEP_CYCLES, ~1 ms) longer than any such wait while a thread compiles
  (`timing.HostGuard` shortens the GIL's switch interval to 0.1 ms), and only CUDA-graph
  timers are overlapped.

Off by default: FLEXBENCH_COMPILE_AHEAD=1 turns both on. On the H200 it halves the warm
16-config sweep's compile phase (10.1 to 5.3 s) and saved 1-4 s of ~42 s; the 0.9% lower flex
medians first seen with it were the guard's GPU sleep (now before every sample), and beside it
flex forward medians still read +0.6% in 2 sweeps against 2 (BENCHMARKS.md §15): opt-in.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import flex_attention

from flexbench import env, timers
from flexbench.config import BenchConfig

ENV = env.COMPILE_AHEAD
COMPILED_BASELINES = frozenset({"inductor_math"})  # timed through dynamo: no tracing beside


def available() -> bool:
    """Compiling ahead is asked for (FLEXBENCH_COMPILE_AHEAD=1) and this torch can
    (torch.compile(...).aot_compile)."""
    return bool(env.switch(ENV)) and _torch_has_aot()


@cache
def _torch_has_aot() -> bool:
    with _aot_enabled():  # the compiled wrapper has aot_compile only when it is on
        return hasattr(torch.compile(flex_attention, fullgraph=True), "aot_compile")


def _aot_enabled() -> AbstractContextManager:
    """dynamo's enable_aot_compile on (torch 2.11 has it off by default)."""
    if "enable_aot_compile" in getattr(torch._dynamo.config, "_config", {}):
        return torch._dynamo.config.patch(enable_aot_compile=True)
    return nullcontext()


def uses_aot(c: BenchConfig, on: bool | None = None) -> bool:
    """Config `c` runs an aot-compiled flex: static shapes, default compile mode (a dynamic
    graph or autotuning is left to dynamo's own first call), and `on` (None: on CUDA when
    `available`)."""
    if on is None:
        on = c.device == "cuda" and available()
    return on and not (c.dynamic or c.max_autotune)


def may_overlap(c: BenchConfig) -> bool:
    """Another config may compile while `c` is timed (if `c`'s flex is aot-compiled): no
    baseline goes through dynamo, and both its series are CUDA-graph replays (host time not
    counted)."""
    timer = timers.TIMERS[c.timer]
    graphs = timers.SAMPLERS[timer.fwd].graph and (not c.calculate_bwd or timer.graph_bwd)
    named = {n.strip() for n in c.baselines.split(",")}
    return graphs and not named & COMPILED_BASELINES


class AotFlex:
    """flex_attention on fixed inputs and keywords, aot-compiled (default mode: `uses_aot`
    leaves autotuning to dynamo) on first call, or by `compile()`, e.g. on a thread ahead."""

    def __init__(self, inputs: Sequence[Tensor], kwargs: dict) -> None:
        self.inputs, self.kwargs = tuple(inputs), kwargs
        self.fn: Callable | None = None
        self.compile_s = 0.0
        self.recompiled = False

    def compile(self) -> None:
        """Compile (forward and backward) without running; once."""
        if self.fn is not None:
            return
        start = time.perf_counter()
        grad = any(t.requires_grad for t in self.inputs)  # as it will be called (thread-local)
        with _aot_enabled(), torch.set_grad_enabled(grad):
            compiled = torch.compile(flex_attention, fullgraph=True, dynamic=False)
            self.fn = compiled.aot_compile((self.inputs, self.kwargs))
        self.compile_s = time.perf_counter() - start

    def __call__(self) -> Tensor:
        self.compile()
        try:
            return self.fn(*self.inputs, **self.kwargs)
        except RuntimeError as exc:  # compiled in another context (grad mode, ...): once more
            if "GuardManager check failed" not in str(exc) or self.recompiled:
                raise
        self.fn, self.recompiled = None, True
        self.compile()
        return self.fn(*self.inputs, **self.kwargs)


@dataclass
class Ahead:
    """A config being compiled on a thread: its prepared setup, the thread, its error."""

    setup: object  # measure.Setup, whose flex is the AotFlex being compiled
    thread: threading.Thread | None = None
    error: BaseException | None = None


def start(setup: object) -> Ahead:
    """Compile `setup.flex` (an AotFlex) on a thread (its stray kernels, if any, on a stream of
    its own)."""
    flex = setup.flex  # type: ignore[attr-defined]
    stream = torch.cuda.Stream() if flex.inputs[0].is_cuda else None
    ahead = Ahead(setup)

    def body() -> None:
        try:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                flex.compile()
            if stream is not None:
                stream.synchronize()
        except BaseException as exc:  # noqa: BLE001 - the config is compiled again in line
            ahead.error = exc

    ahead.thread = threading.Thread(target=body, name="flexbench-compile-ahead", daemon=True)
    ahead.thread.start()
    return ahead
