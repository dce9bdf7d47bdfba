"""BenchConfig validation and defaults, sweep expansion, stable keys, names, params, shards."""

from __future__ import annotations

import itertools
import subprocess
import sys
from dataclasses import replace

import pytest

from flexbench.config import BenchConfig, configs_from_file, shard, with_options
from flexbench.spec import SweepSpec
from tests.test_cli import run_main

SMALL = dict(batch=2, heads=4, q_len=128, head_dim=16, dtype="float32", device="cpu")


def small(**changes: object) -> BenchConfig:
    return BenchConfig(**{**SMALL, **changes})


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"batch": 0}, r"^batch must be a whole number > 0, got 0$"),
        ({"heads": -2}, r"^heads must be a whole number > 0"),
        ({"q_len": 0}, r"^q_len must be a whole number > 0"),
        ({"head_dim": 0}, r"^head_dim must be a whole number > 0"),
        ({"kv_heads": 0}, r"^kv_heads must be a whole number > 0"),
        ({"kv_len": -1}, r"^kv_len must be a whole number > 0"),
        ({"batch": True}, r"^batch must be a whole number"),
        ({"q_len": 128.0}, r"^q_len must be a whole number"),
        ({"heads": 6, "kv_heads": 4}, r"^heads \(6\) must be divisible by kv_heads \(4\)$"),
        ({"dtype": "float64"}, r"^dtype must be one of float16, bfloat16, float32; got 'float64'"),
        ({"dtype": "bf16"}, r"^dtype must be one of"),
        ({"score_mod": "nope"}, r"^score_mod: unknown mod 'nope'; built-in mods: noop, causal"),
        ({"score_mod": "causal:3"}, r"^score_mod: mod 'causal' takes no parameter"),
        ({"score_mod": None}, r"^score_mod must be a mod name"),
        ({"device": "tpu"}, r"^device must be one of cpu, cuda"),
        ({"timer": "wall"}, r"^timer must be one of auto, do_bench, cudagraph, cudagraph_fwd, cpu"),
        ({"timer": "do_bench"}, r"^timer 'do_bench' needs CUDA"),
        ({"device": "cuda", "timer": "cpu"}, r"^timer 'cpu' would not wait for CUDA kernels"),
        ({"kernel_options": "{bad"}, r"^kernel_options must be a JSON object"),
        ({"kernel_options": "[1, 2]"}, r"^kernel_options must be a JSON object"),
        ({"kernel_options": {"BLOCK_M": [64]}}, r"^kernel_options\[BLOCK_M\] must be a number"),
        ({"kernel_options": {"BACKEND": "FLASH"}, "flex_backend": "flash"},
         r"^flex's BACKEND is set twice: by flex_backend and kernel_options$"),
        ({"flex_backend": "cute"}, r"^flex_backend must be one of auto, triton, flash"),
        ({"baselines": "sdpa,nope"}, r"^unknown baseline 'nope'; choose from sdpa, sdpa_cudnn"),
        ({"baselines": "sdpa,sdpa"}, r"^baseline 'sdpa' is named twice$"),
        ({"baselines": ""}, r"^baseline: name at least one of sdpa"),
    ],
)
def test_invalid_field_is_a_one_line_value_error_naming_it(changes, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        small(**changes)
    assert "\n" not in str(info.value)


def test_defaults_fill_kv_heads_kv_len_and_canonical_mod_names():
    c = BenchConfig(batch=8, heads=16, q_len=4096, head_dim=128)
    assert (c.kv_heads, c.kv_len) == (16, 4096)
    assert (c.dtype, c.score_mod, c.device, c.timer) == (
        "bfloat16", "noop", "cuda", "cudagraph")
    assert not (c.calculate_bwd or c.dynamic or c.max_autotune) and c.kernel_options == ""
    assert c == BenchConfig(8, 16, 4096, 128, kv_heads=16, kv_len=4096)
    gqa = small(heads=8, kv_heads=2, q_len=1, kv_len=512)
    assert (gqa.heads, gqa.kv_heads, gqa.q_len, gqa.kv_len) == (8, 2, 1, 512)
    # A parameter is spelled one way whatever was typed, and defaults are written out.
    assert small(score_mod="softcap").score_mod == "softcap:30"
    assert small(score_mod=" sliding_window:128.0").score_mod == "sliding_window:128"
    assert small(score_mod="sliding_window:1234567").score_mod == "sliding_window:1234567"
    assert small(score_mod="softcap:2.5").score_mod == "softcap:2.5"


def test_with_options_keeps_followed_defaults_following():
    c = small()  # kv_heads, kv_len and timer from their defaults
    longer = with_options(c, q_len=512, heads=8)
    assert (longer.q_len, longer.kv_len, longer.heads, longer.kv_heads) == (512, 512, 8, 8)
    assert with_options(c, device="cuda").timer == "cudagraph"
    assert with_options(c, device="cuda", q_len=1).timer == "cudagraph"
    gqa = small(heads=8, kv_heads=2, kv_len=1024)  # set on purpose: they stay
    moved = with_options(gqa, heads=16, q_len=1)
    assert (moved.kv_heads, moved.kv_len) == (2, 1024)
    assert with_options(c, kv_len=64).q_len == 128
    with pytest.raises(ValueError, match=r"^heads \(6\) must be divisible by kv_heads \(4\)"):
        with_options(small(heads=8, kv_heads=4), heads=6)


@pytest.mark.parametrize(
    ("device", "q_len", "timer", "resolved"),
    [
        ("cpu", 128, "auto", "cpu"),
        ("cuda", 128, "auto", "cudagraph"),  # forward and backward from CUDA graphs
        ("cuda", 128, "cudagraph_fwd", "cudagraph_fwd"),  # graphs forward, do_bench backward
        ("cuda", 1, "auto", "cudagraph"),  # decoding: launch overhead dominates do_bench
        ("cuda", 128, "cudagraph", "cudagraph"),
        ("cuda", 1, "do_bench", "do_bench"),
        ("cpu", 128, "cpu", "cpu"),
    ],
)
def test_timer_auto_resolution(device, q_len, timer, resolved):
    assert small(device=device, q_len=q_len, timer=timer).timer == resolved


def seed_generate_experiment_configs(dtypes, batch_sizes, num_heads, seq_lens, head_dims, mods):
    """The seed's generate_experiment_configs loop (q_len == kv_len), as (shape, mod, dtype)."""
    q_kv_seq_lens = [(i, i) for i in seq_lens]
    return [
        ((bsz, n_heads, q_seq_len, head_dim), score_mod, dtype)
        for bsz, n_heads, (q_seq_len, _kv), head_dim, score_mod, dtype in itertools.product(
            batch_sizes, num_heads, q_kv_seq_lens, head_dims, mods, dtypes
        )
    ]


def test_sweep_spec_matches_the_seeds_order_and_count():
    axes = dict(
        batch_sizes=[1, 2], num_heads=[4, 8], seq_lens=[128, 256, 512], head_dims=[16, 32],
        mods=["noop", "causal", "rel"], dtypes=["float32", "bfloat16"],
    )
    configs = SweepSpec(
        axes["batch_sizes"], axes["num_heads"], axes["seq_lens"], axes["head_dims"],
        axes["mods"], axes["dtypes"], device="cpu", calculate_bwd=False,
    ).configs()
    assert len(configs) == 2 * 2 * 3 * 2 * 3 * 2
    got = [((c.batch, c.heads, c.q_len, c.head_dim), c.score_mod, c.dtype) for c in configs]
    assert got == seed_generate_experiment_configs(**axes)
    assert all(c.kv_len == c.q_len and c.kv_heads == c.heads for c in configs)
    assert {c.device for c in configs} == {"cpu"} and len(set(configs)) == len(configs)


def test_sweep_spec_adds_kv_heads_and_kv_lens_innermost():
    configs = SweepSpec([1], [8], [1], [64], ["noop"], ["float16"],
                           kv_heads=[8, 2], kv_lens=[256, 512], device="cpu").configs()
    assert [(c.kv_heads, c.kv_len) for c in configs] == [(8, 256), (8, 512), (2, 256), (2, 512)]


def test_sweep_spec_rejects_a_bad_value_with_the_field():
    with pytest.raises(ValueError, match="^head_dim must be"):
        SweepSpec([1], [2], [128], [0], ["noop"], device="cpu").configs()


REFERENCE = dict(batch=8, heads=16, q_len=4096, head_dim=128, score_mod="causal",
                 dtype="bfloat16", device="cuda")


def test_config_key_is_the_same_in_another_process():
    key = BenchConfig(**REFERENCE).config_key()
    code = (
        "from flexbench.config import BenchConfig\n"
        f"print(BenchConfig(**{REFERENCE!r}).config_key())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, timeout=120)
    assert other.stdout.strip() == key
    # Pinned: runs logged with this key are found again (resume) only while it stays the same.
    # A new BenchConfig field changes every key; if that is meant, update this value.
    assert key == "b31c6199dd36bce5"


def test_config_key_pins_the_identity_of_a_measurement():
    c = BenchConfig(**REFERENCE)
    # The same measurement however it was spelled: defaults, 'auto' timer, option order.
    assert BenchConfig(**REFERENCE, kv_heads=16, kv_len=4096, timer="cudagraph").config_key() \
        == c.config_key()
    a = BenchConfig(**REFERENCE, kernel_options='{"BLOCK_M": 64, "BLOCK_N": 32}')
    b = BenchConfig(**REFERENCE, kernel_options={"BLOCK_N": 32, "BLOCK_M": 64})
    assert a.config_key() == b.config_key()
    # Any change to what is measured changes the key.
    variants = [
        replace(c, batch=4), replace(c, heads=32, kv_heads=32), replace(c, kv_heads=4),
        replace(c, q_len=2048, kv_len=2048), replace(c, kv_len=8192), replace(c, head_dim=64),
        replace(c, dtype="float16"), replace(c, score_mod="noop"),
        replace(c, score_mod="sliding_window:128"), replace(c, score_mod="sliding_window:64"),
        replace(c, calculate_bwd=True), replace(c, dynamic=True), replace(c, max_autotune=True),
        replace(c, device="cpu", timer="cpu"), replace(c, timer="cudagraph_fwd"), a,
        replace(c, regime="sustained"),
        replace(c, flex_backend="flash"), replace(c, baselines="sdpa,eager_math"),
    ]
    keys = [v.config_key() for v in variants]
    assert c.config_key() not in keys and len(set(keys)) == len(keys)
    # How long to sample is not what is measured: the stopping rule keeps the key.
    same = [replace(c, max_noise=0.01), replace(c, min_samples=20), replace(c, max_time=9.0),
            replace(c, throttle_threshold=0.8), replace(c, regime="burst")]
    assert {v.config_key() for v in same} == {c.config_key()}


def test_timing_settings_resolve_per_device_and_are_validated():
    gpu, cpu = BenchConfig(**REFERENCE), small()
    assert (gpu.regime, gpu.max_noise, gpu.max_time) == ("burst", 0.005, 2.0)
    assert (cpu.regime, cpu.max_noise, cpu.max_time) == ("none", 0.02, 0.5)
    assert with_options(gpu, device="cpu", timer="auto").regime == "none"
    for bad, message in [({"max_noise": 0}, "max_noise"), ({"min_samples": 2}, "min_samples"),
                         ({"max_time": 0}, "max_time"), ({"throttle_threshold": 1.5}, "throttle"),
                         ({"regime": "hot"}, "regime")]:
        with pytest.raises(ValueError, match=message):
            small(**bad)


def test_run_name_is_readable():
    assert BenchConfig(**REFERENCE).run_name() == "causal b8 h16 s4096 d128 bf16"
    gqa = small(heads=8, kv_heads=2, q_len=1, kv_len=512, head_dim=64, score_mod="softcap:20")
    assert gqa.run_name() == "softcap:20 b2 h8 kvh2 s1 kv512 d64 fp32"
    assert small(dtype="float16").run_name() == "noop b2 h4 s128 d16 fp16"


def test_params_are_the_contract_names_as_strings():
    c = BenchConfig(**REFERENCE, kv_heads=4, calculate_bwd=True,
                    kernel_options={"BLOCK_M": 64, "PRESCALE_QK": False})
    assert c.params() == {
        "shape": "8,16,4096,128", "batch": "8", "heads": "16", "kv_heads": "4",
        "q_len": "4096", "kv_len": "4096", "head_dim": "128", "dtype": "bfloat16",
        "score_mod": "causal", "align": "end", "device": "cuda", "calculate_bwd": "true",
        "dynamic": "false", "max_autotune": "false", "timer": "cudagraph", "regime": "burst",
        "max_noise": "0.005", "min_samples": "10", "max_time": "2.0", "throttle_threshold": "0.9",
        "baselines": "sdpa", "flex_backend": "auto",
        "ko_BLOCK_M": "64", "ko_PRESCALE_QK": "false",
    }


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 13])
def test_shards_are_disjoint_balanced_and_cover_the_sweep(count):
    configs = SweepSpec([1, 2], [2, 4], [128, 256, 512], [16], ["noop", "causal"],
                           device="cpu").configs()
    shards = [shard(configs, i, count) for i in range(count)]
    flat = [c for s in shards for c in s]
    assert sorted(flat, key=configs.index) == configs  # every config exactly once
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize(("index", "count"), [(0, 0), (2, 2), (-1, 3)])
def test_bad_shard_is_rejected(index, count):
    with pytest.raises(ValueError, match=r"^shard must be I/N with 0 <= I < N"):
        shard([small()], index, count)


def test_cudagraph_fwd_times_only_the_forward_in_a_graph():
    from flexbench.timers import TIMERS
    from flexbench.timing import sampler_for

    assert [sampler_for(t, "fwd") for t in ("cudagraph_fwd", "cudagraph", "do_bench", "cpu")] == [
        "cudagraph", "cudagraph", "do_bench", "cpu"]
    assert [sampler_for(t, "bwd") for t in ("cudagraph_fwd", "cudagraph", "do_bench", "cpu")] == [
        "do_bench", "cudagraph", "do_bench", "cpu"]
    # only cudagraph captures the backward on its forward's stream
    assert [t for t in TIMERS if TIMERS[t].graph_bwd] == ["cudagraph"]


# --- --config FILE ---------------------------------------------------------------------------

SHAPES_YAML = """\
# production shapes: not a cross product
- {batch: 1, heads: 2, q_len: 128, head_dim: 16, mod: noop, dtype: float32}
- {batch: 4, heads: 32, kv_heads: 8, q_len: 1, kv_len: 8192, head_dim: 128, mod: causal}
"""


def test_config_file_lists_configs_in_order_with_the_common_options(tmp_path):
    path = tmp_path / "shapes.yaml"
    path.write_text(SHAPES_YAML)
    configs, sha = configs_from_file(path, device="cpu")
    assert [c.run_name() for c in configs] == [
        "noop b1 h2 s128 d16 fp32",
        "causal b4 h32 kvh8 s1 kv8192 d128 bf16",  # dtype defaults to bfloat16
    ]
    assert all(c.device == "cpu" and c.timer == "cpu" for c in configs)
    assert len(sha) == 16
    as_json = tmp_path / "shapes.json"
    as_json.write_text(
        '{"configs": [{"batch": 1, "heads": 2, "q_len": 128, "head_dim": 16, '
        '"score_mod": "noop", "dtype": "float32"}]}'
    )
    assert configs_from_file(as_json, device="cpu")[0] == configs[:1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "- {batch: 1, heads: 2, q_len: 128, head_dim: 16, mod: noop}\n- {batch: 1, heads: 2}",
            "entry 2: missing q_len, head_dim, mod",
        ),
        (
            "- {batch: 1, heads: 2, q_len: 128, head_dim: 16, mod: noop, colour: red}",
            "entry 1: unknown key colour",
        ),
        (
            "- {batch: 0, heads: 2, q_len: 128, head_dim: 16, mod: noop}",
            "entry 1: batch must be a whole number > 0",
        ),
        ("- {batch: 1, heads: 2, q_len: 128, head_dim: 16, mod: nope}", "entry 1: score_mod"),
        ("- [1, 2]", "entry 1: expected a mapping"),
        ("{}", "expected a non-empty list of configs"),
        ("- {batch: 1\n  heads", "not valid YAML/JSON"),
    ],
)
def test_malformed_config_file_is_one_line_exit_2_naming_the_entry(tmp_path, capsys, text, message):
    path = tmp_path / "shapes.yaml"
    path.write_text(text)
    code, err = run_main(["run", "--device", "cpu", "--config", str(path)], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert str(path) in err


def test_run_with_config_file_logs_its_hash_as_a_sweep_param(tmp_path, capsys):
    """The file's one config (the suite's tiny noop) already measured here: --resume skips it
    and creates no sweep run; without --resume it is measured under a sweep run with the
    file's hash."""
    from mlflow import MlflowClient

    from flexbench import env
    from flexbench.record import RunRecord
    from tests.test_report import log_sweep

    path = tmp_path / "shapes.yaml"
    path.write_text(SHAPES_YAML.splitlines()[1] + "\n")
    (config,), sha = configs_from_file(path, device="cpu")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = RunRecord(config.config_key(), config.run_name(), config.params())
    log_sweep(uri, "flexbench", [done], env.capture("cpu"), "measured before")
    args = ["run", "--device", "cpu", "--config", str(path), "--tracking-uri", uri, "--resume"]
    code, err = run_main([*args, "-b", "2"], capsys)
    assert code == 2 and "--config lists the configs: drop -b" in err
    code, err = run_main(args, capsys)
    assert code == 0 and "resume: skipped 1 of 1 configs" in err, err
    assert "nothing to do" in err
    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name("flexbench").experiment_id
    assert client.search_runs([exp_id], "params.config_sha = '" + sha + "'") == []
    code, err = run_main([*args[:-1], "--quiet"], capsys)
    assert code == 0, err
    (run,) = client.search_runs(
        [client.get_experiment_by_name("flexbench").experiment_id],
        "tags.`flexbench.kind` = 'sweep' and params.config_sha = '" + sha + "'",
    )
    assert run.data.params["config_file"] == str(path) and run.data.params["configs"] == "1"


def test_cpu_sized_defaults_and_the_first_line_of_a_cpu_sweep():
    from flexbench import sweep
    from flexbench.config import SIZE_DEFAULTS, device_sizes

    sizes, filled = device_sizes("cpu", batch=[], heads=[], seq_lens=[2048], head_dims=[])
    assert sizes == {"batch": [1], "heads": [4], "seq_lens": [2048], "head_dims": [64],
                     "dtypes": ["float32"]}
    assert filled == ["-b 1", "-nh 4", "-d 64", "-dtype float32"]
    assert device_sizes("cuda")[0] == SIZE_DEFAULTS["cuda"]
    small = SweepSpec(*(sizes[k] for k in AXES), ["causal"], sizes["dtypes"], device="cpu")
    small = small.configs()
    line = sweep.plan_line(small, "cpu", filled, auto=True)
    assert line == (
        "no CUDA device here, running on CPU with CPU-sized defaults -b 1 -nh 4 -d 64 -dtype "
        "float32 (give -b/-nh/-d/-dtype to choose): 1 configs, forward only, each up to about "
        "460 MB of memory (causal b1 h4 s2048 d64 fp32)"
    )
    # The seed's GPU sweep asked for on a CPU: it runs, after saying how big it is.
    gpu = SIZE_DEFAULTS["cuda"]
    seed = SweepSpec(*(gpu[k] for k in AXES), ["noop", "causal"], gpu["dtypes"], device="cpu")
    seed = seed.configs()
    assert sweep.plan_line(seed, "cpu", [], auto=False) == (
        "CPU sweep: 36 configs, forward only, each up to about 24.0 GB of memory "
        "(noop b16 h16 s4096 d128 bf16)"
    )
    assert sweep.plan_line(seed, "cuda", [], auto=True) == ""
    assert sweep.plan_line(SweepSpec([1], [2], [128], [16], ["noop"], ["float32"],
                                        device="cpu").configs(), "cpu", [], auto=False) == ""


AXES = ("batch", "heads", "seq_lens", "head_dims")
