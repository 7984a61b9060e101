"""The ``autopar`` command: plan, show, replan, export, profile, clusters.

Exit status: 0 success; 1 no plan fits (``InfeasiblePlanError``); 2 bad usage or input
(``PlanValidationError``, ``ClusterSpecError``, ``UserInputError``, ``CaptureError``, and
command-line usage errors); 3 an internal error (a bug: ``--debug`` shows the traceback);
130 / 143 interrupted by SIGINT / SIGTERM (128 + the signal's number, as shells report it).
Output paths are checked before any work, and files are written through a temporary file and a
rename, so an interrupted command leaves the old file or none, never half of one. Prints from
user model code go to stderr, so stdout holds only autopar's output (``--json``: JSON alone).
Errors go to stderr as one red line; ``--json`` output on stdout is documented in
``docs/cli-json.md``. The logic lives in the library; this file only parses and prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from autopar._compat import StrEnum
from autopar._io import check_writable, write_atomic
from autopar._signals import Interrupted, signals_raise
from autopar.cost_models.cluster import TRAINING_DTYPES
from autopar.errors import AutoparError, InfeasiblePlanError, UserInputError
from autopar.export.base import ExportTarget
from autopar.layout import PIN_ALIASES, PIN_TYPES, Pins, Runtime
from autopar.plan import Plan

if TYPE_CHECKING:
    from autopar.cost_models.cluster import Cluster

log = logging.getLogger(__name__)

EXIT_OK, EXIT_INFEASIBLE, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
"""Exit statuses (see the module docstring)."""

EXIT_SIGNAL_BASE = 128
"""An interrupted command exits with this plus the signal's number (SIGINT 130, SIGTERM 143)."""

PLAN_DTYPES = TRAINING_DTYPES
"""Training precisions ``plan --dtype`` accepts (those the cost models price), or their aliases."""

RICH_TABLE_EXTRA_COLUMNS = 12
"""Width the rich table's borders and padding add to the plain table's."""

MODEL_HELP = ("gpt:SIZE (e.g. gpt:175b), mlp:SIZE, llama:8b|70b|405b, hf:path/to/config.json, "
              "or path/to/file.py:factory where factory() returns (module, example_inputs)")

app = typer.Typer(
    name="autopar",
    help="Automatic parallelization planner for PyTorch: find, explain and export the fastest "
         "data/tensor/pipeline-parallel plan that fits a GPU cluster.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _out() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of internal errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what each step does.")] = False,
) -> None:
    """Plan, explain and export parallel training layouts."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


# ---- pins ---------------------------------------------------------------------------------------

def parse_pins(pins: Sequence[str]) -> Pins:
    """``["tp=8", "recompute=full", "sp=on"]`` → ``Pins`` (``Pins.from_strings``: the one parser of pins)."""
    return Pins.from_strings(pins)


# ---- shared helpers -----------------------------------------------------------------------------


def load_cluster(spec: str, nodes: int | None) -> Cluster:
    """A preset name or a YAML file (``.yaml``/``.yml`` or an existing file), with ``nodes`` if given."""
    from autopar.cost_models.cluster import Cluster

    return Cluster.resolve(spec, nodes=nodes)


def _fingerprint(model: str, seq: int | None) -> str:
    from autopar.capture import capture
    from autopar.models import resolve_model

    with _user_prints_to_stderr():
        resolved = resolve_model(model, seq_len=seq)
        return capture(resolved.module, resolved.example_inputs).fingerprint()


def load_plan(path: Path, *, model: str | None, seq: int | None) -> Plan:
    """Read a plan file; with ``model``, refuse a plan made for another model (or sequence length)."""
    plan = Plan.load(path)
    if model is not None:
        plan.validate_for(_fingerprint(model, seq if seq is not None else plan.seq_len))
    return plan


class _Progress:
    """A rich progress bar on stderr fed by the planner's ``(phase, fraction)`` callback."""

    PHASES: dict[str, tuple[float, float]] = {"model": (0.0, 0.05), "capture": (0.05, 0.3), "price": (0.3, 0.45),
                                              "search": (0.45, 1.0), "done": (1.0, 1.0)}

    def __init__(self, enabled: bool) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        console = _err()
        self._bar = Progress(TextColumn("{task.description:<10}"), BarColumn(), TimeElapsedColumn(),
                             console=console, transient=True, disable=not (enabled and console.is_terminal))
        self._task = self._bar.add_task("model", total=1.0)

    def __enter__(self) -> Callable[[str, float], None]:
        self._bar.start()
        return self.update

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def update(self, phase: str, fraction: float) -> None:
        lo, hi = self.PHASES.get(phase, (0.0, 1.0))
        self._bar.update(self._task, description=phase, completed=lo + (hi - lo) * min(max(fraction, 0.0), 1.0))


# ---- commands -----------------------------------------------------------------------------------


@app.command()
def plan(
    model: Annotated[str, typer.Argument(help=MODEL_HELP, show_default=False)],
    cluster: Annotated[str, typer.Option("--cluster", "-c", help="Preset name (see `autopar clusters`) or a "
                                         "cluster YAML file.", show_default=False)],
    global_batch: Annotated[int, typer.Option("--global-batch", "-b", min=1, help="Samples per optimizer step.",
                                              show_default=False)],
    nodes: Annotated[int | None, typer.Option(help="Number of nodes (default: the preset's or file's).")] = None,
    seq: Annotated[int | None, typer.Option(help="Sequence length (default: the model's).")] = None,
    pin: Annotated[list[str] | None, typer.Option(
        help=f"Fix a layout knob, KEY=VALUE, repeatable; keys: {', '.join(PIN_TYPES)}.")] = None,
    top: Annotated[int, typer.Option(min=1, help="How many ranked plans to show.")] = 5,
    out: Annotated[Path | None, typer.Option(help="Write the best plan to this JSON file.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the ranked plans as JSON (docs/cli-json.md).")
                        ] = False,
    calibration: Annotated[Path | None, typer.Option(help="Calibration table from `autopar profile`.")] = None,
    dtype: Annotated[str | None, typer.Option(help="Training precision: bfloat16, float16 or float32 (default: the "
                                              "GPU's best 16-bit type, bf16 or fp16 on V100).")] = None,
    objective: Annotated[str, typer.Option(help="Rank by throughput, or by goodput (throughput once failures, "
                                           "restarts and checkpoints are paid for).")] = "throughput",
    contingency: Annotated[int, typer.Option(min=0, help="Precompute plans for losing 1 … N nodes, so that "
                                             "`autopar replan` answers at once.")] = 0,
    runtime: Annotated[Runtime, typer.Option(help="The training program to price: autopar (what `autopar.parallelize` "
                                         "runs) or megatron (Megatron-LM's, for `autopar export --to megatron`).")
                       ] = Runtime.AUTOPAR,
) -> None:
    """Find the fastest plans for MODEL on a cluster and print them ranked.

    Example: autopar plan gpt:175b -c dgx-a100-80gb --nodes 8 -b 64 --seq 2048 --pin tp=8 --out plan.json
    """
    pins = parse_pins(pin or [])  # cheap checks first: no torch import before they pass
    dtype = check_dtype(dtype)
    if out is not None:
        check_writable(out, what="--out")
    target = load_cluster(cluster, nodes)
    from autopar.goodput import parse_objective

    goal = parse_objective(objective)
    table = _load_calibration(calibration)
    with _Progress(enabled=not json_out) as progress, _user_prints_to_stderr():
        progress("model", 0.0)
        from autopar import api
        from autopar.models import resolve_model

        resolved = resolve_model(model, seq_len=seq)
        ranked = api.plan_ranked(resolved.module, resolved.example_inputs, cluster=target,
                                 global_batch_size=global_batch, constraints=pins, top_k=top, dtype=dtype,
                                 calibration=table, progress=progress, objective=goal, runtime=runtime)
    plans = [dataclasses.replace(p, model_name=resolved.name) for p in ranked]
    if contingency:
        from autopar.replanning import precompute_contingencies

        plans[0] = precompute_contingencies(plans[0], max_lost_nodes=contingency, cluster=target,
                                            model=resolved.module, example_inputs=resolved.example_inputs,
                                            templates=[p.layout for p in plans], calibration=table,
                                            objective=objective, constraints=pins)
    if out is not None:
        plans[0].save(out)  # atomic: an interrupt leaves no partial file
    if json_out:
        typer.echo(json.dumps([p.to_dict() for p in plans], indent=2))
        return
    _print_ranked(plans)
    typer.echo("\n" + plans[0].explain())
    from autopar.report.text import format_goodput

    typer.echo("\n" + format_goodput(plans))
    if out is not None:
        typer.echo(f"\nbest plan written to {out}; see it with: autopar show {out}")


def check_dtype(dtype: str | None) -> str | None:
    """The training dtype's canonical name (``bf16`` → ``bfloat16``), before any planning; None stays None.

    Raises:
        UserInputError: Not one of ``PLAN_DTYPES`` or their aliases.

    Example:
        >>> check_dtype("bf16")
        'bfloat16'
    """
    from autopar.cost_models.cluster import DTYPE_ALIASES

    if dtype is None:  # the library picks its default
        return None
    name = DTYPE_ALIASES.get(dtype.strip().lower(), dtype.strip().lower())
    if name not in PLAN_DTYPES:
        aliases = ", ".join(f"{a}={n}" for a, n in DTYPE_ALIASES.items() if n in PLAN_DTYPES)
        raise UserInputError(f"--dtype {dtype!r} is not a training precision; use one of {', '.join(PLAN_DTYPES)} "
                             f"(aliases: {aliases})")
    return name


@contextlib.contextmanager
def _user_prints_to_stderr() -> Iterator[None]:
    """Send what user model code prints (at import, build or trace time) to stderr, keeping stdout clean."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _load_calibration(path: Path | None) -> Any:
    if path is None:
        return None
    from autopar.cost_models.profiling.calibration import CalibrationTable

    return CalibrationTable.load(path)


def _print_ranked(plans: Sequence[Plan]) -> None:
    from autopar.report.tables import ranked_table
    from autopar.report.text import format_ranked

    console = _out()
    text = format_ranked(plans)
    widest = max(len(line) for line in text.splitlines())
    if console.is_terminal and widest + RICH_TABLE_EXTRA_COLUMNS <= console.width:
        console.print(ranked_table(plans))
    else:  # pipes, files and narrow terminals get the plain table: stable, never truncated
        typer.echo(text)


@app.command()
def show(
    plan_file: Annotated[Path, typer.Argument(help="Plan JSON from `autopar plan --out`.", show_default=False)],
    model: Annotated[str | None, typer.Option(help=f"Check the plan was made for this model ({MODEL_HELP}).")
                     ] = None,
    seq: Annotated[int | None, typer.Option(help="Sequence length for --model (default: the plan's).")] = None,
    chart: Annotated[Path | None, typer.Option(help="Draw the pipeline timeline and memory: .png, .svg or .html."
                                               )] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Explain one plan: stages, sharding, memory, communication, and why it won."""
    from autopar.report.text import format_plan

    if chart is not None:
        check_writable(chart, what="--chart")
    loaded = load_plan(plan_file, model=model, seq=seq)
    if json_out:
        typer.echo(json.dumps(loaded.to_dict(), indent=2))
    else:
        typer.echo(format_plan(loaded))
    if chart is not None:
        from autopar.report.charts import save_chart

        save_chart(loaded, chart)
        _err().print(f"chart written to {escape(str(chart))}")


@app.command()
def replan(
    plan_file: Annotated[Path, typer.Argument(help="Plan JSON from `autopar plan --out`.", show_default=False)],
    lost_nodes: Annotated[int, typer.Option("--lost-nodes", "-k", min=1, help="Nodes that failed.",
                                            show_default=False)],
    model: Annotated[str | None, typer.Option(help="The plan's model, when the plan has no contingency for this "
                                              "failure (default: the model named in the plan).")] = None,
    cluster: Annotated[str | None, typer.Option("--cluster", "-c", help="The cluster the plan was made for "
                                                "(default: the preset named in the plan).")] = None,
    exhaustive: Annotated[bool, typer.Option(help="Run the full search instead of re-pricing templates.")] = False,
    objective: Annotated[str, typer.Option(help="Rank by throughput or by goodput.")] = "throughput",
    out: Annotated[Path | None, typer.Option(help="Write the new plan to this JSON file.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the new plan as JSON.")] = False,
    calibration: Annotated[Path | None, typer.Option(help="Calibration table the plan was made with.")] = None,
    pin: Annotated[list[str] | None, typer.Option(
        help="The pins the plan was made with, KEY=VALUE, repeatable (dp is the survivors' to choose).")] = None,
) -> None:
    """The best plan for the cluster left after losing nodes: same model, same global batch where possible.

    Example: autopar replan plan.json --lost-nodes 2 --pin tp=8 --out plan-2.json
    """
    from autopar.replanning import contingency_for, replan as replan_plan
    from autopar.report.text import format_plan

    pins = parse_pins(pin or [])
    loaded = Plan.load(plan_file)
    kwargs: dict[str, Any] = {"exhaustive": exhaustive, "objective": objective, "constraints": pins,
                              "calibration": _load_calibration(calibration),
                              "cluster": load_cluster(cluster, None) if cluster is not None else None}
    if exhaustive or contingency_for(loaded, lost_nodes, pins) is None:
        from autopar.models import resolve_model

        resolved = resolve_model(model or loaded.model_name, seq_len=loaded.seq_len)
        kwargs.update(model=resolved.module, example_inputs=resolved.example_inputs)
    new = replan_plan(loaded, lost_nodes=lost_nodes, **kwargs)
    if out is not None:
        new.save(out)
    if json_out:
        typer.echo(json.dumps(new.to_dict(), indent=2))
        return
    typer.echo(format_plan(new))
    if out is not None:
        typer.echo(f"\nnew plan written to {out}")


@app.command()
def export(
    plan_file: Annotated[Path, typer.Argument(help="Plan JSON from `autopar plan --out`.", show_default=False)],
    to: Annotated[ExportTarget, typer.Option("--to", "-t", help="Target library.", show_default=False)],
    out: Annotated[Path | None, typer.Option(help="Write here (extra files go next to it); default: stdout.")
                   ] = None,
    model: Annotated[str | None, typer.Option(help="Check the plan was made for this model.")] = None,
    seq: Annotated[int | None, typer.Option(help="Sequence length for --model (default: the plan's).")] = None,
) -> None:
    """Write a plan as Megatron-LM arguments, a DeepSpeed config, torchtitan settings, or JSON."""
    from autopar.export import export_plan

    if out is not None:
        check_writable(out, what="--out")
    loaded = load_plan(plan_file, model=model, seq=seq)
    result = export_plan(loaded, to)
    err = _err()
    if out is None:
        typer.echo(result.text, nl=False)
        for name, text in result.extras.items():
            err.print(f"[bold]--- {escape(name)} (pass --out to write it as a file) ---[/]")
            err.print(text, markup=False)
    else:
        _write(out, result.text)
        for name, text in result.extras.items():
            _write(out.parent / name, text)
        err.print(f"wrote {escape(str(out))}" + "".join(f", {escape(str(out.parent / n))}" for n in result.extras))
    for note in (*result.notes, *_runtime_notes(loaded, to)):
        err.print(f"[yellow]note:[/] {escape(note)}")


def _runtime_notes(plan: Plan, to: ExportTarget) -> tuple[str, ...]:
    """A warning when a plan goes to Megatron-LM priced for another program (its memory and step differ)."""
    if to is ExportTarget.MEGATRON and plan.runtime is not Runtime.MEGATRON:
        return (f"this plan was priced for runtime {plan.runtime.value}'s program, not Megatron-LM's (its gradient "
                "buffer, distributed optimizer and pipeline receives hold other bytes); re-plan with "
                "`autopar plan ... --runtime megatron` to price what Megatron-LM will run",)
    return ()


def _write(path: Path, text: str) -> None:
    write_atomic(path, text)  # temporary file and rename; raises UserInputError with the OS reason


@app.command()
def profile(
    model: Annotated[str, typer.Argument(help=MODEL_HELP, show_default=False)],
    out: Annotated[Path, typer.Option(help="Calibration file to write (other devices' tables are kept).")
                   ] = Path("calib.json"),
    seq: Annotated[int | None, typer.Option(help="Sequence length (default: the model's).")] = None,
    batch: Annotated[int, typer.Option(min=1, help="Batch size of the profiled ops.")] = 1,
    also_batch: Annotated[list[int] | None, typer.Option(
        "--also-batch", min=1, help="Also time the ops with the model at this batch size (repeatable): micro-batches "
        "between measured sizes are priced from the measurements, not scaled from --batch.")] = None,
    device: Annotated[str | None, typer.Option(help="torch device to time on (default: cuda if present).")
                      ] = None,
    repeats: Annotated[int | None, typer.Option(min=1, help="Timed runs per op (default: the profiler's).")
                       ] = None,
    dtype: Annotated[str | None, typer.Option(help="Cast floating inputs to this dtype (e.g. bfloat16).")] = None,
    ranks: Annotated[int | None, typer.Option(min=2, help="Measure this machine as a cluster of N gloo ranks "
                                              "(one thread each, all at once) and write --cluster-out too.")] = None,
    cluster_out: Annotated[Path, typer.Option(help="Cluster YAML to write with --ranks (for `plan --cluster`).")
                           ] = Path("local-cluster.yaml"),
) -> None:
    """Time MODEL's ops on this machine's device and write a calibration table for `plan --calibration`."""
    from rich.progress import Progress

    from autopar.capture import capture
    from autopar.cost_models.profiling.profiler import profile_graph
    from autopar.models import resolve_model

    check_writable(out, what="--out")
    with _user_prints_to_stderr():
        resolved = resolve_model(model, seq_len=seq, batch=batch)
        graph = capture(resolved.module, resolved.example_inputs)
        others = {}
        for b in sorted(set(also_batch or ()) - {batch}):
            other = resolve_model(model, seq_len=seq, batch=b)
            others[b / batch] = capture(other.module, other.example_inputs)
    if ranks is not None:
        _profile_local_cluster(graph, ranks=ranks, out=out, cluster_out=cluster_out, batch_graphs=others)
        return
    kwargs: dict[str, Any] = {"device": device, "dtype": dtype, "batch_graphs": others} | (
        {"repeats": repeats} if repeats else {})
    with Progress(console=_err(), transient=True) as bar:
        task = bar.add_task("profiling", total=None)
        table = profile_graph(graph, progress=lambda done, total: bar.update(task, completed=done, total=total),
                              **kwargs)
    table.save(out)
    typer.echo(f"{len(table.entries)} ops timed on {table.device_name} ({len(table.skipped)} skipped); "
               f"calibration written to {out}")


def _profile_local_cluster(graph: Any, *, ranks: int, out: Path, cluster_out: Path, batch_graphs: Any) -> None:
    """``profile --ranks N``: the machine as N gloo ranks; cluster YAML plus the op table, same device name."""
    from autopar.cost_models.profiling.local_cluster import cluster_yaml, measure_local_cluster

    measured = measure_local_cluster(ranks, graph=graph, batch_graphs=batch_graphs)
    assert measured.calibration is not None  # a graph was given
    measured.calibration.save(out)
    _write(cluster_out, cluster_yaml(measured, name=cluster_out.stem))
    typer.echo(f"{ranks} ranks of {measured.device_name} measured; cluster written to {cluster_out}, "
               f"{len(measured.calibration.entries)} ops timed, calibration written to {out}")


@app.command()
def clusters(
    json_out: Annotated[bool, typer.Option("--json", help="Print the presets as JSON.")] = False,
) -> None:
    """List the cluster presets: GPU, memory, peak bf16 TFLOP/s, links."""
    from autopar.cost_models.cluster import Cluster, list_presets
    from autopar.report.tables import cluster_dict, format_clusters

    presets = [Cluster.preset(name) for name in list_presets()]
    if json_out:
        typer.echo(json.dumps([cluster_dict(c) for c in presets], indent=2))
        return
    typer.echo(format_clusters(presets))
    typer.echo("\nuse: autopar plan MODEL --cluster PRESET --nodes N, or a YAML file with `preset: NAME` "
               "and overrides")


# ---- entry point --------------------------------------------------------------------------------


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status (errors mapped as in the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("AUTOPAR_DEBUG", "") not in ("", "0")
    err = _err()
    try:
        with signals_raise():
            status = app(args=args, prog_name="autopar", standalone_mode=False)
    except _EXIT as e:  # --help, --version, completion
        return int(getattr(e, "exit_code", 0))
    except _USAGE as e:  # bad flags or arguments: the parser's own message
        e.show()  # type: ignore[attr-defined]
        return EXIT_USAGE
    except Interrupted as e:
        err.print(f"[red]interrupted by {e.name}; no output was written[/]")
        return EXIT_SIGNAL_BASE + e.signum
    except (KeyboardInterrupt, *_ABORT):
        err.print("[red]interrupted by SIGINT; no output was written[/]")
        return EXIT_SIGNAL_BASE + signal.SIGINT
    except AutoparError as e:
        if debug:
            err.print(escape(traceback.format_exc()), markup=True)
        err.print(f"[red]error: {escape(str(e))}[/]")
        return EXIT_INFEASIBLE if isinstance(e, InfeasiblePlanError) else EXIT_USAGE
    except Exception as e:  # anything else is a bug: say so instead of showing torch's internals
        if debug:
            err.print(escape(traceback.format_exc()))
        err.print(f"[red]internal error: {type(e).__name__}: {escape(str(e))}[/]")
        err.print("this is a bug in autopar; please file an issue with the command you ran"
                  + ("" if debug else " (re-run with --debug to see the traceback)"))
        return EXIT_INTERNAL
    return status if isinstance(status, int) else EXIT_OK  # typer returns Exit(code)'s code here


def _parser_exceptions() -> tuple[tuple[type[BaseException], ...], ...]:
    """(exit, usage, abort) exception classes of typer, and of click when typer still uses it (typer < 0.29)."""
    exits: list[type[BaseException]] = [typer.Exit]
    usage: list[type[BaseException]] = [typer.TyperException] if hasattr(typer, "TyperException") else []
    aborts: list[type[BaseException]] = [typer.Abort]
    try:
        import click
    except ImportError:
        return tuple(exits), tuple(usage), tuple(aborts)
    exits.append(click.exceptions.Exit)
    usage.append(click.ClickException)
    aborts.append(click.exceptions.Abort)
    return tuple(exits), tuple(usage), tuple(aborts)


_EXIT, _USAGE, _ABORT = _parser_exceptions()


def main() -> None:
    """Console-script entry point (``autopar``)."""
    sys.exit(run())


__all__ = ["PIN_ALIASES", "PIN_TYPES", "PLAN_DTYPES", "app", "check_dtype", "load_cluster",
           "load_plan", "main", "parse_pins", "run"]
