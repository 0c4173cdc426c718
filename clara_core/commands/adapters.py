"""clara adapters: list, show, register, verify, remove, and the plan's JSON view of the registry."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from .. import hashing
from ..compat import adapter_base_mismatches
from ..errors import Conflict, InvalidInput, RegistryEmpty
from ..fileio import write_json_atomic
from ..naming import did_you_mean, normalise_domain, normalise_method
from ..output import echo_json, echo_table, human_size, short_hash
from ..registry import AdapterDraft, AdapterRecord, Registry, dataset_ref
from ..registry_json import export_document, import_document


@click.group()
def adapters() -> None:
    """Adapters in the registry: list, show, register, verify, remove, export and import."""


#: Metrics 'clara eval' records, shown first (latest value each); the rest follow by name.
EVAL_METRICS = ("ppl", "bpb", "qa_em", "qa_f1", "style_centroid_cos", "style_mean_cos")


def _metric_summary(metrics: dict, limit: int = 4) -> str:
    if not metrics:
        return "-"
    names = [m for m in EVAL_METRICS if m in metrics] + sorted(m for m in metrics if m not in EVAL_METRICS)
    parts = [
        f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}"
        for k in names[:limit]
    ]
    return " ".join(parts)


def _latest_metrics(history: list[dict]) -> list[str]:
    """One line per metric: its latest value, the eval set and when."""
    latest: dict[str, dict] = {}
    for row in history:
        latest[row["name"]] = row
    names = [m for m in EVAL_METRICS if m in latest] + sorted(m for m in latest if m not in EVAL_METRICS)
    return [
        f"  {n}  {latest[n]['value']:.4g}  on {latest[n]['eval_set'] or '-'} ({latest[n]['created']})"
        for n in names
    ]


@adapters.command("list")
@click.option("--domain", help="Only adapters of this domain.")
@click.option("--method", help="Only adapters trained with this method (lora, qlora, dora, ...).")
@click.option("--json", "as_json", is_flag=True, help="Print the registry entries as JSON.")
@click.pass_obj
def list_adapters(obj, domain: str | None, method: str | None, as_json: bool) -> None:
    """List registered adapters (and composites)."""
    with obj.registry() as registry:
        records = registry.list_adapters(domain=domain, method=method)
        base_names = {b.base_model_hash: b.name for b in registry.list_bases()}
        if not records and (domain or method) and not as_json:
            everything = registry.list_adapters()
            if everything:
                click.echo(_no_match(everything, domain, method))
                return
    if as_json:
        echo_json([r.to_entry() for r in records])
        return
    echo_table(
        ("ID", "DOMAIN", "METHOD", "RANK", "BASE", "STATUS", "CREATED", "METRICS"),
        [
            (
                r.id,
                ",".join(r.domain),
                r.method,
                r.rank,
                base_names.get(r.base_model_hash, short_hash(r.base_model_hash)),
                r.status,
                r.created,
                _metric_summary(r.metrics),
            )
            for r in records
        ],
        empty="No adapters registered yet; train one with 'clara train' or add one with 'clara adapters register'.",
    )


def _no_match(records: list[AdapterRecord], domain: str | None, method: str | None) -> str:
    """Why a filtered list is empty while adapters are registered: what exists, and the closest spelling."""
    filters = []
    if domain:
        filters.append(("domain", normalise_domain(domain), sorted({d for r in records for d in r.domain})))
    if method:
        filters.append(("method", normalise_method(method), sorted({r.method for r in records})))
    asked = " and ".join(f"{what} '{value}'" for what, value, _ in filters)
    known = "; ".join(f"{what}s: {', '.join(values)}" for what, _, values in filters)
    hints = "".join(did_you_mean(value, values) for _, value, values in filters if value not in values)
    return f"No adapter with {asked}; {known}{hints}"


@adapters.command("show")
@click.argument("adapter_id")
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON (entry, lineage, metrics history, audit log)."
)
@click.pass_obj
def show(obj, adapter_id: str, as_json: bool) -> None:
    """Show everything the registry knows about ADAPTER_ID."""
    with obj.registry() as registry:
        record = registry.get_adapter(adapter_id)
        lineage = registry.lineage(adapter_id)
        history = registry.metrics_history(adapter_id)
        audit = registry.audit_entries(adapter_id)
        base = registry.find_base(record.base_model_hash)
    if as_json:
        echo_json({**record.to_entry(), "lineage": lineage, "metrics_history": history, "audit": audit})
        return
    rows = [
        ("id", record.id),
        ("kind", record.kind),
        ("domain", ", ".join(record.domain)),
        ("method", record.method),
        (
            "rank / alpha",
            f"{record.rank} / {record.alpha if record.alpha is not None else '-'}"
            + (" (rsLoRA)" if record.use_rslora else ""),
        ),
        ("target modules", ", ".join(record.target_modules) or "-"),
        ("base", f"{base.name if base else '(not registered)'} {record.base_model_hash}"),
        ("tokenizer_hash", record.tokenizer_hash or "-"),
        ("adapter_checksum", record.adapter_checksum or "-"),
        ("dataset_ref", record.dataset_ref or "-"),
        ("license", record.license or "-"),
        ("created", record.created),
        ("status", record.status),
        ("path", str(record.path)),
        (
            "placed by",
            "clara ('adapters rm' deletes the folder)"
            if record.placed_by_clara
            else "you ('adapters rm' keeps the folder)",
        ),
        ("size", human_size(record.size_bytes)),
        ("seed", record.seed if record.seed is not None else "-"),
        ("metrics", json.dumps(record.metrics, sort_keys=True) if record.metrics else "-"),
        ("libraries", ", ".join(f"{k} {v}" for k, v in sorted(record.library_versions.items())) or "-"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key.ljust(width)}  {value}")
    if lineage:
        click.echo("lineage:")
        for item in lineage:
            click.echo(
                f"  {item['position']}: {item['component_id']} weight={item['weight']} ({item['strategy']})"
            )
    if history:
        click.echo("latest metrics:")
        for line in _latest_metrics(history):
            click.echo(line)
        click.echo(
            f"metrics history: {len(history)} value(s); 'clara adapters show {adapter_id} --json' lists them"
        )


@adapters.command("rm")
@click.argument("adapter_id")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--keep-files", is_flag=True, help="Only unregister; leave the adapter folder on disk.")
@click.pass_obj
def rm(obj, adapter_id: str, yes: bool, keep_files: bool) -> None:
    """Remove ADAPTER_ID from the registry, and delete its folder if clara placed it there.

    Folders that clara copied or trained into the workspace are deleted; folders registered with --in-place or
    imported with import-json are only unregistered (clara did not put them there). The id is never given to
    another adapter.
    """
    workspace = obj.workspace()
    with Registry.open(workspace.registry_path) as registry:
        record = registry.get_adapter(adapter_id)
        folder = None if keep_files else registry.deletable_folder(record, workspace)
        what = f"and delete {folder}" if folder else f"(its files stay in {record.path})"
        if not yes and not click.confirm(f"Remove adapter '{adapter_id}' {what}?", default=False):
            raise click.Abort()
        deleted = registry.remove_adapter(adapter_id, workspace, delete_files=not keep_files)
    if deleted is not None:
        click.echo(f"Removed {adapter_id} and deleted {deleted}")
    elif keep_files or not record.path.exists():
        click.echo(f"Removed {adapter_id}")
    elif record.placed_by_clara:
        click.echo(
            f"Removed {adapter_id}; its files stay in {record.path} (the folder holds or lies in another model "
            "or a workspace folder)"
        )
    else:
        click.echo(f"Removed {adapter_id}; its files stay in {record.path} (clara did not place them there)")


def verify_adapter(
    registry: Registry, record: AdapterRecord, base_hashes: dict[str, str | None], full: bool
) -> list[str]:
    """Every way ``record`` no longer matches its files or its base; empty when all is well."""
    problems: list[str] = []
    try:
        # a merged model (clara composite build --merge-into-base) is a full model folder, hashed as bases are
        merged = record.kind == "merged"
        actual = hashing.base_model_hash(record.path) if merged else hashing.adapter_checksum(record.path)
    except InvalidInput as exc:
        problems.append(str(exc))
    else:
        if actual != record.adapter_checksum:
            problems.append(
                f"adapter_checksum changed: registered {short_hash(record.adapter_checksum)}, files {short_hash(actual)}"
            )
    if record.base_model_hash not in base_hashes:
        base = registry.find_base(record.base_model_hash)
        if base is None:
            base_hashes[record.base_model_hash] = None
        else:
            try:
                base_hashes[record.base_model_hash] = hashing.base_model_hash(
                    base.path, None if full else registry
                )
            except InvalidInput as exc:
                base_hashes[record.base_model_hash] = f"unreadable: {exc}"
    now = base_hashes[record.base_model_hash]
    if now is None:
        problems.append(f"base {short_hash(record.base_model_hash)} is not registered in this workspace")
    elif now != record.base_model_hash:
        problems.append(
            f"base files changed: registered {short_hash(record.base_model_hash)}, now {short_hash(now)}"
        )
    return problems


@adapters.command("verify")
@click.argument("adapter_ids", nargs=-1)
@click.option(
    "--full",
    is_flag=True,
    help="Rehash base weights even where the (path, size, mtime) cache says unchanged.",
)
@click.option(
    "--rebuild",
    is_flag=True,
    help="Also retrain each adapter from its recorded inputs and report whether the checksum matches.",
)
@click.pass_obj
def verify(obj, adapter_ids: tuple[str, ...], full: bool, rebuild: bool) -> None:
    """Recompute checksums and base hashes of ADAPTER_IDS (default: all); exit 1 on any mismatch.

    Without ADAPTER_IDS, also notes adapter folders no registry row points to, and staging folders in
    metadata/tmp/ that a killed process left (the next 'adapters register' or 'base add --copy' removes them).

    With --rebuild, each adapter is trained again from the inputs recorded at training time (base, dataset,
    method, options, seed) in a scratch folder, and the new adapter_checksum is compared with the registered
    one; nothing is registered.
    """
    workspace = obj.workspace()
    try:
        opened = Registry.open(workspace.registry_path)
    except RegistryEmpty:  # a lost registry: say which folders it should know before failing
        _report_unregistered(workspace, set())
        _report_leftovers(workspace)
        raise
    with opened as registry:
        records = [registry.get_adapter(i) for i in adapter_ids] if adapter_ids else registry.list_adapters()
        if not records:
            click.echo("No adapters to verify.")
            if not adapter_ids:
                _report_unregistered(workspace, set())
                _report_leftovers(workspace)
            return
        base_hashes: dict[str, str | None] = {}
        failures = 0
        for record in records:
            problems = verify_adapter(registry, record, base_hashes, full)
            if problems:
                failures += 1
                for problem in problems:
                    click.echo(f"MISMATCH {record.id}: {problem}")
            else:
                click.echo(f"ok       {record.id}")
        if not adapter_ids:
            _report_unregistered(workspace, {r.path.resolve() for r in registry.list_adapters()})
            _report_leftovers(workspace)
    if rebuild:
        failures += _rebuild(obj, records)
    if failures:
        raise click.ClickException(f"{failures} of {len(records)} adapter(s) failed verification")
    click.echo(f"All {len(records)} adapter(s) match their registered checksums and bases.")


def _report_unregistered(workspace, registered: set[Path]) -> None:
    """Adapter folders in the workspace's convention that no registry row points to (left by a process killed
    between moving its finished adapter into place and committing it): reported, never deleted."""
    for config in sorted(workspace.adapters_dir.glob("*/*/adapter_config.json")):
        folder = config.parent
        if folder.resolve() not in registered:
            click.echo(
                f"note     {workspace.relative(folder)} is not registered: register it with "
                f"'clara adapters register {workspace.relative(folder)} --domain {folder.parent.name} --in-place', "
                "or delete it"
            )


def _report_leftovers(workspace) -> None:
    """Staging folders in metadata/tmp whose process died (killed during a copy or a training): reported here,
    removed by the next command that stages files."""
    for leftover in workspace.staging_leftovers():
        what = f"note     {workspace.relative(leftover.path)} ({human_size(leftover.size_bytes)}) is a staging folder"
        if leftover.removable:
            click.echo(
                f"{what} left by {leftover.owner}: the next 'clara adapters register' or 'clara base add --copy' "
                "removes it, or delete it yourself"
            )
        else:
            click.echo(
                f"{what} of {leftover.owner}, without an owner marker: clara removes it once it is a day old; "
                "delete it yourself if no clara process on another machine or container is using it"
            )


def _rebuild(obj, records: list[AdapterRecord]) -> int:
    """Retrain each record from its recorded inputs; the number whose checksum does not match."""
    from ..errors import ClaraError
    from ..training import rebuild_adapter

    workspace = obj.workspace()
    failures = 0
    for record in records:
        click.echo(f"rebuilding {record.id} from its recorded inputs ...", err=True)
        try:
            same, checksum = rebuild_adapter(
                record, workspace, obj.plugins, echo=lambda line: click.echo("  " + line, err=True)
            )
        except ClaraError as exc:
            failures += 1
            click.echo(f"MISMATCH {record.id}: cannot rebuild: {exc}")
            continue
        if same:
            click.echo(f"rebuilt  {record.id}: adapter_checksum matches ({short_hash(checksum)})")
        else:
            failures += 1
            click.echo(
                f"MISMATCH {record.id}: rebuilt adapter_checksum {short_hash(checksum)} != registered "
                f"{short_hash(record.adapter_checksum)}"
            )
    return failures


def _method_from_config(config: dict) -> str:
    if config.get("use_dora"):
        return "dora"
    peft_type = str(config.get("peft_type", "")).lower()
    if peft_type != "lora":
        raise InvalidInput(
            f"unsupported PEFT type '{config.get('peft_type')}': clara registers LoRA-family adapters"
        )
    return "lora"


@adapters.command("register")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--domain", "domains", multiple=True, required=True, help="Domain (repeat for several).")
@click.option("--method", help="Training method (default: dora if the config says use_dora, else lora).")
@click.option("--base", "base_name", help="Registered base it was trained on (default: the only one).")
@click.option(
    "--dataset",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Training data, for dataset_ref.",
)
@click.option("--license", "license_", help="License of the adapter (e.g. apache-2.0).")
@click.option(
    "--in-place",
    is_flag=True,
    help="Record the folder where it lies instead of copying it into the workspace.",
)
@click.pass_obj
def register(
    obj,
    path: Path,
    domains: tuple[str, ...],
    method: str | None,
    base_name: str | None,
    dataset: Path | None,
    license_: str | None,
    in_place: bool,
) -> None:
    """Register an existing PEFT adapter folder PATH made elsewhere.

    The folder is copied to models/adapters/<domain>/<method>-r<rank>-v<N>/ (next free version) unless
    --in-place. Its tensor shapes are checked against the base before anything is written.
    """
    workspace = obj.workspace()
    config = hashing.read_adapter_config(path)
    workspace.remove_abandoned_staging()  # what a killed copy left (its owner is gone): 'verify' reports it
    with Registry.open(workspace.registry_path) as registry:
        base = registry.choose_base(base_name)
        problems = adapter_base_mismatches(path, base.path)
        if problems:
            raise Conflict(f"{path} does not fit base '{base.name}': {'; '.join(problems)}")
        checksum = hashing.adapter_checksum(path)
        rank = int(config.get("r") or 0)
        draft = AdapterDraft(
            domain=list(domains),
            method=(method or _method_from_config(config)).lower(),
            rank=rank,
            alpha=config.get("lora_alpha"),
            use_rslora=bool(config.get("use_rslora")),
            target_modules=_target_modules(config),
            base_model_hash=base.base_model_hash,
            tokenizer_hash=base.tokenizer_hash,
            adapter_checksum=checksum,
            dataset_ref=dataset_ref(
                os.path.relpath(dataset.resolve(), workspace.root)
                if workspace.contains(dataset)
                else str(dataset.resolve()),
                hashing.sha256_file(dataset),
            )
            if dataset
            else None,
            license=license_,
            peft_config=config,
            size_bytes=hashing.folder_size(path),
        )
        record = registry.register_adapter(
            draft, path, workspace, place="in_place" if in_place else "copy", refuse_duplicate=True
        )
    click.echo(f"Registered {record.id} at {record.path}")


def _target_modules(config: dict) -> list[str]:
    modules = config.get("target_modules") or []
    if isinstance(modules, str):
        return [modules]
    return sorted(str(m) for m in modules)


@adapters.command("export-json")
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), help="Default: metadata/adapter_registry.json"
)
@click.pass_obj
def export_json(obj, out: Path | None) -> None:
    """Write the registry as the plan's adapter_registry.json (one entry per adapter)."""
    workspace = obj.workspace()
    with Registry.open(workspace.registry_path) as registry:
        document = export_document(registry)
    target = out or workspace.metadata_dir / "adapter_registry.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(target, document)
    click.echo(f"Wrote {len(document['adapters'])} adapter entries to {target}")


@adapters.command("import-json")
@click.argument("file", type=click.Path(path_type=Path))
@click.pass_obj
def import_json(obj, file: Path) -> None:
    """Restore adapter entries from FILE (written by export-json); all or nothing.

    Each adapter's path must lie in this workspace's models/adapters/; imported folders are never deleted by
    'clara adapters rm' (clara did not place them).
    """
    if not file.is_file():
        raise InvalidInput(f"{file}: no such file")
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InvalidInput(f"{file}: not valid JSON ({exc})") from exc
    workspace = obj.workspace()
    with Registry.open(workspace.registry_path) as registry:
        result = import_document(registry, document, str(file), workspace)
    click.echo(
        f"Imported {len(result['added'])} adapter(s); {len(result['unchanged'])} already registered unchanged."
    )
