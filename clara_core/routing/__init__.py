"""Routing: fit a router on registered adapters, keep its state beside the registry, load it with a staleness
check, route prompts and evaluate a router on labelled prompts.

State of router NAME: ``metadata/routers/NAME/manifest.json`` (base hash, the adapters' ids and checksums,
keywords, fit time) and ``metadata/routers/NAME/state/`` (what the router's ``save`` wrote). A fit writes a
fresh folder and swaps it in, so a failed fit keeps the old state. Nothing here imports torch; the embedder
for the CLI (:func:`local_embedder`) imports transformers when it is first used.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from ..errors import ClaraError, Conflict, InvalidInput, NotFound
from ..fileio import jsonl_records, write_json_atomic
from ..plugins import PluginManager
from ..records import AdapterRecord, BaseRecord, parse_dataset_ref
from ..types import EmbedFn, RouteDecision, RouteRequest, RouterFitRequest, RouterImpl
from ..workspace import Workspace

#: The label of "the base answers" in evaluations (a labelled record may use it, or "none").
BASE_LABEL = "base"
BASE_LABELS = {"base", "none"}
KEYWORDS_FILE = "keywords.json"


def routers_dir(workspace: Workspace) -> Path:
    return workspace.metadata_dir / "routers"


def state_dir(workspace: Workspace, name: str) -> Path:
    return routers_dir(workspace) / name


def refit_command(name: str, manifest: Mapping[str, Any] | None = None) -> str:
    command = f"clara router fit --router {name}"
    if manifest and manifest.get("selection") != "all":
        command += " --adapters " + " ".join(sorted(manifest.get("adapters") or {}))
    return command


# -- keywords -----------------------------------------------------------------------------------------------------


def load_keywords(workspace: Workspace) -> dict[str, list[str]]:
    path = routers_dir(workspace) / KEYWORDS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ClaraError(f"{path}: unreadable keywords ({exc}); fix or remove the file") from exc
    return {str(k): [str(p) for p in v] for k, v in data.items()}


def check_pattern(pattern: str) -> None:
    if not pattern.strip():
        raise InvalidInput("empty keyword; give a word or a regular expression")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise InvalidInput(
            f"invalid regular expression {pattern!r}: {exc}; fix it (or escape it with \\)"
        ) from exc


def edit_keywords(
    workspace: Workspace, domain: str, add: Sequence[str] = (), remove: Sequence[str] = ()
) -> list[str]:
    """Add or remove patterns of ``domain``; returns the domain's patterns after the change."""
    for pattern in add:
        check_pattern(pattern)
    keywords = load_keywords(workspace)
    current = keywords.get(domain, [])
    missing = [p for p in remove if p not in current]
    if missing:
        raise NotFound(f"domain '{domain}' has no keyword {missing[0]!r}; see 'clara router keywords list'")
    current = [p for p in current if p not in remove] + [p for p in add if p not in current]
    if current:
        keywords[domain] = current
    else:
        keywords.pop(domain, None)
    routers_dir(workspace).mkdir(parents=True, exist_ok=True)
    write_json_atomic(routers_dir(workspace) / KEYWORDS_FILE, keywords, sort_keys=True)
    return current


def _keywords_hash(keywords: Mapping[str, Sequence[str]]) -> str:
    return hashlib.sha256(json.dumps(keywords, sort_keys=True).encode()).hexdigest()


# -- training texts -----------------------------------------------------------------------------------------------


def texts_of(path: Path) -> list[str]:
    """The routable text of every record of a training file: ``text``, a ``prompt``, or a chat's user turns."""
    from ..training.data import load_examples

    texts = []
    for example in load_examples(path):
        if example.kind == "text":
            texts.append(example.text)
        elif example.kind == "prompt_completion":
            texts.append(example.prompt)
        else:
            texts.append("\n".join(content for role, content in example.messages if role == "user"))
    return [t for t in texts if t.strip()]


def _stable_order(texts: Sequence[str]) -> list[str]:
    return sorted(texts, key=lambda t: hashlib.sha256(t.encode()).digest())


def split_sample(texts: Sequence[str], sample: int) -> tuple[list[str], list[str]]:
    """A fixed sample of at most ``sample`` texts for fitting and up to a fifth as many others held out."""
    ordered = _stable_order(texts)
    n_held = min(max(1, len(ordered) // 5), max(1, sample // 5)) if len(ordered) >= 5 else 0
    held, rest = ordered[:n_held], ordered[n_held:]
    return rest[:sample], held


def _dataset_path(workspace: Workspace, adapter: AdapterRecord) -> Path | None:
    if not adapter.dataset_ref:
        return None
    stored, _ = parse_dataset_ref(adapter.dataset_ref)
    path = workspace.resolve(stored)
    return path if path.is_file() else None


# -- fitting ------------------------------------------------------------------------------------------------------


#: What a router chooses among when no ``--adapters`` are named: the trained domain adapters. Composites and
#: merged models have no training data of their own; a router routes to them only when they are named.
DEFAULT_KINDS = frozenset({"adapter"})


def choose_adapters(
    workspace: Workspace, base_name: str | None, adapter_ids: Sequence[str]
) -> tuple[BaseRecord, list[AdapterRecord]]:
    from ..registry import Registry

    with Registry.open(workspace.registry_path) as registry:
        base = registry.choose_base(base_name)
        if adapter_ids:
            adapters = [registry.get_adapter(a) for a in adapter_ids]
            for adapter in adapters:
                if adapter.base_model_hash != base.base_model_hash:
                    raise Conflict(f"adapter '{adapter.id}' belongs to another base than '{base.name}'")
        else:
            adapters = [
                a
                for a in registry.list_adapters()
                if a.base_model_hash == base.base_model_hash and a.kind in DEFAULT_KINDS
            ]
    if not adapters:
        raise NotFound(f"no adapters of base '{base.name}' to route to; register or train some first")
    return base, adapters


def parse_data_options(values: Sequence[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for value in values:
        domain, sep, file = value.partition("=")
        if not sep or not domain.strip() or not file.strip():
            raise InvalidInput(f"--data {value!r}: expected DOMAIN=FILE, e.g. --data steuerrecht=train.jsonl")
        out[domain.strip().lower()] = Path(file.strip())
    return out


def fit_router(
    workspace: Workspace,
    plugins: PluginManager,
    name: str,
    *,
    adapter_ids: Sequence[str] = (),
    data: Mapping[str, Path] | None = None,
    base_name: str | None = None,
    options: Mapping[str, Any] | None = None,
    sample: int = 200,
    embed: EmbedFn | None = None,
) -> dict[str, Any]:
    """Fit router ``name`` and save it with its manifest; returns the manifest."""
    registration = plugins.router(name)
    router = registration.create()
    if sample < 1:
        raise InvalidInput(f"--sample must be at least 1, got {sample}")
    base, adapters = choose_adapters(workspace, base_name, adapter_ids)
    data = dict(data or {})
    domains = {d for a in adapters for d in a.domain}
    unknown = sorted(set(data) - domains)
    if unknown:
        raise InvalidInput(
            f"--data {unknown[0]}=...: no adapter of domain '{unknown[0]}' among {', '.join(sorted(domains))}"
        )
    examples: dict[str, list[str]] = {}
    held_out: dict[str, list[str]] = {}
    for adapter in adapters:
        file = next((data[d] for d in adapter.domain if d in data), None)
        if file is None:
            file = _dataset_path(workspace, adapter)
            if file is None:
                what = (
                    f"its dataset_ref {adapter.dataset_ref} is not a file"
                    if adapter.dataset_ref
                    else "no dataset_ref"
                )
                raise InvalidInput(
                    f"adapter '{adapter.id}' has {what}; give its training data with --data "
                    f"{adapter.domain[0]}=FILE.jsonl"
                )
        if not file.is_file():
            raise InvalidInput(f"{file}: not a file (training data for adapter '{adapter.id}')")
        fit_texts, held = split_sample(texts_of(file), sample)
        examples[adapter.id], held_out[adapter.id] = fit_texts, held
    keywords = load_keywords(workspace)
    target = state_dir(workspace, registration.name)
    previous = target / "state" if (target / "state").is_dir() else None
    if router.needs_embeddings and embed is None:
        embed = local_embedder(base)
    router.fit(
        RouterFitRequest(
            adapters=adapters,
            base=base,
            options=dict(options or {}),
            examples=examples,
            held_out=held_out,
            keywords=keywords,
            embed=embed if router.needs_embeddings else None,
            previous=previous,
        )
    )
    manifest = {
        "router": registration.name,
        "base": base.name,
        "base_model_hash": base.base_model_hash,
        "adapters": {a.id: a.adapter_checksum for a in adapters},
        "selection": "list" if adapter_ids else "all",
        "keywords_sha256": _keywords_hash(keywords),
        "examples": {k: len(v) for k, v in examples.items()},
        "options": dict(options or {}),
        "summary": router.summary(),
        "fitted": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    routers_dir(workspace).mkdir(parents=True, exist_ok=True)
    fresh = routers_dir(workspace) / f".{registration.name}.{os.getpid()}.fitting"
    shutil.rmtree(fresh, ignore_errors=True)
    try:
        (fresh / "state").mkdir(parents=True)
        router.save(fresh / "state")
        write_json_atomic(fresh / "manifest.json", manifest)
        old = routers_dir(workspace) / f".{registration.name}.{os.getpid()}.old"
        if target.exists():
            os.replace(target, old)
        os.replace(fresh, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    return manifest


# -- loading ------------------------------------------------------------------------------------------------------


def read_manifest(workspace: Workspace, name: str) -> dict[str, Any]:
    path = state_dir(workspace, name) / "manifest.json"
    if not path.is_file():
        raise NotFound(f"router '{name}' is not fitted yet; run '{refit_command(name)}' first")
    try:
        manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ClaraError(f"{path}: unreadable ({exc}); run '{refit_command(name)}' again") from exc
    return manifest


def check_fresh(workspace: Workspace, name: str, manifest: Mapping[str, Any], base: BaseRecord) -> None:
    """Refuse a router fitted for another base, another set of adapters or other keywords."""
    from ..registry import Registry

    refit = refit_command(name, manifest)
    if manifest.get("base_model_hash") != base.base_model_hash:
        raise Conflict(
            f"router '{name}' was fitted for base '{manifest.get('base')}', not '{base.name}'; run "
            f"'{refit} --base {base.name}'"
        )
    fitted: dict[str, Any] = dict(manifest.get("adapters") or {})
    with Registry.open(workspace.registry_path) as registry:
        now = {
            a.id: a.adapter_checksum
            for a in registry.list_adapters()
            if a.base_model_hash == base.base_model_hash
        }
    gone = sorted(set(fitted) - set(now))
    if gone:
        raise Conflict(
            f"router '{name}' is stale: adapter '{gone[0]}' is no longer registered; run '{refit}'"
        )
    changed = sorted(a for a in fitted if now[a] != fitted[a])
    if changed:
        raise Conflict(
            f"router '{name}' is stale: adapter '{changed[0]}' changed since the fit; run '{refit}'"
        )
    if manifest.get("selection") == "all":
        with Registry.open(workspace.registry_path) as registry:
            eligible = {
                a.id
                for a in registry.list_adapters()
                if a.base_model_hash == base.base_model_hash and a.kind in DEFAULT_KINDS
            }
        new = sorted(eligible - set(fitted))
        if new:
            raise Conflict(
                f"router '{name}' is stale: adapter '{new[0]}' was registered after the fit; run '{refit}'"
            )
    if manifest.get("keywords_sha256") not in (None, _keywords_hash(load_keywords(workspace))):
        raise Conflict(f"router '{name}' is stale: the keywords changed since the fit; run '{refit}'")


@attrs.define
class LoadedRouter:
    name: str
    router: RouterImpl
    manifest: dict[str, Any]
    base: BaseRecord
    domains: dict[str, list[str]]  # adapter id -> its domains


def load_router(
    workspace: Workspace, plugins: PluginManager, name: str, base: BaseRecord | None = None
) -> LoadedRouter:
    """Router ``name`` with its fitted state, checked to be fresh for ``base`` (default: the registry's only or
    default base)."""
    from ..registry import Registry

    registration = plugins.router(name)
    manifest = read_manifest(workspace, registration.name)
    with Registry.open(workspace.registry_path) as registry:
        if base is None:
            base = registry.choose_base(manifest.get("base") if _has_base(registry, manifest) else None)
        check_fresh(workspace, registration.name, manifest, base)
        domains = {a: registry.get_adapter(a).domain for a in manifest["adapters"]}
    router = registration.create()
    try:
        router.load(state_dir(workspace, registration.name) / "state")
    except ClaraError:
        raise
    except Exception as exc:
        raise ClaraError(
            f"router '{registration.name}': cannot load its state ({type(exc).__name__}: {exc}); run "
            f"'{refit_command(registration.name, manifest)}'"
        ) from exc
    return LoadedRouter(registration.name, router, manifest, base, domains)


def _has_base(registry: Any, manifest: Mapping[str, Any]) -> bool:
    try:
        registry.get_base(str(manifest.get("base_model_hash")))
    except ClaraError:
        return False
    return True


# -- routing and evaluation ---------------------------------------------------------------------------------------


def check_prompt(prompt: str) -> None:
    if not prompt.strip():
        raise InvalidInput("empty prompt; give the text to route")


def route_prompt(loaded: LoadedRouter, prompt: str, embed: EmbedFn | None) -> tuple[RouteDecision, float]:
    check_prompt(prompt)
    start = time.perf_counter()
    decision = loaded.router.route(RouteRequest(prompt=prompt, embed=embed))
    return decision, time.perf_counter() - start


def read_labeled(path: Path, known: set[str]) -> list[tuple[str, str]]:
    """``(text, domain)`` of every line of a labelled file; a malformed line or an unknown domain is one error
    naming the line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read the labelled file ({exc.strerror or exc})") from exc
    out = []
    for number, record in jsonl_records(path, raw):
        where = f"{path}:{number}"
        if not isinstance(record, dict):
            raise InvalidInput(f"{where}: expected a JSON object with 'text' and 'domain'")
        text = record.get("text", record.get("prompt"))
        domain = record.get("domain")
        if not isinstance(text, str) or not text.strip():
            raise InvalidInput(f"{where}: needs a non-empty string 'text' (or 'prompt')")
        if not isinstance(domain, str):
            raise InvalidInput(f"{where}: needs a string 'domain'")
        domain = domain.strip().lower()
        if domain not in known and domain not in BASE_LABELS:
            raise InvalidInput(
                f"{where}: unknown domain '{domain}'; the router knows {', '.join(sorted(known))} "
                f"(and '{BASE_LABEL}' for prompts the base should answer)"
            )
        out.append((text, BASE_LABEL if domain in BASE_LABELS else domain))
    if not out:
        raise InvalidInput(f"{path}: no records; give JSON lines with 'text' and 'domain'")
    return out


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def evaluate(
    loaded: LoadedRouter, records: Sequence[tuple[str, str]], embed: EmbedFn | None
) -> dict[str, Any]:
    """Accuracy, precision and recall per domain, the confusion matrix and per-prompt latency."""
    latencies = []
    predicted = []
    for text, truth in records:
        start = time.perf_counter()
        decision = loaded.router.route(RouteRequest(prompt=text, embed=embed))
        latencies.append(time.perf_counter() - start)
        domains = loaded.domains.get(decision.adapter_id or "", []) if decision.adapter_id else []
        if not domains:
            predicted.append(BASE_LABEL)
        else:
            predicted.append(truth if truth in domains else domains[0])
    labels = sorted({t for _, t in records} | set(predicted), key=lambda d: (d == BASE_LABEL, d))
    matrix = {t: dict.fromkeys(labels, 0) for t in labels}
    for (_, truth), guess in zip(records, predicted, strict=True):
        matrix[truth][guess] += 1
    per_domain = {}
    for label in labels:
        tp = matrix[label][label]
        predicted_n = sum(matrix[t][label] for t in labels)
        actual_n = sum(matrix[label].values())
        per_domain[label] = {
            "precision": tp / predicted_n if predicted_n else None,
            "recall": tp / actual_n if actual_n else None,
            "support": actual_n,
        }
    correct = sum(matrix[label][label] for label in labels)
    return {
        "router": loaded.name,
        "records": len(records),
        "accuracy": correct / len(records),
        "per_domain": per_domain,
        "labels": labels,
        "confusion": [[matrix[t][p] for p in labels] for t in labels],
        "latency_seconds": {"p50": _percentile(latencies, 0.5), "p95": _percentile(latencies, 0.95)},
    }


def plot_confusion(result: Mapping[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ClaraError(
            "--plot needs matplotlib; install the 'plot' extra: pip install 'clara-core[plot]'"
        ) from exc
    labels = result["labels"]
    matrix = result["confusion"]
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.0 * len(labels) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("routed to")
    ax.set_ylabel("labelled")
    ax.set_title(f"router '{result['router']}': accuracy {result['accuracy']:.1%}")
    top = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > top / 2 else "black")
    fig.tight_layout()
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial.png")
    try:
        fig.savefig(partial, dpi=100)
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ClaraError(f"{path}: cannot write the plot ({exc.strerror or exc})") from exc
    finally:
        plt.close(fig)


# -- embeddings for the CLI ---------------------------------------------------------------------------------------


def local_embedder(base: BaseRecord) -> EmbedFn:
    """Embeddings from ``base`` loaded once in this process, on first use (the CLI; the server uses its
    engine's loaded base instead)."""
    from .embed import LocalEmbedder

    return LocalEmbedder(Path(base.path))


def parse_router_options(plugins: PluginManager, name: str, given: Sequence[str]) -> dict[str, Any]:
    """``-o name=value`` pairs as router ``name``'s declared option types (defaults left to the router)."""
    from ..types import OptionValueError

    registration = plugins.router(name)
    by_name = {o.name: o for o in registration.options}
    values: dict[str, Any] = {}
    for item in given:
        raw_name, sep, raw = item.partition("=")
        key = raw_name.strip().replace("-", "_")
        if not sep:
            raise InvalidInput(f"-o {item!r}: expected NAME=VALUE, e.g. -o threshold=0.5")
        option = by_name.get(key)
        if option is None:
            known = ", ".join(sorted(by_name)) or "none"
            raise InvalidInput(
                f"router '{registration.name}' has no option '{raw_name}'; its options: {known}"
            )
        try:
            values[key] = option.convert(raw, label=f"router option -o {key}")
        except OptionValueError as exc:
            raise InvalidInput(str(exc)) from None
    if "threshold" in values and values["threshold"] is not None and not 0 <= float(values["threshold"]) <= 1:
        raise InvalidInput(f"threshold must be between 0 and 1, got {values['threshold']:g}")
    return values
