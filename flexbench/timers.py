"""The timer table: what each `--timer` samples its forward and backward with, importable
without torch (config validates against it, the CLI offers it, timing and measure read it).

A new timer is one `Timer` entry; a new way to sample is one `Sampler` entry here and its class
in `timing.SAMPLERS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexbench.choices import AUTO

# One sample's length per regime on CUDA: a CUDA graph (or do_bench run) this long.
SAMPLE_MS = {"burst": 5.0, "sustained": 40.0}
REGIMES = tuple(SAMPLE_MS)
DEFAULT_REGIME = "burst"  # agrees best with profiler kernel time (BENCHMARKS.md §9)


@dataclass(frozen=True)
class Sampler:
    """A way to take one sample (its class: `timing.SAMPLERS[name]`)."""

    name: str
    device: str  # "cuda": waits for CUDA kernels; "cpu": wall time of CPU work
    graph: bool = False  # captures a CUDA graph on the current stream (run on a side stream)


@dataclass(frozen=True)
class Timer:
    """A `--timer` choice: the samplers of its forward and backward series."""

    name: str
    fwd: str  # sampler of the forward series
    bwd: str  # ... and of the backward

    @property
    def needs_cuda(self) -> bool:
        return any(SAMPLERS[s].device == "cuda" for s in (self.fwd, self.bwd))

    @property
    def graph_bwd(self) -> bool:
        """The backward is captured in a CUDA graph on the stream its forward ran on."""
        return SAMPLERS[self.bwd].graph

    def sampler(self, kind: str) -> str:
        """The sampler of `kind` (fwd/bwd)."""
        return {"fwd": self.fwd, "bwd": self.bwd}[kind]


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("cpu", "cpu"),
        Sampler("do_bench", "cuda"),
        Sampler("cudagraph", "cuda", graph=True),
    )
}

TIMERS: dict[str, Timer] = {
    t.name: t
    for t in (
        Timer("do_bench", "do_bench", "do_bench"),  # triton's: host overhead included
        Timer("cudagraph", "cudagraph", "cudagraph"),  # both replayed from CUDA graphs
        Timer("cudagraph_fwd", "cudagraph", "do_bench"),  # a backward no graph can capture
        Timer("cpu", "cpu", "cpu"),
    )
}
CHOICES = (AUTO, *TIMERS)
# What `auto` means per device: graph replay reads kernel time without host overhead
# (BENCHMARKS.md §3-4 and "Figures the code cites").
AUTO_TIMER = {"cuda": "cudagraph", "cpu": "cpu"}


def auto_timer(device: str) -> str:
    """The timer `auto` chooses on a device."""
    return AUTO_TIMER[device]
