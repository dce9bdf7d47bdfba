"""User mods as the built-ins are: spec grammar, mask_mods with a BlockMask and an SDPA
baseline, a reference evaluated as flex evaluates a mod, checks that garbage cannot pass,
a mod's source in its identity, and --align.

Flex runs eagerly here (real tensors, milliseconds); the compiled path of a user mask
factory and of a wrong mod with its reference is in tests/test_measure.py's sweep, and the
resume test below compiles one tiny mod twice.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.nn.attention.flex_attention import flex_attention

from flexbench import measure, mods, pipeline, sweep
from flexbench.cli import main
from flexbench.config import BenchConfig, with_options
from flexbench.record import RunRecord
from flexbench.tracking_settings import TrackingSettings
from tests import user_mods

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

U = "tests.user_mods"
CPU = dict(batch=1, heads=2, head_dim=16, dtype="float32", device="cpu")
TINY = ["--device", "cpu", "-b", "1", "-nh", "2", "-s", "128", "-d", "16", "-dtype", "float32"]


def cfg(spec: str, q_len: int = 512, **kw) -> BenchConfig:
    return BenchConfig(q_len=q_len, score_mod=spec, **{**CPU, **kw})


def three_ways(c: BenchConfig):
    """(built, BlockMask, eager flex, SDPA baseline, reference) for one config, float64."""
    built = mods.resolve(c.score_mod).build(c.dims(), c.reference)
    block_mask = measure.Bench().block_mask(c, built)
    q, k, v = (t.double() for t in measure.make_inputs(c, requires_grad=False))
    scale = 1 / math.sqrt(c.head_dim)
    gqa = c.heads != c.kv_heads
    flex = flex_attention(q, k, v, built.score_mod, block_mask, scale, enable_gqa=gqa)
    baseline = measure.sdpa_baseline(q, k, v, built, scale)()
    reference, _ = measure.reference(q, k, v, built, scale, None)
    measure.cross_check(q, k, v, built, scale, reference)
    return built, block_mask, flex, baseline, reference


# --- the spec grammar -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "canonical", "filled"),
    [
        (f"{U}:lookback_64", f"{U}:lookback_64", f"{U}:lookback_64"),
        (f" {U} : generate_window( 32 ) ", f"{U}:generate_window(32)", f"{U}:generate_window(32)"),
        (
            f"{U}:generate_doc_mask(length={{kv_len}}, documents=4)",
            f"{U}:generate_doc_mask(length={{kv_len}}, documents=4)",
            f"{U}:generate_doc_mask(length=512, documents=4)",
        ),
        (
            f"causal&{U}:generate_window({{q_len}})",
            f"causal & {U}:generate_window({{q_len}})",
            f"causal & {U}:generate_window(512)",
        ),
        (
            f"causal | sliding_window:64 & {U}:lookback_64",
            f"causal | sliding_window:64 & {U}:lookback_64",
            f"causal | sliding_window:64 & {U}:lookback_64",
        ),
        (
            f"(causal | prefix_lm) & {U}:lookback_64",
            f"(causal | prefix_lm:256) & {U}:lookback_64",
            f"(causal | prefix_lm:256) & {U}:lookback_64",
        ),
        (
            f"{U}:generate_window(1) & (causal & sliding_window)",
            f"{U}:generate_window(1) & causal & sliding_window:256",
            f"{U}:generate_window(1) & causal & sliding_window:256",
        ),
    ],
)
def test_specs_have_a_canonical_form_and_fill_placeholders_per_config(spec, canonical, filled):
    c = cfg(spec)
    assert c.score_mod == canonical and mods.resolve(canonical).name == canonical
    assert c.mod_name == filled == c.params()["score_mod"] == c.run_name().split(" b1 ")[0]
    assert c.params()["mod_sha"] == c.mod_sha and len(c.mod_sha) == 12


def test_one_spec_follows_the_sweep_and_a_factory_is_called_once_per_filled_spec():
    spec = f"{U}:generate_doc_mask({{kv_len}}, 2)"
    a, b = cfg(spec, 256), cfg(spec, 256, batch=3, heads=4)
    assert a.mod_name == b.mod_name == f"{U}:generate_doc_mask(256, 2)"
    fn = mods.resolve(spec).instance(a.dims()).fn
    assert mods.resolve(spec).instance(b.dims()).fn is fn  # the same callable: one graph
    assert cfg(spec, 128).mod_name.endswith("(128, 2)") and cfg(spec, 128).mod_sha != a.mod_sha


def test_kind_comes_from_the_arity():
    d = cfg("noop").dims()
    assert mods.resolve(f"{U}:lookback_64").instance(d).kind == "mask_mod"
    assert mods.resolve(f"{U}:distance_penalty").instance(d).kind == "score_mod"
    assert mods.resolve(f"{U}:generate_alibi({{heads}})").instance(d).kind == "score_mod"
    built = mods.resolve(f"{U}:scalar_indexing").build(d)
    assert built.mask_mod is None and built.transform is not None  # eager-math baseline


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_pkg.mods:fn", "cannot import mod 'no_such_pkg.mods:fn' (ModuleNotFoundError"),
        (f"{U}:missing", f"cannot import mod '{U}:missing' (AttributeError"),
        (f"{U}:NOT_CALLABLE", f"mod '{U}:NOT_CALLABLE' is not callable"),
        (
            f"{U}:generate_window",
            f"mod '{U}:generate_window' takes 1 parameter (window); a mask_mod takes 4",
        ),
        (
            f"{U}:generate_window(x)",
            f"mod '{U}:generate_window(x)': (x) is not all Python literals",
        ),
        (
            f"{U}:generate_window(1 +)",
            f"mod '{U}:generate_window(1 +)': arguments '1 +' are not Python literals",
        ),
        (f"{U}:generate_window({{seq}})", "unknown placeholder {seq}"),
        (f"{U}:generate_window(3", "its arguments need a closing bracket"),
        (f"causal & {U}:distance_penalty", f"'{U}:distance_penalty' is not a mask_mod"),
        ("causal & softcap:5", "'softcap:5' is not a mask_mod"),
        ("causal &", "& and | need a mask spec on each side"),
        # only a config tells what a factory returns: still before anything runs
        (f"{U}:generate_alibi({{heads}}) & causal", f"'{U}:generate_alibi(2)' is not a mask_mod"),
        (f"{U}:generate_doc_mask({{kv_len}})", "generate_doc_mask(128)' raised TypeError"),
    ],
)
def test_a_bad_spec_is_one_line_exit_2_naming_it(spec, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", *TINY, "-mods", spec, "--quiet"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_commas_inside_a_spec_do_not_split_the_mod_list(capsys):
    spec = f"{U}:generate_doc_mask({{kv_len}}, documents=2)"
    with pytest.raises(SystemExit) as exc:  # stops at the reference check: nothing measured
        main(["run", *TINY, "-mods", f"causal,{spec}", "--reference", f"{U}:alibi_reference(2)"])
    assert exc.value.code == 2
    assert "--reference is the reference of one mod, got 2 in -mods" in capsys.readouterr().err


def test_a_module_in_the_current_directory_imports_without_pythonpath(tmp_path, monkeypatch):
    (tmp_path / "here_mods_14.py").write_text(
        "def band(b, h, q_idx, kv_idx):\n    return (q_idx - kv_idx).abs() < 8\n"
    )
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert mods.resolve("here_mods_14:band").instance(cfg("noop").dims()).kind == "mask_mod"


# --- mask_mods are block-sparse, with SDPA on the dense mask as baseline ---------------------


@pytest.mark.parametrize(
    ("spec", "sparsity"),
    [
        (f"{U}:lookback_64", 1 - 7 / 16),  # 4×4 blocks: the diagonal and the one left of it
        (f"{U}:generate_window(100)", 1 - 10 / 16),  # |q - kv| <= 100: tridiagonal blocks
        (f"{U}:generate_doc_mask({{kv_len}}, 4)", 1 - 4 / 16),  # 4 documents of one block
        (f"causal & {U}:generate_window(100)", 1 - 7 / 16),  # diagonal, one left
        (f"causal | {U}:generate_doc_mask({{kv_len}}, 2)", 1 - 12 / 16),  # 10 + 2 above
    ],
)
def test_user_masks_get_a_block_mask_and_an_sdpa_baseline(spec, sparsity):
    c = cfg(spec)
    built, block_mask, flex, baseline, reference = three_ways(c)
    assert built.baseline == "sdpa_attn_mask" and built.mask.dtype == torch.bool
    assert 1 - measure.block_density(block_mask) == pytest.approx(sparsity)
    for out in (flex, baseline):
        assert measure.max_abs_err(out, reference) < 1e-10


def test_a_mask_that_varies_with_batch_and_head_gets_a_block_mask_per_batch_and_head():
    c = cfg(f"{U}:heads_see_more", 256, batch=2)
    built, block_mask, flex, baseline, reference = three_ways(c)
    assert built.mask.shape == (2, 2, 256, 256)
    assert block_mask.kv_num_blocks.shape[:2] == (2, 2)
    # kv <= q + 64h + 32b: only (b=0, h=0) skips a block (its top right): 1 of 16 blocks
    assert 1 - measure.block_density(block_mask) == pytest.approx(1 / 16)
    for out in (flex, baseline):
        assert measure.max_abs_err(out, reference) < 1e-10


def test_an_additive_score_mod_gets_sdpa_with_its_bias():
    c = cfg(f"{U}:shift_bias", 128, heads=4, kv_heads=2)
    built, _, flex, baseline, reference = three_ways(c)
    assert built.baseline == "sdpa_attn_mask" and built.bias.shape == (1, 4, 128, 128)
    for out in (flex, baseline):
        assert measure.max_abs_err(out, reference) < 1e-10


# --- the reference is evaluated as flex evaluates a mod ---------------------------------------


def test_a_scalar_indexing_mod_gets_a_reference_through_vmap():
    c = cfg(f"{U}:scalar_indexing", 128, heads=3)
    built, _, flex, baseline, reference = three_ways(c)
    assert measure.max_abs_err(flex, reference) < 1e-10
    assert measure.max_abs_err(baseline, reference) < 1e-10
    plain = three_ways(cfg("noop", 128, heads=3))[-1]
    assert measure.max_abs_err(reference, plain) > 1e-3  # the mod did something


def test_a_mod_that_sees_0d_indices_is_the_function_flex_computes():
    _, _, flex, _, reference = three_ways(cfg(f"{U}:rank_sensitive", 128))
    plain = three_ways(cfg("noop", 128))[-1]
    assert measure.max_abs_err(flex, reference) < 1e-10  # score * 1, as flex sees it
    assert measure.max_abs_err(reference, plain) < 1e-10


# --- checks that garbage cannot pass ----------------------------------------------------------


def _reference_of(spec: str):
    c = cfg(spec, 128)
    built = mods.resolve(c.score_mod).build(c.dims())
    q, k, v = measure.make_inputs(c, requires_grad=False)
    return built, (q, k, v), measure.reference(q, k, v, built, 0.25, None)


def test_a_mod_that_makes_nan_fails_before_nan_to_num_hides_it():
    with pytest.raises(measure.CheckFailed) as info:
        _reference_of(f"{U}:log_score")
    assert str(info.value).startswith("mod produces NaN: ")
    assert str(info.value).endswith("hold NaN/inf scores or probabilities; not timed")


def test_a_failed_check_is_the_configs_error_and_it_is_not_timed():
    c = cfg(f"{U}:log_score", 128)
    # Room for this graph beside those earlier tests left cached (as measure_configs gives a sweep).
    with measure.dynamo_settings(False, pipeline.default_recompile_limit(1)):
        r = measure.Bench().run(c)  # compiles: the check follows
    assert r.error.startswith("CheckFailed: mod produces NaN: ")
    record = RunRecord.from_result(r)
    assert record.status == "FAILED" and record.error == r.error
    assert "fwd_compiled_us" not in r.metrics


def test_a_mod_that_masks_everything_fails():
    with pytest.raises(measure.CheckFailed, match=r"^the mod masks every score \(every output"):
        _reference_of(f"{U}:mask_everything")


def test_a_mod_whose_dense_form_is_not_flexs_fails_the_cross_check():
    built, (q, k, v), (out, _) = _reference_of(f"{U}:squash")  # marked additive, is not
    with pytest.raises(measure.CheckFailed) as info:
        measure.cross_check(q, k, v, built, 0.25, out)
    assert str(info.value).startswith(
        "mod is not representable densely: eager flex_attention differs"
    )


def test_an_all_zero_output_fails_even_within_tolerance():
    # Long rows: the reference is small, inside bfloat16's atol; zeros are still no answer.
    expected = torch.full((1, 2, 4, 8), 0.01, dtype=torch.float64)
    expected[0, 1, 3] = 0.0  # a fully masked row: zeros are right there
    actual = torch.zeros(1, 2, 4, 8, dtype=torch.bfloat16)
    err, failure = measure.check([actual], [expected], "bfloat16")
    assert err == pytest.approx(0.01)  # within 0.03 + 0.03 * 0.01
    assert failure == (
        "correctness check failed: out is all zeros in 7 of 8 query rows where the reference is not"
    )
    assert measure.check([expected.clone()], [expected], "bfloat16")[1] is None


def test_a_reference_makes_a_wrong_mod_fail_and_a_right_one_pass():
    for spec, wrong in (
        (f"{U}:generate_alibi_flipped({{heads}})", True),
        (f"{U}:generate_alibi({{heads}})", False),
    ):
        c = cfg(spec, 128)
        _, _, flex, baseline, reference = three_ways(c)
        for out in (flex, baseline):
            failure = measure.check([out], [reference], "float32")[1]
            assert (failure is not None) == wrong, (spec, failure)


def test_reference_option_replaces_the_dense_reference():
    c = cfg(f"{U}:generate_alibi_flipped(2)", 128, reference=f"{U}:alibi_reference({{heads}})")
    assert c.params()["reference"] == f"{U}:alibi_reference({{heads}})"
    assert c.config_key() != cfg(f"{U}:generate_alibi_flipped(2)", 128).config_key()
    _, _, flex, _, reference = three_ways(c)
    assert measure.check([flex], [reference], "float32")[1].startswith(
        "correctness check failed: out max_abs_err"
    )


# --- identity: a mod's source is part of the config ------------------------------------------


def _fresh(name: str) -> None:
    """Forget a module and the mods resolved from it, as a new process would."""
    sys.modules.pop(name, None)
    mods.resolve.cache_clear()
    mods._instance.cache_clear()


def _write_mod(path, factor: str) -> None:
    path.write_text(f"def squeeze(score, b, h, q_idx, kv_idx):\n    return score * {factor}\n")


def test_a_changed_source_is_measured_again_on_resume(tmp_path, mlflow_server, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    name = "resume_mod_14"
    _write_mod(tmp_path / f"{name}.py", "0.5")
    _fresh(name)

    def sweep_once() -> sweep.Outcome:
        configs = [cfg(f"{name}:squeeze", 128)]
        return sweep.measure_and_track(
            configs,
            TrackingSettings("user-mods", mlflow_server.uri, resume=True),
            progress=False,
            warn=lambda m: None,
        )

    first, again = sweep_once(), sweep_once()
    assert (len(first.records), first.failed, again.skipped, again.records) == (1, 0, 1, [])
    _write_mod(tmp_path / f"{name}.py", "0.25  # changed")
    _fresh(name)
    changed = sweep_once()
    assert (changed.skipped, len(changed.records), changed.failed) == (0, 1, 0)
    old, new = (o.records[0].params for o in (first, changed))
    assert old["score_mod"] == new["score_mod"] == f"{name}:squeeze"
    assert old["mod_sha"] != new["mod_sha"]
    runs = MlflowClient(mlflow_server.uri).search_runs(
        [MlflowClient(mlflow_server.uri).get_experiment_by_name("user-mods").experiment_id],
        "tags.`flexbench.kind` = 'config'",
    )
    assert sorted(r.data.params["mod_sha"] for r in runs) == sorted(
        [old["mod_sha"], new["mod_sha"]]
    )


def test_built_in_keys_did_not_change_and_align_start_is_another_config():
    c = cfg("causal", 128, kv_len=512)
    assert "mod_sha" not in c.params() and c.params()["align"] == "end"
    start = with_options(c, align="start")
    assert start.config_key() != c.config_key() and start.params()["align"] == "start"


# --- --align -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["causal", "sliding_window:64", "prefix_lm:32", "document_mask"])
def test_align_start_puts_query_i_at_key_i(spec):
    end, start = (
        mods.resolve(spec).build(cfg(spec, 128, kv_len=384, align=a).dims())
        for a in ("end", "start")
    )
    full_end = mods.resolve(spec).build(cfg(spec, 384).dims()).mask[0, 0]
    assert torch.equal(end.mask[0, 0], full_end[-128:])  # the last 128 queries
    assert torch.equal(start.mask[0, 0], full_end[:128])  # the first 128 queries
    c = cfg(spec, 128, kv_len=384, align="start")
    _, _, flex, baseline, reference = three_ways(c)
    for out in (flex, baseline):
        assert measure.max_abs_err(out, reference) < 1e-10


def test_causal_with_align_start_is_sdpas_is_causal():
    built = mods.resolve("causal").build(cfg("causal", 128, kv_len=384, align="start").dims())
    assert built.baseline == "sdpa_is_causal"


@pytest.mark.parametrize("align", ["end", "start"])
def test_align_reaches_a_factory(align):
    spec = f"{U}:generate_causal({{q_len}}, {{kv_len}}, {{align}})"
    c = cfg(spec, 128, kv_len=384, align=align)
    assert c.mod_name == f"{U}:generate_causal(128, 384, '{align}')"
    user = mods.resolve(spec).build(c.dims())
    built_in = mods.resolve("causal").build(c.dims())
    assert torch.equal(user.mask[0, 0], built_in.mask[0, 0])


def test_user_mods_module_is_the_one_resolved():
    assert mods.resolve(f"{U}:lookback_64").user_fn is user_mods.lookback_64


def test_a_score_mod_chunked_in_query_rows_equals_it_whole():
    # The reference applies a score_mod in chunks of query rows (bounded memory), the timed
    # eager baseline in one call (no added copies): the same values.
    fn = mods.resolve(f"{U}:scalar_indexing").build(cfg("noop").dims()).transform
    scores = torch.randn(2, 3, 10, 7, dtype=torch.float64)
    b = torch.arange(2)
    whole = fn(scores, b)
    chunks = measure.mods.usermods.apply_score_mod(fn.fn, scores, b, rows=3)
    torch.testing.assert_close(chunks, whole, rtol=0, atol=1e-6)  # float32 TABLE dots
    assert not torch.allclose(whole, scores)


def test_a_user_copy_of_a_built_in_mask_gets_the_same_baseline_and_sparsity():
    # The same function must give the same headline: the same dense mask, SDPA on it.
    spec = f"{U}:generate_document_mask({{kv_len}}, {{q_len}}, 4, {{device}})"
    user, built_in = cfg(spec, 256, kv_len=512), cfg("document_mask:4", 256, kv_len=512)
    a, b = (mods.resolve(c.score_mod).build(c.dims()) for c in (user, built_in))
    assert torch.equal(a.mask, b.mask) and a.baseline == b.baseline == "sdpa_attn_mask"
    masks = [measure.Bench().block_mask(c, x) for c, x in ((user, a), (built_in, b))]
    assert measure.block_density(masks[0]) == measure.block_density(masks[1]) < 1


def test_mods_command_shows_the_grammar(capsys):
    main(["mods"])
    out = capsys.readouterr().out
    assert "document_mask" in out
    for words in (
        "pkg.module:name(args)",
        "{kv_len}",
        "{align}",
        "a & b, a | b",
        "fn.additive = True",
        "fn.reference",
        "mod_sha",
    ):
        assert words in out, words
