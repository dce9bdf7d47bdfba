"""Bad-input and fault battery for flexbench's journal, sync, resume and interruption (CPU).

    python benchmarks/fault_battery.py OUT_DIR

Bad inputs: each is `python -m flexbench ...` in its own directory; counted `clean` (exit != 0,
one line on stderr, no traceback), `traceback`, or `accepted` (exit 0: wrongly accepted).
Faults: each scenario measures tiny CPU configs against a real loopback `mlflow server`, injects
the fault, recovers as a user would (`--resume`, `sync`), then counts per planned config its
config runs on the server: `survived` (each exactly once, no sweep run left RUNNING),
`duplicated` (a config twice) or `lost` (a config missing). Writes OUT_DIR/fault_battery.json.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.servers import MlflowServer, free_port  # noqa: E402

TINY = ["--device", "cpu", "-nh", "2", "-s", "128", "-d", "16", "-dtype", "float32", "--quiet"]
FOUR = [*TINY, "-b", "1,2", "-mods", "noop,causal"]  # 4 configs
RUN_TIMEOUT_S = 600
LONG = "n" * 300

BAD_INPUTS = [
    ["run", "-b", ""],
    ["run", "-b", ",,,"],
    ["run", "-mods", ""],
    ["run", "-dtype", ""],
    ["run", "-nh", " , "],
    ["run", "-b", "two"],
    ["run", "-s", "0"],
    ["run", "-d", "-64"],
    ["run", "-d", "1.5"],
    ["run", "-mods", "flash"],
    ["run", "-mods", "no_pkg.m:f"],
    ["run", "-dtype", "bf16"],
    ["run", "--device", "tpu"],
    ["run", "--timer", "nope"],
    ["run", "--experiment", ""],
    ["run", "--experiment", "x" * 600],
    ["run", "--run-name", LONG],
    ["run", "--sweep-id", LONG],
    ["run", "--tracking-uri", "ftp://host/x"],
    ["run", "--tracking-uri", "garbage uri!!"],
    ["run", "--tracking-uri", "http://:5000"],
    ["run", "--tracking-uri", "http://u:pa ss@127.0.0.1:1"],
    ["run", "--shard", "2/2"],
    ["run", "--shard", "x"],
    ["run", "--shard", "0/0"],
    ["run", "--gpus", "x"],
    ["run", "--gpus", "0,0"],
    ["run", "--device", "cuda"],
    ["run", "--calculate-bwd", "--device", "cpu"],
    ["run", "--calculate-bwd=maybe"],
    ["run", "-nh", "16", "--kv-heads", "3", "--device", "cpu"],
    ["run", "--kernel-options", "{bad"],
    ["run", "--config", "missing.yaml"],
    [
        "run",
        "--journal",
        "/proc/nope/j.jsonl",
        *TINY,
        "-b",
        "1",
        "-mods",
        "noop",
        "--tracking-uri",
        "sqlite:///mlflow.db",
    ],
    ["sync", "--journal", "missing.jsonl"],
    ["sync", "--tracking-uri", "ftp://x"],
    ["sync", "--bogus"],
    ["summary", "--format", "nope"],
    ["summary", "--where", "score_mod"],
    ["summary", "--experiment", "nope"],
    ["summary", "--sweep", "0" * 32],
    ["compare", "--threshold", "x"],
    ["compare"],
    ["repro", "0" * 32],
    ["history", "--bogus"],
    ["tune", "--grid", "{bad"],
    ["tune", "--grid", '{"BLOCK_M": []}', "--device", "cpu"],
    ["tune", "-b", ""],
    ["mods", "extra"],
    ["nosuchcommand"],
]


def flexbench(
    args: list[str], cwd: Path, env: dict | None = None, timeout: float = RUN_TIMEOUT_S
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flexbench", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def classify(proc: subprocess.CompletedProcess) -> str:
    if "Traceback" in proc.stderr:
        return "traceback"
    if proc.returncode == 0:
        return "accepted"
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    lines = [x for x in lines if not x.startswith("notice: no CUDA")]  # --device auto's note
    return "clean" if len(lines) == 1 else "multiline"


def bad_inputs(root: Path) -> dict:
    found: dict = {"clean": 0, "traceback": 0, "accepted": 0, "multiline": 0, "cases": []}
    for i, args in enumerate(BAD_INPUTS):
        where = root / f"bad{i}"
        where.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{where / 'mlflow.db'}"}
        proc = flexbench(args, where, env, timeout=120)
        kind = classify(proc)
        found[kind] += 1
        found["cases"].append(
            {
                "args": args,
                "kind": kind,
                "code": proc.returncode,
                "stderr": proc.stderr.strip()[-300:],
            }
        )
        print(f"bad input {i:2d} {kind:9s} {' '.join(args)[:80]}", flush=True)
    return found


# --- faults ------------------------------------------------------------------------------------


def count(uri: str, experiment: str) -> tuple[Counter, list[str]]:
    """Config runs per config key, and the statuses of the sweep runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return Counter(), []
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    keys = Counter(
        r.data.tags["flexbench.config_key"]
        for r in runs
        if r.data.tags.get("flexbench.kind") == "config" and r.info.status == "FINISHED"
    )
    sweeps = [r.info.status for r in runs if r.data.tags.get("flexbench.kind") == "sweep"]
    return keys, sweeps


def verdict(uri: str, experiment: str, planned: int) -> dict:
    keys, sweeps = count(uri, experiment)
    kind = (
        "duplicated"
        if any(v > 1 for v in keys.values())
        else "lost"
        if len(keys) < planned
        else "running"
        if "RUNNING" in sweeps
        else "survived"
    )
    return {"kind": kind, "configs": dict(keys), "sweep_runs": sweeps}


def wait_for_result(journal: Path, n: int, proc: subprocess.Popen, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text(errors="replace").count('"type": "result"') >= n:
            return
        time.sleep(0.2)


def start(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flexbench", *args],
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def signalled(root: Path, uri: str, name: str, sig: int) -> dict:
    """A 4-config sweep stopped by `sig` after its first result; then --resume and sync."""
    where = root / name
    where.mkdir()
    args = ["run", *FOUR, "--experiment", name, "--tracking-uri", uri]
    proc = start(args, where)
    wait_for_result(where / ".flexbench" / "journal.jsonl", 1, proc)
    sent = time.perf_counter()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    stop_s = time.perf_counter() - sent
    resume_line = "--resume --sweep-id" in err
    if sig != signal.SIGKILL:
        flexbench([*args, "--resume"], where)
    else:  # kill -9: the resume skips what the server or journal holds
        flexbench([*args, "--resume"], where)
    flexbench(["sync", "--tracking-uri", uri], where)
    out = verdict(uri, name, 4)
    out.update(
        code=proc.returncode,
        stop_s=round(stop_s, 2),
        resume_line=resume_line,
        last_line=err.strip().splitlines()[-1][-300:] if err.strip() else "",
    )
    return out


KILL_BETWEEN = """
import os, sys
from flexbench import sweep, tracking
real = tracking.log_child
def die(*a):
    os.kill(os.getpid(), 9)
tracking.log_child = die
sys.exit(__import__("flexbench.cli", fromlist=["main"]).main(sys.argv[1:]))
"""


def kill_between_journal_and_log(root: Path, uri: str) -> dict:
    where = root / "between"
    where.mkdir()
    args = ["run", *FOUR, "--experiment", "between", "--tracking-uri", uri]
    subprocess.run(
        [sys.executable, "-c", KILL_BETWEEN, *args],
        cwd=where,
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
    )
    flexbench([*args, "--resume"], where)
    flexbench(["sync", "--tracking-uri", uri], where)
    return verdict(uri, "between", 4)


def offline_then_resume(root: Path, uri: str) -> dict:
    where = root / "offline"
    where.mkdir()
    dead = f"http://127.0.0.1:{free_port()}"
    flexbench(
        [
            "run",
            *TINY,
            "-b",
            "1",
            "-mods",
            "noop,causal",
            "--experiment",
            "offline",
            "--tracking-uri",
            dead,
        ],
        where,
    )
    flexbench(["run", *FOUR, "--experiment", "offline", "--tracking-uri", uri, "--resume"], where)
    flexbench(["sync", "--tracking-uri", uri], where)
    return verdict(uri, "offline", 4)


def torn_and_garbage(root: Path, uri: str) -> dict:
    where = root / "torn"
    where.mkdir()
    dead = f"http://127.0.0.1:{free_port()}"
    flexbench(
        ["run", *TINY, "-b", "1", "-mods", "noop", "--experiment", "torn", "--tracking-uri", dead],
        where,
    )
    journal = where / ".flexbench" / "journal.jsonl"
    with journal.open("ab") as f:
        f.write(b'42\nnull\n\xff\xfe\n{"type": "result", "record_')  # garbage + a torn line
    flexbench(
        ["run", *TINY, "-b", "2", "-mods", "noop", "--experiment", "torn", "--tracking-uri", dead],
        where,
    )
    sync = flexbench(["sync", "--tracking-uri", uri], where)
    out = verdict(uri, "torn", 2)
    out["sync_stderr"] = sync.stderr.strip()[-300:]
    return out


def poison_first(root: Path, uri: str) -> dict:
    """A result whose sweep has an invalid experiment name sits first in the journal."""
    from flexbench import tracking

    where = root / "poison"
    where.mkdir()
    dead = f"http://127.0.0.1:{free_port()}"
    flexbench(
        [
            "run",
            *TINY,
            "-b",
            "1",
            "-mods",
            "noop",
            "--experiment",
            "poison",
            "--tracking-uri",
            dead,
        ],
        where,
    )
    journal = tracking.Journal(where / ".flexbench" / "journal.jsonl")
    sweep_e, result_e = journal.entries()[:2]
    bad = [
        {**sweep_e, "part_id": "p" * 32, "experiment": ""},
        {**result_e, "part_id": "p" * 32, "record_id": "r" * 32, "experiment": ""},
    ]
    good = journal.path.read_bytes()
    journal.path.write_bytes(b"")
    for entry in bad:
        journal.append(entry)
    with journal.path.open("ab") as f:
        f.write(good)
    sync = flexbench(["sync", "--tracking-uri", uri], where)
    status = flexbench(["sync", "--status", "--tracking-uri", uri], where)
    out = verdict(uri, "poison", 1)
    out.update(sync_code=sync.returncode, status=status.stdout.strip()[-300:])
    return out


def disk_full(root: Path, uri: str) -> dict:
    """The journal turns into /dev/full after the first result."""
    where = root / "full"
    where.mkdir()
    (where / "real.jsonl").touch()
    link = where / "j.jsonl"
    link.symlink_to(where / "real.jsonl")
    args = ["run", *FOUR, "--experiment", "full", "--tracking-uri", uri, "--journal", str(link)]
    env = {**os.environ, "TMPDIR": str(where)}
    proc = start(args, where, env)
    wait_for_result(where / "real.jsonl", 1, proc)
    link.unlink()
    link.symlink_to("/dev/full")
    _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    for j in [where / "real.jsonl", *where.glob("flexbench-journal-*.jsonl")]:
        flexbench(["sync", "--journal", str(j), "--tracking-uri", uri], where)
    out = verdict(uri, "full", 4)
    out.update(code=proc.returncode, last_line=err.strip().splitlines()[-1][-300:])
    return out


def server_lost(root: Path, server: MlflowServer) -> dict:
    where = root / "lost"
    where.mkdir()
    args = ["run", *FOUR, "--experiment", "lost", "--tracking-uri", server.uri]
    proc = start(args, where)
    wait_for_result(where / ".flexbench" / "journal.jsonl", 1, proc)
    server.stop()
    proc.communicate(timeout=RUN_TIMEOUT_S)
    server.start()
    flexbench(["sync", "--tracking-uri", server.uri], where)
    return verdict(server.uri, "lost", 4)


def faults(root: Path, only: list[str]) -> dict:
    server = MlflowServer(root / "server", env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    server.start()
    uri = server.uri
    scenarios = {
        "offline_then_resume_online": lambda: offline_then_resume(root, uri),
        "torn_line_and_garbage": lambda: torn_and_garbage(root, uri),
        "poison_entry_first": lambda: poison_first(root, uri),
        "kill9_between_journal_and_log": lambda: kill_between_journal_and_log(root, uri),
        "sigint_mid_sweep": lambda: signalled(root, uri, "sigint", signal.SIGINT),
        "sigterm_mid_sweep": lambda: signalled(root, uri, "sigterm", signal.SIGTERM),
        "kill9_mid_sweep": lambda: signalled(root, uri, "kill9", signal.SIGKILL),
        "journal_disk_full_mid_sweep": lambda: disk_full(root, uri),
        "server_lost_mid_sweep": lambda: server_lost(root, server),
    }
    found: dict = {"survived": 0, "duplicated": 0, "lost": 0, "running": 0, "cases": {}}
    try:
        for name, scenario in scenarios.items():
            if only and name not in only:
                continue
            t = time.perf_counter()
            try:
                out = scenario()
            except Exception as exc:  # noqa: BLE001 - a scenario that breaks is reported
                out = {"kind": "error", "error": repr(exc)[:300]}
            out["wall_s"] = round(time.perf_counter() - t, 1)
            found[out["kind"]] = found.get(out["kind"], 0) + 1
            found["cases"][name] = out
            print(f"fault {name:32s} {out['kind']}  {json.dumps(out)[:200]}", flush=True)
    finally:
        server.stop()
    return found


def main() -> None:
    out = Path(sys.argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    which = sys.argv[2:] or ["bad", "faults"]
    result = {}
    if "bad" in which:
        result["bad_inputs"] = bad_inputs(out / "bad")
    if "faults" in which:
        only = [w for w in which if w not in ("bad", "faults")]
        result["faults"] = faults(out / "faults", only)
    (out / "fault_battery.json").write_text(json.dumps(result, indent=2))
    totals = {k: {n: v[n] for n in v if n != "cases"} for k, v in result.items()}
    print(json.dumps(totals, indent=2))


if __name__ == "__main__":
    main()
