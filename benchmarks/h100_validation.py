"""H100 validation of the harness (issue 7): one run, same card, side by side.

1. sweep speed: `flexbench` (MLflow logging included) vs the seed's method (a new
   torch.compile per config, public API) on the same 16 configs;
2. fidelity: flexbench medians vs torch.profiler kernel time per call (L2 flushed as do_bench
   does), default timer and CUDA-graph timer;
3. repeatability: the same 4 configs in 5 separate sweeps, CV of each reported median;
4. tracking overhead: time inside MLflow calls / sweep wall time;
5. headline table: the 16 configs' speedups and TFLOP/s, with the SDPA kernel that ran.

Usage (GPU machine):  python benchmarks/h100_validation.py --out DIR [--parts speed,fidelity,...]
Writes DIR/validation.json; `--markdown` renders that JSON as the BENCHMARKS.md tables.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

PARTS = ("speed", "fidelity", "repeat")
HEADLINE = dict(
    batch=[8],
    heads=[16],
    seq_lens=[1024, 4096],
    head_dims=[64, 128],
    score_mods=["noop", "causal", "rel", "head_bias"],
    dtypes=["bfloat16"],
)
FIDELITY_SHAPES = [(2, 16, 512, 64), (8, 16, 1024, 64)]
REPEAT_SWEEPS = 5
PROFILE_CALLS = 20
L2_FLUSH_BYTES = 256 * 2**20


# --- the seed's method, ported to the public API -------------------------------------------


def seed_method(configs) -> float:
    """Wall time of the seed's loop: a new torch.compile per config, unmasked SDPA baseline."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention
    from triton.testing import do_bench

    def bench_us(fn, *args, **kwargs):
        for _ in range(5):
            fn(*args, **kwargs)
        return do_bench(lambda: fn(*args, **kwargs)) * 1e3

    mods = {
        "noop": lambda score, b, h, m, n: score,
        "causal": lambda score, b, h, m, n: torch.where(m >= n, score, float("-inf")),
        "rel": lambda score, b, h, m, n: score + (m - n),
        "head_bias": lambda score, b, h, m, n: score + 2 * h,
    }
    start = time.perf_counter()
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=1000):
        for c in configs:
            shape = (c.batch, c.q_len, c.heads * c.head_dim)
            q, k, v = (
                torch.rand(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                .view(c.batch, c.q_len, c.heads, c.head_dim)
                .transpose(1, 2)
                for _ in range(3)
            )
            compiled = torch.compile(flex_attention)
            mod = mods[c.score_mod]
            bench_us(F.scaled_dot_product_attention, q, k, v)
            bench_us(compiled, q, k, v, mod)
            out_e = F.scaled_dot_product_attention(q, k, v)
            d_out = torch.randn_like(out_e)
            bench_us(out_e.backward, d_out, retain_graph=True)
            out_c = compiled(q, k, v, mod)
            bench_us(out_c.backward, d_out, retain_graph=True)
    torch.cuda.synchronize()
    return time.perf_counter() - start


# --- kernel time with torch.profiler --------------------------------------------------------


def kernel_us(fn, calls: int = PROFILE_CALLS) -> tuple[float, str]:
    """Mean CUDA kernel time per call (L2 flushed before each, flush excluded), top kernel."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cache = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as flush_prof:
        cache.zero_()
        torch.cuda.synchronize()
    flush = {e.name for e in flush_prof.events() if e.device_type.name == "CUDA"}
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            cache.zero_()
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA" and e.name not in flush:
            totals[e.name] = totals.get(e.name, 0.0) + e.self_device_time_total
    top = max(totals, key=totals.get) if totals else ""
    return sum(totals.values()) / calls, top


def callables(c):
    """The exact baseline and flex callables flexbench times for config c (+ grads, dout)."""
    import torch

    from flexbench import measure, mods

    bench = measure.Bench()
    built = mods.resolve(c.score_mod).build(mods.Dims(c.heads, c.q_len, c.kv_len, c.device))
    q, k, v = measure.make_inputs(c, requires_grad=c.calculate_bwd)
    scale = 1.0 / math.sqrt(c.head_dim)
    block_mask = bench.block_mask(c, built)
    flex = measure._flex_call(bench.compiled(c), q, k, v, built, block_mask, scale, c)
    eager = measure.sdpa_baseline(q, k, v, built, scale)
    dout = torch.randn_like(q)
    return eager, flex, dout


def fidelity(configs_for, mods=("noop", "causal")) -> list[dict]:
    """flexbench's medians (both timers) against profiler kernel time, fwd (and bwd)."""
    import torch

    from flexbench import measure

    rows = []
    for b, h, s, d in FIDELITY_SHAPES:
        for mod in mods:
            base = configs_for(b, h, s, d, mod)
            row = {"config": base.run_name()}
            print(f"fidelity: {row['config']}", flush=True)
            for timer in ("do_bench", "cudagraph"):
                c = measure.BenchConfig(**{**base.identity(), "timer": timer})
                r = measure.run_sweep([c], progress=False)[0]
                if r.error:
                    row[f"{timer}_error"] = r.error
                    continue
                for k in ("fwd_eager_us", "fwd_compiled_us", "bwd_eager_us", "bwd_compiled_us"):
                    row[f"{timer}.{k}"] = r.metrics.get(k)
            with measure.dynamo_settings(False, 64):
                eager, flex, dout = callables(base)
                with torch.no_grad():
                    row["kernel.fwd_eager_us"], row["sdpa_fwd_kernel"] = kernel_us(eager)
                    row["kernel.fwd_compiled_us"], _ = kernel_us(flex)
                print(json.dumps(row), flush=True)
                if not base.calculate_bwd:
                    rows.append(row)
                    continue
                bwd_eager, bwd_flex = measure._backward_pair(eager, flex, dout)
                row["kernel.bwd_eager_us"], _ = kernel_us(bwd_eager)
                row["kernel.bwd_compiled_us"], _ = kernel_us(bwd_flex)
            rows.append(row)
    return rows


def repeatability(configs_for) -> dict:
    """The 4 fidelity configs in REPEAT_SWEEPS separate sweeps: CV of each median."""
    from flexbench import flops, measure

    configs = [
        configs_for(b, h, s, d, m) for b, h, s, d in FIDELITY_SHAPES for m in ("noop", "causal")
    ]
    runs = [measure.run_sweep(configs, progress=False) for _ in range(REPEAT_SWEEPS)]
    out = {}
    for i, c in enumerate(configs):
        for key in ("fwd_eager_us", "fwd_compiled_us", "bwd_eager_us", "bwd_compiled_us"):
            values = [run[i].metrics[key] for run in runs if key in run[i].metrics]
            if len(values) == REPEAT_SWEEPS:
                out[f"{c.run_name()} {key}"] = {"values": values, "cv": flops.cv(values)}
    return out


def speed(out_dir: Path) -> dict:
    """flexbench (tracked to SQLite) vs the seed's method on the 16 headline configs."""
    from flexbench import config, report, sweep

    configs = config.expand_sweep(**HEADLINE, calculate_bwd=True, device="cuda")
    seed_s = seed_method(configs)
    outcome = sweep.run_sweep(
        configs,
        tracking_uri=f"sqlite:///{out_dir}/validation.db",
        journal=str(out_dir / "validation.jsonl"),
        progress=False,
        run_name="h100-validation",
    )
    rows = [report.row_from_record(r) for r in outcome.records]
    return {
        "seed_s": seed_s,
        "flexbench_s": outcome.wall_s,
        "tracking_s": outcome.tracking_s,
        "tracking_background_s": outcome.background_s,
        "ratio": outcome.wall_s / seed_s,
        "failed": outcome.failed,
        "tables": report.seed_tables(rows),
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--fidelity-mods", default="noop,causal")
    ap.add_argument("--no-bwd", action="store_true", help="fidelity/repeat: forward only")
    ap.add_argument("--timer", default="auto", help="repeat: timer of the configs")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch
    import triton

    from flexbench import config, env

    def configs_for(b, h, s, d, mod):
        return config.BenchConfig(
            batch=b,
            heads=h,
            q_len=s,
            head_dim=d,
            score_mod=mod,
            dtype="bfloat16",
            calculate_bwd=not args.no_bwd,
            device="cuda",
            timer=args.timer,
        )

    result = {
        "env": env.capture("cuda"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    parts = args.parts.split(",")
    path = args.out / "validation.json"
    for part, fn in (
        ("speed", lambda: speed(args.out)),
        ("fidelity", lambda: fidelity(configs_for, args.fidelity_mods.split(","))),
        ("repeat", lambda: repeatability(configs_for)),
    ):
        if part in parts:
            t = time.perf_counter()
            result[part] = fn()
            print(f"{part}: {time.perf_counter() - t:.1f} s", flush=True)
            print(json.dumps(result[part], indent=1, default=str)[:3000], flush=True)
            path.write_text(json.dumps(result, indent=1, default=str))
    print(
        json.dumps(
            {k: v for k, v in result.get("speed", {}).items() if k not in ("rows", "tables")},
            indent=1,
        )
    )
    print(result.get("speed", {}).get("tables", ""))
    print(json.dumps(result.get("fidelity", []), indent=1))
    print(json.dumps({k: round(v["cv"], 4) for k, v in result.get("repeat", {}).items()}, indent=1))


if __name__ == "__main__":
    main()
