"""Named baselines: one real CPU sweep (to the session's `mlflow server`) with several
baselines per config, read back by summary and compare; the kernel-name helpers; a flex
backend that did not run its own kernels.

The sweep compiles flex three times (causal and softcap fp32, rel bf16: seconds each on CPU)
and inductor_math twice, once per module.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from flexbench import baselines, compare, kernels, measure, query, report, schema, sweep
from flexbench.config import BenchConfig
from flexbench.record import RunRecord
from flexbench.tracking_settings import TrackingSettings
from tests.test_report import flexbench, log_sweep, record_of

CPU = dict(batch=1, heads=2, head_dim=16, device="cpu")
ALL_CPU = "sdpa,sdpa_math,eager_math,inductor_math,sdpa_cudnn"
CAUSAL = BenchConfig(q_len=128, score_mod="causal", dtype="float32", baselines=ALL_CPU, **CPU)
SOFTCAP = BenchConfig(q_len=128, score_mod="softcap", dtype="float32", baselines=ALL_CPU, **CPU)
# bf16 rel bias at 512: |q - kv| up to 511 is not exact in bf16, SDPA's mask rounds it.
REL_BF16 = BenchConfig(q_len=512, score_mod="rel", dtype="bfloat16", **CPU)
MEASURED = ("sdpa", "sdpa_math", "eager_math", "inductor_math")
EXPERIMENT = "baselines"


@pytest.fixture(scope="module")
def swept(mlflow_server, tmp_path_factory):
    journal = tmp_path_factory.mktemp("journal") / "journal.jsonl"
    out = sweep.measure_and_track(
        [CAUSAL, SOFTCAP, REL_BF16],
        TrackingSettings(EXPERIMENT, mlflow_server.uri, str(journal)),
        progress=False,
        warn=print,
    )
    assert out.offline is None and out.failed == 0, [r.error for r in out.records]
    return {r.params["score_mod"]: r for r in out.records} | {"outcome": out}


def test_every_named_baseline_is_checked_and_timed_with_its_own_metrics(swept):
    m = swept["causal"].metrics
    for name in MEASURED:
        assert 0 < m[f"fwd_{name}_us_p20"] <= m[f"fwd_{name}_us"] <= m[f"fwd_{name}_us_p80"]
        assert m[f"fwd_speedup_{name}"] == pytest.approx(m[f"fwd_{name}_us"] / m["fwd_compiled_us"])
        assert 0 <= m[f"{name}_max_abs_err"] < 1e-4  # each checked against the reference
        assert m[f"fwd_{name}_tflops"] > 0
    assert not any("sdpa_cudnn" in k for k in m)  # skipped: never timed, no error


def test_first_baseline_fills_the_seeds_names(swept):
    r = swept["causal"]
    m = r.metrics
    assert m["fwd_eager_us"] == m["fwd_sdpa_us"] and m["fwd_eager_us_p80"] == m["fwd_sdpa_us_p80"]
    assert m["fwd_speedup"] == m["fwd_speedup_sdpa"]
    assert m["baseline_max_abs_err"] == m["sdpa_max_abs_err"]
    assert r.params["baseline"] == "sdpa_is_causal" and r.params["baselines"] == ALL_CPU


def test_cuda_only_baseline_on_cpu_is_skipped_with_the_reason(swept):
    r = swept["causal"]
    assert r.status == "FINISHED"
    skipped = r.tags[schema.BASELINE_SKIPPED_TAG]
    assert skipped == "sdpa_cudnn: needs CUDA (this config runs on cpu)"


def test_sdpa_cannot_compute_softcap_so_eager_math_is_first(swept):
    r = swept["softcap:30"]
    skipped = report.tag_entries(r.to_row(), schema.BASELINE_SKIPPED_TAG)
    assert set(skipped) == {"sdpa", "sdpa_math", "sdpa_cudnn"}
    assert skipped["sdpa"].startswith("SDPA cannot compute this mod")
    m = r.metrics
    assert r.status == "FINISHED" and r.params["baseline"] == "eager_math"
    assert m["fwd_eager_us"] == m["fwd_eager_math_us"] and "fwd_sdpa_us" not in m
    assert m["inductor_math_max_abs_err"] < 1e-4  # compiled dense math of the same function


def test_kernels_that_ran_are_tagged_per_side(swept):
    tags = swept["causal"].tags
    assert tags["flexbench.flex_kernels"] == "CompiledFxGraph"  # inductor's C++ on CPU
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in tags["flexbench.sdpa_kernels"]
    assert "aten::_scaled_dot_product_attention_math" in tags["flexbench.sdpa_math_kernels"]
    families = {n: kernels.family(tags[f"flexbench.{n}_kernels"]) for n in MEASURED}
    assert families == {"sdpa": "flash", "sdpa_math": "math", "eager_math": "math",
                        "inductor_math": "inductor"}
    assert "flexbench.sdpa_cudnn_kernels" not in tags


def test_bf16_bias_baseline_passes_but_is_marked_approximate(swept):
    r = swept["rel"]
    assert r.status == "FINISHED" and "fwd_speedup" in r.metrics
    tol = 3e-2 + 3e-2 * 1  # bf16 atol + rtol * max|out| (>= 1 here)
    assert r.metrics["sdpa_max_abs_err"] > tol > r.metrics["max_abs_err"]
    assert r.tags[measure.INEXACT_TAG].startswith("sdpa: approximate (bf16 mask), out max_abs")
    assert "approximate" not in swept["causal"].tags.get(measure.INEXACT_TAG, "")


def test_summary_shows_family_approximation_and_every_baseline(mlflow_server, swept, capsys):
    code, out, _ = flexbench(
        capsys, f"summary --tracking-uri {mlflow_server.uri} --experiment {EXPERIMENT}"
    )
    assert code == 0
    assert "sdpa_is_causal [flash]" in out and "eager_math [math]" in out
    assert "sdpa_attn_mask [flash] approximate (bf16 mask)" in out
    header = next(line for line in out.splitlines() if "fwd_speedup" in line)
    assert all(f"fwd_speedup_{n}" in header for n in MEASURED)
    baselines_part = out.split("Baselines")[1]
    assert "2 (needs CUDA (this config runs on cpu))" in baselines_part  # causal, softcap
    code, text, _ = flexbench(
        capsys,
        f"summary --tracking-uri {mlflow_server.uri} --experiment {EXPERIMENT} --format json",
    )
    named = {b["baseline"]: b for b in json.loads(text)["aggregates"]["baselines"]}
    sweep_run = MlflowClient(mlflow_server.uri).get_run(swept["outcome"].run_id).data.metrics
    assert sweep_run["fwd_speedup_eager_math_geomean"] == pytest.approx(
        named["eager_math"]["fwd_speedup_geomean"]
    )
    assert named["sdpa"]["timed"] == 2 and named["sdpa"]["approximate"] == 1
    assert named["eager_math"]["timed"] == 2 and named["inductor_math"]["kernels"] == "inductor"


def _quiet(record: RunRecord) -> RunRecord:
    """Every timing's p20/p80 at median -/+ 1%, converged (a quiet GPU; a busy CPU is not)."""
    m = dict(record.metrics)
    for key in [k for k in m if k.endswith("_us")]:
        m[f"{key}_p20"], m[f"{key}_p80"] = m[key] * 0.99, m[key] * 1.01
        m[f"{key[:-3]}_unconverged"] = 0.0
    return record.with_run(metrics=m)


def _slower(record: RunRecord, name: str, factor: float) -> RunRecord:
    m = dict(record.metrics)
    for key in (f"fwd_{name}_us", f"fwd_{name}_us_p20", f"fwd_{name}_us_p80"):
        m[key] *= factor
    return record.with_run(metrics=m)


def test_compare_matches_baselines_by_name(mlflow_server, swept):
    real = [_quiet(record_of(swept[k])) for k in ("causal", "softcap:30")]
    tags = swept["outcome"].records[0].tags
    base = log_sweep(mlflow_server.uri, "baselines-compare", real, tags, "base")
    slow = log_sweep(mlflow_server.uri, "baselines-compare",
                     [_slower(r, "eager_math", 1.5) for r in real], tags, "eager_math slower")
    result = compare.compare(query.Selection(base), query.Selection(slow), mlflow_server.uri)
    by_name = {m.base["score_mod"]: m for m in result.matches}
    causal = {c.timing: c for c in by_name["causal"].changes}
    assert causal["fwd_eager_math_us"].verdict == "regression"
    assert causal["fwd_eager_math_us"].ratio == pytest.approx(1.5)
    assert "fwd_sdpa_us" not in causal  # the first baseline: its fwd_eager_us covers it
    assert causal["fwd_eager_us"].verdict == "" and causal["fwd_compiled_us"].verdict == ""
    # softcap's first baseline is eager_math: compared once, as fwd_eager_us
    softcap = {c.timing for c in by_name["softcap:30"].changes}
    assert "fwd_eager_us" in softcap and "fwd_eager_math_us" not in softcap


def test_one_config_table_still_names_the_baselines_family(swept):
    text = report.results_table([swept["softcap:30"].to_row()])
    header = text.splitlines()[0]
    assert "| baseline " in header and "fwd_eager_math_us" in header  # the side named
    assert "eager_math [math]" in text.splitlines()[2]


def test_timing_conditions_name_the_first_baseline_once():
    row = {"baseline": "sdpa_is_causal", "baselines": "sdpa,eager_math",
           "fwd_sdpa_unconverged": 1.0, "fwd_eager_unconverged": 1.0,
           "fwd_eager_math_throttled": 1.0, "fwd_eager_math_sm_mhz": 1500.0}
    assert report.flagged(row) == ["fwd_eager_math throttled (1500 MHz)", "fwd_sdpa_unconverged"]


def test_compare_never_pairs_different_first_baselines(swept):
    base = swept["causal"].to_row()
    other = copy.deepcopy(base)
    other["baseline"], other["baselines"] = "eager_math", "eager_math,sdpa"
    other["fwd_eager_us"] = other["fwd_eager_math_us"]
    names = [c.timing for c in compare.changes(base, other, 0.05)]
    assert "fwd_eager_us" not in names and {"fwd_sdpa_us", "fwd_eager_math_us"} <= set(names)


def test_flex_backend_on_cpu_fails_the_config_with_the_reason():
    c = BenchConfig(q_len=128, score_mod="noop", dtype="float32", flex_backend="triton", **CPU)
    result = measure.Bench().run(c)
    assert not result.ok and "flex backend triton needs CUDA" in result.error
    assert c.run_name().endswith(" triton") and c.params()["flex_backend"] == "triton"


def test_a_flex_backend_that_ran_other_kernels_fails_loudly():
    c = BenchConfig(q_len=128, score_mod="noop", dtype="float32", flex_backend="flash", **CPU)
    x = torch.randn(64, 64)
    tags: dict[str, str] = {}
    with pytest.raises(RuntimeError, match="flex backend flash requested but flex ran math"):
        measure.record_kernels(c, {"flex": lambda: x @ x}, None, (), tags)
    assert tags["flexbench.flex_kernels"] == "aten::matmul; aten::mm"


def test_kernel_names_are_short_and_families_named():
    long = ("void fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::"
            "AttentionKernel<cutlass::bfloat16_t, cutlass::arch::Sm80, true, 64, 64>::Params)")
    assert kernels.short(long) == "fmha_cutlassF_bf16_aligned_64x64_rf_sm80"
    flash = ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 64, 4, "
             "Flash_kernel_traits<128, cutlass::bfloat16_t> >, (bool)0>(pytorch_flash::Params)")
    assert kernels.short(flash) == "pytorch_flash::flash_fwd_kernel"
    assert kernels.family([kernels.short(long)]) == "efficient"
    assert kernels.family("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "cudnn"
    assert kernels.family("pytorch_flash::flash_fwd_kernel; Memcpy") == "flash"
    assert kernels.family("triton_poi_fused_0; triton_tem_fused_1") == "triton"
    assert kernels.family("triton_per_fused__softmax_0; ampere_bf16_s16816gemm") == "inductor"
    assert kernels.family("ampere_bf16_s16816gemm; cunn_SoftMaxForward") == "math"
    assert kernels.family("") == ""
    cut = kernels.tag_value([f"kernel_{i:03d}" for i in range(200)])
    assert len(cut) <= kernels.TAG_CHARS + 20 and cut.endswith("more)")
    assert int(cut.rsplit("(+", 1)[1].split()[0]) + cut.count(";") == 200


def test_registry_refuses_names_that_collide_with_the_seeds_metrics():
    for name in ("eager", "compiled", "fwd", "baseline", "sdpa"):
        with pytest.raises(ValueError, match="taken, reserved"):
            baselines.register(name, "x")(lambda case: None)


def test_baselines_command_lists_each_with_what_it_computes():
    from click.testing import CliRunner

    from flexbench.cli import cli

    result = CliRunner().invoke(cli, ["baselines"])
    assert result.exit_code == 0
    for name, b in baselines.REGISTRY.items():
        assert f"| {name} " in result.output and b.description in result.output
