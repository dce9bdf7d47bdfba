"""Environment capture: GPU, driver, CUDA, torch, triton, python, flexbench, git sha, host."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

from flexbench import gpustate

ENV_TAGS = (
    "gpu",
    "driver",
    "cuda",
    "gpu_max_sm_mhz",
    "gpu_power_limit_w",
    "torch",
    "triton",
    "python",
    "flexbench",
    "git_sha",
    "host",
)


MEASURE_PROCESS = "FLEXBENCH_MEASURE_PROCESS"  # measure in a child process (measuring)
COMPILE_AHEAD = "FLEXBENCH_COMPILE_AHEAD"  # compile the next config on a thread (ahead)


def check_switches() -> None:
    """ValueError (one line) for a flexbench switch set to neither 1 nor 0."""
    for name in (MEASURE_PROCESS, COMPILE_AHEAD):
        switch(name)


def switch(name: str) -> bool | None:
    """An on/off environment variable: True for 1, False for 0, None when unset or empty;
    ValueError (one line, with the fix) for anything else."""
    value = os.environ.get(name, "").strip()
    if value in ("", "0", "1"):
        return None if not value else value == "1"
    raise ValueError(f"{name} must be 1 (on) or 0 (off), got {value!r}: set 1 or 0, or unset it")


def _run(*cmd: str, cwd: str | Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def git_sha(path: str | Path | None = None) -> str:
    """HEAD of the git checkout at `path` (default: cwd), `+dirty` if modified; '' outside git."""
    sha = _run("git", "rev-parse", "HEAD", cwd=path)
    if sha and _run("git", "status", "--porcelain", "--untracked-files=no", cwd=path):
        sha += "+dirty"
    return sha


def checkout() -> Path | None:
    """flexbench's own git checkout (an editable install), else None: a wheel installed into
    a virtualenv inside some other repository must not report that repository's sha."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / ".git").exists() and (root / "pyproject.toml").exists() else None


def nvml_index() -> int:
    """NVML's index of the current CUDA device (they differ under CUDA_VISIBLE_DEVICES)."""
    import torch

    try:
        return torch.cuda._get_nvml_device_index(torch.cuda.current_device())
    except Exception:  # noqa: BLE001 - a private helper of torch's: fall back to the ordinal
        return torch.cuda.current_device()


def gpu_info(device: str) -> dict[str, str]:
    """GPU name, driver, CUDA version, max SM clock and power limit (NVML); '' on CPU."""
    import torch

    if device != "cuda" or not torch.cuda.is_available():
        return {"gpu": "", "driver": "", "cuda": torch.version.cuda or ""}
    driver = _run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    gpu = gpustate.open_gpu(nvml_index())
    return {
        "gpu": torch.cuda.get_device_name(),
        "driver": driver.splitlines()[0] if driver else "",
        "cuda": torch.version.cuda or "",
        **(gpu.limits() if gpu is not None else {}),
    }


def capture(device: str = "cuda") -> dict[str, str]:
    """Every environment tag of the MLflow contract, as strings ('none' where absent)."""
    import torch

    tags = {
        **gpu_info(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "flexbench": _version("flexbench"),
        "git_sha": git_sha(source) if (source := checkout()) else "",
        "host": socket.gethostname(),
    }
    return {k: v or "none" for k, v in tags.items()}
