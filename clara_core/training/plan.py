"""Planning a training run: every check that can be made before a model is loaded.

:func:`plan_run` refuses bad options, an unknown method, a bad dataset (every line), a bad dev set, a base that
is not a model (or changed since it was registered) and an output folder that is taken, then fixes what the run
will do: the micro-batch plan, the precision, the recorded config and the run's checkpoint folder. Nothing here
writes anything.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import math
import os
from contextlib import suppress
from pathlib import Path
from typing import Any

import attrs

from .. import __version__, hashing
from ..errors import Conflict, InvalidInput, NotFound
from ..plugins import PluginManager
from ..registry import Registry, normalise_base_name
from ..types import AdapterSpec, OptionValueError, TrainerMethod, TrainerMethodImpl
from ..workspace import Workspace, make_adapter_id
from . import data as data_mod
from .config import RecordedInputs, TrainConfig, micro_batch_plan, run_key

#: Always recorded with an adapter, besides what the method names in ``recorded_packages``.
RECORDED_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "tokenizers",
    "safetensors",
)
#: Optimizer steps below which a run is too short to teach an adapter much; fewer get a warning.
USEFUL_MIN_STEPS = 20


def library_versions(method: TrainerMethodImpl | None = None) -> dict[str, str]:
    names = list(RECORDED_PACKAGES) + list(getattr(method, "recorded_packages", ()))
    versions: dict[str, str] = {"clara-core": __version__}
    for name in dict.fromkeys(names):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def method_options(registration: TrainerMethod, given: dict[str, Any]) -> dict[str, Any]:
    """The method's declared options, converted by their :class:`~clara_core.types.Option`, defaults filled
    in; unknown names and refused values are one-line errors."""
    declared = {o.name: o for o in registration.options}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        flags = ", ".join("--" + n.replace("_", "-") for n in unknown)
        raise InvalidInput(
            f"{flags} is not an option of method '{registration.name}'"
            + (f" (its options: {', '.join(o.flag for o in registration.options)})" if declared else "")
        )
    options = {name: option.default for name, option in declared.items()}
    for name, value in given.items():
        try:
            options[name] = declared[name].convert(value)
        except OptionValueError as exc:
            raise InvalidInput(f"{exc} (method '{registration.name}')") from None
    return options


@attrs.define
class ResolvedBase:
    path: Path
    base_model_hash: str
    tokenizer_hash: str | None
    name: str
    registered: bool


def _registered_base_path(value: str, workspace: Workspace | None, registry: Registry) -> Path | None:
    """``--base`` that is no folder here: a registered base's name, a folder relative to the workspace's
    root, or the convention's ``models/base/<name>`` for a base registered where it lies (``clara base add DIR
    --name NAME``)."""
    if "/" not in value:
        with suppress(NotFound):
            return registry.get_base(value).path
        return None
    given = Path(value).expanduser()
    if workspace is None:
        return None
    # a relative path is tried from the current folder and from the workspace's root ('clara -w WS train')
    candidates = [given] if given.is_absolute() else [Path.cwd() / given, workspace.root / given]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
        if candidate.resolve().parent == workspace.base_dir.resolve():
            with suppress(NotFound):
                return registry.get_base(candidate.name).path
    return None


def _no_such_base(value: str, registry: Registry) -> NotFound:
    names = [base.name for base in registry.list_bases()]
    leaf = Path(value).name or value
    close = difflib.get_close_matches(leaf, names, n=3, cutoff=0.5)
    if close:
        hint = "did you mean " + " or ".join(f"--base {name}" for name in close) + "?"
    elif names:
        hint = f"registered bases: {', '.join(sorted(names))}"
    else:
        hint = "give the folder of a Hugging Face model (no base is registered yet)"
    return NotFound(f"--base {value}: no such folder and no registered base of that name; {hint}")


def resolve_base(value: str, registry: Registry | None, workspace: Workspace | None = None) -> ResolvedBase:
    """``--base``: a model folder, a registered base's name, or ``models/base/<name>`` of a registered base;
    a registered folder must still match its hash.

    An unregistered base is registered together with the adapter, at the end (so a failed run changes nothing).
    """
    path = Path(value).expanduser()
    if not path.exists() and registry is not None:
        found = _registered_base_path(value, workspace, registry)
        if found is None:
            raise _no_such_base(value, registry)
        path = found
    hashing.read_model_config(path)  # a clear error when this is not a model folder
    if registry is None:
        return ResolvedBase(
            path, hashing.base_model_hash(path), hashing.tokenizer_hash(path), path.name, False
        )
    current = hashing.base_model_hash(path, cache=registry)
    record_at_path = registry.base_for_path(path)
    if record_at_path is not None:
        if record_at_path.base_model_hash != current:
            raise Conflict(
                f"{path}: the files of base '{record_at_path.name}' changed since it was registered "
                f"(registered {record_at_path.base_model_hash[:12]}, now {current[:12]}); restore them, or "
                "register the changed model under a new name with 'clara base add PATH --name NEW'"
            )
        return ResolvedBase(path, current, record_at_path.tokenizer_hash, record_at_path.name, True)
    same = registry.find_base(current)
    if same is not None:
        return ResolvedBase(path, current, same.tokenizer_hash, same.name, True)
    name = normalise_base_name(path.name)
    with suppress(NotFound):
        other = registry.get_base(name)
        raise Conflict(
            f"{path}: not registered, and its folder name '{name}' is taken by another base ({other.path}); "
            f"register it first with 'clara base add {path} --name NEW'"
        )
    return ResolvedBase(path, current, hashing.tokenizer_hash(path, cache=registry), name, False)


def check_out_dir(
    out_dir: Path | None, workspace: Workspace, registry: Registry | None, config: TrainConfig
) -> Path | None:
    """``--out-dir``: inside the workspace, not there yet, and not the folder of a registered id."""
    if out_dir is None:
        return None
    target = out_dir.expanduser()
    if not target.is_absolute():
        target = Path.cwd() / target
    target = target.resolve()
    if target.exists():
        raise Conflict(
            f"{target}: output folder exists; clara never overwrites an adapter, choose another --out-dir"
        )
    if not workspace.contains(target):
        raise InvalidInput(
            f"{target}: --out-dir must lie inside the workspace {workspace.root} (adapters are registered there)"
        )
    if registry is not None:
        from ..naming import version_from_folder

        version = version_from_folder(target, config.method, config.rank)
        if version is not None:
            adapter_id = make_adapter_id(config.domains, config.method, config.rank, version)
            try:
                registry.refuse_taken_id(adapter_id)  # registered now, or removed (ids are never reused)
            except Conflict as exc:
                raise Conflict(f"{target}: {exc.message}; choose another --out-dir") from None
    return target


def precision_for(dtype: str, on_gpu: bool) -> str:
    if dtype != "auto":
        return dtype
    if on_gpu:
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


@attrs.define
class RunPlan:
    """Everything a run decided before loading a model."""

    config: TrainConfig
    registration: TrainerMethod
    impl: TrainerMethodImpl
    spec: AdapterSpec
    examples: list[data_mod.Example]
    dev_examples: list[data_mod.Example] | None
    base: ResolvedBase
    target: Path | None
    micro: int
    accumulation: int
    precision: str
    on_gpu: bool
    world_size: int
    dataset_sha: str
    dev_sha: str | None
    recorded: dict[str, Any]
    run_dir: Path

    @property
    def key(self) -> str:
        return run_key(self.recorded)


def plan_run(
    config: TrainConfig,
    workspace: Workspace,
    plugins: PluginManager,
    *,
    register: bool,
    world_size: int,
    run_dir: Path | None = None,
) -> RunPlan:
    """Check every input and fix the run's plan; raises a one-line :class:`~clara_core.errors.ClaraError`."""
    config.check()
    registration = plugins.trainer_method(config.method)
    config.options = method_options(registration, config.options)
    impl: TrainerMethodImpl = registration.create()
    spec = config.spec()
    impl.check(spec)

    # Every line of the data before anything heavy.
    examples = data_mod.load_examples(config.dataset)
    dev_examples = data_mod.load_examples(config.dev) if config.dev is not None else None

    with Registry.open(workspace.registry_path) as registry:
        target = check_out_dir(config.out_dir, workspace, registry if register else None, config)
        base = resolve_base(config.base, registry, workspace)

    import torch

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        check_gpus_for_processes(torch.cuda.device_count())
    micro, accumulation = micro_batch_plan(config, world_size, on_gpu=on_gpu)
    precision = precision_for(config.dtype, on_gpu)
    dataset_sha = hashing.sha256_file(config.dataset)
    dev_sha = hashing.sha256_file(config.dev) if config.dev is not None else None
    recorded = config.to_record(
        RecordedInputs(
            base_model_hash=base.base_model_hash,
            dataset=workspace.relative(config.dataset.resolve()),
            dataset_sha256=dataset_sha,
            dev=workspace.relative(config.dev.resolve()) if config.dev is not None else None,
            dev_sha256=dev_sha,
            micro_batch_size=micro,
            gradient_accumulation_steps=accumulation,
            world_size=world_size,
            precision=precision,
        )
    )
    return RunPlan(
        config=config,
        registration=registration,
        impl=impl,
        spec=spec,
        examples=examples,
        dev_examples=dev_examples,
        base=base,
        target=target,
        micro=micro,
        accumulation=accumulation,
        precision=precision,
        on_gpu=on_gpu,
        world_size=world_size,
        dataset_sha=dataset_sha,
        dev_sha=dev_sha,
        recorded=recorded,
        run_dir=run_dir or workspace.metadata_dir / "runs" / run_key(recorded),
    )


def short_run_warning(config: TrainConfig, rows: int, rows_per_step: int) -> str | None:
    """A warning when ``--epochs`` gives fewer than :data:`USEFUL_MIN_STEPS` optimizer steps, saying what
    reaches them; ``None`` when the run is long enough or ``--max-steps`` was chosen on purpose."""
    if config.max_steps is not None:
        return None
    per_epoch = max(1, math.ceil(rows / rows_per_step))
    steps = max(1, math.ceil(per_epoch * config.epochs))
    if steps >= USEFUL_MIN_STEPS:
        return None
    epochs = math.ceil(USEFUL_MIN_STEPS / per_epoch)
    smaller = rows * config.epochs // USEFUL_MIN_STEPS
    batch_hint = f", or a --batch-size of {int(smaller)} or less" if smaller >= 1 else ""
    return (
        f"warning: this run trains only {steps} optimizer step{'s' if steps != 1 else ''} ({rows} packed "
        f"rows, --batch-size {config.batch_size}, --epochs {config.epochs:g}), too few for an adapter to learn "
        f"much; --epochs {epochs} or --max-steps {USEFUL_MIN_STEPS} gives {USEFUL_MIN_STEPS} steps{batch_hint}"
    )


def check_gpus_for_processes(gpus: int, environ: Any = os.environ) -> None:
    """Refuse a ``torchrun`` that starts more processes on this machine than it has GPUs (each process trains
    on the GPU of its ``LOCAL_RANK``): every process gets the same one line instead of a CUDA traceback."""
    processes = int(environ.get("LOCAL_WORLD_SIZE", "1"))
    if processes > gpus:
        raise InvalidInput(
            f"torchrun started {processes} processes on this machine, but it has {gpus} GPU"
            f"{'s' if gpus != 1 else ''} (one process per GPU); use --nproc_per_node {gpus}, or "
            "CUDA_VISIBLE_DEVICES= to train on the CPU"
        )


def local_rank_device_map(on_gpu: bool) -> dict[str, int] | None:
    return {"": int(os.environ.get("LOCAL_RANK", "0"))} if on_gpu else None


__all__ = [
    "RECORDED_PACKAGES",
    "USEFUL_MIN_STEPS",
    "ResolvedBase",
    "RunPlan",
    "check_out_dir",
    "library_versions",
    "method_options",
    "plan_run",
    "precision_for",
    "resolve_base",
    "short_run_warning",
]
