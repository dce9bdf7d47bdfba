"""Probe (issue 13): can the measuring process compile config i+1 while config i is timed?

torch.compile(fn).aot_compile(example_inputs) compiles forward and backward from fake tensors
without running them. For each config this reports the normal first (compiling) call's time,
aot_compile's time, the kernels aot_compile launched (torch.profiler), the aot-compiled
function's outputs and grads against the normally compiled one's, and then times one config
with flexbench's timer alone and while a thread aot-compiles the other configs (medians,
timing wall time). Run it twice on one cache (cold, then warm): `python
benchmarks/aot_probe_gpu.py OUT.json`.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import torch

from flexbench import measure, timing
from flexbench.config import BenchConfig

MODS = ("noop", "causal", "rel", "head_bias")


def configs(s: int = 1024, d: int = 64) -> list[BenchConfig]:
    return [
        BenchConfig(
            score_mod=m,
            batch=8,
            heads=16,
            q_len=s,
            kv_len=s,
            head_dim=d,
            dtype="bfloat16",
            device="cuda",
            calculate_bwd=True,
        )
        for m in MODS
    ]


def call_args(c: BenchConfig, bench: measure.Bench):
    r = measure.Result(c)
    s = measure.prepare(c, bench, r)
    kwargs = measure.flex_kwargs(c, s.built, bench.block_mask(c, s.built), s.scale)
    return s, kwargs


def kernels_during(fn) -> tuple[object, float, int]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    n = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return out, seconds, n


def aot(c, bench, s, kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    fn = torch.compile(flex_attention, fullgraph=True)
    return fn.aot_compile((tuple(s.inputs), kwargs))


def probe_config(c, bench) -> dict:
    row = {"config": c.run_name()}
    s, kwargs = call_args(c, bench)
    q, k, v = s.inputs

    def first(fn) -> tuple[list, float]:  # fwd + bwd: output and dQ/dK/dV, seconds
        return measure._first_calls(lambda: fn(q, k, v, **kwargs), s.dout, c, s.inputs)

    ref, row["normal_first_s"] = first(bench.compiled(c))  # the normal compiled first call
    try:
        fn, row["aot_compile_s"], row["aot_kernels"] = kernels_during(
            lambda: aot(c, bench, s, kwargs)
        )
        got, row["aot_first_s"] = first(fn)
        row["aot_max_diff"] = max(
            (a.float() - b.float()).abs().max().item() for a, b in zip(got, ref)
        )
        _, row["aot_second_s"] = first(fn)
    except Exception as exc:  # noqa: BLE001
        row["aot_error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
    return row


def time_config(c, bench, settings, background=None) -> dict:
    s, kwargs = call_args(c, bench)
    compiled = bench.compiled(c)
    q, k, v = s.inputs
    flex = lambda: compiled(q, k, v, **kwargs)  # noqa: E731
    sdpa = measure.sdpa_baseline(q, k, v, s.built, s.scale)
    flex().backward(s.dout)
    thread = None
    if background is not None:
        thread = threading.Thread(target=background)
        thread.start()
    t = time.perf_counter()
    sampler = timing.sampler_for("cudagraph", "fwd")
    with torch.set_grad_enabled(True), timing.side_stream(sampler):
        fwd = timing.time_all(sampler, {"flex": flex, "sdpa": sdpa}, settings)
    bwd = measure._time_backward(
        "cudagraph", {"flex": flex, "sdpa": sdpa}, s.dout, (q, k, v), settings
    )
    wall = time.perf_counter() - t
    if thread is not None:
        thread.join()
    return {
        "wall_s": wall,
        **{f"fwd_{n}_us": t.median_us for n, t in fwd.items()},
        **{f"bwd_{n}_us": t.median_us for n, t in bwd.items()},
        **{f"fwd_{n}_samples": t.samples for n, t in fwd.items()},
        **{f"bwd_{n}_samples": t.samples for n, t in bwd.items()},
    }


def main(out_path: str) -> None:
    torch._dynamo.config.enable_aot_compile = True
    report = {
        "torch": torch.__version__,
        "has_aot_compile": hasattr(torch.compile(lambda x: x), "aot_compile"),
    }
    bench = measure.Bench()
    timing.warm_gpu()
    with measure.dynamo_settings(False, 64):
        report["configs"] = [probe_config(c, bench) for c in configs()]
        print(json.dumps(report, indent=1), flush=True)
        settings = bench.timing_settings(configs(4096, 128)[0])
        target = configs(4096, 128)[1]
        others = configs(4096, 64)
        prepared = [call_args(c, bench) for c in others]  # inputs made before timing

        def compile_others():
            t = time.perf_counter()
            errors = []
            for c, (s, kw) in zip(others, prepared):
                try:
                    aot(c, bench, s, kw)
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            report.setdefault("background", []).append(
                {"s": time.perf_counter() - t, "errors": errors}
            )

        runs = []
        for label in ("alone", "overlap", "alone", "overlap"):
            bg = compile_others if label == "overlap" else None
            try:
                runs.append({"label": label, **time_config(target, bench, settings, bg)})
            except Exception as exc:  # noqa: BLE001
                runs.append({"label": label, "error": f"{type(exc).__name__}: {exc}"[:400]})
            print(json.dumps(runs[-1]), flush=True)
        report["timing"] = runs
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
