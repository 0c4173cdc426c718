"""clara composite: build, list and show composite adapters (several adapters combined by a merge strategy)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..errors import InvalidInput, NotFound
from ..output import echo_json, echo_table
from .train import _plugins

_STRATEGY_OPTION_PREFIX = "strategy_option__"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class ValuesOption(click.Option):
    """A repeatable option that also takes several values after one flag: ``--adapters A B C`` (up to the next
    flag; negative numbers such as ``-0.5`` count as values)."""

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        for name in self.opts:
            parsed = parser._long_opt.get(name) or parser._short_opt.get(name)
            if parsed is not None:
                break
        else:  # pragma: no cover - click always registers the option
            return
        process = parsed.process

        def take_all(value: Any, state: Any) -> None:
            process(value, state)
            while state.rargs and not (state.rargs[0].startswith("-") and not _is_number(state.rargs[0])):
                process(state.rargs.pop(0), state)

        parsed.process = take_all


class BuildCommand(click.Command):
    """``composite build``, whose parameters include the installed strategies' own options."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        if getattr(ctx, "_clara_strategy_params", None) is None:
            ctx._clara_strategy_params = _strategy_params(ctx, {p.name for p in params})  # type: ignore[attr-defined]
        extra: list[click.Parameter] = ctx._clara_strategy_params  # type: ignore[attr-defined]
        help_option = self.get_help_option(ctx)
        return [p for p in params if p is not help_option] + extra + ([help_option] if help_option else [])


def _strategy_params(ctx: click.Context, taken: set[str | None]) -> list[click.Parameter]:
    try:
        strategies = _plugins(ctx).merge_strategies()
    except Exception as exc:  # a broken plugin must not break 'clara composite build --help'
        click.echo(f"clara: warning: could not collect merge strategies' options: {exc}", err=True)
        return []
    by_name: dict[str, tuple[Any, list[str]]] = {}
    for strategy_name, registration in sorted(strategies.items()):
        for option in registration.options:
            if option.name in taken:
                continue
            by_name.setdefault(option.name, (option, []))[1].append(strategy_name)
    params: list[click.Parameter] = []
    for name, (option, owners) in by_name.items():
        label = f"[{', '.join(owners)}] "
        dest = _STRATEGY_OPTION_PREFIX + name
        alike = all(
            (o.type, o.choices) == (option.type, option.choices)
            for owner in owners
            for o in strategies[owner].options
            if o.name == name
        )
        if alike:
            params.append(option.click_option(dest, help_prefix=label))
        else:  # declared differently by two strategies: the chosen strategy's Option converts the text
            params.append(click.Option([option.flag, dest], type=str, help=label + (option.help or "")))
    return params


@click.group()
def composite() -> None:
    """Composite adapters: several registered adapters combined into one PEFT adapter."""


@composite.command("build", cls=BuildCommand)
@click.option(
    "--adapters",
    "adapter_ids",
    cls=ValuesOption,
    required=True,
    multiple=True,
    help="Adapter ids to combine, in order (--adapters A B or --adapters A --adapters B).",
)
@click.option(
    "--strategy", default="weighted", show_default=True, help="Merge strategy (clara plugins lists them)."
)
@click.option(
    "--weights",
    cls=ValuesOption,
    multiple=True,
    help="One number per adapter, in the order of --adapters (--weights 0.7 0.3).",
)
@click.option(
    "--rank", type=int, help="Compress every module to at most this rank by truncated SVD (error recorded)."
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed for randomised strategies (dare_*)."
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder to put the composite's folder in (default: models/composites/).",
)
@click.option(
    "--name",
    help="Domain name of the composite in its id (default: the components' domains joined with '_').",
)
@click.option(
    "--merge-into-base",
    is_flag=True,
    help="Write a full merged model folder (base weights plus the exact merged deltas) instead, for export.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Then score the base, each component and the composite on each component's dev set from training "
    "(clara eval matrix) and report and record what the composite keeps of each component's perplexity gain.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the registered entry and its errors as JSON.")
@click.pass_context
def build(ctx: click.Context, **values: Any) -> None:
    """Combine registered adapters into one composite adapter and register it.

    \b
    Example:
      clara composite build --adapters steuerrecht-lora-r16-v1 verfahren-dora-r8-v1 \\
        --strategy weighted --weights 0.7 0.3

    Deltas are combined in weight space with each adapter's own scaling (alpha/r, alpha/sqrt(r) for rsLoRA,
    rank and alpha patterns). A sum of LoRA deltas is stored exactly (rank = sum of ranks); with a DoRA
    component, or with --rank, the composite is a truncated SVD and the relative error of each module is
    recorded and printed. The result is a plain PEFT folder in models/composites/<hash6>_<domains>/; the same
    inputs give the same folder, and building it again says where it is. The components stay unchanged.

    With --check, the kept fraction of each component's gain, (ppl_base - ppl_composite) / (ppl_base -
    ppl_component) on that component's dev set, is printed and recorded (clara composite show prints it).
    Components trained without --dev are skipped with a warning.
    """
    from ..composites import CompositeRequest, build_composite

    obj = ctx.obj
    adapter_ids = _split(values["adapter_ids"])
    check_sets = _plan_check(obj, adapter_ids, values["merge_into_base"]) if values["check"] else None
    weights = _weights(_split(values["weights"])) if values["weights"] else None
    options = {
        key[len(_STRATEGY_OPTION_PREFIX) :]: value
        for key, value in values.items()
        if key.startswith(_STRATEGY_OPTION_PREFIX) and value is not None
    }
    request = CompositeRequest(
        adapter_ids=adapter_ids,
        strategy=values["strategy"],
        weights=weights,
        options=options,
        rank=values["rank"],
        out=values["out"],
        name=values["name"],
        seed=values["seed"],
        merge_into_base=values["merge_into_base"],
    )
    workspace = obj.workspace()
    result = build_composite(request, workspace, obj.plugins, echo=lambda line: click.echo(line, err=True))
    record = result.record
    check: dict[str, Any] | None = None
    kept: list[Any] = []
    if check_sets is not None:
        kept, report = _run_check(obj, workspace, record.id, check_sets)
        check = {"kept": [k.to_json() for k in kept], "report": str(report)}
    if values["as_json"]:
        echo_json(
            {
                **record.to_entry(),
                "existed": result.existed,
                "max_relative_error": result.max_error,
                **({"check": check} if check is not None else {}),
            }
        )
        return
    where = workspace.relative(record.path)
    if result.existed:
        click.echo(f"Composite {record.id} exists already at {where} (same inputs); nothing was written")
        _print_kept(kept, check)
        return
    what = "merged model" if record.kind == "merged" else "composite"
    click.echo(f"Registered {what} {record.id} at {where}")
    click.echo(f"  adapter_checksum  {record.adapter_checksum}")
    if record.kind == "merged":
        click.echo(
            "  exact             yes (the merged deltas are in the weights; load it as a model, not an adapter)"
        )
    elif result.max_error == 0.0:
        click.echo(f"  exact             yes (rank {record.rank})")
    else:
        worst = max(result.errors, key=lambda m: result.errors[m])
        click.echo(
            f"  relative error    max {result.max_error:.3e} ({worst}), "
            f"mean {sum(result.errors.values()) / len(result.errors):.3e} (Frobenius, per module)"
        )
    _print_kept(kept, check)
    from ..demo import clara_command  # spelt as the user can type it (.venv/bin/clara when not on PATH)

    click.echo(f"Next: {clara_command()} composite show {record.id}")


def _plan_check(obj: Any, adapter_ids: list[str], merge_into_base: bool) -> list[Any]:
    """The check's dev sets, found (or refused) before anything is built."""
    from ..composites import check

    if merge_into_base:
        raise InvalidInput(
            "--check measures a composite adapter; build without --merge-into-base to check it "
            "(a merged model is no adapter the matrix can load)"
        )
    workspace = obj.workspace()
    with obj.registry() as registry:
        registry.require_writable()
        components = [registry.get_adapter(i) for i in dict.fromkeys(adapter_ids)]
    return check.plan(components, workspace, lambda line: click.echo(line, err=True))


def _run_check(obj: Any, workspace: Any, composite_id: str, sets: list[Any]) -> tuple[list[Any], Any]:
    from ..composites import check
    from ..evaluation.runner import Options

    with obj.registry() as registry:
        return check.run_check(
            workspace=workspace,
            registry=registry,
            composite_id=composite_id,
            sets=sets,
            options=Options(),
            say=lambda line: click.echo(line, err=True),
        )


def _print_kept(kept: list[Any], check: dict[str, Any] | None) -> None:
    from ..composites.check import HEADERS, table

    if check is None:
        return
    click.echo("Perplexity gain kept (on each component's dev set from training):")
    echo_table(HEADERS, table(kept))
    click.echo("  kept = (ppl_base - ppl_composite) / (ppl_base - ppl_component); recorded in the registry")


def _split(values: tuple[str, ...]) -> list[str]:
    """``--adapters A B`` arrives as ``('A B',)`` from some shells' quoting, ``('A', 'B')`` from repeats."""
    return [part for value in values for part in value.replace(",", " ").split()]


def _weights(raw: list[str]) -> list[float]:
    out = []
    for position, text in enumerate(raw, 1):
        try:
            out.append(float(text))
        except ValueError:
            raise InvalidInput(f"--weights: weight {position} '{text}' is not a number") from None
    return out


def _composite_records(registry: Any) -> list[Any]:
    return [r for r in registry.list_adapters() if r.kind in ("composite", "merged")]


@composite.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_obj
def list_composites(obj: Any, as_json: bool) -> None:
    """List registered composites with their components and strategy."""
    with obj.registry() as registry:
        rows = [(r, registry.lineage(r.id)) for r in _composite_records(registry)]
    if as_json:
        echo_json([{**r.to_entry(), "lineage": lineage} for r, lineage in rows])
        return
    if not rows:
        click.echo(
            "No composites yet; build one with: clara composite build --adapters A B --strategy weighted --weights 0.5 0.5"
        )
        return
    table = []
    for record, lineage in rows:
        info = record.training_config.get("composite") or {}
        components = " + ".join(
            f"{item['component_id']}" + (f"×{item['weight']:g}" if item.get("weight") is not None else "")
            for item in lineage
        )
        error = info.get("max_relative_error")
        table.append(
            [record.id, record.method, str(record.rank), "exact" if not error else f"{error:.2e}", components]
        )
    echo_table(["ID", "STRATEGY", "RANK", "MAX ERROR", "COMPONENTS"], table)


@composite.command("show")
@click.argument("composite_id")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_obj
def show(obj: Any, composite_id: str, as_json: bool) -> None:
    """Show a composite: its components with their checksums and weights, strategy, options and errors, and
    what it keeps of each component's perplexity gain once checked (composite build ... --check)."""
    from ..composites import check

    with obj.registry() as registry:
        record = registry.get_adapter(composite_id)
        if record.kind not in ("composite", "merged"):
            raise NotFound(
                f"'{composite_id}' is an adapter, not a composite; see clara adapters show {composite_id}"
            )
        lineage = registry.lineage(record.id)
        kept = check.recorded(registry, record.id)
    info = record.training_config.get("composite") or {}
    if as_json:
        echo_json({**record.to_entry(), "lineage": lineage, "composite": info, "check": kept or None})
        return
    click.echo(f"{record.id}  ({record.kind}, strategy {record.method}, rank {record.rank})")
    click.echo(f"  path              {record.stored_path}")
    click.echo(f"  adapter_checksum  {record.adapter_checksum}")
    for item in lineage:
        weight = "" if item.get("weight") is None else f"  weight {item['weight']:g}"
        click.echo(
            f"  component {item['position'] + 1}       {item['component_id']}{weight}  ({(item.get('component_checksum') or '-')[:12]})"
        )
    if info.get("options"):
        click.echo(f"  options           {json.dumps(info['options'], sort_keys=True)}")
    errors = info.get("relative_errors") or {}
    if errors and max(errors.values()) > 0:
        click.echo(
            f"  max rel. error    {max(errors.values()):.3e} (per module: clara composite show {record.id} --json)"
        )
    else:
        click.echo("  exact             yes")
    if info.get("conflicts"):
        click.echo(
            f"  layer conflicts   {len(info['conflicts'])} module(s) changed by more than one component"
        )
    click.echo(f"  clara version     {info.get('clara_version', '-')}")
    if kept:
        click.echo(f"Perplexity gain kept (checked {kept[0]['run_id'].partition(':')[2]}):")
        echo_table(check.HEADERS, check.table(kept))
    elif record.kind == "composite":
        click.echo("  gain kept         not checked (build again with --check)")
