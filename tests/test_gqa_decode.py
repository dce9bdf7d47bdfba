"""GQA, unequal lengths, decoding and kernel options (issue 8, items 1-3), on CPU.

One compiled CPU sweep (module fixture) of GQA configs with q_len != kv_len and a decode config;
the dense reference itself is checked against a naive per-head loop written here; one
`flexbench run --decode --kernel-options` against the real `mlflow server` checks what is logged.
"""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from flexbench import flops, measure, mods, pipeline
from flexbench.cli import cli, main
from flexbench.config import BenchConfig, with_options
from flexbench.record import RunRecord

CPU = dict(batch=1, heads=4, kv_heads=2, head_dim=16, dtype="float32", device="cpu")
Q_LEN, KV_LEN = 64, 320  # one 128-block of queries against three of keys
CAUSAL = BenchConfig(q_len=Q_LEN, kv_len=KV_LEN, score_mod="causal", **CPU)
WINDOW = BenchConfig(q_len=Q_LEN, kv_len=KV_LEN, score_mod="sliding_window:32", **CPU)
ALIBI = BenchConfig(q_len=Q_LEN, kv_len=KV_LEN, score_mod="alibi", **CPU)
DECODE = BenchConfig(q_len=1, kv_len=512, score_mod="causal", **CPU)
SWEEP = [CAUSAL, WINDOW, ALIBI, DECODE]
# Hand-computed: 4 · B · Hq · Q · KV · D, with the 4 *query* heads.
FWD_FLOPS = 4 * 1 * 4 * Q_LEN * KV_LEN * 16  # = 5,242,880
DECODE_KV_BYTES = 2 * 1 * 2 * 512 * 16 * 4  # K and V, 2 kv heads, float32 = 131,072
KERNEL_OPTIONS = '{"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}'


@pytest.fixture(scope="module")
def results() -> dict[str, measure.Result]:
    keys = ["causal", "sliding_window:32", "alibi", "decode"]
    return dict(zip(keys, pipeline.measure_configs(SWEEP, progress=False)))


# --- an independent reference: a loop over query heads, mask and bias written out ---------------


def naive_attention(c: BenchConfig, allowed, bias) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias(h, i, j), masked by allowed(i, j)) v, per query head, in
    float64; query head h reads kv head h // (heads / kv_heads)."""
    q, k, v = (t.detach().double() for t in measure.make_inputs(c, requires_grad=False))
    group = c.heads // c.kv_heads
    i = torch.arange(c.q_len).view(-1, 1)
    j = torch.arange(c.kv_len).view(1, -1)
    out = torch.empty_like(q)
    for h in range(c.heads):
        s = q[0, h] @ k[0, h // group].T / math.sqrt(c.head_dim) + bias(h, i, j)
        s = s.masked_fill(~allowed(i, j), -math.inf)
        out[0, h] = torch.softmax(s, dim=-1) @ v[0, h // group]
    return out


def built_reference(c: BenchConfig) -> torch.Tensor:
    built = mods.resolve(c.score_mod).build(mods.Dims(c.heads, c.q_len, c.kv_len, "cpu"))
    q, k, v = measure.make_inputs(c, requires_grad=False)
    return measure.reference(q, k, v, built, 1 / math.sqrt(c.head_dim), None)[0]


OFFSET = KV_LEN - Q_LEN  # bottom-right: query i sits at position i + kv_len - q_len
SLOPES = mods.alibi_slopes(4, "cpu").double()
NAIVE = {
    "causal": (CAUSAL, lambda i, j: i + OFFSET >= j, lambda h, i, j: 0.0),
    "window": (WINDOW, lambda i, j: (i + OFFSET >= j) & (i + OFFSET - j <= 32), lambda h, i, j: 0),
    "alibi": (ALIBI, lambda i, j: j >= 0, lambda h, i, j: SLOPES[h] * (j - i)),
    "decode": (DECODE, lambda i, j: j >= 0, lambda h, i, j: 0.0),  # one query sees every key
}


@pytest.mark.parametrize("name", NAIVE)
def test_dense_reference_matches_a_naive_gqa_loop(name):
    c, allowed, bias = NAIVE[name]
    expected = naive_attention(c, allowed, bias)
    assert expected.shape == (1, 4, c.q_len, 16)
    torch.testing.assert_close(built_reference(c), expected, rtol=1e-9, atol=1e-9)


def test_causal_is_bottom_right_aligned_when_q_is_shorter():
    built = mods.resolve("causal").build(mods.Dims(4, Q_LEN, KV_LEN, "cpu"))
    mask = built.mask[0, 0]
    assert mask[0].sum() == OFFSET + 1 and mask[-1].all()  # first query sees 257 keys, last all
    assert not built.sdpa_is_causal  # SDPA's is_causal is top-left: the baseline gets the mask


# --- flex, baseline and reference agree; metrics use query heads and Q·KV ---------------------


@pytest.mark.parametrize("key", ["causal", "sliding_window:32", "alibi", "decode"])
def test_flex_baseline_and_reference_agree(results, key):
    r = results[key]
    assert r.ok, r.error
    assert r.metrics["max_abs_err"] < 1e-4 and r.metrics["fwd_max_abs_err"] < 1e-4
    assert r.metrics["baseline_max_abs_err"] < 1e-4
    assert r.baseline == "sdpa_attn_mask"  # a dense mask/bias (with enable_gqa), never is_causal


@pytest.mark.parametrize(
    ("key", "sparsity"),
    [("causal", 0.0), ("sliding_window:32", 1 / 3), ("alibi", 0.0)],  # window: keys 224-319
)
def test_flops_count_query_heads_q_times_kv_and_sparsity(results, key, sparsity):
    assert flops.attention_flops(1, 4, Q_LEN, KV_LEN, 16) == FWD_FLOPS
    m = results[key].metrics
    assert m["sparsity"] == pytest.approx(sparsity)
    work = FWD_FLOPS * (1 - sparsity)
    for side in ("eager", "compiled"):
        assert m[f"fwd_{side}_tflops"] == pytest.approx(work / (m[f"fwd_{side}_us"] * 1e-6) / 1e12)
    kv_heads_flops = flops.attention_flops(1, 2, Q_LEN, KV_LEN, 16, 1 - sparsity)
    assert m["fwd_compiled_tflops"] != pytest.approx(
        flops.tflops(kv_heads_flops, m["fwd_compiled_us"])
    )
    assert "fwd_compiled_tbps" not in m  # bandwidth is reported for decoding only


def test_run_name_and_params_show_kv_heads_and_kv_len(results):
    record = RunRecord.from_result(results["causal"])
    assert record.run_name == "causal b1 h4 kvh2 s64 kv320 d16 fp32"
    p = record.params
    assert (p["shape"], p["heads"], p["kv_heads"], p["q_len"], p["kv_len"]) == (
        "1,4,64,16",
        "4",
        "2",
        "64",
        "320",
    )
    decode = RunRecord.from_result(results["decode"])
    assert decode.run_name == "causal b1 h4 kvh2 s1 kv512 d16 fp32"


def test_decode_reports_kv_bandwidth(results):
    m = results["decode"].metrics
    assert flops.kv_bytes(1, 2, 512, 16, 4) == DECODE_KV_BYTES
    for side in ("eager", "compiled"):
        assert m[f"fwd_{side}_tbps"] == pytest.approx(
            DECODE_KV_BYTES / (m[f"fwd_{side}_us"] * 1e-6) / 1e12
        )
    assert m["fwd_compiled_tflops"] == pytest.approx(
        flops.tflops(4 * 4 * 1 * 512 * 16, m["fwd_compiled_us"])
    )


def test_timer_auto_is_cudagraph_for_decoding_on_cuda_and_cpu_on_cpu():
    cuda = with_options(DECODE, device="cuda", timer="auto")  # config level: no GPU needed
    assert (cuda.q_len, cuda.timer) == (1, "cudagraph")
    assert DECODE.timer == "cpu"
    assert with_options(cuda, device="cpu").timer == "cpu"  # auto is chosen again
    assert with_options(cuda, timer="do_bench").timer == "do_bench"  # an explicit timer stays


# --- kernel options ----------------------------------------------------------------------------


def test_kernel_options_reach_flex():
    # CPU flex ignores BLOCK_M and friends, but validates BACKEND: its error proves the
    # options are passed through (to the compiled call, not dropped on the way).
    bogus = with_options(CAUSAL, kernel_options={"BLOCK_M": 64, "BACKEND": "NO_SUCH"})
    (r,) = pipeline.measure_configs([bogus], progress=False)
    assert not r.ok and "BACKEND" in r.error and "NO_SUCH" in r.error
    assert "fwd_compiled_us" not in r.metrics


def test_invalid_kernel_options_json_is_a_one_line_usage_error(capsys):
    args = [
        "run",
        "--device",
        "cpu",
        "-b",
        "1",
        "-nh",
        "2",
        "-s",
        "64",
        "-d",
        "16",
        "-mods",
        "noop",
        "--kernel-options",
        "{BLOCK_M: 64",
    ]
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("Error: kernel_options must be a JSON object")


def test_decode_with_kernel_options_is_logged_through_the_cli(mlflow_server):
    args = [
        "run",
        "--device",
        "cpu",
        "-b",
        "1",
        "-nh",
        "4",
        "--kv-heads",
        "2",
        "-s",
        "512",
        "--decode",
        "-d",
        "16",
        "-dtype",
        "float32",
        "-mods",
        "causal",
        "--kernel-options",
        KERNEL_OPTIONS,
        "--tracking-uri",
        mlflow_server.uri,
        "--experiment",
        "gqa-decode",
        "--quiet",
    ]
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 0, done.output
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("gqa-decode")
    (run,) = client.search_runs([exp.experiment_id], "tags.`flexbench.kind` = 'config'")
    p, m = run.data.params, run.data.metrics
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "causal b1 h4 kvh2 s1 kv512 d16 fp32"
    assert (p["q_len"], p["kv_len"], p["heads"], p["kv_heads"], p["timer"]) == (
        "1",
        "512",
        "4",
        "2",
        "cpu",
    )
    assert {k: v for k, v in p.items() if k.startswith("ko_")} == {
        "ko_BLOCK_M": "64",
        "ko_BLOCK_N": "64",
        "ko_num_warps": "4",
        "ko_num_stages": "3",
    }
    assert m["max_abs_err"] < 1e-4
    assert m["fwd_compiled_tbps"] == pytest.approx(
        flops.tbps(DECODE_KV_BYTES, m["fwd_compiled_us"])
    )
