"""Building a composite: validation before anything is written, the strategy called once per module, the
result stored as a plain PEFT folder, staged and renamed into ``models/composites/<hash6>_<a>+<b>/`` and
registered (kind ``composite``) with its lineage, all or nothing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from .. import __version__, hashing
from ..errors import Conflict, InvalidInput
from ..fileio import write_json_atomic
from ..naming import normalise_domain
from ..records import AdapterDraft, AdapterRecord
from ..types import MergeCheckRequest, MergeStrategy, MergeStrategyImpl, ModuleMergeRequest, OptionValueError
from ..workspace import Workspace

#: Components of a composite are adapters or composites; a merged full model is no adapter.
_COMBINABLE_KINDS = ("adapter", "composite")
#: File in a composite's folder describing how it was built (PEFT ignores it; the checksum does not cover it).
LINEAGE_FILE = "composite.json"


@attrs.define
class CompositeRequest:
    """What ``clara composite build`` was asked for."""

    adapter_ids: list[str]
    strategy: str
    weights: list[float] | None = None
    #: The strategy's declared options as given (unconverted; defaults are filled in by the build).
    options: dict[str, Any] = attrs.field(factory=dict)
    rank: int | None = None
    #: Parent folder of the composite's folder (default: the workspace's models/composites/).
    out: Path | None = None
    #: The composite's domain name in its id (default: the components' domains joined with '_').
    name: str | None = None
    seed: int = 0
    #: Write a full merged model folder (base weights with the exact merged deltas) instead of an adapter.
    merge_into_base: bool = False


@attrs.define
class CompositeResult:
    record: AdapterRecord
    #: True where the same inputs were built before: nothing was written.
    existed: bool
    #: Relative Frobenius error of each stored module against the exact merged delta.
    errors: dict[str, float] = attrs.field(factory=dict)
    #: Modules touched by more than one component, with each component's share of the delta norm there.
    conflicts: list[dict[str, Any]] = attrs.field(factory=list)

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


def _refuse_weights(request: CompositeRequest, impl: MergeStrategyImpl) -> None:
    count = len(request.adapter_ids)
    if request.weights is None:
        return
    if not impl.takes_weights:
        raise InvalidInput(
            f"strategy '{request.strategy}' takes no --weights; use --strategy weighted to weight the adapters"
        )
    if len(request.weights) != count:
        raise InvalidInput(
            f"--weights got {len(request.weights)} value(s) for {count} adapters; give one weight per adapter, "
            "in the order of --adapters"
        )
    for position, weight in enumerate(request.weights, 1):
        if not math.isfinite(weight):
            raise InvalidInput(f"--weights: weight {position} is {weight}; weights must be finite numbers")


def _convert_options(request: CompositeRequest, registration: MergeStrategy) -> dict[str, Any]:
    declared = {o.name: o for o in registration.options}
    unknown = sorted(set(request.options) - set(declared))
    if unknown:
        flags = ", ".join("--" + n.replace("_", "-") for n in unknown)
        raise InvalidInput(
            f"{flags} is not an option of strategy '{registration.name}' "
            f"(its options: {', '.join(o.flag for o in registration.options) or 'none'})"
        )
    values: dict[str, Any] = {}
    for name, option in declared.items():
        raw = request.options.get(name)
        try:
            values[name] = option.default if raw is None else option.convert(raw)
        except OptionValueError as exc:
            raise InvalidInput(str(exc)) from None
    return values


def composite_hash(
    components: Sequence[AdapterRecord],
    weights: Sequence[float] | None,
    strategy: str,
    options: Mapping[str, Any],
    rank: int | None,
    seed: int,
    merge_into_base: bool = False,
) -> str:
    """The inputs' fingerprint (``hash6`` is its first six characters): same inputs, same folder."""
    document = {
        "components": [[c.id, c.adapter_checksum] for c in components],
        "weights": None if weights is None else [float(w) for w in weights],
        "strategy": strategy,
        "options": dict(options),
        "rank": rank,
        "seed": seed,
    }
    if merge_into_base:  # only where set, so adapter composites keep their hashes
        document["merge_into_base"] = True
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def _module_seed(seed: int, module: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{module}".encode()).digest()[:4], "big")


def _base_for(registry: Any, components: Sequence[AdapterRecord]) -> Any:
    hashes: dict[str, list[str]] = {}
    for record in components:
        hashes.setdefault(record.base_model_hash, []).append(record.id)
    if len(hashes) > 1:
        groups = "; ".join(f"{', '.join(ids)} on base {h[:12]}" for h, ids in hashes.items())
        raise Conflict(f"the adapters were trained on different bases ({groups}); a composite needs one base")
    base = registry.find_base(components[0].base_model_hash)
    if base is None:
        raise Conflict(
            f"the base {components[0].base_model_hash[:12]} of the adapters is not registered; "
            "register it with 'clara base add PATH' first"
        )
    return base


def build_composite(
    request: CompositeRequest,
    workspace: Workspace,
    plugins: Any,
    *,
    echo: Callable[[str], None] = lambda line: None,
) -> CompositeResult:
    """Validate ``request``, build the composite, register it; or say that the same one exists."""
    from ..registry import Registry

    ids = list(request.adapter_ids)
    if len(ids) < 2:
        raise InvalidInput(
            f"a composite combines at least two adapters, got {len(ids)}; name more with --adapters A B"
        )
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise InvalidInput(f"--adapters names {', '.join(duplicates)} more than once; weight it instead")
    if request.rank is not None and request.rank < 1:
        raise InvalidInput(f"--rank must be at least 1, got {request.rank}")
    if request.name is not None:
        request.name = normalise_domain(request.name)
    if request.merge_into_base and request.rank is not None:
        raise InvalidInput(
            "--rank has no use with --merge-into-base: the merged weights hold the exact deltas"
        )
    registration = plugins.merge_strategy(request.strategy)
    impl = registration.create()
    _refuse_weights(request, impl)
    options = _convert_options(request, registration)

    with Registry.open(workspace.registry_path) as registry:
        components = [registry.get_adapter(i) for i in ids]
        for record in components:
            if record.kind not in _COMBINABLE_KINDS:
                raise InvalidInput(
                    f"'{record.id}' is a {record.kind} model, not an adapter; it cannot be a component"
                )
        base = _base_for(registry, components)
        impl.check(
            MergeCheckRequest(weights=request.weights, options=options, adapter_ids=ids, seed=request.seed)
        )
        weights = list(request.weights) if request.weights is not None else [1.0] * len(ids)

        digest = composite_hash(
            components,
            request.weights,
            registration.name,
            options,
            request.rank,
            request.seed,
            request.merge_into_base,
        )
        label = request.name or "+".join(dict.fromkeys(".".join(r.domain) for r in components))
        parent = Path(request.out).resolve() if request.out is not None else workspace.composites_dir
        final = parent / f"{digest[:6]}_{label}"
        existing = _registered_at(registry, workspace, final)
        if existing is not None:
            return CompositeResult(existing, True, *_recorded(existing))
        if final.exists():
            raise Conflict(
                f"{final} already exists and is not this composite; remove it or choose another --out"
            )

        from .. import checks
        from . import tensors as T

        parsed = []
        for record in components:
            files = checks.read_verified_adapter(record)
            parsed.append(T.parse_component(record.id, files.config, files.weights))
        modules = sorted({m for c in parsed for m in c.modules})
        exact_ranks = {m: sum(c.rank(m) for c in parsed if m in c.lora_A) for m in modules}
        exact_rank = max(exact_ranks.values())
        if request.rank is not None and request.rank > exact_rank:
            raise InvalidInput(
                f"--rank {request.rank} is above the exact rank {exact_rank} of this composite (the sum of the "
                f"components' ranks); leave --rank out for the exact composite"
            )
        needs_base = [
            m
            for m in modules
            if request.merge_into_base or impl.needs_base_weight or any(m in c.magnitude for c in parsed)
        ]
        base_weights = T.load_base_weights(base.path, needs_base) if needs_base else {}

        import torch

        dtype = (
            torch.float32
            if any(c.lora_A[c.modules[0]].dtype == torch.float32 for c in parsed)
            else (parsed[0].lora_A[parsed[0].modules[0]].dtype)
        )
        stored: dict[str, Any] = {}
        exact_deltas: dict[str, Any] = {}
        errors: dict[str, float] = {}
        conflicts: list[dict[str, Any]] = []
        for module in modules:
            deltas = [c.delta(module, w) for c, w in zip(parsed, weights, strict=True) if module in c.lora_A]
            base_weight = base_weights.get(module)
            if len(deltas) > 1:
                shares = T.delta_norm_shares(deltas, base_weight)
                conflicts.append(
                    {
                        "module": module,
                        "shares": {d.adapter_id: s for d, s in zip(deltas, shares, strict=True)},
                    }
                )
            merged = impl.merge_module(
                ModuleMergeRequest(
                    module=module,
                    deltas=deltas,
                    base_weight=base_weight,
                    options=options,
                    seed=_module_seed(request.seed, module),
                )
            )
            _check_shapes(registration.name, module, merged, deltas)
            if request.merge_into_base:  # the exact delta goes into the weights: nothing is compressed
                exact_deltas[module] = T.exact_delta(merged, base_weight)
                errors[module] = 0.0
                continue
            result = T.store_module(merged, base_weight, request.rank, exact_ranks[module], dtype)
            stored[module] = result
            errors[module] = result.error
        _warn_conflicts(conflicts, echo)

        config = (
            {}
            if request.merge_into_base
            else T.peft_config(
                stored, parsed[0].config.get("base_model_name_or_path"), T.base_linear_names(base.path)
            )
        )
        lineage = {
            "components": [
                {"id": r.id, "adapter_checksum": r.adapter_checksum, "weight": w}
                for r, w in zip(components, weights, strict=True)
            ],
            "weights": request.weights,
            "strategy": registration.name,
            "options": options,
            "rank": request.rank,
            "seed": request.seed,
            "inputs_sha256": digest,
            "exact": all(s.exact for s in stored.values()),
            "merge_into_base": request.merge_into_base,
            "max_relative_error": max(errors.values(), default=0.0),
            "relative_errors": errors,
            "conflicts": conflicts,
            "clara_version": __version__,
        }
        with workspace.staging("composite") as staging:
            folder = staging / final.name
            folder.mkdir()
            from safetensors.torch import save_file

            if request.merge_into_base:
                T.write_merged_model(base.path, exact_deltas, folder)
                write_json_atomic(folder / LINEAGE_FILE, lineage, sort_keys=True)
                checksum = hashing.base_model_hash(folder)
            else:
                save_file(
                    T.state_dict(stored), str(folder / hashing.ADAPTER_WEIGHTS), metadata={"format": "pt"}
                )
                write_json_atomic(folder / hashing.ADAPTER_CONFIG, config, sort_keys=True)
                write_json_atomic(folder / LINEAGE_FILE, lineage, sort_keys=True)
                checksum = hashing.adapter_checksum(folder)
            duplicate = registry.find_by_checksum(checksum, base.base_model_hash)
            if duplicate is not None:
                return CompositeResult(duplicate, True, *_recorded(duplicate))
            # one domain joined with '_' (steuer_verfahren): an id with '.' is no valid PEFT adapter name,
            # which the transformers engine uses; the components stay in the lineage
            domains = [request.name or "_".join(dict.fromkeys(d for r in components for d in r.domain))[:64]]
            draft = AdapterDraft(
                domain=domains,
                method=registration.name,
                rank=int(config["r"]) if config else exact_rank,
                alpha=float(config["lora_alpha"]) if config else None,
                use_rslora=False,
                target_modules=list(config["target_modules"])
                if config
                else sorted({m.rsplit(".", 1)[-1] for m in modules}),
                base_model_hash=base.base_model_hash,
                tokenizer_hash=base.tokenizer_hash,
                adapter_checksum=checksum,
                peft_config=config,
                training_config={"composite": lineage},
                seed=request.seed,
                library_versions=_library_versions(),
                kind="merged" if request.merge_into_base else "composite",
                size_bytes=hashing.folder_size(folder),
            )
            try:
                with registry.transaction():
                    record = registry.register_adapter(draft, folder, workspace, place="move", target=final)
                    registry.add_lineage(
                        record.id, list(zip(ids, weights, strict=True)), registration.name, options
                    )
            except BaseException:
                if final.exists():
                    shutil.rmtree(final, ignore_errors=True)
                raise
    return CompositeResult(record, False, errors, conflicts)


def _registered_at(registry: Any, workspace: Workspace, folder: Path) -> AdapterRecord | None:
    row = registry.db.execute(
        "SELECT id FROM adapters WHERE path = ?", [workspace.relative(folder)]
    ).fetchone()
    return registry.get_adapter(row[0]) if row else None


def _recorded(record: AdapterRecord) -> tuple[dict[str, float], list[dict[str, Any]]]:
    lineage = record.training_config.get("composite") or {}
    return dict(lineage.get("relative_errors") or {}), list(lineage.get("conflicts") or [])


def _check_shapes(strategy: str, module: str, merged: Any, deltas: Sequence[Any]) -> None:
    out_features, in_features = int(deltas[0].lora_B.shape[0]), int(deltas[0].lora_A.shape[1])
    if merged.dense_delta is not None:
        shape = tuple(merged.dense_delta.shape)
        ok = shape == (out_features, in_features)
    else:
        a, b = tuple(merged.lora_A.shape), tuple(merged.lora_B.shape)
        shape = (b, a)
        ok = len(a) == 2 and len(b) == 2 and a[1] == in_features and b[0] == out_features and a[0] == b[1]
    if not ok:
        from ..errors import PluginError

        raise PluginError(
            f"merge strategy '{strategy}' returned shapes {shape} for {module}, which is "
            f"[{out_features}, {in_features}]; report it to the plugin's authors"
        )


def _warn_conflicts(conflicts: list[dict[str, Any]], echo: Callable[[str], None]) -> None:
    if not conflicts:
        return
    echo(f"warning: layer conflict: {len(conflicts)} module(s) are changed by more than one adapter:")
    for item in conflicts[:8]:
        shares = ", ".join(f"{i} {s:.0%}" for i, s in item["shares"].items())
        echo(f"  {item['module']}: {shares} of the delta norm")
    if len(conflicts) > 8:
        echo(f"  ... and {len(conflicts) - 8} more (clara composite show ID --json lists them all)")


def _library_versions() -> dict[str, str]:
    import importlib.metadata

    versions = {"clara-core": __version__}
    for name in ("torch", "safetensors"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions
