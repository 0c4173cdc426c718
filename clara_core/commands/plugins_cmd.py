"""clara plugins: what is installed and what each plugin registers."""

from __future__ import annotations

import click

from ..output import echo_json, echo_table


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def plugins(obj, as_json: bool) -> None:
    """List installed plugins, their versions and what each registers.

    CLARA_LOAD_PLUGINS=a,b limits which installed plugins load (entry-point or distribution names).
    """
    manager = obj.plugins
    infos = manager.plugins()
    if as_json:
        echo_json(
            [
                {
                    "name": p.name,
                    "distribution": p.distribution,
                    "version": p.version,
                    "module": p.module,
                    "hooks": p.hooks,
                    "registers": {k: v for k, v in p.registers.items() if v},
                }
                for p in infos
            ]
        )
        return
    rows = []
    for p in infos:
        registers = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in p.registers.items() if names)
        if "register_commands" in p.hooks:
            registers = f"{registers}; commands" if registers else "commands"
        rows.append((p.name, p.distribution, p.version, registers or "-"))
    echo_table(("PLUGIN", "DISTRIBUTION", "VERSION", "REGISTERS"), rows, empty="No plugins installed.")
