"""The server's shared state: settings, the adapter selection and the one generation path.

:class:`ServerState` holds everything shared by the endpoints (native in :mod:`.app`, OpenAI-compatible in
:mod:`.openai_api`), including :meth:`ServerState.generation`, the one path every generating endpoint goes
through: adapter resolution (named, default, or routed), queue admission, hot-swap, limits, the engine call,
and one :class:`~clara_core.serving.requestlog.RequestRecord` per request for the observers. Both API modules
import from here; neither imports the other. Nothing here imports FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import attrs

from ..errors import ClaraError, InvalidInput, first_line
from ..registry import AdapterRecord, BaseRecord
from ..types import EmbedFn, EngineImpl, GenerationChunk, GenerationRequest, RouteRequest, RouterImpl
from .adapters import DEFAULT_QUEUE_TIMEOUT, AdapterManager
from .admission import Admission
from .errors import EngineError, error_body, redact_paths
from .metrics import Metrics
from .params import check_text
from .requestlog import RequestObserver, RequestRecord
from .streaming import sse

AUTO = "auto"

#: No tokenizer packs more characters than this into one token on real text: a prompt longer than this many
#: characters per token of room is first counted on such a prefix (see ServerState.check_prompt_length).
PREFIX_CHARS_PER_TOKEN = 64


@attrs.define
class ServeSettings:
    """The server's knobs (``clara serve`` flags)."""

    max_loaded: int = 8
    max_queue: int = 64
    #: Seconds a request waits for an adapter slot before 503 ``queue_timeout``.
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    #: Seconds a client has to send a request's head, and again its body; slower connections are closed.
    read_timeout: float = 20.0
    #: Upper bound for ``max_tokens`` where the engine does not know its context length.
    max_tokens_limit: int = 4096
    engine_name: str = "transformers"
    router_name: str | None = None
    preload: list[str] = attrs.field(factory=list)


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else list(stop)
    if len(items) > 16:
        raise InvalidInput(f"at most 16 stop strings, got {len(items)}")
    return [s for s in items if s]


# -- outcome of one generation ---------------------------------------------------------------------------------


@attrs.define
class Selection:
    adapter_id: str | None
    how: str  # named | default | routed
    score: float | None = None
    scores: dict[str, float] = attrs.field(factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"adapter_id": self.adapter_id, "selection": self.how}
        if self.how == "routed":
            out["route"] = {"adapter_id": self.adapter_id, "score": self.score, "scores": self.scores}
        return out


@attrs.define
class Generation:
    """A running generation: iterate :attr:`chunks`; :meth:`finish` releases everything (idempotent)."""

    state: ServerState
    record: RequestRecord
    selection: Selection
    chunks: AsyncIterator[GenerationChunk]
    stack: AsyncExitStack
    started: float
    closed: bool = False

    async def iterate(self) -> AsyncIterator[GenerationChunk]:
        status, code = 200, None
        try:
            async for chunk in self.chunks:
                if self.record.first_token_seconds is None and chunk.text:
                    self.record.first_token_seconds = time.perf_counter() - self.started
                self.record.prompt_tokens = chunk.prompt_tokens
                self.record.completion_tokens = chunk.completion_tokens
                if chunk.finish_reason is not None:
                    self.record.finish_reason = chunk.finish_reason
                yield chunk
        except ClaraError as exc:
            status, code = exc.http_status, exc.code
            exc._clara_observed = True  # type: ignore[attr-defined]  # recorded below, not again by the handler
            raise
        except Exception as exc:  # the engine failed: an engine error (500), not the client's doing
            error = EngineError(
                f"engine '{self.state.settings.engine_name}' failed during generation: "
                f"{type(exc).__name__}: {first_line(exc)}"
            )
            status, code = error.http_status, error.code
            error._clara_observed = True  # type: ignore[attr-defined]
            raise error from exc
        except BaseException:  # client gone: the request was cancelled or the stream closed
            status, code = 499, "client_closed"
            raise
        finally:
            if self.record.finish_reason is None and status == 200:
                status, code = 499, "client_closed"
            await self.finish(status, code)

    async def collect(self) -> tuple[str, GenerationChunk]:
        parts: list[str] = []
        last = GenerationChunk(text="")
        async for chunk in self.iterate():
            parts.append(chunk.text)
            last = chunk
        return "".join(parts), last

    async def finish(self, status: int, code: str | None) -> None:
        if self.closed:
            return
        self.closed = True
        aclose = getattr(self.chunks, "aclose", None)
        if aclose is not None:
            await aclose()
        await self.stack.aclose()
        self.record.status = status
        self.record.error_code = code
        self.record.latency_seconds = time.perf_counter() - self.started
        self.state.observe(self.record)


class ServerState:
    def __init__(
        self,
        engine: EngineImpl,
        base: BaseRecord,
        lookup: Callable[[str], AdapterRecord],
        list_adapters: Callable[[], list[AdapterRecord]],
        settings: ServeSettings,
        router: RouterImpl | None = None,
        observers: Sequence[RequestObserver] = (),
        router_embed: EmbedFn | None = None,
    ) -> None:
        self.engine = engine
        self.base = base
        #: server paths a client never sees (errors name ids instead): path -> what the client sees
        self._hidden_paths: dict[str, str] = {}
        self.hide_path(base.path, f"<base {base.name}>")
        self._registry_lookup = lookup
        self.list_adapters = list_adapters
        self.settings = settings
        self.router = router
        self.router_embed = router_embed
        self.metrics = Metrics()
        self.observers: list[RequestObserver] = [self.metrics, *observers]
        self.admission = Admission(settings.max_queue)
        self.adapters = AdapterManager(
            engine,
            base,
            self.lookup,
            max_loaded=settings.max_loaded,
            metrics=self.metrics,
            queue_timeout=settings.queue_timeout,
        )
        self.default_adapter: str | None = None
        self.started_at = time.time()

    # -- the registry (blocking reads: call them off the event loop) ---------------------------------------

    def lookup(self, adapter_id: str) -> AdapterRecord:
        """The registry's record of ``adapter_id`` (a blocking read; the server calls it in a thread)."""
        record = self._registry_lookup(adapter_id)
        self.hide_path(record.path, f"<adapter {record.id}>")
        return record

    async def lookup_async(self, adapter_id: str) -> AdapterRecord:
        return await asyncio.to_thread(self.lookup, adapter_id)

    async def list_adapters_async(self) -> list[AdapterRecord]:
        return await asyncio.to_thread(self.list_adapters)

    # -- what a client may see -----------------------------------------------------------------------------

    def hide_path(self, path: Path | str, label: str) -> None:
        """Show ``label`` instead of ``path`` (and its resolved form) in every error a client gets."""
        self._hidden_paths[str(path)] = label
        with contextlib.suppress(OSError, RuntimeError):
            self._hidden_paths.setdefault(str(Path(path).resolve()), label)

    def public(self, message: str) -> str:
        """``message`` as a client may read it: ids and hashes, no server paths (the log keeps those)."""
        return redact_paths(message, list(self._hidden_paths.items()))

    # -- observation ---------------------------------------------------------------------------------------

    def observe(self, record: RequestRecord) -> None:
        record.ts = record.ts or time.time()
        for observer in self.observers:
            with contextlib.suppress(Exception):  # an observer must never take a request down
                observer.record(record)
        self.metrics.in_flight.set(self.admission.in_flight)

    # -- adapter names -------------------------------------------------------------------------------------

    def is_base_name(self, name: str) -> bool:
        return name in (self.base.name, self.base.base_model_hash)

    async def select(self, requested: str | None, prompt: str) -> Selection:
        if requested is None:
            return Selection(self.default_adapter, "default")
        if requested == AUTO:
            if self.router is None:
                raise InvalidInput(
                    "adapter 'auto' needs a router: start the server with --router NAME (see 'clara plugins')"
                )
            if not prompt.strip():
                raise InvalidInput("empty prompt; 'auto' routing needs the text to route")
            embed = self._router_embed() if self.router.needs_embeddings else None
            decision = await asyncio.to_thread(self.router.route, RouteRequest(prompt=prompt, embed=embed))
            return Selection(decision.adapter_id, "routed", float(decision.score), dict(decision.scores))
        if self.is_base_name(requested):
            return Selection(None, "named")
        return Selection(requested, "named")  # generation() checks it against the registry

    def _router_embed(self) -> EmbedFn:
        """Embeddings for the router (called from its worker thread): the engine's loaded base where the
        engine can embed, else ``router_embed`` (the base loaded once more, for engines that cannot)."""
        if self.router_embed is not None:
            return self.router_embed
        loop = asyncio.get_running_loop()
        engine = self.engine

        def embed(texts: Sequence[str], *, layer: int | None = None) -> list[list[float]]:
            return asyncio.run_coroutine_threadsafe(engine.embed(list(texts), layer=layer), loop).result()

        return embed

    def max_tokens_limit(self) -> int:
        return self.engine.capabilities.max_model_len or self.settings.max_tokens_limit

    # -- the one path of every generation ------------------------------------------------------------------

    async def generation(
        self,
        endpoint: str,
        request: GenerationRequest,
        requested: str | None,
        *,
        stream: bool,
        route_text: str | None = None,
    ) -> Generation:
        """Choose the adapter (``route_text``, what the user wrote, is what a router reads; default: the
        prompt), admit, hot-swap, check limits and start the engine's generation."""
        started = time.perf_counter()
        record = RequestRecord(
            request_id=request.request_id or uuid.uuid4().hex, endpoint=endpoint, status=0, stream=stream
        )
        request.request_id = record.request_id
        if not request.prompt or not request.prompt.strip():
            raise InvalidInput("the prompt is empty; send some text")
        check_text(request.prompt, "prompt")  # also what a chat template made of the messages
        for stop in request.stop:
            check_text(stop, "stop")
        limit = self.max_tokens_limit()
        if not 1 <= request.max_tokens <= limit:
            raise InvalidInput(f"max_tokens must be between 1 and {limit}, got {request.max_tokens}")
        selection = await self.select(requested, route_text or request.prompt)
        record.adapter_id, record.selection, record.route_score = (
            selection.adapter_id,
            selection.how,
            selection.score,
        )
        request.adapter_id = selection.adapter_id
        if selection.adapter_id is not None:
            # 404 / 422 before anything is reserved; a loaded adapter whose registry row changed is retired
            await self.adapters.current(selection.adapter_id)
        stack = AsyncExitStack()
        try:
            self.admission.enter()
            stack.callback(self.admission.leave)
            await stack.enter_async_context(self.adapters.use(selection.adapter_id))
            record.queue_seconds = time.perf_counter() - started
            await self.check_prompt_length(request.prompt, request.max_tokens, limit)
            chunks = self.engine.generate(request)
        except ClaraError as exc:
            await stack.aclose()
            self._refused(record, exc, started)
            raise
        except Exception as exc:
            await stack.aclose()
            error = EngineError(
                f"engine '{self.settings.engine_name}' failed to start the generation: "
                f"{type(exc).__name__}: {first_line(exc)}"
            )
            self._refused(record, error, started)
            raise error from exc
        except BaseException:
            await stack.aclose()
            raise
        self.metrics.in_flight.set(self.admission.in_flight)
        return Generation(self, record, selection, chunks, stack, started)

    async def check_prompt_length(self, prompt: str, max_tokens: int, limit: int) -> None:
        """Refuse a prompt that does not fit the context with ``max_tokens``, tokenising off the event loop.

        A prompt longer than :data:`PREFIX_CHARS_PER_TOKEN` characters per token of room is counted on that
        prefix first: when the prefix alone does not fit, the rest is never tokenised (a 1 MiB prompt costs
        a few milliseconds, not seconds of the tokenizer).
        """
        room = limit - max_tokens
        prefix = max(room, 1) * PREFIX_CHARS_PER_TOKEN
        if len(prompt) > prefix:
            head = await asyncio.to_thread(self.engine.count_tokens, prompt[:prefix])
            if head > room:
                raise InvalidInput(
                    f"the prompt ({len(prompt)} characters; its first {prefix} alone are {head} tokens) plus "
                    f"max_tokens ({max_tokens}) exceeds the context of {limit} tokens; send a shorter prompt"
                )
        prompt_tokens = await asyncio.to_thread(self.engine.count_tokens, prompt)
        if prompt_tokens > room:
            raise InvalidInput(
                f"prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the "
                f"context of {limit} tokens"
            )

    def _refused(self, record: RequestRecord, exc: ClaraError, started: float) -> None:
        """Record a request that ended before its generation started (queue full or timed out, limits), with
        the adapter it asked for; the error handler then does not record it again."""
        record.status, record.error_code = exc.http_status, exc.code
        record.latency_seconds = record.queue_seconds = time.perf_counter() - started
        exc._clara_observed = True  # type: ignore[attr-defined]
        self.observe(record)


def usage(chunk: GenerationChunk) -> dict[str, int]:
    return {
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
    }


async def closing(events: AsyncIterator[str], run: Generation) -> AsyncIterator[str]:
    """Yield ``events``; however the stream ends (done, error, client gone), release the generation."""
    try:
        async for event in events:
            yield event
    except ClaraError as exc:
        yield sse(error_body(exc.code, run.state.public(exc.message)))
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
        await run.finish(499, "client_closed")
