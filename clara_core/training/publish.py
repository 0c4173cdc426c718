"""Publishing a trained adapter: save it into a staging folder, write clara's metadata file, register it.

The adapter is saved inside the workspace (``metadata/tmp/train-<pid>-<run key>/adapter``), checked and hashed
there, and registered with ``place="move"``, which renames it into ``models/adapters/...`` and records it in one
transaction, together with its base when that is new. A failure at any point registers nothing.

Initialisations that change the base's weights while training (PiSSA, OLoRA, CorDA, LoRA-GA: PEFT rewrites
each weight as ``W - A0 B0``) would give adapters that fit only the changed base. clara snapshots the initial
adapter before training and saves the trained one converted to a plain LoRA of twice the rank
(``save_pretrained(..., path_initial_model_for_weight_conversion=...)``), which fits the unchanged base; an
initialisation it cannot convert (LoftQ) is refused before training.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from .. import hashing
from ..compat import UNCONVERTIBLE_BASE_CHANGING_INITS, base_changing_init
from ..errors import ClaraError, InvalidInput, first_line
from ..fileio import write_json_atomic
from ..registry import AdapterDraft, AdapterRecord, Registry, dataset_ref
from ..workspace import Workspace
from .loop import complete_checkpoints
from .plan import RunPlan, library_versions

METADATA_FILE = "clara_adapter.json"
METADATA_SCHEMA = "clara.adapter/1"
#: The snapshot of a base-changing initialisation, inside the run's staging folder.
_INITIAL = "initial"


class DiskFull(ClaraError):
    code = "disk_full"


def is_disk_full(exc: BaseException) -> bool:
    """``ENOSPC`` anywhere in the exception's chain (``OSError``, or a library error that wraps one)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if getattr(current, "errno", None) == errno.ENOSPC or "No space left on device" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def rerun_advice(run_dir: Path) -> str:
    """How to go on after a failure: from the last complete checkpoint when there is one."""
    if complete_checkpoints(run_dir):
        return "run the same command with --resume"
    return "run the same command again"


def staging_root(workspace: Workspace, plan: RunPlan) -> Path:
    """The run's own staging folder; the pid in its name lets a later run remove it once this process is gone."""
    return workspace.tmp_dir / f"train-{os.getpid()}-{plan.key}"


def clear_stale_staging(workspace: Workspace) -> None:
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


def check_initialisation(config: Any, method: str) -> str | None:
    """The base-changing initialisation the method's PEFT config asks for (``None`` when it leaves the base
    alone); one that clara cannot convert back to a plain LoRA is refused here, before the base is wrapped."""
    init = getattr(config, "init_lora_weights", True)
    kind = base_changing_init(init)
    if kind is None:
        return None
    if kind in UNCONVERTIBLE_BASE_CHANGING_INITS:
        raise InvalidInput(
            f"method '{method}' initialises with init_lora_weights={init!r}, which replaces the base's weights "
            "and cannot be converted back to an adapter for the unchanged base; clara serves every adapter on "
            "the registered base: use another initialisation"
        )
    if getattr(config, "use_rslora", False) and (config.rank_pattern or config.alpha_pattern):
        raise InvalidInput(
            f"method '{method}': init_lora_weights={init!r} with use_rslora and rank_pattern/alpha_pattern "
            "cannot be converted back to an adapter for the unchanged base (PEFT does not support it)"
        )
    return str(init)


def snapshot_initial_adapter(peft_model: Any, folder: Path) -> Path:
    """Save the freshly initialised adapter, before any step: the conversion subtracts it at the end."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    return folder


@attrs.define
class Published:
    record: AdapterRecord | None
    checksum: str
    path: Path


def publish(
    peft_model: Any,
    plan: RunPlan,
    workspace: Workspace,
    *,
    metrics: dict[str, float],
    target_modules: list[str],
    register: bool,
    echo: Callable[[str], None],
    initial: Path | None = None,
) -> Published:
    """Save, describe and (when ``register``) register the adapter; see the module docstring."""
    config, recorded = plan.config, plan.recorded
    root = staging_root(workspace, plan)
    folder = root / "adapter"
    if folder.exists():
        shutil.rmtree(folder)
    ref = dataset_ref(recorded["dataset"], plan.dataset_sha)
    try:
        try:
            if initial is not None:
                peft_model.save_pretrained(
                    str(folder),
                    safe_serialization=True,
                    path_initial_model_for_weight_conversion=str(initial),
                )
            else:
                peft_model.save_pretrained(str(folder), safe_serialization=True)
            saved = _canonical_adapter_config(folder)
            checksum = hashing.adapter_checksum(folder)
            metadata = {
                "schema": METADATA_SCHEMA,
                "domain": list(config.domains),
                "method": config.method,
                "rank": saved["r"],
                "alpha": saved.get("lora_alpha"),
                "use_rslora": bool(saved.get("use_rslora")),
                "target_modules": target_modules,
                "base": plan.base.name,
                "base_model_hash": plan.base.base_model_hash,
                "tokenizer_hash": plan.base.tokenizer_hash,
                "adapter_checksum": checksum,
                "dataset_ref": ref,
                "dev_ref": dataset_ref(recorded["dev"], recorded["dev_sha256"]) if recorded["dev"] else None,
                "license": config.license,
                "seed": config.seed,
                "metrics": metrics,
                "training_config": recorded,
                "library_versions": library_versions(plan.impl),
            }
            write_json_atomic(folder / METADATA_FILE, metadata, sort_keys=True)
        except (OSError, RuntimeError) as exc:
            if is_disk_full(exc):
                raise DiskFull(
                    f"disk full while saving the adapter to {folder.parent}; nothing was registered. Free space, "
                    f"then {rerun_advice(plan.run_dir)}"
                ) from exc
            raise InvalidInput(
                f"cannot save the adapter to {folder} ({first_line(exc)}); nothing was registered"
            ) from exc
        if initial is not None:
            echo(
                f"Saved as a plain LoRA of rank {saved['r']} (2 x {config.rank}) that fits the unchanged base: "
                f"init_lora_weights={peft_model.peft_config['default'].init_lora_weights!r} changed the base's "
                "weights while training"
            )
        if not register:
            return Published(None, checksum, folder)
        draft = AdapterDraft(
            domain=list(config.domains),
            method=config.method,
            rank=int(saved["r"]),
            base_model_hash=plan.base.base_model_hash,
            adapter_checksum=checksum,
            alpha=saved.get("lora_alpha"),
            use_rslora=bool(saved.get("use_rslora")),
            target_modules=list(target_modules),
            tokenizer_hash=plan.base.tokenizer_hash,
            dataset_ref=ref,
            license=config.license,
            peft_config=saved,
            training_config=recorded,
            seed=config.seed,
            library_versions=library_versions(plan.impl),
            metrics={k: v for k, v in metrics.items() if v == v},  # drop NaN
            size_bytes=hashing.folder_size(folder),
        )
        base = plan.base
        with Registry.open(workspace.registry_path) as registry, registry.transaction():
            # One transaction: the base (when new) and the adapter are registered together or not at all.
            if not base.registered:
                added = registry.add_base(base.path, name=base.name, workspace=workspace)
                echo(f"Registered base '{added.name}' ({added.base_model_hash[:12]}) from {base.path}")
            record = registry.register_adapter(draft, folder, workspace, place="move", target=plan.target)
            _add_id_to_metadata(record)
            if "ppl_dev" in metrics and recorded.get("dev"):
                registry.add_metrics(
                    record.id,
                    {k: v for k, v in metrics.items() if k.startswith("ppl_dev") and v == v},
                    eval_set=recorded["dev"],
                    eval_set_sha256=recorded["dev_sha256"],
                    run_id=f"train:{plan.key}",
                )
        return Published(record, checksum, record.path)
    finally:
        if register:
            shutil.rmtree(root, ignore_errors=True)


def _canonical_adapter_config(folder: Path) -> dict[str, Any]:
    """PEFT writes ``target_modules`` from a Python set, in an order that changes with the hash seed; sorted,
    the same training gives the same bytes (and the same ``adapter_checksum``) in every process."""
    config_path = folder / hashing.ADAPTER_CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    write_json_atomic(config_path, config, sort_keys=True)
    return config


def _add_id_to_metadata(record: AdapterRecord) -> None:
    """Add the id the registry gave (the metadata file is written before the version is known)."""
    meta_path = record.path / METADATA_FILE
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        metadata["id"] = record.id
        write_json_atomic(meta_path, metadata, sort_keys=True)
    except OSError:
        pass  # the registry row is the source of truth; the id in the file is a convenience


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


__all__ = [
    "METADATA_FILE",
    "DiskFull",
    "Published",
    "check_initialisation",
    "clear_stale_staging",
    "is_disk_full",
    "publish",
    "snapshot_initial_adapter",
]
