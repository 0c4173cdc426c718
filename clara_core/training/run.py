"""One training run from inputs to a registered adapter, all or nothing.

1. Check every input that can be checked cheaply: options, method, dataset (every line), dev set, base,
   output folder. Nothing is loaded before these pass.
2. Tokenise and pack; load the base the method's way; wrap it with the method's PEFT config.
3. Train with the shared loop; checkpoints live in ``metadata/runs/<run key>/`` so ``--resume`` finds them.
4. Evaluate ``ppl_dev``; save the adapter into a staging folder inside the workspace with clara's metadata
   file; register it with ``place="move"``, which renames it into place and records it in one transaction.

Killed at any moment, the run leaves no adapter folder in ``models/`` and no registry row; only its
checkpoints (for ``--resume``) and a staging folder under ``metadata/tmp`` that the next run clears.
"""

from __future__ import annotations

import errno
import fcntl
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import attrs

from .. import __version__, hashing
from ..errors import ClaraError, Conflict, InvalidInput, NotFound
from ..plugins import PluginManager
from ..registry import (
    AdapterDraft,
    AdapterRecord,
    Registry,
    dataset_ref,
    normalise_base_name,
)
from ..types import OptionValueError, TrainerMethod, TrainerMethodImpl
from ..workspace import Workspace, domain_key
from . import data as data_mod
from .config import TrainConfig, micro_batch_plan, run_key
from .loop import LoopResult, complete_checkpoints, perplexity, run_trainer

METADATA_FILE = "clara_adapter.json"
METADATA_SCHEMA = "clara.adapter/1"
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


class DiskFull(ClaraError):
    code = "disk_full"


@attrs.define
class TrainResult:
    record: AdapterRecord | None
    adapter_checksum: str
    metrics: dict[str, float]
    loop: LoopResult
    summary: data_mod.DatasetSummary
    base: str
    path: Path | None


@attrs.define
class _Dist:
    rank: int
    world_size: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> _Dist:
        return cls(rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1")))


def library_versions(method: TrainerMethodImpl | None = None) -> dict[str, str]:
    names = list(RECORDED_PACKAGES) + list(getattr(method, "recorded_packages", ()))
    versions: dict[str, str] = {"clara-core": __version__}
    for name in dict.fromkeys(names):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _stored_path(path: Path, workspace: Workspace) -> str:
    return workspace.relative(path)


def method_options(registration: TrainerMethod, given: dict[str, Any]) -> dict[str, Any]:
    """The method's declared options with defaults filled in; unknown names are refused."""
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


def resolve_base(value: str, registry: Registry | None) -> ResolvedBase:
    """``--base``: a model folder, or a registered base's name; a registered folder must still match its hash.

    An unregistered base is registered together with the adapter, at the end (so a failed run changes nothing).
    """
    path = Path(value).expanduser()
    if not path.exists() and registry is not None and "/" not in value:
        with suppress(NotFound):
            path = registry.get_base(value).path
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


def _check_out_dir(
    out_dir: Path | None, workspace: Workspace, registry: Registry | None, config: TrainConfig
) -> Path | None:
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
        from ..registry import _version_from_folder

        version = _version_from_folder(target, config.method, config.rank)
        if version is not None:
            from ..workspace import make_adapter_id

            adapter_id = make_adapter_id(config.domains, config.method, config.rank, version)
            if registry.has_adapter(adapter_id):
                raise Conflict(
                    f"{target}: adapter '{adapter_id}' is already registered; choose another --out-dir "
                    "or leave it out for the next free version"
                )
    return target


@contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """One process per run folder: a second 'clara train' with the same inputs is refused, not interleaved."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "w")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise Conflict(
                f"another 'clara train' with the same inputs is running (it holds {run_dir / '.lock'}); "
                "wait for it to finish"
            ) from exc
        yield
    finally:
        handle.close()


def _clear_stale_staging(workspace: Workspace) -> None:
    """Staging folders of runs that died (their process is gone) are removed."""
    if not workspace.tmp_dir.is_dir():
        return
    for child in workspace.tmp_dir.glob("train-*"):
        try:
            pid = int(child.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(child, ignore_errors=True)
        except PermissionError:
            continue


def _precision(dtype: str, on_gpu: bool) -> str:
    if dtype != "auto":
        return dtype
    if on_gpu:
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def _dataset_path_for_record(path: Path, workspace: Workspace) -> str:
    return workspace.relative(path.resolve())


def recorded_config(
    config: TrainConfig,
    *,
    base_hash: str,
    dataset_sha: str,
    dev_sha: str | None,
    dataset_stored: str,
    dev_stored: str | None,
    micro: int,
    accumulation: int,
    world_size: int,
    precision: str,
) -> dict[str, Any]:
    """The training config as recorded in the registry: enough to train the same adapter again."""
    return {
        "method": config.method,
        "domains": list(config.domains),
        "base_model_hash": base_hash,
        "dataset": dataset_stored,
        "dataset_sha256": dataset_sha,
        "dev": dev_stored,
        "dev_sha256": dev_sha,
        "rank": config.rank,
        "alpha": config.alpha,
        "dropout": config.dropout,
        "target_modules": list(config.target_modules) if config.target_modules else None,
        "use_rslora": config.use_rslora,
        "batch_size": config.batch_size,
        "micro_batch_size": micro,
        "gradient_accumulation_steps": accumulation,
        "world_size": world_size,
        "epochs": config.epochs,
        "max_steps": config.max_steps,
        "lr": config.lr,
        "lr_scheduler": "linear",
        "warmup_steps": config.warmup_steps,
        "weight_decay": config.weight_decay,
        "seed": config.seed,
        "max_seq_len": config.max_seq_len,
        "truncate": config.truncate,
        "packing": config.packing,
        "precision": precision,
        "options": dict(sorted(config.options.items())),
    }


def train_adapter(
    config: TrainConfig,
    workspace: Workspace,
    plugins: PluginManager,
    *,
    echo: Callable[[str], None] | None = None,
    register: bool = True,
    show_progress: bool = True,
    run_dir: Path | None = None,
) -> TrainResult:
    """Train and (when ``register``) register one adapter; see the module docstring for the steps."""
    dist = _Dist.from_environment()
    # bitsandbytes warns at import that an optional CPU speed-up kernel is missing; it changes no result.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    say: Callable[[str], None] = (
        (echo or (lambda line: print(line, file=sys.stderr))) if dist.main else (lambda line: None)
    )
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
        target = _check_out_dir(config.out_dir, workspace, registry if register else None, config)
        base = resolve_base(config.base, registry)
    base_path, base_hash, tokenizer_hash, base_name = (
        base.path,
        base.base_model_hash,
        base.tokenizer_hash,
        base.name,
    )
    if not base.registered and register:
        say(f"Base {base_path} is not registered yet; it is registered as '{base_name}' with the adapter")

    import torch

    on_gpu = torch.cuda.is_available()
    micro, accumulation = micro_batch_plan(config, dist.world_size, on_gpu=on_gpu)
    precision = _precision(config.dtype, on_gpu)
    dataset_sha = hashing.sha256_file(config.dataset)
    dev_sha = hashing.sha256_file(config.dev) if config.dev is not None else None
    recorded = recorded_config(
        config,
        base_hash=base_hash,
        dataset_sha=dataset_sha,
        dev_sha=dev_sha,
        dataset_stored=_dataset_path_for_record(config.dataset, workspace),
        dev_stored=_dataset_path_for_record(config.dev, workspace) if config.dev is not None else None,
        micro=micro,
        accumulation=accumulation,
        world_size=dist.world_size,
        precision=precision,
    )
    key = run_key(recorded)
    run_dir = run_dir or workspace.metadata_dir / "runs" / key

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    warnings.filterwarnings("ignore", message=r".*gradient.checkpointing.*", category=UserWarning)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    except (OSError, ValueError) as exc:
        raise InvalidInput(
            f"{base_path}: the base has no usable tokenizer ({exc}); add its tokenizer files"
        ) from exc
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        pad_id = 0

    tokenized, dropped = data_mod.tokenize_examples(
        examples, tokenizer, path=config.dataset, max_seq_len=config.max_seq_len, truncate=config.truncate
    )
    rows = data_mod.pack(tokenized, config.max_seq_len) if config.packing else data_mod.unpacked(tokenized)
    summary = data_mod.summarise(examples, tokenized, dropped, len(rows))
    dev_rows: list[data_mod.PackedRow] = []
    if dev_examples is not None and config.dev is not None:
        dev_tokenized, _ = data_mod.tokenize_examples(
            dev_examples, tokenizer, path=config.dev, max_seq_len=config.max_seq_len, truncate=config.truncate
        )
        dev_rows = data_mod.pack(dev_tokenized, config.max_seq_len)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(summary.kinds.items()))
    say(
        f"Dataset {config.dataset}: {summary.examples} records ({kinds}), {summary.tokens:,} tokens "
        f"({summary.trained_tokens:,} with loss) in {summary.rows} packed rows of <= {config.max_seq_len}"
    )
    if summary.truncated:
        first = [t.line for t in tokenized if t.truncated][:5]
        say(
            f"warning: {summary.truncated} record(s) longer than --max-seq-len {config.max_seq_len} were cut "
            f"(lines {', '.join(map(str, first))}{', ...' if summary.truncated > 5 else ''}); --no-truncate refuses them"
        )
    if dropped:
        say(f"warning: {len(dropped)} record(s) had no token left to learn after cutting and are skipped")

    with _run_lock(run_dir) if dist.main else _nullcontext():
        checkpoints = complete_checkpoints(run_dir)
        resume_from: Path | None = None
        if config.resume:
            if not checkpoints:
                raise NotFound(
                    f"--resume: no checkpoint of a run with these inputs in {run_dir}; run without --resume"
                )
            resume_from = checkpoints[-1][1]
            say(f"Resuming from {resume_from.name} in {run_dir}")
        elif checkpoints:
            raise Conflict(
                f"an interrupted run with these inputs left a checkpoint at step {checkpoints[-1][0]} in {run_dir}; "
                "continue it with --resume, or delete that folder to start over"
            )
        elif dist.main and run_dir.exists():
            for child in run_dir.iterdir():  # leftovers of a run killed before its first complete checkpoint
                if child.name != ".lock":
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()

        model = _build_model(
            impl, spec, base_path, precision, on_gpu, dist, config.seed, config.target_modules
        )
        peft_model, target_modules = model
        quantization = getattr(peft_model.base_model.model.config, "quantization_config", None)
        if quantization is not None:  # how the base was held in memory while training (qlora's 4 / 8 bit)
            recorded["base_quantization"] = _jsonable(
                quantization.to_dict() if hasattr(quantization, "to_dict") else quantization
            )
        trainable, total = _parameter_counts(peft_model)
        say(
            f"Training {config.method} r={config.rank} on '{base_name}' ({len(target_modules)} module kinds: "
            f"{', '.join(target_modules)}; {trainable:,} of {total:,} parameters trainable), batch "
            f"{config.batch_size} = {micro} x {accumulation} accumulation"
            + (f" x {dist.world_size} processes" if dist.world_size > 1 else "")
        )
        try:
            loop = run_trainer(
                peft_model,
                rows,
                run_dir=run_dir,
                micro_batch=micro,
                accumulation=accumulation,
                epochs=config.epochs,
                max_steps=config.max_steps,
                lr=config.lr,
                warmup_steps=config.warmup_steps,
                weight_decay=config.weight_decay,
                seed=config.seed,
                save_steps=config.save_steps,
                precision=precision,
                on_gpu=on_gpu,
                world_size=dist.world_size,
                pad_token_id=pad_id,
                resume_from=resume_from,
                echo=say,
                show_progress=show_progress,
            )
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFull(
                    f"disk full while writing a checkpoint to {run_dir}; free space, then run the same command "
                    "with --resume"
                ) from exc
            raise
        if not dist.main:
            return TrainResult(None, "", {}, loop, summary, base_name, None)

        say(
            f"Trained {loop.steps} steps in {loop.seconds:.1f} s ({loop.tokens_per_second:,.0f} tokens/s), "
            f"loss {_fmt(loop.first_loss)} -> {_fmt(loop.last_loss)}"
        )
        metrics: dict[str, float] = {}
        if loop.train_loss is not None:
            metrics["train_loss"] = round(loop.train_loss, 6)
        if dev_rows:
            metrics["ppl_dev"] = perplexity(peft_model, dev_rows, micro_batch=micro, pad_token_id=pad_id)
            with peft_model.disable_adapter():
                metrics["ppl_dev_base"] = perplexity(
                    peft_model, dev_rows, micro_batch=micro, pad_token_id=pad_id
                )
            say(f"ppl_dev {metrics['ppl_dev']:.3f} (base without the adapter: {metrics['ppl_dev_base']:.3f})")

        recorded["resumed_from_step"] = loop.resumed_from_step
        peft_dict = peft_model.peft_config["default"].to_dict()
        result = _save_and_register(
            peft_model,
            workspace,
            config,
            recorded=recorded,
            peft_dict=peft_dict,
            target_modules=target_modules,
            base_hash=base_hash,
            tokenizer_hash=tokenizer_hash,
            dataset_sha=dataset_sha,
            metrics=metrics,
            versions=library_versions(impl),
            target=target,
            register=register,
            base=base,
            echo=say,
        )
        record, checksum, kept_path = result
        if register:
            shutil.rmtree(run_dir, ignore_errors=True)  # the run is complete: its checkpoints are not needed
    return TrainResult(record, checksum, metrics, loop, summary, base_name, kept_path)


@contextmanager
def _nullcontext() -> Iterator[None]:
    yield


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _parameter_counts(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _build_model(
    impl: TrainerMethodImpl,
    spec: Any,
    base_path: Path,
    precision: str,
    on_gpu: bool,
    dist: _Dist,
    seed: int,
    requested_modules: list[str] | None,
) -> tuple[Any, list[str]]:
    import torch
    from peft import get_peft_model
    from transformers import set_seed

    from .methods import resolve_target_modules

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[precision]
    device_map = {"": int(os.environ.get("LOCAL_RANK", "0"))} if on_gpu else None
    set_seed(seed)
    model = impl.load_base(base_path, spec, dtype=dtype, device_map=device_map)
    model.config.use_cache = False
    model = impl.prepare(model, spec)
    target_modules = resolve_target_modules(model, requested_modules)
    peft_config = impl.peft_config(model, spec, target_modules)
    set_seed(seed)  # the adapter's initial weights depend on the seed only, not on how the base was loaded
    peft_model = get_peft_model(model, peft_config)
    return peft_model, target_modules


def _save_and_register(
    peft_model: Any,
    workspace: Workspace,
    config: TrainConfig,
    *,
    recorded: dict[str, Any],
    peft_dict: dict[str, Any],
    target_modules: list[str],
    base_hash: str,
    tokenizer_hash: str | None,
    dataset_sha: str,
    metrics: dict[str, float],
    versions: dict[str, str],
    target: Path | None,
    register: bool,
    base: ResolvedBase,
    echo: Callable[[str], None],
) -> tuple[AdapterRecord | None, str, Path | None]:
    _clear_stale_staging(workspace)
    workspace.tmp_dir.mkdir(parents=True, exist_ok=True)
    staging_root = workspace.tmp_dir / f"train-{os.getpid()}-{recorded_key(recorded)}"
    if staging_root.exists():
        shutil.rmtree(staging_root)
    staging_root.mkdir(parents=True)
    folder = staging_root / "adapter"
    dataset_stored = recorded["dataset"]
    ref = dataset_ref(dataset_stored, dataset_sha)
    try:
        try:
            peft_model.save_pretrained(str(folder), safe_serialization=True)
            _canonical_adapter_config(folder)
            checksum = hashing.adapter_checksum(folder)
            metadata = {
                "schema": METADATA_SCHEMA,
                "domain": list(config.domains),
                "method": config.method,
                "rank": config.rank,
                "alpha": peft_dict.get("lora_alpha"),
                "use_rslora": bool(peft_dict.get("use_rslora")),
                "target_modules": target_modules,
                "base": base.name,
                "base_model_hash": base_hash,
                "tokenizer_hash": tokenizer_hash,
                "adapter_checksum": checksum,
                "dataset_ref": ref,
                "dev_ref": dataset_ref(recorded["dev"], recorded["dev_sha256"]) if recorded["dev"] else None,
                "license": config.license,
                "seed": config.seed,
                "metrics": metrics,
                "training_config": recorded,
                "library_versions": versions,
            }
            partial = folder / f".{METADATA_FILE}.partial"
            partial.write_text(json.dumps(metadata, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
            os.replace(partial, folder / METADATA_FILE)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFull(
                    f"disk full while saving the adapter to {folder.parent}; nothing was registered. Free space, "
                    "then run the same command with --resume"
                ) from exc
            raise InvalidInput(
                f"cannot save the adapter to {folder} ({exc}); nothing was registered"
            ) from exc
        if not register:
            return None, checksum, folder
        draft = AdapterDraft(
            domain=list(config.domains),
            method=config.method,
            rank=config.rank,
            base_model_hash=base_hash,
            adapter_checksum=checksum,
            alpha=peft_dict.get("lora_alpha"),
            use_rslora=bool(peft_dict.get("use_rslora")),
            target_modules=list(target_modules),
            tokenizer_hash=tokenizer_hash,
            dataset_ref=ref,
            license=config.license,
            peft_config=_jsonable(peft_dict),
            training_config=recorded,
            seed=config.seed,
            library_versions=versions,
            metrics={k: v for k, v in metrics.items() if v == v},  # drop NaN
            size_bytes=hashing.folder_size(folder),
        )
        with Registry.open(workspace.registry_path) as registry, registry.transaction():
            # One transaction: the base (when new) and the adapter are registered together or not at all.
            if not base.registered:
                added = registry.add_base(base.path, name=base.name, workspace=workspace)
                echo(f"Registered base '{added.name}' ({added.base_model_hash[:12]}) from {base.path}")
            record = registry.register_adapter(draft, folder, workspace, place="move", target=target)
            _rename_metadata_id(record)
            if "ppl_dev" in metrics and recorded.get("dev"):
                registry.add_metrics(
                    record.id,
                    {k: v for k, v in metrics.items() if k.startswith("ppl_dev") and v == v},
                    eval_set=recorded["dev"],
                    eval_set_sha256=recorded["dev_sha256"],
                    run_id=f"train:{recorded_key(recorded)}",
                )
        return record, checksum, record.path
    finally:
        if register:
            shutil.rmtree(staging_root, ignore_errors=True)


def _canonical_adapter_config(folder: Path) -> None:
    """PEFT writes ``target_modules`` from a Python set, in an order that changes with the hash seed; sorted,
    the same training gives the same bytes (and the same ``adapter_checksum``) in every process."""
    config_path = folder / hashing.ADAPTER_CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    partial = config_path.with_name(f".{config_path.name}.partial")
    partial.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(partial, config_path)


def _rename_metadata_id(record: AdapterRecord) -> None:
    """Add the id the registry gave (the metadata file is written before the version is known)."""
    meta_path = record.path / METADATA_FILE
    try:
        metadata = json.loads(meta_path.read_text())
        metadata["id"] = record.id
        partial = meta_path.with_name(f".{METADATA_FILE}.partial")
        partial.write_text(json.dumps(metadata, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
        os.replace(partial, meta_path)
    except OSError:
        pass  # the registry row is the source of truth; the id in the file is a convenience


def recorded_key(recorded: dict[str, Any]) -> str:
    return run_key(recorded)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


__all__ = [
    "METADATA_FILE",
    "DiskFull",
    "TrainConfig",
    "TrainResult",
    "domain_key",
    "library_versions",
    "train_adapter",
]
