"""Baselines and flex backends on a GPU (issue 15, item 5): one process, no MLflow needed.

Parts (each writes as it goes, so a timeout keeps what was measured):

- `sweep16`: the 16 configs of BENCHMARKS §2 (b8 h16 s1024,4096 d64,128; noop, causal, rel,
  head_bias; bf16, fwd+bwd) against sdpa, sdpa_cudnn, sdpa_flash, sdpa_efficient and
  inductor_math: per config every baseline's time, error and the kernels it ran.
- `mods`: softcap and alibi at 4x32x2048x128 bf16 fwd+bwd against eager_math, inductor_math
  (and sdpa: skipped for softcap, approximate for alibi's bf16 mask).
- `backends`: flex's backends as an axis: noop and causal at 8x16x4096x128 fwd with
  auto, triton, flash, triton_decode, and a decode config (q_len 1, kv 8192) with auto, triton,
  triton_decode: which pass, which fail and why, and flex's kernels for each.

Usage (GPU machine):
  python benchmarks/baselines_gpu.py --out DIR [--parts sweep16,mods,backends] [--shard I/N]
Writes DIR/<part>.jsonl (one measure record per config, as it lands), DIR/baselines.json (all
parts: records, per-config kernel families) and DIR/baselines.md (the summary tables); with
--shard I/N only every N-th config from the I-th (files named .I-of-N).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flexbench.record import RunRecord, rows

PARTS = ("sweep16", "mods", "backends")
SDPA_FORMS = "sdpa,sdpa_cudnn,sdpa_flash,sdpa_efficient,inductor_math"


def part_configs(part: str) -> list:
    """The configs of one part."""
    from flexbench.config import BenchConfig
    from flexbench.spec import SweepSpec

    gpu = dict(device="cuda", dtypes=["bfloat16"])
    if part == "sweep16":
        return SweepSpec(
            [8],
            [16],
            [1024, 4096],
            [64, 128],
            ["noop", "causal", "rel", "head_bias"],
            calculate_bwd=True,
            baselines=SDPA_FORMS,
            **gpu,
        ).configs()
    if part == "mods":
        return SweepSpec(
            [4],
            [32],
            [2048],
            [128],
            ["softcap", "alibi"],
            calculate_bwd=True,
            baselines="eager_math,inductor_math,sdpa",
            **gpu,
        ).configs()
    if part == "backends":
        prefill = SweepSpec(
            [8],
            [16],
            [4096],
            [128],
            ["noop", "causal"],
            flex_backends=["auto", "triton", "flash", "triton_decode"],
            **gpu,
        ).configs()
        decode = [
            BenchConfig(8, 16, 1, 128, kv_len=8192, device="cuda", flex_backend=b)
            for b in ("auto", "triton", "triton_decode")
        ]
        return prefill + decode
    raise ValueError(f"unknown part {part!r}; choose from {', '.join(PARTS)}")


def families(record: RunRecord) -> dict[str, str]:
    """Kernel family per side (flex and each baseline) from the record's kernel tags."""
    from flexbench import kernels

    out = {}
    for tag, names in record.tags.items():
        if tag.endswith("_kernels"):
            out[tag.removeprefix("flexbench.").removesuffix("_kernels")] = kernels.family(names)
    return out


def line(record: RunRecord) -> str:
    """One printed line per config: times per series, families, skips, approximations."""
    m, tags = record.metrics, record.tags
    if not record.ok:
        return f"{record.run_name}: FAILED {record.error}"
    series = [k[4:-3] for k in m if k.startswith("fwd_") and k.endswith("_us")]
    series = [s for s in series if s != "eager"]  # the first baseline again
    times = ", ".join(
        f"{s} {m[f'fwd_{s}_us']:.0f}" + (f"/{m[f'bwd_{s}_us']:.0f}" if f"bwd_{s}_us" in m else "")
        for s in series
    )
    text = f"{record.run_name}: fwd/bwd us {times}; kernels {families(record)}"
    for tag in ("flexbench.baseline_skipped", "flexbench.baseline_inexact"):
        if tag in tags:
            text += f"; {tag.split('.')[1]}: {tags[tag]}"
    return text


def run_part(part: str, out: Path, slice_: tuple[int, int] = (0, 1)) -> list[RunRecord]:
    """Measure one part (its `slice_` I/N of configs); every record appended to
    DIR/<part>[.I-of-N].jsonl as it lands."""
    from flexbench import pipeline
    from flexbench.config import shard

    label = f".{slice_[0]}-of-{slice_[1]}" if slice_[1] > 1 else ""
    path = out / f"{part}{label}.jsonl"
    path.write_text("", encoding="utf-8")
    records: list[RunRecord] = []

    def keep(result) -> None:
        record = RunRecord.from_result(result)
        records.append(record)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record.to_journal()) + "\n")
        print(line(record), flush=True)

    pipeline.measure_configs(shard(part_configs(part), *slice_), keep, progress=False)
    return records


def tables(records: list[RunRecord]) -> str:
    """The seed's tables with the baseline column and the Baselines table."""
    from flexbench import report

    return report.seed_tables(rows(records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument(
        "--shard", default="0/1", help="I/N: only slice I of N of each part (to fit 10 minutes)"
    )
    args = parser.parse_args()
    index, count = (int(x) for x in args.shard.split("/"))
    args.out.mkdir(parents=True, exist_ok=True)
    from flexbench import env

    result: dict = {"env": env.capture("cuda"), "parts": {}}
    markdown = []
    for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
        start = time.perf_counter()
        records = run_part(part, args.out, (index, count))
        result["parts"][part] = {
            "wall_s": time.perf_counter() - start,
            "records": [r.to_journal() for r in records],
            "families": {r.run_name: families(r) for r in records},
        }
        markdown += [f"## {part}", "", tables(records), ""]
        name = "baselines" + (f".{index}-of-{count}" if count > 1 else "")
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        (args.out / f"{name}.md").write_text("\n".join(markdown), encoding="utf-8")
        print(f"{part}: {len(records)} configs in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
