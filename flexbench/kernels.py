"""Which kernels ran: one short torch.profiler pass per side, outside any timed region.

On CUDA a side's kernels are the device activities the profiler saw (kernel names shortened:
no `void `, template arguments or parameter lists); on CPU, where no kernel is visible, the
operators that did work (views and allocations left out) and inductor's compiled graphs.
`family` names the kind of attention kernel from those names (cudnn, flash, efficient, triton,
inductor, math) and needs no torch, so reports can call it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable

NAME_CHARS = 80  # one kernel name at most
TAG_CHARS = 1000  # one tag value at most (MLflow allows 8000)
SEPARATOR = "; "
# Kineto prints two `USDT ... profiler_start/stop` lines on stderr per pass (tearing the
# progress bar) below this log level; read when it first starts.
QUIET_ENV, QUIET_LEVEL = "KINETO_LOG_LEVEL", "6"
# CPU operators that only allocate, view or move metadata: not the work.
CPU_BOOKKEEPING = re.compile(
    r"aten::(empty\w*|as_strided|transpose|view\w*|reshape|_reshape_alias|expand\w*|"
    r"resolve_\w+|_unsafe_view|t|detach\w*|alias|lift_fresh|unsqueeze|squeeze|select|slice|"
    r"permute|contiguous|clone|to|_to_copy|copy_|zero_|fill_|zeros\w*|ones\w*|scalar_tensor|"
    r"result_type|item|_local_scalar_dense|set_|requires_grad_|unbind|split)$"
)
PROFILER_INTERNALS = re.compile(
    r"^(TorchDynamo Cache Lookup|Pregraph bytecode|AOTDispatcher.*|Torch-Compiled Region.*|"
    r"autograd::engine::.*|Memcpy.*|Memset.*|cuda\w+|Activity Buffer Request|"
    r"Lazy Function Loading|Command Buffer Full)$"
)
COMPILED_GRAPH = re.compile(r"## Call CompiledFxGraph \w+ ##")
# (family, pattern on a lower-cased name), first match wins: the attention kernel families
# before the generic ones (a flash kernel may also run a gemm).
FAMILIES = (
    ("cudnn", re.compile(r"cudnn")),
    ("flash", re.compile(r"flash")),
    ("efficient", re.compile(r"fmha|mem_eff|efficient_attention|attentionkernel")),
    ("triton", re.compile(r"^triton_tem")),
    ("inductor", re.compile(r"^triton_|compiledfxgraph|^cpp_fused")),
)


def short(name: str) -> str:
    """A kernel name without `void `, namespaces' template arguments or parameters."""
    name = COMPILED_GRAPH.sub("CompiledFxGraph", name.strip())
    name = re.sub(r"<.*>", "", name)  # template arguments first: they may hold parentheses
    return name.removeprefix("void ").split("(", 1)[0][:NAME_CHARS]


def wanted(name: str, on_cuda: bool) -> bool:
    """Whether a profiler event is work worth listing."""
    if PROFILER_INTERNALS.match(name):
        return False
    return on_cuda or not CPU_BOOKKEEPING.match(name)


def names_of(events: Iterable[tuple[str, bool]], cuda: bool) -> list[str]:
    """Distinct short names, in the order they first ran, of (name, on_device) events: the
    device's kernels on CUDA, the CPU's operators otherwise."""
    out: dict[str, None] = {}
    for name, on_device in events:
        if on_device == cuda and wanted(name, cuda):
            out.setdefault(short(name))
    return list(out)


def profile(fn: Callable[[], object], device: str) -> list[str]:
    """The kernels (CUDA) or operators (CPU) one call of `fn` ran."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    os.environ.setdefault(QUIET_ENV, QUIET_LEVEL)  # before kineto starts: no USDT lines
    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    if cuda:
        torch.cuda.synchronize()
    with torch_profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    device_type = torch.autograd.DeviceType.CUDA
    return names_of(((e.name, e.device_type == device_type) for e in prof.events()), cuda)


def tag_value(names: Iterable[str]) -> str:
    """Names joined for a tag, cut to TAG_CHARS with how many were left out."""
    names = list(names)
    text = SEPARATOR.join(names)
    if len(text) <= TAG_CHARS:
        return text
    kept = text[:TAG_CHARS].rsplit(SEPARATOR, 1)[0]
    return f"{kept}{SEPARATOR}(+{len(names) - kept.count(SEPARATOR) - 1} more)"


def family(names: str | Iterable[str]) -> str:
    """The kernel family of a side: cudnn, flash, efficient, triton (a fused attention
    template), inductor (generated kernels), math (library matmuls and softmax); '' if none."""
    items = names.split(SEPARATOR) if isinstance(names, str) else list(names)
    lowered = [n.lower() for n in items if n]
    if not lowered:
        return ""
    for name, pattern in FAMILIES:
        if any(pattern.search(n) for n in lowered):
            return name
    return "math"
