"""H100 validation of the harness (issue 7): one run, same card, side by side.

0. smoke: one small fwd+bwd config through flexbench (stops the run early if it fails);
1. sweep speed: `flexbench` (MLflow logging included; one GPU, and `--gpus all` where there
   are several) vs the seed's method (a new torch.compile per config, public API) on the same
   16 configs, each method in its own process and inductor/triton cache, cold then warm;
2. fidelity: flexbench medians vs torch.profiler kernel time per call (L2 flushed as do_bench
   does), default timer and CUDA-graph timer;
3. repeatability: the same 4 configs in 5 separate sweeps, CV of each reported median;
4. tracking overhead: time inside MLflow calls / sweep wall time;
5. headline table: the 16 configs' speedups and TFLOP/s (from the speed run), and the SDPA
   kernel that ran for each (`backends`).

Usage (GPU machine):  python benchmarks/h100_validation.py --out DIR [--parts speed,fidelity,...]
Writes DIR/validation.json after every step (a timeout keeps what was measured).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

PARTS = ("smoke", "speed", "fidelity", "repeat", "backends")
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


def smoke(configs_for) -> dict:
    """One small causal config, forward and backward, with the default timer."""
    from flexbench import pipeline

    r = pipeline.measure_configs([configs_for(2, 16, 512, 64, "causal")], progress=False)[0]
    if r.error:
        raise SystemExit(f"smoke config failed: {r.error}")
    return r.metrics


def sdpa_backends() -> dict:
    """The top CUDA kernel of each headline config's SDPA baseline, forward (profiled)."""
    import torch

    from flexbench import measure, mods
    from flexbench.spec import SweepSpec

    out = {}
    for c in SweepSpec(**HEADLINE, calculate_bwd=True, device="cuda").configs():
        built = mods.resolve(c.score_mod).build(mods.Dims(c.heads, c.q_len, c.kv_len, c.device))
        q, k, v = measure.make_inputs(c, requires_grad=True)
        eager = measure.sdpa_baseline(q, k, v, built, 1.0 / math.sqrt(c.head_dim))
        _, out[c.run_name()] = kernel_us(eager, calls=3)
        del q, k, v, eager
        torch.cuda.empty_cache()
    return out


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
    kwargs = measure.flex_kwargs(c, built, block_mask, scale)
    flex = measure._flex_call(bench.compiled(c), (q, k, v), kwargs)
    eager = measure.sdpa_baseline(q, k, v, built, scale)
    dout = torch.randn_like(q)
    return eager, flex, dout, (q, k, v)


def fidelity(configs_for, mods=("noop", "causal")) -> list[dict]:
    """flexbench's medians (both timers) against profiler kernel time, fwd (and bwd)."""
    import torch

    from flexbench import measure, pipeline

    rows = []
    for b, h, s, d in FIDELITY_SHAPES:
        for mod in mods:
            base = configs_for(b, h, s, d, mod)
            row = {"config": base.run_name()}
            print(f"fidelity: {row['config']}", flush=True)
            for timer in ("do_bench", "cudagraph_fwd", "cudagraph"):
                c = measure.BenchConfig(**{**base.identity(), "timer": timer})
                r = pipeline.measure_configs([c], progress=False)[0]
                if r.error:
                    row[f"{timer}_error"] = r.error
                    continue
                for k in ("fwd_eager_us", "fwd_compiled_us", "bwd_eager_us", "bwd_compiled_us"):
                    row[f"{timer}.{k}"] = r.metrics.get(k)
            with measure.dynamo_settings(False, 64):
                eager, flex, dout, inputs = callables(base)
                with torch.set_grad_enabled(base.calculate_bwd):  # as measure times it
                    row["kernel.fwd_eager_us"], row["sdpa_fwd_kernel"] = kernel_us(eager)
                    row["kernel.fwd_compiled_us"], _ = kernel_us(flex)
                print(json.dumps(row), flush=True)
                if not base.calculate_bwd:
                    rows.append(row)
                    continue
                bwd_eager, bwd_flex = measure._backward_pair(eager, flex, dout, inputs)
                row["kernel.bwd_eager_us"], _ = kernel_us(bwd_eager)
                row["kernel.bwd_compiled_us"], _ = kernel_us(bwd_flex)
            rows.append(row)
    return rows


def repeatability(configs_for) -> dict:
    """The 4 fidelity configs in REPEAT_SWEEPS separate sweeps: CV of each median."""
    from flexbench import flops, pipeline

    configs = [
        configs_for(b, h, s, d, m) for b, h, s, d in FIDELITY_SHAPES for m in ("noop", "causal")
    ]
    runs = [pipeline.measure_configs(configs, progress=False) for _ in range(REPEAT_SWEEPS)]
    out = {}
    for i, c in enumerate(configs):
        for key in ("fwd_eager_us", "fwd_compiled_us", "bwd_eager_us", "bwd_compiled_us"):
            values = [run[i].metrics[key] for run in runs if key in run[i].metrics]
            if len(values) == REPEAT_SWEEPS:
                out[f"{c.run_name()} {key}"] = {"values": values, "cv": flops.cv(values)}
    return out


SPEED_METHODS = ("seed", "flexbench", "flexbench_gpus", "flexbench_dynamic")
CACHE_ROOT = Path("/tmp/flexbench-validation-cache")  # per method; never under --out
WORK = Path("/tmp/flexbench-validation-work")  # journals, children's JSON (--out: few files)


def speed_child(method: str, out_dir: Path, tag: str) -> dict:
    """One timed method in this (fresh) process: the seed's loop, or `flexbench run` (one GPU,
    or `--gpus all`) tracked to SQLite under out_dir, as the CLI would run it."""
    from flexbench import report, sweep
    from flexbench.spec import SweepSpec
    from flexbench.tracking_settings import TrackingSettings

    configs = SweepSpec(**HEADLINE, calculate_bwd=True, device="cuda").configs()
    if method == "seed":
        return {"inner_s": seed_method(configs)}
    start = time.perf_counter()
    outcome = sweep.run(
        SweepSpec(
            **HEADLINE, calculate_bwd=True, device="cuda", dynamic=method == "flexbench_dynamic"
        ),
        TrackingSettings(
            tracking_uri=f"sqlite:///{out_dir}/speed.db",
            journal=str(WORK / f"speed-{method}-{tag}.jsonl"),
            run_name=f"speed {method} {tag}",
        ),
        quiet=True,
        gpus="all" if method == "flexbench_gpus" else None,
    )
    inner = time.perf_counter() - start
    rows = [r.to_row() for r in outcome.records]
    return {
        "inner_s": inner,
        "sweep_id": outcome.sweep_id,
        "configs": len(outcome.records),
        "failed": outcome.failed,
        "tracking_s": outcome.tracking_s,
        "background_s": outcome.background_s,
        "problems": outcome.problems,
        "offline": outcome.offline,
        "config_runs_logged": logged_config_runs(out_dir, outcome.sweep_id),
        "tables": report.seed_tables(rows),
        "rows": rows,
    }


def logged_config_runs(out_dir: Path, sweep_id: str) -> int:
    """Config runs in the SQLite store carrying this sweep id (every shard's)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out_dir}/speed.db")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"tags.`flexbench.sweep_id` = '{sweep_id}' and tags.`flexbench.kind` = 'config'",
        max_results=1000,
    )
    return len(runs)


def speed(out_dir: Path, phases: list[str], methods: list[str], result: dict, save) -> dict:
    """Each method in its own process, each with its own inductor/triton cache: `cold` starts
    from an empty cache (a first run), `warm` runs again on the cache `cold` left. Wall time
    is the whole process (imports, compile, measuring, MLflow)."""
    import os
    import subprocess
    import sys

    import torch

    out = result.setdefault("speed", {})
    gpus = torch.cuda.device_count()
    for phase in phases:
        for method in methods:
            if method == "flexbench_gpus" and gpus < 2:
                continue
            cache = CACHE_ROOT / method
            env = {
                **os.environ,
                "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
                "TRITON_CACHE_DIR": str(cache / "triton"),
            }
            if method != "flexbench_gpus":
                env["CUDA_VISIBLE_DEVICES"] = "0"
            if phase == "cold":
                shutil.rmtree(cache, ignore_errors=True)
            elif not cache.exists():
                print(f"speed {method} warm: no cache from a cold run here; skipped", flush=True)
                continue
            child = WORK / f"speed-{method}-{phase}.json"
            child.unlink(missing_ok=True)
            cmd = [
                sys.executable,
                __file__,
                "--child",
                method,
                "--tag",
                phase,
                "--out",
                str(out_dir),
            ]
            start = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            entry = {"wall_s": wall, "returncode": proc.returncode, "gpus": gpus}
            if child.exists():
                entry.update(json.loads(child.read_text()))
            else:
                entry["stderr_tail"] = proc.stderr[-2000:]
            out[f"{method}.{phase}"] = entry
            print(
                f"speed {method} {phase}: {wall:.1f} s "
                + json.dumps({k: v for k, v in entry.items() if k not in ("rows", "tables")}),
                flush=True,
            )
            save()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--fidelity-mods", default="noop,causal")
    ap.add_argument("--no-bwd", action="store_true", help="fidelity/repeat: forward only")
    ap.add_argument("--timer", default="auto", help="repeat: timer of the configs")
    ap.add_argument("--phases", default="cold,warm", help="speed: cold and/or warm cache")
    ap.add_argument("--methods", default=",".join(SPEED_METHODS), help="speed: methods")
    ap.add_argument("--graph-rep-ms", type=float, help="CUDA-graph timer's ms a replay")
    ap.add_argument("--child", choices=SPEED_METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    if args.child:
        child = speed_child(args.child, args.out, args.tag)
        (WORK / f"speed-{args.child}-{args.tag}.json").write_text(json.dumps(child))
        return
    import torch
    import triton

    from flexbench import config, env, timing

    if args.graph_rep_ms:
        timing.CUDAGRAPH_REP_MS = args.graph_rep_ms

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
        "graph_rep_ms": timing.CUDAGRAPH_REP_MS,
    }
    parts = args.parts.split(",")
    path = args.out / "validation.json"

    def save() -> None:
        path.write_text(json.dumps(result, indent=1, default=str))

    for part, fn in (
        ("smoke", lambda: smoke(configs_for)),
        (
            "speed",
            lambda: speed(args.out, args.phases.split(","), args.methods.split(","), result, save),
        ),
        ("fidelity", lambda: fidelity(configs_for, args.fidelity_mods.split(","))),
        ("repeat", lambda: repeatability(configs_for)),
        ("backends", sdpa_backends),
    ):
        if part in parts:
            t = time.perf_counter()
            result[part] = fn()
            print(f"{part}: {time.perf_counter() - t:.1f} s", flush=True)
            if part in ("smoke", "backends"):
                print(json.dumps(result[part], indent=1), flush=True)
            save()
    for name, entry in result.get("speed", {}).items():
        print(name, entry.get("tables", ""))
    print(json.dumps(result.get("fidelity", []), indent=1))
    print(json.dumps({k: round(v["cv"], 4) for k, v in result.get("repeat", {}).items()}, indent=1))


if __name__ == "__main__":
    main()
