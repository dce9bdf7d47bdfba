"""The timing loop's stopping rule, throttle handling and GPU-state metrics, driven by
synthetic samplers (the CPU has no GPU clock to read)."""

from __future__ import annotations

import itertools

import pytest

from flexbench import gpustate, stats, timing


def test_relative_iqr_by_hand():
    # 1..5: q25 = 2, q75 = 4, median 3 -> 2/3
    assert stats.relative_iqr([5, 1, 4, 2, 3]) == pytest.approx(2 / 3)
    assert stats.relative_iqr([2.0, 2.0, 2.0]) == 0.0
    assert stats.relative_iqr([1.0]) == float("inf")


def test_stop_reason_needs_count_time_and_noise():
    rule = stats.StopRule(max_noise=0.01, min_samples=4, min_time_s=0.5, max_time_s=2.0)
    flat = [1.0] * 4
    assert stats.stop_reason(flat[:3], 1.0, rule) is None  # too few samples
    assert stats.stop_reason(flat, 0.1, rule) is None  # too little time
    assert stats.stop_reason(flat, 0.6, rule) == stats.CONVERGED
    noisy = [1.0, 2.0, 1.0, 2.0]
    assert stats.stop_reason(noisy, 1.9, rule) is None
    assert stats.stop_reason(noisy, 2.0, rule) == stats.TIMED_OUT


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_noise": 0}, "max_noise"),
        ({"min_samples": 2}, "min_samples"),
        ({"min_time_s": 3, "max_time_s": 2}, "min_time <= max_time"),
    ],
)
def test_stop_rule_rejects_nonsense(kwargs, message):
    with pytest.raises(ValueError, match=message):
        stats.StopRule(**kwargs)


def test_throttle_classification_uses_the_median_clock():
    assert stats.throttled([1980, 1980, 1700], 1980, 0.9) is False  # median 1980
    assert stats.throttled([1700, 1695, 1980], 1980, 0.9) is True  # median 1700 < 1782
    assert stats.throttled([], 1980, 0.9) is False


class Scripted:
    """A sampler replaying a fixed list of per-call times (ms), then repeating its last."""

    script: list[float] = [1.0]

    def __init__(self, fn, grads, ms):
        self.values = iter(itertools.chain(self.script, itertools.repeat(self.script[-1])))

    def sample(self) -> list[float]:
        return [next(self.values)]


def _settings(**rule) -> timing.Settings:
    return timing.Settings(regime="none", rule=stats.StopRule(**rule))


def test_converging_sampler_stops_at_the_first_quiet_count(monkeypatch):
    # 1, 2, 1, 2, then 1s: with n samples (two 2s), q75 first drops to 1 at n = 9
    # (0.75 * 8 = 6 -> the 7th smallest, a 1), so IQR/median goes 25% (n=8) -> 0 (n=9).
    monkeypatch.setattr(Scripted, "script", [1.0, 2.0, 1.0, 2.0, 1.0])
    monkeypatch.setitem(timing.SAMPLERS, "cpu", Scripted)
    out = timing.time_all("cpu", {"a": lambda: None}, _settings(min_samples=3, max_time_s=60))
    t = out["a"]
    assert t.samples == 9 and t.converged and t.noise_pct == 0.0
    assert t.median_us == pytest.approx(1000.0)
    assert t.metrics("fwd_x")["fwd_x_samples"] == 9.0
    assert t.metrics("fwd_x")["fwd_x_unconverged"] == 0.0


def test_min_samples_holds_back_a_quiet_series(monkeypatch):
    monkeypatch.setattr(Scripted, "script", [1.0])
    monkeypatch.setitem(timing.SAMPLERS, "cpu", Scripted)
    out = timing.time_all("cpu", {"a": lambda: None}, _settings(min_samples=17))
    assert out["a"].samples == 17 and out["a"].converged


def test_endlessly_noisy_series_hits_max_time_and_is_unconverged(monkeypatch):
    class Noisy(Scripted):
        def __init__(self, fn, grads, ms):
            self.values = itertools.cycle([1.0, 2.0])

    monkeypatch.setattr(Scripted, "script", [1.0])
    samplers = {"noisy": Noisy, "quiet": Scripted}  # chosen by the timed function's name
    monkeypatch.setitem(
        timing.SAMPLERS, "cpu", lambda fn, g, ms: samplers[fn.__name__](fn, g, ms)
    )
    fns = {name: _named(name) for name in samplers}
    out = timing.time_all("cpu", fns, _settings(min_samples=5, max_time_s=0.2))
    assert not out["noisy"].converged and out["noisy"].noise_pct > 50
    assert out["noisy"].metrics("bwd_eager")["bwd_eager_unconverged"] == 1.0
    assert out["quiet"].converged and out["quiet"].samples == 5  # stopped on its own


def _named(name: str):
    def fn() -> None:
        return None

    fn.__name__ = name
    return fn


class FakeGpu(gpustate.Gpu):
    """NVML stand-in: the clock each reading reports, from a script (then the last)."""

    def __init__(self, clocks: list[float]) -> None:
        self.clocks = iter(itertools.chain(clocks, itertools.repeat(clocks[-1])))
        self.polls = 0

    def clock(self) -> float:
        self.polls += 1
        return 1980.0  # idle: recovered

    def read(self) -> gpustate.Reading:
        return gpustate.Reading(next(self.clocks), 400.0, 50.0)

    def max_sm_mhz(self) -> float:
        return 1980.0


def test_burst_retakes_throttled_samples_after_recovery(monkeypatch):
    monkeypatch.setattr(Scripted, "script", [1.0])
    monkeypatch.setitem(timing.SAMPLERS, "cpu", Scripted)
    gpu = FakeGpu([1600.0, 1650.0] + [1980.0] * 50)
    settings = timing.Settings("burst", stats.StopRule(min_samples=5), 0.9, gpu)
    t = timing.time_all("cpu", {"a": lambda: None}, settings)["a"]
    assert t.retaken == 2 and t.samples == 5 and gpu.polls >= 2
    m = t.metrics("fwd_compiled")
    assert m["fwd_compiled_sm_mhz"] == 1980.0 and m["fwd_compiled_throttled"] == 0.0
    assert m["fwd_compiled_retaken"] == 2.0 and m["fwd_compiled_power_w"] == 400.0


def test_sustained_keeps_throttled_samples_and_flags_the_series(monkeypatch):
    monkeypatch.setattr(Scripted, "script", [1.0])
    monkeypatch.setitem(timing.SAMPLERS, "cpu", Scripted)
    gpu = FakeGpu([1980.0, 1700.0, 1695.0, 1690.0, 1700.0])
    settings = timing.Settings("sustained", stats.StopRule(min_samples=5), 0.9, gpu)
    t = timing.time_all("cpu", {"a": lambda: None}, settings)["a"]
    m = t.metrics("fwd_eager")
    assert t.retaken == 0 and m["fwd_eager_throttled"] == 1.0
    assert (m["fwd_eager_sm_mhz"], m["fwd_eager_sm_mhz_min"]) == (1700.0, 1690.0)


def test_without_nvml_there_is_no_gpu_state():
    assert gpustate.open_gpu(0) is None  # CPU machine: no pynvml, or no driver
    t = timing.Timing.from_ms([1.0, 1.0, 1.0])
    assert not [k for k in t.metrics("fwd_eager") if "mhz" in k or "power" in k]


def test_settled_by_hand():
    # 32 estimates, the last 16 alternating 0.010/0.011: RMS deviation from the latest (0.011)
    # is sqrt(8 * 0.001**2 / 16) = 0.000707, over 5% of 0.011 = 0.00055: still moving
    wobbly = [0.02] * 16 + [0.010, 0.011] * 8
    assert stats.settled(wobbly) is False
    # the last 16 within 0.0100..0.0102 of latest 0.0101: RMS 0.0000707 < 0.000505
    steady = [0.02] * 16 + [0.0100, 0.0101, 0.0102, 0.0101] * 4
    assert stats.settled(steady) is True
    assert stats.settled(steady[:31]) is False  # fewer than SETTLE_AFTER estimates
    assert stats.settled(steady + [0.0101]) is False  # judged only every SETTLE_EVERY rounds
    assert stats.settled([float("inf")] * 32) is False


def test_a_noisy_series_whose_noise_settles_stops_early_unconverged():
    rule = stats.StopRule(max_noise=0.001, min_samples=10, max_time_s=60.0)
    samples = [1.0, 1.1] * 16  # noise 0.1 > target, settled (every estimate ~0.1)
    noises = [stats.relative_iqr(samples[: n + 1]) for n in range(len(samples))]
    assert stats.stop_reason(samples, 1.0, rule, noises) == stats.SETTLED
    assert stats.stop_reason(samples[:30], 1.0, rule, noises[:30]) is None
    assert stats.stop_reason(samples, 1.0, rule) is None  # no noise history: keep sampling


def test_time_all_stops_a_settled_series_and_flags_it_unconverged(monkeypatch):
    class Repeating(Scripted):
        script = [1.0, 1.1] * 1000

    monkeypatch.setitem(timing.SAMPLERS, "cpu", Repeating)
    settings = timing.Settings(
        regime="none", rule=stats.StopRule(max_noise=0.001, min_samples=10, max_time_s=30.0)
    )
    t = timing.time_all("cpu", {"f": lambda: None}, settings)["f"]
    assert t.samples == stats.SETTLE_AFTER  # stopped at the first judgement, not at 30 s
    assert not t.converged and t.noise_pct > 0.1 * 100 / 2


def test_a_graph_sample_is_queued_behind_a_gpu_sleep(monkeypatch):
    """The GPU sleep goes on the stream before the sample's start event (so the event is taken
    on a busy GPU, the replay already queued), every sample; the sample is ms per call."""
    order = []

    class Event:
        def __init__(self, name: str) -> None:
            self.name = name

        def record(self) -> None:
            order.append(self.name)

        def synchronize(self) -> None:
            order.append("sync")

        def elapsed_time(self, other: Event) -> float:
            return 6.0

    class Graph:
        def replay(self) -> None:
            order.append("replay")

    monkeypatch.setattr(timing.torch.cuda, "_sleep", lambda cycles: order.append(cycles))
    sampler = object.__new__(timing.GraphSampler)  # no CUDA here: the parts a sample uses
    sampler.start, sampler.end = Event("start"), Event("end")
    sampler.graph, sampler.calls = Graph(), 3
    assert sampler.sample() == [2.0] and sampler.sample() == [2.0]
    sleep = timing.PRESAMPLE_SLEEP_CYCLES
    assert order == [sleep, "start", "replay", "end", "sync"] * 2
