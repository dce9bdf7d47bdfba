"""click CLI: run, mods, sync, summary, compare, history, report, repro, tune (thin: parse ->
call the API)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import click

from flexbench import choices, timers  # torch-free: the choices a config takes
from flexbench import compare as compare_api
from flexbench import history as history_api
from flexbench import summary as summary_api

EPILOG_RUN = """\b
Examples:
  flexbench run -b 8 -nh 16 -s 1024,4096 -d 64,128 -mods noop,causal --calculate-bwd
  flexbench run --device cpu -b 1 -nh 4 -s 256 -d 64 -mods causal,softcap:20 -dtype float32
  flexbench run -nh 32 --kv-heads 8 -s 2048 --kv-len 8192 -mods causal
  flexbench run -mods causal,alibi --baseline sdpa,sdpa_cudnn,sdpa_flash,inductor_math
  flexbench run -mods causal --flex-backend triton,flash --calculate-bwd
  flexbench run --gpus all                          # one worker process per local GPU
  flexbench run --shard 0/2 --sweep-id nightly-42   # then --shard 1/2 on another host
  flexbench run --config shapes.yaml --calculate-bwd  # an explicit list of production shapes
"""

QUIET_LOGGERS = ("mlflow.store.db.utils", "alembic.runtime.migration")


def _split(values: tuple[str, ...]) -> list[str]:
    """Comma lists or repeated flags as one list; BadParameter when given but empty."""
    out = [v.strip() for raw in values for v in str(raw).split(",") if v.strip()]
    if values and not out:
        raise click.BadParameter("is empty: give at least one value")
    return out


def _not_auto(values: tuple[str, ...]) -> tuple[str, ...]:
    """`auto` (MLproject's default for sizes and dtype) means: not given."""
    return () if [str(v).strip().lower() for v in values] == ["auto"] else values


def auto_or(kind: click.ParamType, value: object, param: click.Parameter, ctx: click.Context):
    """None for `auto` (or nothing: MLproject passes `auto`), else the value as `kind`."""
    return None if value in (None, "auto") else kind.convert(value, param, ctx)


def int_list(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[int]:
    """Comma lists or repeated flags of whole numbers > 0; `auto` (or nothing): the device's
    default."""
    out = []
    for v in _split(_not_auto(values)):
        try:
            n = int(v)
        except ValueError:
            raise click.BadParameter(f"'{v}' is not a whole number") from None
        if n <= 0:
            raise click.BadParameter(f"sizes must be > 0, got {n}")
        out.append(n)
    return out


def mod_list(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[str]:
    """Mod specs, each resolved now so a bad name fails before anything runs."""
    from flexbench import mods as mods_mod  # imports torch: only for commands that need it

    names = [v for raw in values for v in mods_mod.split_top(str(raw), ",") if v]
    if values and not names:
        raise click.BadParameter("is empty: give at least one value")
    for name in names:
        try:
            mods_mod.resolve(name)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return names


def baseline_list(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> str:
    """Baseline names (`flexbench baselines`), checked now; comma-joined in the order given."""
    from flexbench import baselines  # imports torch: only for commands that need it

    try:
        return ",".join(baselines.parse(_split(values)))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def flex_backend_list(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> list[str]:
    """flex backends, each checked now."""
    names = _split(values)
    for name in names:
        if name not in choices.FLEX_BACKENDS:
            raise click.BadParameter(
                f"unknown flex backend '{name}'; use {', '.join(choices.FLEX_BACKENDS)}"
            )
    return names


DTYPE = click.Choice(choices.DTYPES)


def dtype_list(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[str]:
    """dtype names, each checked now so a typo fails before anything runs; `auto` (or nothing):
    the device's default."""
    names = _split(_not_auto(values))
    for name in names:
        if name not in DTYPE.choices:
            raise click.BadParameter(f"unknown dtype '{name}'; use {', '.join(DTYPE.choices)}")
    return names


def switch(name: str, help: str) -> Callable:
    """A seed-style flag (`--dynamic`) that also takes a value (`--dynamic=false`): MLproject
    passes its true/false parameters that way."""
    return click.option(
        name,
        type=click.BOOL,
        is_flag=False,
        flag_value=True,
        default=False,
        metavar="[=true|false]",
        help=help,
    )


class ShardType(click.ParamType):
    """`I/N`: the I-th of N disjoint slices, counted from 0 (0/N .. N-1/N, as Slurm's
    `--array=0-(N-1)` and CUDA device ids count)."""

    name = "I/N"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None):
        if isinstance(value, tuple):
            return value
        index, _, count = str(value).partition("/")
        if not (index.strip().isdigit() and count.strip().isdigit()):
            self.fail(f"'{value}' is not I/N like 0/4 (I counts from 0)", param, ctx)
        i, n = int(index), int(count)
        if n < 1:
            self.fail(f"{value}: N, the number of shards, must be at least 1", param, ctx)
        if i >= n:
            self.fail(
                f"{value} is out of range: I counts from 0 to N-1 (0/{n} .. {n - 1}/{n})",
                param,
                ctx,
            )
        return i, n


class GpuList(click.ParamType):
    """`all`, or local GPU ids like `0,1` (indices among the GPUs torch sees)."""

    name = "0,1|all"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None):
        if not isinstance(value, str):
            return value
        if value.strip().lower() == "all":
            return "all"
        ids = _split((value,))
        if not ids or not all(v.isdigit() for v in ids):
            self.fail(f"'{value}' is not 'all' or GPU ids like 0,1", param, ctx)
        if len(set(ids)) != len(ids):
            self.fail(f"'{value}' names a GPU twice", param, ctx)
        return [int(v) for v in ids]


def workers_count(ctx: click.Context, param: click.Parameter, value: str) -> int | str:
    """`auto` or a whole number >= 0 (--compile-workers)."""
    if str(value).strip().lower() == "auto":
        return "auto"
    if not str(value).strip().isdigit():
        raise click.BadParameter(f"'{value}' is not a count >= 0 or 'auto'")
    return int(value)


EPILOG_GROUP = """\b
Example (any machine; logs to ./mlflow.db, see it with `mlflow ui`):
  flexbench run --device cpu -b 1 -nh 4 -s 256 -d 64 -mods noop,causal -dtype float32
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG_GROUP)
@click.version_option(package_name="flexbench")
def cli() -> None:
    """flexbench: FlexAttention vs SDPA, verified, every config an MLflow run."""


def _default_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    click.echo("notice: no CUDA device here, running on CPU (forward only)", err=True)
    return "cpu"


@cli.command(epilog=EPILOG_RUN)
@click.option(
    "-b",
    "batch",
    multiple=True,
    callback=int_list,
    help="batch sizes [default: 2,8,16 on CUDA, 1 on CPU]",
)
@click.option(
    "-nh",
    "heads",
    multiple=True,
    callback=int_list,
    help="query heads [default: 16 on CUDA, 4 on CPU]",
)
@click.option(
    "-s",
    "seq_lens",
    multiple=True,
    callback=int_list,
    help="(query) sequence lengths [default: 512,1024,4096 on CUDA, 256 on CPU]",
)
@click.option(
    "-d",
    "head_dims",
    multiple=True,
    callback=int_list,
    help="head dims [default: 64,128 on CUDA, 64 on CPU]",
)
@click.option(
    "-mods",
    "--mods",
    "score_mods",
    multiple=True,
    default=("noop,causal,rel,head_bias",),
    callback=mod_list,
    show_default=True,
    help="mods: built-in names, package.module:name[(args)] user mods, a & b compositions "
    "(see `flexbench mods`)",
)
@click.option(
    "-dtype",
    "--dtype",
    "dtypes",
    multiple=True,
    callback=dtype_list,
    help=f"{', '.join(choices.DTYPES)} [default: bfloat16 on CUDA, float32 on CPU]",
)
@click.option(
    "--kv-heads",
    multiple=True,
    callback=int_list,
    help="key/value heads (GQA when fewer than -nh); default = -nh",
)
@click.option(
    "--kv-len", "kv_lens", multiple=True, callback=int_list, help="key/value lengths; default = -s"
)
@switch("--decode", "decoding: q_len 1 against kv_len (--kv-len or -s)")
@switch("--calculate-bwd", "time backward too (needs CUDA)")
@switch("--dynamic", "compile flex with dynamic shapes")
@switch("--max-autotune", "max-autotune compile")
@click.option("--kernel-options", default="", help="JSON, e.g. '{\"BLOCK_M\": 64}'")
@click.option(
    "--device",
    type=click.Choice([choices.AUTO, *reversed(choices.DEVICES)]),  # cuda first: auto prefers it
    default="auto",
    show_default=True,
    help="auto = cuda when available",
)
@click.option(
    "--timer",
    type=click.Choice(timers.CHOICES),
    default="auto",
    show_default=True,
    help="auto: cudagraph on CUDA (forward and backward replayed from CUDA graphs: kernel "
    "time, without host overhead), cpu on CPU; cudagraph_fwd graphs the forward only",
)
@click.option(
    "--regime",
    type=click.Choice([choices.AUTO, *timers.REGIMES]),
    default="auto",
    show_default=True,
    help="CUDA: burst = short samples with idle gaps, throttled samples retaken (kernel "
    "efficiency; auto); sustained = back-to-back load (the clock a long job holds)",
)
@click.option(
    "--max-noise",
    default=None,
    callback=lambda ctx, p, v: None if v in (None, "auto") else percent(ctx, p, v),
    help="sample each timing until its IQR/median is at most this percent "
    "[default: 0.5 on CUDA, 2 on CPU]",
)
@click.option(
    "--min-samples",
    type=click.IntRange(min=3),
    default=10,
    show_default=True,
    help="samples per timing at least",
)
@click.option(
    "--max-time",
    default=None,
    callback=lambda ctx, p, v: auto_or(click.FloatRange(min=0, min_open=True), v, p, ctx),
    help="seconds per config's fwd (or bwd) timing before it is logged unconverged "
    "[default: 2 on CUDA, 0.5 on CPU]",
)
@click.option(
    "--sample-ms",
    default=None,
    callback=lambda ctx, p, v: auto_or(click.FloatRange(min=0, min_open=True), v, p, ctx),
    help="length of one timing sample in ms (a CUDA graph replayed this long) "
    "[default: 5 in burst, 40 in sustained]",
)
@click.option(
    "--throttle-threshold",
    default="90",
    show_default=True,
    callback=lambda ctx, p, v: percent(ctx, p, v),
    help="percent of the GPU's max SM clock under which a timing counts as throttled",
)
@click.option(
    "--baseline",
    "baselines",
    multiple=True,
    default=("sdpa",),
    callback=baseline_list,
    show_default=True,
    metavar="NAME[,NAME...]",
    help="what flex is timed against (`flexbench baselines` lists them); the first that can "
    "run a config fills fwd_eager_us/fwd_speedup, each has fwd_<name>_us, fwd_speedup_<name>",
)
@click.option(
    "--flex-backend",
    "flex_backends",
    multiple=True,
    default=("auto",),
    callback=flex_backend_list,
    show_default=True,
    help=f"flex's kernel_options BACKEND, an axis of the sweep: {', '.join(choices.FLEX_BACKENDS)} "
    "(a backend that cannot run fails its config, never falls back)",
)
@click.option(
    "--align",
    type=click.Choice(choices.ALIGNS),
    default="end",
    show_default=True,
    help="when q_len != kv_len, query i sits at key position i + kv_len - q_len (end, as in "
    "decoding) or i (start); for the built-in masks, and {align} in user specs",
)
@click.option(
    "--reference",
    default="",
    metavar="MODULE:NAME[(ARGS)]",
    help="reference(q, k, v, scale) -> output of the one mod in -mods: the check compares "
    "flex against it instead of the dense form of the mod",
)
@click.option("--experiment", default="flexbench", show_default=True, help="MLflow experiment")
@click.option(
    "--tracking-uri",
    default=None,
    help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
)
@click.option(
    "--tracking-timeout",
    type=click.FloatRange(min=1),
    default=120,
    show_default=True,
    metavar="SECONDS",
    help="how long one tracking step waits on a busy server (slow answers, 429/503) before "
    "results go to the journal only; a refused connection gives up at once",
)
@click.option("--run-name", default=None, help="name of the sweep run")
@switch("--resume", "skip configs already FINISHED on this stack")
@click.option(
    "--journal",
    default=None,
    help="offline journal (default: $FLEXBENCH_JOURNAL or .flexbench/journal.jsonl)",
)
@click.option(
    "--sweep-id",
    default=None,
    help="the sweep's id (tag flexbench.sweep_id); give every shard the same one "
    "(default: a new id, printed)",
)
@click.option(
    "--shard",
    type=ShardType(),
    default=None,
    help="measure only slice I of N (I from 0 to N-1), e.g. per host or Slurm array task",
)
@click.option(
    "--gpus",
    type=GpuList(),
    default=None,
    help="one worker process per local GPU (0,1 or all), each on its slice of the sweep",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="YAML or JSON list of configs (batch, heads, q_len, head_dim, mod; kv_heads, kv_len, "
    "dtype optional) instead of the cross product of -b -nh -s -d -mods -dtype",
)
@click.option(
    "--compile-workers",
    default="auto",
    show_default=True,
    callback=workers_count,
    metavar="N|auto",
    help="processes that compile configs ahead of measuring, into torch's caches (0 = off); "
    "auto: a CPU core each beside the measuring process(es) on CUDA, 0 on CPU",
)
@click.option(
    "--compile-cache",
    type=click.Path(dir_okay=False),
    default=None,
    help="file of torch compile-cache artifacts: loaded before the sweep if present, saved "
    "after (reuse a sweep's compiled kernels on another machine of the same kind)",
)
@click.option("--quiet", is_flag=True, help="no progress bar")
def run(**opts: object) -> None:
    """Sweep shapes x mods x dtypes: time compiled flex vs SDPA, check, log to MLflow."""
    from flexbench import sweep as api

    if opts["config_file"]:
        _no_shape_options(click.get_current_context())
    outcome = _call_api(api.run, api_options(opts))
    if outcome.records:
        click.echo(outcome.tables())
    click.echo(api.closing_line(outcome, sys.argv[1:]), err=True)
    hint = api.next_commands(outcome, str(opts["experiment"]), opts["tracking_uri"])
    if hint:
        click.echo(hint, err=True)
    sys.exit(outcome.exit_code)


SHAPE_OPTIONS = {  # run's parameters that --config replaces -> their flag
    "batch": "-b",
    "heads": "-nh",
    "seq_lens": "-s",
    "head_dims": "-d",
    "score_mods": "-mods",
    "dtypes": "-dtype",
    "kv_heads": "--kv-heads",
    "kv_lens": "--kv-len",
    "decode": "--decode",
}


def _no_shape_options(ctx: click.Context) -> None:
    """--config gives every config's sizes, mod and dtype: a shape option as well is an error."""
    given = [
        flag
        for name, flag in SHAPE_OPTIONS.items()
        if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
    ]
    if given:
        raise click.UsageError(
            f"--config lists the configs: drop {given[0]} (or put it in the file's entries)"
        )


def api_options(opts: dict) -> dict:
    """A run/tune command's flags as its API's arguments: `spec` (the grid, and every
    BenchConfig field as the config template), `tracking`, and the other flags as given."""
    from flexbench.spec import SweepSpec
    from flexbench.tracking_settings import TrackingSettings

    rest = dict(opts)
    spec, tracking = SweepSpec.take(rest), TrackingSettings.take(rest)
    return {"spec": spec, "tracking": tracking, **rest}


def _call_api(fn: Callable, opts: dict) -> object:
    """Call a command's API: ValueError is a usage error (exit 2), RuntimeError exit 1."""
    try:
        return fn(**opts)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None


MOD_GRAMMAR = """\
A parameter goes after a colon (sliding_window:128). Your own mods, from an installed
package or a module in the current directory:

  pkg.module:name           name(b, h, q_idx, kv_idx) is a mask_mod (block-sparse, baseline
                            SDPA with the dense mask), name(score, b, h, q_idx, kv_idx) a
                            score_mod (SDPA cannot run it: --baseline sdpa,eager_math), told
                            apart by their arity
  pkg.module:name(args)     name(args) returns the mod; args are Python literals, positional
                            or key=value, and placeholders filled per config: {batch} {heads}
                            {kv_heads} {q_len} {kv_len} {head_dim} {align} {device}
  a & b, a | b              mask specs combined (and_masks, or_masks); & binds tighter, ( )
                            group: causal & pkg.module:doc_mask({kv_len})
  fn.additive = True        a score_mod that only adds a bias: SDPA runs it with the bias
  fn.reference              reference(q, k, v, scale) -> output; the check compares flex
                            against it (or --reference MODULE:NAME for the run)

Param score_mod is the spec with placeholders filled; mod_sha hashes the mod's module
source, so `run --resume` measures a mod again after its source changed."""


@cli.command("mods")
def list_mods() -> None:
    """List built-in mods with their parameter, and how to name your own.

    \b
    Example:
      flexbench run -mods causal,sliding_window:128,softcap:30
      flexbench run -mods 'causal & my_mods:doc_mask({kv_len})'
    """
    from tabulate import tabulate

    from flexbench import mods as mods_mod

    click.echo(tabulate(mods_mod.describe(), headers="keys", tablefmt="github"))
    click.echo("\n" + MOD_GRAMMAR)


@cli.command("baselines")
def list_baselines() -> None:
    """List the baselines flex can be timed against, with what each computes.

    \b
    Example:
      flexbench run -mods causal,softcap --baseline sdpa,eager_math,inductor_math
    """
    from tabulate import tabulate

    from flexbench import baselines

    click.echo(tabulate(baselines.describe(), headers="keys", tablefmt="github"))
    click.echo(
        "\nEach computes the same function as the flex call and is checked against the "
        "reference; one that cannot run a config (SDPA for softcap, a CUDA kernel on CPU) is "
        "skipped with the reason (tag flexbench.baseline_skipped)."
    )


@cli.command()
@click.option("--journal", default=None, help="journal to upload (default as for run)")
@click.option("--tracking-uri", default=None, help="server (default: $MLFLOW_TRACKING_URI)")
@click.option("--status", is_flag=True, help="list what each server has, owes and refused")
@click.option("--retry-failed", is_flag=True, help="try results a server refused once more")
def sync(journal: str | None, tracking_uri: str | None, status: bool, retry_failed: bool) -> None:
    """Upload journalled results not yet on the tracking server, exactly once.

    A result the server refuses for good (e.g. an invalid name) is marked failed and the rest
    goes on; `--status` lists it with the reason.

    \b
    Examples:
      MLFLOW_TRACKING_URI=http://mlflow.lan:5000 flexbench sync
      flexbench sync --status
    """
    from flexbench import artifacts, tracking

    j = tracking.Journal(journal)
    if not j.path.exists():
        raise click.ClickException(f"no journal at {j.path}; pass --journal PATH")
    if status:
        click.echo(_sync_status(tracking.sync_status(j)))
        _warn_bad_lines(j)
        return
    uri = _call_api(tracking.check_uri, {"uri": tracking.resolve_uri(tracking_uri)})
    try:
        rep = artifacts.sync(j, uri, retry_failed)
    except tracking.TrackingError as exc:
        _warn_bad_lines(j)
        raise click.ClickException(str(exc)) from None
    _warn_bad_lines(j)
    click.echo(_sync_line(rep, tracking.redact(uri)))
    if rep.quarantined:
        for line in rep.quarantined:
            click.echo(f"refused: {line}", err=True)
        raise click.ClickException(
            f"{len(rep.quarantined)} result(s) refused by the server for good (listed above, "
            "and by `flexbench sync --status`); fix and run `flexbench sync --retry-failed`"
        )


def _sync_line(rep: object, where: str) -> str:
    line = (
        f"synced {rep.uploaded} new results ({rep.already} already there) in "
        f"{rep.sweeps} sweeps to {where}"
    )
    if rep.held:
        line += f"; {rep.held} refused earlier, skipped (see `flexbench sync --status`)"
    if rep.running:
        line += f"; {rep.running} sweep(s) still running here, left alone"
    return line


def _sync_status(statuses: list) -> str:
    """`sync --status`: per server, synced / pending counts and each refused result."""
    if not statuses:
        return "nothing synced yet: every result in the journal is pending"
    lines = []
    for st in statuses:
        lines.append(
            f"{st.target}: {st.synced} synced, {st.pending} pending, {len(st.refused)} refused"
        )
        lines += [f"  refused: {what}: {why}" for what, why in st.refused]
    return "\n".join(lines)


def _warn_bad_lines(journal: object) -> None:
    note = journal.bad_note()
    if note:
        click.echo(note, err=True)


EPILOG_SUMMARY = """\b
Examples:
  flexbench summary                       # the latest sweep of experiment flexbench
  flexbench summary --sweep all --where torch=2.11.0,score_mod=causal --format markdown
  flexbench summary --sweep-id 3f2a9c1b7e4d --format json > sweep.json
"""
EPILOG_COMPARE = """\b
Examples:
  flexbench compare BASE_RUN_ID CONTENDER_RUN_ID
  flexbench compare --base-where torch=2.10.0 --contender-where torch=2.11.0 --format markdown
  flexbench compare BASE_RUN_ID latest --where score_mod=causal --threshold 3%
"""


def _report(call: Callable, *args: object) -> object:
    """Call a report function: bad input exits 2, nothing to report or a server failure 1."""
    from flexbench import query, tracking

    try:
        return call(*args)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except (query.NotFound, tracking.TrackingError) as exc:
        raise click.ClickException(str(exc)) from None


def percent(ctx: click.Context, param: click.Parameter, value: str) -> float:
    """`5` or `5%` -> 0.05."""
    try:
        fraction = float(str(value).strip().rstrip("%")) / 100
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a percentage like 5 or 5%") from None
    if fraction < 0:
        raise click.BadParameter(f"must be >= 0, got {value}")
    return fraction


def experiment_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """'' (MLproject's default): the experiment `mlflow run` runs this entry point in (where
    its `main` entry point logged the sweeps), else flexbench."""
    if value:
        return value
    from flexbench import query

    return query.mlflow_run_experiment() or "flexbench"


def reading(formats: dict[str, Callable]) -> Callable[[Callable], Callable]:
    """--tracking-uri, --experiment and --format (a name in `formats`) of the commands that
    read the server."""

    def decorate(f: Callable) -> Callable:
        choice = click.Choice(list(formats))
        f = click.option("--format", "fmt", type=choice, default="table", show_default=True)(f)
        return store(f)

    return decorate


def store(f: Callable) -> Callable:
    """--tracking-uri and --experiment."""
    f = click.option(
        "--experiment",
        default="flexbench",
        show_default=True,
        callback=experiment_name,
        help="MLflow experiment (by name); '' under `mlflow run`: the experiment it runs in",
    )(f)
    return click.option(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )(f)


WHERE_HELP = "KEY=VALUE[,KEY=VALUE] on params and tags, e.g. score_mod=causal,dtype=bfloat16,"


def selecting(f: Callable) -> Callable:
    """--sweep, --sweep-id and --where: which config runs a command reads."""
    where_help = WHERE_HELP + "torch=2.11.0; repeatable (AND)"
    f = click.option("--where", multiple=True, help=where_help)(f)
    sweep_id_help = "every sweep run (shard) with this sweep id"
    f = click.option("--sweep-id", default=None, help=sweep_id_help)(f)
    return click.option(
        "--sweep",
        default="latest",
        show_default=True,
        metavar="RUN_ID|latest|all",
        help="a sweep run id, the latest sweep (all its shards), or all sweeps",
    )(f)


@cli.command(epilog=EPILOG_SUMMARY)
@reading(summary_api.FORMATS)
@selecting
def summary(
    tracking_uri: str | None,
    experiment: str,
    fmt: str,
    sweep: str,
    sweep_id: str | None,
    where: tuple[str, ...],
) -> None:
    """Print a sweep's per-config table and Average/Max/Min speedups, read from MLflow."""
    result = _report(summary_api.summary, tracking_uri, experiment, sweep, where, sweep_id)
    click.echo(_report(summary_api.render_summary, result, fmt))


@cli.command(epilog=EPILOG_COMPARE)
@click.argument("base", required=False)
@click.argument("contender", required=False)
@reading(compare_api.FORMATS)
@click.option("--base-where", multiple=True, help="select the base: " + WHERE_HELP + "...")
@click.option("--contender-where", multiple=True, help="select the contender, as --base-where")
@click.option("--where", multiple=True, help="narrow both sides, as --base-where")
@click.option(
    "--threshold",
    default="5",
    show_default=True,
    callback=percent,
    help="percent change that counts, when also beyond both runs' p20-p80 spread",
)
@click.option(
    "--ignore-clocks",
    is_flag=True,
    help="judge pairs measured in different regimes, throttled or unconverged, too",
)
def compare(
    base: str | None,
    contender: str | None,
    tracking_uri: str | None,
    experiment: str,
    fmt: str,
    base_where: tuple[str, ...],
    contender_where: tuple[str, ...],
    where: tuple[str, ...],
    threshold: float,
    ignore_clocks: bool,
) -> None:
    """Match two sweeps' configs by identity; per-config timing ratios; exit 1 on regression.

    BASE and CONTENDER are sweep run ids (or latest / all); without them, --base-where and
    --contender-where select each side from all sweeps.
    """
    sides = _report(compare_api.sides, base, contender, base_where, contender_where, where)
    args = (*sides, tracking_uri, experiment, threshold, ignore_clocks)
    result = _report(compare_api.compare, *args)
    click.echo(_report(compare_api.render_compare, result, fmt))
    if not result.matches:
        click.echo("Error: no config is on both sides; nothing was compared", err=True)
    sys.exit(result.exit_code)


EPILOG_REPORT = """\b
Examples:
  flexbench report --html report.html               # the latest sweep
  flexbench report --html causal.html --sweep all --where score_mod=causal,torch=2.11.0
"""


@cli.command("report", epilog=EPILOG_REPORT)
@click.option(
    "--html",
    "path",
    required=True,
    type=click.Path(dir_okay=False, writable=True),
    help="file to write: one self-contained HTML page",
)
@store
@selecting
def report_command(
    path: str,
    tracking_uri: str | None,
    experiment: str,
    sweep: str,
    sweep_id: str | None,
    where: tuple[str, ...],
) -> None:
    """Write a sweep's report as one HTML file: speedup heatmap (mods x shapes), TFLOP/s against
    the GPU's peak, a history sparkline per config, environment, failed configs.

    Every sweep run also carries it as the artifact report.html.
    """
    from pathlib import Path

    from flexbench import history, query

    selection = query.Selection(sweep, sweep_id, where)
    text = _report(history.page, selection, tracking_uri, experiment)
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise click.ClickException(f"--html {path}: {exc.strerror}; pass a writable path") from None
    click.echo(f"wrote {path} ({len(text) // 1024} KiB)")


EPILOG_HISTORY = """\b
Examples:
  flexbench history                                  # every config over all sweeps
  flexbench history --where score_mod=causal --last 30 --format markdown
  flexbench history --since 2026-11-01 --z 4 --min-change 3%   # exit 1 on a regression (CI)
  flexbench history --comparable-on gpu,regime,torch  # a torch upgrade starts a new history
"""


@cli.command(epilog=EPILOG_HISTORY)
@reading(history_api.FORMATS)
@click.option("--where", multiple=True, help=WHERE_HELP + "gpu=...; repeatable (AND)")
@click.option(
    "--since",
    type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"]),
    default=None,
    help="only runs started on or after this date (UTC), e.g. 2026-11-01",
)
@click.option("--last", type=click.IntRange(min=1), default=None, help="only the last N sweeps")
@click.option(
    "--lookback",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="comparable points before a step that form its baseline",
)
@click.option(
    "--z",
    "z",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="z-score (on log times) a change must reach",
)
@click.option(
    "--min-change",
    default="5",
    show_default=True,
    callback=percent,
    help="percent change a change must also reach",
)
@click.option(
    "--comparable-on",
    default="gpu,regime",
    show_default=True,
    help="environment keys that must agree for points to be compared (add driver, cuda, "
    "torch, triton for a stricter history); changes of the others are noted",
)
@click.option(
    "--timing",
    "timings",
    multiple=True,
    type=click.Choice(history_api.TIMINGS),
    help="timings to judge (default: all measured)",
)
def history(
    tracking_uri: str | None,
    experiment: str,
    fmt: str,
    where: tuple[str, ...],
    since: object,
    last: int | None,
    lookback: int,
    z: float,
    min_change: float,
    comparable_on: str,
    timings: tuple[str, ...],
) -> None:
    """Each config's timings across sweeps, oldest first; flag step changes; exit 1 when any
    config regressed.

    Per config and timing, the newest level (the sweeps since the latest step) is compared with
    the --lookback comparable sweeps before that step: a regression is slower by at least
    --min-change and --z standard deviations (of those sweeps' medians, or of their runs' own
    p20-p80 noise if larger), all on the log of the median. Statuses: regressed, improved,
    stable, insufficient history (fewer than 3 comparable sweeps before), not comparable (the
    newest run ran on another GPU or regime, or was throttled or unconverged). Where the
    environment (torch, triton, driver, ...) changed, the table says so.
    """
    rule = history_api.Rule(
        lookback=lookback, z=z, min_change=min_change, min_history=min(3, lookback)
    )
    keys = _split((comparable_on,))
    result = _report(
        history_api.history,
        tracking_uri,
        experiment,
        where,
        since,
        last,
        rule,
        keys,
        timings or history_api.TIMINGS,
    )
    click.echo(_report(history_api.render, result, fmt))
    sys.exit(result.exit_code)


@cli.command()
@click.argument("run_id")
@click.option(
    "--tracking-uri",
    default=None,
    help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
)
def repro(run_id: str, tracking_uri: str | None) -> None:
    """Print the `flexbench run` command that measures config run RUN_ID's config alone.

    \b
    Example:
      flexbench repro 3f2a9c1b7e4d4b0f9a8c1d2e3f4a5b6c
      $(flexbench repro RUN_ID) --resume   # skipped: already measured on this stack
    """
    from flexbench import repro as api

    click.echo(_report(api.lookup, run_id, tracking_uri))


EPILOG_TUNE = """\b
Examples:
  flexbench tune                          # 8x16x4096x128 bf16 noop,causal, default grid
  flexbench tune -mods causal --calculate-bwd --grid '{"BLOCK_M": [64, 128], "BLOCK_N": [64]}'
  flexbench tune --device cpu -b 1 -nh 2 -s 64 -d 16 -dtype float32 -mods causal \\
      --grid '{"BLOCK_M": [32, 64], "BLOCK_N": [32], "num_warps": [4], "num_stages": [1]}'
  flexbench summary                       # afterwards: every candidate of the latest tune
"""
# `run` options that `tune` shares (same flags, help and checks), with tune's defaults: the
# issue's H100 case, not run's 72-config sweep (x56 candidates each).
TUNE_SHARED = {
    "batch": ("8",),
    "heads": ("16",),
    "seq_lens": ("4096",),
    "head_dims": ("128",),
    "score_mods": ("noop,causal",),
    "dtypes": ("bfloat16",),
    "kv_heads": None,
    "kv_lens": None,
    "decode": None,
    "calculate_bwd": None,
    "dynamic": None,
    "device": None,
    "timer": None,
    "regime": None,
    "max_noise": None,
    "min_samples": None,
    "max_time": None,
    "sample_ms": None,
    "throttle_threshold": None,
    "align": None,
    "experiment": None,
    "tracking_uri": None,
    "tracking_timeout": None,
    "journal": None,
    "quiet": None,
}


def _shared_option(name: str, default: object) -> click.Parameter:
    """A copy of `run`'s option `name`, with another default unless `default` is None."""
    import copy

    found = [p for p in run.params if p.name == name]
    if not found:
        raise RuntimeError(f"flexbench tune shares run's option '{name}', which run lacks")
    option = copy.copy(found[0])
    if default is not None:  # tune's own default, not run's device-dependent one
        option.default, option.show_default = default, True
        option.help = (option.help or "").split(" [default")[0]
    return option


@cli.command(epilog=EPILOG_TUNE)
@click.option(
    "--grid",
    default="",
    help='kernel options to search, JSON of lists (default {"BLOCK_M": [32, 64, 128], '
    '"BLOCK_N": [32, 64, 128], "num_warps": [4, 8], "num_stages": [1, 2, 3]}); flex applies '
    "plain num_warps/num_stages to both kernels and BLOCK_M/BLOCK_N to the forward (the backward "
    "reads BLOCK_M1/N1/M2/N2); fwd_/bwd_ prefixed names reach one kernel only, e.g. fwd_num_warps "
    "to tune the forward with --calculate-bwd and leave the backward at its default",
)
@click.option(
    "--autotune-candidate/--no-autotune-candidate",
    "autotune",
    default=True,
    show_default=True,
    help="also measure a max-autotune compile",
)
@click.option("--run-name", default=None, help="name of the tune sweep run")
def tune(**opts: object) -> None:
    """Per config, search flex kernel options: default, max-autotune and a grid, each a checked
    child run of the config's tune run; the fastest passing one is tagged flexbench.best=true.

    Grid points that cannot work are skipped with their reason (block larger than the
    sequence, not dividing the BlockMask block of 128, shared memory of the GPU).
    """
    from flexbench import tune as api

    opts["device"] = _default_device(str(opts["device"]))
    outcome = _call_api(api.run, api_options(opts))
    if outcome.results:
        click.echo(outcome.table())
    click.echo(api.closing_line(outcome), err=True)
    sys.exit(outcome.exit_code)


tune.params[:0] = [_shared_option(name, default) for name, default in TUNE_SHARED.items()]


def main(argv: list[str] | None = None) -> None:
    """Entry point: every error is one line on stderr (exit 2 usage, 1 runtime). Run as the
    process's own command line (`argv` None), the process ends without the interpreter's slow
    teardown once the command is done (fastexit)."""
    if argv is None:
        from flexbench import fastexit

        fastexit.run(lambda: _main(None))
    _main(argv)


def _main(argv: list[str] | None) -> None:
    for name in QUIET_LOGGERS:  # MLflow's notes on creating a SQLite store are not ours to print
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        cli.main(args=argv, prog_name="flexbench", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:  # bare `flexbench`: the help, not an error
        click.echo(exc.format_message())
        sys.exit(0)
    except click.UsageError as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except OSError as exc:  # e.g. an unwritable --journal: name the file and the fix
        click.echo(f"Error: {exc}; check the path and its permissions (--journal PATH)", err=True)
        sys.exit(1)
