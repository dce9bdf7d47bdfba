"""GPU state through NVML (nvidia-ml-py, the binding torch's `torch.cuda.clock_rate` uses):
SM clock, power, temperature and the GPU's limits. Knows nothing of torch.

Every reader returns None where NVML is missing (a CPU machine, no driver): the GPU state is
then simply absent from the results, never an error.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reading:
    """One instantaneous reading: SM clock (MHz), power (W), temperature (°C)."""

    sm_mhz: float
    power_w: float
    temp_c: float


class Gpu:
    """One GPU's NVML handle; `read()` costs a few NVML calls (tens of µs)."""

    def __init__(self, nvml: object, handle: object) -> None:
        self._nvml = nvml
        self._handle = handle

    def clock(self) -> float:
        """Current SM clock, MHz."""
        return float(self._nvml.nvmlDeviceGetClockInfo(self._handle, self._nvml.NVML_CLOCK_SM))

    def read(self) -> Reading:
        nv, h = self._nvml, self._handle
        return Reading(
            self.clock(),
            nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
            float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
        )

    def max_sm_mhz(self) -> float:
        """The highest SM clock this GPU can run at (its boost clock), MHz."""
        return float(self._nvml.nvmlDeviceGetMaxClockInfo(self._handle, self._nvml.NVML_CLOCK_SM))

    def free_memory_bytes(self) -> int | None:
        """Free device memory (all processes counted), bytes; None if NVML cannot say."""
        try:
            return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).free)
        except self._nvml.NVMLError:
            return None

    def limits(self) -> dict[str, str]:
        """Tags: maximum SM clock and the enforced power limit."""
        nv, h = self._nvml, self._handle
        out = {"gpu_max_sm_mhz": f"{self.max_sm_mhz():.0f}"}
        try:
            out["gpu_power_limit_w"] = f"{nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0:.0f}"
        except nv.NVMLError:
            pass
        return out


def _nvml() -> object | None:
    """pynvml, initialised; None where it is not installed or cannot be initialised."""
    try:
        import pynvml as nvml
    except ImportError:
        return None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:
        return None
    return nvml


def open_gpu(nvml_index: int) -> Gpu | None:
    """The GPU at NVML index `nvml_index` (not the CUDA ordinal: see measure), or None where
    NVML is missing or has no such GPU."""
    nvml = _nvml()
    try:
        return None if nvml is None else Gpu(nvml, nvml.nvmlDeviceGetHandleByIndex(nvml_index))
    except nvml.NVMLError:
        return None


def device_count() -> int | None:
    """How many GPUs NVML sees (all of them: CUDA_VISIBLE_DEVICES is torch's), or None where
    NVML is missing."""
    nvml = _nvml()
    try:
        return None if nvml is None else int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError:
        return None
