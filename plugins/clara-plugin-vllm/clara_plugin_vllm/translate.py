"""From clara's requests and options to vLLM's arguments, and from vLLM's outputs back to clara's chunks.

Everything here is plain Python that runs (and is tested) without vLLM: the engine-argument keywords for
``AsyncEngineArgs``, the keywords for ``SamplingParams`` and ``LoRARequest``, the LoRA limits derived from the
registry, the checks that refuse adapters vLLM cannot serve, and the conversion of streamed
``RequestOutput`` objects into :class:`clara_core.types.GenerationChunk` deltas.

The vLLM names used here were read from vLLM's source (github.com/vllm-project/vllm, main branch, 2026):

- ``AsyncEngineArgs`` fields ``model``, ``tokenizer``, ``served_model_name``, ``enable_lora``, ``max_loras``,
  ``max_lora_rank``, ``max_cpu_loras``, ``fully_sharded_loras``, ``lora_dtype``, ``tensor_parallel_size``,
  ``pipeline_parallel_size``, ``data_parallel_size``, ``gpu_memory_utilization``, ``max_model_len``,
  ``dtype``, ``quantization``, ``max_num_seqs``, ``enforce_eager``, ``trust_remote_code``,
  ``distributed_executor_backend``: ``vllm/engine/arg_utils.py`` (``EngineArgs``, which ``AsyncEngineArgs``
  extends).
- The allowed ``max_lora_rank`` values: ``MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]`` and the
  default 16 in ``vllm/config/lora.py`` (``LoRAConfig``); ``max_cpu_loras`` "must be >= than max_loras" there.
- ``SamplingParams`` fields ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``, ``ignore_eos``,
  ``output_kind`` and ``RequestOutputKind.DELTA``: ``vllm/sampling_params.py``; prompts as ``TokensPrompt``
  (``{"prompt_token_ids": [...]}``), as ``AsyncLLM.generate`` accepts them: ``vllm/v1/engine/async_llm.py``.
- ``LoRARequest(lora_name, lora_int_id, lora_path)`` with ``lora_int_id`` > 0 ("must be globally unique for a
  given adapter"): ``vllm/lora/request.py``.
- ``RequestOutput.prompt_token_ids`` / ``.outputs`` / ``.finished`` and ``CompletionOutput.text`` /
  ``.token_ids`` / ``.finish_reason``: ``vllm/outputs.py``; the finish reasons
  ``FINISH_REASON_STRINGS = ("stop", "length", "abort", "error", "repetition")``: ``vllm/v1/engine/__init__.py``.
- The adapter features vLLM refuses (``use_dora``: "vLLM does not yet support DoRA.", ``modules_to_save``:
  "vLLM only supports modules_to_save being None.", adapter bias) and the rank check ("LoRA rank X is greater
  than max_lora_rank Y"): ``vllm/lora/peft_helper.py`` and ``vllm/lora/worker_manager.py``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from clara_core.plugin_api import (
    ClaraError,
    GenerationChunk,
    GenerationRequest,
    InvalidInput,
    Option,
    read_adapter_config,
)

from .errors import AdapterNotServable, InvalidEngineOption, VllmRequestFailed

# -- LoRA limits ---------------------------------------------------------------------------------------------

#: vllm/config/lora.py: ``MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]``.
VLLM_MAX_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: Derived values skip 1: older vLLM releases accept only 8 and up, and a rank-1 buffer saves nothing worth it.
_DERIVED_RANKS: tuple[int, ...] = tuple(r for r in VLLM_MAX_LORA_RANKS if r >= 8)
#: vllm/config/lora.py: ``max_lora_rank: MaxLoRARanks = 16``.
VLLM_DEFAULT_MAX_LORA_RANK = 16

#: Engine options clara passes to ``AsyncEngineArgs`` under the same name when the user sets them; ``None``
#: (the default) leaves vLLM's own default in place.
ENGINE_OPTIONS: tuple[Option, ...] = (
    Option("max_loras", int, None, "adapters vLLM can mix in one batch (default: serve's --max-loaded)"),
    Option(
        "max_lora_rank",
        int,
        None,
        "largest adapter rank vLLM reserves room for, one of 1, 8, 16, 32, 64, 128, 256, 320, 512 "
        "(default: the registry's largest rank for this base, rounded up)",
    ),
    Option("max_cpu_loras", int, None, "adapters vLLM caches in CPU memory (default: serve's --max-loaded)"),
    Option(
        "tensor_parallel_size", int, None, "GPUs to shard each layer across (vLLM --tensor-parallel-size)"
    ),
    Option("pipeline_parallel_size", int, None, "pipeline stages across GPUs or nodes"),
    Option("data_parallel_size", int, None, "replicas of the whole model"),
    Option("gpu_memory_utilization", float, None, "fraction of GPU memory vLLM may use (vLLM default 0.9)"),
    Option("max_model_len", int, None, "context length (default: the model's)"),
    Option(
        "dtype",
        str,
        None,
        "weights and activations dtype",
        choices=("auto", "half", "float16", "bfloat16", "float", "float32"),
    ),
    Option("quantization", str, None, "quantisation method of the base weights (awq, gptq, fp8, ...)"),
    Option("max_num_seqs", int, None, "most sequences vLLM schedules at once"),
    Option("enforce_eager", bool, False, "disable CUDA graphs (slower; less memory, faster start)"),
    Option("trust_remote_code", bool, False, "allow the base's own modelling code"),
    Option("fully_sharded_loras", bool, False, "shard LoRA computation fully across tensor-parallel GPUs"),
    Option("lora_dtype", str, None, "dtype of the LoRA weights (auto, float16, bfloat16)"),
    Option("distributed_executor_backend", str, None, "mp or ray (ray for more than one node)"),
    Option(
        "vllm_args",
        str,
        None,
        "any other AsyncEngineArgs fields: a JSON object, or KEY=VALUE pairs separated by ';' "
        "(VALUE read as JSON when it parses), e.g. enable_prefix_caching=true;kv_cache_dtype=fp8",
    ),
)

_LORA_LIMIT_OPTIONS = ("max_loras", "max_lora_rank", "max_cpu_loras")
#: Declared options passed straight through to AsyncEngineArgs (everything but the LoRA limits and vllm_arg).
PASS_THROUGH_OPTIONS: tuple[str, ...] = tuple(
    o.name for o in ENGINE_OPTIONS if o.name not in (*_LORA_LIMIT_OPTIONS, "vllm_args")
)
#: AsyncEngineArgs fields clara sets itself; ``vllm_args`` may not override them.
CLARA_MANAGED_ARGS = frozenset({"model", "tokenizer", "served_model_name", "enable_lora"})


@attrs.frozen
class LoraLimits:
    """vLLM's LoRA capacity for one engine: GPU slots per batch, the rank buffers, the CPU cache."""

    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int
    #: Where ``max_lora_rank`` came from, for ``/health`` and error messages.
    rank_source: str


def _positive_int(options: Mapping[str, Any], name: str) -> int | None:
    value = options.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidEngineOption(f"engine option {name} must be a positive whole number, got {value!r}")
    return value


def round_up_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds ``rank`` (at most 512)."""
    for allowed in _DERIVED_RANKS:
        if rank <= allowed:
            return allowed
    return _DERIVED_RANKS[-1]


def derive_lora_limits(
    options: Mapping[str, Any], max_loaded: int, max_adapter_rank: int | None = None
) -> LoraLimits:
    """The LoRA limits for ``AsyncEngineArgs``: the user's options where given, else derived.

    ``max_loras`` (adapters in one batch) and ``max_cpu_loras`` (vLLM's CPU cache) default to clara's
    ``clara serve --max-loaded``, so every adapter the server keeps loaded can share one batch.
    ``max_lora_rank`` defaults to ``max_adapter_rank`` (what ``clara serve`` hands over in
    ``EngineOptions``: the largest rank among the registry's adapters for this base), rounded up to a value
    vLLM accepts; with no adapters it stays at vLLM's default of 16.
    """
    max_loaded = max(1, int(max_loaded))
    max_loras = _positive_int(options, "max_loras") or max_loaded
    explicit_rank = _positive_int(options, "max_lora_rank")
    if explicit_rank is not None:
        if explicit_rank not in VLLM_MAX_LORA_RANKS:
            allowed = ", ".join(str(r) for r in VLLM_MAX_LORA_RANKS)
            raise InvalidEngineOption(
                f"max_lora_rank {explicit_rank} is not a value vLLM accepts; use one of {allowed} "
                f"(the next one up is {round_up_rank(explicit_rank)}: -o max_lora_rank={round_up_rank(explicit_rank)})"
            )
        max_lora_rank, source = explicit_rank, "-o max_lora_rank"
    elif max_adapter_rank:
        max_lora_rank = round_up_rank(int(max_adapter_rank))
        source = f"registry (largest registered rank {max_adapter_rank})"
    else:
        max_lora_rank, source = (
            VLLM_DEFAULT_MAX_LORA_RANK,
            "vLLM default (no adapters registered for the base)",
        )
    max_cpu_loras = _positive_int(options, "max_cpu_loras")
    if max_cpu_loras is None:
        max_cpu_loras = max(max_loaded, max_loras)
    elif max_cpu_loras < max_loras:
        raise InvalidEngineOption(
            f"max_cpu_loras {max_cpu_loras} is below max_loras {max_loras}; vLLM needs max_cpu_loras >= "
            "max_loras: raise -o max_cpu_loras or lower -o max_loras"
        )
    return LoraLimits(max_loras, max_lora_rank, max_cpu_loras, source)


# -- engine arguments ----------------------------------------------------------------------------------------


def _json_or_text(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def parse_vllm_args(values: Any) -> dict[str, Any]:
    """The ``vllm_args`` engine option as AsyncEngineArgs keywords.

    Accepts a JSON object (``{"enable_prefix_caching": true}``), ``KEY=VALUE`` pairs separated by ``;``
    (VALUE read as JSON where it parses, else as text), a list of such pairs, or a mapping.
    """
    if values is None or values == "":
        return {}
    pairs: list[tuple[str, Any]] = []
    if isinstance(values, Mapping):
        pairs = list(values.items())
    elif isinstance(values, str) and values.strip().startswith("{"):
        try:
            loaded = json.loads(values)
        except ValueError as exc:
            raise InvalidEngineOption(f"vllm_args is not a valid JSON object: {exc}") from exc
        if not isinstance(loaded, dict):
            raise InvalidEngineOption("vllm_args must be a JSON object of AsyncEngineArgs fields")
        pairs = list(loaded.items())
    else:
        entries = values.split(";") if isinstance(values, str) else list(values)
        for entry in entries:
            if not str(entry).strip():
                continue
            key, sep, raw = str(entry).partition("=")
            if not sep or not key.strip():
                raise InvalidEngineOption(
                    f"vllm_args entry {str(entry).strip()!r}: write KEY=VALUE, like enable_prefix_caching=true"
                )
            pairs.append((key, _json_or_text(raw.strip())))
    parsed: dict[str, Any] = {}
    declared = {o.name for o in ENGINE_OPTIONS}
    for raw_key, value in pairs:
        key = str(raw_key).strip().lstrip("-").replace("-", "_")
        if key in CLARA_MANAGED_ARGS:
            raise InvalidEngineOption(
                f"vllm_args {key}: clara sets {key} itself from the served base; drop it"
            )
        if key in declared:
            raise InvalidEngineOption(f"vllm_args {key}: use the engine option -o {key}=...")
        parsed[key] = value
    return parsed


def engine_args_kwargs(
    model_path: Path, served_model_name: str, limits: LoraLimits, options: Mapping[str, Any]
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.engine.arg_utils.AsyncEngineArgs`` (vllm/engine/arg_utils.py)."""
    kwargs: dict[str, Any] = {
        "model": str(model_path),
        "tokenizer": str(model_path),
        "served_model_name": served_model_name,
        "enable_lora": True,
        "max_loras": limits.max_loras,
        "max_lora_rank": limits.max_lora_rank,
        "max_cpu_loras": limits.max_cpu_loras,
    }
    for name in PASS_THROUGH_OPTIONS:
        value = options.get(name)
        if value is None or value is False:  # unset: keep vLLM's own default
            continue
        kwargs[name] = value
    for key in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "max_num_seqs"):
        if key in kwargs:
            _positive_int(kwargs, key)
    utilisation = kwargs.get("gpu_memory_utilization")
    if utilisation is not None and not (0 < float(utilisation) <= 1):
        raise InvalidEngineOption(
            f"engine option gpu_memory_utilization must be in (0, 1], got {utilisation}"
        )
    kwargs.update(parse_vllm_args(options.get("vllm_args")))
    return kwargs


def check_engine_arg_names(kwargs: Mapping[str, Any], known: Iterable[str]) -> None:
    """Refuse keywords that the installed vLLM's AsyncEngineArgs does not have (a misspelt vllm_args key)."""
    known_set = set(known)
    unknown = sorted(k for k in kwargs if k not in known_set)
    if unknown:
        raise InvalidEngineOption(
            f"the installed vLLM has no engine argument {', '.join(unknown)}; see 'vllm serve --help' for "
            "the names (written with '_' in -o vllm_args=KEY=VALUE)"
        )


# -- adapters ------------------------------------------------------------------------------------------------


def adapter_peft_config(adapter: Any) -> dict[str, Any]:
    """The adapter's PEFT config as vLLM will read it: its ``adapter_config.json``, else the registry's copy."""
    try:
        return read_adapter_config(Path(adapter.path))
    except ClaraError:
        return dict(adapter.peft_config or {})


def effective_rank(config: Mapping[str, Any], fallback: int = 0) -> int:
    """The largest LoRA rank in the adapter: ``r`` and any per-module ``rank_pattern`` override."""
    ranks = [int(config.get("r") or fallback or 0)]
    pattern = config.get("rank_pattern") or {}
    if isinstance(pattern, Mapping):
        ranks.extend(int(v) for v in pattern.values() if isinstance(v, int | float))
    return max(ranks)


def vllm_feature_problems(adapter_id: str, config: Mapping[str, Any], method: str = "") -> list[str]:
    """Why vLLM cannot serve this adapter at all (whatever the engine's limits), each with what to do."""
    problems: list[str] = []
    peft_type = str(config.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        problems.append(
            f"adapter '{adapter_id}' is a {peft_type} adapter; vLLM serves LoRA adapters only: "
            "serve it with --engine transformers"
        )
        return problems
    if config.get("use_dora") or method.lower() == "dora":
        problems.append(
            f"adapter '{adapter_id}' is a DoRA adapter and vLLM has no DoRA support: serve it with "
            "--engine transformers, or merge it into the base and serve the merged model"
        )
    modules_to_save = config.get("modules_to_save")
    if modules_to_save:
        names = ", ".join(map(str, modules_to_save)) if isinstance(modules_to_save, list) else modules_to_save
        problems.append(
            f"adapter '{adapter_id}' carries full copies of modules ({names}, PEFT modules_to_save) that vLLM "
            "cannot load: serve it with --engine transformers, or retrain it without modules_to_save"
        )
    if config.get("trainable_token_indices"):
        problems.append(
            f"adapter '{adapter_id}' trains token embeddings (PEFT trainable_token_indices), which vLLM does not "
            "load: serve it with --engine transformers, or merge it into the base"
        )
    bias = str(config.get("bias") or "none")
    if bias != "none":
        problems.append(
            f"adapter '{adapter_id}' trains bias terms (bias={bias!r}), which vLLM does not load: serve it "
            "with --engine transformers, or retrain it with bias='none'"
        )
    return problems


def check_adapter_servable(adapter: Any, max_lora_rank: int, config: Mapping[str, Any] | None = None) -> int:
    """Raise :class:`AdapterNotServable` unless vLLM can serve ``adapter`` under ``max_lora_rank``.

    Runs when the adapter is loaded, so a DoRA adapter or one of too high a rank fails at ``/load_adapter``
    (or the hot-swap load), never at a later request. Returns the adapter's effective rank.
    """
    config = adapter_peft_config(adapter) if config is None else config
    problems = vllm_feature_problems(adapter.id, config, adapter.method or "")
    if problems:
        raise AdapterNotServable("; ".join(problems))
    rank = effective_rank(config, adapter.rank)
    if rank > max_lora_rank:
        hint = (
            f"restart the server with -o max_lora_rank={round_up_rank(rank)}"
            if rank <= VLLM_MAX_LORA_RANKS[-1]
            else f"vLLM's largest is {VLLM_MAX_LORA_RANKS[-1]}; serve it with --engine transformers"
        )
        raise AdapterNotServable(
            f"adapter '{adapter.id}' has rank {rank} but this vLLM engine was started with max_lora_rank "
            f"{max_lora_rank}: {hint}"
        )
    return rank


class LoraIdAllocator:
    """Stable, unique ``lora_int_id`` values: vLLM caches adapters by this integer.

    The same adapter id keeps its integer for the engine's life (unload and reload included). An adapter id
    that comes back with different files (removed and registered again) gets a fresh integer, so that vLLM
    never serves cached weights or KV blocks of the old adapter under the new name.
    """

    def __init__(self) -> None:
        self._ids: dict[tuple[str, str | None], int] = {}
        self._next = 1  # vllm/lora/request.py: lora_int_id must be > 0

    def id_for(self, adapter_id: str, checksum: str | None = None) -> int:
        key = (adapter_id, checksum)
        if key not in self._ids:
            self._ids[key] = self._next
            self._next += 1
        return self._ids[key]

    def __len__(self) -> int:
        return len(self._ids)


def snapshot_stem(adapter_id: str, checksum: str) -> str:
    """The start of a snapshot folder's name: the adapter id (file-name safe) and the checksum's first digits."""
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', adapter_id)[:80]}-{checksum[:12]}"


def write_snapshot(root: Path, name: str, files: Any) -> Path:
    """``root/name`` holding exactly ``files`` (verified ``AdapterFiles``): the weights' bytes and the config as
    read, what vLLM loads a LoRA adapter from (``adapter_model.safetensors`` and ``adapter_config.json``,
    vllm/lora/lora_model.py ``LoRAModel.from_local_checkpoint`` and ``PEFTHelper.from_local_dir``). Written
    under a temporary name, then renamed: never half there; a folder of that name already there is kept."""
    root.mkdir(parents=True, exist_ok=True)
    folder = root / name
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        (staging / "adapter_model.safetensors").write_bytes(files.weights)
        (staging / "adapter_config.json").write_text(json.dumps(files.config, indent=2), encoding="utf-8")
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "adapter_model.safetensors").is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)  # written by another process meanwhile: the same bytes
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def lora_request_kwargs(adapter: Any, lora_int_id: int, folder: Path | None = None) -> dict[str, Any]:
    """Keyword arguments for ``vllm.lora.request.LoRARequest``: the clara id as the name, the folder to load
    from (``folder``, the engine's snapshot of the verified bytes; else the adapter's own folder)."""
    if lora_int_id < 1:
        raise ValueError(f"lora_int_id must be at least 1, got {lora_int_id}")
    path = Path(folder if folder is not None else adapter.path)
    return {"lora_name": adapter.id, "lora_int_id": lora_int_id, "lora_path": str(path)}


# -- requests and outputs ------------------------------------------------------------------------------------


def sampling_params_kwargs(request: GenerationRequest) -> dict[str, Any]:
    """Keyword arguments for ``vllm.SamplingParams`` (vllm/sampling_params.py), without ``output_kind``.

    The engine adds ``output_kind=RequestOutputKind.DELTA`` so that each streamed ``RequestOutput`` holds only
    the new text. A temperature of 0 is vLLM's greedy decoding.
    """
    if (
        isinstance(request.max_tokens, bool)
        or not isinstance(request.max_tokens, int)
        or request.max_tokens < 1
    ):
        raise InvalidInput(f"max_tokens must be a whole number of at least 1, got {request.max_tokens!r}")
    temperature = float(request.temperature)
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidInput(f"temperature must be 0 or more, got {request.temperature!r}")
    top_p = float(request.top_p)
    if not (0 < top_p <= 1):
        raise InvalidInput(f"top_p must be in (0, 1], got {request.top_p!r}")
    kwargs: dict[str, Any] = {
        "max_tokens": request.max_tokens,
        "temperature": temperature,
        "top_p": top_p,
    }
    stop = [s for s in (request.stop or []) if s]
    if stop:
        kwargs["stop"] = stop
    if request.seed is not None:
        kwargs["seed"] = int(request.seed)
    if request.ignore_eos:
        kwargs["ignore_eos"] = True
    return kwargs


def prompt_input(prompt_token_ids: Sequence[int]) -> dict[str, Any]:
    """The prompt as vLLM's ``TokensPrompt`` (a TypedDict with ``prompt_token_ids``, vllm/inputs).

    clara tokenises with the base's tokenizer itself, so that ``add_special_tokens=False`` for chat prompts
    (whose template already holds the special tokens) means the same on every engine and vLLM version.
    """
    ids = [int(i) for i in prompt_token_ids]
    if not ids:
        raise InvalidInput("the prompt is empty; send some text to complete")
    return {"prompt_token_ids": ids}


#: vLLM's finish reasons (vllm/v1/engine/__init__.py) as clara's ("stop", "length", "abort").
FINISH_REASONS: dict[str, str] = {
    "stop": "stop",
    "length": "length",
    "abort": "abort",
    # vLLM ended the answer early because it kept repeating itself: a stop, not a length cut.
    "repetition": "stop",
}


def finish_reason(vllm_reason: str | None) -> str | None:
    """clara's finish reason for vLLM's; an ``error`` finish becomes :class:`VllmRequestFailed`."""
    if vllm_reason is None:
        return None
    reason = str(vllm_reason)
    if reason in FINISH_REASONS:
        return FINISH_REASONS[reason]
    if reason == "error":
        raise VllmRequestFailed("vLLM ended the request with an internal error; retry it")
    return "stop"


class ChunkTranslator:
    """Turns one request's stream of vLLM ``RequestOutput`` objects into :class:`GenerationChunk` deltas.

    With ``cumulative=False`` (vLLM's ``RequestOutputKind.DELTA``, what the engine asks for) each output holds
    only the new text and token ids; with ``cumulative=True`` each holds everything so far and the delta is
    cut off here. ``prompt_tokens`` and ``completion_tokens`` on each chunk are the totals so far, so the last
    chunk carries the request's usage.
    """

    def __init__(self, *, cumulative: bool = False) -> None:
        self.cumulative = cumulative
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._text_so_far = ""
        self.finished = False

    def feed(self, output: Any) -> GenerationChunk | None:
        """The chunk for one ``RequestOutput``, or ``None`` when it adds nothing (no text, not finished)."""
        prompt_ids = getattr(output, "prompt_token_ids", None)
        if prompt_ids:
            self.prompt_tokens = max(self.prompt_tokens, len(prompt_ids))
        completions: Sequence[Any] = getattr(output, "outputs", None) or []
        completion = completions[0] if completions else None
        text = ""
        reason: str | None = None
        if completion is not None:
            token_ids = list(getattr(completion, "token_ids", None) or [])
            if self.cumulative:
                full = completion.text or ""
                text = full[len(self._text_so_far) :] if full.startswith(self._text_so_far) else full
                self._text_so_far = full
                self.completion_tokens = len(token_ids)
            else:
                text = completion.text or ""
                self.completion_tokens += len(token_ids)
            reason = finish_reason(getattr(completion, "finish_reason", None))
        if reason is None and getattr(output, "finished", False):
            reason = "stop"
        if reason is not None:
            self.finished = True
        if not text and reason is None:
            return None
        return GenerationChunk(
            text=text,
            finish_reason=reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
        )
