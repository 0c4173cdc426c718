"""Rebuilding an adapter from what the registry recorded (``clara adapters verify --rebuild``): the same base,
dataset, method, options and seed, trained again in a scratch folder, never registered; on a CPU the checksum
must come out the same."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from .. import hashing
from ..errors import Conflict, InvalidInput, NotFound
from ..plugins import PluginManager
from ..registry import AdapterRecord, Registry, parse_dataset_ref
from ..workspace import Workspace
from .config import TrainConfig
from .run import train_adapter


def config_from_record(record: AdapterRecord, workspace: Workspace, registry: Registry) -> TrainConfig:
    """The :class:`TrainConfig` that trained ``record``, from its registry entry, with its inputs checked."""
    recorded = record.training_config
    if not recorded or "dataset" not in recorded:
        raise InvalidInput(
            f"adapter '{record.id}' has no recorded training config (it was registered, not trained by clara); "
            "it cannot be rebuilt"
        )
    base = registry.find_base(recorded.get("base_model_hash") or record.base_model_hash)
    if base is None:
        raise NotFound(
            f"adapter '{record.id}': its base {record.base_model_hash[:12]} is not registered here; "
            "add it with 'clara base add PATH'"
        )
    dataset = workspace.resolve(recorded["dataset"])
    _check_input(record, dataset, recorded["dataset_sha256"], "dataset")
    dev = None
    if recorded.get("dev"):
        dev = workspace.resolve(recorded["dev"])
        _check_input(record, dev, recorded["dev_sha256"], "dev set")
    if record.dataset_ref:
        _, digest = parse_dataset_ref(record.dataset_ref)
        if digest and digest != recorded["dataset_sha256"]:
            raise Conflict(f"adapter '{record.id}': dataset_ref and training config disagree; cannot rebuild")
    return TrainConfig.from_record(
        {**recorded, "domains": list(recorded.get("domains") or record.domain)},
        base=str(base.path),
        dataset=dataset,
        dev=dev,
    )


def _check_input(record: AdapterRecord, path: Path, sha: str, what: str) -> None:
    if not path.is_file():
        raise NotFound(f"adapter '{record.id}': its {what} {path} is gone; restore it to rebuild")
    actual = hashing.sha256_file(path)
    if actual != sha:
        raise Conflict(
            f"adapter '{record.id}': its {what} {path} changed since training (sha256 {sha[:12]} then, "
            f"{actual[:12]} now); restore it to rebuild"
        )


def rebuild_adapter(
    record: AdapterRecord,
    workspace: Workspace,
    plugins: PluginManager,
    *,
    echo: Callable[[str], None] | None = None,
    show_progress: bool = True,
) -> tuple[bool, str]:
    """Train ``record`` again from its recorded inputs, in a scratch folder; (checksums match, new checksum)."""
    with Registry.open(workspace.registry_path) as registry:
        config = config_from_record(record, workspace, registry)
    workspace.tmp_dir.mkdir(parents=True, exist_ok=True)
    scratch = workspace.tmp_dir / f"rebuild-{os.getpid()}-{record.id}"
    if scratch.exists():
        shutil.rmtree(scratch)
    try:
        result = train_adapter(
            config,
            workspace,
            plugins,
            echo=echo,
            register=False,
            show_progress=show_progress,
            run_dir=scratch / "run",
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        for leftover in workspace.tmp_dir.glob(f"train-{os.getpid()}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    return result.adapter_checksum == record.adapter_checksum, result.adapter_checksum


__all__ = ["config_from_record", "rebuild_adapter"]
