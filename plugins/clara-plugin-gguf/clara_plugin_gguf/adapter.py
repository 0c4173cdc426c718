"""A registered PEFT adapter as a GGUF LoRA adapter that llama.cpp (and Ollama) load for the converted base.

llama.cpp's convention (``src/llama-adapter.cpp``, ``convert_lora_to_gguf.py``): ``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha`` (one float for the whole file), ``general.architecture`` the
base's; per adapted weight two tensors named after the base tensor, ``blk.0.attn_q.weight.lora_a`` with numpy
shape ``[r, in]`` and ``blk.0.attn_q.weight.lora_b`` with ``[out, r]`` (PEFT's own shapes). At inference it adds
``scale * B @ (A @ x)`` with ``scale = alpha / r`` (``r`` read from each ``lora_b``'s shape), or ``scale = 1``
where ``alpha`` is 0 or absent; the runtime's own adapter scale (1.0 from ``--lora`` and Ollama) multiplies it.

PEFT's scaling differs per module where an adapter uses rsLoRA (``alpha / sqrt(r)``), an ``alpha_pattern`` or a
``rank_pattern``, so one file-wide ``alpha / r`` cannot express it. Each module's ``lora_b`` is therefore
multiplied by ``peft_scaling / (alpha / r)``: llama.cpp's scale then gives PEFT's delta exactly. DoRA modules
(whose delta depends on the base weight) become the truncated SVD of their exact dense delta at the module's
rank, the relative error recorded per module. The q/k rows are reordered as the base conversion reorders them
(llama's rotary layout).

The adapter is read from the very bytes whose checksum was verified (``read_verified_adapter``). torch,
safetensors and gguf are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from clara_core.plugin_api import (
    AdapterRecord,
    BaseRecord,
    InvalidInput,
    load_base_weights,
    lora_relative_error,
    lora_scaling,
    read_verified_adapter,
    svd_lora_factors,
)

PEFT_PREFIX = "base_model.model."
_A_SUFFIXES = (".lora_A.weight",)
_B_SUFFIXES = (".lora_B.weight",)
_M_SUFFIXES = (".lora_magnitude_vector.weight", ".lora_magnitude_vector")
_EMB_A_SUFFIXES = (".lora_embedding_A.weight", ".lora_embedding_A")
_EMB_B_SUFFIXES = (".lora_embedding_B.weight", ".lora_embedding_B")
#: Modules whose weights a GGUF LoRA adapter does not carry (they go through ``--merged``).
_WHOLE_MODEL_MODULES = ("lm_head", "embed_tokens")
#: Above this relative error of a DoRA module's SVD, the export says that --merged is exact.
SVD_WARN_ERROR = 0.05


def _noop(_line: str) -> None:
    return None


@attrs.define
class AdapterTensors:
    """A PEFT adapter's tensors sorted by what they are, by module name in the base
    (``model.layers.0.self_attn.q_proj``). ``scaling`` is PEFT's per module (rsLoRA, patterns applied)."""

    adapter_id: str
    config: dict
    lora_A: dict[str, Any] = attrs.field(factory=dict)
    lora_B: dict[str, Any] = attrs.field(factory=dict)
    magnitude: dict[str, Any] = attrs.field(factory=dict)
    scaling: dict[str, float] = attrs.field(factory=dict)
    #: LoRA of embedding layers: ``(A [r, vocab], B [hidden, r])`` per module, scaling in ``scaling``.
    embedding: dict[str, tuple[Any, Any]] = attrs.field(factory=dict)
    #: Whole trained weights (``modules_to_save``): the module's new weight.
    whole: dict[str, Any] = attrs.field(factory=dict)
    #: The base's own weight, saved beside a LoRA of an embedding or lm_head (normally unchanged).
    copies: dict[str, Any] = attrs.field(factory=dict)

    @property
    def modules(self) -> list[str]:
        return sorted(self.lora_A)

    def rank(self, module: str) -> int:
        return int(self.lora_A[module].shape[0])

    def outside_blocks(self) -> list[str]:
        """What a GGUF LoRA adapter cannot carry, in words (empty where it can carry everything)."""
        found = [f"a LoRA of the embedding '{m}'" for m in sorted(self.embedding)]
        found += [f"trained whole weights of '{m}' (modules_to_save)" for m in sorted(self.whole)]
        found += [f"a LoRA of '{m}'" for m in self.modules if m.rsplit(".", 1)[-1] in _WHOLE_MODEL_MODULES]
        return found

    def dense(self, module: str, base_weight: Any = None) -> Any:
        """PEFT's exact dense delta ``[out, in]`` of a LoRA/DoRA module, in float64."""
        import torch

        A = self.lora_A[module].to(torch.float64)
        B = self.lora_B[module].to(torch.float64)
        delta = self.scaling[module] * (B @ A)
        magnitude = self.magnitude.get(module)
        if magnitude is None:
            return delta
        weight = base_weight.to(torch.float64)
        combined = weight + delta
        norm = combined.norm(p=2, dim=1, keepdim=True)
        return (magnitude.to(torch.float64).reshape(-1, 1) / norm) * combined - weight


def _strip(name: str, suffixes: tuple[str, ...]) -> str | None:
    for suffix in suffixes:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def read_adapter_tensors(adapter: AdapterRecord) -> AdapterTensors:
    """The adapter's tensors, read from the bytes whose checksum matches the registry (``Conflict`` otherwise)."""
    from safetensors.torch import load

    what = f"adapter '{adapter.id}'"
    if getattr(adapter, "kind", "adapter") == "merged":
        raise InvalidInput(
            f"'{adapter.id}' is a full model with the adapters merged in (composite build --merge-into-base), "
            f"not an adapter with LoRA factors; 'clara export ollama {adapter.id}' exports it as one GGUF"
        )
    files = read_verified_adapter(adapter)
    config = dict(files.config)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise InvalidInput(
            f"{what} is a {config.get('peft_type')} adapter; the ollama export converts LoRA and DoRA adapters"
        )
    if config.get("fan_in_fan_out"):
        raise InvalidInput(
            f"{what} uses fan_in_fan_out (GPT-2 style Conv1D weights), which the Llama-family GGUF export does "
            "not read; export an adapter of a Llama, Mistral or Qwen2 base"
        )
    if config.get("lora_bias") or config.get("bias", "none") not in ("none", None):
        raise InvalidInput(
            f"{what} trains biases (bias={config.get('bias')!r}, lora_bias={config.get('lora_bias')!r}), which "
            "a GGUF LoRA adapter cannot carry; train it with bias='none'"
        )
    try:
        tensors = load(files.weights)
    except Exception as exc:  # a corrupt file: one line, not a traceback
        raise InvalidInput(f"{what}: adapter_model.safetensors cannot be read ({exc})") from exc
    out = AdapterTensors(adapter.id, config)
    for key, tensor in tensors.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        if (module := _strip(name, _A_SUFFIXES)) is not None:
            out.lora_A[module] = tensor
        elif (module := _strip(name, _B_SUFFIXES)) is not None:
            out.lora_B[module] = tensor
        elif (module := _strip(name, _M_SUFFIXES)) is not None:
            out.magnitude[module] = tensor
        elif (module := _strip(name, _EMB_A_SUFFIXES)) is not None:
            out.embedding[module] = (tensor, out.embedding.get(module, (None, None))[1])
        elif (module := _strip(name, _EMB_B_SUFFIXES)) is not None:
            out.embedding[module] = (out.embedding.get(module, (None, None))[0], tensor)
        elif name.endswith(".base_layer.weight"):
            # PEFT saves the base's own weight beside a LoRA of the embedding or lm_head (save_embedding_layers)
            out.copies[name[: -len(".base_layer.weight")]] = tensor
        elif name.endswith(".weight"):  # modules_to_save: PEFT saves the trained copy under the module's name
            out.whole[name[: -len(".weight")]] = tensor
        else:
            raise InvalidInput(
                f"{what} holds '{key}', which is neither a LoRA factor, a DoRA magnitude nor a trained weight; "
                "it cannot be exported"
            )
    if set(out.lora_A) != set(out.lora_B) or not set(out.magnitude) <= set(out.lora_A):
        raise InvalidInput(f"{what} has lora_A, lora_B and magnitude tensors for different modules")
    if any(a is None or b is None for a, b in out.embedding.values()):
        raise InvalidInput(f"{what} has an embedding LoRA with only one of its two factors")
    if not out.lora_A and not out.embedding and not out.whole:
        raise InvalidInput(f"{what} holds no LoRA weights")
    for module in out.lora_A:
        out.scaling[module] = lora_scaling(config, module, out.rank(module))
    for module, (a, _b) in out.embedding.items():
        out.scaling[module] = lora_scaling(config, module, int(a.shape[0]))
    return out


@attrs.define
class ModuleFactors:
    """What the GGUF file holds for one module, in the Hugging Face layout (before the rotary row reorder):
    ``lora_B @ lora_A`` at scaling 1 is the delta the export stands for."""

    lora_A: Any
    lora_B: Any
    #: "exact" (PEFT's own factors) or "svd" (truncated SVD of the exact dense delta)
    method: str
    #: ``||D - B A||_F / ||D||_F`` against PEFT's exact delta ``D`` (0.0 where exact)
    error: float = 0.0


@attrs.define
class AdapterConversion:
    """What :func:`convert_adapter` wrote and how close it is to the adapter."""

    path: Path
    #: "exact" where every module is PEFT's own factors, "svd" where any module is an SVD extraction
    method: str
    #: the relative Frobenius error of every SVD-extracted module (empty where exact)
    errors: dict[str, float]
    #: the file's ``adapter.lora.alpha``
    alpha: float
    #: per module, the factors the file stands for (verification rebuilds the exported model from them)
    factors: dict[str, ModuleFactors] = attrs.field(repr=False, factory=dict)

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


def export_factors(
    tensors: AdapterTensors, base: BaseRecord, echo: Callable[[str], None], *, svd_rank: int = 0
) -> dict[str, ModuleFactors]:
    """Per module, LoRA factors at scaling 1 whose product is the module's delta: PEFT's own (``B`` times the
    module's scaling) where the adapter is plain LoRA, the truncated SVD of the exact delta for DoRA modules, at
    ``svd_rank`` (0: the module's own rank; never above what the module's shape allows, where it is exact)."""
    import torch

    dora = sorted(m for m in tensors.modules if m in tensors.magnitude)
    weights = load_base_weights(base.path, dora) if dora else {}
    factors: dict[str, ModuleFactors] = {}
    for module in tensors.modules:
        if module not in tensors.magnitude:
            A = tensors.lora_A[module].to(torch.float64)
            B = tensors.lora_B[module].to(torch.float64) * tensors.scaling[module]
            factors[module] = ModuleFactors(A, B, "exact")
            continue
        delta = tensors.dense(module, weights[module])
        A, B = svd_lora_factors(delta, min(svd_rank or tensors.rank(module), *delta.shape))
        error = lora_relative_error(delta, A, B)
        factors[module] = ModuleFactors(A.to(torch.float64), B.to(torch.float64), "svd", error)
    if dora:
        worst = max(dora, key=lambda m: factors[m].error)
        echo(
            f"DoRA: {len(dora)} module(s) exported as the truncated SVD of their exact delta at "
            f"{f'rank {svd_rank}' if svd_rank else 'the adapter' + chr(39) + 's rank'}; relative error mean {sum(factors[m].error for m in dora) / len(dora):.2e}, "
            f"max {factors[worst].error:.2e} ({worst})"
        )
        if factors[worst].error > SVD_WARN_ERROR:
            echo(
                f"The SVD drops {factors[worst].error:.0%} of a DoRA delta at this rank; export with --merged for "
                "the exact model, or raise the SVD rank (clara export ollama --svd-rank R; clara --engine llamacpp "
                "serve -o svd_rank=R)"
            )
    return factors


def convert_adapter(
    adapter: AdapterRecord,
    base: BaseRecord,
    dest: Path,
    *,
    echo: Callable[[str], None] = _noop,
    svd_rank: int = 0,
) -> AdapterConversion:
    """Write ``adapter`` (a registered LoRA, DoRA or composite for ``base``) as a GGUF LoRA adapter to ``dest``
    (atomically: a temporary name beside it, then a rename). The tensors are float32 whatever the base's output
    type (an adapter is small, and llama.cpp adds its product in float32 anyway)."""
    from . import base as gguf_base

    tensors = read_adapter_tensors(adapter)
    outside = tensors.outside_blocks()
    if outside:
        raise InvalidInput(
            f"adapter '{adapter.id}' holds {'; '.join(outside[:3])}"
            + (f" and {len(outside) - 3} more" if len(outside) > 3 else "")
            + ": a GGUF LoRA adapter carries LoRA factors of the transformer blocks' linear layers only; "
            "export it merged into the base instead (add --merged)"
        )
    architecture = gguf_base.gguf_architecture({"model_type": base.model_type, **(base.config or {})})
    factors = export_factors(tensors, base, echo, svd_rank=svd_rank)
    configured = float(tensors.config.get("lora_alpha") or 0.0)
    alpha = configured if configured > 0 and math.isfinite(configured) else 0.0
    # the file stores alpha as float32 and llama.cpp computes with that value: fold against the same number
    alpha = float(struct.unpack("f", struct.pack("f", alpha))[0])
    named: list[tuple[str, Any, Any]] = []
    for module, f in factors.items():
        hf_name = gguf_base.tensor_name(base.config, module)
        rank = int(f.lora_A.shape[0])
        llama_scale = alpha / rank if alpha else 1.0
        lora_b = (f.lora_B / llama_scale).float().numpy()
        transform = gguf_base.row_transform(base.config, module)
        if transform is not None:
            lora_b = transform(lora_b)
        named.append((f"{hf_name}.weight", f.lora_A.float().numpy(), lora_b))
    _write_lora_gguf(dest, architecture, alpha, named, name=adapter.id, checksum=adapter.adapter_checksum)
    errors = {m: f.error for m, f in factors.items() if f.method == "svd"}
    return AdapterConversion(dest, "svd" if errors else "exact", errors, alpha, factors)


def _write_lora_gguf(
    dest: Path,
    architecture: str,
    alpha: float,
    tensors: list[tuple[str, Any, Any]],
    *,
    name: str,
    checksum: str | None,
) -> None:
    try:
        import gguf
    except ImportError as exc:
        raise InvalidInput(
            f"writing a GGUF adapter needs the gguf package ({exc}): pip install 'gguf>=0.10' "
            "(or pip install -e plugins/clara-plugin-gguf)"
        ) from None
    import numpy as np

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(str(tmp), architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_name(name)
        if checksum:
            writer.add_string("clara.adapter_checksum", checksum)
        for base_tensor, lora_a, lora_b in sorted(tensors, key=lambda t: t[0]):
            writer.add_tensor(f"{base_tensor}.lora_a", np.ascontiguousarray(lora_a, dtype=np.float32))
            writer.add_tensor(f"{base_tensor}.lora_b", np.ascontiguousarray(lora_b, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the export is meant to be read by ollama's server
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def cached_adapter_gguf(
    adapter: AdapterRecord,
    base: BaseRecord,
    cache_dir: Path,
    *,
    echo: Callable[[str], None] = _noop,
    svd_rank: int = 0,
) -> Path:
    """The adapter's GGUF in ``cache_dir/gguf/adapter-<checksum16>.gguf`` (``-svd<R>`` before the suffix for an
    ``svd_rank`` other than the adapter's own), converted once per checksum and rank (the checksum covers
    weights and config, so a changed adapter never gets a stale file)."""
    if not adapter.adapter_checksum:
        raise InvalidInput(
            f"adapter '{adapter.id}' has no registered checksum; register it again to export it"
        )
    rank = f"-svd{svd_rank}" if svd_rank else ""
    path = Path(cache_dir) / "gguf" / f"adapter-{adapter.adapter_checksum[:16]}{rank}.gguf"
    if not path.is_file():
        echo(f"Converting adapter '{adapter.id}' to GGUF ({path.name}) ...")
        convert_adapter(adapter, base, path, echo=echo, svd_rank=svd_rank)
    return path


def merged_deltas(
    adapter: AdapterRecord, base: BaseRecord, *, echo: Callable[[str], None] = _noop
) -> dict[str, Any]:
    """The exact dense delta of every weight the adapter changes, by module name (``lm_head``,
    ``model.layers.0.self_attn.q_proj``), in the Hugging Face layout (float32): LoRA and DoRA modules as PEFT
    computes them, embedding LoRAs, and whole trained weights (``modules_to_save``) as the difference to the
    base's weight. For ``--merged``."""
    import torch

    tensors = read_adapter_tensors(adapter)
    tied = bool((base.config or {}).get("tie_word_embeddings"))
    needed = sorted(set(tensors.magnitude) | set(tensors.whole) | set(tensors.copies))
    # a tied lm_head has no weight of its own in the checkpoint: it is the embedding's
    stored = {m: ("model.embed_tokens" if tied and m == "lm_head" else m) for m in needed}
    loaded = load_base_weights(base.path, sorted(set(stored.values()))) if needed else {}
    weights = {m: loaded[name] for m, name in stored.items()}
    deltas: dict[str, Any] = {}
    for module in tensors.modules:
        deltas[module] = tensors.dense(module, weights.get(module)).float()
    for module, (a, b) in tensors.embedding.items():
        # PEFT's Embedding LoRA: out = emb(x, A.T) @ B.T * s, so the weight [vocab, hidden] gains s * (B @ A).T
        deltas[module] = (tensors.scaling[module] * (b.double() @ a.double())).T.contiguous().float()
    for module, copy in tensors.copies.items():  # a saved base weight that differs (a resized vocabulary...)
        if module not in tensors.whole and not torch.equal(copy.float(), weights[module].float()):
            tensors.whole[module] = copy
    for module, weight in tensors.whole.items():
        if tuple(weight.shape) != tuple(weights[module].shape):
            raise InvalidInput(
                f"adapter '{adapter.id}' holds '{module}' of shape {tuple(weight.shape)}, but the base's is "
                f"{tuple(weights[module].shape)} (a resized vocabulary?); it cannot be merged into this base"
            )
        change = (weight.to(torch.float64) - weights[module].to(torch.float64)).float()
        deltas[module] = deltas[module] + change if module in deltas else change
    if tied and "model.embed_tokens" in deltas and "lm_head" not in deltas:
        # the embedding changes, the output must not: a zero lm_head delta makes the conversion write the
        # output matrix on its own (the original embedding) instead of reusing the changed one
        deltas["lm_head"] = torch.zeros_like(deltas["model.embed_tokens"])
    echo(f"Merging {len(deltas)} weight delta(s) of adapter '{adapter.id}' into the base")
    return deltas


def factors_as_mapping(conversion: AdapterConversion) -> Mapping[str, tuple[Any, Any]]:
    """``{module: (lora_A, lora_B)}`` of a conversion, at scaling 1 in the Hugging Face layout."""
    return {m: (f.lora_A, f.lora_B) for m, f in conversion.factors.items()}
