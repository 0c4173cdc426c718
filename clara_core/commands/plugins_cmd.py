"""clara plugins: what is installed, what each plugin registers and the options each registration declares."""

from __future__ import annotations

from typing import Any

import click

from ..output import echo_json, echo_table
from ..types import Option, Registration


def _type_name(option: Option) -> str:
    return getattr(option.type, "__name__", str(option.type))


def option_record(option: Option) -> dict[str, Any]:
    """One declared option as ``clara plugins --json`` prints it."""
    return {
        "name": option.name,
        "type": _type_name(option),
        "default": option.default,
        "choices": list(option.choices) if option.choices else None,
        "help": option.help,
    }


def registration_record(registration: Registration) -> dict[str, Any]:
    return {
        "kind": registration.kind,
        "name": registration.name,
        "description": registration.description,
        "options": [option_record(o) for o in registration.options],
    }


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.pass_obj
def plugins(obj, as_json: bool) -> None:
    """List installed plugins, their versions, what each registers and the options each registration declares.

    CLARA_LOAD_PLUGINS=a,b limits which installed plugins load (entry-point or distribution names); a name that
    matches no installed plugin is an error that lists the installed ones.
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
                    "registrations": [registration_record(r) for r in p.registrations],
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
    for p in infos:
        for registration in p.registrations:
            if not registration.options:
                continue
            click.echo(f"\nOptions of {registration.kind} '{registration.name}' ({p.distribution}):")
            echo_table(
                ("  NAME", "TYPE", "DEFAULT", "CHOICES", "HELP"),
                [
                    (
                        f"  {o.name}",
                        _type_name(o),
                        "-" if o.default is None else o.default,
                        ", ".join(str(c) for c in o.choices) if o.choices else "-",
                        o.help or "-",
                    )
                    for o in registration.options
                ],
            )
