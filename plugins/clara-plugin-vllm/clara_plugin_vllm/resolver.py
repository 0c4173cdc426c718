"""A vLLM LoRA resolver that finds adapters in a clara registry, for plain ``vllm serve --enable-lora``.

vLLM asks its registered resolvers for a LoRA adapter when a request names a model it does not know::

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True CLARA_HOME=/path/to/workspace \\
        vllm serve /path/to/workspace/models/base/<name> --enable-lora --max-lora-rank 64

    curl localhost:8000/v1/completions -d '{"model": "steuerrecht-lora-r16-v1", "prompt": "..."}'

The resolver answers only for registered adapter ids, and only after the checks clara's own server makes: the
adapter was made for the served model (its ``base_model_hash`` equals the served base's, found through the
registry when the served model is a registered base folder, else hashed from the served folder), its files
still match its ``adapter_checksum``, and it has nothing vLLM cannot load (DoRA, ``modules_to_save``, bias).
Anything else is ``None`` (unresolved) with the reason in vLLM's log. The registry is the workspace in
``CLARA_HOME`` (else the workspace around vLLM's working directory).

vLLM names used (vllm-project/vllm main, 2026): ``LoRAResolver`` with ``async def resolve_lora(self,
base_model_name, lora_name) -> LoRARequest | None`` and ``LoRAResolverRegistry.register_resolver(name,
resolver)`` (vllm/lora/resolver.py); vLLM calls ``resolve_lora(self.model_config.model, lora_name)`` and
replaces ``lora_int_id`` with its own counter (vllm/entrypoints/openai/serving_models.py,
``OpenAIServingModels.resolve_lora``), only when ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` is set (the
``_check_model`` of vLLM's serving classes); the ``vllm.general_plugins`` entry-point group, whose functions
vLLM calls in every process, filtered by ``VLLM_PLUGINS`` (vllm/plugins/__init__.py); ``LoRARequest(lora_name,
lora_int_id, lora_path)`` (vllm/lora/request.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

import attrs

from clara_core.plugin_api import (
    BaseRecord,
    ClaraError,
    Registry,
    adapter_checksum,
    base_model_hash,
    check_adapter_for_base,
    find_registry_path,
    read_verified_adapter,
    validate_adapter_id,
)

from .translate import snapshot_stem, vllm_feature_problems, write_snapshot

#: The name the resolver is registered under in vLLM's LoRAResolverRegistry.
RESOLVER_NAME = "clara"
#: The workspace whose registry the resolver reads (clara's usual variable).
WORKSPACE_ENV = "CLARA_HOME"

_log = logging.getLogger("clara_plugin_vllm.resolver")


def stable_lora_int_id(adapter_id: str, checksum: str | None) -> int:
    """A positive 31-bit id from the adapter's id and checksum (vLLM replaces it with its own counter, but
    ``LoRARequest`` refuses ids below 1)."""
    digest = hashlib.sha256(f"{adapter_id}\0{checksum or ''}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31 - 1) + 1


@attrs.frozen
class Decision:
    """The resolver's answer for one name: a path to load, or ``None`` and why not."""

    lora_name: str
    lora_path: str | None
    reason: str
    lora_int_id: int = 0

    @property
    def resolved(self) -> bool:
        return self.lora_path is not None

    def lora_request_kwargs(self) -> dict[str, Any]:
        if self.lora_path is None:
            raise ValueError(f"{self.lora_name} was not resolved: {self.reason}")
        return {"lora_name": self.lora_name, "lora_int_id": self.lora_int_id, "lora_path": self.lora_path}


class ClaraRegistryResolver:
    """Resolves adapter ids against one clara registry; plain Python, usable and testable without vLLM."""

    def __init__(self, registry_path: Path, logger: logging.Logger | None = None) -> None:
        self.registry_path = Path(registry_path)
        self.log = logger or _log

    @classmethod
    def from_environment(cls, logger: logging.Logger | None = None) -> ClaraRegistryResolver | None:
        """The resolver for the workspace in ``CLARA_HOME`` (or around the working directory), if there is one."""
        try:
            registry_path = find_registry_path()
        except ClaraError as exc:
            (logger or _log).warning(
                "clara LoRA resolver is inactive: %s (set %s to the clara workspace)", exc, WORKSPACE_ENV
            )
            return None
        return cls(registry_path, logger)

    def _served_base(self, registry: Registry, served_model: str) -> BaseRecord:
        """The base vLLM serves: the registered base at that folder or of that name, else the folder itself
        (hashed as clara hashes bases). Raises :class:`ClaraError` when it cannot be known."""
        folder = Path(served_model).expanduser()
        if folder.is_dir():
            registered = registry.base_for_path(folder)
            if registered is not None:
                return registered
            base_hash = base_model_hash(folder.resolve(), cache=registry)
            found = registry.find_base(base_hash)
            if found is not None:
                return found
            return BaseRecord(
                name=folder.name,
                path=folder.resolve(),
                base_model_hash=base_hash,
                tokenizer_hash=None,
                architecture=None,
                model_type=None,
                config={},
                size_bytes=0,
                created="",
            )
        return registry.get_base(served_model)

    def decide(self, base_model_name: str, lora_name: str) -> Decision:
        """Whether ``lora_name`` is a clara adapter that vLLM may load for the model ``base_model_name``."""
        try:
            validate_adapter_id(lora_name)
        except ClaraError:
            return Decision(lora_name, None, f"'{lora_name}' is not a clara adapter id")
        try:
            with Registry.open(self.registry_path) as registry:
                if not registry.has_adapter(lora_name):
                    return Decision(
                        lora_name, None, f"'{lora_name}' is not registered in {self.registry_path}"
                    )
                adapter = registry.get_adapter(lora_name)
                try:
                    base = self._served_base(registry, base_model_name)
                except ClaraError as exc:
                    return Decision(
                        lora_name,
                        None,
                        f"cannot tell which base vLLM serves ({base_model_name}): {exc}; serve the base's "
                        "folder (registered with 'clara base add') so that its base_model_hash can be checked",
                    )
                check_adapter_for_base(adapter, base)
        except ClaraError as exc:
            return Decision(lora_name, None, str(exc))
        try:
            # vLLM loads from a folder: a snapshot of the bytes whose checksum was just checked, never the
            # registered folder (a file swapped there later is not what vLLM reads)
            files = read_verified_adapter(adapter)
        except ClaraError as exc:
            return Decision(lora_name, None, str(exc))
        problems = vllm_feature_problems(adapter.id, files.config, adapter.method or "")
        if problems:
            return Decision(lora_name, None, "; ".join(problems))
        # one snapshot per checksum in the workspace's cache (vLLM may load it again after evicting it)
        cache = self.registry_path.parents[1] / "models" / "cache" / "vllm-adapters" / "resolved"
        name = snapshot_stem(adapter.id, files.checksum)
        try:
            if (cache / name).is_dir() and adapter_checksum(cache / name) != files.checksum:
                shutil.rmtree(cache / name)  # not what clara wrote there: written again below
        except ClaraError:
            shutil.rmtree(cache / name, ignore_errors=True)
        folder = write_snapshot(cache, name, files)
        return Decision(
            lora_name,
            str(folder),
            f"adapter '{adapter.id}' (checksum {(adapter.adapter_checksum or '')[:12]}) matches base "
            f"'{base.name}' ({base.base_model_hash[:12]})",
            stable_lora_int_id(adapter.id, adapter.adapter_checksum),
        )

    def decide_and_log(self, base_model_name: str, lora_name: str) -> Decision:
        decision = self.decide(base_model_name, lora_name)
        if decision.resolved:
            self.log.info("clara resolver: resolved %s: %s", lora_name, decision.reason)
        elif "is not registered" in decision.reason or "is not a clara adapter id" in decision.reason:
            self.log.info("clara resolver: %s", decision.reason)  # maybe another resolver's adapter
        else:
            self.log.warning("clara resolver: refused %s: %s", lora_name, decision.reason)
        return decision


def make_vllm_resolver(core: ClaraRegistryResolver, resolver_base: type, request_class: type) -> Any:
    """An instance of a ``resolver_base`` (vLLM's ``LoRAResolver``) subclass that answers through ``core``
    and builds ``request_class`` (vLLM's ``LoRARequest``) objects."""

    class ClaraLoRAResolver(resolver_base):  # type: ignore[misc, valid-type]
        """Resolves LoRA names to adapters of a clara registry, with clara's hash checks."""

        def __init__(self) -> None:
            self.core = core

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
            # Hashing a base or an adapter reads files: keep vLLM's event loop free meanwhile.
            decision = await asyncio.to_thread(self.core.decide_and_log, base_model_name, lora_name)
            return request_class(**decision.lora_request_kwargs()) if decision.resolved else None

    return ClaraLoRAResolver()


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the clara resolver with vLLM (once per process)."""
    try:
        from vllm.lora.request import LoRARequest
        from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry
    except ImportError as exc:  # vLLM without LoRA resolvers, or a broken install: stay out of its way
        _log.warning("clara LoRA resolver not registered: %s", exc)
        return
    logger = _log
    try:
        from vllm.logger import init_logger

        logger = init_logger("vllm.clara_resolver")
    except Exception:  # vLLM's logger layout changed: our own logger still works
        pass
    core = ClaraRegistryResolver.from_environment(logger)
    if core is None:
        return
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, make_vllm_resolver(core, LoRAResolver, LoRARequest))
    logger.info("clara LoRA resolver registered for %s", core.registry_path)
