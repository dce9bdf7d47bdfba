"""flops: FLOP counts, rates and statistics against numbers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flexbench import flops

# b8 h16 s4096 d128, the largest shape: every factor is a power of two.
B, H, S, D = 8, 16, 4096, 128


def test_forward_flops_by_hand():
    expected = (
        2  # two matmuls: Q·Kᵀ and P·V
        * 2  # a multiply-add is two FLOPs
        * B * H  # one attention per (batch, query head)
        * S * S  # every query against every key
        * D  # the length of each dot product
    )
    assert expected == 2**40  # 2 · 2 · 2³ · 2⁴ · 2¹² · 2¹² · 2⁷
    assert flops.attention_flops(B, H, S, S, D) == 2**40


def test_forward_flops_count_query_heads_and_both_lengths():
    # GQA costs what its query heads cost: kv_heads is not an argument. Decoding (Q=1) is
    # 4 · 1 · 32 · 1 · 8192 · 128 = 134,217,728.
    assert flops.attention_flops(1, 32, 1, 8192, 128) == 134_217_728


def test_density_scales_forward_flops():
    # Causal 1024×1024 in 128-blocks: 8 diagonal + 28 below = 36 of 64 blocks computed.
    density = 36 / 64
    assert flops.attention_flops(1, 1, 1024, 1024, 64, density) == pytest.approx(
        4 * 1024 * 1024 * 64 * 0.5625  # 4·Q·KV·D × computed fraction
    )
    assert flops.attention_flops(1, 1, 1024, 1024, 64, 0.0) == 0.0
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
            flops.attention_flops(1, 1, 8, 8, 8, bad)


def test_backward_is_two_and_a_half_forward():
    # Five matmuls (recompute S, dV, dP, dQ, dK) against forward's two.
    assert flops.backward_flops(2**40) == 2.5 * 2**40 == 2_748_779_069_440


def test_tflops_by_hand():
    # 2⁴⁰ FLOPs in 1 ms = 1.099511627776e15 FLOP/s = 1099.5… TFLOP/s.
    assert flops.tflops(2**40, 1000.0) == pytest.approx(1099.511627776)
    # 1e12 FLOPs in 1 s is exactly 1 TFLOP/s.
    assert flops.tflops(1e12, 1e6) == pytest.approx(1.0)


def test_kv_bytes_and_tbps_by_hand():
    nbytes = flops.kv_bytes(1, 8, 4096, 128, 2)
    assert nbytes == (
        2  # K and V
        * 1 * 8  # batch × kv heads (GQA reads only the kv heads)
        * 4096 * 128  # kv_len × head_dim
        * 2  # bytes per bf16 element
    ) == 16 * 2**20
    # 16 MiB in 10 µs = 16,777,216 B / 1e-5 s = 1.6777216e12 B/s.
    assert flops.tbps(nbytes, 10.0) == pytest.approx(1.6777216)


def test_speedup_is_eager_over_compiled():
    assert flops.speedup(25.0, 12.5) == 2.0  # flex twice as fast
    assert flops.speedup(10.0, 20.0) == 0.5  # flex twice as slow


def test_quantile_interpolates_linearly_like_numpy():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]  # unsorted on purpose
    # sorted 1..5: position q·(n-1) = 0.8 → 1 + 0.8·(2-1) = 1.8; 3.2 → 4 + 0.2·(5-4) = 4.2
    assert flops.quantile(values, 0.2) == pytest.approx(1.8)
    assert flops.quantile(values, 0.5) == 3.0
    assert flops.quantile(values, 0.8) == pytest.approx(4.2)
    assert flops.quantile(values, 0.0) == 1.0 and flops.quantile(values, 1.0) == 5.0
    assert flops.quantile([7.0], 0.2) == 7.0
    rng = np.random.default_rng(0)
    sample = rng.exponential(size=37).tolist()
    for q in (0.2, 0.5, 0.8):
        assert flops.quantile(sample, q) == pytest.approx(float(np.quantile(sample, q)))
    with pytest.raises(ValueError, match="quantile of no values"):
        flops.quantile([], 0.5)


def test_geomean_by_hand():
    assert flops.geomean([1.0, 4.0, 16.0]) == pytest.approx(4.0)  # ∛64
    assert flops.geomean([0.5, 2.0]) == pytest.approx(1.0)  # a 2× loss and a 2× win cancel
    for bad in ([], [1.0, 0.0], [2.0, -1.0]):
        with pytest.raises(ValueError, match="geomean needs positive values"):
            flops.geomean(bad)


def test_cv_by_hand():
    # mean 2, sample variance ((1-2)² + (3-2)²) / (2-1) = 2, sd √2: cv = √2 / 2
    assert flops.cv([1.0, 3.0]) == pytest.approx(math.sqrt(2) / 2)
    # mean 5, squared deviations 9+1+1+1+0+0+4+16 = 32, /7, sd √(32/7)
    assert flops.cv([2, 4, 4, 4, 5, 5, 7, 9]) == pytest.approx(math.sqrt(32 / 7) / 5)
    assert flops.cv([3.0, 3.0, 3.0]) == 0.0
    with pytest.raises(ValueError, match="cv needs at least 2 values"):
        flops.cv([1.0])
