"""User mods: `package.module:name` or `package.module:name(args)`, evaluated as flex does.

`args` are Python literals, positional or `key=value`, and may hold placeholders filled per
config (`{kv_len}`); `name(args)` must return the mod. A mod's kind is its arity: 4 parameters
(b, h, q_idx, kv_idx) = mask_mod, 5 (score, b, h, q_idx, kv_idx) = score_mod. Dense
evaluation goes through `torch.vmap` over 0-d index tensors, as flex evaluates a mod, chunked
so that memory stays bounded at long sequences.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import Tensor


PLACEHOLDERS = ("batch", "heads", "kv_heads", "q_len", "kv_len", "head_dim", "align", "device")
# A placeholder's stand-in while a spec is only checked (no config yet).
SAMPLE = {"align": "end", "device": "cpu"}
KINDS = {4: "mask_mod", 5: "score_mod"}
SIGNATURES = "a mask_mod takes 4 (b, h, q_idx, kv_idx), a score_mod 5 (score, b, h, q_idx, kv_idx)"
SPEC = re.compile(r"^([A-Za-z_][\w.]*)\s*:\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?$", re.DOTALL)
CHUNK = 1 << 24  # elements evaluated per vmap call
USER_HINT = "package.module:name or package.module:name(args)"


@dataclass(frozen=True)
class UserSpec:
    """One user atom: where the object lives and its canonical factory arguments."""

    module: str
    attr: str
    args: str | None  # canonical `1, window={kv_len}`; None when the object is the mod

    @property
    def name(self) -> str:
        call = "" if self.args is None else f"({self.args})"
        return f"{self.module}:{self.attr}{call}"


def parse(text: str) -> UserSpec | None:
    """A user atom's parts (arguments checked), or None when `text` is not shaped like one."""
    match = SPEC.match(text.strip())
    if match is None or not all(p.isidentifier() for p in match[1].split(".")):
        if re.match(r"^[\w.]+\s*:\s*\w+\s*\(", text.strip()):
            raise ValueError(f"mod '{text.strip()}': its arguments need a closing bracket")
        return None
    module, attr, args = match.groups()
    spec = UserSpec(module, attr, None if args is None else _canonical_args(text, args))
    if spec.args is not None:
        try:
            fill(spec.args, {})  # a bad literal or placeholder fails now, with the spec named
        except ValueError as exc:
            raise ValueError(f"mod '{text.strip()}': {exc}") from None
    return spec


def _canonical_args(text: str, args: str) -> str:
    try:
        call = ast.parse(f"_({args})", mode="eval").body
    except SyntaxError as exc:
        raise ValueError(
            f"mod '{text}': arguments '{args}' are not Python literals ({exc.msg})"
        ) from None
    if (
        not isinstance(call, ast.Call)
        or any(isinstance(a, ast.Starred) for a in call.args)
        or any(k.arg is None for k in call.keywords)
    ):
        raise ValueError(f"mod '{text}': arguments must be literals, positional or key=value")
    return ast.unparse(call)[2:-1]


class _Fill(ast.NodeTransformer):
    """Replace `{name}` placeholders with their values."""

    def __init__(self, values: dict[str, object]) -> None:
        self.values = values

    def visit_Set(self, node: ast.Set) -> ast.AST:
        if len(node.elts) == 1 and isinstance(node.elts[0], ast.Name):
            name = node.elts[0].id
            if name not in PLACEHOLDERS:
                raise KeyError(name)
            return ast.Constant(self.values.get(name, SAMPLE.get(name, 1)))
        return self.generic_visit(node)


def fill(args: str, values: dict[str, object]) -> tuple[tuple, dict, str]:
    """Positional and keyword values of canonical `args` with placeholders filled, and the
    filled arguments as text. ValueError names a bad literal or an unknown placeholder."""
    tree = _Fill(values)
    try:
        call = tree.visit(ast.parse(f"_({args})", mode="eval").body)
        positional = tuple(ast.literal_eval(a) for a in call.args)
        keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except KeyError as exc:
        raise ValueError(
            f"unknown placeholder {{{exc.args[0]}}} in ({args}); use "
            + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
        ) from None
    except ValueError:
        raise ValueError(
            f"({args}) is not all Python literals (numbers, strings, lists, ...) "
            "and {placeholders}"
        ) from None
    return positional, keywords, ast.unparse(call)[2:-1]


def import_object(spec: UserSpec, text: str, hint: str = "") -> object:
    """The object `module:attr` names; the current directory is importable as well."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)  # last: a file here never shadows an installed package
    importlib.invalidate_caches()
    try:
        return getattr(importlib.import_module(spec.module), spec.attr)
    except Exception as exc:  # noqa: BLE001 - a user module may fail to import in any way
        raise ValueError(
            f"cannot import mod '{text}' ({type(exc).__name__}: {exc}){hint}"
        ) from None


def kind(fn: object, text: str, called: bool) -> str:
    """`mask_mod` or `score_mod` from the number of required positional parameters."""
    if not callable(fn):
        made = f"returned {type(fn).__name__}, which" if called else ""
        raise ValueError(f"mod '{text}' {made} is not callable; {SIGNATURES}".replace("  ", " "))
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        raise ValueError(f"mod '{text}': cannot read its signature; {SIGNATURES}") from None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in params if p.kind in positional and p.default is p.empty]
    found = KINDS.get(len(names))
    if found is None or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        factory = "" if called else "; a factory is called in the spec: module:name(args)"
        raise ValueError(
            f"mod '{text}' takes {len(names)} parameter{'s' * (len(names) != 1)} "
            f"({', '.join(names)}); "
            f"{SIGNATURES}{factory}"
        )
    return found


def source_sha(module: str) -> str:
    """sha256 of the source file of the module that defines a user mod."""
    mod = sys.modules[module]
    path = getattr(mod, "__file__", None)
    try:
        blob = Path(path).read_bytes() if path else inspect.getsource(mod).encode()
    except (OSError, TypeError):
        blob = module.encode()  # no source to read (a frozen or built module)
    return hashlib.sha256(blob).hexdigest()


def sha(parts: list[str]) -> str:
    """Short hash over source hashes and a canonical spec."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def _vmapped(fn: Callable, with_score: bool) -> Callable:
    """fn over [B], [H], [Q], [KV] index vectors, each call on 0-d indices (flex's vmap)."""
    import torch

    prefix = (0,) if with_score else ()
    for dims in ((None, None, None, 0), (None, None, 0, None), (None, 0, None, None)):
        fn = torch.vmap(fn, in_dims=prefix + dims)
    return torch.vmap(fn, in_dims=prefix + (0, None, None, None))


def apply_score_mod(fn: Callable, scores: Tensor, b: Tensor, rows: int | None = None) -> Tensor:
    """score_mod applied to scores [B', H, Q, KV] of batch indices `b` (B' values): in one
    call, or in chunks of `rows` query rows."""
    import torch

    device = scores.device
    _, heads, q_len, kv_len = scores.shape
    h, kv = torch.arange(heads, device=device), torch.arange(kv_len, device=device)
    call, rows = _vmapped(fn, with_score=True), rows or q_len
    parts = [
        call(scores[:, :, i : i + rows], b.reshape(-1), h, _rows(i, rows, q_len, device), kv)
        for i in range(0, q_len, rows)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


@dataclass(frozen=True)
class ScoreTransform:
    """A user score_mod on dense scores: whole, as the eager baseline times it (no copies
    added), or `chunked` in query rows, as the reference computes it (memory bounded)."""

    fn: Callable

    def __call__(self, scores: Tensor, b: Tensor) -> Tensor:
        return apply_score_mod(self.fn, scores, b)

    def chunked(self, scores: Tensor, b: Tensor) -> Tensor:
        rows = max(1, CHUNK // scores[:, :, :1].numel())
        return apply_score_mod(self.fn, scores, b, rows)


def _rows(start: int, count: int, q_len: int, device: str | torch.device) -> Tensor:
    import torch

    return torch.arange(start, min(start + count, q_len), device=device)


def evaluate(fn: Callable, batch: int, heads: int, q_len: int, kv_len: int, device: str) -> Tensor:
    """fn(b, h, q_idx, kv_idx) at every index, as [B|1, H|1, Q, KV]: one [1, 1, Q, KV] when
    it depends on neither b nor h, [1, H, Q, KV] when not on b. Slices are compared as they
    are evaluated, so a mod that depends on neither holds one slice in memory."""
    import torch

    call, kv = _vmapped(fn, with_score=False), torch.arange(kv_len, device=device)
    rows = max(1, CHUNK // kv_len)

    def one(b: int, h: int) -> Tensor:
        idx = [torch.tensor([x], device=device) for x in (b, h)]
        parts = [call(*idx, _rows(i, rows, q_len, device), kv) for i in range(0, q_len, rows)]
        return torch.cat(parts, dim=2)

    def heads_of(b: int) -> Tensor:
        return torch.cat([one(b, h) for h in range(heads)], dim=1)

    first = one(0, 0)
    pairs = ((b, h) for b in range(batch) for h in range(heads) if b or h)
    if all(torch.equal(one(b, h), first) for b, h in pairs):
        return first
    per_head = heads_of(0)
    if all(torch.equal(heads_of(b), per_head) for b in range(1, batch)):
        return per_head
    return torch.cat([per_head, *(heads_of(b) for b in range(1, batch))], dim=0)
