"""The ``vllm`` engine: clara's :class:`~clara_core.types.EngineImpl` on vLLM's v1 ``AsyncLLM``.

vLLM's async engine owns asyncio resources (its output handler task, ZMQ sockets to the engine-core process)
that belong to the event loop it was built in. clara's server may call the engine from its own loop, from
worker threads, or (for the synchronous ``load_adapter``) from inside a request handler. So the engine runs
vLLM on a private event loop in one background thread and crosses over with
``asyncio.run_coroutine_threadsafe``: blocking calls (start, load, unload) wait on that thread without ever
blocking it, and :meth:`VllmEngine.generate` relays vLLM's stream into the caller's loop. A caller that stops
iterating (a client that disconnects) cancels the relay, and vLLM's ``generate`` aborts the request on
cancellation (vllm/v1/engine/async_llm.py, ``AsyncLLM.generate``: ``except (asyncio.CancelledError,
GeneratorExit): await self.abort(...)``).

vLLM loads a LoRA adapter from a folder path. So that it loads exactly the bytes clara checked, the engine reads
the adapter's files once (:func:`read_verified_adapter`: their checksum must be the registered one) and writes
those bytes into a private snapshot folder (``models/cache/vllm-adapters/``, one folder per load, removed at the
unload); vLLM gets that folder, never the registered one, so a file swapped after the check is never served.

Running vLLM's V1 engine outside the main thread needs vLLM 0.10.2 or
later: vllm-project/vllm#23298 removed the V1 main-thread guard (earlier V1 releases installed signal handlers,
which only work in the main thread); this plugin requires vllm>=0.11.

vLLM names used (vllm-project/vllm main, 2026): ``AsyncLLM.from_engine_args``, ``AsyncLLM.generate(prompt,
sampling_params, request_id, lora_request=...)``, ``add_lora(LoRARequest) -> bool``, ``remove_lora(lora_id)
-> bool``, ``shutdown()`` (vllm/v1/engine/async_llm.py); ``AsyncEngineArgs`` (vllm/engine/arg_utils.py);
``SamplingParams``, ``RequestOutputKind.DELTA`` (vllm/sampling_params.py); ``LoRARequest``
(vllm/lora/request.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import attrs

from clara_core.plugin_api import (
    AdapterRecord,
    BaseRecord,
    ClaraError,
    EngineCapabilities,
    EngineImpl,
    EngineOptions,
    GenerationChunk,
    GenerationRequest,
    InvalidInput,
    NotFound,
    check_prompt_fits,
    first_line,
    read_verified_adapter,
)

from . import require_vllm
from .errors import AdapterLoadFailed, VllmRequestFailed, VllmStartFailed
from .translate import (
    ChunkTranslator,
    LoraIdAllocator,
    check_adapter_servable,
    check_engine_arg_names,
    derive_lora_limits,
    engine_args_kwargs,
    lora_request_kwargs,
    prompt_input,
    sampling_params_kwargs,
    snapshot_stem,
    write_snapshot,
)

#: Seconds a blocking call (adapter load, unload) waits for vLLM before giving up.
CALL_TIMEOUT_S = 600.0


def _describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (just ``Type`` when there is no message)."""
    name, line = type(exc).__name__, first_line(exc)
    return name if line == name else f"{name}: {line}"


@attrs.define
class _LoadedAdapter:
    request: Any  # vllm.lora.request.LoRARequest
    checksum: str | None
    rank: int
    folder: Path  # the snapshot of the verified bytes vLLM loaded from


class VllmEngine(EngineImpl):
    """Serves one base through vLLM with ``enable_lora``; every request carries its adapter's ``LoRARequest``,
    so one vLLM batch mixes requests on different adapters (up to ``max_loras`` distinct ones)."""

    capabilities = EngineCapabilities(
        mixed_adapter_batching=True,
        streaming=True,
        notes="vLLM continuous batching; up to max_loras different adapters share one batch",
    )

    def __init__(self, base: BaseRecord, options: EngineOptions) -> None:
        self.base = base
        self.options = options
        self.extra: dict[str, Any] = dict(options.extra or {})
        # clara serve hands over the largest rank among the registry's adapters for this base, so vLLM's
        # max_lora_rank fits every registered adapter without the engine looking for a registry itself.
        self.limits = derive_lora_limits(self.extra, options.max_loaded, options.max_adapter_rank)
        self.engine_kwargs = engine_args_kwargs(Path(base.path), base.name, self.limits, self.extra)
        self._ids = LoraIdAllocator()
        self._loaded: dict[str, _LoadedAdapter] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._llm: Any = None
        self._tokenizer: Any = None
        self._vllm_version = "unknown"
        #: where the snapshots of verified adapter bytes go (a temporary folder where there is no workspace)
        self._own_snapshots = options.cache_dir is None
        self.snapshot_root = (
            Path(tempfile.mkdtemp(prefix="clara-vllm-adapters-"))
            if options.cache_dir is None
            else Path(options.cache_dir) / "vllm-adapters"
        )

    # -- the private event loop ----------------------------------------------------------------------------

    def _start_loop(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        thread = threading.Thread(target=run, name="clara-vllm-loop", daemon=True)
        thread.start()
        ready.wait()
        self._loop, self._thread = loop, thread

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=30)
        if not loop.is_running():
            loop.close()

    def _submit(self, coro: Any) -> Future:
        if self._loop is None:
            coro.close()
            raise VllmRequestFailed("the vLLM engine is not running; start the server again")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _call(self, coro: Any, timeout: float | None = CALL_TIMEOUT_S) -> Any:
        """Run ``coro`` on vLLM's loop and await it from the caller's loop, which stays free meanwhile."""
        return await asyncio.wait_for(asyncio.wrap_future(self._submit(coro)), timeout)

    def _require_started(self) -> Any:
        if self._llm is None:
            raise VllmRequestFailed("the vLLM engine is not started; the server calls start() first")
        return self._llm

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._llm is not None:
            return
        vllm = require_vllm()
        self._vllm_version = getattr(vllm, "__version__", "unknown")
        from vllm.engine.arg_utils import AsyncEngineArgs

        check_engine_arg_names(self.engine_kwargs, (f.name for f in dataclasses.fields(AsyncEngineArgs)))
        await asyncio.to_thread(self._start_loop)
        try:
            self._llm = await self._call(self._build(), timeout=None)
        except ClaraError:
            await asyncio.to_thread(self._stop_loop)
            raise
        except Exception as exc:
            await asyncio.to_thread(self._stop_loop)
            raise VllmStartFailed(
                f"vLLM could not start on base '{self.base.name}' ({self.base.path}): {_describe(exc)}; "
                "check the GPU (nvidia-smi) and the engine options, e.g. gpu_memory_utilization, "
                "max_model_len, tensor_parallel_size"
            ) from exc
        await asyncio.to_thread(self._get_tokenizer)
        model_config = getattr(self._llm, "model_config", None)
        max_len = getattr(model_config, "max_model_len", None) or self.engine_kwargs.get("max_model_len")
        self.capabilities = EngineCapabilities(
            mixed_adapter_batching=True,
            streaming=True,
            max_model_len=int(max_len) if max_len else None,
            notes=type(self).capabilities.notes,
        )

    async def _build(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        try:
            engine_args = AsyncEngineArgs(**self.engine_kwargs)
        except (TypeError, ValueError) as exc:
            raise VllmStartFailed(f"vLLM refused the engine options: {_describe(exc)}") from exc
        return AsyncLLM.from_engine_args(engine_args)

    async def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                await self._call(self._shutdown_llm(llm), timeout=120)
        with self._lock:
            folders = [entry.folder for entry in self._loaded.values()]
            self._loaded.clear()
        await asyncio.to_thread(self._stop_loop)
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        if self._own_snapshots:
            shutil.rmtree(self.snapshot_root, ignore_errors=True)

    @staticmethod
    async def _shutdown_llm(llm: Any) -> None:
        llm.shutdown()

    # -- adapters ------------------------------------------------------------------------------------------

    async def load_adapter(self, adapter: AdapterRecord) -> None:
        # read once, hash those bytes (Conflict unless they are the registered ones), hand vLLM those bytes
        files = await asyncio.to_thread(read_verified_adapter, adapter)
        # vLLM's own checks would only fire inside its engine process, at add_lora or at the first request:
        # clara refuses what vLLM cannot serve here, from the registry record and the verified config.
        rank = check_adapter_servable(adapter, self.limits.max_lora_rank, files.config)
        llm = self._require_started()
        with self._lock:
            current = self._loaded.get(adapter.id)
        if current is not None:
            if current.checksum == files.checksum:
                return
            await self.unload_adapter(adapter.id)  # same id, new files: drop vLLM's copy of the old ones
        from vllm.lora.request import LoRARequest

        name = f"{snapshot_stem(adapter.id, files.checksum)}-{uuid.uuid4().hex[:8]}"  # one folder per load
        folder = await asyncio.to_thread(write_snapshot, self.snapshot_root, name, files)
        with self._lock:
            lora_int_id = self._ids.id_for(adapter.id, files.checksum)
        lora_request = LoRARequest(**lora_request_kwargs(adapter, lora_int_id, folder))
        try:
            await self._call(llm.add_lora(lora_request))
        except Exception as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise AdapterLoadFailed(f"vLLM could not load adapter '{adapter.id}': {_describe(exc)}") from exc
        with self._lock:
            self._loaded[adapter.id] = _LoadedAdapter(lora_request, files.checksum, rank, folder)

    async def unload_adapter(self, adapter_id: str) -> None:
        llm = self._require_started()
        with self._lock:
            entry = self._loaded.pop(adapter_id, None)
        if entry is None:
            raise NotFound(f"adapter '{adapter_id}' is not loaded in the vLLM engine")
        try:
            await self._call(llm.remove_lora(entry.request.lora_int_id))
            await asyncio.to_thread(shutil.rmtree, entry.folder, True)
        except Exception as exc:
            raise VllmRequestFailed(
                f"vLLM could not unload adapter '{adapter_id}': {_describe(exc)}; it is no longer served"
            ) from exc

    def loaded_adapters(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def lora_request_for(self, adapter_id: str | None) -> Any:
        """The ``LoRARequest`` a request on ``adapter_id`` carries (``None`` for the base)."""
        if adapter_id is None:
            return None
        with self._lock:
            entry = self._loaded.get(adapter_id)
        if entry is None:
            raise NotFound(f"adapter '{adapter_id}' is not loaded; load it first (POST /load_adapter)")
        return entry.request

    # -- generation ----------------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        llm = self._require_started()
        lora_request = self.lora_request_for(request.adapter_id)
        prompt_ids = self._encode(request.prompt, request.add_special_tokens)
        check_prompt_fits(prompt_ids, request, self.capabilities.max_model_len)
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        try:
            params = SamplingParams(**sampling_params_kwargs(request), output_kind=RequestOutputKind.DELTA)
        except ValueError as exc:
            raise InvalidInput(f"vLLM refused the sampling parameters: {_describe(exc)}") from exc
        request_id = f"{request.request_id or 'clara'}-{uuid.uuid4().hex[:12]}"
        caller_loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def deliver(kind: str, item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the caller's loop closed: nobody is listening
                caller_loop.call_soon_threadsafe(queue.put_nowait, (kind, item))

        async def relay() -> None:
            try:
                async for output in llm.generate(
                    prompt_input(prompt_ids), params, request_id, lora_request=lora_request
                ):
                    deliver("output", output)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # handed to the caller, who raises it as a ClaraError
                deliver("error", exc)
            finally:
                deliver("end", None)

        future = self._submit(relay())
        translator = ChunkTranslator()
        try:
            while True:
                kind, item = await queue.get()
                if kind == "end":
                    break
                if kind == "error":
                    raise self._request_error(item)
                chunk = translator.feed(item)
                if chunk is not None:
                    yield chunk
        finally:
            if not future.done():
                future.cancel()  # cancels relay() on vLLM's loop; AsyncLLM.generate then aborts the request

    @staticmethod
    def _request_error(exc: BaseException) -> ClaraError:
        if isinstance(exc, ClaraError):
            return exc
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        if isinstance(cause, ValueError):  # vLLM's validation errors (prompt too long, bad parameters)
            return InvalidInput(f"vLLM refused the request: {_describe(cause)}")
        return VllmRequestFailed(f"vLLM failed the request: {_describe(cause)}")

    # -- tokenizer -----------------------------------------------------------------------------------------

    def _get_tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.base.path))
        return self._tokenizer

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        tokenizer = self._get_tokenizer()
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidInput(
                f"base '{self.base.name}' has no chat template; use /v1/completions or /generate with a prompt"
            )
        return tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
        )

    def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._get_tokenizer().encode(text, add_special_tokens=add_special_tokens))

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text, add_special_tokens=False))

    def health(self) -> dict[str, Any]:
        with self._lock:
            lora_ids = {adapter_id: entry.request.lora_int_id for adapter_id, entry in self._loaded.items()}
        return {
            "vllm_version": self._vllm_version,
            "running": self._llm is not None,
            "max_loras": self.limits.max_loras,
            "max_lora_rank": self.limits.max_lora_rank,
            "max_lora_rank_from": self.limits.rank_source,
            "max_cpu_loras": self.limits.max_cpu_loras,
            "lora_int_ids": lora_ids,
            "engine_args": {k: v for k, v in self.engine_kwargs.items() if k not in ("model", "tokenizer")},
        }
