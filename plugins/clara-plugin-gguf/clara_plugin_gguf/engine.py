"""The ``llamacpp`` serving engine: one GGUF base loaded once, many GGUF LoRA adapters switched per request.

The base is the registered Hugging Face folder converted to GGUF (:func:`clara_plugin_gguf.base.cached_base_gguf`,
cached per base hash and output type, so the first start converts and later ones reuse it). Each adapter is
converted once (:func:`clara_plugin_gguf.adapter.cached_adapter_gguf`) and loaded once with
``llama_adapter_lora_init``; a request on it sets the context's adapter set to that one adapter with
``llama_set_adapters_lora`` (which replaces the whole active set), so switching adapters never reloads the model.

llama.cpp applies one adapter set per context and does not batch across sets, so requests run one at a time on a
single worker thread that owns the model and the context: requests on different adapters take turns, in the order
they arrived. The KV cache is cleared before every request, so nothing computed under one adapter is ever reused
under another. Adapter loads and unloads run on the same worker between requests, so the adapter set never
changes under a running decode.

Nothing heavy is imported at module level: ``llama_cpp`` and ``numpy`` are imported when the engine starts.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib
import importlib.util
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from clara_core.plugin_api import (
    ClaraError,
    Conflict,
    EngineCapabilities,
    EngineImpl,
    EngineOptions,
    GenerationChunk,
    GenerationRequest,
    InvalidInput,
    check_prompt_fits,
    first_line,
)

# the output types of the GGUF base (``-o outtype=``), and its default, are ``clara export ollama``'s
from .exporter import DEFAULT_OUTTYPE, OUTTYPES

#: What a user reads when the ``llamacpp`` engine is asked for where llama-cpp-python is missing.
NOT_INSTALLED = (
    "llama-cpp-python is not installed, so the 'llamacpp' engine cannot start: pip install clara-plugin-gguf "
    "(it brings llama-cpp-python, compiled once, about 5 minutes) or run scripts/install.sh --dev; "
    "or use --engine transformers"
)

NOTES = (
    "llama.cpp: one request at a time on one worker; requests on different adapters take turns (llama.cpp does "
    "not batch across adapter sets); adapters are loaded once and switched with llama_set_adapters_lora, "
    "the KV cache is cleared before every request"
)

DEFAULT_N_CTX = 4096


class LlamaCppNotInstalled(ClaraError):
    """``import llama_cpp`` fails: not installed, or installed without its compiled library."""

    code = "engine_unavailable"
    http_status = 503


class EngineStartFailed(ClaraError):
    """The GGUF base could not be made or loaded (unreadable file, not a model llama.cpp knows)."""

    code = "engine_start_failed"
    http_status = 503


class AdapterNotServable(Conflict):
    """The adapter is registered and intact, but it has no GGUF form llama.cpp can load (the converter says
    why), or llama.cpp refused the converted file."""

    code = "adapter_not_servable"


def require_llama_cpp() -> Any:
    """Import ``llama_cpp``, or raise :class:`LlamaCppNotInstalled` with the line that says how to get it."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise LlamaCppNotInstalled(NOT_INSTALLED)
    try:
        return importlib.import_module("llama_cpp")
    except Exception as exc:  # a wheel built for another machine: its shared library does not load
        raise LlamaCppNotInstalled(
            f"llama-cpp-python is installed but cannot be imported ({type(exc).__name__}: {first_line(exc)}); "
            "reinstall it on this machine: pip install --force-reinstall --no-cache-dir llama-cpp-python"
        ) from exc


def _echo(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _Job:
    """One request inside the engine: its tokens and the way back to its event loop."""

    def __init__(self, request: GenerationRequest, prompt_ids: list[int], loop: Any, queue: Any) -> None:
        self.request = request
        self.prompt_ids = prompt_ids
        self.loop = loop
        self.queue = queue
        self.cancelled = False
        self.finished = False

    def send(self, item: GenerationChunk | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the request's event loop is gone: nobody is listening any more
            self.cancelled = True


class _Stream:
    """Decoded text of one answer, streamed in pieces: stop strings are cut, text that may still become a stop
    string or a longer UTF-8 character is held back (as the transformers engine does)."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self.data = bytearray()
        self.emitted = 0

    def add(self, piece: bytes, finish: str | None) -> tuple[str, str | None]:
        """Append ``piece``; return the new text to send and the finish reason (``stop`` on a stop string)."""
        self.data += piece
        text = self.data.decode("utf-8", errors="replace")
        end = len(text)
        if self.stop:
            hits = [i for i in (text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                finish = "stop"
        if finish is None:
            hold = max((len(s) for s in self.stop), default=1) - 1
            end = max(self.emitted, len(text) - hold)
            while end > self.emitted and text[end - 1] == "\ufffd":
                end -= 1
        delta = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta, finish


def sample_token(logits: Any, temperature: float, top_p: float, rng: Any) -> int:
    """Sample as the transformers engine does: softmax of ``logits / temperature``, cut to the smallest set of
    most likely tokens whose probability reaches ``top_p`` (the most likely one always kept), then draw."""
    import numpy as np

    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max()
    probs = np.exp(scaled)
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order] / probs.sum()
        keep = np.cumsum(sorted_probs) - sorted_probs < top_p
        keep[0] = True
        kept = np.zeros_like(probs)
        kept[order[keep]] = probs[order[keep]]
        probs = kept
    total = probs.sum()
    if not np.isfinite(probs).all() or not total > 0:
        raise InvalidInput(
            f"temperature {temperature:g} and top_p {top_p:g} leave no token to sample from; "
            "use temperature 0 (greedy) or a larger one"
        )
    return int(rng.choice(len(probs), p=probs / total))


class LlamaCppEngine(EngineImpl):
    capabilities = EngineCapabilities(mixed_adapter_batching=False, notes=NOTES)

    def __init__(self, base: Any, options: EngineOptions) -> None:
        require_llama_cpp()
        self.base = base
        self.options = options
        extra = options.extra
        self.outtype = str(extra.get("outtype") or DEFAULT_OUTTYPE)
        self.n_ctx = int(extra.get("n_ctx", DEFAULT_N_CTX))
        self.n_threads = int(extra.get("n_threads") or 0)
        self.n_gpu_layers = int(extra.get("n_gpu_layers") or 0)
        self.svd_rank = int(extra.get("svd_rank") or 0)
        if self.svd_rank < 0:
            raise InvalidInput(
                f"engine option -o svd_rank must be 0 (the adapter's own rank) or more, got {self.svd_rank}"
            )
        if self.outtype not in OUTTYPES:
            raise InvalidInput(f"engine option -o outtype must be {', '.join(OUTTYPES)}, got {self.outtype}")
        if self.n_ctx < 0:
            raise InvalidInput(
                f"engine option -o n_ctx must be 0 (the model's own) or more, got {self.n_ctx}"
            )
        if self.n_threads < 0:
            raise InvalidInput(
                f"engine option -o n_threads must be 0 (llama.cpp's default) or more, got {self.n_threads}"
            )
        if self.n_gpu_layers < -1:
            raise InvalidInput(
                f"engine option -o n_gpu_layers must be -1 (all), 0 or more, got {self.n_gpu_layers}"
            )
        self._own_cache: tempfile.TemporaryDirectory[str] | None = None
        self.cache_dir = options.cache_dir
        self.model_file: Path | None = None
        self.llm: Any = None
        self._ll: Any = None  # the llama_cpp module
        self._vocab: Any = None
        self._n_vocab = 0
        self._n_batch = 512
        self._eog: Callable[[int], bool] = lambda _token: False
        #: adapter id -> (llama_adapter_lora pointer, its GGUF file)
        self._adapters: dict[str, tuple[Any, Path]] = {}
        self._active: str | None = None  # the adapter set on the context (None: the base alone)
        #: what the converter said about adapters it converted in this process (an SVD error, ...)
        self._conversion_notes: dict[str, list[str]] = {}
        self._chat_template: str | None = None
        self._special_tokens: dict[str, str] = {}
        self.base_loads = 0
        self.adapter_loads = 0
        self.adapter_switches = 0
        self.kv_clears = 0
        self.requests_served = 0
        self.tokens_generated = 0
        self.load_seconds = 0.0
        self._running: _Job | None = None
        self._inbox: deque[_Job] = deque()
        self._commands: deque[tuple[Callable[[], Any], Future]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.llm is not None:
            return
        await asyncio.to_thread(self._load_base)
        self._thread = threading.Thread(target=self._run, name="clara-llamacpp-engine", daemon=True)
        self._thread.start()

    def _cache(self) -> Path:
        """The workspace's cache folder; without a workspace, a folder of this engine's own, removed at
        shutdown."""
        with self._cond:
            if self.cache_dir is None:
                self._own_cache = tempfile.TemporaryDirectory(prefix="clara-gguf-")
                self.cache_dir = Path(self._own_cache.name)
            return Path(self.cache_dir)

    def _load_base(self) -> None:
        from .base import cached_base_gguf

        self._ll = ll = require_llama_cpp()
        try:
            path = Path(cached_base_gguf(self.base, self.outtype, self._cache(), echo=_echo))
        except ClaraError:
            raise
        except Exception as exc:
            raise EngineStartFailed(
                f"base '{self.base.name}' ({self.base.path}) could not be converted to GGUF: "
                f"{type(exc).__name__}: {first_line(exc)}"
            ) from exc
        self.model_file = path
        trained = trained_context(path)
        # a context larger than the model was trained for would hold positions it never saw: capped
        n_ctx = trained if self.n_ctx == 0 else min(self.n_ctx, trained or self.n_ctx)
        kv_type = ll.GGML_TYPE_F32 if self.outtype == "f32" else ll.GGML_TYPE_F16
        started = time.perf_counter()
        try:
            self.llm = ll.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_threads=self.n_threads or None,
                n_threads_batch=self.n_threads or None,
                n_gpu_layers=self.n_gpu_layers,
                # f32 weights get an f32 KV cache too: llama.cpp's default f16 cache alone moves logits by up
                # to 0.1 on models with large activations, more than the f32 weights ever do
                type_k=kv_type,
                type_v=kv_type,
                verbose=False,
            )
        except Exception as exc:  # llama.cpp says "Failed to load model from file" and logs the reason
            raise EngineStartFailed(
                f"llama.cpp could not load the GGUF base {path} of '{self.base.name}': {first_line(exc)}; "
                f"delete the file so that it is converted again, or check that it is a GGUF model"
            ) from exc
        self.load_seconds = time.perf_counter() - started
        self.base_loads += 1
        model = self.llm.model
        self._vocab = ll.llama_model_get_vocab(model)
        self._n_vocab = int(ll.llama_vocab_n_tokens(self._vocab))
        self._n_batch = int(self.llm.n_batch)
        vocab = self._vocab
        self._eog = lambda token: bool(ll.llama_vocab_is_eog(vocab, token))
        metadata = dict(self.llm.metadata or {})
        self._chat_template = metadata.get("tokenizer.chat_template") or None
        self._special_tokens = {}
        for name, getter in (("bos_token", ll.llama_vocab_bos), ("eos_token", ll.llama_vocab_eos)):
            token = int(getter(vocab))
            if token >= 0:
                self._special_tokens[name] = self._piece(token, special=True).decode(
                    "utf-8", errors="replace"
                )
        self.capabilities = EngineCapabilities(
            mixed_adapter_batching=False, max_model_len=int(self.llm.n_ctx()), notes=NOTES
        )

    async def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join, 60)
            if thread.is_alive():  # a decode that does not end: freeing the model under it would crash
                return
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        ll = self._ll
        if self.llm is not None:
            if self._active is not None:
                ll.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
                self._active = None
            for pointer, _path in self._adapters.values():
                ll.llama_adapter_lora_free(pointer)
            self._adapters.clear()
            self.llm.close()
            self.llm = None
        if self._own_cache is not None:
            self._own_cache.cleanup()
            self._own_cache = None

    # -- the worker's command channel ---------------------------------------------------------------------

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker thread between requests."""
        if self._thread is None:
            raise ClaraError("the llamacpp engine is not started")
        future: Future = Future()
        with self._cond:
            self._commands.append((fn, future))
            self._cond.notify_all()
        return await asyncio.wrap_future(future)

    # -- adapters ----------------------------------------------------------------------------------------------

    async def load_adapter(self, adapter: Any) -> None:
        if adapter.id in self._adapters:
            return
        path = await asyncio.to_thread(self._convert, adapter)
        await self._call(lambda: self._init_adapter(adapter.id, path))

    def _convert(self, adapter: Any) -> Path:
        from .adapter import cached_adapter_gguf

        said: list[str] = []

        def echo(line: str) -> None:
            _echo(line)
            said.append(line)

        try:
            path = Path(
                cached_adapter_gguf(adapter, self.base, self._cache(), echo=echo, svd_rank=self.svd_rank)
            )
            if said:  # converted now: what the converter said (a DoRA adapter's SVD error) stays in /health
                self._conversion_notes[adapter.id] = said
            return path
        except ClaraError as exc:  # the converter's reason, and where the adapter can be served instead
            raise AdapterNotServable(
                f"the llamacpp engine cannot serve adapter '{adapter.id}': {exc} (the transformers engine "
                "serves the adapter as it is)"
            ) from exc
        except Exception as exc:
            raise AdapterNotServable(
                f"the llamacpp engine cannot serve adapter '{adapter.id}': converting it to GGUF failed: "
                f"{type(exc).__name__}: {first_line(exc)}"
            ) from exc

    def _init_adapter(self, adapter_id: str, path: Path) -> None:
        ll = self._ll
        if adapter_id in self._adapters:
            return
        pointer = ll.llama_adapter_lora_init(self.llm.model, str(path).encode("utf-8"))
        if not pointer:
            raise AdapterNotServable(
                f"llama.cpp refused the GGUF adapter {path} of '{adapter_id}' (it does not fit base "
                f"'{self.base.name}'); delete the file so that it is converted again"
            )
        self._adapters[adapter_id] = (pointer, path)
        self.adapter_loads += 1

    async def unload_adapter(self, adapter_id: str) -> None:
        await self._call(lambda: self._free_adapter(adapter_id))

    def _free_adapter(self, adapter_id: str) -> None:
        entry = self._adapters.pop(adapter_id, None)
        if entry is None:
            return
        if self._active == adapter_id:  # never free an adapter the context still points to
            self._set_adapter(None)
        self._ll.llama_adapter_lora_free(entry[0])

    def loaded_adapters(self) -> list[str]:
        return list(self._adapters)

    def _set_adapter(self, adapter_id: str | None) -> None:
        """Make ``adapter_id`` (or none: the base alone) the context's whole adapter set."""
        if adapter_id == self._active:
            return
        ll = self._ll
        if adapter_id is None:
            result = ll.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        else:
            pointer = self._adapters[adapter_id][0]
            adapters = (ll.llama_adapter_lora_p_ctypes * 1)(pointer)
            scales = (ctypes.c_float * 1)(1.0)
            result = ll.llama_set_adapters_lora(self.llm.ctx, adapters, 1, scales)
        if result != 0:
            raise ClaraError(
                f"llama.cpp could not set the adapter set to {adapter_id or 'none'} (code {result})"
            )
        self._active = adapter_id
        self.adapter_switches += 1

    # -- tokens ------------------------------------------------------------------------------------------------

    def _tokenize(self, text: str, add_special: bool) -> list[int]:
        ll = self._ll
        data = text.encode("utf-8")
        size = len(data) + 8
        for _ in range(2):
            buffer = (ll.llama_token * size)()
            # parse_special: special tokens written in the text (a rendered chat template) are special tokens,
            # as in the Hugging Face tokenizer
            n = int(ll.llama_tokenize(self._vocab, data, len(data), buffer, size, add_special, True))
            if n >= 0:
                return list(buffer[:n])
            size = -n
        raise ClaraError("llama.cpp could not tokenize the prompt")

    def _piece(self, token: int, special: bool = False) -> bytes:
        ll = self._ll
        buffer = ctypes.create_string_buffer(64)
        n = int(ll.llama_token_to_piece(self._vocab, token, buffer, 64, 0, special))
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = int(ll.llama_token_to_piece(self._vocab, token, buffer, -n, 0, special))
        return buffer.raw[: max(n, 0)]

    def count_tokens(self, text: str) -> int:
        if self._vocab is None:
            raise ClaraError("the llamacpp engine is not started")
        return len(self._tokenize(text, add_special=False))

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The GGUF's chat template (the base tokenizer's, written by the conversion), rendered as transformers'
        ``apply_chat_template`` renders it."""
        if not self._chat_template:
            raise InvalidInput(
                f"the base '{self.base.name}' has no chat template; use /v1/completions or /generate"
            )
        try:
            return render_template(self._chat_template, messages, self._special_tokens)
        except Exception as exc:  # jinja errors from the template (e.g. unsupported roles)
            raise InvalidInput(f"the chat template rejected these messages: {exc}") from exc

    # -- requests ----------------------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if self._thread is None:
            raise ClaraError("the llamacpp engine is not started")
        if request.adapter_id is not None and request.adapter_id not in self._adapters:
            raise ClaraError(f"adapter '{request.adapter_id}' is not loaded")
        # a long prompt takes a while to tokenise: never on the event loop, which serves everyone else
        prompt_ids = await asyncio.to_thread(self._tokenize, request.prompt, request.add_special_tokens)
        check_prompt_fits(prompt_ids, request, self.capabilities.max_model_len)
        queue: asyncio.Queue = asyncio.Queue()
        job = _Job(request, prompt_ids, asyncio.get_running_loop(), queue)
        with self._cond:
            self._inbox.append(job)
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
            if not job.finished:
                job.cancelled = True  # the worker stops at its next token

    def health(self) -> dict[str, Any]:
        with self._cond:
            waiting = sum(1 for job in self._inbox if not job.cancelled)
            running = 1 if self._running is not None else 0
        return {
            "model_file": str(self.model_file) if self.model_file else None,
            "outtype": self.outtype,
            "kv_cache_type": "f32" if self.outtype == "f32" else "f16",
            "n_ctx": self.capabilities.max_model_len,
            "n_threads": self.llm.n_threads if self.llm is not None else None,
            "n_gpu_layers": self.n_gpu_layers,
            "base_loads": self.base_loads,
            "base_load_seconds": round(self.load_seconds, 3),
            "adapter_loads": self.adapter_loads,
            "adapter_files": {k: str(v[1]) for k, v in self._adapters.items()},
            "adapter_conversions": dict(self._conversion_notes),
            "active_adapter": self._active,
            "adapter_switches": self.adapter_switches,
            "kv_cache_clears": self.kv_clears,
            "requests_served": self.requests_served,
            "tokens_generated": self.tokens_generated,
            "running": running,
            "waiting": waiting,
            "scheduling": "one request at a time; requests on different adapters take turns",
        }

    # -- the worker --------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._inbox and not self._commands:
                    self._cond.wait()
                if self._stopping:
                    pending = list(self._inbox)
                    self._inbox.clear()
                    commands = list(self._commands)
                    self._commands.clear()
                    break
                commands = list(self._commands)
                self._commands.clear()
                job = self._inbox.popleft() if not commands and self._inbox else None
                self._running = job
            for fn, future in commands:
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)
            if job is None:
                continue
            try:
                if not job.cancelled:
                    self._serve(job)
            except Exception as exc:  # a bug or a llama.cpp failure ends this request, not the worker
                if not job.finished:
                    job.finished = True
                    job.send(
                        exc
                        if isinstance(exc, ClaraError)
                        else ClaraError(f"generation failed: {type(exc).__name__}: {first_line(exc)}")
                    )
            finally:
                with self._cond:
                    self._running = None
        for _fn, future in commands:
            future.set_exception(ClaraError("the llamacpp engine is shutting down"))
        for job in pending:
            job.send(GenerationChunk(text="", finish_reason="abort"))

    def _decode(self, tokens: list[int]) -> None:
        ll = self._ll
        for start in range(0, len(tokens), self._n_batch):
            part = tokens[start : start + self._n_batch]
            array = (ll.llama_token * len(part))(*part)
            result = int(ll.llama_decode(self.llm.ctx, ll.llama_batch_get_one(array, len(part))))
            if result != 0:
                raise ClaraError(f"llama.cpp could not decode the request (llama_decode returned {result})")

    def _serve(self, job: _Job) -> None:
        import numpy as np

        ll = self._ll
        request = job.request
        if request.adapter_id is not None and request.adapter_id not in self._adapters:
            raise ClaraError(f"adapter '{request.adapter_id}' was unloaded")
        rng = None
        if request.temperature > 0:
            rng = np.random.default_rng(request.seed)
        self._set_adapter(request.adapter_id)
        # never reuse KV across adapters (or across requests at all): every request starts from an empty cache
        ll.llama_memory_clear(ll.llama_get_memory(self.llm.ctx), True)
        self.kv_clears += 1
        self.requests_served += 1
        stream = _Stream(request.stop)
        generated = 0
        self._decode(job.prompt_ids)
        while True:
            if job.cancelled:
                return
            if self._stopping:  # shutdown: end the answer here rather than hold the model
                job.finished = True
                job.send(
                    GenerationChunk(
                        text="",
                        finish_reason="abort",
                        prompt_tokens=len(job.prompt_ids),
                        completion_tokens=generated,
                    )
                )
                return
            pointer = ll.llama_get_logits_ith(self.llm.ctx, -1)
            logits = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))
            if rng is None:
                token = int(logits.argmax())
            else:
                token = sample_token(logits, request.temperature, request.top_p, rng)
            generated += 1
            self.tokens_generated += 1
            finish = None
            piece = b""
            if self._eog(token) and not request.ignore_eos:
                finish = "stop"
            else:
                piece = self._piece(token)
                if generated >= request.max_tokens:
                    finish = "length"
            delta, finish = stream.add(piece, finish)
            if delta or finish is not None:
                if finish is not None:
                    job.finished = True
                job.send(
                    GenerationChunk(
                        text=delta,
                        finish_reason=finish,
                        prompt_tokens=len(job.prompt_ids),
                        completion_tokens=generated,
                    )
                )
            if finish is not None:
                return
            self._decode([token])


def trained_context(path: Path) -> int:
    """The context length the GGUF model was trained for (``<arch>.context_length``), 0 where it is not
    recorded or the file is not a readable GGUF (llama.cpp then says what is wrong with it)."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        arch = reader.get_field("general.architecture")
        field = reader.get_field(f"{arch.contents()}.context_length") if arch is not None else None
        return int(field.contents()) if field is not None else 0
    except Exception:
        return 0


def render_template(
    template: str, messages: Sequence[Mapping[str, Any]], special_tokens: Mapping[str, str]
) -> str:
    """Render a Hugging Face chat template the way ``transformers``' ``apply_chat_template`` does (a sandboxed
    jinja2 environment with ``trim_blocks`` and ``lstrip_blocks``, ``raise_exception``, the special tokens as
    variables, ``add_generation_prompt``)."""
    import json

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    compiled = env.from_string(template)
    return compiled.render(
        messages=[dict(m) for m in messages], add_generation_prompt=True, **dict(special_tokens)
    )
