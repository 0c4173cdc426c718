"""The ``clara`` command line: a click root group with noun subgroups; plugins add commands through a hook.

Nothing here imports torch, transformers, peft, vllm or llama_cpp: commands that need them import them inside
their function bodies, so ``clara --help`` and ``clara adapters list`` stay fast.
"""

from __future__ import annotations

import logging
import sqlite3
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import __version__
from .errors import ClaraError
from .plugins import PluginManager, get_plugin_manager, warn_once
from .workspace import Workspace

if TYPE_CHECKING:
    from .registry import Registry


class UserError(click.ClickException):
    """A :class:`ClaraError` on its way out: one line on stderr, the error's exit code."""

    def __init__(self, error: ClaraError) -> None:
        super().__init__(error.message)
        self.exit_code = error.exit_code  # type: ignore[misc]


class ClaraContext:
    """What every command can reach through ``click.get_current_context().obj``."""

    def __init__(
        self,
        *,
        workspace: Path | None = None,
        engine: str | None = None,
        plugins: PluginManager | None = None,
    ) -> None:
        self.workspace_option = workspace
        self.engine_name = engine
        self._plugins = plugins

    @property
    def plugins(self) -> PluginManager:
        if self._plugins is None:
            self._plugins = get_plugin_manager()
        self._plugins.load()
        warn_once(self._plugins, lambda line: click.echo(line, err=True))
        return self._plugins

    def workspace(self) -> Workspace:
        return Workspace.find(self.workspace_option)

    def registry(self) -> Registry:
        from .registry import Registry

        return Registry.open(self.workspace().registry_path)


class ClaraGroup(click.Group):
    """Root group: adds plugin commands on first listing, turns ClaraError into one clean line."""

    _plugin_commands_added = False

    def _add_plugin_commands(self, ctx: click.Context) -> None:
        if self._plugin_commands_added:
            return
        self._plugin_commands_added = True
        obj = ctx.find_object(ClaraContext)
        try:
            manager = obj.plugins if obj is not None else get_plugin_manager()
            manager.add_commands(self)
        except ClaraError as exc:  # CLARA_LOAD_PLUGINS names nothing installed: the commands that need
            click.echo(f"clara: warning: {exc}", err=True)  # plugins fail with it, --help still works
            return
        warn_once(manager, lambda line: click.echo(line, err=True))

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_plugin_commands(ctx)
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None:
            self._add_plugin_commands(ctx)
            command = super().get_command(ctx, cmd_name)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ClaraError as exc:
            raise UserError(exc) from None
        except sqlite3.Error as exc:  # one the registry's connection did not classify (see registry_db)
            raise UserError(ClaraError(f"registry error: {exc}")) from None
        except KeyboardInterrupt:
            click.echo("Interrupted; nothing half-made was kept.", err=True)
            ctx.exit(130)


@click.group(
    cls=ClaraGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}
)
@click.option(
    "--workspace",
    "-w",
    type=click.Path(file_okay=False, path_type=Path),
    help="Workspace folder (default: $CLARA_HOME, else the current folder or the nearest parent with one).",
)
@click.option(
    "--engine",
    envvar="CLARA_ENGINE",
    metavar="NAME",
    help="Serving engine for commands that serve (default: transformers; env CLARA_ENGINE). See 'clara plugins'.",
)
@click.version_option(__version__, prog_name="clara")
@click.pass_context
def cli(ctx: click.Context, workspace: Path | None, engine: str | None) -> None:
    """clara: one base model, many adapters.

    Train LoRA / QLoRA / DoRA adapters, keep them in a registry with hashes, metrics and lineage, and serve
    them with hot-swap behind one HTTP API. Start with 'clara init', or 'clara quickstart' for a demo.
    """
    existing = ctx.obj if isinstance(ctx.obj, ClaraContext) else None
    ctx.obj = ClaraContext(
        workspace=workspace or (existing.workspace_option if existing else None),
        engine=engine or (existing.engine_name if existing else None),
        plugins=existing._plugins if existing else None,
    )


def _register_core_commands() -> None:
    from .commands import adapters, base, composite, init, plugins_cmd, train
    from .commands.eval import eval_group

    cli.add_command(init.init)
    cli.add_command(plugins_cmd.plugins)
    cli.add_command(base.base)
    cli.add_command(adapters.adapters)
    cli.add_command(train.train)
    cli.add_command(train.quickstart)
    cli.add_command(composite.composite)
    cli.add_command(eval_group, "eval")
    base.base.add_command(train.create_demo)
    from .commands.serve import serve

    cli.add_command(serve)
    from .commands.report import report

    cli.add_command(report)
    from .commands.export import export
    from .commands.router import route, router

    cli.add_command(router)
    cli.add_command(route)
    cli.add_command(export)


_register_core_commands()


def main(argv: list[str] | None = None) -> None:
    # bitsandbytes' CPU backend tries to fetch an optional kernel from a model hub at import and warns that
    # 'kernels' should be installed; clara works offline and its fallback is the regular CPU path.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # peft calls a transformers property that transformers 5 deprecates; nothing a clara user can act on.
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    cli.main(args=argv, prog_name="clara")


if __name__ == "__main__":  # pragma: no cover
    main()
