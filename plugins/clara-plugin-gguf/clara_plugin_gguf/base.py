"""A registered Hugging Face base (safetensors folder) as a GGUF file that llama.cpp loads, tokenizer included.

Written for clara with the ``gguf`` library; the names and facts (tensor names, metadata keys, llama.cpp's
rotary row order for Llama-family q/k projections) follow llama.cpp's own converter.

Public API (the exporter and the llama.cpp engine build on it):

- :data:`SUPPORTED_ARCHITECTURES`, :func:`check_supported`: what can be converted, with a clear error otherwise;
- :func:`tensor_name`: an HF linear module (``model.layers.0.self_attn.q_proj``) to its GGUF base tensor name
  without ``.weight`` (``blk.0.attn_q``); a LoRA adapter's tensors are that name plus ``.weight.lora_a`` and
  ``.weight.lora_b`` (llama.cpp pairs adapter tensors with base tensors by stripping ``.lora_a``/``.lora_b``);
- :func:`row_transform`: the reordering of output rows the conversion applies to a module's weight (adapters
  apply it to ``lora_B`` and to dense deltas so that adapter and base agree);
- :func:`convert_base`: write the GGUF (``f32``, ``f16``, ``bf16``, ``q8_0``) atomically, optionally with dense
  weight deltas added (``--merged`` exports);
- :func:`cached_base_gguf`: the converted base, cached per ``base_model_hash`` and output type.

torch, safetensors, transformers, gguf and llama_cpp are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clara_core.plugin_api import BaseRecord, InvalidInput, first_line

if TYPE_CHECKING:
    import numpy as np
    import torch

#: Hugging Face ``model_type`` -> GGUF ``general.architecture``. Mistral's dense models are Llama-shaped and
#: llama.cpp runs them as ``llama``.
SUPPORTED_ARCHITECTURES: dict[str, str] = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}

#: Output types ``convert_base`` writes, with llama.cpp's ``general.file_type`` (``LLAMA_FTYPE_*``) for each.
OUTTYPES: dict[str, int] = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}

#: GGUF architectures whose q/k projections llama.cpp expects in its rotary row order (it applies rotary
#: embeddings to adjacent pairs, Hugging Face's Llama to the two halves of each head).
_PERMUTED_ARCHS = frozenset({"llama"})

#: Per-layer HF module (after ``model.layers.N.``) -> GGUF tensor name (after ``blk.N.``).
_LAYER_MODULES: dict[str, str] = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
#: Whole-model HF modules -> GGUF tensor names.
_GLOBAL_MODULES: dict[str, str] = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}
#: Tensors in HF checkpoints that carry no weights llama.cpp needs.
_SKIPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_PEFT_PREFIX = "base_model.model."

Echo = Callable[[str], None]


# -- what can be converted -----------------------------------------------------------------------------------


def gguf_architecture(base_config: Mapping[str, Any]) -> str:
    """The GGUF architecture for a base's ``config.json`` (``InvalidInput`` when unsupported)."""
    model_type = str(base_config.get("model_type") or "")
    arch = SUPPORTED_ARCHITECTURES.get(model_type)
    if arch is None:
        supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        raise InvalidInput(
            f"architecture '{model_type or 'unknown'}' cannot be exported to GGUF by clara (supported: "
            f"{supported}); use a base of a supported family"
        )
    return arch


def check_supported(base: BaseRecord, *, tokenizer: BaseRecord | None = None) -> None:
    """Raise :class:`InvalidInput` (one line) unless ``base`` can be converted: a supported architecture (named
    with the supported ones otherwise), the activation llama.cpp's Llama/Qwen2 graphs compute (SiLU), a rotary
    scaling clara converts, and a tokenizer (``tokenizer.json`` or ``tokenizer.model``) next to the weights (or
    in ``tokenizer``'s folder where the tokenizer comes from another record)."""
    config = base.config or {}
    gguf_architecture({"model_type": base.model_type or config.get("model_type"), **config})
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise InvalidInput(
            f"base '{base.name}': hidden_act '{act}' is not what llama.cpp computes for "
            f"{config.get('model_type')} (silu); it cannot be exported to GGUF"
        )
    _rope_settings(config, base.name)
    source = tokenizer or base
    if not (source.path / "tokenizer.json").is_file() and not (source.path / "tokenizer.model").is_file():
        raise InvalidInput(
            f"base '{source.name}' ({source.path}) has no tokenizer (tokenizer.json or tokenizer.model); a GGUF "
            "model carries its tokenizer: save it next to the weights (tokenizer.save_pretrained(PATH))"
        )


def _rope_settings(config: Mapping[str, Any], name: str = "") -> dict[str, Any]:
    """rope_theta and scaling from either the transformers 5 ``rope_parameters`` or the older keys."""
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise InvalidInput(
            f"base '{name}': rotary scaling '{rope_type}' is not converted to GGUF by clara "
            "(supported: none, linear, llama3)"
        )
    return {"theta": float(theta), "type": rope_type, **{k: v for k, v in merged.items() if k != "type"}}


# -- names and row order -------------------------------------------------------------------------------------


def _hf_module(hf_module: str) -> str:
    name = hf_module[len(_PEFT_PREFIX) :] if hf_module.startswith(_PEFT_PREFIX) else hf_module
    return name.removesuffix(".weight").removesuffix(".bias")


def tensor_name(base_config: Mapping[str, Any], hf_module: str) -> str:
    """The GGUF base tensor name, without ``.weight``, of the HF module ``hf_module``.

    ``"model.layers.0.self_attn.q_proj"`` -> ``"blk.0.attn_q"``, ``"lm_head"`` -> ``"output"``. A PEFT prefix
    (``base_model.model.``) and a trailing ``.weight``/``.bias`` are ignored. The base tensor is
    ``f"{name}.weight"``; a GGUF LoRA adapter names its factors ``f"{name}.weight.lora_a"`` and
    ``f"{name}.weight.lora_b"``. Raises :class:`InvalidInput` for a module the GGUF model does not have.
    """
    gguf_architecture(base_config)
    name = _hf_module(hf_module)
    if name in _GLOBAL_MODULES:
        return _GLOBAL_MODULES[name]
    match = _LAYER.match(name)
    if match and match.group(2) in _LAYER_MODULES:
        layer = int(match.group(1))
        if layer < int(base_config.get("num_hidden_layers", layer + 1)):
            return f"blk.{layer}.{_LAYER_MODULES[match.group(2)]}"
    raise InvalidInput(
        f"module '{hf_module}' has no GGUF tensor in a {base_config.get('model_type')} base "
        "(GGUF export covers the attention and MLP projections, embeddings, norms and lm_head)"
    )


def _rotary_permutation(n_head: int) -> Callable[[Any], Any]:
    def permute(weight: Any) -> Any:
        rows = weight.shape[0]
        if rows % (2 * n_head):
            raise ValueError(f"{rows} rows do not split into {n_head} heads of pairs")
        return (
            weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape)
        )

    return permute


def row_transform(base_config: Mapping[str, Any], hf_module: str) -> Callable[[Any], Any] | None:
    """The reordering of OUTPUT rows (dimension 0) that :func:`convert_base` applies to ``hf_module``'s weight
    (and bias), or ``None`` where it writes them in Hugging Face order.

    For Llama-family bases (``llama``, ``mistral``) llama.cpp expects the q and k projections with each head's
    rotary halves interleaved; the transform does that for a tensor of any width (a weight ``[out, in]``, a bias
    ``[out]``, a LoRA ``B`` ``[out, r]`` or a dense delta), torch or numpy. Adapters apply it to ``lora_B`` so
    that ``B' @ A`` equals the transformed delta. Qwen2 uses llama.cpp's NeoX rotary order: no transform."""
    arch = gguf_architecture(base_config)
    if arch not in _PERMUTED_ARCHS:
        return None
    name = _hf_module(hf_module)
    n_head = int(base_config["num_attention_heads"])
    if name.endswith("self_attn.q_proj"):
        return _rotary_permutation(n_head)
    if name.endswith("self_attn.k_proj"):
        return _rotary_permutation(int(base_config.get("num_key_value_heads") or n_head))
    return None


# -- the checkpoint ------------------------------------------------------------------------------------------


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InvalidInput(f"{path}: no safetensors weights; clara converts safetensors bases only")
    return files


class _Checkpoint:
    """Names, shapes and (lazily) the tensors of a safetensors base, across shards."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self._stack = contextlib.ExitStack()
        self.location: dict[str, Any] = {}
        for file in _weight_files(path):
            try:
                handle = self._stack.enter_context(safe_open(str(file), framework="pt"))
            except Exception as exc:
                self._stack.close()
                raise InvalidInput(f"{file}: unreadable safetensors weights ({first_line(exc)})") from exc
            for key in handle.keys():  # noqa: SIM118 (safe_open has keys(), not __iter__)
                self.location[key] = handle

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.location[key].get_slice(key).get_shape())

    def tensor(self, key: str) -> torch.Tensor:
        import torch

        return self.location[key].get_tensor(key).to(torch.float32)

    def close(self) -> None:
        self._stack.close()


# -- conversion ----------------------------------------------------------------------------------------------


def _human(num: float) -> str:
    if num < 1024:
        return f"{num:.0f} B"
    for unit in ("KB", "MB", "GB"):
        num /= 1024
        if num < 1024 or unit == "GB":
            break
    return f"{num:.1f} {unit}"


@dataclasses.dataclass
class _Plan:
    """One output tensor: its GGUF name, its (PyTorch-order) shape, storage type, and how to compute it."""

    name: str
    shape: tuple[int, ...]
    qtype: Any
    source: Callable[[], np.ndarray]


def _storage_type(outtype: str, gguf_name: str, shape: tuple[int, ...]) -> Any:
    """The GGML type a tensor is stored as: 1-D tensors and norms stay f32 (llama.cpp computes them in f32);
    matrices take ``outtype``; a q8_0 matrix whose rows are not a multiple of 32 falls back to f16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) < 2 or gguf_name.endswith("_norm.weight") or gguf_name == "rope_freqs.weight":
        return GGMLQuantizationType.F32
    qtype = {
        "f32": GGMLQuantizationType.F32,
        "f16": GGMLQuantizationType.F16,
        "bf16": GGMLQuantizationType.BF16,
        "q8_0": GGMLQuantizationType.Q8_0,
    }[outtype]
    block = GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return GGMLQuantizationType.F16
    return qtype


def _encode(array: np.ndarray, qtype: Any) -> np.ndarray:
    from gguf import quants

    return quants.quantize(array, qtype)


def _byte_size(shape: tuple[int, ...], qtype: Any) -> tuple[tuple[int, ...], Any]:
    """(shape as add_tensor_info wants it, numpy dtype) for a tensor of ``shape`` stored as ``qtype``."""
    import numpy as np
    from gguf import GGMLQuantizationType, quant_shape_to_byte_shape

    if qtype == GGMLQuantizationType.F32:
        return shape, np.dtype(np.float32)
    if qtype == GGMLQuantizationType.F16:
        return shape, np.dtype(np.float16)
    return quant_shape_to_byte_shape(shape, qtype), np.dtype(np.uint8)


def _llama3_rope_factors(config: Mapping[str, Any], rope: Mapping[str, Any]) -> np.ndarray:
    """Per-frequency divisors for Llama 3.1-style rotary scaling (llama.cpp reads them from ``rope_freqs``)."""
    import math

    import numpy as np

    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    factor = float(rope["factor"])
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * rope["theta"] ** (i / head_dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _add_model_metadata(writer: Any, base: BaseRecord, outtype: str) -> dict[str, Any]:
    """The ``general.*`` and ``<arch>.*`` keys; returns the rotary settings for the tensors to follow."""
    config = base.config
    rope = _rope_settings(config, base.name)
    n_head = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // n_head)
    writer.add_name(base.name)
    writer.add_context_length(int(config.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or n_head))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(rope["theta"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(int(config["vocab_size"]))
    if rope["type"] == "linear":
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_file_type(OUTTYPES[outtype])
    writer.add_quantization_version(2)
    writer.add_string("clara.base_model_hash", base.base_model_hash)
    return rope


def _plan_tensors(
    base: BaseRecord,
    checkpoint: _Checkpoint,
    outtype: str,
    deltas: Mapping[str, torch.Tensor],
    rope: Mapping[str, Any],
) -> list[_Plan]:
    config = base.config
    tied = bool(config.get("tie_word_embeddings", False))
    plans: list[_Plan] = []
    unused_deltas = {_hf_module(k): v for k, v in deltas.items()}
    delta_of: dict[str, torch.Tensor] = {}
    for module in list(unused_deltas):
        tensor_name(config, module)  # unknown module: a clear error before any work

    def source(key: str, module: str, kind: str) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            data = checkpoint.tensor(key)
            delta = delta_of.get(module) if kind == "weight" else None
            if delta is not None:
                data = data + delta.to(data.dtype)
            transform = row_transform(config, module)
            if transform is not None:
                data = transform(data)
            return data.contiguous().numpy()

        return load

    for key in sorted(checkpoint.location, key=_tensor_order):
        if _SKIPPED.search(key):
            continue
        kind = key.rsplit(".", 1)[-1]
        module = key.rsplit(".", 1)[0]
        if kind not in ("weight", "bias"):
            raise InvalidInput(
                f"base '{base.name}': unexpected tensor '{key}'; it has no place in a GGUF model"
            )
        if tied and module == "lm_head":
            continue  # the same matrix as the embeddings; llama.cpp reuses token_embd
        try:
            gguf_name = f"{tensor_name(config, module)}.{kind}"
        except InvalidInput:
            raise InvalidInput(
                f"base '{base.name}': tensor '{key}' has no GGUF counterpart in clara's {config.get('model_type')} "
                "conversion"
            ) from None
        shape = checkpoint.shape(key)
        if kind == "weight" and module in unused_deltas:
            delta = unused_deltas.pop(module)
            if tuple(delta.shape) != shape:
                raise InvalidInput(
                    f"delta for '{module}' has shape {tuple(delta.shape)}, the base weight {shape}; "
                    "the merged weights do not belong to this base"
                )
            delta_of[module] = delta
        plans.append(
            _Plan(gguf_name, shape, _storage_type(outtype, gguf_name, shape), source(key, module, kind))
        )

    if "lm_head" in unused_deltas and tied:
        # A delta on a tied lm_head unties it: the output matrix is the embeddings plus the delta.
        delta = unused_deltas.pop("lm_head")
        embed = "model.embed_tokens.weight"

        def untied() -> np.ndarray:
            return (checkpoint.tensor(embed) + delta.float()).numpy()

        shape = checkpoint.shape(embed)
        if tuple(delta.shape) != shape:
            raise InvalidInput(f"delta for 'lm_head' has shape {tuple(delta.shape)}, the base weight {shape}")
        plans.append(_Plan("output.weight", shape, _storage_type(outtype, "output.weight", shape), untied))
    if unused_deltas:
        raise InvalidInput(
            f"deltas for modules the base has no weight for: {', '.join(sorted(unused_deltas))}"
        )
    if rope["type"] == "llama3":
        factors = _llama3_rope_factors(config, rope)
        plans.append(
            _Plan(
                "rope_freqs.weight",
                tuple(factors.shape),
                _storage_type("f32", "rope_freqs.weight", (1,)),
                lambda: factors,
            )
        )
    return plans


def _tensor_order(key: str) -> tuple[int, str]:
    match = _LAYER.match(key)
    return (int(match.group(1)) + 1, key) if match else (0 if "embed" in key else 1 << 30, key)


@contextlib.contextmanager
def _atomic_path(dest: Path) -> Iterator[Path]:
    """A temporary path next to ``dest``, renamed onto it when the block succeeds and removed otherwise
    (also on Ctrl-C): nothing half-written is ever at ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_gguf(writer: Any, path: Path, plans: list[_Plan], echo: Echo, label: str) -> None:
    """Stream the tensors into ``path``: one tensor in memory at a time, progress every tenth."""
    total = 0
    for plan in plans:
        shape, dtype = _byte_size(plan.shape, plan.qtype)
        nbytes = int(dtype.itemsize) * int(_prod(shape))
        writer.add_tensor_info(plan.name, shape, dtype, nbytes, raw_dtype=plan.qtype)
        total += nbytes
    echo(f"{label}: {len(plans)} tensors, {_human(total)}")
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    step = max(1, len(plans) // 10)
    written = 0
    try:
        for i, plan in enumerate(plans, 1):
            data = _encode(plan.source(), plan.qtype)
            writer.write_tensor_data(data)
            written += data.nbytes
            if i % step == 0 and i < len(plans):
                echo(f"  {i}/{len(plans)} tensors ({_human(written)} of {_human(total)})")
    finally:
        writer.close()


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for n in shape:
        out *= int(n)
    return out


def convert_base(
    base: BaseRecord,
    outtype: str,
    dest: Path,
    *,
    deltas: Mapping[str, torch.Tensor] | None = None,
    echo: Echo = print,
    cache_dir: Path | None = None,
    tokenizer: BaseRecord | None = None,
) -> Path:
    """Write ``base`` as a GGUF model to ``dest`` and return ``dest``.

    ``outtype`` is ``f32``, ``f16``, ``bf16`` or ``q8_0`` (matrices; norms and other 1-D tensors stay f32).
    The vocabulary, merges or scores, special tokens and the chat template are included (see
    :mod:`clara_plugin_gguf.vocab`); a byte-level BPE tokenizer gets the llama.cpp pre-tokenizer that tokenizes
    like it, found by trying candidates (the decision is cached in ``cache_dir`` when one is given).

    ``deltas`` maps HF modules (``model.layers.0.self_attn.q_proj``) to dense ``[out, in]`` weight deltas in
    Hugging Face row order; they are added to the weights before conversion (a merged export). The file is
    written under a temporary name in ``dest``'s folder and renamed at the end: on any failure or Ctrl-C nothing
    is left at ``dest``. Progress lines (tensor count, size) go to ``echo``.

    ``tokenizer``: the record whose tokenizer goes into the file (default ``base``'s own), for a model folder
    without tokenizer files of its own, such as a merged model whose tokenizer is its base's."""
    from .vocab import read_vocabulary

    GGUFWriter = require_gguf().GGUFWriter
    check_supported(base, tokenizer=tokenizer)
    if outtype not in OUTTYPES:
        raise InvalidInput(f"unknown GGUF output type '{outtype}' (choose from {', '.join(OUTTYPES)})")
    arch = gguf_architecture(base.config)
    dest = Path(dest)
    vocabulary = read_vocabulary(tokenizer or base, cache_dir=cache_dir, echo=echo)
    window = base.config.get("sliding_window")
    uses_window = base.config.get("model_type") == "mistral" or base.config.get("use_sliding_window")
    if window and uses_window and int(window) < int(base.config.get("max_position_embeddings", 0)):
        echo(
            f"note: the base attends over a sliding window of {window} tokens, llama.cpp over the whole "
            f"context; they agree on texts up to {window} tokens"
        )
    checkpoint = _Checkpoint(base.path)
    try:
        writer = GGUFWriter(None, arch)
        rope = _add_model_metadata(writer, base, outtype)
        vocabulary.add_to(writer)
        plans = _plan_tensors(base, checkpoint, outtype, deltas or {}, rope)
        with _atomic_path(dest) as tmp:
            label = f"converting base '{base.name}' to GGUF ({outtype}{', merged' if deltas else ''})"
            _write_gguf(writer, tmp, plans, echo, label)
    finally:
        checkpoint.close()
    echo(f"wrote {dest} ({_human(dest.stat().st_size)})")
    return dest


def require_gguf() -> Any:
    """The ``gguf`` module, or :class:`InvalidInput` with the install line where it cannot be imported."""
    try:
        import gguf
    except ImportError as exc:
        raise InvalidInput(
            f"GGUF conversion needs the gguf library, which cannot be imported here ({first_line(exc)}); "
            "pip install 'gguf>=0.10'"
        ) from exc
    return gguf


def cached_base_path(base: BaseRecord, outtype: str, cache_dir: Path) -> Path:
    """Where :func:`cached_base_gguf` keeps ``base`` converted to ``outtype``."""
    return Path(cache_dir) / "gguf" / f"base-{base.base_model_hash[:12]}-{outtype}.gguf"


def cached_base_gguf(base: BaseRecord, outtype: str, cache_dir: Path, *, echo: Echo = print) -> Path:
    """``base`` converted to ``outtype``, from ``cache_dir/gguf/base-<hash12>-<outtype>.gguf`` when present,
    converted (:func:`convert_base`) and stored there otherwise.

    Concurrent callers do not corrupt the cache: the conversion holds a lock file next to it, and a caller that
    waited for the lock finds the finished file; the file appears only complete (atomic rename)."""
    path = cached_base_path(base, outtype, cache_dir)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path.with_name(path.name + ".lock")):
        if path.is_file():
            return path
        return convert_base(base, outtype, path, echo=echo, cache_dir=cache_dir)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename alone keeps the cache whole
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
