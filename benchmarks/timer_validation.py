"""Timer validation on a GPU (issue 12): which regime reads kernel time, how repeatable it is,
and how long measuring takes. One process, no MLflow (measure only).

1. fidelity: for configs no test uses, each regime's medians (flex and baseline, fwd and bwd)
   against torch.profiler kernel time from idle (a short profile: <= PROFILE_MS of calls after
   IDLE_S of rest, no L2 flush, as graph replay runs warm too), with the clocks each ran at;
2. repeat: REPEAT_SWEEPS separate sweeps of 4 configs, default regime: CV of each median;
3. speed: the 16-config sweep's measuring time per config (wall minus compile).

Usage (GPU machine): python benchmarks/timer_validation.py --out DIR [--parts fidelity,repeat]
Writes DIR/timer_validation_TAG.json after every config (a timeout keeps what was measured).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

PARTS = ("fidelity", "repeat", "speed")
REGIMES = ("burst", "sustained")
# (b, h, kv_heads, s, d, mod): heads, head_dim, 512-8192, GQA, masks, biases, softcap.
FIDELITY = [
    (4, 32, 32, 2048, 128, "causal"),
    (8, 16, 16, 4096, 128, "noop"),
    (4, 16, 16, 4096, 128, "alibi"),
    (2, 32, 8, 4096, 128, "causal"),
    (2, 8, 8, 8192, 64, "sliding_window:1024"),
    (8, 12, 12, 1024, 64, "softcap:30"),
    (16, 16, 16, 512, 64, "noop"),
    (8, 8, 2, 2048, 64, "alibi"),
    (1, 24, 24, 8192, 128, "causal"),
]
REPEAT = [FIDELITY[0], FIDELITY[2], FIDELITY[5], FIDELITY[6]]
REPEAT_SWEEPS = 5
SPEED = dict(
    b=[8], h=[16], s=[1024, 4096], d=[64, 128], mods=["noop", "causal", "rel", "head_bias"]
)
IDLE_S = 1.0
PROFILE_MS = 50.0
SERIES = ("fwd_eager", "fwd_compiled", "bwd_eager", "bwd_compiled")


def config(b, h, kvh, s, d, mod, **extra):
    from flexbench.config import BenchConfig

    return BenchConfig(
        batch=b, heads=h, kv_heads=kvh, q_len=s, head_dim=d, score_mod=mod,
        dtype="bfloat16", calculate_bwd=True, device="cuda", **extra,
    )  # fmt: skip


def kernel_us(fn) -> float:
    """Mean CUDA kernel time per call over a short profile started from idle."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    calls = max(3, min(30, int(PROFILE_MS / 1e3 / (time.perf_counter() - start))))
    time.sleep(IDLE_S)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total = sum(e.self_device_time_total for e in prof.events() if e.device_type.name == "CUDA")
    return total / calls


def truth(c) -> dict:
    """Profiler kernel time of the four series flexbench times for c."""
    import torch

    from flexbench import measure, mods

    bench = measure.Bench()
    built = mods.resolve(c.score_mod).build(mods.Dims(c.heads, c.q_len, c.kv_len, c.device))
    q, k, v = measure.make_inputs(c, requires_grad=True)
    scale = 1.0 / math.sqrt(c.head_dim)
    mask = bench.block_mask(c, built)
    kwargs = measure.flex_kwargs(c, built, mask, scale)
    flex = measure._flex_call(bench.compiled(c), (q, k, v), kwargs)
    eager = measure.sdpa_baseline(q, k, v, built, scale)
    dout = torch.randn_like(q)
    out = {"kernel.fwd_eager_us": kernel_us(eager), "kernel.fwd_compiled_us": kernel_us(flex)}
    bwd_eager, bwd_flex = measure._backward_pair(eager, flex, dout, (q, k, v))
    out["kernel.bwd_eager_us"] = kernel_us(bwd_eager)
    out["kernel.bwd_compiled_us"] = kernel_us(bwd_flex)
    return out


def measured(c) -> dict:
    from flexbench import pipeline

    start = time.perf_counter()
    r = pipeline.measure_configs([c], progress=False)[0]
    if r.error:
        return {"error": r.error}
    keep = ("_us", "_sm_mhz", "_sm_mhz_min", "_power_w", "_samples", "_noise_pct",
            "_throttled", "_unconverged", "_retaken")  # fmt: skip
    m = {k: v for k, v in r.metrics.items() if k.startswith(SERIES) and k.endswith(keep)}
    return {**m, "compile_s": r.metrics["compile_s"], "wall_s": time.perf_counter() - start}


def fidelity(result: dict, save) -> None:
    from flexbench import measure

    rows = result.setdefault("fidelity", [])
    for spec in FIDELITY:
        c = config(*spec)
        with measure.dynamo_settings(False, 256):
            row = {"config": c.run_name(), **truth(c)}
        for regime in result["regimes"]:
            for k, v in measured(config(*spec, regime=regime)).items():
                row[f"{regime}.{k}"] = v
            for s in SERIES:
                got, want = row.get(f"{regime}.{s}_us"), row[f"kernel.{s}_us"]
                if got:
                    row[f"{regime}.{s}_vs_kernel_pct"] = (got / want - 1) * 100
        print(json.dumps(row), flush=True)
        rows.append(row)
        save()


def repeat(result: dict, save) -> None:
    """REPEAT_SWEEPS sweeps of the REPEAT configs in the default regime: CV of each median."""
    from flexbench import flops, pipeline

    out = result.setdefault("repeat", {})
    configs = [config(*spec) for spec in REPEAT]
    runs = [pipeline.measure_configs(configs, progress=False) for _ in range(REPEAT_SWEEPS)]
    for i, c in enumerate(configs):
        for s in SERIES:
            values = [run[i].metrics.get(f"{s}_us") for run in runs]
            if all(values):
                out[f"{c.regime} {c.run_name()} {s}"] = {
                    "values": values,
                    "cv_pct": flops.cv(values) * 100,
                }
    print(json.dumps({k: v["cv_pct"] for k, v in out.items()}), flush=True)
    save()


def speed(result: dict, save) -> None:
    """Measuring time per config (sweep wall minus compile) of the 16-config sweep, default
    options (also runs against an older flexbench on PYTHONPATH, for before/after)."""
    from flexbench import pipeline
    from flexbench.spec import SweepSpec

    configs = SweepSpec(
        SPEED["b"], SPEED["h"], SPEED["s"], SPEED["d"], SPEED["mods"], ["bfloat16"],
        calculate_bwd=True, device="cuda",
    ).configs()  # fmt: skip
    start = time.perf_counter()
    results = pipeline.measure_configs(configs, progress=False)
    wall = time.perf_counter() - start
    compile_s = sum(r.metrics.get("compile_s", 0.0) for r in results)
    result["speed"] = {
        "configs": len(configs),
        "failed": sum(not r.ok for r in results),
        "wall_s": wall,
        "compile_s": compile_s,
        "measuring_s_per_config": (wall - compile_s) / len(configs),
        "metrics": {r.config.run_name(): r.metrics for r in results},
    }
    print(json.dumps({k: v for k, v in result["speed"].items() if k != "metrics"}), flush=True)
    save()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--tag", default="new", help="names the output file")
    parser.add_argument("--regimes", default=",".join(REGIMES), help="fidelity's regimes")
    args = parser.parse_args()
    import torch

    from flexbench import env

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"env": env.capture("cuda"), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    result["torch_cuda"] = torch.version.cuda
    result["regimes"] = args.regimes.split(",")

    def save() -> None:
        (out / f"timer_validation_{args.tag}.json").write_text(json.dumps(result, indent=1))

    save()
    for part in args.parts.split(","):
        {"fidelity": fidelity, "repeat": repeat, "speed": speed}[part](result, save)


if __name__ == "__main__":
    main()
