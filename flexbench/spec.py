"""SweepSpec: a sweep's grid (sizes x mods x dtypes x ...) or config file, and a config
template (the BenchConfig fields every config shares); it expands to the BenchConfigs.

The template takes any BenchConfig field that is not an axis of the grid, so a field added to
BenchConfig is a SweepSpec option (and a sweep param) without an edit here.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, fields, replace
from itertools import product
from pathlib import Path

from flexbench import gpustate
from flexbench.config import BenchConfig, configs_from_file, device_sizes

DEFAULT_MODS = ("noop", "causal", "rel", "head_bias")
# Grid axis -> its sweep param name (the seed's flag names); the fields each axis sets.
AXIS_PARAMS = {
    "score_mods": "mods",
    "batch": "b",
    "heads": "nh",
    "seq_lens": "s",
    "head_dims": "d",
    "dtypes": "dtype",
    "kv_heads": "kv_heads",
    "kv_lens": "kv_len",
    "decode": "decode",
    "flex_backends": "flex_backend",
}
PER_CONFIG = ("batch", "heads", "q_len", "head_dim", "score_mod", "dtype", "kv_heads", "kv_len")
PER_CONFIG += ("flex_backend",)
TEMPLATE_FIELDS = tuple(f.name for f in fields(BenchConfig) if f.name not in PER_CONFIG)
PARAM_NAMES = {"baselines": "baseline"}  # template field -> sweep param, as its flag


def resolve_device(device: str, gpus: Sequence[int] | str | None = None) -> str:
    """`auto`: cuda when torch sees a GPU (or `gpus` asks for CUDA workers), else cpu.

    Without importing torch when it is a CUDA build and a GPU is plainly here (`cuda_here`);
    otherwise torch is asked."""
    if device != "auto":
        return device
    if gpus or cuda_here():
        return "cuda"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cuda_here() -> bool:
    """True when torch is a CUDA build (its lib/libtorch_cuda.so) and NVML (or /dev/nvidia0)
    shows a GPU that CUDA_VISIBLE_DEVICES does not hide; False when unsure."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip()
    if not visible or visible.startswith("-") or not cuda_build():
        return False
    count = gpustate.device_count()
    return bool(count) if count is not None else Path("/dev/nvidia0").exists()


def cuda_build() -> bool:
    """Whether the installed torch is a CUDA build, found without importing it."""
    spec = importlib.util.find_spec("torch")
    where = spec.submodule_search_locations if spec is not None else None
    return any((Path(d) / "lib" / "libtorch_cuda.so").exists() for d in where or ())


@dataclass(frozen=True, init=False)
class SweepSpec:
    """What a sweep measures. The configs are the product of the axes in the seed's order (b,
    nh, s, d, mod, dtype), then kv_heads, kv_len, flex backend; or, with `config_file`, the
    file's entries (x flex_backends). Sizes and dtypes left empty take the device's defaults
    (`config.SIZE_DEFAULTS`); kv_heads/kv_lens empty: = heads / seq_lens; `decode`: q_len 1
    against kv_lens (else seq_lens).

    Keyword options beyond the axes form `template`: BenchConfig fields shared by every config
    (calculate_bwd, device, timer, max_noise, baselines, ...); device defaults to "auto" (cuda
    when there is one)."""

    batch: tuple[int, ...]
    heads: tuple[int, ...]
    seq_lens: tuple[int, ...]
    head_dims: tuple[int, ...]
    score_mods: tuple[str, ...]
    dtypes: tuple[str, ...]
    kv_heads: tuple[int, ...]
    kv_lens: tuple[int, ...]
    decode: bool
    flex_backends: tuple[str, ...]
    config_file: str | None
    template: dict[str, object]

    def __init__(
        self,
        batch: Sequence[int] = (),
        heads: Sequence[int] = (),
        seq_lens: Sequence[int] = (),
        head_dims: Sequence[int] = (),
        score_mods: Sequence[str] = DEFAULT_MODS,
        dtypes: Sequence[str] = (),
        *,
        kv_heads: Sequence[int] = (),
        kv_lens: Sequence[int] = (),
        decode: bool = False,
        flex_backends: Sequence[str] = ("auto",),
        config_file: str | None = None,
        **template: object,
    ) -> None:
        unknown = sorted(set(template) - set(TEMPLATE_FIELDS))
        if unknown:
            raise TypeError(
                f"SweepSpec has no option {unknown[0]!r}; the grid's axes are "
                f"{', '.join(AXIS_PARAMS)}, the config template's {', '.join(TEMPLATE_FIELDS)}"
            )
        axes = dict(batch=batch, heads=heads, seq_lens=seq_lens, head_dims=head_dims)
        axes.update(score_mods=score_mods, dtypes=dtypes, kv_heads=kv_heads, kv_lens=kv_lens)
        for name, values in {**axes, "flex_backends": flex_backends}.items():
            object.__setattr__(self, name, tuple(values or ()))
        object.__setattr__(self, "decode", bool(decode))
        object.__setattr__(self, "config_file", config_file or None)
        object.__setattr__(self, "template", dict(template))

    @classmethod
    def take(cls, options: dict) -> SweepSpec:
        """The spec among `options` (e.g. a command's flags: axes, config_file and BenchConfig
        fields), removed from it."""
        names = (*AXIS_PARAMS, "config_file", *TEMPLATE_FIELDS)
        return cls(**{k: options.pop(k) for k in names if k in options})

    def options(self) -> dict[str, object]:
        """The keyword arguments that build this spec again."""
        axes = {k: getattr(self, k) for k in AXIS_PARAMS}
        return {**axes, "config_file": self.config_file, **self.template}

    def with_options(self, **changes: object) -> SweepSpec:
        """A copy with some axes or template fields changed."""
        return SweepSpec(**{**self.options(), **changes})

    def setting(self, name: str) -> object:
        """A template field: as given, else BenchConfig's default (device: "auto")."""
        if name in self.template:
            return self.template[name]
        if name == "device":
            return "auto"
        default = next(f.default for f in fields(BenchConfig) if f.name == name)
        return None if default is MISSING else default

    @property
    def device(self) -> str:
        return str(self.setting("device"))

    def resolved(self, gpus: Sequence[int] | str | None = None) -> SweepSpec:
        """This spec with device "auto" resolved (`resolve_device`)."""
        return self.with_options(device=resolve_device(self.device, gpus))

    def size_defaults(self) -> list[str]:
        """The device defaults the empty sizes and dtypes take, as flags (e.g. `-b 1`)."""
        if self.config_file:
            return []
        return device_sizes(self.resolved().device, **self._sizes())[1]

    def configs(self) -> list[BenchConfig]:
        """The BenchConfigs, in sweep order; ValueError on a bad value or combination."""
        return self.expand()[0]

    def expand(self) -> tuple[list[BenchConfig], dict[str, object]]:
        """The configs, and the sweep's arguments under their MLflow param names (`mods`, `b`,
        `nh`, ..., the template's fields, `configs`: how many) for `sweep.sweep_params`."""
        spec = self.resolved()
        if spec.config_file:
            return spec._from_file()
        return spec._from_grid()

    def _sizes(self) -> dict[str, tuple]:
        keys = ("batch", "heads", "seq_lens", "head_dims", "dtypes")
        return {k: getattr(self, k) for k in keys}

    def _template_params(self) -> dict[str, object]:
        return {PARAM_NAMES.get(k, k): v for k, v in self.template.items()}

    def _from_grid(self) -> tuple[list[BenchConfig], dict[str, object]]:
        sizes = device_sizes(self.device, **self._sizes())[0]
        axes = {**{k: getattr(self, k) for k in AXIS_PARAMS}, **sizes}
        named = {param: axes[axis] for axis, param in AXIS_PARAMS.items()}
        named.update(self._template_params())
        if self.template.get("reference") and len(self.score_mods) != 1:
            raise ValueError(
                f"--reference is the reference of one mod, got {len(self.score_mods)} in -mods; "
                "measure one mod, or attach fn.reference to each mod instead"
            )
        empty = [k for k in ("b", "nh", "s", "d", "mods", "dtype") if not named[k]]
        if empty:
            raise ValueError(f"empty list for {', '.join(empty)}: give at least one value")
        q_lens, kv_lens = axes["seq_lens"], axes["kv_lens"]
        if self.decode:
            q_lens, kv_lens = (1,), kv_lens or axes["seq_lens"]
        grid = product(
            axes["batch"],
            axes["heads"],
            q_lens,
            axes["head_dims"],
            self.score_mods,
            axes["dtypes"],
            axes["kv_heads"] or (None,),
            kv_lens or (None,),
            self.flex_backends or ("auto",),
        )
        configs = [BenchConfig(*point[:4], **self._point(*point[4:])) for point in grid]
        return configs, {**named, "configs": len(configs)}

    def _point(
        self, mod: str, dtype: str, kv_heads: int | None, kv_len: int | None, backend: str
    ) -> dict[str, object]:
        """A grid point's fields beyond the four sizes, with the template's."""
        fields_ = dict(score_mod=mod, dtype=dtype, kv_heads=kv_heads, kv_len=kv_len)
        return {**fields_, "flex_backend": backend, **self.template}

    def _from_file(self) -> tuple[list[BenchConfig], dict[str, object]]:
        changed = [k for k in AXIS_PARAMS if getattr(self, k) != getattr(SweepSpec(), k)]
        changed = [k for k in changed if k != "flex_backends"]
        if changed:
            raise ValueError(
                f"config_file lists the configs: drop {changed[0]} (or put it in its entries)"
            )
        configs, sha = configs_from_file(self.config_file, **self.template)
        backends = self.flex_backends or ("auto",)
        configs = [replace(c, flex_backend=b) for c in configs for b in backends]
        args = {"config_file": self.config_file, "config_sha": sha, **self._template_params()}
        return configs, {**args, "configs": len(configs)}
