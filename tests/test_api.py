"""The Python API: SweepSpec, TrackingSettings, `flexbench.*`, README's "From Python" example."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import flexbench
from flexbench import spec as spec_mod
from flexbench import sweep, tune
from flexbench.cli import api_options, run
from flexbench.config import BenchConfig
from flexbench.spec import SweepSpec
from flexbench.tracking_settings import TrackingSettings

REPO = Path(__file__).resolve().parents[1]
TINY = dict(batch=[1], heads=[2], seq_lens=[64], head_dims=[16], dtypes=["float32"])


def readme_example() -> str:
    """The code block of README's "From Python" section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return code


def test_readme_from_python_example_runs_a_sweep_and_reads_it_back(tmp_path):
    code = readme_example() + "\nprint('URI', uri)\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 config runs" in proc.stdout and "causal" in proc.stdout
    uri = re.search(r"^URI (\S+)$", proc.stdout, re.M)[1]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("from-python")
    runs = client.search_runs([exp.experiment_id])
    kinds = sorted(r.data.tags["flexbench.kind"] for r in runs)
    assert kinds == ["config", "sweep"]
    (child,) = [r for r in runs if r.data.tags["flexbench.kind"] == "config"]
    assert child.info.status == "FINISHED" and child.data.params["score_mod"] == "causal"


def test_import_flexbench_loads_neither_torch_nor_mlflow():
    code = ("import sys, flexbench; flexbench.TrackingSettings; "
            "print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, check=True)
    assert proc.stdout.strip() == "[]"


def test_public_names_are_the_api_functions():
    from flexbench import compare, history, summary

    assert flexbench.run is sweep.run and flexbench.run_tune is tune.run
    assert flexbench.summarize is summary.summary and flexbench.compare_runs is compare.compare
    assert flexbench.read_history is history.history and flexbench.BenchConfig is BenchConfig
    assert set(flexbench.__all__) <= set(dir(flexbench))
    with pytest.raises(AttributeError):
        flexbench.no_such_name  # noqa: B018


def test_spec_expands_in_the_seeds_order_with_the_template_on_every_config():
    spec = SweepSpec([1, 2], [2], [64, 128], [16], ["noop", "causal"], ["float32"],
                     device="cpu", max_noise=0.1, baselines="sdpa,eager_math")
    configs, params = spec.expand()
    assert [(c.batch, c.q_len, c.score_mod) for c in configs[:3]] == [
        (1, 64, "noop"), (1, 64, "causal"), (1, 128, "noop")]
    assert len(configs) == 8 and {(c.max_noise, c.baselines) for c in configs} == {
        (0.1, "sdpa,eager_math")}
    logged = sweep.sweep_params(**params)  # the sweep run's params
    assert logged == {"mods": "noop,causal", "b": "1,2", "nh": "2", "s": "64,128", "d": "16",
                      "dtype": "float32", "decode": "false", "flex_backend": "auto",
                      "device": "cpu", "max_noise": "0.1", "baseline": "sdpa,eager_math",
                      "configs": "8"}


def test_spec_decode_and_gqa_axes():
    spec = SweepSpec(**TINY, score_mods=["causal"], kv_heads=[1, 2], kv_lens=[256], decode=True,
                     device="cpu")
    got = [(c.q_len, c.kv_len, c.kv_heads) for c in spec.configs()]
    assert got == [(1, 256, 1), (1, 256, 2)]


def test_spec_fills_empty_sizes_with_the_devices_defaults():
    spec = SweepSpec(score_mods=["noop"], device="cpu")
    assert spec.size_defaults() == ["-b 1", "-nh 4", "-s 256", "-d 64", "-dtype float32"]
    (c,) = spec.configs()
    assert (c.batch, c.heads, c.q_len, c.head_dim, c.dtype) == (1, 4, 256, 64, "float32")


def test_spec_refuses_what_is_not_an_axis_or_a_template_field():
    with pytest.raises(TypeError, match="no option 'q_len'"):
        SweepSpec(q_len=128)
    with pytest.raises(TypeError, match="no option 'colour'"):
        SweepSpec(colour="red")
    with pytest.raises(ValueError, match="empty list for mods"):
        SweepSpec(**TINY, score_mods=[], device="cpu").configs()
    with pytest.raises(ValueError, match="reference of one mod"):
        SweepSpec(**TINY, score_mods=["noop", "causal"], device="cpu", reference="m:f").configs()


def test_spec_of_a_config_file_takes_no_shape_axis(tmp_path):
    path = tmp_path / "shapes.yaml"
    path.write_text("- {batch: 1, heads: 2, q_len: 64, head_dim: 16, mod: causal}\n")
    spec = SweepSpec(config_file=str(path), device="cpu", flex_backends=["auto", "triton"])
    configs, params = spec.expand()
    assert [c.flex_backend for c in configs] == ["auto", "triton"]
    assert params["config_file"] == str(path) and params["configs"] == 2
    with pytest.raises(ValueError, match="config_file lists the configs: drop batch"):
        SweepSpec([4], config_file=str(path), device="cpu").configs()


def test_device_auto_is_resolved_by_the_api(monkeypatch):
    import torch

    spec = SweepSpec(**TINY, score_mods=["noop"])
    assert spec.device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert spec.resolved().device == "cpu" and spec.configs()[0].device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert spec.resolved().device == "cuda"
    assert spec_mod.resolve_device("auto", gpus=[0]) == "cuda"


def test_cli_flags_become_spec_tracking_and_the_rest():
    argv = ["-b", "2", "-mods", "causal", "--device", "cpu", "--max-noise", "5",
            "--experiment", "e", "--resume", "--shard", "0/2", "--quiet"]
    opts = api_options(run.make_context("run", argv).params)
    assert set(opts) == {"spec", "tracking", "shard", "gpus", "compile_workers",
                         "compile_cache", "quiet"}
    spec, track = opts["spec"], opts["tracking"]
    assert (spec.batch, spec.score_mods, spec.setting("max_noise")) == ((2,), ("causal",), 0.05)
    assert (track.experiment, track.resume, opts["shard"]) == ("e", True, (0, 2))
    # Every BenchConfig field a config does not take from the grid is in the template.
    assert set(spec.template) == set(spec_mod.TEMPLATE_FIELDS)


def test_tracking_settings_take_removes_what_they_hold():
    opts = {"experiment": "x", "journal": "j.jsonl", "quiet": True}
    assert TrackingSettings.take(opts) == TrackingSettings("x", journal="j.jsonl")
    assert opts == {"quiet": True}


def test_tune_has_no_resume():
    with pytest.raises(ValueError, match="no resume"):
        tune.tune_sweep([], TrackingSettings(resume=True))


def test_a_config_says_how_the_timer_samples_it():
    c = BenchConfig(1, 2, 64, 16, dtype="float32", device="cpu", max_noise=0.1, min_samples=5)
    s = c.timing_settings()
    assert (s.regime, s.rule.max_noise, s.rule.min_samples) == ("none", 0.1, 5)
    assert (s.rule.max_time_s, s.throttle, s.gpu) == (0.5, 0.9, None)


def test_a_gpu_workers_job_carries_every_field_of_its_configs():
    c = BenchConfig(1, 2, 64, 16, dtype="float32", device="cpu", max_noise=0.1, min_samples=4)
    job = sweep._job([c], TrackingSettings(sweep_id="s1"), {}, "0/2", "0")
    assert [BenchConfig(**fields) for fields in job["configs"]] == [c]
    assert job["track"]["run_name"] == "sweep s1 shard 0/2"
