"""``clara export ollama ID``: a GGUF base (cached per base hash and output type) with the adapter as a GGUF
LoRA adapter beside it, or one merged GGUF (``--merged``); a Modelfile; verification against transformers.

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
    ExporterImpl,
    ExportRequest,
    ExportResult,
    InvalidInput,
    Option,
    OptionValueError,
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
            "lm_head, and for modules_to_save) instead of base + GGUF LoRA adapter.",
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
        name = request.name or adapter.id
        out = Path(request.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        gguf_base.check_supported(base)

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
        if merged:
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
            conversion = convert_adapter(adapter, base, lora_file, echo=echo)
            details["method"] = conversion.method
            details["lora_alpha"] = conversion.alpha
            if conversion.errors:
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
                f"Ollama Modelfile written by clara export ollama: adapter {adapter.id}"
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
