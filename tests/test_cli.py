"""The CLI as a new user meets it: bad input is one line and an exit code, help has examples,
the README's main job prints the seed's tables and leaves runs in ./mlflow.db."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from flexbench import mods
from flexbench.cli import cli, main
from tests.servers import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ["--device", "cpu", "-b", "1", "-nh", "2", "-s", "128", "-d", "16", "-dtype", "float32"]
RUN_TIMEOUT_S = 300


def run_main(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Call the console entry point in-process: its exit code and stderr."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr().err


def flexbench(*args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`python -m flexbench ARGS` in the test's working directory."""
    return subprocess.run([sys.executable, "-m", "flexbench", *args], capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line(err: str, *needles: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


# --- bad input: exit 2, one line naming the problem -------------------------------------------


USAGE_ERRORS = {
    "unknown mod": (["-mods", "noop,flash"], ["unknown mod 'flash'", *mods.BUILTINS]),
    "size zero": (["-s", "512,0"], ["'-s'", "> 0, got 0"]),
    "negative size": (["-d", "-64"], ["'-d'", "> 0, got -64"]),
    "not a number": (["-b", "two"], ["'-b'", "'two' is not a whole number"]),
    "unknown dtype": (["-dtype", "bf16"], ["unknown dtype 'bf16'", "bfloat16"]),
    "heads vs kv heads": (["-nh", "16", "--kv-heads", "3", "--device", "cpu"],
                          ["heads (16)", "divisible", "kv_heads (3)"]),
    "user mod missing": (["-mods", "no_such_pkg.mods:bias"],
                         ["cannot import mod 'no_such_pkg.mods:bias'", "No module named",
                          "package.module:name"]),
    "unknown baseline": (["--baseline", "sdpa,flash"],
                         ["'--baseline'", "unknown baseline 'flash'", "sdpa_flash"]),
    "baseline twice": (["--baseline", "sdpa", "--baseline", "sdpa"], ["named twice"]),
    "unknown flex backend": (["--flex-backend", "cute"], ["unknown flex backend 'cute'", "flash"]),
    "noise not a percentage": (["--max-noise", "low"], ["'--max-noise'", "not a percentage"]),
    "noise zero": (["--max-noise", "0", "--device", "cpu"], ["max_noise", "(0, 1)"]),
    "too few samples": (["--min-samples", "2"], ["'--min-samples'", "2"]),
    "unknown regime": (["--regime", "hot"], ["'--regime'", "burst", "sustained"]),
}


@pytest.mark.parametrize("args,needles", USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_bad_input_exits_2_with_one_line(args, needles, capsys):
    code, err = run_main(["run", *args], capsys)
    assert code == 2
    assert_one_line(err, "Error:", *needles)


def test_user_mod_that_fails_to_import_exits_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_mods.py").write_text("raise RuntimeError('half-written module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, err = run_main(["run", "-mods", "broken_mods:bias"], capsys)
    assert code == 2
    assert_one_line(err, "cannot import mod 'broken_mods:bias'", "half-written module")


# --- runtime errors: exit 1, one line with the fix --------------------------------------------


def test_unwritable_journal_exits_1_with_one_line(capsys):
    args = ["run", "--device", "cpu", "-b", "1", "-nh", "2", "-s", "128", "-d", "16",
            "-mods", "noop", "-dtype", "float32", "--quiet", "--journal", "/proc/nope/j.jsonl",
            "--tracking-uri", "sqlite:///mlflow.db"]
    code, err = run_main(args, capsys)
    assert code == 1
    assert_one_line(err, "Error:", "/proc/nope", "--journal PATH")


def test_bare_command_prints_help_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    out = capsys.readouterr()
    assert exc.value.code == 0 and "Usage:" in out.out and "Error" not in out.out + out.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_exits_1(capsys):
    code, err = run_main(["run", "--device", "cuda", "-mods", "causal"], capsys)
    assert code == 1
    assert_one_line(err, "CUDA is not available", "--device cpu")


def test_backward_on_cpu_exits_1_saying_it_needs_cuda(capsys):
    code, err = run_main(["run", *TINY, "--calculate-bwd"], capsys)
    assert code == 1
    assert_one_line(err, "backward needs CUDA", "drop --calculate-bwd")


def test_switch_takes_mlproject_true_false_values(capsys):
    """`--calculate-bwd=true` (as MLproject passes it) is the flag; a bad value is a usage error."""
    code, err = run_main(["run", *TINY, "--calculate-bwd=true"], capsys)
    assert code == 1 and "backward needs CUDA" in err
    code, err = run_main(["run", *TINY, "--calculate-bwd=maybe"], capsys)
    assert code == 2
    assert_one_line(err, "--calculate-bwd", "'maybe' is not a valid boolean")


def test_unreachable_tracking_server_keeps_results_in_journal(mlflow_server, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    proc = flexbench("run", *TINY, "-mods", "noop", "--tracking-uri", dead, "--quiet")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert f"tracking server unreachable at {dead}" in last
    assert "flexbench sync --journal .flexbench/journal.jsonl" in last
    assert "noop" in proc.stdout  # the tables still print
    journal = (tmp_path / ".flexbench" / "journal.jsonl").read_text()
    entries = [json.loads(line) for line in journal.splitlines()]
    results = [e for e in entries if e["type"] == "result"]
    assert len(results) == 1 and results[0]["status"] == "FINISHED"
    assert results[0]["metrics"]["fwd_compiled_us"] > 0
    assert not any(e["type"] == "synced" for e in entries)

    # the hint works: sync uploads the journalled result to a live server
    synced = flexbench("sync", "--tracking-uri", mlflow_server.uri, timeout=120)
    assert synced.returncode == 0, synced.stderr
    assert synced.stdout.strip().splitlines()[-1].startswith("synced 1 new results")


# --- help, mods, python -m --------------------------------------------------------------------


@pytest.mark.parametrize("command", [None, *sorted(cli.commands)])
def test_help_shows_an_example(command):
    args = [command, "--help"] if command else ["--help"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    examples = result.output.partition("Example")[2]
    assert re.search(rf"\bflexbench ({'|'.join(cli.commands)})\b", examples), result.output


def test_mods_lists_the_nine_builtins():
    result = CliRunner().invoke(cli, ["mods"])
    assert result.exit_code == 0
    assert len(mods.BUILTINS) == 9
    for name in mods.BUILTINS:
        assert re.search(rf"^\| {name} ", result.output, re.M), name


def test_python_dash_m_flexbench_works():
    """A real process: `python -m flexbench`, exit code 2 and one line, no traceback."""
    proc = flexbench("run", "-mods", "flash", timeout=120)
    assert proc.returncode == 2
    assert_one_line(proc.stderr, "unknown mod 'flash'")


# --- the README's main job --------------------------------------------------------------------


def readme_cpu_command() -> list[str]:
    """The README's CPU main-job command, exactly as a new user copies it."""
    text = (REPO / "README.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("flexbench run --device cpu"))
    return shlex.split(line)


def test_readme_main_job_prints_seed_tables_and_logs_to_mlflow_db(tmp_path):
    args = readme_cpu_command()
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "FWD Speedups" in out
    for word in ("| shape", "fwd_speedup", "| Average", "| Max", "| Min", "1,4,256,64"):
        assert word in out, out
    *_, closing, summary, ui = proc.stderr.strip().splitlines()
    assert "sweep run" in closing  # then the next commands
    assert summary.startswith("next: flexbench summary --sweep ")
    assert ui.strip().startswith("mlflow ui --backend-store-uri sqlite:///mlflow.db")
    for header in ("fwd_sdpa_us", "fwd_flex_us", "max_abs_err"):
        assert header in out

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("flexbench")
    runs = client.search_runs([exp.experiment_id])
    sweeps = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(sweeps) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweeps[0].info.run_id]
    assert sorted(r.data.params["score_mod"] for r in children) == ["causal", "noop"]
    assert all(r.info.status == "FINISHED" for r in runs)
