"""``clara export ollama ID``: a GGUF base (cached per base hash and output type) with the adapter as a GGUF
LoRA adapter beside it, or one merged GGUF (``--merged``); a Modelfile; verification against transformers.

A registry entry of kind ``merged`` (``clara composite build --merge-into-base``: a full model folder with the
exact deltas in its weights) is converted as it is, into one GGUF, and verified against transformers loading that
folder (no PEFT); it is never cached under its base's hash. Its tokenizer is the registered base's (the entry
records the base's ``tokenizer_hash``; the folder's copies are not covered by its checksum).

The core gives a fresh staging folder (``request.out_dir``), moves it into place and registers the files only
when :meth:`OllamaExporter.export` returns; a failed verification raises ``ExportRejected`` after everything
was written, so the core keeps the folder aside (``NAME.rejected-<time>``) for a look.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from clara_core.plugin_api import (
    AdapterRecord,
    BaseRecord,
    Conflict,
    ExporterImpl,
    ExportRequest,
    ExportResult,
    InvalidInput,
    Option,
    OptionValueError,
    base_model_hash,
    first_line,
)

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_OUTTYPE = "f16"


def exporter_options() -> tuple[Option, ...]:
    """The options of ``clara export ollama`` (their help states the verification tolerances)."""
    from .verify import tolerance_text

    return (
        Option(
            "merged",
            bool,
            False,
            "Write one GGUF with the adapter merged into the base (needed for adapters of the embedding or "
            "lm_head, and for modules_to_save) instead of base + GGUF LoRA adapter. A merged model ('clara "
            "composite build --merge-into-base') is always exported as one GGUF, with or without --merged.",
        ),
        Option(
            "outtype",
            str,
            DEFAULT_OUTTYPE,
            f"Weight type of the GGUF base (the adapter is float32); {tolerance_text()}.",
            choices=OUTTYPES,
        ),
        Option(
            "verify",
            bool,
            True,
            "Load the export with llama-cpp-python and compare its logits with transformers + the adapter; "
            "a failed check keeps the folder aside as NAME.rejected-<time> (--no-verify skips it).",
        ),
        Option(
            "svd_rank",
            int,
            0,
            "Rank of the truncated SVD a DoRA adapter's modules become (DoRA has no exact LoRA form); 0 takes "
            "the adapter's own rank. A higher rank lowers the recorded error and grows the file; --merged is "
            "exact. Plain LoRA adapters are exported exactly whatever this says.",
        ),
        Option("create", bool, False, "Run 'ollama create NAME -f Modelfile' when ollama is on PATH."),
    )


def place_file(source: Path, dest: Path) -> str:
    """``source`` at ``dest`` as a hard link (no copy of a multi-GB base), else a copy; says which."""
    try:
        os.link(source, dest)
        return "linked"
    except OSError:
        tmp = dest.with_name(f".{dest.name}.partial")
        shutil.copyfile(source, tmp)
        os.replace(tmp, dest)
        return "copied"


class OllamaExporter(ExporterImpl):
    """The ``ollama`` exporter."""

    def export(self, request: ExportRequest) -> ExportResult:
        from . import base as gguf_base
        from .adapter import convert_adapter, merged_deltas
        from .modelfile import create_command, run_ollama_create, translate_chat_template, write_modelfile

        adapter, base, echo = request.adapter, request.base, request.echo
        options = _options(request.options)
        outtype, merged = options["outtype"], options["merged"]
        if options["svd_rank"] < 0:
            raise InvalidInput(
                f"--svd-rank {options['svd_rank']}: give a positive rank, or 0 for the adapter's own rank"
            )
        name = request.name or adapter.id
        out = Path(request.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        gguf_base.check_supported(base)
        merged_model = getattr(adapter, "kind", "adapter") == "merged"
        if merged_model:
            merged = True  # a merged model is one GGUF whether --merged was given or not

        details: dict[str, Any] = {
            "outtype": outtype,
            "merged": merged,
            "adapter_id": adapter.id,
            "adapter_checksum": adapter.adapter_checksum,
            "base": base.name,
            "base_model_hash": base.base_model_hash,
            "tokenizer_hash": base.tokenizer_hash,
        }
        lora_file: Path | None = None
        conversion = None
        model: BaseRecord | None = None  # a merged model's own folder
        if merged_model:
            model = merged_model_record(adapter, base, echo=echo)
            model_file = out / f"{name}.{outtype}.gguf"
            echo(f"Converting the merged model '{adapter.id}' to GGUF ({outtype}) ...")
            # straight into the export: the cache holds bases by their own hash, and this is not the base
            gguf_base.convert_base(
                model, outtype, model_file, echo=echo, cache_dir=_cache(request.cache_dir), tokenizer=base
            )
            details["method"] = "merged model"
            details["merged_model_hash"] = model.base_model_hash
            details.update(_lineage(adapter))
        elif merged:
            deltas = merged_deltas(adapter, base, echo=echo)
            model_file = out / f"{name}.{outtype}.gguf"
            echo(f"Converting base '{base.name}' with the adapter merged to GGUF ({outtype}) ...")
            gguf_base.convert_base(
                base, outtype, model_file, deltas=deltas, echo=echo, cache_dir=_cache(request.cache_dir)
            )
            details["method"] = "merged"
        else:
            # the adapter first: its refusals (lm_head, modules_to_save, ...) come before any base conversion
            lora_file = out / f"{name}.lora.gguf"
            conversion = convert_adapter(adapter, base, lora_file, echo=echo, svd_rank=options["svd_rank"])
            details["method"] = conversion.method
            details["lora_alpha"] = conversion.alpha
            if conversion.errors:
                details["svd_rank"] = options["svd_rank"] or "the adapter's"
                details["svd_errors"] = conversion.errors
                details["svd_max_error"] = conversion.max_error
            model_file = out / f"{base.name}.{outtype}.gguf"
            if request.cache_dir is not None:
                cached = gguf_base.cached_base_gguf(base, outtype, Path(request.cache_dir), echo=echo)
                details["base_gguf"] = f"{place_file(cached, model_file)} from {cached}"
            else:
                echo(f"Converting base '{base.name}' to GGUF ({outtype}) ...")
                gguf_base.convert_base(base, outtype, model_file, echo=echo, cache_dir=None)

        translation = translate_chat_template(base)
        details["chat_template"] = translation.family
        echo(translation.note)
        modelfile = write_modelfile(
            out / "Modelfile",
            model_file=model_file.name,
            adapter_file=lora_file.name if lora_file is not None else None,
            translation=translation,
            header=(
                f"Ollama Modelfile written by clara export ollama: merged model {adapter.id} of base "
                f"{base.name} ({outtype})"
                if merged_model
                else f"Ollama Modelfile written by clara export ollama: adapter {adapter.id}"
                f"{' merged into' if merged else ' on'} base {base.name} ({outtype})"
            ),
        )
        files = [model_file, *([lora_file] if lora_file is not None else []), modelfile]
        details["files"] = [f.name for f in files]
        details["modelfile"] = modelfile.name

        if options["verify"]:
            from .adapter import factors_as_mapping
            from .verify import verify_export

            factors = factors_as_mapping(conversion) if conversion is not None and conversion.errors else None
            if model is not None:
                verification = verify_export(
                    model,
                    None,
                    model_path=model_file,
                    lora_path=None,
                    outtype=outtype,
                    echo=echo,
                    reference=f"transformers loading the merged model '{adapter.id}' (no PEFT)",
                    tokenizer_path=base.path,
                )
            else:
                verification = verify_export(
                    base,
                    adapter,
                    model_path=model_file,
                    lora_path=lora_file,
                    outtype=outtype,
                    factors=factors,
                    echo=echo,
                )
            details["verification"] = verification.as_details()
        else:
            details["verification"] = None
            echo("Verification skipped (--no-verify)")

        command = " ".join(create_command(name))
        details["ollama_create"] = command
        message = f"To use it with Ollama, run in the export folder: {command}"
        if options["create"]:
            message = run_ollama_create(name, modelfile)
        return ExportResult(files=files, details=details, message=message)


def merged_model_record(adapter: AdapterRecord, base: BaseRecord, *, echo: Any = None) -> BaseRecord:
    """The merged model folder of ``adapter`` (kind ``merged``) as a :class:`BaseRecord` to convert: its own
    name, path, config and hash (the entry's ``adapter_checksum``, which is the folder's ``base_model_hash``),
    the base's tokenizer hash. The folder's config and weights are hashed first and a mismatch with the registry
    is refused (:class:`Conflict`), so what is exported is what was registered."""
    import json

    import attrs

    path = Path(adapter.path)
    if echo is not None:
        echo(f"Checking the merged model's files in {path} against the registry ...")
    try:
        actual = base_model_hash(path)
    except InvalidInput as exc:
        raise InvalidInput(
            f"merged model '{adapter.id}' in {path} cannot be read: {first_line(exc)}"
        ) from None
    if actual != adapter.adapter_checksum:
        raise Conflict(
            f"merged model '{adapter.id}': the files in {path} (hash {actual[:12]}) are not the registered "
            f"ones ({adapter.adapter_checksum[:12]}); 'clara adapters verify {adapter.id}' shows what changed"
        )
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInput(
            f"merged model '{adapter.id}': {path / 'config.json'} cannot be read ({exc})"
        ) from None
    return attrs.evolve(
        base, name=adapter.id, path=path, base_model_hash=adapter.adapter_checksum, config=config
    )


def _lineage(adapter: AdapterRecord) -> dict[str, Any]:
    """What the merged model was built from (its composite lineage), for the export's details."""
    lineage = (adapter.training_config or {}).get("composite") or {}
    out: dict[str, Any] = {}
    if lineage.get("components"):
        out["components"] = lineage["components"]
    if lineage.get("strategy"):
        out["strategy"] = lineage["strategy"]
    return out


def _cache(cache_dir: Path | None) -> Path | None:
    return Path(cache_dir) if cache_dir is not None else None


def _options(raw: Any) -> dict[str, Any]:
    """The declared options with their defaults where the user gave none (``None``)."""
    given = dict(raw or {})
    values = {}
    for option in exporter_options():
        value = given.get(option.name)
        try:
            values[option.name] = option.default if value is None else option.convert(value)
        except OptionValueError as exc:
            raise InvalidInput(str(exc)) from None
    return values
