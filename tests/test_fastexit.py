"""fastexit: a flexbench process skips the interpreter's teardown, nothing else of its exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from flexbench import fastexit

PROGRAM = textwrap.dedent(
    """
    import atexit, os, sys, threading, time
    {heavy}
    from flexbench import fastexit

    class Teardown:
        def __del__(self):
            os.write(1, b"teardown ran\\n")

    KEPT = Teardown()  # freed only by the interpreter's teardown
    atexit.register(lambda: os.write(1, b"atexit ran\\n"))

    def late():
        time.sleep(0.3)
        os.write(1, b"thread done\\n")

    def command():
        threading.Thread(target=late).start()  # non-daemon: joined before the exit
        sys.stdout.write("buffered output\\n")  # a pipe: flushed by the exit, not here
        sys.exit({code})

    fastexit.run(command)
    """
)


def run_program(heavy: str, code: str) -> subprocess.CompletedProcess:
    program = PROGRAM.format(heavy=heavy, code=code)
    return subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )


def test_with_torch_loaded_the_teardown_is_skipped_and_the_rest_of_the_exit_kept():
    proc = run_program("import torch", "3")
    assert proc.returncode == 3, proc.stderr
    lines = proc.stdout.splitlines()
    assert "buffered output" in lines and "thread done" in lines and "atexit ran" in lines
    assert lines.index("thread done") < lines.index("atexit ran")  # as a normal exit orders them
    assert "teardown ran" not in lines


def test_without_torch_the_exit_is_the_interpreters_own():
    proc = run_program("", "'no torch here'")
    assert proc.returncode == 1
    assert "teardown ran" in proc.stdout.splitlines() and "no torch here" in proc.stderr


def test_a_message_exits_1_on_stderr_like_sys_exit():
    proc = run_program("import torch", "'Error: bad thing'")
    assert proc.returncode == 1 and proc.stderr.strip() == "Error: bad thing"
    assert "teardown ran" not in proc.stdout


@pytest.mark.parametrize("code,status", [(None, 0), (0, 0), (2, 2), (130, 130)])
def test_exit_status(code, status):
    assert fastexit.exit_status(code) == status
