"""Mods: registry and errors, and for every mod flex == SDPA baseline == dense reference.

Flex runs eagerly here (no torch.compile): the same score_mod/BlockMask semantics, in
milliseconds. The compiled path is checked per config by measure (tests/test_measure.py).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from flexbench import measure, mods
from flexbench.config import BenchConfig
from tests import user_mods

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

NINE = ["noop", "causal", "rel", "head_bias", "alibi", "sliding_window", "prefix_lm",
        "document_mask", "softcap"]
USER = "tests.user_mods:distance_penalty"
# Every built-in with its default and with an explicit parameter, and a user mod.
SPECS = [*NINE, "sliding_window:32", "prefix_lm:100", "document_mask:3", "softcap:0.5", USER]
# (batch, heads, kv_heads, q_len, kv_len): plain; GQA with q_len < kv_len (masks align
# bottom-right); decoding. 384 = 3 blocks of 128, past the default window and prefix (256).
SHAPES = {
    "mha": (2, 2, 2, 384, 384),
    "gqa,q<kv": (2, 4, 2, 128, 384),
    "decode": (2, 4, 2, 1, 384),
}
HEAD_DIM = 16


def test_the_nine_builtins_in_order():
    assert list(mods.BUILTINS) == NINE
    rows = mods.describe()
    assert [r["name"] for r in rows] == NINE
    assert {r["name"]: r["parameter"] for r in rows if r["parameter"] != "-"} == {
        "sliding_window": "window (default 256)", "prefix_lm": "prefix (default 256)",
        "document_mask": "documents (default 4)", "softcap": "cap (default 30.0)",
    }


@pytest.mark.parametrize(
    ("spec", "name", "param"),
    [
        ("noop", "noop", None), ("causal", "causal", None), ("rel", "rel", None),
        ("head_bias", "head_bias", None), ("alibi", "alibi", None),
        ("sliding_window", "sliding_window:256", 256),
        ("sliding_window:128", "sliding_window:128", 128),
        ("prefix_lm", "prefix_lm:256", 256), ("prefix_lm:64", "prefix_lm:64", 64),
        ("document_mask", "document_mask:4", 4), ("document_mask:7", "document_mask:7", 7),
        ("softcap", "softcap:30", 30), ("softcap:20", "softcap:20", 20),
        ("softcap:2.5", "softcap:2.5", 2.5),
        ("sliding_window:1234567", "sliding_window:1234567", 1234567),  # not 1.23457e+06
    ],
)
def test_resolve_defaults_and_explicit_params(spec, name, param):
    mod = mods.resolve(spec)
    assert (mod.name, mod.param) == (name, param)
    assert mods.resolve(mod.name) == mod  # the canonical name resolves to the same mod


def test_factory_names_carry_their_parameter():
    dims = mods.Dims(heads=2, q_len=64, kv_len=64, device="cpu")
    assert mods.resolve("sliding_window:128").build(dims).mask_mod.__name__ == "sliding_window_128"
    assert mods.resolve("prefix_lm:8").build(dims).mask_mod.__name__ == "prefix_lm_8"
    assert mods.resolve("document_mask:3").build(dims).mask_mod.__name__ == "document_mask_3"
    assert mods.resolve("softcap:20").build(dims).score_mod.__name__ == "softcap_20"


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("sliding_window:abc", r"^mod 'sliding_window': window must be a number, got 'abc'$"),
        ("sliding_window:-5", r"^mod 'sliding_window': window must be > 0"),
        ("sliding_window:0", r"^mod 'sliding_window': window must be > 0"),
        ("prefix_lm:2.5", r"^mod 'prefix_lm': prefix must be a whole number, got '2.5'$"),
        ("softcap:nan", r"^mod 'softcap': cap must be > 0"),
        ("softcap:inf", r"^mod 'softcap': cap must be > 0"),
        ("causal:3", r"^mod 'causal' takes no parameter, got '3'$"),
        ("noop:", r"^mod 'noop' takes no parameter"),
    ],
)
def test_bad_parameter_is_one_line(spec, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        mods.resolve(spec)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("nope", r"^unknown mod 'nope'; built-in mods: "),
        ("Causal", r"^unknown mod 'Causal'"),
        ("sofcap:30", r"^unknown mod 'sofcap:30'"),
        ("tests.user_mods", r"^unknown mod 'tests.user_mods'"),
        ("no_such_pkg.mods:fn", r"^cannot import mod 'no_such_pkg.mods:fn' \(ModuleNotFound"),
        ("tests.user_mods:missing", r"^cannot import mod 'tests.user_mods:missing' \(Attribute"),
    ],
)
def test_unknown_or_unimportable_mod_lists_the_builtins(spec, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        mods.resolve(spec)
    message = str(info.value)
    assert "\n" not in message
    assert ", ".join(NINE) in message


def test_user_mod_is_imported_and_must_be_callable():
    mod = mods.resolve(USER)
    assert mod.name == USER and mod.user_fn is user_mods.distance_penalty and mod.info is None
    with pytest.raises(ValueError, match=r"^mod 'tests.user_mods:NOT_CALLABLE' is not callable"):
        mods.resolve("tests.user_mods:NOT_CALLABLE")


def test_user_mod_may_live_in_a_top_level_module(monkeypatch, tmp_path):
    (tmp_path / "my_mods_for_flexbench.py").write_text(
        "def shift(score, b, h, q, kv):\n    return score + 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = mods.resolve("my_mods_for_flexbench:shift")
    assert mod.user_fn.__name__ == "shift" and mod.name == "my_mods_for_flexbench:shift"


def test_document_ids_are_deterministic_proportional_lengths():
    # 4 documents in proportion 1:2:3:4 of 10 positions: bounds 1, 3, 6, 10.
    assert mods.document_ids(10, 4, "cpu").tolist() == [0, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    assert mods.document_ids(6, 1, "cpu").tolist() == [0] * 6


def test_document_mask_rejects_impossible_shapes():
    with pytest.raises(ValueError, match=r"document_mask:8 needs kv_len >= 8, got 4"):
        mods.resolve("document_mask:8").build(mods.Dims(2, 4, 4, "cpu"))
    with pytest.raises(ValueError, match=r"document_mask needs q_len <= kv_len, got 256 > 128"):
        mods.resolve("document_mask").build(mods.Dims(2, 256, 128, "cpu"))


def test_alibi_slopes_by_hand():
    # 2^(-8·h/H) for h = 1..H: with 8 heads, 1/2, 1/4, ..., 1/256.
    assert mods.alibi_slopes(8, "cpu").tolist() == [2.0**-i for i in range(1, 9)]


def _setup(spec: str, shape: tuple[int, ...], dtype: torch.dtype):
    batch, heads, kv_heads, q_len, kv_len = shape
    c = BenchConfig(batch, heads, q_len, HEAD_DIM, kv_heads=kv_heads, kv_len=kv_len,
                    dtype="float32", device="cpu", score_mod=spec)
    q, k, v = (t.to(dtype) for t in measure.make_inputs(c, requires_grad=False))
    built = mods.resolve(c.score_mod).build(mods.Dims(heads, q_len, kv_len, "cpu"))
    return q, k, v, built


@functools.lru_cache
def _three_ways(spec: str, shape: tuple[int, ...], dtype: torch.dtype):
    """(flex, SDPA baseline, dense reference) outputs for one mod at one shape."""
    q, k, v, built = _setup(spec, shape, dtype)
    scale = 1.0 / math.sqrt(HEAD_DIM)
    block_mask = None
    if built.mask_mod is not None:
        block_mask = create_block_mask(built.mask_mod, None, None, shape[3], shape[4], device="cpu")
    gqa = shape[1] != shape[2]
    flex = flex_attention(q, k, v, score_mod=built.score_mod, block_mask=block_mask,
                          scale=scale, enable_gqa=gqa)
    baseline = measure.sdpa_baseline(q, k, v, built, scale)()
    reference, grads = measure.reference(q, k, v, built, scale, dout=None)
    assert grads == [] and reference.dtype == torch.float64
    return flex, baseline, reference


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("spec", SPECS)
def test_flex_sdpa_baseline_and_reference_agree_in_float64(spec, shape):
    flex, baseline, reference = _three_ways(spec, shape, torch.float64)
    assert flex.shape == baseline.shape == reference.shape == (shape[0], shape[1], shape[3],
                                                                HEAD_DIM)
    assert not reference.isnan().any()
    assert measure.max_abs_err(flex, reference) < 1e-10
    assert measure.max_abs_err(baseline, reference) < 1e-10


@pytest.mark.parametrize("spec", SPECS)
def test_flex_sdpa_baseline_and_reference_agree_in_float32(spec):
    flex, baseline, reference = _three_ways(spec, SHAPES["gqa,q<kv"], torch.float32)
    assert flex.dtype == baseline.dtype == torch.float32
    for out in (flex, baseline):
        err, failure = measure.check([out], [reference], "float32")
        assert failure is None and err < 1e-4


@pytest.mark.parametrize("spec", ["causal", "sliding_window:32"])
def test_fully_masked_rows_give_zeros_everywhere(spec):
    """q_len > kv_len aligned bottom-right: the first 256 queries see no key at all."""
    flex, baseline, reference = _three_ways(spec, (1, 2, 2, 384, 128), torch.float64)
    blind = 384 - 128
    assert reference[:, :, :blind].abs().max() == 0
    assert reference[:, :, blind:].abs().amax(dim=-1).min() > 0
    for out in (flex, baseline):
        assert not out.isnan().any() and measure.max_abs_err(out, reference) < 1e-10


@pytest.mark.parametrize("spec", [s for s in SPECS if s not in ("noop", "head_bias")])
def test_every_mod_changes_the_function(spec):
    """A mod silently dropped on every path would agree with itself: it must differ from noop.

    Not head_bias: the seed's `score + 2*h` shifts a whole softmax row by one constant, which
    softmax cancels, so its output equals noop's (only its cost differs).
    """
    _, _, reference = _three_ways(spec, SHAPES["mha"], torch.float64)
    _, _, plain = _three_ways("noop", SHAPES["mha"], torch.float64)
    assert measure.max_abs_err(reference, plain) > 1e-6


@pytest.mark.parametrize("spec", ["causal", "alibi", "document_mask:3", "softcap:0.5", USER])
def test_reference_gradients_match_autograd_of_the_sdpa_baseline(spec):
    """dQ/dK/dV of the reference (per batch element, GQA heads summed back) in float64."""
    q, k, v, built = _setup(spec, SHAPES["gqa,q<kv"], torch.float64)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    scale = 1.0 / math.sqrt(HEAD_DIM)
    dout = torch.randn_like(q)
    measure.sdpa_baseline(q, k, v, built, scale)().backward(dout)
    _, grads = measure.reference(q, k, v, built, scale, dout)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        assert measure.max_abs_err(got, want) < 1e-10


def test_head_bias_output_equals_noop():
    _, _, reference = _three_ways("head_bias", SHAPES["gqa,q<kv"], torch.float64)
    _, _, plain = _three_ways("noop", SHAPES["gqa,q<kv"], torch.float64)
    assert measure.max_abs_err(reference, plain) < 1e-12


@pytest.mark.parametrize(
    ("spec", "baseline"),
    [("noop", "sdpa"), ("causal", "sdpa_is_causal"), ("rel", "sdpa_attn_mask"),
     ("head_bias", "sdpa_attn_mask"), ("alibi", "sdpa_attn_mask"),
     ("sliding_window", "sdpa_attn_mask"), ("prefix_lm", "sdpa_attn_mask"),
     ("document_mask", "sdpa_attn_mask"), ("softcap", "eager_math"), (USER, "eager_math")],
)
def test_baseline_kind(spec, baseline):
    assert mods.resolve(spec).build(mods.Dims(2, 64, 64, "cpu")).baseline == baseline


def test_causal_baseline_uses_a_mask_when_lengths_differ():
    # SDPA's is_causal aligns top-left; flex's causal here aligns bottom-right (decoding).
    built = mods.resolve("causal").build(mods.Dims(2, 1, 64, "cpu"))
    assert built.baseline == "sdpa_attn_mask" and built.mask.all()  # the one query sees all


def _blocks_by_hand(mask: torch.Tensor, block: int = 128) -> float:
    """Fraction of (block × block) tiles of a dense [Q, KV] mask with anything to compute."""
    q, kv = mask.shape
    tiles = mask.view(q // block, block, kv // block, block).any(dim=3).any(dim=1)
    return tiles.float().mean().item()


@pytest.mark.parametrize(
    ("spec", "sparsity"),
    [
        ("causal", 28 / 64),  # 8×8 blocks: the 8·7/2 above the diagonal are skipped
        ("sliding_window:128", 49 / 64),  # each block row computes its diagonal and the one left
        ("prefix_lm:256", 27 / 64),  # rows 0-1 see blocks 0-1; row i >= 2 sees blocks 0..i: 37
        ("document_mask:4", None),  # checked against the dense mask only
        ("noop", 0.0),
    ],
)
def test_block_sparsity_by_hand(spec, sparsity):
    built = mods.resolve(spec).build(mods.Dims(2, 1024, 1024, "cpu"))
    if built.mask_mod is None:
        assert measure.block_density(None) == 1.0 and sparsity == 0.0
        return
    block_mask = create_block_mask(built.mask_mod, None, None, 1024, 1024, device="cpu")
    density = measure.block_density(block_mask)
    assert density == pytest.approx(_blocks_by_hand(built.mask[0, 0]))
    if sparsity is not None:
        assert 1.0 - density == pytest.approx(sparsity)


def test_block_density_counts_per_batch_and_head_masks():
    # Head 0 causal, head 1 full: (36 + 64) / 128 of the 8×8 blocks of two heads.
    def half_causal(b, h, q_idx, kv_idx):
        return (h == 1) | (q_idx >= kv_idx)

    block_mask = create_block_mask(half_causal, 1, 2, 1024, 1024, device="cpu")
    assert measure.block_density(block_mask) == pytest.approx(100 / 128)


def test_dense_masks_and_biases_by_hand():
    """The dense forms are derived from the mod itself: check them against hand-made ones.
    q_len 4 against kv_len 6, aligned at the end: query i sits at key position i + 2."""
    dims = mods.Dims(2, 4, 6, "cpu")
    q, kv = torch.arange(4).view(-1, 1) + 2, torch.arange(6).view(1, -1)
    ones = torch.ones(4, 6, dtype=torch.bool)
    doc = torch.tensor([0, 0, 1, 1, 1, 1])  # 2 documents, lengths 1:2
    by_hand = {
        "causal": ones.tril(2),
        "sliding_window:1": ones.tril(2) & ~ones.tril(0),
        "prefix_lm:4": ones.tril(2) | (kv < 4),
        "document_mask:2": doc[2:, None] == doc[None, :],
    }
    for spec, mask in by_hand.items():
        assert torch.equal(mods.resolve(spec).build(dims).mask, mask[None, None]), spec
    assert torch.equal(mods.resolve("rel").build(dims).bias, (q - 2 - kv).float()[None, None])
    assert mods.resolve("head_bias").build(dims).bias.view(-1).tolist() == [0.0, 2.0]
    slopes = mods.alibi_slopes(2, "cpu").view(1, -1, 1, 1)
    alibi = mods.resolve("alibi").build(mods.Dims(2, 6, 6, "cpu")).bias
    assert torch.equal(alibi, slopes * (kv - kv.T).float())
    scores = torch.randn(1, 2, 4, 6)
    softcap = mods.resolve("softcap:2").build(dims).transform(scores, torch.zeros(1))
    assert torch.equal(softcap, 2 * torch.tanh(scores / 2))
