"""``clara eval ID...`` and ``clara eval matrix ID... --sets domain=FILE...``.

``eval`` is a click group whose first argument, when it is not a subcommand (``run``, ``matrix``), is taken as
an adapter id of the default form: ``clara eval ID...`` is ``clara eval run ID...``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..output import echo_json, echo_table

DEFAULT_TOLERANCE = (
    0.02  # keep in step with evaluation.runner.DEFAULT_TOLERANCE (not imported: no heavy imports)
)
METRIC_COLUMNS = ("ppl", "bpb", "qa_em", "qa_f1", "style_centroid_cos", "style_mean_cos")


class EvalGroup(click.Group):
    """A group whose default command is ``run``: ``clara eval ID...`` works without naming it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def _say(line: str) -> None:
    click.echo(line, err=True)


def _options(window, stride, batch_size, max_tokens=48, engine_options=()) -> Any:
    from ..errors import InvalidInput
    from ..evaluation.runner import Options

    for name, value in (("--window", window), ("--stride", stride), ("--batch-size", batch_size)):
        if value is not None and value < (2 if name == "--window" else 1):
            raise InvalidInput(f"{name} must be at least {2 if name == '--window' else 1}, got {value}")
    engine = click.get_current_context().find_root().obj.engine_name
    pairs = {}
    for pair in engine_options:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InvalidInput(f"engine option {pair!r} must read NAME=VALUE (e.g. -o device=cpu)")
        pairs[key.strip()] = value
    return Options(
        window=window,
        stride=stride,
        batch_size=batch_size,
        max_tokens=max_tokens,
        engine=engine,
        engine_options=pairs,
        progress=sys.stderr.isatty(),
    )


_shared = [
    click.option("--base-too", is_flag=True, help="Add the base model (no adapter) as a row."),
    click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout."),
    click.option(
        "--window",
        type=int,
        help="Tokens per perplexity window (default: the base's context, at most 2048; as 'clara train' scores).",
    ),
    click.option("--stride", type=int, help="Tokens between window starts (default: half the window)."),
    click.option("--batch-size", type=int, default=8, show_default=True, help="Windows per forward pass."),
]


def shared(fn: Any) -> Any:
    for option in reversed(_shared):
        fn = option(fn)
    return fn


@click.group(cls=EvalGroup, invoke_without_command=False, no_args_is_help=True)
def eval_group() -> None:
    """Evaluate adapters: perplexity, bits per byte, domain QA, style; regression gate; domain matrix.

    \b
    clara eval ID... [--dev FILE] [--qa FILE] [--style-ref FILE] [--base-too] [--json]
                     [--fail-on-regression [--tolerance 0.02]]
    clara eval matrix ID... --sets DOMAIN=FILE... [--base-too] [--plot FILE.png] [--json]

    'clara eval ID...' is short for 'clara eval run ID...'. Every result goes into the registry's metrics
    history and into metadata/reports/<timestamp>-eval.json.
    """


@eval_group.command("run")
@click.argument("adapter_ids", nargs=-1, required=True, metavar="ID...")
@click.option(
    "--dev",
    type=click.Path(path_type=Path),
    help='Dev set (JSONL of {"text"}; training shapes too) for ppl and bpb (default: each adapter\'s '
    "dev set recorded at training).",
)
@click.option(
    "--qa",
    type=click.Path(path_type=Path),
    help='QA set, JSONL of {"prompt", "answer"}: greedy answers through the serving engine, exact match and '
    "token F1.",
)
@click.option(
    "--style-ref",
    type=click.Path(path_type=Path),
    help="Reference corpus (JSONL) for style coherence of the adapter's generations (prompts: the --qa prompts, "
    "else the first words of dev texts).",
)
@shared
@click.option(
    "--fail-on-regression",
    is_flag=True,
    help="Exit 1 when a metric is worse than the previous version's (same domain and method) on the same eval "
    "set (same sha256) by more than --tolerance.",
)
@click.option(
    "--tolerance",
    type=click.FloatRange(0, 1),
    default=DEFAULT_TOLERANCE,
    show_default=True,
    help="Relative tolerance of the regression gate (0.02: 2 percent worse still passes).",
)
@click.option(
    "--max-tokens", type=click.IntRange(1), default=48, show_default=True, help="Answer length limit."
)
@click.option(
    "--engine-option",
    "-o",
    "engine_options",
    multiple=True,
    metavar="NAME=VALUE",
    help="Option of the generating engine (root option --engine), e.g. -o device=cpu.",
)
@click.pass_obj
def run(
    obj: Any,
    adapter_ids: tuple[str, ...],
    dev: Path | None,
    qa: Path | None,
    style_ref: Path | None,
    base_too: bool,
    as_json: bool,
    window: int | None,
    stride: int | None,
    batch_size: int,
    fail_on_regression: bool,
    tolerance: float,
    max_tokens: int,
    engine_options: tuple[str, ...],
) -> None:
    """Evaluate adapters on a dev set (ppl, bpb), a QA set and a style reference; record the results.

    Without --dev, --qa and --style-ref each adapter is scored on the dev set recorded when it was trained.
    """
    from ..evaluation import runner

    options = _options(window, stride, batch_size, max_tokens, engine_options)
    workspace = obj.workspace()
    with obj.registry() as registry:
        registry.require_writable()
        rows = runner.evaluate(
            workspace=workspace,
            registry=registry,
            plugins=obj.plugins,
            ids=adapter_ids,
            dev=dev,
            qa=qa,
            style_ref=style_ref,
            base_too=base_too,
            options=options,
            say=_say,
        )
        found = []
        notes: list[str] = []
        if fail_on_regression:
            found = runner.regressions(registry, rows, tolerance, notes.append)
        report = runner.record(
            workspace,
            registry,
            rows,
            command="eval",
            extra={
                "gate": {
                    "tolerance": tolerance,
                    "regressions": [_reg(r) for r in found],
                }
                if fail_on_regression
                else None
            },
        )
    if as_json:
        echo_json(
            {
                "report": str(report),
                "rows": [runner.row_json(r) for r in rows],
                "regressions": [_reg(r) for r in found],
            }
        )
    else:
        _print_rows(rows)
        click.echo(f"Recorded in the registry and {workspace.relative(report)}")
    for note in notes:
        _say(note)
    if found:
        for regression in found:
            _say(regression.line())
        raise click.exceptions.Exit(1)
    if fail_on_regression:
        _say(f"gate: no metric worse than the previous version by more than {tolerance:g} (relative)")


def _reg(r: Any) -> dict[str, Any]:
    return {
        "adapter_id": r.adapter_id,
        "previous_id": r.previous_id,
        "metric": r.metric,
        "previous": r.previous,
        "current": r.current,
        "eval_set": r.eval_set,
    }


def _print_rows(rows: list[Any]) -> None:
    present = [m for m in METRIC_COLUMNS if any(m in r.metrics for r in rows)]
    echo_table(
        ("MODEL", "EVAL SET", *(m.upper() for m in present)),
        [
            (r.target, r.eval_set.label, *(f"{r.metrics[m]:.4f}" if m in r.metrics else "-" for m in present))
            for r in rows
        ],
    )


@eval_group.command("matrix")
@click.argument("adapter_ids", nargs=-1, required=True, metavar="ID...")
@click.option(
    "--sets",
    "sets",
    multiple=True,
    required=True,
    metavar="DOMAIN=FILE",
    help="A domain's dev set; repeat per domain (e.g. --sets steuerrecht=data/st/dev.jsonl).",
)
@shared
@click.option(
    "--plot",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write a heatmap PNG here (needs matplotlib).",
)
@click.option(
    "--metric",
    type=click.Choice(["ppl", "bpb"]),
    default="ppl",
    show_default=True,
    help="Value in the table.",
)
@click.pass_obj
def matrix(
    obj: Any,
    adapter_ids: tuple[str, ...],
    sets: tuple[str, ...],
    base_too: bool,
    as_json: bool,
    window: int | None,
    stride: int | None,
    batch_size: int,
    plot: Path | None,
    metric: str,
) -> None:
    """Every adapter (and with --base-too the base) on every domain's dev set; best per column marked '*'."""
    from ..evaluation import runner

    parsed = runner.parse_sets(sets)
    options = _options(window, stride, batch_size)
    workspace = obj.workspace()
    with obj.registry() as registry:
        registry.require_writable()
        names, domains, rows = runner.matrix(
            workspace=workspace,
            registry=registry,
            ids=adapter_ids,
            sets=parsed,
            base_too=base_too,
            options=options,
            say=_say,
        )
        if plot is not None:
            runner.plot_matrix(plot, names, domains, rows, metric)
        report = runner.record(
            workspace, registry, rows, command="eval matrix", extra={"domains": domains, "metric": metric}
        )
    table = runner.matrix_table(names, domains, rows, metric)
    if as_json:
        echo_json(
            {
                "report": str(report),
                "metric": metric,
                "domains": domains,
                "models": names,
                "values": {
                    n: {r.details["domain"]: r.metrics[metric] for r in rows if r.target == n} for n in names
                },
                "best": {
                    d: min(
                        (r for r in rows if r.details["domain"] == d),
                        key=lambda r: (
                            r.metrics[metric] if metric in runner.LOWER_IS_BETTER else -r.metrics[metric]
                        ),
                    ).target
                    for d in domains
                },
                "rows": [runner.row_json(r) for r in rows],
                "plot": str(plot) if plot else None,
            }
        )
        return
    echo_table(("MODEL", *domains), table)
    click.echo(f"({metric}; * best per column) Recorded in the registry and {workspace.relative(report)}")
    if plot is not None:
        click.echo(f"Heatmap: {plot}")
