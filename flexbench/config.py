"""BenchConfig (one measurement), sweep expansion and a stable config key."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from flexbench import flops, timers
from flexbench.choices import (
    ALIGNS,
    AUTO,
    DEFAULT_BASELINE,
    DEVICES,
    DTYPE_SHORT,
    DTYPES,
    FLEX_BACKENDS,
)
from flexbench.timers import DEFAULT_REGIME, auto_timer

if TYPE_CHECKING:  # mods imports torch: config resolves mods only when validating
    from flexbench import mods, timing
    from flexbench.gpustate import Gpu

REGIMES = (AUTO, *timers.REGIMES)  # "none" on CPU
# Stopping rule defaults per device: CPU wall time on a shared machine rarely gets under 0.5%.
DEFAULT_MAX_NOISE = {"cuda": 0.005, "cpu": 0.02}
DEFAULT_MAX_TIME = {"cuda": 2.0, "cpu": 0.5}
# How a config is timed, not what it measures: params, but not part of the config key.
SETTINGS = ("max_noise", "min_samples", "max_time", "throttle_threshold", "sample_ms")
# Fields added after keys were first logged: left out of the key at their default, so a config
# measured before keeps its key (--resume still finds it).
KEY_DEFAULTS = {
    "baselines": DEFAULT_BASELINE,
    "flex_backend": "auto",
    "align": "end",
    "reference": "",
}
KERNEL_OPTION_TYPES = (int, float, bool, str)
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
# What a sweep measures when the command line gives no sizes or dtype: the seed's sweep on a
# GPU; on a CPU (forward only) one small float32 shape: the seed's would take hours there
# (BENCHMARKS.md, "Figures the code cites").
SIZE_DEFAULTS = {
    "cuda": {
        "batch": [2, 8, 16],
        "heads": [16],
        "seq_lens": [512, 1024, 4096],
        "head_dims": [64, 128],
        "dtypes": ["bfloat16"],
    },
    "cpu": {
        "batch": [1],
        "heads": [4],
        "seq_lens": [256],
        "head_dims": [64],
        "dtypes": ["float32"],
    },
}
SIZE_FLAGS = {
    "batch": "-b",
    "heads": "-nh",
    "seq_lens": "-s",
    "head_dims": "-d",
    "dtypes": "-dtype",
}


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a whole number > 0, got {value!r}")


def _choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _mod_name(spec: object) -> str:
    from flexbench import mods

    if not isinstance(spec, str):
        raise ValueError(f"score_mod must be a mod name like 'causal', got {spec!r}")
    try:
        return mods.resolve(spec).name
    except ValueError as exc:
        raise ValueError(f"score_mod: {exc}") from None


def _instance(c: BenchConfig) -> mods.Instance:
    """The config's mod at its sizes (a factory is called: its result must be a mod)."""
    from flexbench import mods

    try:
        return mods.resolve(c.score_mod).instance(c.dims())
    except ValueError as exc:
        raise ValueError(f"score_mod: {exc}") from None


def _check_reference(c: BenchConfig) -> None:
    from flexbench import mods

    try:
        mods.load_reference(c.reference, c.dims())
    except ValueError as exc:
        raise ValueError(f"reference: {exc}") from None


def _baselines(spec: str) -> tuple[str, ...]:
    from flexbench import baselines  # the registry: its builders import torch

    return baselines.parse(spec)


def _check_timer_device(timer: str, device: str) -> None:
    """A CUDA timer on CPU cannot run; a CPU timer on CUDA would not wait for the kernels."""
    needs_cuda = timers.TIMERS[timer].needs_cuda
    if device == "cpu" and needs_cuda:
        raise ValueError(f"timer {timer!r} needs CUDA; use timer 'cpu' or 'auto'")
    if device == "cuda" and not needs_cuda:
        raise ValueError(
            f"timer {timer!r} would not wait for CUDA kernels; use 'auto', "
            "'do_bench' or 'cudagraph' with device cuda"
        )


def canonical_kernel_options(options: dict | str | None) -> str:
    """Kernel options as sorted compact JSON ('' when none), validated."""
    if not options:
        return ""
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except json.JSONDecodeError as exc:
            raise ValueError(f"kernel_options must be a JSON object: {exc}") from None
    if not isinstance(options, dict):
        raise ValueError('kernel_options must be a JSON object like {"BLOCK_M": 64}')
    for key, value in options.items():
        if not isinstance(value, KERNEL_OPTION_TYPES):
            raise ValueError(f"kernel_options[{key}] must be a number, bool or string")
    return json.dumps(options, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class BenchConfig:
    """One measurement: shape, dtype, mod and how to compile and time it."""

    batch: int
    heads: int
    q_len: int
    head_dim: int
    kv_heads: int | None = None
    kv_len: int | None = None
    dtype: str = "bfloat16"
    score_mod: str = "noop"
    calculate_bwd: bool = False
    dynamic: bool = False
    max_autotune: bool = False
    device: str = "cuda"
    timer: str = "auto"
    kernel_options: str = field(default="")
    regime: str = "auto"
    max_noise: float | None = None
    min_samples: int = 10
    max_time: float | None = None
    throttle_threshold: float = 0.9
    baselines: str = DEFAULT_BASELINE
    flex_backend: str = "auto"
    align: str = "end"
    reference: str = ""
    sample_ms: float | None = None  # one timing sample's length; None: the regime's (5/40 ms)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: fill derived defaults once
        set_(self, "kv_heads", self.heads if self.kv_heads is None else self.kv_heads)
        set_(self, "kv_len", self.q_len if self.kv_len is None else self.kv_len)
        for name in ("batch", "heads", "kv_heads", "q_len", "kv_len", "head_dim"):
            _positive(name, getattr(self, name))
        if self.heads % self.kv_heads:
            raise ValueError(
                f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})"
            )
        _choice("dtype", self.dtype, DTYPES)
        _choice("device", self.device, DEVICES)
        _choice("timer", self.timer, timers.CHOICES)
        _choice("align", self.align, ALIGNS)
        set_(self, "score_mod", _mod_name(self.score_mod))
        _instance(self)
        if self.reference:
            _check_reference(self)
        set_(self, "kernel_options", canonical_kernel_options(self.kernel_options))
        if "BACKEND" in self.kernel_options_dict and self.flex_backend != "auto":
            raise ValueError("flex's BACKEND is set twice: by flex_backend and kernel_options")
        set_(self, "baselines", ",".join(_baselines(self.baselines)))
        _choice("flex_backend", self.flex_backend, FLEX_BACKENDS)
        if self.timer == "auto":
            set_(self, "timer", auto_timer(self.device))
        self._resolve_timing(set_)
        _check_timer_device(self.timer, self.device)

    def _resolve_timing(self, set_: Callable) -> None:
        """Resolve the regime and the stopping rule's per-device defaults; validate them."""
        _choice("regime", self.regime, (*REGIMES, "none"))
        if self.device == "cpu":  # no GPU clock to manage: wall time, one call a sample
            set_(self, "regime", "none")
        elif self.regime in ("auto", "none"):
            set_(self, "regime", DEFAULT_REGIME)
        if self.max_noise is None:
            set_(self, "max_noise", DEFAULT_MAX_NOISE[self.device])
        if self.max_time is None:
            set_(self, "max_time", DEFAULT_MAX_TIME[self.device])
        if not 0 < self.max_noise < 1:
            raise ValueError(f"max_noise must be a fraction in (0, 1), got {self.max_noise}")
        if isinstance(self.min_samples, bool) or not (
            isinstance(self.min_samples, int) and self.min_samples >= 3
        ):
            raise ValueError(f"min_samples must be a whole number >= 3, got {self.min_samples}")
        if not self.max_time > 0:
            raise ValueError(f"max_time must be > 0 seconds, got {self.max_time}")
        if self.sample_ms is not None and not self.sample_ms > 0:
            raise ValueError(f"sample_ms must be > 0 ms, got {self.sample_ms}")
        if not 0 < self.throttle_threshold <= 1:
            raise ValueError(
                f"throttle_threshold must be a fraction in (0, 1], got {self.throttle_threshold}"
            )

    def timing_settings(self, gpu: Gpu | None = None) -> timing.Settings:
        """How the timer samples this config: its regime, stopping rule and throttle threshold
        (`gpu`: the GPU whose state each timing reads; None on CPU or without NVML)."""
        from flexbench import stats, timing

        rule = stats.StopRule(self.max_noise, self.min_samples, 0.0, self.max_time)
        return timing.Settings(self.regime, rule, self.throttle_threshold, gpu, self.sample_ms)

    @property
    def shape(self) -> str:
        """`B,H,S,D` as in the seed's table (S = query length)."""
        return f"{self.batch},{self.heads},{self.q_len},{self.head_dim}"

    @property
    def kernel_options_dict(self) -> dict:
        return json.loads(self.kernel_options) if self.kernel_options else {}

    @property
    def backend(self) -> str:
        """flex's backend as flex_backend names it (also when kernel_options set BACKEND)."""
        return str(self.kernel_options_dict.get("BACKEND", self.flex_backend)).lower()

    def dims(self) -> mods.Dims:
        """The sizes the mod sees (and fills its spec's placeholders with)."""
        from flexbench import mods

        return mods.Dims(
            self.heads,
            self.q_len,
            self.kv_len,
            self.device,
            self.batch,
            self.kv_heads,
            self.head_dim,
            self.align,
        )

    @property
    def mod_name(self) -> str:
        """The mod's canonical spec with this config's placeholders filled."""
        return _instance(self).name

    @property
    def mod_sha(self) -> str:
        """Hash of a user mod's source and filled spec ('' for built-ins)."""
        return _instance(self).sha

    def identity(self) -> dict:
        """Every field that defines the measurement, as plain JSON values (not the stopping
        rule's settings: they say how long to sample, not what is measured)."""
        return {k: v for k, v in asdict(self).items() if k not in SETTINGS}

    def config_key(self) -> str:
        """Stable hash of the identity and the mod's source: the same config gives the same
        key everywhere; a user mod whose source changed gets a new one. Fields added later
        count only away from their default, so keys of earlier sweeps still match."""
        ident = {k: v for k, v in self.identity().items() if KEY_DEFAULTS.get(k, ...) != v}
        if self.mod_sha:
            ident["mod_sha"] = self.mod_sha
        blob = json.dumps(ident, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def run_name(self) -> str:
        """Readable name, e.g. `causal b8 h16 s4096 d128 bf16`."""
        parts = [self.mod_name, f"b{self.batch}", f"h{self.heads}"]
        if self.kv_heads != self.heads:
            parts.append(f"kvh{self.kv_heads}")
        parts.append(f"s{self.q_len}")
        if self.kv_len != self.q_len:
            parts.append(f"kv{self.kv_len}")
        parts += [f"d{self.head_dim}", DTYPE_SHORT[self.dtype]]
        if self.flex_backend != "auto":
            parts.append(self.flex_backend)
        return " ".join(parts)

    def params(self) -> dict[str, str]:
        """The MLflow contract's child-run params, as strings."""
        p = {
            "shape": self.shape,
            "batch": self.batch,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "q_len": self.q_len,
            "kv_len": self.kv_len,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "score_mod": self.mod_name,
            "align": self.align,
            "device": self.device,
            "calculate_bwd": self.calculate_bwd,
            "dynamic": self.dynamic,
            "max_autotune": self.max_autotune,
            "timer": self.timer,
            "regime": self.regime,
            "max_noise": self.max_noise,
            "min_samples": self.min_samples,
            "max_time": self.max_time,
            "throttle_threshold": self.throttle_threshold,
            "baselines": self.baselines,
            "flex_backend": self.flex_backend,
        }
        p.update({k: v for k in ("mod_sha", "reference", "sample_ms") if (v := getattr(self, k))})
        p.update({f"ko_{k}": v for k, v in self.kernel_options_dict.items()})
        return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in p.items()}


def device_sizes(device: str, **given: Sequence) -> tuple[dict[str, list], list[str]]:
    """Sizes and dtypes (`batch`, `heads`, `seq_lens`, `head_dims`, `dtypes`) with each one
    not given (empty) set to the device's default; also those defaults as flags, e.g.
    `-b 1`."""
    defaults = SIZE_DEFAULTS[device]
    sizes = {k: list(given.get(k) or defaults[k]) for k in SIZE_FLAGS}
    filled = [
        f"{SIZE_FLAGS[k]} {','.join(map(str, defaults[k]))}" for k in SIZE_FLAGS if not given.get(k)
    ]
    return sizes, filled


def peak_bytes(c: BenchConfig) -> int:
    """Upper estimate of the memory one CPU config needs, from its shape."""
    args = (c.batch, c.heads, c.kv_heads, c.q_len, c.kv_len, c.head_dim, ITEMSIZE[c.dtype])
    return flops.cpu_peak_bytes(*args)


def shard(configs: Sequence[BenchConfig], index: int, count: int) -> list[BenchConfig]:
    """The index-th (0-based) of `count` disjoint slices: round-robin, so shards stay balanced."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard must be I/N with 0 <= I < N, got {index}/{count}")
    return list(configs[index::count])


def with_options(config: BenchConfig, **changes: object) -> BenchConfig:
    """A copy with some fields changed (validated again).

    Fields that held their default follow the change: kv_heads = heads, kv_len = q_len, and a
    timer that 'auto' chose is chosen again.
    """
    for derived, source in (("kv_heads", "heads"), ("kv_len", "q_len")):
        if source in changes and derived not in changes:
            if getattr(config, derived) == getattr(config, source):
                changes[derived] = None
    if "timer" not in changes and config.timer == auto_timer(config.device):
        changes["timer"] = "auto"
    if "device" in changes:  # per-device defaults follow the device
        changes.setdefault("regime", "auto")
        for name, defaults in (("max_noise", DEFAULT_MAX_NOISE), ("max_time", DEFAULT_MAX_TIME)):
            if getattr(config, name) == defaults[config.device]:
                changes.setdefault(name, None)
    return replace(config, **changes)


# --- --config FILE: an explicit list of configs ----------------------------------------------

FILE_REQUIRED = ("batch", "heads", "q_len", "head_dim", "mod")
FILE_OPTIONAL = ("kv_heads", "kv_len", "dtype")
FILE_EXAMPLE = "e.g. - {batch: 8, heads: 32, kv_heads: 8, q_len: 4096, head_dim: 128, mod: causal}"


def read_config_file(path: str | Path) -> tuple[list, str]:
    """The entries of a YAML or JSON config file (a list, or a mapping with `configs: [...]`)
    and the sha256 of its bytes (16 hex digits). ValueError naming the file and the fix."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"--config {path}: cannot read it ({exc.strerror})") from None
    try:
        data = _parse(path, raw)
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--config {path}: not valid YAML/JSON ({first})") from None
    entries = data.get("configs") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"--config {path}: expected a non-empty list of configs ({FILE_EXAMPLE})")
    return entries, hashlib.sha256(raw).hexdigest()[:16]


def _parse(path: Path, raw: bytes) -> object:
    """JSON for a .json file, else YAML (a superset of JSON); ValueError when malformed."""
    if path.suffix.lower() == ".json":
        return json.loads(raw)
    import yaml

    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ValueError(" ".join(str(exc).split())) from None


def config_of_entry(entry: object, where: str, **common: object) -> BenchConfig:
    """One file entry as a BenchConfig (`mod` or `score_mod`); ValueError naming `where`."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping like {{batch: 8, ...}}, got {entry!r}")
    fields_ = {("mod" if k == "score_mod" else k): v for k, v in entry.items()}
    missing = [k for k in FILE_REQUIRED if k not in fields_]
    unknown = sorted(set(fields_) - set(FILE_REQUIRED) - set(FILE_OPTIONAL))
    if missing or unknown:
        what = f"missing {', '.join(missing)}" if missing else f"unknown key {unknown[0]}"
        raise ValueError(
            f"{where}: {what}; keys are {', '.join(FILE_REQUIRED + FILE_OPTIONAL)} "
            "(kv_heads, kv_len, dtype optional)"
        )
    fields_["score_mod"] = fields_.pop("mod")
    try:
        return BenchConfig(**fields_, **common)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def configs_from_file(path: str | Path, **common: object) -> tuple[list[BenchConfig], str]:
    """Every entry of a --config file as a config (with the sweep's `common` options), in
    file order, and the file's hash. ValueError names the file and the entry (from 1)."""
    entries, sha = read_config_file(path)
    configs = [
        config_of_entry(e, f"--config {path}: entry {i}", **common)
        for i, e in enumerate(entries, start=1)
    ]
    return configs, sha
