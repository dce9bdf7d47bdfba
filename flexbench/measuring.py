"""The measuring process: a sweep measured in a child process (`python -m flexbench.measuring
FD SETTINGS`) while the process that started it imports MLflow, connects, and journals and
logs each result as it arrives (`sweep.measure_and_track`), so neither waits on the other.

The protocol, JSON lines on the pipe FD (never stdout, where torch may print):
  child:  {"error": line} if this runtime cannot run the sweep (then it exits 1), else
          {"hello": env tags} (env.capture, which imports torch: the parent does not)
  parent: one line on the child's stdin: configs (every field), compile_workers, compile_cache,
          gated; when gated (sent before the parent connects), later a line `go` once the
          sweep run exists: until then the child starts its workers and compiles, but checks
          and times nothing (end-of-file instead of `go`: it stops)
  child:  {"start": i} before config i, {"result": ...} (result.to_wire) after it,
          {"warn": line}, and last {"done": {"interrupted": "SIGINT" | "SIGTERM" | ""}}

Ctrl-C reaches both processes (one process group): the child stops as an in-process sweep
does (pipeline.stoppable) and says so in "done"; SIGTERM to the parent is passed on to it.
The child dies with its parent (PR_SET_PDEATHSIG), its compile workers with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from typing import IO

from flexbench import env, fastexit, pipeline, precompile
from flexbench.config import BenchConfig
from flexbench.result import Result, from_wire, to_wire

ENV = env.MEASURE_PROCESS  # 1 / 0: measure in a child process or in this one


def wanted(isolate: bool | None, device: str) -> bool:
    """Whether a sweep measures in a child process: `isolate` if given, else as the
    FLEXBENCH_MEASURE_PROCESS environment variable says (1/0), else on CUDA."""
    if isolate is not None:
        return isolate
    forced = env.switch(ENV)
    return device == "cuda" if forced is None else forced


@contextmanager
def process(
    configs: Sequence[BenchConfig], isolate: bool | None, given: Child | None = None
) -> Iterator[Child | None]:
    """The measuring process of a sweep of `configs`: `given` (its owner ends it), else one
    started here when `wanted` and ended on the way out, else None (measure in this one)."""
    device = configs[0].device if configs else "cpu"
    if given is not None or not configs or not wanted(isolate, device):
        yield given
        return
    with Child.start(device, any(c.calculate_bwd for c in configs)) as child:
        yield child


@dataclass
class Ending:
    """How the measuring process ended: the signal that stopped it, or how it died without
    saying it was done ('' for neither)."""

    interrupted: str = ""
    died: str = ""


class Child:
    """The parent's handle on a measuring process; leaving it (as a context manager) ends the
    process on every path."""

    def __init__(self, proc: subprocess.Popen, pipe: IO[bytes]) -> None:
        self.proc, self.pipe = proc, pipe
        self.sent = False  # the job (gated: `go` still to come)

    @classmethod
    def start(cls, device: str, calculate_bwd: bool) -> Child:
        """Start `python -m flexbench.measuring` for a sweep on `device`."""
        read_fd, write_fd = os.pipe()
        settings = json.dumps({"device": device, "calculate_bwd": calculate_bwd})
        cmd = [sys.executable, "-m", "flexbench.measuring", str(write_fd), settings]
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        return cls(proc, os.fdopen(read_fd, "rb"))

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def hello(self) -> dict[str, str]:
        """The environment tags it captured; RuntimeError (its one line) if it cannot measure."""
        message = self._next()
        if message is None:
            code = precompile.describe_exit(self.proc.wait())
            raise RuntimeError(f"the measuring process exited ({code}) before it started")
        if "error" in message:
            raise RuntimeError(message["error"])
        return message["hello"]

    def measure(
        self,
        configs: Sequence[BenchConfig],
        on_result: Callable[[Result], None],
        progress: bool,
        compile_workers: int = 0,
        compile_cache: str | None = None,
        warn: Callable[[str], None] = print,
    ) -> Ending:
        """Have it measure `configs` (or say `go` to the job `send_job` gave it); `on_result`
        sees each Result here as it arrives, and a progress bar (`progress`) follows it.
        Returns once it has exited."""
        if self.sent:
            self._write(b"go\n", close=True)
        else:
            self.send_job(configs, compile_workers, compile_cache, gated=False)
        with passing_on(self.proc) as signals:
            done = self._follow(configs, on_result, progress, warn)
        code = self.proc.wait()
        if done is None:
            return Ending(signals[0] if signals else "", precompile.describe_exit(code))
        return Ending(done["interrupted"])

    def send_job(
        self,
        configs: Sequence[BenchConfig],
        compile_workers: int = 0,
        compile_cache: str | None = None,
        gated: bool = True,
    ) -> None:
        """Give it its job now; `gated`: it starts its compile workers and compiles at once,
        but checks and times nothing until `measure` says go (the sweep run exists)."""
        job = {"configs": [asdict(c) for c in configs], "compile_workers": compile_workers}
        job |= {"compile_cache": compile_cache, "gated": gated}
        self.sent = True
        self._write((json.dumps(job) + "\n").encode(), close=not gated)

    def _write(self, line: bytes, close: bool) -> None:
        with suppress(OSError, ValueError):  # it died (its end-of-file says so), or closed
            self.proc.stdin.write(line)
            self.proc.stdin.flush()
            if close:
                self.proc.stdin.close()

    def _follow(
        self,
        configs: Sequence[BenchConfig],
        on_result: Callable[[Result], None],
        progress: bool,
        warn: Callable[[str], None],
    ) -> dict | None:
        """Read its messages until "done" (returned) or its end (None)."""
        from tqdm import tqdm

        with tqdm(total=len(configs), file=sys.stderr, disable=not progress, unit="config") as bar:
            while (message := self._next()) is not None:
                if "start" in message:
                    bar.set_description(configs[message["start"]].run_name())
                elif "result" in message:
                    on_result(from_wire(message["result"]))
                    bar.update()
                elif "warn" in message:
                    warn(message["warn"])
                elif "done" in message:
                    return message["done"]
        return None

    def _next(self) -> dict | None:
        line = self.pipe.readline()
        return json.loads(line) if line.endswith(b"\n") else None  # torn: it died writing

    def close(self) -> None:
        """End it: SIGTERM (measuring, it stops as on Ctrl-C; else it exits), then SIGKILL."""
        with suppress(OSError):
            self.proc.stdin.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(precompile.KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()
        self.pipe.close()


@contextmanager
def passing_on(proc: subprocess.Popen) -> Iterator[list[str]]:
    """While the child measures: SIGINT (which reached it too) and SIGTERM (passed on to it)
    are noted in the list, not raised, so every result it sends is still read and logged; a
    second SIGINT raises KeyboardInterrupt (a child that does not stop is then ended)."""
    signals: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return

    def on_int(signum: int, frame: object) -> None:
        if "SIGINT" in signals:  # a second Ctrl-C: stop waiting for it
            raise KeyboardInterrupt
        signals.append("SIGINT")

    def on_term(signum: int, frame: object) -> None:
        signals.append("SIGTERM")
        with suppress(OSError):
            proc.send_signal(signal.SIGTERM)

    saved = {
        s: signal.signal(s, h) for s, h in ((signal.SIGINT, on_int), (signal.SIGTERM, on_term))
    }
    try:
        yield signals
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


# --- the measuring process -------------------------------------------------------------------


def wait_go() -> None:
    """Wait for the parent's `go` (its sweep run exists); end-of-file (it gave up): stop."""
    if sys.stdin.readline().strip() != "go":
        raise pipeline.Stopped()


def main(fd: str, settings: str) -> int:
    """Check the runtime, say hello, measure the job from stdin, sending every result on `fd`."""
    os.set_inheritable(int(fd), False)  # its end-of-file must not wait for our children
    out = os.fdopen(int(fd), "w", buffering=1)

    def send(**message: object) -> None:
        out.write(json.dumps(message) + "\n")

    setting = json.loads(settings)
    from flexbench import measure  # torch

    try:
        measure.check_runtime(setting["device"], setting["calculate_bwd"])
    except RuntimeError as exc:
        send(error=str(exc))
        return 1
    send(hello=env.capture(setting["device"]))
    line = sys.stdin.readline()
    if not line:  # nothing left to measure (or the parent failed first)
        return 0
    job = json.loads(line)
    configs = [BenchConfig(**c) for c in job["configs"]]
    interrupted = pipeline.measure_sweep(
        configs,
        lambda r: send(result=to_wire(r)),
        False,
        job["compile_workers"],
        job["compile_cache"],
        lambda m: send(warn=m),
        on_start=lambda i: send(start=i),
        gate=wait_go if job.get("gated") else None,
    )
    send(done={"interrupted": interrupted})
    return 0


def _entry() -> None:
    try:
        sys.exit(main(*sys.argv[1:3]))
    except KeyboardInterrupt:  # Ctrl-C before measuring: the parent stops too
        sys.exit(128 + signal.SIGINT)
    except BrokenPipeError:  # the parent is gone
        sys.exit(1)


if __name__ == "__main__":
    precompile.die_with_parent()
    fastexit.run(_entry)  # no interpreter teardown: the parent waits for this exit
