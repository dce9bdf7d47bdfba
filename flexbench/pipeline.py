"""The measuring process's sweep loop: configs in sweep order, each compiled by a worker ahead
(precompile.Pool) or here, then measured by `measure` (one config at a time).

Importable without torch: `measure` (torch) is imported when the loop starts, so a caller can
start the compile workers (`compile_pool`) first and let them import torch and compile while it
imports torch itself and connects to MLflow.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from typing import TYPE_CHECKING

from flexbench import precompile
from flexbench.config import BenchConfig

if TYPE_CHECKING:
    from flexbench import measure
    from flexbench.result import Result


def cached_graphs() -> int:
    """Most graphs dynamo already holds for one of our compiled functions (flex_attention,
    the inductor_math baseline) in this process (earlier sweeps); 0 without importing dynamo
    (or torch) when nothing imported it yet (importing it takes a second: the compile workers
    start first)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        from torch.nn.attention.flex_attention import flex_attention

        from flexbench import baselines

        codes = (flex_attention.__code__, baselines.dense_math.__code__)
        return max(len(_debug_get_cache_entry_list(code)) for code in codes)
    except (ImportError, AttributeError, RuntimeError):
        return 0


def default_recompile_limit(n_configs: int) -> int:
    """Room for every config's graph (two per config, to spare) plus a margin.

    Graphs cached by earlier sweeps in this process count against dynamo's limit too.
    """
    return cached_graphs() + 8 + 2 * n_configs


def compile_pool(
    configs: Sequence[BenchConfig], workers: int, recompile_limit: int | None = None
) -> precompile.Pool:
    """The compile worker pool `measure_configs(configs, pool=...)` takes (not started: enter
    it, and leave it on every path, which stops its workers)."""
    limit = default_recompile_limit(len(configs)) if recompile_limit is None else recompile_limit
    return precompile.Pool(list(configs), workers, any(c.dynamic for c in configs), limit)


def measure_sweep(
    configs: Sequence[BenchConfig],
    on_result: Callable[[Result], None],
    progress: bool,
    compile_workers: int,
    compile_cache: str | None,
    warn: Callable[[str], None],
    on_start: Callable[[int], None] | None = None,
    gate: Callable[[], None] | None = None,
) -> str:
    """A sweep's measuring: `compile_cache` loaded, `compile_workers` started, every config
    measured until SIGINT/SIGTERM stops it; the signal's name, '' when it ran to the end.
    `gate`: called once before the first check (measure_configs)."""
    with ExitStack() as compiling:  # every way out stops the compile workers
        pool = _compiling(compiling, configs, compile_workers, compile_cache, warn)
        with stoppable() as stopped, compiling:  # left here: workers stopped, cache saved
            measure_configs(
                configs, on_result, progress, pool=pool, on_start=on_start, gate=gate
            )
    return stopped[0] if stopped else ""


def _compiling(
    stack: ExitStack,
    configs: Sequence[BenchConfig],
    workers: int,
    cache: str | None,
    warn: Callable[[str], None],
) -> precompile.Pool:
    """Load the compile cache, then start the compile workers on `configs`; leaving `stack`
    stops them (and, after a sweep that was not interrupted, saves the cache)."""
    stack.enter_context(precompile.compile_cache(cache, warn))
    return stack.enter_context(compile_pool(configs, workers))


class Stopped(BaseException):
    """SIGTERM, raised in the main thread like SIGINT's KeyboardInterrupt."""


@contextmanager
def stoppable() -> Iterator[list[str]]:
    """Turn SIGINT/SIGTERM into a stop of the `with` body; the list then holds the signal's
    name. A second signal while the sweep logs what it measured is not caught here."""
    stopped: list[str] = []
    main = threading.current_thread() is threading.main_thread()

    def on_term(signum: int, frame: object) -> None:
        raise Stopped()

    saved = signal.signal(signal.SIGTERM, on_term) if main else None
    try:
        yield stopped
    except KeyboardInterrupt:
        stopped.append("SIGINT")
    except Stopped:
        stopped.append("SIGTERM")
    finally:
        if main:
            signal.signal(signal.SIGTERM, saved)


def measure_configs(
    configs: Iterable[BenchConfig],
    on_result: Callable[[Result], None] | None = None,
    progress: bool = True,
    recompile_limit: int | None = None,
    compile_workers: int = 0,
    pool: precompile.Pool | None = None,
    on_start: Callable[[int], None] | None = None,
    gate: Callable[[], None] | None = None,
) -> list[Result]:
    """Measure every config, isolating failures; `on_result` sees each Result as it lands,
    `on_start` each config's index before it is measured.

    `recompile_limit` (default: room for every config) caps dynamo recompiles per mod; a config
    that would exceed it fails instead of silently running uncompiled. `compile_workers`
    processes compile the configs ahead (precompile.Pool); or `pool`, a started
    `compile_pool(configs, ...)` its caller stops. A config's phase "wait" is the time the
    sweep waited for its worker. `gate` is called once, after the first compile and before
    the first check or timing (the measuring process waits there for its sweep run).
    """
    from flexbench import measure

    configs = list(configs)
    for device, bwd in {(c.device, c.calculate_bwd) for c in configs}:
        measure.check_runtime(device, bwd)
    if pool is not None:
        return _measure(configs, pool, on_result, progress, on_start, gate)
    with compile_pool(configs, compile_workers, recompile_limit) as own:
        return _measure(configs, own, on_result, progress, on_start, gate)


def _measure(
    configs: list[BenchConfig],
    pool: precompile.Pool,
    on_result: Callable[[Result], None] | None,
    progress: bool,
    on_start: Callable[[int], None] | None,
    gate: Callable[[], None] | None,
) -> list[Result]:
    from tqdm import tqdm

    from flexbench import measure

    bench, results = measure.Bench(), []
    bench.gate = gate
    bench.warm_up(gpu_warm_up(configs))
    if any(c.max_autotune for c in configs):  # autotuning times kernels: not beside it
        bench.settle()
    try:
        with measure.dynamo_settings(pool.dynamic, pool.recompile_limit):
            bar = tqdm(configs, file=sys.stderr, disable=not progress, unit="config")
            for i, c in enumerate(bar):
                bar.set_description(c.run_name())
                if on_start is not None:
                    on_start(i)
                ready = pool.take(i)
                bench.upcoming = upcoming(configs, i + 1, pool, bench)
                results.append(ready.failed or bench.run(c))
                if ready.by_worker:
                    phases = results[-1].phases
                    phases["wait"] = phases.get("wait", 0.0) + ready.waited
                if on_result is not None:
                    on_result(results[-1])
    finally:
        bench.drop_ahead()
        with suppress(Exception):  # no thread left behind; its error was a config's
            bench.settle()
    return results


def upcoming(
    configs: list[BenchConfig], i: int, pool: precompile.Pool, bench: measure.Bench
) -> BenchConfig | None:
    """Config i, for `bench` to compile while config i-1 is timed (`Bench.start_next`), when
    that may overlap and no worker is compiling it or has failed it."""
    if not 0 < i < len(configs) or not bench.overlaps(configs[i - 1], configs[i]):
        return None
    return configs[i] if pool.claim(i) else None


def gpu_warm_up(configs: Sequence[BenchConfig]) -> Callable[[], None] | None:
    """What warms the GPU before the first config is timed (timing.warm_gpu), for a sweep with
    a CUDA config; None otherwise."""
    if not any(c.device == "cuda" for c in configs):
        return None
    from flexbench import timing

    return timing.warm_gpu
