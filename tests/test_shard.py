"""Sharding a sweep: `--shard I/N` slices (disjoint, covering, deterministic), shards of one
sweep sharing its sweep id, and the `--gpus` worker processes (run here on CPU configs)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from flexbench import sweep
from flexbench.cli import main
from flexbench.config import shard
from flexbench.record import RunRecord
from flexbench.spec import SweepSpec
from flexbench.tracking_settings import TrackingSettings

TINY = ["--device", "cpu", "-nh", "2", "-s", "128", "-d", "16", "-dtype", "float32", "--quiet"]
RUN_TIMEOUT_S = 300


def sweep_of(batches) -> list:
    return SweepSpec(list(batches), [2], [128], [16], ["noop"], ["float32"], device="cpu").configs()


def keys(configs) -> list[str]:
    return [c.config_key() for c in configs]


# --- the partition -------------------------------------------------------------------------


@pytest.mark.parametrize("total", [1, 5, 12])
def test_shards_are_disjoint_covering_balanced_and_deterministic(total):
    configs = sweep_of(range(1, total + 1))
    for count in range(1, total + 3):
        parts = [shard(configs, i, count) for i in range(count)]
        flat = [k for part in parts for k in keys(part)]
        assert sorted(flat) == sorted(keys(configs))  # covering, and disjoint: no key twice
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
        again = sweep_of(range(1, total + 1))  # a new process expands the same sweep
        assert [keys(shard(again, i, count)) for i in range(count)] == [keys(p) for p in parts]


def test_gpu_slices_of_a_host_shard_are_shards_of_the_whole():
    """What `--shard I/N --gpus` labels worker k: shard I + N*k of N*G."""
    configs = sweep_of(range(1, 14))
    for count, gpus in ((1, 2), (2, 2), (3, 4)):
        for index in range(count):
            host = shard(configs, index, count)
            for k in range(gpus):
                assert shard(host, k, gpus) == shard(configs, index + count * k, count * gpus)


# --- the options ---------------------------------------------------------------------------

BAD = {
    "I equals N": (["--shard", "2/2"], "2/2 is out of range: I counts from 0 to N-1 (0/2 .. 1/2)"),
    "not I/N": (["--shard", "1-of-2"], "'1-of-2' is not I/N like 0/4"),
    "negative": (["--shard", "-1/2"], "'-1/2' is not I/N"),
    "zero shards": (["--shard", "0/0"], "0/0: N, the number of shards, must be at least 1"),
    "gpu twice": (["--gpus", "0,0"], "'0,0' names a GPU twice"),
    "gpu name": (["--gpus", "first"], "'first' is not 'all' or GPU ids like 0,1"),
}


@pytest.mark.parametrize("args,needle", BAD.values(), ids=BAD.keys())
def test_bad_shard_or_gpus_exits_2_with_one_line(args, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", *TINY, "-b", "1", "-mods", "noop", *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.count("\n") == 1 and err.startswith("Error: Invalid value for '--") and needle in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --gpus would run")
@pytest.mark.parametrize("device", [[], ["--device", "cpu"]], ids=["auto", "cpu"])
def test_gpus_without_cuda_is_one_line_runtime_error(device, capsys):
    args = ["run", "-nh", "2", "-s", "128", "-d", "16", "-b", "1", "-mods", "noop", *device]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--gpus", "all"])
    assert exc.value.code == 1
    assert capsys.readouterr().err == (
        "Error: --gpus needs CUDA GPUs and torch sees none on this machine; drop --gpus "
        "(use --shard I/N to split a sweep across machines)\n"
    )


# --- two shard processes, and two `--gpus` workers, against a live server -----------------------


def start(args: list[str], cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flexbench", "run", *TINY, *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def printed_sweep_id(proc: subprocess.Popen) -> tuple[str, str]:
    """Read shard 0's stderr until it names the sweep id for the other shards."""
    seen = ""
    for line in iter(proc.stderr.readline, ""):
        seen += line
        found = re.search(r"run the other shards with --sweep-id (\w+)$", line.strip())
        if found:
            return found[1], seen
    raise AssertionError(f"no sweep id printed: {seen}")


@pytest.fixture(scope="module")
def sharded(mlflow_server, tmp_path_factory):
    """Shard 0/2 without --sweep-id, shard 1/2 with the id shard 0 printed, both running while
    `sweep.run_parts` spreads another sweep over two worker processes ("GPUs" 0 and 1)."""
    where = tmp_path_factory.mktemp("sharded")
    uri = ["--tracking-uri", mlflow_server.uri, "--experiment", "shards"]
    first = start([*uri, "-b", "1,2", "-mods", "noop", "--shard", "0/2"], where)
    sweep_id, head = printed_sweep_id(first)
    second = start([*uri, "-b", "1,2", "-mods", "noop", "--shard", "1/2", "--sweep-id", sweep_id],
                   where)
    track = TrackingSettings("workers", mlflow_server.uri, sweep_id="workers1")
    notes: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(where)
        workers = sweep.run_parts(sweep_of([3, 4]), {"configs": "2"}, track, None, ["0", "1"],
                                  False, notes.append)
    done = []
    for proc, before in ((first, head), (second, "")):
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
        done.append((proc.returncode, out, before + err))
    return {"sweep_id": sweep_id, "done": done, "workers": workers, "notes": notes,
            "client": MlflowClient(mlflow_server.uri)}


def runs_of(client: MlflowClient, experiment: str, kind: str, sweep_id: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    query = f"tags.`flexbench.kind` = '{kind}' and tags.`flexbench.sweep_id` = '{sweep_id}'"
    return client.search_runs([exp.experiment_id], query)


def assert_parts_cover(client, experiment: str, sweep_id: str, configs, labels: set[str]) -> dict:
    """Sweep runs (one per part) and their config runs: every config once, under its part."""
    parts = {r.info.run_id: r for r in runs_of(client, experiment, "sweep", sweep_id)}
    children = runs_of(client, experiment, "config", sweep_id)
    assert {p.data.params["shard"] for p in parts.values()} == labels
    assert {p.info.run_name for p in parts.values()} == {f"sweep {sweep_id} shard {x}"
                                                         for x in labels}
    assert sorted(r.data.tags["flexbench.config_key"] for r in children) == sorted(keys(configs))
    for child in children:
        parent = parts[child.data.tags["mlflow.parentRunId"]]
        assert child.data.tags["flexbench.part_id"] == parent.data.tags["flexbench.part_id"]
        assert child.info.status == "FINISHED"
    return parts


def test_shards_share_the_printed_sweep_id_and_cover_the_sweep(sharded):
    for code, _, err in sharded["done"]:
        assert code == 0, err[-3000:]
    sid = sharded["sweep_id"]
    assert f"shard 0/2 of sweep {sid}: 1 of 2 configs; run the other shards with --sweep-id {sid}" \
        in sharded["done"][0][2]
    assert f"shard 1/2 of sweep {sid}: 1 of 2 configs" in sharded["done"][1][2]
    parts = assert_parts_cover(sharded["client"], "shards", sid, sweep_of([1, 2]), {"0/2", "1/2"})
    for part in parts.values():
        assert part.data.params["configs"] == "2"  # the whole sweep's size, on every shard


def test_gpu_workers_share_the_sweep_id_and_their_union_is_the_outcome(sharded):
    out, notes = sharded["workers"], sharded["notes"]
    assert out.exit_code == 0, (out.problems, out.offline, notes)
    assert keys_of(out.records) == keys(sweep_of([3, 4]))  # in sweep order
    assert notes[:3] == ["sweep workers1: 2 configs over GPUs 0,1",
                         "[gpu 0] 1 configs, sweep workers1 shard 0/2",
                         "[gpu 1] 1 configs, sweep workers1 shard 1/2"]
    parts = assert_parts_cover(sharded["client"], "workers", "workers1", sweep_of([3, 4]),
                               {"0/2", "1/2"})
    assert {p.data.params["cuda_visible_devices"] for p in parts.values()} == {"0", "1"}
    assert sorted(out.run_id.split(",")) == sorted(parts)
    assert sweep.closing_line(out).endswith(f"sweep runs {out.run_id.replace(',', ', ')}")


def keys_of(records: list[RunRecord]) -> list[str]:
    return [r.config_key for r in records]
