"""Run ONE config -> Result: inputs, named baselines, compiled flex (cached), check, timings.

Order per config, correct before fast: compile (timed once), check flex (and dQ/dK/dV) against
a float32 reference (float64 on CPU; a user mod's own reference when it has one; a mod making
NaN fails there, and eager flex is checked against a user mod's dense form), check every named
baseline the same way (one that cannot run is skipped with the reason, one over tolerance is
marked approximate), peak memory, the kernels each side ran (one profiler pass), then flex and
every baseline timed in the same interleaved rounds. A config that fails the check is never
timed; any exception fails that config only.

The forward runs as the config would in use, as the seed times it: with autograd when the
config has a backward (a training step's forward, which also saves what backward needs), under
no_grad when it is forward-only. So each config compiles one graph, not two.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from flexbench import ahead, baselines, env, flops, gpustate, kernels, mods, timers, timing
from flexbench.config import BenchConfig
from flexbench.result import Result
from flexbench.schema import BASELINE_SKIPPED_TAG, FLEX, INEXACT_TAG, KERNELS_TAG, PRIMARY

RNG_SEED = 123  # the random inputs (q, k, v, dout): the same in every run
# (atol, rtol) of |flex - reference| <= atol + rtol * max|reference|, per dtype.
TOLERANCE = {"float32": (1e-3, 1e-3), "float16": (5e-3, 5e-3), "bfloat16": (3e-2, 3e-2)}
COMPILE_MODES = {False: "default", True: "max-autotune-no-cudagraphs"}
# The kernel family a requested flex backend must show (kernels.family of flex's kernels).
BACKEND_FAMILY = {"triton": "triton", "triton_decode": "triton", "flash": "flash"}


class Laps:
    """`lap(name)` adds the seconds since the previous lap (or creation) to `phases[name]`."""

    def __init__(self, phases: dict[str, float]) -> None:
        self.phases, self.last = phases, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.last
        self.last = now


class CheckFailed(Exception):
    """Compiled flex disagrees with the reference beyond tolerance."""


def one_line(exc: BaseException) -> str:
    """`Type: first line of message (its cause's first line)`, at most 300 characters."""

    def first(e: BaseException) -> str:
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")

    msg = first(exc)
    if exc.__cause__ is not None:  # dynamo wraps a user mod's error: keep what it said
        msg += f" ({first(exc.__cause__)})"
    return msg[:300]


def check_runtime(device: str, calculate_bwd: bool) -> None:
    """Refuse up front what cannot run here, with the fix."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available on this machine; use --device cpu")
    if device == "cpu" and calculate_bwd:
        raise RuntimeError(
            "flex attention backward needs CUDA (torch raises NotImplementedError on CPU); "
            "drop --calculate-bwd or run on a GPU"
        )


@contextmanager
def dynamo_settings(dynamic: bool, recompile_limit: int) -> Iterator[None]:
    """Dynamo settings for the duration of a sweep: a recompile limit that fails loudly."""
    cfg = torch._dynamo.config
    wanted = {
        "recompile_limit": recompile_limit,
        "accumulated_recompile_limit": max(recompile_limit, 256),
        "fail_on_recompile_limit_hit": True,
        "automatic_dynamic_shapes": dynamic,
    }
    # Backward is timed alone by replaying one graph (retain_graph=True), which compiled
    # backward refuses while it donates its saved buffers: turn donation off for the sweep.
    functorch_cfg = torch._functorch.config
    with (
        cfg.patch({k: v for k, v in wanted.items() if hasattr(cfg, k)}),
        functorch_cfg.patch(
            {"donated_buffer": False} if hasattr(functorch_cfg, "donated_buffer") else {}
        ),
    ):
        yield


def make_inputs(c: BenchConfig, requires_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v as [B,H,S,D] views of [B,S,H,D] storage (the seed's layout), seeded."""
    gen = torch.Generator(device=c.device).manual_seed(RNG_SEED)
    dtype = getattr(torch, c.dtype)

    def make(length: int, heads: int) -> Tensor:
        x = torch.randn(
            c.batch, length, heads, c.head_dim, generator=gen, device=c.device, dtype=dtype
        )
        return x.transpose(1, 2).requires_grad_(requires_grad)

    return make(c.q_len, c.heads), make(c.kv_len, c.kv_heads), make(c.kv_len, c.kv_heads)


def _expand_kv(t: Tensor, heads: int) -> Tensor:
    return t.repeat_interleave(heads // t.shape[1], dim=1) if t.shape[1] != heads else t


def dense_scores(
    q: Tensor, k: Tensor, built: mods.Built, scale: float, b: Tensor, chunked: bool = False
) -> Tensor:
    """transform(scale·QKᵀ) + bias, masked with -inf: the scores the softmax sees (a user
    transform `chunked` in query rows when asked, to bound its memory)."""
    s = (q @ _expand_kv(k, q.shape[1]).transpose(-2, -1)) * scale
    if built.transform is not None:
        transform = getattr(built.transform, "chunked", None) if chunked else None
        s = (transform or built.transform)(s, b)
    if built.bias is not None:
        s = s + built.bias.to(s.dtype)
    if built.mask is not None:
        s = s.masked_fill(~built.mask, float("-inf"))
    return s


def _softmax(s: Tensor) -> Tensor:
    wide = torch.float32 if s.dtype in (torch.float16, torch.bfloat16) else s.dtype
    return torch.softmax(s, dim=-1, dtype=wide)


def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, built: mods.Built, scale: float, b: Tensor
) -> Tensor:
    """softmax(transform(scale·QKᵀ) + bias, masked) V, materialised; fully masked rows give 0."""
    p = _softmax(dense_scores(q, k, built, scale, b)).nan_to_num(0.0).to(q.dtype)
    return p @ _expand_kv(v, q.shape[1])


def _finite_rows(s: Tensor, p: Tensor) -> int:
    """Fully masked rows (all scores -inf: their NaN softmax becomes 0); NaN or inf anywhere
    else fails, before nan_to_num could hide it."""
    blind = torch.isneginf(s).all(dim=-1)
    bad = (~torch.isfinite(p)).any(dim=-1) & ~blind
    if bad.any():
        raise CheckFailed(
            f"mod produces NaN: {int(bad.sum())} of {bad.numel()} query rows that are not "
            "fully masked hold NaN/inf scores or probabilities; not timed"
        )
    return int(blind.sum())


def _batch_item(built: mods.Built, i: int) -> mods.Built:
    """The mod's dense tensors at batch element i (a mask or bias may vary with b)."""

    def item(t: Tensor | None) -> Tensor | None:
        return t[i : i + 1] if t is not None and t.shape[0] > 1 else t

    return replace(built, mask=item(built.mask), bias=item(built.bias))


def reference(
    q: Tensor, k: Tensor, v: Tensor, built: mods.Built, scale: float, dout: Tensor | None
) -> tuple[Tensor, list[Tensor]]:
    """Output (and dQ, dK, dV when dout is given) in float64 on CPU, float32 on CUDA: the
    mod's own reference when it has one, else dense attention computed one batch element at
    a time (to bound memory at long sequences). CheckFailed when a mod makes NaN/inf outside
    fully masked rows, or masks every score."""
    ref = torch.float64 if q.device.type == "cpu" else torch.float32
    if built.reference is not None:
        return _user_reference(built.reference, (q, k, v), scale, dout, ref)
    outs, grads, blind = [], [[], [], []], 0
    for i in range(q.shape[0]):
        qi, ki, vi = (
            t[i : i + 1].detach().to(ref).requires_grad_(dout is not None) for t in (q, k, v)
        )
        b = torch.full((1, 1, 1, 1), i, device=q.device)
        s = dense_scores(qi, ki, _batch_item(built, i), scale, b, chunked=True)
        p = _softmax(s)
        blind += _finite_rows(s, p)
        out = p.nan_to_num(0.0).to(ref) @ _expand_kv(vi, q.shape[1])
        if dout is not None:
            out.backward(dout[i : i + 1].to(ref))
            for acc, t in zip(grads, (qi, ki, vi)):
                acc.append(t.grad)
        outs.append(out.detach())
    if blind == q.shape[0] * q.shape[1] * q.shape[2]:
        raise CheckFailed("the mod masks every score (every output row is 0); not timed")
    return torch.cat(outs), [torch.cat(g) for g in grads if g]


def _user_reference(
    fn: Callable, inputs: tuple[Tensor, ...], scale: float, dout: Tensor | None, ref: torch.dtype
) -> tuple[Tensor, list[Tensor]]:
    """The mod's own reference(q, k, v, scale) -> out [B,H,Q,D], and its dQ, dK, dV."""
    qkv = [t.detach().to(ref).requires_grad_(dout is not None) for t in inputs]
    with torch.set_grad_enabled(dout is not None):
        out = fn(*qkv, scale)
    if not isinstance(out, Tensor) or out.shape != inputs[0].shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise CheckFailed(f"the mod's reference returned {got}, not {tuple(inputs[0].shape)}")
    if not torch.isfinite(out).all():
        raise CheckFailed("the mod's reference produces NaN/inf; not timed")
    if dout is None:
        return out.detach().to(ref), []
    return out.detach().to(ref), list(torch.autograd.grad(out, qkv, dout.to(ref)))


def cross_check(
    q: Tensor, k: Tensor, v: Tensor, built: mods.Built, scale: float, expected: Tensor
) -> None:
    """Eager flex_attention (flex's own semantics) against the dense reference, one batch
    element at a time: a user mod whose dense form differs (e.g. marked additive but not)
    fails here."""
    if not built.cross_check or built.reference is not None:
        return
    outs = []
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    for i in range(q.shape[0]):
        qi, ki, vi = (t[i : i + 1].detach().to(expected.dtype) for t in (q, k, v))
        block_mask = None
        if built.mask_mod is not None:
            heads = built.mask.shape[1] if built.mask.shape[1] > 1 else None
            mask_mod = _from_batch(built.mask_mod, i)
            block_mask = create_block_mask(mask_mod, 1, heads, q.shape[2], k.shape[2], q.device)
        score_mod = _from_batch(built.score_mod, i, score=True)
        with warnings.catch_warnings():  # eager on purpose: flex's reference semantics
            warnings.simplefilter("ignore")
            outs.append(flex_attention(qi, ki, vi, score_mod, block_mask, scale, **gqa))
    err, failure = check([torch.cat(outs)], [expected], "float32")
    if failure:
        raise CheckFailed(
            f"mod is not representable densely: eager flex_attention differs from the dense "
            f"reference by {err:.3g}; give it a reference (fn.reference or --reference)"
        )


def _from_batch(fn: Callable | None, i: int, score: bool = False) -> Callable | None:
    """fn seeing batch index b + i (flex on batch element i alone counts b from 0)."""
    if fn is None or i == 0:
        return fn
    if score:
        return lambda s, b, h, q_idx, kv_idx: fn(s, b + i, h, q_idx, kv_idx)
    return lambda b, h, q_idx, kv_idx: fn(b + i, h, q_idx, kv_idx)


def max_abs_err(actual: Tensor, expected: Tensor) -> float:
    return (actual.detach().to(expected.dtype) - expected).abs().max().item()


def check(actual: list[Tensor], expected: list[Tensor], dtype: str) -> tuple[float, str | None]:
    """Largest error over output and grads, and why it fails the dtype's tolerance (or None)."""
    atol, rtol = TOLERANCE[dtype]
    worst, failure = 0.0, None
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        err, bound = max_abs_err(a, e), atol + rtol * e.abs().max().item()
        worst = max(worst, err) if not math.isnan(err) else math.inf
        if failure is None and not err <= bound:  # `not <=` also catches NaN
            failure = f"correctness check failed: {name} max_abs_err {err:.3g} > {bound:.3g}"
    return worst, failure or _zero_rows(actual[0], expected[0])


def _zero_rows(actual: Tensor, expected: Tensor) -> str | None:
    """Output rows all zero where the reference's are not: within tolerance when the
    reference is small (long rows, bfloat16), yet no attention output."""
    zero = (actual == 0).all(dim=-1) & (expected != 0).any(dim=-1)
    if not zero.any():
        return None
    return (
        f"correctness check failed: out is all zeros in {int(zero.sum())} of {zero.numel()} "
        "query rows where the reference is not"
    )


def sdpa_baseline(
    q: Tensor, k: Tensor, v: Tensor, built: mods.Built, scale: float
) -> Callable[[], Tensor]:
    """SDPA computing the same function as flex (the dense reference math for a mod SDPA
    cannot express)."""
    if built.transform is not None:
        b = torch.arange(q.shape[0], device=q.device).view(-1, 1, 1, 1)
        return lambda: dense_attention(q, k, v, built, scale, b)
    return baselines.sdpa_call(baselines.Case(q, k, v, built, scale))


def block_density(block_mask: BlockMask | None) -> float:
    """Fraction of score blocks flex computes (partial and full); 1.0 without a mask."""
    if block_mask is None:
        return 1.0
    computed = block_mask.kv_num_blocks.sum().item()
    if block_mask.full_kv_num_blocks is not None:
        computed += block_mask.full_kv_num_blocks.sum().item()
    # kv_num_blocks is [B, H, q_blocks]: one count of computed kv blocks per row of blocks.
    kv_blocks = math.ceil(block_mask.seq_lengths[1] / block_mask.BLOCK_SIZE[1])
    return computed / (block_mask.kv_num_blocks.numel() * kv_blocks)


class Bench:
    """Per-sweep state: compiled flex callables and BlockMasks, reused across configs; the
    config compiled ahead (`upcoming`: the sweep's next config, compiled on a thread while this
    one is timed, where `ahead.may_overlap`). `aot`: whether flex is aot-compiled (None:
    `ahead.uses_aot`, i.e. on CUDA)."""

    def __init__(self, aot: bool | None = None) -> None:
        self._compiled: dict[tuple, Callable] = {}
        self._masks: dict[tuple, BlockMask] = {}
        self._gpu: gpustate.Gpu | None | bool = False  # False: not opened yet
        self._warming: threading.Thread | None = None
        self._warm_error: BaseException | None = None
        self.aot = aot
        self.upcoming: BenchConfig | None = None
        self._ahead: dict[str, ahead.Ahead] = {}
        self.gate: Callable[[], None] | None = None  # pass_gate calls it once

    def pass_gate(self) -> None:
        """Before the sweep's first check: wait at its gate (the measuring process's `go`:
        its sweep run exists), once; what the gate raises stops the sweep."""
        gate, self.gate = self.gate, None
        if gate is not None:
            gate()

    def uses_aot(self, c: BenchConfig) -> bool:
        """Config `c`'s flex is aot-compiled (`ahead.AotFlex`)."""
        return ahead.uses_aot(c, self.aot)

    def overlaps(self, c: BenchConfig, nxt: BenchConfig) -> bool:
        """`nxt` may compile on a thread while `c` is timed (`ahead.may_overlap`)."""
        return self.uses_aot(c) and self.uses_aot(nxt) and ahead.may_overlap(c)

    def start_next(self, c: BenchConfig, flex: Callable) -> None:
        """Before `c` is timed: prepare `upcoming` (its inputs and BlockMask, on the GPU, now)
        and compile its flex on a thread, when that cannot disturb `c`'s timing."""
        nxt, self.upcoming = self.upcoming, None
        if nxt is None or not isinstance(flex, ahead.AotFlex) or not self.overlaps(c, nxt):
            return
        try:
            setup = prepare(nxt, self, Result(nxt))
        except (Exception, torch.OutOfMemoryError):  # noqa: BLE001 - it fails in its turn
            return
        self._ahead[nxt.config_key()] = ahead.start(setup)
        timing.GUARD.on()

    def take_ahead(self, c: BenchConfig, result: Result) -> Setup | None:
        """Config `c`'s setup if it was compiled ahead (waiting for its thread); None if it
        was not, or if its compile raised (then it compiles in line)."""
        pending = self._ahead.pop(c.config_key(), None)
        if pending is None:
            return None
        pending.thread.join()
        timing.GUARD.off()
        if pending.error is not None:
            return None
        result.metrics["sparsity"] = 1.0 - pending.setup.density
        return pending.setup

    def drop_ahead(self) -> None:
        """Forget configs compiled ahead (a stopped sweep); their threads end on their own."""
        self._ahead.clear()
        timing.GUARD.off()

    def warm_up(self, warm: Callable[[], None] | None) -> None:
        """Run `warm` (timing.warm_gpu) on a thread while the first config is prepared and
        compiled; `settle` waits for it before anything that needs the GPU to itself."""
        if warm is None:
            return

        def body() -> None:
            try:
                warm()
            except BaseException as exc:  # noqa: BLE001 - raised again by settle
                self._warm_error = exc

        self._warming = threading.Thread(target=body, name="flexbench-gpu-warm-up", daemon=True)
        self._warming.start()

    def settle(self) -> None:
        """Wait for the GPU warm-up (if one runs): peak memory, the kernels profiler and the
        timers must see this config's work alone. A warm-up error is raised here, once."""
        if self._warming is None:
            return
        self._warming.join()
        self._warming, error, self._warm_error = None, self._warm_error, None
        if error is not None:
            raise error

    def timing_settings(self, c: BenchConfig) -> timing.Settings:
        """The config's regime and stopping rule, with this process's GPU (None on CPU or
        without NVML: GPU state is then absent)."""
        if c.device == "cuda" and self._gpu is False:
            self._gpu = gpustate.open_gpu(env.nvml_index())
        gpu = self._gpu if c.device == "cuda" and self._gpu is not False else None
        return c.timing_settings(gpu)

    def compiled(self, c: BenchConfig) -> Callable:
        """One torch.compile(flex_attention) per (dynamic, max_autotune, kernel options)."""
        key = (c.dynamic, c.max_autotune, c.kernel_options, c.flex_backend)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(
                flex_attention,
                dynamic=c.dynamic,
                mode=COMPILE_MODES[c.max_autotune],
                fullgraph=True,  # a graph break would silently time unfused eager flex
            )
        return self._compiled[key]

    def block_mask(self, c: BenchConfig, built: mods.Built) -> BlockMask | None:
        """BlockMask for the mod's mask_mod, built once per (mod, lengths, device); per batch
        element and head only when the mask varies with them."""
        if built.mask_mod is None:
            return None
        sizes = [n if n > 1 else None for n in built.mask.shape[:2]]
        key = (c.mod_name, c.mod_sha, c.align, *sizes, c.q_len, c.kv_len, c.device)
        if key not in self._masks:
            self._masks[key] = create_block_mask(
                built.mask_mod, *sizes, c.q_len, c.kv_len, device=c.device
            )
        return self._masks[key]

    def run(self, c: BenchConfig, body: Callable[..., None] | None = None) -> Result:
        """Measure one config (or run another `body(c, bench, result)`, e.g. `compile_only`);
        any exception becomes a failed Result with a one-line reason."""
        result = Result(c)
        try:
            (body or measure)(c, self, result)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            result.error = (
                f"recompile limit ({torch._dynamo.config.recompile_limit}) hit: torch.compile "
                "would fall back to uncompiled flex, so not timed; raise recompile_limit"
            )
        except (Exception, torch.OutOfMemoryError) as exc:  # noqa: BLE001 - isolate configs
            result.error = one_line(exc)
        finally:
            if c.device == "cuda":
                torch.cuda.empty_cache()
        return result


@dataclass
class Setup:
    """What a config's flex calls run on: mod, inputs, the bound flex call (BlockMask), dout."""

    built: mods.Built
    inputs: tuple[Tensor, Tensor, Tensor]
    scale: float
    flex: Callable[[], Tensor]
    dout: Tensor | None
    density: float


def prepare(c: BenchConfig, bench: Bench, result: Result) -> Setup:
    """Build config `c`'s mod, BlockMask, seeded inputs and flex call (records sparsity); compile
    workers run exactly this, so they compile the graph measured here. A flex backend off CUDA
    fails here, before any compile."""
    if c.flex_backend != "auto" and c.device != "cuda":
        raise RuntimeError(
            f"flex backend {c.flex_backend} needs CUDA: on {c.device} flex compiles to its C++ "
            "kernel whatever BACKEND says; use --flex-backend auto"
        )
    built = mods.resolve(c.score_mod).build(c.dims(), c.reference)
    block_mask = bench.block_mask(c, built)
    q, k, v = make_inputs(c, requires_grad=c.calculate_bwd)
    scale = 1.0 / math.sqrt(c.head_dim)
    kwargs = flex_kwargs(c, built, block_mask, scale)
    if bench.uses_aot(c):
        flex = ahead.AotFlex((q, k, v), kwargs)
    else:
        flex = _flex_call(bench.compiled(c), (q, k, v), kwargs)
    density = block_density(block_mask)
    result.metrics["sparsity"] = 1.0 - density
    torch.manual_seed(RNG_SEED)
    dout = torch.randn_like(q) if c.calculate_bwd else None
    return Setup(built, (q, k, v), scale, flex, dout, density)


def compile_only(c: BenchConfig, bench: Bench, result: Result) -> None:
    """The first (compiling) forward and backward calls of `measure`, nothing timed or checked:
    what a compile worker runs to fill the inductor/triton caches for the measuring process."""
    s = prepare(c, bench, result)
    _, result.metrics["compile_s"] = _first_calls(s.flex, s.dout, c, s.inputs)


def measure(c: BenchConfig, bench: Bench, result: Result) -> None:
    """Fill `result` for config `c` (raises on failure; Bench.run isolates it)."""
    lap = Laps(result.phases)
    s = bench.take_ahead(c, result)
    lap("wait")
    s = s or prepare(c, bench, result)
    (q, k, v), built, scale, flex, dout = s.inputs, s.built, s.scale, s.flex, s.dout
    m = result.metrics
    lap("check")
    compiled_ahead = flex.compile_s if isinstance(flex, ahead.AotFlex) and flex.fn else 0.0
    outs, first_s = _first_calls(flex, dout, c, (q, k, v))
    m["compile_s"] = compiled_ahead + first_s  # on the thread, if ahead, and the first call
    lap("compile")
    bench.pass_gate()
    lap("wait")
    expected_out, expected_grads = reference(q, k, v, built, scale, dout)
    cross_check(q, k, v, built, scale, expected_out)
    expected = [expected_out, *expected_grads]
    case = baselines.Case(q, k, v, built, scale)
    ready = checked_baselines(c, case, dout, expected, result)
    m["max_abs_err"], failure = check(outs, expected, c.dtype)
    m["fwd_max_abs_err"] = max_abs_err(outs[0], expected_out)
    if c.calculate_bwd:
        m["bwd_max_abs_err"] = max(max_abs_err(a, e) for a, e in zip(outs[1:], expected[1:]))
    if failure:
        raise CheckFailed(f"{failure} ({c.dtype}); not timed")
    lap("check")
    bench.settle()  # the GPU warm-up overlapped this config's compile and check
    lap("warm_up")
    if c.device == "cuda":
        del outs, expected, expected_out, expected_grads  # not part of flex's footprint
        m["peak_mem_mb"] = _peak_mem_mb(flex, dout, (q, k, v))
    record_kernels(c, {"flex": flex, **ready}, dout, (q, k, v), result.tags)
    series = {FLEX: flex, **ready}
    fwd_flops = flops.attention_flops(c.batch, c.heads, c.q_len, c.kv_len, c.head_dim, s.density)
    bench.start_next(c, flex)  # the next config compiles while this one is timed
    lap("check")
    settings = bench.timing_settings(c)
    sampler = timing.sampler_for(c.timer, "fwd")
    with torch.set_grad_enabled(c.calculate_bwd), timing.side_stream(sampler):
        _record("fwd", m, timing.time_all(sampler, series, settings), fwd_flops)
    if c.calculate_bwd:
        times = _time_backward(c.timer, series, dout, (q, k, v), settings)
        _record("bwd", m, times, flops.backward_flops(fwd_flops))
    lap("timing")
    if c.q_len == 1:
        nbytes = flops.kv_bytes(c.batch, c.kv_heads, c.kv_len, c.head_dim, q.element_size())
        for name in (FLEX, *ready, *((PRIMARY,) if ready else ())):
            m[f"fwd_{name}_tbps"] = flops.tbps(nbytes, m[f"fwd_{name}_us"])


def checked_baselines(
    c: BenchConfig,
    case: baselines.Case,
    dout: Tensor | None,
    expected: list[Tensor],
    result: Result,
) -> dict[str, Callable[[], Tensor]]:
    """Every named baseline that can run this config, checked against the reference (its
    `<name>_max_abs_err`), in the order named; the first also fills `baseline_max_abs_err` and
    the `baseline` param. One that cannot run is tagged skipped with the reason, one over the
    dtype's tolerance is kept (its timing still means something) but tagged inexact."""
    ready, skipped, inexact = {}, [], []
    for b in baselines.named(c.baselines):
        fn, outs, reason = _try_baseline(b, case, dout, c.device)
        if reason is not None:
            skipped.append(f"{b.name}: {reason}")
            continue
        err, failure = check(outs, expected, c.dtype)
        result.metrics[f"{b.name}_max_abs_err"] = err
        if failure:
            approx = b.approximation(case.built, c.dtype)
            inexact.append(f"{b.name}: approximate ({approx}), {failure.split(': ', 1)[-1]}")
        if not ready:
            result.metrics["baseline_max_abs_err"] = err
            result.baseline = b.form(case.built)
        ready[b.name] = fn
    if skipped:
        result.tags[BASELINE_SKIPPED_TAG] = "; ".join(skipped)[: kernels.TAG_CHARS]
    if inexact:
        result.tags[INEXACT_TAG] = "; ".join(inexact)[: kernels.TAG_CHARS]
    return ready


def _try_baseline(
    b: baselines.Baseline, case: baselines.Case, dout: Tensor | None, device: str
) -> tuple[Callable[[], Tensor] | None, list[Tensor], str | None]:
    """Build and first-call a baseline (output, and dQ/dK/dV with dout): (callable, outputs,
    None), or (None, [], why it cannot run here: its static reason, or the error its first
    call raised with the warnings that explain it, e.g. SDPA's 'why not this kernel')."""
    reason = b.skip_reason(case.built, device)
    if reason is not None:
        return None, [], reason
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn = b.build(case)
            return fn, _outputs(fn, dout, (case.q, case.k, case.v)), None
        except (Exception, torch.OutOfMemoryError) as exc:  # noqa: BLE001 - skip, go on
            why = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message)]
            detail = f" ({' | '.join(dict.fromkeys(why))})" if why else ""
            return None, [], (one_line(exc) + detail)[:300]
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()


def _outputs(
    fn: Callable[[], Tensor], dout: Tensor | None, inputs: Sequence[Tensor]
) -> list[Tensor]:
    """The output (and, with dout, dQ, dK, dV) of one call, detached."""
    if dout is None:
        with torch.no_grad():
            return [fn()]
    out = fn()
    grads = torch.autograd.grad(out, inputs, dout)
    return [out.detach(), *grads]


def record_kernels(
    c: BenchConfig,
    sides: dict[str, Callable[[], Tensor]],
    dout: Tensor | None,
    inputs: Sequence[Tensor],
    tags: dict[str, str],
) -> None:
    """Tag the kernels each side ran (one call: forward, and backward with dout), outside any
    timed region; a flex backend that did not run its own kernels fails the config."""
    for name, fn in sides.items():
        call = fn if dout is None else lambda fn=fn: torch.autograd.grad(fn(), inputs, dout)
        with torch.set_grad_enabled(dout is not None):
            tags[KERNELS_TAG.format(name)] = kernels.tag_value(kernels.profile(call, c.device))
    want = BACKEND_FAMILY.get(c.backend)
    ran = kernels.family(tags[KERNELS_TAG.format("flex")])
    if want and ran != want:
        raise RuntimeError(
            f"flex backend {c.backend} requested but flex ran {ran or 'no'} kernels "
            f"({tags[KERNELS_TAG.format('flex')][:120]}): not timed"
        )


def flex_kwargs(
    c: BenchConfig, built: mods.Built, block_mask: BlockMask | None, scale: float
) -> dict:
    """flex_attention's keyword arguments for config `c` (mod, BlockMask, scale, GQA, kernel
    options and backend)."""
    kwargs = {"score_mod": built.score_mod, "block_mask": block_mask, "scale": scale}
    if c.kv_heads != c.heads:
        kwargs["enable_gqa"] = True
    options = c.kernel_options_dict
    if c.flex_backend != "auto":
        options["BACKEND"] = c.flex_backend.upper()
    if options:
        kwargs["kernel_options"] = options
    return kwargs


def _flex_call(
    compiled: Callable, inputs: tuple[Tensor, Tensor, Tensor], kwargs: dict
) -> Callable[[], Tensor]:
    return lambda: compiled(*inputs, **kwargs)


def _first_calls(
    flex: Callable[[], Tensor], dout: Tensor | None, c: BenchConfig, inputs: tuple[Tensor, ...]
) -> tuple[list[Tensor], float]:
    """First (compiling) calls, timed: the forward output, and dQ/dK/dV when dout is given
    (then the forward runs with autograd, the graph the timed forward uses too)."""
    if dout is None:
        with torch.no_grad():
            out, seconds = timing.timed_call(flex, c.device)
        return [out], seconds
    out, fwd_s = timing.timed_call(flex, c.device)
    _, bwd_s = timing.timed_call(lambda: out.backward(dout), c.device)
    grads = [t.grad.detach().clone() for t in inputs]
    for t in inputs:
        t.grad = None
    return [out.detach(), *grads], fwd_s + bwd_s


def _peak_mem_mb(
    flex: Callable[[], Tensor], dout: Tensor | None, inputs: tuple[Tensor, ...]
) -> float:
    """Peak CUDA memory of one flex forward (+ backward) with its inputs (and dout), not the
    harness's other tensors; outside any timed region."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    resident = sum(t.untyped_storage().nbytes() for t in (*inputs, dout) if t is not None)
    torch.cuda.reset_peak_memory_stats()
    if dout is None:
        with torch.no_grad():
            flex()
    else:
        flex().backward(dout)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before + resident) / 2**20


def _backwards(
    series: dict[str, Callable[[], Tensor]], dout: Tensor, inputs: Sequence[Tensor]
) -> dict[str, Callable[[], object]]:
    """Backward alone: each forward graph is built once and kept (retain_graph); dQ, dK, dV
    are returned, not accumulated into .grad, so a call is the backward kernels only (and a
    CUDA graph can replay it)."""
    outs = {name: fn() for name, fn in series.items()}
    return {
        name: lambda out=out: torch.autograd.grad(out, inputs, dout, retain_graph=True)
        for name, out in outs.items()
    }


def _backward_pair(
    eager: Callable[[], Tensor], flex: Callable[[], Tensor], dout: Tensor, inputs: Sequence[Tensor]
) -> tuple[Callable[[], object], Callable[[], object]]:
    """`_backwards` of a baseline and flex, as a pair."""
    both = _backwards({"eager": eager, "flex": flex}, dout, inputs)
    return both["eager"], both["flex"]


def _time_backward(
    timer: str,
    series: dict[str, Callable[[], Tensor]],
    dout: Tensor,
    inputs: Sequence[Tensor],
    settings: timing.Settings | None = None,
) -> dict[str, timing.Timing]:
    """Time the backwards (their forwards run on the stream the timer captures on); a
    backward that a CUDA graph cannot capture fails with what to do instead."""
    sampler = timing.sampler_for(timer, "bwd")
    try:
        with timing.side_stream(sampler):
            return timing.time_all(sampler, _backwards(series, dout, inputs), settings)
    except RuntimeError as exc:
        if not timers.TIMERS[timer].graph_bwd:
            raise
        raise RuntimeError(
            f"backward could not be timed in a CUDA graph ({one_line(exc)}); "
            "rerun with --timer cudagraph_fwd (backward with do_bench)"
        ) from None


def _record(kind: str, m: dict[str, float], times: dict[str, timing.Timing], work: float) -> None:
    """Per series its timing metrics (`<kind>_<name>_us`, spread, samples, GPU state), TFLOP/s
    and `<kind>_speedup_<name>`; the first baseline again under the seed's names
    (`<kind>_eager_us`, `<kind>_speedup`)."""
    flex = times[FLEX]
    named = [name for name in times if name != FLEX]
    if named:
        times = {**times, PRIMARY: times[named[0]]}
    for name, t in times.items():
        m.update(t.metrics(f"{kind}_{name}"))
        m[f"{kind}_{name}_tflops"] = flops.tflops(work, t.median_us)
    for name in named:
        m[f"{kind}_speedup_{name}"] = flops.speedup(times[name].median_us, flex.median_us)
    if named:
        m[f"{kind}_speedup"] = m[f"{kind}_speedup_{named[0]}"]
