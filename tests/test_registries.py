"""The torch-free tables: choices a config takes, the timer table and the samplers it names."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch

from flexbench import baselines, choices, cli, measure, stats, timers, timing
from flexbench.config import BenchConfig


def test_config_choices_and_timers_import_without_torch():
    code = (
        "import sys, flexbench.config, flexbench.choices, flexbench.timers; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_timer_names_samplers_that_timing_implements():
    assert set(timers.SAMPLERS) == set(timing.SAMPLERS)
    for t in timers.TIMERS.values():
        assert {t.fwd, t.bwd} <= set(timing.SAMPLERS)
    assert timers.CHOICES == ("auto", "do_bench", "cudagraph", "cudagraph_fwd", "cpu")
    assert [t for t in timers.TIMERS if not timers.TIMERS[t].needs_cuda] == ["cpu"]


def test_the_cli_offers_the_tables_choices():
    options = {p.name: p for p in cli.run.params}
    assert tuple(options["timer"].type.choices) == timers.CHOICES
    assert tuple(options["regime"].type.choices) == ("auto", *timers.REGIMES)
    assert tuple(options["align"].type.choices) == choices.ALIGNS
    assert tuple(cli.DTYPE.choices) == choices.DTYPES
    assert choices.DEFAULT_BASELINE in baselines.REGISTRY


@pytest.fixture
def graph_bwd_timer(monkeypatch):
    """A new timer, added as one table entry: forward with do_bench, backward in a graph."""
    entry = timers.Timer("graph_bwd", fwd="do_bench", bwd="cudagraph")
    monkeypatch.setitem(timers.TIMERS, entry.name, entry)
    monkeypatch.setattr(timers, "CHOICES", (*timers.CHOICES, entry.name))
    return entry.name


def test_a_new_timer_entry_drives_config_and_sampler_choice(graph_bwd_timer):
    assert BenchConfig(1, 2, 16, 8, device="cuda", timer=graph_bwd_timer).timer == "graph_bwd"
    with pytest.raises(ValueError, match=r"^timer 'graph_bwd' needs CUDA"):
        BenchConfig(1, 2, 16, 8, device="cpu", timer=graph_bwd_timer)
    assert timing.sampler_for(graph_bwd_timer, "fwd") == "do_bench"
    assert timing.sampler_for(graph_bwd_timer, "bwd") == "cudagraph"
    assert timers.TIMERS[graph_bwd_timer].graph_bwd


def test_a_timer_whose_backward_is_graphed_names_the_fallback(graph_bwd_timer, monkeypatch):
    def capture_fails(fn, grads, ms):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setitem(timing.SAMPLERS, "cudagraph", capture_fails)
    monkeypatch.setattr(timing, "side_stream", lambda sampler: contextlib.nullcontext())
    monkeypatch.setattr(timing, "warm_up", lambda fn, device: None)
    x = torch.randn(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="rerun with --timer cudagraph_fwd"):
        measure._time_backward(graph_bwd_timer, {"compiled": lambda: x * 2}, torch.ones(4), [x])
    monkeypatch.setitem(timing.SAMPLERS, "do_bench", capture_fails)
    with pytest.raises(RuntimeError, match="^operation not permitted"):  # not graphed: as is
        measure._time_backward("do_bench", {"compiled": lambda: x * 2}, torch.ones(4), [x])


@pytest.mark.parametrize(
    ("regime", "sample_ms", "expected"),
    [
        ("burst", None, timers.SAMPLE_MS["burst"]),
        ("sustained", None, timers.SAMPLE_MS["sustained"]),
        ("none", None, timers.SAMPLE_MS["burst"]),  # CPU
        ("sustained", 1.5, 1.5),
    ],
)
def test_settings_carry_the_sample_length_to_the_sampler(regime, sample_ms, expected, monkeypatch):
    seen = []

    class Recording:
        def __init__(self, fn, grads, ms):
            seen.append(ms)

        def sample(self) -> list[float]:
            return [1.0]

    monkeypatch.setitem(timing.SAMPLERS, "cpu", Recording)
    rule = stats.StopRule(min_samples=3, max_time_s=1.0)
    settings = timing.Settings(regime, rule, sample_ms=sample_ms)
    timing.time_all("cpu", {"a": lambda: None}, settings)
    assert settings.sample_ms == expected and seen == [expected]
