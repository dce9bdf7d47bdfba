"""Named baselines that compiled flex is timed against, one function each (`@register`).

A baseline computes the same function as the flex call from a `Case` (q, k, v, the built mod,
the scale) and returns a zero-argument callable. Each knows what it cannot do: the SDPA forms
compute additive biases and boolean masks only (not softcap or a user score_mod), some need
CUDA. `measure` runs every named baseline once, checks it against the reference, and records
one that cannot run as skipped with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flexbench import mods

if TYPE_CHECKING:
    from torch import Tensor

# Names that would collide with the seed's metrics (fwd_eager_us, fwd_compiled_us,
# fwd_max_abs_err, baseline_max_abs_err) or the sweep's (fwd_speedup_mean, ...).
RESERVED = frozenset({"eager", "compiled", "fwd", "bwd", "baseline", "mean", "geomean", "min"})
RESERVED |= {"max", "speedup"}
HALF = ("float16", "bfloat16")


@dataclass(frozen=True)
class Case:
    """One config's inputs as a baseline sees them."""

    q: Tensor
    k: Tensor
    v: Tensor
    built: mods.Built
    scale: float

    @property
    def gqa(self) -> bool:
        return self.q.shape[1] != self.k.shape[1]


@dataclass(frozen=True)
class Baseline:
    """A registered baseline: its builder and what it needs."""

    name: str
    description: str
    build: Callable[[Case], Callable[[], Tensor]]
    sdpa: bool = False  # called through SDPA: additive bias and boolean mask only
    needs_cuda: bool = False

    def skip_reason(self, built: mods.Built, device: str) -> str | None:
        """Why this baseline cannot compute the mod here (None when it can)."""
        if self.needs_cuda and device != "cuda":
            return f"needs CUDA (this config runs on {device})"
        if self.sdpa and built.transform is not None:
            return (
                "SDPA cannot compute this mod (not an additive bias or boolean mask); "
                "use --baseline eager_math or inductor_math"
            )
        return None

    def form(self, built: mods.Built) -> str:
        """How it computes this mod, as the `baseline` param names it: for the SDPA forms
        `<name>_is_causal` / `<name>_attn_mask` / `<name>`, else the name."""
        if not self.sdpa:
            return self.name
        return built.baseline.replace("sdpa", self.name, 1)

    def approximation(self, built: mods.Built, dtype: str) -> str:
        """What makes it inexact at this dtype, e.g. `bf16 mask` (SDPA's additive mask holds
        the bias in the compute dtype), for the summary's `approximate (...)` mark."""
        short = {"float16": "fp16", "bfloat16": "bf16"}.get(dtype, dtype)
        if self.sdpa:
            return (
                f"{short} mask" if built.bias is not None and dtype in HALF else f"{short} kernel"
            )
        return f"{short} scores"


REGISTRY: dict[str, Baseline] = {}


def register(
    name: str, description: str, sdpa: bool = False, needs_cuda: bool = False
) -> Callable[[Callable[[Case], Callable[[], Tensor]]], Callable[[Case], Callable[[], Tensor]]]:
    """Add a baseline: `@register("name", "what it computes")` over `def name(case)`."""

    def add(fn: Callable[[Case], Callable[[], Tensor]]) -> Callable[[Case], Callable[[], Tensor]]:
        if name in RESERVED or name in REGISTRY or not name.isidentifier():
            raise ValueError(f"baseline name {name!r} is taken, reserved or not an identifier")
        REGISTRY[name] = Baseline(name, description, fn, sdpa, needs_cuda)
        return fn

    return add


def names() -> str:
    """The registered names, comma separated, for help and error messages."""
    return ", ".join(REGISTRY)


def parse(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Baseline names from `sdpa,eager_math` (or a list), checked; ValueError names the bad one."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = tuple(s.strip() for s in items if s.strip())
    if not out:
        raise ValueError(f"baseline: name at least one of {names()}")
    for name in out:
        if name not in REGISTRY:
            raise ValueError(f"unknown baseline '{name}'; choose from {names()}")
    twice = {n for n in out if out.count(n) > 1}
    if twice:
        raise ValueError(f"baseline '{sorted(twice)[0]}' is named twice")
    return out


def named(spec: str) -> list[Baseline]:
    return [REGISTRY[n] for n in parse(spec)]


def describe() -> list[dict[str, str]]:
    """One row per baseline: name and what it computes."""
    return [{"baseline": b.name, "computes": b.description} for b in REGISTRY.values()]


# --- SDPA ------------------------------------------------------------------------------------


def sdpa_mask(case: Case) -> Tensor | None:
    """SDPA's attn_mask for the mod: the bias in the compute dtype (-inf where masked), the
    boolean mask, or None (no mod, or is_causal)."""
    built, q, k = case.built, case.q, case.k
    mask = built.mask
    if built.bias is not None:
        mask = built.bias.to(q.dtype)
        if built.mask is not None:
            mask = mask.masked_fill(~built.mask, float("-inf"))
    if built.sdpa_is_causal or mask is None:
        return None
    # SDPA's fused kernels want a dense mask: a stride-0 broadcast [1,H,1,1] head bias
    # crashed the memory-efficient kernel on an H100 ("misaligned address").
    return mask.expand(*mask.shape[:2], q.shape[2], k.shape[2]).contiguous()


def sdpa_call(case: Case, backend: str = "") -> Callable[[], Tensor]:
    """SDPA computing the mod's function; with `backend` (an SDPBackend name), forced to that
    kernel."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mask = sdpa_mask(case)
    kwargs = {"enable_gqa": True} if case.gqa else {}
    q, k, v, causal = case.q, case.k, case.v, case.built.sdpa_is_causal

    def call() -> Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=case.scale, **kwargs
        )

    if not backend:
        return call

    def forced() -> Tensor:
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return call()

    return forced


@register("sdpa", "SDPA, torch picks the kernel (is_causal, or attn_mask holding the mod)", True)
def sdpa(case: Case) -> Callable[[], Tensor]:
    return sdpa_call(case)


@register("sdpa_cudnn", "SDPA forced to cuDNN attention", sdpa=True, needs_cuda=True)
def sdpa_cudnn(case: Case) -> Callable[[], Tensor]:
    return sdpa_call(case, "CUDNN_ATTENTION")


@register("sdpa_flash", "SDPA forced to flash attention (no attn_mask)", sdpa=True)
def sdpa_flash(case: Case) -> Callable[[], Tensor]:
    return sdpa_call(case, "FLASH_ATTENTION")


@register("sdpa_efficient", "SDPA forced to memory-efficient attention", True, True)
def sdpa_efficient(case: Case) -> Callable[[], Tensor]:
    return sdpa_call(case, "EFFICIENT_ATTENTION")


@register("sdpa_math", "SDPA forced to its math fallback (matmuls and softmax)", sdpa=True)
def sdpa_math(case: Case) -> Callable[[], Tensor]:
    return sdpa_call(case, "MATH")


# --- dense math ------------------------------------------------------------------------------


def dense_math(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    blocked: Tensor | None,
    batch: Tensor,
    scale: float,
    transform: Callable[..., Tensor] | None,
) -> Tensor:
    """softmax(transform(scale·QKᵀ) + bias, blocked = -inf) V as a user writes it: matmuls in
    the compute dtype, softmax in float32, no other pass (a fully masked row gives NaN)."""
    import torch

    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    s = (q @ k.transpose(-2, -1)) * scale
    if transform is not None:
        s = transform(s, batch)
    if bias is not None:
        s = s + bias
    if blocked is not None:
        s = s.masked_fill(blocked, float("-inf"))
    return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def math_args(case: Case) -> tuple:
    """dense_math's arguments, prepared once outside the timed call."""
    import torch

    built, q = case.built, case.q
    bias = built.bias.to(q.dtype) if built.bias is not None else None
    blocked = ~built.mask if built.mask is not None else None
    batch = torch.arange(q.shape[0], device=q.device).view(-1, 1, 1, 1)
    return case.q, case.k, case.v, bias, blocked, batch, case.scale, built.transform


@register("eager_math", "the dense math in eager PyTorch: matmuls, float32 softmax, no extra pass")
def eager_math(case: Case) -> Callable[[], Tensor]:
    args = math_args(case)
    return lambda: dense_math(*args)


# One compiled dense_math for the process: dynamo compiles it again per shape and mod (its
# tensors are arguments, so no graph keeps a config's bias alive).
_compiled_math: list[Callable] = []


def compiled_math() -> Callable:
    import torch

    if not _compiled_math:
        _compiled_math.append(torch.compile(dense_math, dynamic=False, fullgraph=True))
    return _compiled_math[0]


@register("inductor_math", "torch.compile of eager_math's dense math (inductor fuses it)")
def inductor_math(case: Case) -> Callable[[], Tensor]:
    args, fn = math_args(case), compiled_math()
    return lambda: fn(*args)
