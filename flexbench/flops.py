"""Pure math: FLOPs (block sparsity counted), TFLOP/s, bytes moved, speedups, statistics."""

from __future__ import annotations

import math
from collections.abc import Sequence

# Attention forward = two matmuls (Q·Kᵀ and P·V), each 2·Q·KV·D FLOPs per (batch, query head).
MATMULS_FWD = 2
FLOPS_PER_MAC = 2
# Backward = five matmuls (dV, dP, dS→dQ, dK, recompute S) against forward's two: 2.5×.
BWD_FACTOR = 2.5


def attention_flops(
    batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, density: float = 1.0
) -> float:
    """Forward FLOPs: 4·B·Hq·Q·KV·D × density (fraction of score blocks computed)."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    macs = batch * heads * q_len * kv_len * head_dim  # one Q·K (or P·V) product
    return MATMULS_FWD * FLOPS_PER_MAC * macs * density


def backward_flops(forward_flops: float) -> float:
    """Backward FLOPs: 2.5 × forward."""
    return BWD_FACTOR * forward_flops


def tflops(flops: float, microseconds: float) -> float:
    """TFLOP/s for `flops` done in `microseconds`."""
    return flops / (microseconds * 1e-6) / 1e12


def kv_bytes(batch: int, kv_heads: int, kv_len: int, head_dim: int, itemsize: int) -> int:
    """Bytes of K and V read once (the floor of decoding's memory traffic)."""
    return 2 * batch * kv_heads * kv_len * head_dim * itemsize


def cpu_peak_bytes(
    batch: int, heads: int, kv_heads: int, q_len: int, kv_len: int, head_dim: int, itemsize: int
) -> int:
    """An upper estimate of one CPU config's memory, from its shape alone."""
    tensors = (2 * batch * heads * q_len + 2 * batch * kv_heads * kv_len) * head_dim * itemsize
    reference_out = batch * heads * q_len * head_dim * 8  # float64 reference output
    baseline_scores = batch * heads * q_len * kv_len * 4  # a dense (eager math) baseline
    reference_scores = 3 * heads * q_len * kv_len * 8  # scores, mask, softmax: one batch element
    return tensors + reference_out + baseline_scores + reference_scores


def tbps(nbytes: float, microseconds: float) -> float:
    """TB/s for `nbytes` moved in `microseconds`."""
    return nbytes / (microseconds * 1e-6) / 1e12


def speedup(eager_us: float, compiled_us: float) -> float:
    """eager / compiled: > 1 means flex is faster."""
    return eager_us / compiled_us


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default method), q in [0, 1]."""
    if not values:
        raise ValueError("quantile of no values")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def geomean(values: Sequence[float]) -> float:
    """Geometric mean of positive values."""
    if not values or min(values) <= 0:
        raise ValueError(f"geomean needs positive values, got {list(values)}")
    return math.exp(sum(math.log(v) for v in values) / len(values))


def cv(values: Sequence[float]) -> float:
    """Coefficient of variation: sample standard deviation / mean."""
    if len(values) < 2:
        raise ValueError(f"cv needs at least 2 values, got {len(values)}")
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return math.sqrt(var) / mean
