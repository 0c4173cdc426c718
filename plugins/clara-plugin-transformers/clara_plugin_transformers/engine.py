"""The transformers engine: one base loaded once, many PEFT adapters, continuous mixed-adapter batching.

A single worker thread owns the model. Requests arrive through an inbox and join the running batch at the
next decoding step (continuous batching): they are prefilled together, and their KV caches are merged into
the running batch's cache (left-padded to one length, masked). One forward pass serves rows on different LoRA
adapters, so adapters share the base's computation: rows are kept sorted by adapter and a forward hook on each
LoRA layer adds every adapter's delta to its contiguous slice of rows. That is the computation of PEFT's
``adapter_names`` mixed batches, without PEFT setting up and removing its per-call hooks at every decoding step.

Plain LoRA adapters on linear layers (the common case) do not go through PEFT at all: their factors are read
from the verified bytes (off the worker) and kept by module, and the same slice-wise hook on the base's linear
layers applies them (trained biases too, as their difference from the base's). The worker only hooks them in
(0.2-0.8 ms for a rank-8 adapter on the benchmarks' small bases), where PEFT injecting modules into the model
takes 18-78 ms, most of it walking the model's modules; with more adapters than slots (``--max-loaded``) a load
happens for every few requests, between decoding steps, and every running row waits for it. Everything else
(DoRA, trained copies of modules, embedding LoRA, trainable tokens, ...) is loaded by PEFT.
DoRA adapters, which PEFT cannot mix in a batch, each get their own group, decoded in turn with the mixed group. Adapter loads and
unloads run on the same worker between steps, so the model never changes under a running forward pass.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from clara_core.plugin_api import (
    AdapterFiles,
    ClaraError,
    Conflict,
    EngineCapabilities,
    EngineImpl,
    EngineOptions,
    GenerationChunk,
    GenerationRequest,
    InvalidInput,
    check_prompt_fits,
    lora_factors,
    read_verified_adapter,
)

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


class AdapterNotServable(Conflict):
    """The adapter is registered and intact, but this engine cannot apply it to some rows only (409)."""

    code = "adapter_not_servable"


#: (A, B, scaling) of a module's LoRA (``None``s where the adapter only trained the module's bias) and the
#: difference of its trained bias from the base's (``None`` where it trained none)
_Module = tuple[Any, Any, float, Any]
#: adapter_config.json settings that do not change what a loaded plain LoRA computes (``x @ A.T @ B.T * scaling``
#: with PEFT's per-module scaling): bookkeeping, targeting, initialisation and training-only ones. An adapter with
#: any other setting (DoRA, lora_bias, modules_to_save, variants, whatever a newer PEFT adds) is loaded by PEFT.
_DIRECT_SETTINGS = frozenset(
    {
        "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
        "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "bias",
        "use_rslora", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
        "alpha_pattern", "runtime_config", "eva_config", "corda_config", "lora_ga_config", "megatron_core",
        "qalora_group_size", "ensure_weight_tying",
    }
)  # fmt: skip


def peft_name(adapter_id: str) -> str:
    """The PEFT adapter name for a clara id. PEFT names become module names, which may not hold '.', while ids
    of multi-domain adapters and composites do (``steuer.verfahren-lora-r8-v1``); this encoding is one-to-one
    and never gives ``__base__`` (ids start with a letter or digit)."""
    return adapter_id.replace("_", "_u").replace(".", "_d")


class _Sequence:
    """One request inside the engine: its tokens, decoding state and the way back to its event loop."""

    def __init__(self, request: GenerationRequest, prompt_ids: list[int], loop: Any, queue: Any) -> None:
        self.request = request
        self.prompt_ids = prompt_ids
        self.loop = loop
        self.queue = queue
        self.generated: list[int] = []
        self.emitted = 0  # characters of the decoded text already sent
        self.cancelled = False
        self.finished = False
        self.generator: Any = None
        self.adapter_name = peft_name(request.adapter_id) if request.adapter_id else BASE

    def send(self, item: GenerationChunk | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the request's event loop is gone: nobody is listening any more
            self.cancelled = True


class _Group:
    """Rows decoded together in one forward pass, with their shared (left-padded) KV cache."""

    def __init__(self, key: str, rows: list[_Sequence], cache: Any, mask: Any, positions: Any) -> None:
        self.key = key  # "mixed", or the id of a DoRA adapter
        self.rows = rows
        self.cache = cache
        self.mask = mask  # [B, T] 1 for real tokens in the cache
        self.positions = positions  # [B] position id of each row's next token


class TransformersEngine(EngineImpl):
    capabilities = EngineCapabilities(
        mixed_adapter_batching=True,
        notes="continuous batching; LoRA rows share forward passes, each DoRA adapter decodes in its own group",
    )

    def __init__(self, base: Any, options: EngineOptions) -> None:
        self.base = base
        self.options = options
        extra = options.extra
        self.device_name = str(extra.get("device") or "auto")
        self.dtype_name = str(extra.get("dtype") or "auto")
        self.max_batch_size = int(extra.get("max_batch_size") or 32)
        self.threads = int(extra.get("threads") or 0)
        if self.max_batch_size < 1:
            raise InvalidInput(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        self.base_loads = 0
        self.adapter_loads = 0
        self.tokenizer: Any = None
        self.model: Any = None
        self.peft: Any = None
        self.device: Any = None
        self.dtype: Any = None
        #: loaded adapters; True where the adapter needs its own group (DoRA and other non-plain LoRA)
        self._dora: dict[str, bool] = {}
        self._ids: dict[str, str] = {}  # PEFT adapter name -> clara id
        self._hooked: dict[int, Any] = {}
        #: plain LoRA adapters applied without PEFT: id(base linear) -> PEFT name -> its factors and bias delta
        self._direct: dict[int, dict[str, _Module]] = {}
        self._direct_hooks: dict[int, Any] = {}  # id(base linear) -> its forward hook
        self._direct_modules: dict[str, list[int]] = {}  # PEFT name -> the linears it touches
        self._plan: list[tuple[str, int, int]] | None = None
        self._fast: bool | None = None
        self._active: str | None = None
        self._eos: set[int] = set()
        self._inbox: deque[_Sequence] = deque()
        self._commands: deque[tuple[Callable[[], Any], Future]] = deque()
        self._groups: list[_Group] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.peak_batch = 0  # most rows decoded in one step so far
        self._cache_arg = "past_key_values"
        self._embed_extra: dict[str, Any] = {}

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.model is not None:
            return
        await asyncio.to_thread(self._load_base)
        self._thread = threading.Thread(target=self._run, name="clara-transformers-engine", daemon=True)
        self._thread.start()

    def _load_base(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.device_name == "auto":
            if torch.cuda.is_available():
                device = "cuda"
            elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
                device = "mps"
            else:
                device = "cpu"
        else:
            device = self.device_name
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise InvalidInput(
                f"unknown device {device!r} ({exc}); use cpu, cuda, cuda:N, mps or auto"
            ) from exc
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if self.dtype_name == "auto":
            self.dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        elif self.dtype_name in dtypes:
            self.dtype = dtypes[self.dtype_name]
        else:
            raise InvalidInput(f"unknown dtype {self.dtype_name!r}; use float32, bfloat16, float16 or auto")
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        path = Path(self.base.path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self.base_loads += 1
        # transformers 5.x renamed the forward argument past_key_values to cache
        forward_params = inspect.signature(type(self.model).forward).parameters
        self._cache_arg = "cache" if "cache" in forward_params else "past_key_values"
        # embed() wants hidden states, not logits at every position
        self._embed_extra = {"logits_to_keep": 1} if "logits_to_keep" in forward_params else {}
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        max_len = getattr(self.model.config, "max_position_embeddings", None)
        self.capabilities = EngineCapabilities(
            mixed_adapter_batching=True,
            max_model_len=int(max_len) if max_len else None,
            notes=type(self).capabilities.notes,
        )

    async def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self.model = self.peft = None

    # -- embeddings (for routers) ---------------------------------------------------------------------------

    #: texts are cut to this many tokens before embedding (as clara_core.routing.embed does in the CLI)
    EMBED_MAX_TOKENS = 128

    async def embed(self, texts: Sequence[str], *, layer: int | None = None) -> list[list[float]]:
        """Mean-pooled hidden states at ``layer`` of the loaded base (no adapter; see
        :meth:`clara_core.types.EngineImpl.embed`), computed on the worker thread between decoding steps:
        routers use the served model, never a second copy. Before the last layer the pass stops at ``layer``
        (``clara_core.routing.embed.hidden_at``, as the CLI embeds)."""
        from clara_core.plugin_api import layer_count, resolve_layer

        if self.model is None:
            raise ClaraError("the engine is not started")
        resolve_layer(layer, layer_count(self.model))  # a layer the base lacks: one line, before any work
        ids = await asyncio.to_thread(
            lambda: [self._encode(t)[: self.EMBED_MAX_TOKENS] or [0] for t in texts]
        )
        result: list[list[float]] = await self._call(lambda: self._embed(ids, layer))
        return result

    def _embed(self, ids: list[list[int]], layer: int | None, batch_size: int = 16) -> list[list[float]]:
        import torch

        from clara_core.plugin_api import hidden_at

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out: list[list[float]] = []
        for start in range(0, len(ids), batch_size):
            rows = ids[start : start + batch_size]
            width = max(len(r) for r in rows)
            input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)

            def forward(
                input_ids: Any = input_ids, mask: Any = mask, n: int = len(rows), **extra: Any
            ) -> Any:
                return self._forward(
                    "mixed",
                    [BASE] * n,
                    input_ids=input_ids,
                    attention_mask=mask,
                    use_cache=False,
                    **self._embed_extra,
                    **extra,
                )

            hidden = hidden_at(self.model, layer, forward)
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
            out.extend(pooled.float().cpu().tolist())
        return out

    # -- adapters ----------------------------------------------------------------------------------------------

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker thread between decoding steps."""
        if self._thread is None:
            raise ClaraError("the engine is not started")
        future: Future = Future()
        with self._cond:
            self._commands.append((fn, future))
            self._cond.notify_all()
        return await asyncio.wrap_future(future)

    async def load_adapter(self, adapter: Any) -> None:
        # read once, hash those bytes, load those bytes: a file swapped after the check is never served
        files = await asyncio.to_thread(read_verified_adapter, adapter)
        # parsing and copying the factors happens here too: the worker only hooks them in between two steps
        factors = await asyncio.to_thread(self._direct_factors, adapter.id, files)
        await self._call(lambda: self._load_adapter(adapter.id, files, factors))

    def _load_adapter(self, adapter_id: str, files: AdapterFiles, factors: Any = ...) -> None:
        """On the worker: load ``files`` as ``adapter_id``; ``factors`` from :meth:`_direct_factors` where the
        caller prepared them (``...``: prepare them here)."""
        from peft import PeftConfig, set_peft_model_state_dict
        from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
        from peft.peft_model import PeftModel
        from safetensors.torch import load as load_safetensors

        name = peft_name(adapter_id)
        if name in self._dora:
            return
        config = files.config
        if config.get("peft_type", "LORA") != "LORA":
            raise InvalidInput(
                f"adapter '{adapter_id}' is a {config.get('peft_type')} adapter; the transformers engine serves "
                "LoRA and DoRA adapters"
            )
        if factors is ...:
            factors = self._direct_factors(adapter_id, files)
        if factors is not None and self._load_direct(adapter_id, name, factors):
            return
        if str(config.get("bias") or "none") != "none":
            # PEFT would write the trained biases into the base's layers: every row would get them, for good
            raise _bias_not_servable(adapter_id, config)
        try:
            weights = load_safetensors(files.weights)
            peft_config = PeftConfig.from_peft_type(
                **{k: v for k, v in config.items() if k != "runtime_config"}
            )
        except (
            Exception
        ) as exc:  # a corrupt file or a config PEFT rejects: this adapter fails, not the server
            raise ClaraError(f"adapter '{adapter_id}' cannot be loaded: {type(exc).__name__}: {exc}") from exc
        peft_config.inference_mode = True
        # what PeftModel.from_pretrained / load_adapter do, from the verified bytes instead of the folder
        if self.peft is None:
            cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(peft_config.task_type or "", PeftModel)
            self.peft = cls(self.model, peft_config, adapter_name=name)
        else:
            self.peft.add_adapter(name, peft_config)
        try:
            set_peft_model_state_dict(self.peft, weights, adapter_name=name)
        except Exception as exc:  # shapes that do not fit this base
            self.peft.delete_adapter(name)
            raise ClaraError(
                f"adapter '{adapter_id}' does not fit the base: {type(exc).__name__}: {exc}"
            ) from exc
        self.peft.to(self.device)
        self.peft.eval()
        self._active = None  # loading may change PEFT's active adapter
        self._dora[name] = bool(config.get("use_dora")) or not self._plain_lora(name, config)
        self._ids[name] = adapter_id
        self._hook_lora_layers()
        self._fast = None  # new layers start enabled
        self.adapter_loads += 1

    def _direct_factors(self, adapter_id: str, files: AdapterFiles) -> tuple[dict, dict] | None:
        """A plain LoRA adapter's tensors on the engine's device, for :meth:`_load_direct`: ``(A, B, scaling)``
        by module and the trained bias vectors by module (PEFT ``bias="all"``/``"lora_only"``); ``None`` where
        the adapter needs PEFT: DoRA, settings that change PEFT's computation, tensors that are not LoRA factors.
        Touches no module of the model (runs off the worker)."""
        import torch

        config = files.config
        if config.get("peft_type", "LORA") != "LORA" or config.get("init_lora_weights") == "loftq":
            return None  # the PEFT path names what it serves
        trains_bias = str(config.get("bias") or "none") != "none"
        if any(value for key, value in config.items() if key not in _DIRECT_SETTINGS):
            if trains_bias:
                raise _bias_not_servable(adapter_id, config)
            return None
        try:
            factors = lora_factors(adapter_id, config, files.weights, biases=trains_bias)
        except InvalidInput:
            if trains_bias:
                raise _bias_not_servable(adapter_id, config) from None
            return None  # embedding LoRA, modules_to_save, ...: PEFT knows them
        except Exception as exc:  # a corrupt file: this adapter fails, not the server
            raise ClaraError(f"adapter '{adapter_id}' cannot be loaded: {type(exc).__name__}: {exc}") from exc
        if factors.magnitude:
            if trains_bias:
                raise _bias_not_servable(adapter_id, config)
            return None
        # PEFT keeps adapter weights in float32 over a half-precision base (autocast_adapter_dtype)
        dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        lora = {
            module: (
                lora_a.to(device=self.device, dtype=dtype),
                factors.lora_B[module].to(device=self.device, dtype=dtype),
                float(factors.scaling[module]),
            )
            for module, lora_a in factors.lora_A.items()
        }
        biases = {module: bias.to(device=self.device, dtype=dtype) for module, bias in factors.bias.items()}
        return lora, biases

    def _load_direct(self, adapter_id: str, name: str, factors: tuple[dict, dict]) -> bool:
        """On the worker: hook ``factors`` (from :meth:`_direct_factors`) into the base's linear layers, applied
        by :meth:`_direct_hook` to the adapter's rows only (trained biases as their difference from the base's:
        the base's own bias is never changed). False (nothing loaded) where a LoRA module is not a linear layer
        (PEFT's business); factors that do not fit the base are one line."""
        import torch

        lora, biases = factors

        def linear(module: str) -> Any:
            try:
                target = self.model.get_submodule(module)
            except AttributeError:
                raise ClaraError(
                    f"adapter '{adapter_id}' does not fit the base: it adapts '{module}', which the base lacks"
                ) from None
            while hasattr(target, "base_layer"):  # already wrapped by PEFT for another adapter
                target = target.base_layer
            return target if isinstance(target, torch.nn.Linear) else None

        loaded: dict[int, tuple[Any, _Module]] = {}
        for module, (a, b, scaling) in lora.items():
            target = linear(module)
            if target is None:
                if biases:  # PEFT would write the biases into the base (see _load_adapter)
                    raise AdapterNotServable(
                        f"adapter '{adapter_id}' trains bias terms beside a LoRA of '{module}', which is not a "
                        "linear layer; the transformers engine applies trained biases to the adapter's own rows "
                        "only for LoRA of linear layers: retrain it with bias='none', or merge it into the base"
                    )
                return False  # a LoRA of another layer type: PEFT's business
            rank = a.shape[0]
            if tuple(a.shape) != (rank, target.in_features) or tuple(b.shape) != (target.out_features, rank):
                raise ClaraError(
                    f"adapter '{adapter_id}' does not fit the base: '{module}' is {target.out_features}x"
                    f"{target.in_features}, the adapter's factors are {tuple(b.shape)} and {tuple(a.shape)}"
                )
            loaded[id(target)] = (target, (a, b, scaling, None))
        for module, trained in biases.items():
            target = linear(module)
            if target is None or target.bias is None or tuple(target.bias.shape) != tuple(trained.shape):
                raise AdapterNotServable(
                    f"adapter '{adapter_id}' trains a bias of '{module}', which is not a linear layer with a bias "
                    "of that size in this base; the transformers engine applies trained biases of linear layers "
                    "only: retrain it with bias='none', or merge it into the base"
                )
            delta = trained - target.bias.detach().to(trained.dtype)
            if not bool(delta.any()):
                continue  # the bias was saved but not changed
            a, b, scaling, _ = loaded.get(id(target), (target, (None, None, 0.0, None)))[1]
            loaded[id(target)] = (target, (a, b, scaling, delta))
        for key, (target, weights) in loaded.items():
            self._direct.setdefault(key, {})[name] = weights
            if key not in self._direct_hooks:
                self._direct_hooks[key] = target.register_forward_hook(self._direct_hook)
        self._direct_modules[name] = list(loaded)
        self._dora[name] = False
        self._ids[name] = adapter_id
        self.adapter_loads += 1
        return True

    def _direct_hook(self, module: Any, args: Any, output: Any) -> Any:
        """The fast path for adapters loaded without PEFT: the same slice-wise delta as :meth:`_lora_hook`,
        ``(x[s:e] @ A.T) @ B.T * scaling``, with the factors kept by module."""
        plan = self._plan
        table = self._direct.get(id(module))
        if plan is None or not table:
            return None
        import torch.nn.functional as F

        x = args[0]
        for name, start, end in plan:
            weights = table.get(name)
            if weights is None:  # this adapter does not touch this layer
                continue
            a, b, scaling, bias = weights
            if a is not None:
                delta = F.linear(F.linear(x[start:end].to(a.dtype), a), b) * scaling
                output[start:end] += delta.to(output.dtype)
            if bias is not None:
                output[start:end] += bias.to(output.dtype)
        return output

    def _lora_layers(self) -> list[Any]:
        from peft.tuners.lora import LoraLayer

        return [m for m in self.peft.modules() if isinstance(m, LoraLayer)]

    def _plain_lora(self, adapter_id: str, config: Mapping[str, Any]) -> bool:
        """True where the adapter is plain LoRA on linear layers, which the fast path computes exactly as
        PEFT does; anything else (DoRA and other variants, embedding or conv LoRA, modules_to_save) decodes in
        its own group through PEFT itself."""
        from peft.tuners.lora.layer import Linear

        # modules_to_save, trainable tokens, variants: PEFT computes them, in their own group
        if any(value for key, value in config.items() if key not in _DIRECT_SETTINGS | {"fan_in_fan_out"}):
            return False
        for layer in self._lora_layers():
            if adapter_id in getattr(layer, "lora_embedding_A", {}) or adapter_id in getattr(
                layer, "lora_variant", {}
            ):
                return False
            if adapter_id in layer.lora_A and type(layer) is not Linear:
                return False
        return True

    def _hook_lora_layers(self) -> None:
        """Add the slice-wise LoRA hook once to every LoRA linear layer (new layers appear as adapters load)."""
        for layer in self._lora_layers():
            if id(layer) not in self._hooked:
                self._hooked[id(layer)] = layer.register_forward_hook(self._lora_hook)

    def _lora_hook(self, module: Any, args: Any, output: Any) -> Any:
        """Fast path: PEFT computed only the base layer (adapters disabled); add each slice's adapter delta.

        Rows of a group are kept sorted by adapter, so each adapter's rows are one contiguous slice and its
        delta is ``lora_B(lora_A(x[s:e])) * scaling``, the very computation PEFT does for that adapter alone.
        """
        plan = self._plan
        if plan is None:
            return None
        x = args[0]
        for name, start, end in plan:
            if name not in module.lora_A:  # this adapter does not touch this layer
                continue
            lora_a = module.lora_A[name]
            sub = x[start:end].to(lora_a.weight.dtype)
            delta = module.lora_B[name](lora_a(sub)) * module.scaling[name]
            output[start:end] += delta.to(output.dtype)
        return output

    def _set_fast_path(self, enabled: bool) -> None:
        """On the fast path PEFT computes the base only: every PEFT layer (LoRA layers, trainable token
        embeddings) and ``modules_to_save`` copies (which would otherwise follow PEFT's active adapter) are
        disabled; the hooks add the deltas."""
        if self._fast == enabled:
            return
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        for module in self.peft.modules():
            if isinstance(module, BaseTunerLayer | AuxiliaryTrainingWrapper):
                module._disable_adapters = enabled
        self._fast = enabled

    async def unload_adapter(self, adapter_id: str) -> None:
        await self._call(lambda: self._unload_adapter(adapter_id))

    def _unload_adapter(self, adapter_id: str) -> None:
        name = peft_name(adapter_id)
        if name not in self._dora:
            return
        if any(row.adapter_name == name for group in self._groups for row in group.rows):
            raise ClaraError(f"adapter '{adapter_id}' is in use by running requests")
        if name in self._direct_modules:
            for key in self._direct_modules.pop(name):
                table = self._direct[key]
                del table[name]
                if not table:
                    del self._direct[key]
                    self._direct_hooks.pop(key).remove()
            del self._dora[name]
            del self._ids[name]
            return
        self.peft.delete_adapter(name)
        del self._dora[name]
        del self._ids[name]
        self._active = None
        self._fast = None  # delete_adapter may re-enable layers

    def loaded_adapters(self) -> list[str]:
        return [self._ids[name] for name in self._dora]

    # -- requests ----------------------------------------------------------------------------------------------

    def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text, add_special_tokens=False))

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidInput(
                f"the base '{self.base.name}' has no chat template; use /v1/completions or /generate"
            )
        try:
            return str(
                self.tokenizer.apply_chat_template(
                    [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
                )
            )
        except Exception as exc:  # jinja errors from the template (e.g. unsupported roles)
            raise InvalidInput(f"the chat template rejected these messages: {exc}") from exc

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if self._thread is None:
            raise ClaraError("the engine is not started")
        if request.adapter_id is not None and peft_name(request.adapter_id) not in self._dora:
            raise ClaraError(f"adapter '{request.adapter_id}' is not loaded")
        # a long prompt takes a while to tokenise: never on the event loop, which serves everyone else
        prompt_ids = await asyncio.to_thread(self._encode, request.prompt, request.add_special_tokens)
        check_prompt_fits(prompt_ids, request, self.capabilities.max_model_len)
        queue: asyncio.Queue = asyncio.Queue()
        seq = _Sequence(request, prompt_ids, asyncio.get_running_loop(), queue)
        with self._cond:
            self._inbox.append(seq)
            self._cond.notify_all()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not seq.finished:
                seq.cancelled = True  # the worker drops the row at its next step
                with self._cond:
                    self._cond.notify_all()

    def health(self) -> dict[str, Any]:
        with self._cond:
            waiting = sum(1 for s in self._inbox if not s.cancelled)
            running = sum(len(g.rows) for g in self._groups)
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_batch_size": self.max_batch_size,
            "threads": self._torch_threads(),
            "base_loads": self.base_loads,
            "adapter_loads": self.adapter_loads,
            "running": running,
            "waiting": waiting,
            "groups": len(self._groups),
            "decode_steps": self.steps,
            "peak_batch": self.peak_batch,
            "own_group_adapters": sorted(self._ids[k] for k, v in self._dora.items() if v),
        }

    @staticmethod
    def _torch_threads() -> int:
        import torch

        return int(torch.get_num_threads())

    # -- the worker --------------------------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        with torch.no_grad():
            while True:
                with self._cond:
                    while not self._stopping and not self._inbox and not self._commands and not self._groups:
                        self._cond.wait()
                    if self._stopping:
                        pending = list(self._inbox) + [r for g in self._groups for r in g.rows]
                        self._inbox.clear()
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                    running = sum(len(g.rows) for g in self._groups)
                    admitted: list[_Sequence] = []
                    while self._inbox and running + len(admitted) < self.max_batch_size:
                        seq = self._inbox.popleft()
                        if not seq.cancelled:
                            admitted.append(seq)
                for fn, future in commands:
                    try:
                        future.set_result(fn())
                    except BaseException as exc:
                        future.set_exception(exc)
                try:
                    self._step(admitted)
                except Exception as exc:  # a bug must not kill the worker and hang every request
                    rows = admitted + [r for g in self._groups for r in g.rows]
                    self._groups = []
                    for row in rows:
                        if not row.finished:
                            row.finished = True
                            row.send(ClaraError(f"generation failed: {type(exc).__name__}: {exc}"))
        for seq in pending:
            seq.send(GenerationChunk(text="", finish_reason="abort"))

    def _step(self, admitted: list[_Sequence]) -> None:
        self._prune()
        if admitted:
            self._admit(admitted)
        for group in list(self._groups):
            if group.rows:
                self._guarded(group.rows, lambda g=group: self._decode(g))
        self._prune()

    def _guarded(self, rows: list[_Sequence], step: Callable[[], None]) -> None:
        """Run one step; a failure ends the affected requests with the error and the worker goes on."""
        try:
            step()
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, ClaraError)
                else ClaraError(f"generation failed: {type(exc).__name__}: {exc}")
            )
            for row in rows:
                if not row.finished:  # rows that already ended (or failed alone) got their answer
                    row.finished = True
                    row.send(error)
            self._groups = [g for g in self._groups if not all(r.finished for r in g.rows)]

    def _prune(self) -> None:
        """Drop finished and cancelled rows from their groups (their KV cache rows too)."""
        import torch

        kept: list[_Group] = []
        for group in self._groups:
            alive = [i for i, row in enumerate(group.rows) if not row.finished and not row.cancelled]
            if not alive:
                continue
            if len(alive) < len(group.rows):
                index = torch.tensor(alive, device=self.device)
                group.rows = [group.rows[i] for i in alive]
                group.cache.batch_select_indices(index)
                group.mask = group.mask[index]
                group.positions = group.positions[index]
                # columns that are padding for every remaining row are dropped
                used = group.mask.any(dim=0).nonzero()
                first = int(used[0]) if len(used) else 0
                if first > 0:
                    group.mask = group.mask[:, first:]
                    for layer in group.cache.layers:
                        layer.keys = layer.keys[:, :, first:, :]
                        layer.values = layer.values[:, :, first:, :]
            kept.append(group)
        self._groups = kept

    def _group_key(self, seq: _Sequence) -> str:
        name = seq.adapter_name
        return name if name != BASE and self._dora.get(name) else "mixed"

    def _admit(self, seqs: list[_Sequence]) -> None:
        by_key: dict[str, list[_Sequence]] = {}
        for seq in seqs:
            if seq.adapter_name != BASE and seq.adapter_name not in self._dora:
                seq.finished = True
                seq.send(ClaraError(f"adapter '{seq.request.adapter_id}' was unloaded"))
                continue
            by_key.setdefault(self._group_key(seq), []).append(seq)
        for key, rows in by_key.items():
            self._guarded(rows, lambda k=key, r=rows: self._prefill(k, r))

    def _forward(self, key: str, names: list[str], **inputs: Any) -> Any:
        """One forward pass for rows on ``names`` (adapter ids or ``__base__``, sorted so that equal names are
        contiguous). Plain LoRA and base rows share the pass (the slice-wise hook); an adapter of its own
        group goes through PEFT with that adapter active."""
        if key != "mixed":  # an adapter of its own group: always one PEFT loaded
            self._set_fast_path(False)
            if self._active != key:
                self.peft.set_adapter(key)
                self._active = key
            return self.peft(**inputs)
        if self.peft is not None:
            self._set_fast_path(True)
        plan: list[tuple[str, int, int]] = []
        for i, name in enumerate(names):
            if plan and plan[-1][0] == name:
                plan[-1] = (name, plan[-1][1], i + 1)
            else:
                plan.append((name, i, i + 1))
        self._plan = [p for p in plan if p[0] != BASE]
        try:
            return self.model(**inputs)
        finally:
            self._plan = None

    def _prefill(self, key: str, rows: list[_Sequence]) -> None:
        import torch
        from transformers import DynamicCache

        rows.sort(key=lambda r: r.adapter_name)  # contiguous slices per adapter (stable: arrival order kept)
        for row in rows:
            if row.request.temperature > 0:
                try:
                    row.generator = torch.Generator(device=self.device)
                    if row.request.seed is not None:
                        row.generator.manual_seed(row.request.seed)
                    else:
                        row.generator.seed()
                except Exception as exc:  # e.g. a seed beyond 64 bits: this request fails, not its batch
                    self._fail_row(row, exc)
        rows[:] = [r for r in rows if not r.finished]
        if not rows:
            return
        length = max(len(r.prompt_ids) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.prompt_ids)
            ids[i, length - n :] = torch.tensor(row.prompt_ids)
            mask[i, length - n :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self._forward(
            key,
            [r.adapter_name for r in rows],
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_arg: cache},
        )
        group = _Group(key, rows, cache, mask, mask.sum(-1))
        self._take_tokens(group, out.logits[:, -1, :])
        self._merge(group)

    def _merge(self, new: _Group) -> None:
        """Join ``new`` into the running group of the same key (continuous batching), or start one."""
        import torch
        import torch.nn.functional as F

        target = next((g for g in self._groups if g.key == new.key and g.rows), None)
        if target is None:
            self._groups.append(new)
            return
        length = max(target.mask.shape[1], new.mask.shape[1])

        def left_pad(t: Any, n: int, dim_from_end: int) -> Any:
            if n == 0:
                return t
            spec = [0, 0] * (dim_from_end - 1) + [n, 0]
            return F.pad(t, spec)

        for la, lb in zip(target.cache.layers, new.cache.layers, strict=True):
            ta, tb = la.keys.shape[-2], lb.keys.shape[-2]
            la.keys = torch.cat([left_pad(la.keys, length - ta, 2), left_pad(lb.keys, length - tb, 2)], 0)
            la.values = torch.cat(
                [left_pad(la.values, length - ta, 2), left_pad(lb.values, length - tb, 2)], 0
            )
        target.mask = torch.cat(
            [
                left_pad(target.mask, length - target.mask.shape[1], 1),
                left_pad(new.mask, length - new.mask.shape[1], 1),
            ],
            0,
        )
        target.positions = torch.cat([target.positions, new.positions], 0)
        target.rows = target.rows + new.rows
        order = sorted(range(len(target.rows)), key=lambda i: target.rows[i].adapter_name)
        if order != list(range(len(order))):  # keep each adapter's rows contiguous
            index = torch.tensor(order, device=self.device)
            target.rows = [target.rows[i] for i in order]
            target.cache.batch_select_indices(index)
            target.mask = target.mask[index]
            target.positions = target.positions[index]

    def _decode(self, group: _Group) -> None:
        import torch

        last = torch.tensor([r.generated[-1] for r in group.rows], device=self.device).unsqueeze(1)
        ones = torch.ones((len(group.rows), 1), dtype=group.mask.dtype, device=self.device)
        mask = torch.cat([group.mask, ones], 1)
        out = self._forward(
            group.key,
            [r.adapter_name for r in group.rows],
            input_ids=last,
            attention_mask=mask,
            position_ids=group.positions.unsqueeze(1),
            use_cache=True,
            **{self._cache_arg: group.cache},
        )
        group.mask = mask
        group.positions = group.positions + 1
        self.steps += 1
        self.peak_batch = max(self.peak_batch, len(group.rows))
        self._take_tokens(group, out.logits[:, -1, :])

    def _take_tokens(self, group: _Group, logits: Any) -> None:
        """Pick each row's next token, stream its text, and mark rows that are done."""
        chosen = logits.argmax(-1).tolist()
        for i, row in enumerate(group.rows):
            request = row.request
            if row.finished:
                continue
            if request.temperature > 0:
                try:
                    chosen[i] = _sample(logits[i].float(), request.temperature, request.top_p, row.generator)
                except Exception as exc:  # this row's parameters broke sampling: only this request fails
                    row.generated.append(int(chosen[i]))  # keeps the row decodable until it is pruned
                    self._fail_row(row, exc)
                    continue
            token = int(chosen[i])
            row.generated.append(token)
            finish = None
            if token in self._eos and not request.ignore_eos:
                finish = "stop"
            elif len(row.generated) >= request.max_tokens:
                finish = "length"
            self._emit(row, finish)

    @staticmethod
    def _fail_row(row: _Sequence, exc: BaseException) -> None:
        """End one request with an error; the rest of its batch goes on (the row is pruned at the next step)."""
        row.finished = True
        row.send(
            exc
            if isinstance(exc, ClaraError)
            else ClaraError(f"generation failed: {type(exc).__name__}: {exc}")
        )

    def _emit(self, row: _Sequence, finish: str | None) -> None:
        request = row.request
        ids = row.generated
        if finish == "stop" and ids and ids[-1] in self._eos:
            ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        end = len(text)
        if request.stop:
            hits = [
                i
                for i in (text.find(s, max(0, row.emitted - len(s) + 1)) for s in request.stop if s)
                if i >= 0
            ]
            if hits:
                end = min(hits)
                finish = "stop"
        if finish is None:
            # hold back text that may still become a stop string or a longer character
            hold = max((len(s) for s in request.stop), default=1) - 1
            end = max(row.emitted, len(text) - hold)
            while end > row.emitted and text[end - 1] == "\ufffd":
                end -= 1
        delta = text[row.emitted : end] if end > row.emitted else ""
        if not delta and finish is None:
            return
        row.emitted = max(row.emitted, end)
        if finish is not None:
            row.finished = True
        row.send(
            GenerationChunk(
                text=delta,
                finish_reason=finish,
                prompt_tokens=len(row.prompt_ids),
                completion_tokens=len(row.generated),
            )
        )


def _bias_not_servable(adapter_id: str, config: Mapping[str, Any]) -> AdapterNotServable:
    return AdapterNotServable(
        f"adapter '{adapter_id}' trains bias terms (bias={config.get('bias')!r}) beside more than plain LoRA of "
        "linear layers; the transformers engine applies trained biases to the adapter's own rows only for plain "
        "LoRA adapters: retrain it with bias='none', or merge it into the base"
    )


def _sample(logits: Any, temperature: float, top_p: float, generator: Any) -> int:
    import torch

    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = sorted_probs.cumsum(-1)
        keep = cumulative - sorted_probs < top_p
        keep[0] = True  # always keeps the most likely token (top_p below float precision included)
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    total = probs.sum()
    if not bool(torch.isfinite(probs).all()) or not total > 0:
        raise InvalidInput(
            f"temperature {temperature:g} and top_p {top_p:g} leave no token to sample from; "
            "use temperature 0 (greedy) or a larger one"
        )
    return int(torch.multinomial(probs / total, 1, generator=generator))
