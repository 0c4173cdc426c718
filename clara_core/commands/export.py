"""clara export: one subcommand per installed exporter plugin (``clara export ollama ID``), and ``list``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..output import echo_json, echo_table, human_size
from .train import _plugins

_OPTION_PREFIX = "exporter_option__"


class ExportGroup(click.Group):
    """``clara export``: ``list``, and a command for every exporter the installed plugins register."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        try:
            names = sorted(_plugins(ctx).exporters())
        except Exception as exc:  # a broken plugin must not break 'clara export --help'
            click.echo(f"clara: warning: could not collect exporters: {exc}", err=True)
            names = []
        return sorted({*super().list_commands(ctx), *names})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        from ..errors import ClaraError

        try:
            registration = _plugins(ctx).exporter(cmd_name)
        except ClaraError as exc:  # names the installed exporters and the package that provides this one
            raise click.UsageError(str(exc), ctx) from None
        return _exporter_command(registration)


def _exporter_command(registration: Any) -> click.Command:
    name = registration.name

    def callback(**values: Any) -> None:
        _run(name, values)

    params: list[click.Parameter] = [
        click.Argument(["adapter_id"], metavar="ADAPTER_ID"),
        click.Option(
            ["--out"],
            type=click.Path(path_type=Path, file_okay=False),
            help="Folder to create for the export (default: models/exports/NAME/); it must not exist.",
        ),
        click.Option(
            ["--name"],
            help="Name of the export, its folder and its registry entry (default: the adapter id followed "
            "by the options that differ from their defaults).",
        ),
    ]
    params += [option.click_option(_OPTION_PREFIX + option.name) for option in registration.options]
    params.append(
        click.Option(["--json", "as_json"], is_flag=True, help="Print the registered entry as JSON.")
    )
    description = registration.description or f"Export an adapter with the '{name}' exporter."
    return click.Command(
        name,
        callback=callback,
        params=params,
        help=f"{description}\n\n{_COMMON_HELP}",
        short_help=description.split(". ")[0][:80],
    )


_COMMON_HELP = (
    "The files are written to a staging folder first; only a finished export is put in place and recorded in "
    "the registry with the sha256 of every file ('clara export list'). An export that fails its own check is "
    "kept aside as NAME.rejected-<time> and not registered; any other failure leaves nothing behind."
)


def _run(exporter: str, values: dict[str, Any]) -> None:
    from ..exports import run_export

    ctx = click.get_current_context()
    obj = ctx.obj
    options = {
        key[len(_OPTION_PREFIX) :]: value for key, value in values.items() if key.startswith(_OPTION_PREFIX)
    }
    workspace = obj.workspace()
    outcome = run_export(
        workspace,
        obj.plugins,
        exporter,
        values["adapter_id"],
        options=options,
        out=values["out"],
        name=values["name"],
        echo=lambda line: click.echo(line, err=True),
    )
    if values["as_json"]:
        echo_json({**outcome.entry, "path": str(outcome.path)})
        return
    click.echo(f"Exported {values['adapter_id']} as '{outcome.entry['name']}' to {outcome.path}:")
    for item in outcome.entry["files"]:
        click.echo(f"  {item['path']}  {human_size(item['size_bytes'])}  sha256 {item['sha256'][:12]}")
    if outcome.result.message:
        click.echo(outcome.result.message)


@click.group(cls=ExportGroup)
def export() -> None:
    """Export adapters for other runtimes ('clara export ollama ID'), and list what was exported.

    Each installed exporter plugin adds a subcommand ('clara plugins' lists them; the 'ollama' exporter comes
    with clara-plugin-gguf). Every finished export is recorded in the registry with its files' sha256.
    """


@export.command("list")
@click.option("--adapter", "adapter_id", metavar="ID", help="Only the exports of this adapter.")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON (files with sha256).")
@click.pass_obj
def list_exports(obj: Any, adapter_id: str | None, as_json: bool) -> None:
    """List registered exports: name, exporter, adapter, options, files, where, and whether it is still there."""
    workspace = obj.workspace()
    with obj.registry() as registry:
        entries = registry.list_exports(adapter_id)
    for entry in entries:
        folder = workspace.resolve(entry["path"])
        entry["present"] = all((folder / f["path"]).is_file() for f in entry["files"])
    if as_json:
        echo_json(entries)
        return
    rows = []
    for entry in entries:
        options = ", ".join(f"{k}={v}" for k, v in sorted(entry["options"].items()))
        size = sum(f["size_bytes"] for f in entry["files"])
        rows.append(
            [
                entry["name"],
                entry["exporter"],
                entry["adapter_id"],
                options or "-",
                f"{len(entry['files'])} ({human_size(size)})",
                entry["path"] if entry["present"] else f"{entry['path']} (missing)",
                entry["created"][:19],
            ]
        )
    echo_table(
        ["NAME", "EXPORTER", "ADAPTER", "OPTIONS", "FILES", "PATH", "CREATED"], rows, empty="(no exports)"
    )
