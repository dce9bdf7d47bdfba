"""End a `flexbench` process without the interpreter's teardown once its command is done.

After a command that loaded torch or MLflow (run, tune, sync), CPython's finalization -- module
teardown, freeing every object, native destructors -- takes seconds (BENCHMARKS.md, "Figures
the code cites") and does nothing for the results: journal lines are fsynced as written,
MLflow's writes are committed, compile workers are gone. So the process
runs what a normal exit runs that can matter -- threading's shutdown (non-daemon threads
joined, executors drained), the atexit handlers (logging, inductor's compile pool,
multiprocessing, temporary files) and a flush of stdout and stderr -- and then `os._exit`
with the status `sys.exit` would have given. Only for the process's own command line: an
in-process caller (tests, notebooks) gets the ordinary SystemExit.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import NoReturn

HEAVY = ("torch", "mlflow")  # whose teardown is the slow part; without them, exit as usual


def exit_status(code: object) -> int:
    """The process status `sys.exit(code)` gives; a message (not an int) goes to stderr."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    with suppress(Exception):
        print(code, file=sys.stderr)
    return 1


def run(command: Callable[[], None]) -> NoReturn:
    """Run `command`, then end the process with its status (quickly when HEAVY is loaded);
    any exception other than SystemExit propagates as usual."""
    try:
        command()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    if not any(name in sys.modules for name in HEAVY):
        sys.exit(code)
    end(code)


def end(code: object) -> NoReturn:
    """What a normal exit does that matters, then `os._exit` (no teardown)."""
    status = exit_status(code)
    shutdown = getattr(threading, "_shutdown", None)  # joins non-daemon threads, as at exit
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    os._exit(status)
