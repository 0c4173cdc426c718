"""clara base: register and list base models."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from ..errors import Conflict
from ..fileio import copy_folder
from ..hashing import folder_size, read_model_config
from ..naming import normalise_base_name
from ..output import echo_json, echo_table, human_size, short_hash


@click.group()
def base() -> None:
    """Base models: the one model every adapter sits on."""


@base.command("add")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", help="Name to register under (default: the folder's name).")
@click.option(
    "--copy",
    "copy_in",
    is_flag=True,
    help="Copy the model into models/base/<name>/ instead of registering it where it lies.",
)
@click.pass_obj
def add(obj, path: Path, name: str | None, copy_in: bool) -> None:
    """Register the Hugging Face model folder PATH as a base.

    Computes base_model_hash (sha256 over config.json and the safetensors weights; cached by path, size and
    mtime, so a large model is hashed once) and tokenizer_hash.
    """
    workspace = obj.workspace()
    read_model_config(path)  # fail before copying anything
    with obj.registry() as registry:
        source = path
        if copy_in:
            base_name = normalise_base_name(name or path.name)
            target = workspace.base_dir / base_name
            if target.exists():
                raise Conflict(f"{target} already exists; choose another --name or register it in place")
            with workspace.staging("base") as staging:
                click.echo(f"Copying {path} to {target} ...", err=True)
                copy_folder(path, staging / "model")  # a full disk: one line, nothing half-copied kept
                target.parent.mkdir(parents=True, exist_ok=True)
                (staging / "model").rename(target)
            source = target
        size = folder_size(source)
        if size > 256 * 1024 * 1024:  # hashing runs at disk speed: say what is happening on large models
            click.echo(
                f"Hashing {human_size(size)} of config and weights in {source} (once; cached) ...", err=True
            )
        try:
            record = registry.add_base(source, name=name, workspace=workspace)
        except BaseException:
            if copy_in and source.exists():
                shutil.rmtree(source, ignore_errors=True)
            raise
    click.echo(f"Registered base '{record.name}' ({record.architecture or record.model_type})")
    click.echo(f"  path             {record.path}")
    click.echo(f"  base_model_hash  {record.base_model_hash}")
    click.echo(f"  tokenizer_hash   {record.tokenizer_hash or '- (no tokenizer files)'}")


@base.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def list_bases(obj, as_json: bool) -> None:
    """List registered base models."""
    with obj.registry() as registry:
        bases = registry.list_bases()
    if as_json:
        echo_json([b.to_json() for b in bases])
        return
    echo_table(
        ("NAME", "ARCHITECTURE", "BASE HASH", "TOKENIZER", "SIZE", "PATH"),
        [
            (
                b.name,
                b.architecture or b.model_type,
                short_hash(b.base_model_hash),
                short_hash(b.tokenizer_hash),
                human_size(b.size_bytes),
                b.path,
            )
            for b in bases
        ],
        empty="No base registered; add one with 'clara base add PATH'.",
    )
