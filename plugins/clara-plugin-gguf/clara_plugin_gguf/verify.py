"""Proof that an export computes what the original computes: next-token logits of the GGUF files loaded by
llama-cpp-python against the transformers base with the PEFT adapter, on fixed prompts.

Both sides get the same token ids (the Hugging Face tokenizer's), so the comparison is about the weights; the
tokenizer's own conversion is checked where the base is converted. llama.cpp runs with a float32 KV cache here,
so that the runtime's cache precision does not blur the files' (Ollama's default f16 cache adds about f16's
error on top).

The check: ``max |logit_gguf - logit_ref|`` over every position of every prompt must stay within
``TOLERANCES[outtype] * max |logit_ref|``, and the top-1 token must agree at every position whose reference
margin (top-1 minus top-2 logit) is more than twice that bound (where the logits allow no tie to flip).

An SVD-extracted adapter (DoRA) is compared with two references: the model its factors stand for (the base plus
the exported factors' deltas, in torch), under the same tolerance and top-1 rule, which proves the files; and the
DoRA model itself, whose difference is reported and allowed to exceed the tolerance by exactly the difference the
SVD makes in torch (``svd_logit_diff``, measured, not guessed): ``tolerance + svd_logit_diff``; the top-1
agreement with the DoRA model is reported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from clara_core.plugin_api import (
    AdapterRecord,
    BaseRecord,
    ClaraError,
    ExportRejected,
    first_line,
    load_causal_lm,
    read_verified_adapter,
)

#: Largest ``max |logit difference|`` accepted per ``--outtype``, as a fraction of the reference's largest
#: ``|logit|``. Measured on tiny Llamas with strong random adapters (worst seen: f32 3e-6, f16 3.5e-3,
#: bf16 1.1e-2, q8_0 4.2e-2); a wrong scale or a wrong row order costs 30 % and more.
TOLERANCES: dict[str, float] = {"f32": 1e-4, "f16": 1e-2, "bf16": 3e-2, "q8_0": 1e-1}

#: The prompts every export is checked on (German administration, as clara's users write, and English).
PROMPTS: tuple[str, ...] = (
    "Der Bescheid ist schriftlich zu begründen. Gegen den Bescheid ist der Widerspruch zulässig.",
    "Welche Frist gilt für den Einspruch gegen den Steuerbescheid?",
    "Leistungen nach diesem Buch erhalten erwerbsfähige Leistungsberechtigte.",
    "The quick brown fox jumps over the lazy dog.",
)


def tolerance_text() -> str:
    """The tolerances in words, for ``--help``."""
    shown = ", ".join(f"{k} {v:g}" for k, v in TOLERANCES.items())
    return (
        f"verification allows a max |logit difference| of {shown} times the largest |logit| (and top-1 must "
        "agree wherever the logits allow)"
    )


def _noop(_line: str) -> None:
    return None


@attrs.define
class Verification:
    """What verification measured."""

    outtype: str
    reference: str
    prompts: int
    positions: int
    max_abs_diff: float
    logit_scale: float
    #: the largest ``max_abs_diff`` accepted (``TOLERANCES[outtype] * logit_scale``, plus ``svd_logit_diff``
    #: against the DoRA model)
    allowed: float
    top1_agreement: float
    #: positions whose reference margin rules out a tie, and how many of them disagree
    decisive: int
    decisive_disagreements: int
    #: SVD exports: the largest logit difference the SVD itself makes (torch, exported factors vs DoRA model)
    svd_logit_diff: float | None = None
    #: SVD exports: the GGUF files against the model their factors stand for (the conversion's own error),
    #: and the bound it must keep (the outtype's tolerance alone)
    conversion_diff: float | None = None
    conversion_allowed: float | None = None

    @property
    def passed(self) -> bool:
        conversion_ok = (
            self.conversion_diff is None
            or self.conversion_allowed is None
            or self.conversion_diff <= self.conversion_allowed
        )
        return self.max_abs_diff <= self.allowed and self.decisive_disagreements == 0 and conversion_ok

    def summary(self) -> str:
        agreed = f"top-1 agrees at {self.top1_agreement:.1%} of {self.positions} positions"
        if self.decisive_disagreements:
            agreed += f", {self.decisive_disagreements} of {self.decisive} clear-cut ones disagree"
        svd = ""
        if self.svd_logit_diff is not None:
            svd = f"; the SVD itself moves logits by {self.svd_logit_diff:.2e}, conversion {self.conversion_diff:.2e}"
        return (
            f"Compared with {self.reference} on {self.prompts} prompts ({self.outtype}): max |logit difference| "
            f"{self.max_abs_diff:.2e} (allowed {self.allowed:.2e}), {agreed}{svd}"
        )

    def as_details(self) -> dict[str, Any]:
        details = attrs.asdict(self)
        details["passed"] = self.passed
        return details


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars off within the block (restored after, whatever they were)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def reference_logits(
    base: BaseRecord,
    adapter: AdapterRecord | None,
    prompts: Sequence[str] = PROMPTS,
    *,
    factors: Mapping[str, tuple[Any, Any]] | None = None,
    tokenizer_path: Path | None = None,
) -> tuple[list[list[int]], list[Any], list[Any] | None]:
    """Token ids and float64 logits ``[positions, vocab]`` of the transformers base with the PEFT adapter (read
    from its verified bytes; ``None``: the model folder alone), and, with ``factors`` (``{module: (A, B)}`` at
    scaling 1), the logits of the base with those factors' deltas added instead of the adapter.
    ``tokenizer_path``: where the tokenizer is when not in ``base.path``."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path or base.path))
    ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    with quiet_transformers():  # no "Loading weights" bar among the export's own lines
        model = load_causal_lm(base.path, dtype=torch.float32)
    model.eval()
    if adapter is not None:
        model = _with_adapter(model, adapter)

    def run(m: Any) -> list[Any]:
        with torch.no_grad():
            return [m(torch.tensor([row])).logits[0].to(torch.float64) for row in ids]

    reference = run(model)
    approx = None
    if factors is not None:
        plain = model.unload() if adapter is not None else model
        modules = dict(plain.named_modules())
        with torch.no_grad():
            for module, (lora_A, lora_B) in factors.items():
                weight = modules[module].weight
                weight += (lora_B.to(torch.float64) @ lora_A.to(torch.float64)).to(weight.dtype)
        approx = run(plain)
    return ids, reference, approx


def _with_adapter(model: Any, adapter: AdapterRecord) -> Any:
    """``model`` wrapped by PEFT with the adapter loaded from the bytes whose checksum was verified."""
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict
    from safetensors.torch import load as load_safetensors

    files = read_verified_adapter(adapter)
    config = {k: v for k, v in files.config.items() if k != "runtime_config"}
    try:
        peft_config = PeftConfig.from_peft_type(**config)
        peft_config.inference_mode = True
        peft = PeftModel(model, peft_config)
        set_peft_model_state_dict(peft, load_safetensors(files.weights))
    except Exception as exc:  # PEFT refusing the adapter: one line
        raise ClaraError(
            f"adapter '{adapter.id}' cannot be loaded with PEFT for verification: {type(exc).__name__}: "
            f"{first_line(exc)}"
        ) from exc
    peft.eval()
    return peft


def gguf_logits(model_path: Path, lora_path: Path | None, ids: list[list[int]]) -> list[Any]:
    """float64 logits ``[positions, vocab]`` of llama.cpp for each row of ``ids``."""
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise ClaraError(
            f"verifying a GGUF export needs llama-cpp-python ({first_line(exc)}): pip install llama-cpp-python "
            "(or pip install -e plugins/clara-plugin-gguf; it compiles llama.cpp once), or export with --no-verify"
        ) from None
    import numpy as np

    longest = max(len(row) for row in ids)
    try:
        llm = Llama(
            model_path=str(model_path),
            lora_path=str(lora_path) if lora_path is not None else None,
            n_ctx=max(32, longest + 8),
            n_batch=max(32, longest + 8),
            logits_all=True,
            verbose=False,
            type_k=0,  # GGML_TYPE_F32: see the module docstring
            type_v=0,
            seed=0,
        )
    except Exception as exc:  # llama.cpp refusing our own file: the export is wrong, keep it for a look
        what = f"{model_path.name}" + (f" with {lora_path.name}" if lora_path is not None else "")
        raise ExportRejected(
            f"llama.cpp cannot load the export ({what}): {first_line(exc)}; the files are kept for inspection"
        ) from exc
    out = []
    try:
        for row in ids:
            llm.reset()
            llm.eval(row)
            out.append(np.array(llm.scores[: len(row)], dtype=np.float64))
    finally:
        llm.close()
    return out


def compare(
    reference: Sequence[Any], produced: Sequence[Any], outtype: str, *, extra: float = 0.0
) -> dict[str, Any]:
    """The numbers of :class:`Verification` for ``produced`` against ``reference`` (lists of ``[n, vocab]``)."""
    import numpy as np

    ref = np.concatenate([np.asarray(r, dtype=np.float64) for r in reference])
    got = np.concatenate([np.asarray(p, dtype=np.float64) for p in produced])
    vocab = min(ref.shape[1], got.shape[1])
    if got.shape[1] < ref.shape[1]:
        # llama.cpp's vocabulary lacks logits transformers has: never acceptable
        raise ExportRejected(
            f"the export has {got.shape[1]} logits per token, the model {ref.shape[1]}; the vocabulary was lost"
        )
    ref, got = ref[:, :vocab], got[:, :vocab]
    scale = float(np.abs(ref).max())
    allowed = TOLERANCES[outtype] * scale + extra
    diff = float(np.abs(got - ref).max())
    top = np.sort(ref, axis=1)
    margin = top[:, -1] - top[:, -2]
    agree = ref.argmax(axis=1) == got.argmax(axis=1)
    decisive = margin > 2 * allowed
    return {
        "positions": int(ref.shape[0]),
        "max_abs_diff": diff,
        "logit_scale": scale,
        "allowed": allowed,
        "top1_agreement": float(agree.mean()),
        "decisive": int(decisive.sum()),
        "decisive_disagreements": int((decisive & ~agree).sum()),
    }


def verify_export(
    base: BaseRecord,
    adapter: AdapterRecord | None,
    *,
    model_path: Path,
    lora_path: Path | None,
    outtype: str,
    factors: Mapping[str, tuple[Any, Any]] | None = None,
    prompts: Sequence[str] = PROMPTS,
    echo: Callable[[str], None] = _noop,
    reference: str | None = None,
    tokenizer_path: Path | None = None,
) -> Verification:
    """Compare the export (``model_path``, plus ``lora_path`` unless merged) with the transformers base plus the
    adapter (``None``: the model folder ``base.path`` alone, e.g. a merged model, described by ``reference``);
    with ``factors`` (an SVD export) also with the model the exported factors stand for. Raises
    :class:`ExportRejected` when the numbers exceed the tolerances; returns them otherwise."""
    echo(f"Verifying the export with llama.cpp against transformers on {len(prompts)} prompts ...")
    ids, reference_rows, approx = reference_logits(
        base, adapter, prompts, factors=factors, tokenizer_path=tokenizer_path
    )
    produced = gguf_logits(model_path, lora_path, ids)
    if reference is not None:
        name = reference
    elif adapter is None:
        name = f"transformers model '{base.name}'"
    else:
        merged = " (merged)" if lora_path is None else ""
        name = f"transformers + PEFT adapter '{adapter.id}'{merged}"
    if approx is None:
        numbers = compare(reference_rows, produced, outtype)
        result = Verification(outtype=outtype, reference=name, prompts=len(prompts), **numbers)
    else:
        svd_diff = compare(reference_rows, approx, outtype)["max_abs_diff"]
        conversion = compare(approx, produced, outtype)
        numbers = compare(reference_rows, produced, outtype, extra=svd_diff)
        # the top-1 rule holds the files to the model they stand for; against the DoRA model the SVD may move
        # a top-1 token (top1_agreement says how often it did)
        numbers["decisive"] = conversion["decisive"]
        numbers["decisive_disagreements"] = conversion["decisive_disagreements"]
        result = Verification(
            outtype=outtype,
            reference=name,
            prompts=len(prompts),
            svd_logit_diff=svd_diff,
            conversion_diff=conversion["max_abs_diff"],
            conversion_allowed=conversion["allowed"],
            **numbers,
        )
    echo(result.summary())
    if not result.passed:
        raise ExportRejected(
            f"verification failed: {result.summary()}; the export does not compute what the adapter computes"
        )
    return result
