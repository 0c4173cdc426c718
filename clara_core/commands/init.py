"""clara init: make a workspace."""

from __future__ import annotations

from pathlib import Path

import click

from ..workspace import Workspace


@click.command()
@click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=Path), default=".")
def init(directory: Path) -> None:
    """Make DIRECTORY (default: here) a clara workspace.

    Creates models/base, models/adapters, models/composites and metadata/ with the registry
    (metadata/registry.db). Running it again on a workspace only brings the registry's schema up to date.
    """
    if directory.exists() and not directory.is_dir():
        raise click.BadParameter(f"{directory} exists and is not a folder", param_hint="DIRECTORY")
    workspace, created = Workspace.init(directory)
    if created:
        click.echo(f"Initialised clara workspace in {workspace.root}")
        click.echo("Next: 'clara base add PATH' to register a base model, or 'clara quickstart' for a demo.")
    else:
        click.echo(f"{workspace.root} is already a clara workspace; registry schema is up to date.")
