"""clara train, clara quickstart and clara base create-demo.

``clara train``'s flags are the core's (rank, batch size, ...) plus every installed trainer method's declared
options (qlora's ``--bits``), added when the command is parsed or its help is shown, never at ``clara --help``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from ..errors import Conflict, InvalidInput

_METHOD_OPTION_PREFIX = "method_option__"


def _plugins(ctx: click.Context) -> Any:
    obj = ctx.find_object(object) if ctx.obj is None else ctx.obj
    plugins = getattr(obj, "plugins", None)
    if plugins is None:
        from ..plugins import get_plugin_manager

        plugins = get_plugin_manager()
    return plugins


class TrainCommand(click.Command):
    """A command whose parameters include the installed trainer methods' own options."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        if getattr(ctx, "_clara_method_params", None) is None:
            ctx._clara_method_params = _method_params(ctx, {p.name for p in params})  # type: ignore[attr-defined]
        extra: list[click.Parameter] = ctx._clara_method_params  # type: ignore[attr-defined]
        help_option = self.get_help_option(ctx)  # keep --help last
        return [p for p in params if p is not help_option] + extra + ([help_option] if help_option else [])


def _method_params(ctx: click.Context, taken: set[str | None]) -> list[click.Parameter]:
    try:
        methods = _plugins(ctx).trainer_methods()
    except Exception as exc:  # a broken plugin must not break 'clara train --help'
        click.echo(f"clara: warning: could not collect trainer methods' options: {exc}", err=True)
        return []
    by_name: dict[str, tuple[Any, list[str]]] = {}
    for method_name, registration in sorted(methods.items()):
        for option in registration.options:
            if option.name in taken:
                continue
            if option.name in by_name:
                by_name[option.name][1].append(method_name)
            else:
                by_name[option.name] = (option, [method_name])
    params: list[click.Parameter] = []
    for name, (option, owners) in by_name.items():
        label = f"[{', '.join(owners)}] "
        dest = _METHOD_OPTION_PREFIX + name
        declared = [methods[m].options for m in owners]
        alike = all(
            (o.type, o.choices) == (option.type, option.choices)
            for opts in declared
            for o in opts
            if o.name == name
        )
        if alike:
            params.append(option.click_option(dest, help_prefix=label))
        else:  # two methods declare the name differently: the chosen method's Option converts the text later
            params.append(click.Option([option.flag, dest], type=str, help=label + (option.help or "")))
    return params


def _split_modules(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> list[str] | None:
    modules = [m.strip() for value in values for m in value.split(",") if m.strip()]
    return modules or None


@click.command("train", cls=TrainCommand)
@click.option(
    "--base",
    required=True,
    help="Base model: a Hugging Face model folder, a registered base's name, or models/base/NAME of one.",
)
@click.option(
    "--domain", "domains", multiple=True, required=True, help="Domain of the adapter (repeat for several)."
)
@click.option("--method", default="lora", show_default=True, help="Trainer method (see 'clara plugins').")
@click.option(
    "--dataset",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Training data, JSONL: {text} | {prompt, completion} | {messages}.",
)
@click.option(
    "--dev", type=click.Path(path_type=Path, dir_okay=False), help="Dev set (same format) for ppl_dev."
)
@click.option("--rank", "-r", type=int, default=16, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=float, help="LoRA alpha (default: 2 x rank).")
@click.option("--dropout", type=float, default=0.05, show_default=True, help="LoRA dropout.")
@click.option(
    "--target-modules",
    multiple=True,
    callback=_split_modules,
    help="Modules to adapt, comma-separated or repeated (default: every linear projection of the architecture).",
)
@click.option("--use-rslora", is_flag=True, help="Rank-stabilised LoRA scaling (alpha / sqrt(rank)).")
@click.option(
    "--batch-size",
    type=int,
    default=16,
    show_default=True,
    help="Sequences per optimizer step; reached by gradient accumulation over micro-batches that fit.",
)
@click.option(
    "--micro-batch-size", type=int, help="Sequences per forward pass (default: what fits, a power of two)."
)
@click.option("--epochs", type=float, default=1.0, show_default=True, help="Passes over the data.")
@click.option("--max-steps", type=int, help="Optimizer steps (overrides --epochs).")
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Learning rate.")
@click.option("--warmup-steps", type=int, default=0, show_default=True, help="Linear warm-up steps.")
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed; the same inputs and seed give the same adapter on a CPU.",
)
@click.option("--max-seq-len", type=int, default=512, show_default=True, help="Tokens per packed row.")
@click.option(
    "--no-truncate",
    "truncate",
    flag_value=False,
    default=True,
    help="Refuse records longer than --max-seq-len instead of cutting them.",
)
@click.option(
    "--no-packing",
    "packing",
    flag_value=False,
    default=True,
    help="One record per row (padding) instead of packing.",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help="Training precision (auto: float32 on a CPU, bfloat16 where a GPU supports it).",
)
@click.option(
    "--license", "license", help="License of the adapter, recorded in the registry (e.g. apache-2.0)."
)
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Adapter folder (default: models/adapters/<domain>/<method>-r<rank>-v<next>). Never overwritten.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted run with the same inputs from its last checkpoint.",
)
@click.option(
    "--save-steps", type=int, help="Checkpoint every N steps (default: about every tenth of the run)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the registered entry as JSON at the end.")
@click.pass_context
def train(ctx: click.Context, **values: Any) -> None:
    """Train an adapter on a base model and register it.

    \b
    Example (the plan's command, run in a workspace):
      clara train --base models/base/leo_base --domain steuerrecht --method lora --rank 16 \\
        --batch-size 64 --dataset data/training_batches/steuer_batch.jsonl \\
        --out-dir models/adapters/steuerrecht/lora-r16-v1

    Runs unchanged under 'torchrun --nproc_per_node N' or 'accelerate launch' (DDP); only the main process
    saves and registers. Ctrl-C stops at the next step with a checkpoint for --resume.
    """
    from ..output import echo_json
    from ..training import TrainConfig, train_adapter

    obj = ctx.obj
    options = {
        key[len(_METHOD_OPTION_PREFIX) :]: value
        for key, value in values.items()
        if key.startswith(_METHOD_OPTION_PREFIX) and value not in (None, ())
    }
    config = TrainConfig.from_values({**values, "domains": list(values["domains"]), "options": options})
    workspace = obj.workspace()
    result = train_adapter(config, workspace, obj.plugins, echo=lambda line: click.echo(line, err=True))
    if result.record is None:
        return  # not the main process of a distributed run
    record = result.record
    if values["as_json"]:
        echo_json(record.to_entry())
        return
    click.echo(f"Registered {record.id} at {workspace.relative(record.path)}")
    click.echo(f"  adapter_checksum  {record.adapter_checksum}")
    click.echo(f"  dataset_ref       {record.dataset_ref}")
    if "ppl_dev" in record.metrics:
        click.echo(f"  ppl_dev           {record.metrics['ppl_dev']:.4f}")
    click.echo(f"Next: clara adapters show {record.id}")


@click.command("create-demo")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
def create_demo(directory: Path) -> None:
    """Build the small demo base model into DIRECTORY, offline (Llama architecture, local tokenizer).

    Its random weights are warmed up briefly on the demo's German texts (seeded, seconds on an idle CPU);
    it exists so that clara can be tried on a machine with no model and no network.
    """
    from ..demo import build_demo_base

    target = directory.expanduser().resolve()
    if target.exists():
        raise Conflict(f"{target} already exists; choose a new folder for the demo base")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-base-", dir=target.parent))
    try:
        build_demo_base(staging / "model")
        (staging / "model").rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    click.echo(f"Built the demo base in {target}")
    click.echo(f"Register it in a workspace with: clara base add {target}")


@click.command("quickstart")
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    help="Workspace to use or create (default: the root --workspace, else ./clara-workspace).",
)
@click.option("--method", default="lora", show_default=True, help="Trainer method for the demo adapters.")
@click.option("--steps", type=int, default=300, show_default=True, help="Training steps per adapter.")
@click.option(
    "--serve/--no-serve",
    default=True,
    show_default=True,
    help="End by starting 'clara serve' (engine from --engine) and asking it each domain's question.",
)
@click.pass_context
def quickstart(ctx: click.Context, directory: Path | None, method: str, steps: int, serve: bool) -> None:
    """The main job on the embedded default: demo base, two domain adapters, and their answers side by side.

    Builds the demo base offline, writes example datasets for steuerrecht and sozialrecht, trains and
    registers an adapter for each, asks each domain's question to the base and to every adapter, then
    serves the base with both adapters hot-swapped in behind the HTTP API and asks the server the same,
    evaluates them on both dev sets, and combines them into a composite (each weighted 0.7) that is asked both
    questions and measured for the perplexity gain it keeps of each adapter.

    Interrupted, the same command goes on where it stopped: adapters already trained with the same inputs are
    reused, an interrupted training continues from its checkpoint.
    """
    from ..demo import run_quickstart

    if steps < 1:
        raise InvalidInput(f"--steps must be at least 1, got {steps}")
    obj = ctx.obj
    root = directory or getattr(obj, "workspace_option", None) or Path("clara-workspace")
    run_quickstart(
        Path(root),
        obj.plugins,
        method=method,
        steps=steps,
        echo=lambda line: click.echo(line),
        progress=sys.stderr.isatty(),
        serve=serve,
        engine=getattr(obj, "engine_name", None),
    )
