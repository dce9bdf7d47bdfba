"""Registry of named score/mask mods, each with a dense reference computing the same function.

A mod spec is a built-in `name` or `name:param` (`sliding_window:128`), a user mod
`package.module:name` or `package.module:name(args)` (flexbench.usermods), or mask specs
composed with `&` and `|` (`causal & pkg.m:doc_mask({kv_len})`; `&` binds tighter, brackets
group). `resolve(spec)` returns a `Mod`; `Mod.instance(dims)` the mod at one config (name with
placeholders filled, source hash); `Mod.build(dims)` the flex callables and dense reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING

from flexbench import usermods

if TYPE_CHECKING:
    from torch import Tensor

NOT_MASK = "is not a mask_mod; only mask_mods compose with & and |"


@dataclass(frozen=True)
class Dims:
    """The sizes a mod may depend on; `align`: queries aligned with the end of the keys (as
    decoding does) or with their start."""

    heads: int
    q_len: int
    kv_len: int
    device: str
    batch: int = 1
    kv_heads: int = 0  # 0: as many as heads
    head_dim: int = 0
    align: str = "end"

    def placeholders(self) -> dict[str, object]:
        """Values of the spec placeholders ({heads}, {kv_len}, ...)."""
        return {
            "batch": self.batch,
            "heads": self.heads,
            "kv_heads": self.kv_heads or self.heads,
            "q_len": self.q_len,
            "kv_len": self.kv_len,
            "head_dim": self.head_dim,
            "align": self.align,
            "device": self.device,
        }


@dataclass(frozen=True)
class Built:
    """One mod at one shape: flex callables and the dense reference of the same function.

    `bias` is additive and `mask` boolean (True = attend), both broadcastable to [B,H,Q,KV];
    `transform(scores, b)` maps scaled scores [B,H,Q,KV] to modified scores for mods that are
    not additive (b: batch indices broadcastable to the scores). A user mod may bring its own
    `reference(q, k, v, scale) -> out`; `cross_check`: compare eager flex with the dense
    reference (user code, which the registry's tests do not cover).
    """

    score_mod: Callable | None = None
    mask_mod: Callable | None = None
    bias: Tensor | None = None
    mask: Tensor | None = None
    transform: Callable[..., Tensor] | None = None
    sdpa_is_causal: bool = False
    reference: Callable | None = None
    cross_check: bool = False

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
    mask: bool = False  # a pure mask_mod: may be composed with & and |


def _indices(d: Dims) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """b, h, q_idx, kv_idx as aranges on their own axes of [B, H, Q, KV]: a mod called on
    them computes every index at once (broadcasting), as flex does one by one."""
    import torch

    def axis(size: int, dim: int) -> Tensor:
        shape = [1, 1, 1, 1]
        shape[dim] = size
        return torch.arange(size, device=d.device).view(shape)

    return axis(d.batch, 0), axis(d.heads, 1), axis(d.q_len, 2), axis(d.kv_len, 3)


def _masked(d: Dims, mask_mod: Callable) -> Built:
    """A mask_mod and its dense mask (boolean, broadcastable to [B, H, Q, KV])."""
    return Built(mask_mod=mask_mod, mask=mask_mod(*_indices(d)))


def _biased(d: Dims, score_mod: Callable) -> Built:
    """An additive score_mod and its dense bias: score_mod(0, b, h, q_idx, kv_idx)."""
    import torch

    zero = torch.zeros((), dtype=torch.float32, device=d.device)
    return Built(score_mod=score_mod, bias=score_mod(zero, *_indices(d)))


def _transformed(d: Dims, score_mod: Callable) -> Built:
    """A score_mod that is not additive, and it on dense scores [B', H, Q, KV] of batch
    indices `b`."""
    _, h, q, kv = _indices(d)
    return Built(score_mod=score_mod, transform=lambda s, b: score_mod(s, b, h, q, kv))


def _offset(d: Dims) -> int:
    """Query i sits at position i + kv_len - q_len (align end, bottom-right), or i (start)."""
    return d.kv_len - d.q_len if d.align == "end" else 0


# --- the seed's four -------------------------------------------------------------------------


def _noop(d: Dims, _p: float | None) -> Built:
    return Built()


@lru_cache
def _causal_mod(offset: int) -> Callable:
    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return causal


def _causal(d: Dims, _p: float | None) -> Built:
    built = _masked(d, _causal_mod(_offset(d)))
    return replace(built, sdpa_is_causal=_offset(d) == 0)  # SDPA's is_causal aligns top-left


def relative_bias(score, b, h, m, n):
    return score + (m - n)


def _rel(d: Dims, _p: float | None) -> Built:
    return _biased(d, relative_bias)


def head_bias(score, b, h, m, n):
    return score + 2 * h


def _head_bias(d: Dims, _p: float | None) -> Built:
    return _biased(d, head_bias)


# --- beyond the seed -------------------------------------------------------------------------


def alibi_slopes(heads: int, device: str) -> Tensor:
    """ALiBi slopes 2^(-8(h+1)/H), one per head."""
    import torch

    exponents = torch.arange(1, heads + 1, device=device, dtype=torch.float32)
    return torch.exp2(-8.0 * exponents / heads)


@lru_cache
def _alibi_mod(heads: int, device: str) -> Callable:
    slopes = alibi_slopes(heads, device)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    return alibi


def _alibi(d: Dims, _p: float | None) -> Built:
    return _biased(d, _alibi_mod(d.heads, d.device))


@lru_cache
def _window_mod(window: int, offset: int) -> Callable:
    causal = _causal_mod(offset)

    def sliding_window(b, h, q_idx, kv_idx):
        return causal(b, h, q_idx, kv_idx) & (q_idx + offset - kv_idx <= window)

    sliding_window.__name__ = f"sliding_window_{window}"
    return sliding_window


def _sliding_window(d: Dims, p: float | None) -> Built:
    return _masked(d, _window_mod(int(p), _offset(d)))


@lru_cache
def _prefix_mod(prefix: int, offset: int) -> Callable:
    causal = _causal_mod(offset)

    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx < prefix) | causal(b, h, q_idx, kv_idx)

    prefix_lm.__name__ = f"prefix_lm_{prefix}"
    return prefix_lm


def _prefix_lm(d: Dims, p: float | None) -> Built:
    return _masked(d, _prefix_mod(int(p), _offset(d)))


def document_ids(length: int, docs: int, device: str) -> Tensor:
    """Document id of each position: `docs` documents with lengths in proportion 1:2:...:docs."""
    import torch

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
    docs = int(p)
    if d.q_len > d.kv_len:
        raise ValueError(f"document_mask needs q_len <= kv_len, got {d.q_len} > {d.kv_len}")
    if docs > d.kv_len:
        raise ValueError(f"document_mask:{docs} needs kv_len >= {docs}, got {d.kv_len}")
    return _masked(d, _document_mod(docs, d.kv_len, _offset(d), d.device))


@lru_cache
def _softcap_mod(cap: float) -> Callable:
    import torch

    def softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    softcap.__name__ = f"softcap_{cap:g}"
    return softcap


def _softcap(d: Dims, p: float | None) -> Built:
    return _transformed(d, _softcap_mod(float(p)))


BUILTINS: dict[str, ModInfo] = {
    m.name: m
    for m in [
        ModInfo("noop", "plain attention, no modification", None, None, _noop),
        ModInfo("causal", "causal mask (block-sparse)", None, None, _causal, mask=True),
        ModInfo("rel", "relative position bias: score + (q - kv)", None, None, _rel),
        ModInfo("head_bias", "per-head bias: score + 2*h", None, None, _head_bias),
        ModInfo("alibi", "ALiBi bias: score + slope_h*(kv - q)", None, None, _alibi),
        ModInfo(
            "sliding_window", "causal mask within a window", "window", 256, _sliding_window, True
        ),
        ModInfo("prefix_lm", "bidirectional prefix, causal after", "prefix", 256, _prefix_lm, True),
        ModInfo(
            "document_mask", "attend within packed documents", "documents", 4, _document_mask, True
        ),
        ModInfo("softcap", "tanh soft-capping: cap*tanh(score/cap)", "cap", 30.0, _softcap),
    ]
}


@dataclass(frozen=True)
class Instance:
    """A mod at one config: its name with placeholders filled, the flex callable (None for a
    built-in, which builds its own), its kind, and a hash of its source ('' for built-ins)."""

    name: str
    fn: Callable | None
    kind: str
    sha: str


@dataclass(frozen=True)
class Mod:
    """A resolved mod: its canonical spec, and what it is made of (a built-in with its
    parameter, a user object with its factory arguments, or composed parts)."""

    name: str
    info: ModInfo | None = None
    param: float | None = None
    user_fn: Callable | None = None  # the object a user spec names (the mod or its factory)
    user: usermods.UserSpec | None = None
    op: str = ""  # "&" or "|" when composed
    parts: tuple[Mod, ...] = ()

    def instance(self, dims: Dims) -> Instance:
        """The mod at one config; ValueError when a factory's result is not a mod."""
        return _instance(self, dims)

    def build(self, dims: Dims, reference: str = "") -> Built:
        """Flex callables and dense reference for one shape; `reference`: a user reference
        spec, checked against instead of the dense reference."""
        if self.info is not None:
            built, attached = self.info.build(dims, self.param), None
        else:
            inst = self.instance(dims)
            built = replace(_user_built(inst, dims), cross_check=True)
            attached = _attached_reference(self, inst)
        return replace(built, reference=load_reference(reference, dims) if reference else attached)


def _user_built(inst: Instance, d: Dims) -> Built:
    """A user mod's dense form, evaluated as flex evaluates it (vmap over 0-d indices)."""
    import torch

    fn, size = inst.fn, (d.batch, d.heads, d.q_len, d.kv_len, d.device)
    if inst.kind == "mask_mod":
        return Built(mask_mod=fn, mask=usermods.evaluate(fn, *size))
    if getattr(fn, "additive", False):  # score_mod(score) = score + bias(b, h, q, kv)
        zero = torch.zeros((), device=d.device)
        bias = usermods.evaluate(lambda b, h, q, kv: fn(zero, b, h, q, kv), *size)
        return Built(score_mod=fn, bias=bias)
    return Built(score_mod=fn, transform=usermods.ScoreTransform(fn))


def _attached_reference(mod: Mod, inst: Instance) -> Callable | None:
    """`reference` attribute of the mod, else of the object its spec names."""
    for owner in (inst.fn, mod.user_fn):
        ref = getattr(owner, "reference", None)
        if callable(ref):
            return ref
    return None


def load_reference(spec: str, dims: Dims) -> Callable:
    """A `--reference` spec (grammar of a user mod): reference(q, k, v, scale) -> out."""
    user = usermods.parse(spec)
    if user is None:
        raise ValueError(f"reference '{spec}' must be {usermods.USER_HINT}")
    obj = usermods.import_object(user, spec)
    fn = obj if user.args is None else _user_call(user, obj, _filled(user, dims))[1]
    if not callable(fn):
        raise ValueError(f"reference '{spec}' is not callable; give reference(q, k, v, scale)")
    return fn


def _filled(user: usermods.UserSpec, dims: Dims) -> str:
    return usermods.fill(user.args, dims.placeholders())[2] if user.args is not None else ""


@lru_cache(maxsize=1024)
def _user_call(user: usermods.UserSpec, obj: Callable, filled: str) -> tuple[str, object]:
    """Call a factory once per filled argument list: one callable (one compiled graph) per
    distinct mod, not per config."""
    name = f"{user.module}:{user.attr}({filled})"
    args, kwargs, _ = usermods.fill(filled, {})
    try:
        return name, obj(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - user code
        raise ValueError(f"mod '{name}' raised {type(exc).__name__}: {exc}") from None


@lru_cache(maxsize=1024)
def _compose(op: str, fns: tuple[Callable, ...]) -> Callable:
    from torch.nn.attention.flex_attention import and_masks, or_masks

    return (and_masks if op == "&" else or_masks)(*fns)


@lru_cache(maxsize=1024)
def _instance(mod: Mod, dims: Dims) -> Instance:
    if mod.info is not None:
        kind = "mask_mod" if mod.info.mask else "score_mod"
        return Instance(mod.name, None, kind, "")
    if mod.user is not None:
        if mod.user.args is None:
            fn, name = mod.user_fn, mod.name
            kind = usermods.kind(fn, name, called=False)
        else:
            name, fn = _user_call(mod.user, mod.user_fn, _filled(mod.user, dims))
            kind = usermods.kind(fn, name, called=True)
        return Instance(name, fn, kind, usermods.sha([_source(mod), name]))
    parts = [p.instance(dims) for p in mod.parts]
    for part in parts:
        if part.kind != "mask_mod":
            raise ValueError(f"mod '{mod.name}': '{part.name}' {NOT_MASK}")
    fns = tuple(
        p.fn if p.fn is not None else _builtin_mask(m, dims) for p, m in zip(parts, mod.parts)
    )
    name = _join(mod.op, mod.parts, [p.name for p in parts])
    sha = usermods.sha([_source(mod), name]) if any(p.sha for p in parts) else ""
    return Instance(name, _compose(mod.op, fns), "mask_mod", sha)


def _builtin_mask(mod: Mod, dims: Dims) -> Callable:
    return mod.build(dims).mask_mod


def _source(mod: Mod) -> str:
    """The source hashes of every user module in a mod, in order."""
    if mod.user is not None:
        return usermods.source_sha(mod.user.module)
    return ",".join(_source(p) for p in mod.parts)


def _join(op: str, parts: tuple[Mod, ...], names: list[str]) -> str:
    """Parts joined by op; an `|` inside an `&` keeps its brackets (`&` binds tighter)."""
    return f" {op} ".join(
        f"({n})" if p.op == "|" and op == "&" else n for p, n in zip(parts, names)
    )


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


@lru_cache
def resolve(spec: str) -> Mod:
    """Parse a mod spec (`causal`, `softcap:20`, `pkg.mod:fn`, `pkg.mod:make({kv_len})`,
    `causal & pkg.mod:fn`); ValueError names what's wrong."""
    return _parse(spec.strip(), spec.strip())


def _parse(text: str, whole: str) -> Mod:
    for op in ("|", "&"):
        pieces = split_top(text, op)
        if len(pieces) > 1:
            return _composed(op, [_parse(p, whole) for p in pieces], whole)
    if _bracketed(text):
        return _parse(text[1:-1].strip(), whole)
    if not text:
        raise ValueError(f"mod '{whole}': & and | need a mask spec on each side")
    return _atom(text)


def _composed(op: str, parts: list[Mod], whole: str) -> Mod:
    flat = tuple(q for p in parts for q in (p.parts if p.op == op else (p,)))
    for part in flat:
        static = _static_kind(part)
        if static not in (None, "mask_mod"):
            raise ValueError(f"mod '{whole}': '{part.name}' {NOT_MASK}")
    return Mod(_join(op, flat, [p.name for p in flat]), op=op, parts=flat)


def _static_kind(mod: Mod) -> str | None:
    """A part's kind when known without a config (None: a factory's, known per config)."""
    if mod.info is not None:
        return "mask_mod" if mod.info.mask else "score_mod"
    if mod.user is not None:
        called = mod.user.args is not None
        return None if called else usermods.kind(mod.user_fn, mod.name, called=False)
    return "mask_mod"


def split_top(text: str, op: str) -> list[str]:
    """`text` split at `op` outside brackets and quotes."""
    pieces, depth, quote, start, i = [], 0, "", 0, 0
    while i < len(text):
        ch = text[i]
        if quote:
            i += ch == "\\"
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == op and depth == 0:
            pieces.append(text[start:i].strip())
            start = i + 1
        i += 1
    return [*pieces, text[start:].strip()]


def _bracketed(text: str) -> bool:
    """`(...)` around the whole text (not a factory call's brackets)."""
    if not text.startswith("("):
        return False
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            return i == len(text) - 1
    return False


def _atom(text: str) -> Mod:
    name, sep, raw = text.partition(":")
    info = BUILTINS.get(name)
    if info is not None:
        if info.param is None and not sep:
            return Mod(name, info)
        value = _parse_param(name, raw, info) if sep else float(info.default)
        return Mod(f"{name}:{_format_param(value)}", info, value)
    user = usermods.parse(text)
    if user is None:
        raise ValueError(
            f"unknown mod '{text}'; built-in mods: {builtin_names()} "
            f"(or a user mod as {usermods.USER_HINT})"
        )
    hint = f"; use a built-in ({builtin_names()}) or an importable {usermods.USER_HINT}"
    obj = usermods.import_object(user, text, hint)
    mod = Mod(user.name, user_fn=obj, user=user)
    if user.args is None:
        usermods.kind(obj, user.name, called=False)
    elif not callable(obj):
        raise ValueError(f"mod '{text}' is not callable, so it cannot make a mod")
    return mod


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
