"""Pure statistics of a timed series: noise, the stopping rule, clock classification.

The method follows NVIDIA's nvbench (its `stdrel` criterion): sample until the relative noise
is at or below the target, within a minimum sample count and time and a time limit; a series
whose noise has settled above the target stops early (more samples would not bring it down:
the series is that noisy), still flagged as not meeting the target; samples taken below a
fraction of the GPU's maximum clock are throttled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flexbench.flops import quantile

CONVERGED = "converged"  # noise at or below the target
SETTLED = "settled"  # noise settled above the target: stop, unconverged (nvbench's "stable")
TIMED_OUT = "max_time"  # time is up, unconverged
SETTLE_AFTER = 32  # rounds before a series' noise may count as settled (nvbench: 64 samples)
SETTLE_EVERY = 16  # judge it every this many rounds, over this many trailing estimates
SETTLE_SPREAD = 0.05  # settled: their RMS deviation from the latest is under 5% of it


@dataclass(frozen=True)
class StopRule:
    """When a series has enough samples: noise (IQR / median) at or below `max_noise`, at
    least `min_samples` samples and `min_time_s` of sampling; `max_time_s` ends it anyway."""

    max_noise: float = 0.005
    min_samples: int = 10
    min_time_s: float = 0.0
    max_time_s: float = 3.0

    def __post_init__(self) -> None:
        if not self.max_noise > 0:
            raise ValueError(f"max_noise must be > 0, got {self.max_noise}")
        if self.min_samples < 3:
            raise ValueError(f"min_samples must be >= 3, got {self.min_samples}")
        if not 0 <= self.min_time_s <= self.max_time_s:
            raise ValueError(
                f"need 0 <= min_time <= max_time, got {self.min_time_s} and {self.max_time_s}"
            )


def relative_iqr(samples: Sequence[float]) -> float:
    """(75th - 25th percentile) / median; inf for fewer than 2 samples or a zero median."""
    if len(samples) < 2:
        return float("inf")
    median = quantile(samples, 0.5)
    if median <= 0:
        return float("inf")
    return (quantile(samples, 0.75) - quantile(samples, 0.25)) / median


def settled(noises: Sequence[float]) -> bool:
    """The series' noise estimates (one after each round) have stopped moving: at least
    SETTLE_AFTER of them, judged every SETTLE_EVERY rounds, the trailing SETTLE_EVERY within
    SETTLE_SPREAD (RMS, relative) of the latest. nvbench's test for inherently noisy series."""
    n = len(noises)
    if n < SETTLE_AFTER or n % SETTLE_EVERY:
        return False
    latest = noises[-1]
    if not 0 < latest < float("inf"):
        return False
    window = noises[-SETTLE_EVERY:]
    rms = (sum((x - latest) ** 2 for x in window) / len(window)) ** 0.5
    return rms < SETTLE_SPREAD * latest


def stop_reason(
    samples: Sequence[float], elapsed_s: float, rule: StopRule, noises: Sequence[float] = ()
) -> str | None:
    """`converged`, `settled` or `max_time` (both unconverged), or None to keep sampling;
    `noises` holds the series' noise after each round so far, the latest for `samples` (for
    `settled`; without them the noise is computed here)."""
    enough = len(samples) >= rule.min_samples and elapsed_s >= rule.min_time_s
    noise = noises[-1] if noises else relative_iqr(samples)
    if enough and noise <= rule.max_noise:
        return CONVERGED
    if enough and settled(noises):
        return SETTLED
    if elapsed_s >= rule.max_time_s and samples:
        return TIMED_OUT
    return None


def below(clock_mhz: float, max_mhz: float, threshold: float) -> bool:
    """A clock under `threshold` (a fraction, e.g. 0.9) of the maximum."""
    return clock_mhz < threshold * max_mhz


def throttled(clocks_mhz: Sequence[float], max_mhz: float, threshold: float) -> bool:
    """A series ran throttled when its median clock was under the threshold."""
    return bool(clocks_mhz) and below(quantile(clocks_mhz, 0.5), max_mhz, threshold)
