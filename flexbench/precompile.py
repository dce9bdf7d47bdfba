"""Compile worker pool: a sweep's configs compiled in other processes, ahead of measuring.

A worker (`python -m flexbench.precompile SETTINGS FD`) runs each config's first, compiling
flex calls exactly as the measuring process will (`measure.compile_only`: the same compiled
callable options, seeded inputs, BlockMask, forward and backward, dynamo settings), so torch's
own caches (FX graph, AOT autograd, triton kernels, in the shared cache directories) hold the
graph when the measuring process reaches the config, and its compile is a cache hit. Workers
never time anything; their one-line results come back on a pipe.

Configs go to workers in sweep order, each to a worker that is ready (torch and its compiler
imported: seconds, which a warm cache's compile would not save); the measuring process compiles
the first one itself and any other nobody has taken yet when its turn comes. A worker that raises
returns the config's failed Result as the measuring process would have made it; one that dies
fails only its config and is replaced. `--dynamic` and `--max-autotune` configs are left to the
measuring process: a dynamic graph depends on what it compiled before, and autotuning
benchmarks kernels, which other processes on the GPU would disturb.

Workers run in their own session: Ctrl-C reaches the measuring process alone, and leaving the
pool (normally or by an exception) kills every worker with its compiler children. They run at
a lower CPU priority (WORKER_NICE, inherited by their compilers): on a machine with fewer free
cores than workers, the measuring and tracking processes get the CPU first, so starting the
workers early costs them nothing.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from flexbench.config import BenchConfig

AUTO = "auto"
WORKER_MEM_BYTES = 3 * 2**30  # host memory one CUDA compile worker may take (torch, inductor)
WORKER_GPU_BYTES = 3 * 2**30  # GPU memory: its CUDA context, one large config's tensors
POLL_S = 0.2  # the pool's thread looks at stop requests this often
EXIT_GRACE_S = 2.0  # a worker told to stop (stdin closed) gets this long before SIGTERM
KILL_GRACE_S = 5.0  # ...and this long after SIGTERM before SIGKILL
WORKER_ENV = {"TORCHINDUCTOR_COMPILE_THREADS": "1"}  # one core each (not in any cache key)
WORKER_NICE = 10  # workers (and their compilers) yield the CPU to the measuring process
COMPILER = ("torch._dynamo", "torch._inductor.compile_fx")  # what a first compile imports
TODO, MAIN, WORKER, DONE = "todo", "main", "worker", "done"


def eligible(c: BenchConfig) -> bool:
    """Configs a worker compiles: static shapes, default compile mode (see module doc)."""
    return not (c.dynamic or c.max_autotune)


def default_workers(configs: Sequence[BenchConfig], processes: int = 1) -> int:
    """`--compile-workers auto`: on CUDA, one worker per CPU core the `processes` measuring
    processes leave free, capped by host memory (WORKER_MEM_BYTES each), by half the GPU's
    free memory (WORKER_GPU_BYTES each) and by the configs left after the first; on CPU
    none (compiling next to CPU timing would perturb it)."""
    todo = sum(eligible(c) for c in configs)
    if todo < 2 or any(c.device != "cuda" for c in configs):
        return 0
    cores = len(os.sched_getaffinity(0)) // processes - 1
    memory = _available_memory() // processes // WORKER_MEM_BYTES
    gpu_free = _gpu_free_memory()
    gpu = cores if gpu_free is None else gpu_free // 2 // WORKER_GPU_BYTES
    return max(0, min(todo - 1, cores, memory, gpu))


def _gpu_free_memory() -> int | None:
    """Free memory of the first visible GPU, by NVML (no CUDA context made); None if unknown."""
    from flexbench import gpustate

    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    gpu = gpustate.open_gpu(int(first)) if first.isdigit() else None
    return gpu.free_memory_bytes() if gpu is not None else None


def _available_memory() -> int:
    """MemAvailable from /proc/meminfo in bytes (a large number where it cannot be read)."""
    with suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 50


def resolve_workers(
    value: int | str | None, configs: Sequence[BenchConfig], processes: int = 1
) -> int:
    """A `--compile-workers` value (a count, or auto/None) as a count; ValueError if bad."""
    if value is None or str(value).strip().lower() == AUTO:
        return default_workers(configs, processes)
    try:
        count = int(value)
    except ValueError:
        raise ValueError(
            f"--compile-workers must be a count >= 0 or 'auto', got {value!r}"
        ) from None
    if count < 0:
        raise ValueError(f"--compile-workers must be >= 0 (0 = off), got {count}")
    return count


@dataclass
class Ready:
    """A config's turn to be measured: `failed` is its failed Result from a worker (else the
    measuring process measures it); `waited` the seconds spent waiting for a worker."""

    failed: object | None = None  # measure.Result
    waited: float = 0.0
    by_worker: bool = False


@dataclass
class _Worker:
    proc: subprocess.Popen
    results: IO[bytes]
    log: Path
    task: int | None = None
    ready: bool = False  # imports done: from now on its death is its config's failure
    buffer: bytes = b""


@dataclass
class Pool:
    """Compile workers over `configs`; `take(i)` in sweep order says when config i may be
    measured. Use as a context manager: leaving it stops and reaps every worker."""

    configs: Sequence[BenchConfig]
    workers: int
    dynamic: bool = False
    recompile_limit: int = 64
    _state: list[str] = field(default_factory=list)
    _done: list[threading.Event] = field(default_factory=list)
    _failed: dict[int, object] = field(default_factory=dict)
    _queue: deque = field(default_factory=deque)
    _live: list[_Worker] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _selector: selectors.BaseSelector | None = None
    _tmp: tempfile.TemporaryDirectory | None = None
    _spawned: int = 0
    _warned: bool = False

    def __enter__(self) -> Pool:
        self.configs = list(self.configs)
        todo = [i for i, c in enumerate(self.configs) if eligible(c)]
        self._state = [TODO if i in todo[1:] else MAIN for i in range(len(self.configs))]
        self._done = [threading.Event() for _ in self.configs]
        if self.workers <= 0 or len(todo) < 2:
            self._state = [MAIN] * len(self.configs)
            return self
        self._queue = deque(todo[1:])  # the first is the measuring process's own
        self._tmp = tempfile.TemporaryDirectory(prefix="flexbench-compile-")
        self._selector = selectors.DefaultSelector()
        try:
            for _ in range(min(self.workers, len(self._queue))):
                self._spawn()
        except BaseException:
            self.close()
            raise
        self._thread = threading.Thread(target=self._serve, name="flexbench-compile", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self.close(graceful=exc_type is None)

    # --- the measuring process's side ------------------------------------------------------

    def take(self, index: int) -> Ready:
        """Wait until config `index` is compiled by a worker (or claim it for the measuring
        process if no worker has it); a worker's out-of-memory failure is left to retry here."""
        with self._lock:
            if self._state[index] in (TODO, MAIN):
                self._state[index] = MAIN
                return Ready()
        start = time.perf_counter()
        while not self._done[index].wait(POLL_S):
            pass
        failed = self._failed.get(index)
        if failed is not None and failed.error.startswith("OutOfMemoryError"):
            failed = None  # the GPU was shared with the measuring process: measure it here
        return Ready(failed, time.perf_counter() - start, by_worker=True)

    def claim(self, index: int) -> bool:
        """Whether the measuring process may compile config `index` now (ahead of its turn):
        no worker has it (it is the measuring process's from now on) or a worker compiled it
        without error; False while a worker compiles it, or after a worker failed it."""
        with self._lock:
            if self._state[index] in (TODO, MAIN):
                self._state[index] = MAIN
                return True
            return self._state[index] == DONE and self._failed.get(index) is None

    # --- the pool's thread -----------------------------------------------------------------

    def _serve(self) -> None:
        """Hand out configs, read results, replace dead workers, until stopped or done; if
        this thread fails, every config not yet compiled goes back to the measuring process."""
        try:
            while not self._stop.is_set() and self._live and self._busy():
                for key, _ in self._selector.select(POLL_S):
                    self._read(key.data)
        except Exception:  # noqa: BLE001 - never leave the sweep waiting on a config
            self._give_back()
        for w in self._live:  # nothing left to compile: let them exit
            with suppress(OSError):
                w.proc.stdin.close()

    def _give_back(self) -> None:
        with self._lock:
            self._queue.clear()
            pending = [i for i, state in enumerate(self._state) if state in (TODO, WORKER)]
            for i in pending:
                self._state[i] = MAIN
        for i in pending:
            self._done[i].set()  # no failure recorded: the measuring process compiles it

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            print(f"warning: {message}", file=sys.stderr)

    def _busy(self) -> bool:
        return bool(self._queue) or any(w.task is not None for w in self._live)

    def _read(self, w: _Worker) -> None:
        data = os.read(w.results.fileno(), 1 << 16)
        if not data:
            self._lost(w)
            return
        w.buffer += data
        *lines, w.buffer = w.buffer.split(b"\n")
        for line in lines:
            self._finish(w, json.loads(line))

    def _finish(self, w: _Worker, message: dict) -> None:
        from flexbench import measure

        if message.get("ready"):
            w.ready = True
            self._assign(w)
            return
        index = message["index"]
        failed = None
        if message["result"]["error"] is not None:
            failed = measure.Result(self.configs[index], **message["result"])
        w.task = None
        self._assign(w)  # before settling: the next config is taken before the sweep moves on
        self._settle(index, failed)

    def _settle(self, index: int, failed: object | None) -> None:
        with self._lock:
            self._failed[index] = failed
            self._state[index] = DONE
        self._done[index].set()

    def _lost(self, w: _Worker) -> None:
        """A worker's pipe closed: it died. Fail its config, start another if work is left."""
        from flexbench import measure

        self._selector.unregister(w.results)
        w.results.close()
        self._live.remove(w)
        code = w.proc.wait()
        if not w.ready:  # died starting up (its environment, not a config): nothing was its
            self._warn_once(
                f"a compile worker exited at start ({describe_exit(code)}: "
                f"{last_line(w.log)}); the measuring process compiles instead"
            )
            return
        if w.task is None:
            return
        error = f"compile worker died ({describe_exit(code)}) compiling this config"
        tail = last_line(w.log)
        error = (error + (f": {tail}" if tail else ""))[:300]
        self._settle(w.task, measure.Result(self.configs[w.task], error=error))
        if self._queue and not self._stop.is_set():
            self._spawn()

    def _assign(self, w: _Worker) -> None:
        """Give `w` the next config nobody has taken, in sweep order."""
        with self._lock:
            while self._queue and self._state[self._queue[0]] != TODO:
                self._queue.popleft()
            if not self._queue:
                return
            index = self._queue.popleft()
            self._state[index] = WORKER
        w.task = index
        task = {"index": index, "config": self.configs[index].identity()}
        try:
            w.proc.stdin.write((json.dumps(task) + "\n").encode())
            w.proc.stdin.flush()
        except OSError:
            pass  # it died: its pipe's end-of-file comes next and fails the config

    def _spawn(self) -> None:
        self._spawned += 1
        log = Path(self._tmp.name) / f"worker{self._spawned}.log"
        read_fd, write_fd = os.pipe()
        settings = json.dumps({"dynamic": self.dynamic, "recompile_limit": self.recompile_limit})
        cmd = [sys.executable, "-m", "flexbench.precompile", settings, str(write_fd)]
        with log.open("wb") as err:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=err,
                pass_fds=(write_fd,),
                env={**os.environ, **WORKER_ENV, "FLEXBENCH_COMPILE_WORKER": "1"},
                start_new_session=True,  # no terminal SIGINT; killpg reaches its compilers
            )
        os.close(write_fd)
        w = _Worker(proc, os.fdopen(read_fd, "rb", buffering=0), log)
        self._live.append(w)
        self._selector.register(w.results, selectors.EVENT_READ, w)  # its config once ready

    # --- stopping --------------------------------------------------------------------------

    def close(self, graceful: bool = True) -> None:
        """Stop the thread, then every worker: stdin closed (`graceful`: a moment to exit),
        SIGTERM, SIGKILL to its process group."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        stop_all([w.proc for w in self._live], EXIT_GRACE_S if graceful else 0.0)
        for w in self._live:
            w.results.close()
        self._live.clear()
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def stop_all(procs: Sequence[subprocess.Popen], grace_s: float = EXIT_GRACE_S) -> None:
    """End worker processes and their process groups (compiler children too): stdin closed
    (an idle worker exits within `grace_s`), then SIGTERM, then SIGKILL."""
    for p in procs:
        with suppress(OSError):
            p.stdin.close()
    _wait_all(procs, grace_s)
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        for p in procs:
            if p.poll() is None:  # still ours (not reaped), so its group id is too
                with suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, sig)
        _wait_all(procs, grace)


def _wait_all(procs: Sequence[subprocess.Popen], seconds: float | None) -> None:
    deadline = None if seconds is None else time.monotonic() + seconds
    for p in procs:
        with suppress(subprocess.TimeoutExpired):
            p.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))


def describe_exit(code: int) -> str:
    """`exit code 3` or `killed by SIGKILL`."""
    if code < 0:
        with suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def last_line(path: Path) -> str:
    """The last non-empty line of a worker's stderr log ('' if none)."""
    with suppress(OSError):
        lines = [s.strip() for s in path.read_text(errors="replace").splitlines() if s.strip()]
        return lines[-1][:200] if lines else ""
    return ""


# --- portable compile cache (torch.compiler.save/load_cache_artifacts) ------------------------


@contextmanager
def compile_cache(path: str | None, warn=print) -> Iterator[None]:
    """Load `path`'s cache artifacts into torch's local caches (before any worker starts), and
    save what this process compiled or loaded back to `path` on the way out."""
    if not path:
        yield
        return
    try:
        load_artifacts(Path(path), warn)
    except OSError as exc:
        warn(f"warning: compile cache not loaded ({exc}); compiling without it")
    yield
    try:
        save_artifacts(Path(path), warn)
    except OSError as exc:
        warn(f"warning: compile cache not saved ({exc}); check the --compile-cache path")


def load_artifacts(path: Path, warn=print) -> int:
    """Hot-load torch cache artifacts from `path` (missing: nothing); how many were loaded."""
    import torch

    if not path.exists():
        return 0
    blob = path.read_bytes()
    quiet = logging.getLogger("torch.compiler._cache")  # its traceback: our one line instead
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        info = torch.compiler.load_cache_artifacts(blob)
    finally:
        quiet.setLevel(level)
    if info is None:
        warn(
            f"warning: {path} holds no compile cache torch {torch.__version__} can read; "
            "ignored (and replaced after the sweep)"
        )
        return 0
    return sum(len(keys) for keys in info.artifacts.values())


def save_artifacts(path: Path, warn=print) -> int:
    """Write this process's torch cache artifacts to `path` (atomically); how many."""
    import torch

    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return 0
    blob, info = saved
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(path)
    return sum(len(keys) for keys in info.artifacts.values())


# --- the worker process ----------------------------------------------------------------------


def worker(settings: str, fd: str) -> int:
    """Compile the configs that arrive on stdin (JSON lines), one result line each on `fd`."""
    from flexbench import measure

    config = json.loads(settings)
    out = os.fdopen(int(fd), "w", buffering=1)
    bench = measure.Bench()
    for name in COMPILER:  # ready means ready to compile
        importlib.import_module(name)
    out.write(json.dumps({"ready": True}) + "\n")
    with measure.dynamo_settings(config["dynamic"], config["recompile_limit"]):
        for line in sys.stdin:
            task = json.loads(line)
            r = bench.run(BenchConfig(**task["config"]), measure.compile_only)
            kept = {"error": r.error, "metrics": r.metrics, "baseline": r.baseline, "tags": r.tags}
            out.write(json.dumps({"index": task["index"], "result": kept}) + "\n")
    return 0


def die_with_parent() -> None:
    """Linux: SIGTERM this process when the process that started it dies (prctl PDEATHSIG)."""
    with suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def lower_priority(nice: int | None = None) -> None:
    """Give this process (and the processes it starts) `nice` (WORKER_NICE) more niceness,
    where allowed."""
    with suppress(OSError, AttributeError):
        os.nice(WORKER_NICE if nice is None else nice)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the measuring process handles Ctrl-C
    die_with_parent()
    lower_priority()
    sys.exit(worker(*sys.argv[1:3]))
