"""Registry of named score/mask mods, each with a dense reference computing the same function.

A mod is named `name` or `name:param` (`sliding_window:128`); a user score_mod is named
`package.module:function`. `resolve(spec)` returns a `Mod`; `Mod.build(dims)` gives the flex
callables and the dense reference for one shape.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor


@dataclass(frozen=True)
class Dims:
    """The sizes a mod may depend on."""

    heads: int
    q_len: int
    kv_len: int
    device: str


@dataclass(frozen=True)
class Built:
    """One mod at one shape: flex callables and the dense reference of the same function.

    `bias` is additive and `mask` boolean (True = attend), both broadcastable to [B,H,Q,KV];
    `transform(scores, b)` maps scaled scores [B,H,Q,KV] to modified scores for mods that are
    not additive (b: batch indices broadcastable to the scores).
    """

    score_mod: Callable | None = None
    mask_mod: Callable | None = None
    bias: Tensor | None = None
    mask: Tensor | None = None
    transform: Callable[..., Tensor] | None = None
    sdpa_is_causal: bool = False

    @property
    def baseline(self) -> str:
        """How the eager baseline computes this function."""
        if self.transform is not None:
            return "eager_math"
        if self.sdpa_is_causal:
            return "sdpa_is_causal"
        if self.bias is not None or self.mask is not None:
            return "sdpa_attn_mask"
        return "sdpa"


@dataclass(frozen=True)
class ModInfo:
    """A built-in mod's registry entry."""

    name: str
    description: str
    param: str | None
    default: int | float | None
    build: Callable[[Dims, float | None], Built]


def _grid(d: Dims) -> tuple[Tensor, Tensor]:
    """q and kv index tensors shaped [Q,1] and [1,KV]."""
    q = torch.arange(d.q_len, device=d.device).view(-1, 1)
    kv = torch.arange(d.kv_len, device=d.device).view(1, -1)
    return q, kv


def _offset(d: Dims) -> int:
    """Bottom-right alignment: query i sits at position i + kv_len - q_len."""
    return d.kv_len - d.q_len


# --- the seed's four -------------------------------------------------------------------------


def _noop(d: Dims, _p: float | None) -> Built:
    return Built()


@lru_cache
def _causal_mod(offset: int) -> Callable:
    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return causal


def _causal(d: Dims, _p: float | None) -> Built:
    q, kv = _grid(d)
    return Built(
        mask_mod=_causal_mod(_offset(d)),
        mask=(q + _offset(d) >= kv)[None, None],
        sdpa_is_causal=d.q_len == d.kv_len,
    )


def relative_bias(score, b, h, m, n):
    return score + (m - n)


def _rel(d: Dims, _p: float | None) -> Built:
    q, kv = _grid(d)
    return Built(score_mod=relative_bias, bias=(q - kv).float()[None, None])


def head_bias(score, b, h, m, n):
    return score + 2 * h


def _head_bias(d: Dims, _p: float | None) -> Built:
    h = torch.arange(d.heads, device=d.device, dtype=torch.float32)
    return Built(score_mod=head_bias, bias=(2 * h).view(1, -1, 1, 1))


# --- beyond the seed -------------------------------------------------------------------------


def alibi_slopes(heads: int, device: str) -> Tensor:
    """ALiBi slopes 2^(-8(h+1)/H), one per head."""
    exponents = torch.arange(1, heads + 1, device=device, dtype=torch.float32)
    return torch.exp2(-8.0 * exponents / heads)


@lru_cache
def _alibi_mod(heads: int, device: str) -> Callable:
    slopes = alibi_slopes(heads, device)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    return alibi


def _alibi(d: Dims, _p: float | None) -> Built:
    q, kv = _grid(d)
    slopes = alibi_slopes(d.heads, d.device).view(1, -1, 1, 1)
    return Built(score_mod=_alibi_mod(d.heads, d.device), bias=slopes * (kv - q).float())


@lru_cache
def _window_mod(window: int, offset: int) -> Callable:
    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx + offset >= kv_idx) & (q_idx + offset - kv_idx <= window)

    sliding_window.__name__ = f"sliding_window_{window}"
    return sliding_window


def _sliding_window(d: Dims, p: float | None) -> Built:
    window, (q, kv), off = int(p), _grid(d), _offset(d)
    mask = (q + off >= kv) & (q + off - kv <= window)
    return Built(mask_mod=_window_mod(window, off), mask=mask[None, None])


@lru_cache
def _prefix_mod(prefix: int, offset: int) -> Callable:
    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx < prefix) | (q_idx + offset >= kv_idx)

    prefix_lm.__name__ = f"prefix_lm_{prefix}"
    return prefix_lm


def _prefix_lm(d: Dims, p: float | None) -> Built:
    prefix, (q, kv), off = int(p), _grid(d), _offset(d)
    mask = (kv < prefix) | (q + off >= kv)
    return Built(mask_mod=_prefix_mod(prefix, off), mask=mask[None, None])


def document_ids(length: int, docs: int, device: str) -> Tensor:
    """Document id of each position: `docs` documents with lengths in proportion 1:2:...:docs."""
    weights = torch.arange(1, docs + 1, dtype=torch.float64)
    bounds = torch.round(torch.cumsum(weights, 0) / weights.sum() * length).long()
    return torch.bucketize(torch.arange(length), bounds, right=True).to(device)


@lru_cache
def _document_mod(docs: int, kv_len: int, offset: int, device: str) -> Callable:
    doc = document_ids(kv_len, docs, device)

    def document_mask(b, h, q_idx, kv_idx):
        return doc[q_idx + offset] == doc[kv_idx]

    document_mask.__name__ = f"document_mask_{docs}"
    return document_mask


def _document_mask(d: Dims, p: float | None) -> Built:
    docs, off = int(p), _offset(d)
    if off < 0:
        raise ValueError(f"document_mask needs q_len <= kv_len, got {d.q_len} > {d.kv_len}")
    if docs > d.kv_len:
        raise ValueError(f"document_mask:{docs} needs kv_len >= {docs}, got {d.kv_len}")
    doc = document_ids(d.kv_len, docs, d.device)
    mask = doc[off:, None] == doc[None, :]
    return Built(mask_mod=_document_mod(docs, d.kv_len, off, d.device), mask=mask[None, None])


@lru_cache
def _softcap_mod(cap: float) -> Callable:
    def softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    softcap.__name__ = f"softcap_{cap:g}"
    return softcap


def _softcap(d: Dims, p: float | None) -> Built:
    cap = float(p)
    return Built(score_mod=_softcap_mod(cap), transform=lambda s, b: cap * torch.tanh(s / cap))


BUILTINS: dict[str, ModInfo] = {
    m.name: m
    for m in [
        ModInfo("noop", "plain attention, no modification", None, None, _noop),
        ModInfo("causal", "causal mask (block-sparse)", None, None, _causal),
        ModInfo("rel", "relative position bias: score + (q - kv)", None, None, _rel),
        ModInfo("head_bias", "per-head bias: score + 2*h", None, None, _head_bias),
        ModInfo("alibi", "ALiBi bias: score + slope_h*(kv - q)", None, None, _alibi),
        ModInfo("sliding_window", "causal mask within a window", "window", 256, _sliding_window),
        ModInfo("prefix_lm", "bidirectional prefix, causal after", "prefix", 256, _prefix_lm),
        ModInfo("document_mask", "attend within packed documents", "documents", 4, _document_mask),
        ModInfo("softcap", "tanh soft-capping: cap*tanh(score/cap)", "cap", 30.0, _softcap),
    ]
}


@dataclass(frozen=True)
class Mod:
    """A resolved mod: its canonical name and how to build it at a shape."""

    name: str
    info: ModInfo | None = None
    param: float | None = None
    user_fn: Callable | None = None

    def build(self, dims: Dims) -> Built:
        """Flex callables and dense reference for one shape."""
        if self.user_fn is not None:
            return _user_built(self.user_fn, dims)
        assert self.info is not None
        return self.info.build(dims, self.param)


def _user_built(fn: Callable, d: Dims) -> Built:
    """A user score_mod's reference: the same function applied to broadcast index tensors."""
    q, kv = _grid(d)
    h = torch.arange(d.heads, device=d.device).view(1, -1, 1, 1)
    return Built(score_mod=fn, transform=lambda s, b: fn(s, b, h, q[None, None], kv[None, None]))


def builtin_names() -> str:
    """The built-in names, comma separated, for error messages."""
    return ", ".join(BUILTINS)


def _parse_param(name: str, raw: str, info: ModInfo) -> float:
    if info.param is None:
        raise ValueError(f"mod '{name}' takes no parameter, got '{raw}'")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"mod '{name}': {info.param} must be a number, got '{raw}'") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"mod '{name}': {info.param} must be > 0, got '{raw}'")
    if isinstance(info.default, int) and value != int(value):
        raise ValueError(f"mod '{name}': {info.param} must be a whole number, got '{raw}'")
    return value


def _load_user(spec: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # noqa: BLE001 - a user module may fail to import in any way
        raise ValueError(
            f"cannot import mod '{spec}' ({type(exc).__name__}: {exc}); "
            f"use a built-in ({builtin_names()}) or an importable package.module:function"
        ) from None
    if not callable(fn):
        raise ValueError(f"mod '{spec}' is not callable; give a score_mod(score, b, h, q, kv)")
    return fn


@lru_cache
def resolve(spec: str) -> Mod:
    """Parse a mod spec (`causal`, `softcap:20`, `pkg.mod:fn`); ValueError names what's wrong."""
    name, sep, raw = spec.strip().partition(":")
    info = BUILTINS.get(name)
    if info is None:
        if sep and raw.isidentifier() and all(p.isidentifier() for p in name.split(".")):
            return Mod(spec.strip(), user_fn=_load_user(spec.strip()))
        raise ValueError(
            f"unknown mod '{spec}'; built-in mods: {builtin_names()} "
            "(or a user score_mod as package.module:function)"
        )
    if info.param is None and not sep:
        return Mod(name, info)
    value = _parse_param(name, raw, info) if sep else float(info.default)
    return Mod(f"{name}:{_format_param(value)}", info, value)


def _format_param(value: float) -> str:
    """Shortest text that parses back to `value` (`256`, `30`, `2.5`; never `1.23457e+06`)."""
    return str(int(value)) if value.is_integer() else repr(value)


def describe() -> list[dict[str, str]]:
    """One row per built-in mod: name, parameter (with default), description."""
    return [
        {
            "name": m.name,
            "parameter": f"{m.param} (default {m.default})" if m.param else "-",
            "description": m.description,
        }
        for m in BUILTINS.values()
    ]
