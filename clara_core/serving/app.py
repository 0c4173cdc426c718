"""The FastAPI app: clara's native API (``/generate``, adapters, ``/health``, ``/metrics``) for any engine.

:func:`create_app` takes a built (not yet started) engine, the served base, a registry lookup and the
server's settings; the app starts the engine in its lifespan. :class:`ServerState` holds everything shared by
the endpoints, including :meth:`ServerState.generation`, the one path every generating endpoint (native and
OpenAI) goes through: adapter resolution (named, default, or routed), queue admission, hot-swap, limits,
the engine call, and one :class:`~clara_core.serving.requestlog.RequestRecord` per request for the observers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import attrs
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ClaraError, InvalidInput
from ..registry import AdapterRecord, BaseRecord
from ..types import EngineImpl, GenerationChunk, GenerationRequest, RouteRequest, RouterImpl
from .adapters import AdapterManager
from .admission import Admission
from .errors import PayloadTooLarge, Unauthorized, error_body
from .metrics import Metrics
from .requestlog import RequestObserver, RequestRecord
from .streaming import DisconnectAwareStream, sse

AUTO = "auto"


@attrs.define
class ServeSettings:
    """The server's knobs (``clara serve`` flags)."""

    max_loaded: int = 8
    max_queue: int = 64
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    #: Upper bound for ``max_tokens`` where the engine does not know its context length.
    max_tokens_limit: int = 4096
    engine_name: str = "transformers"
    router_name: str | None = None
    preload: list[str] = attrs.field(factory=list)


# -- request bodies --------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterBody(_Strict):
    adapter_id: StrictStr


class ActivateBody(_Strict):
    adapter_id: StrictStr | None


class GenerateBody(_Strict):
    prompt: StrictStr
    adapter_id: StrictStr | None = None
    max_tokens: StrictInt = 64
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    ignore_eos: StrictBool = False


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
        except BaseException:  # client gone (cancelled) or engine failure
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
    ) -> None:
        self.engine = engine
        self.base = base
        self.lookup = lookup
        self.list_adapters = list_adapters
        self.settings = settings
        self.router = router
        self.metrics = Metrics()
        self.observers: list[RequestObserver] = [self.metrics, *observers]
        self.admission = Admission(settings.max_queue)
        self.adapters = AdapterManager(
            engine, base, lookup, max_loaded=settings.max_loaded, metrics=self.metrics
        )
        self.default_adapter: str | None = None
        self.started_at = time.time()

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
            decision = await asyncio.to_thread(self.router.route, RouteRequest(prompt=prompt))
            return Selection(decision.adapter_id, "routed", float(decision.score), dict(decision.scores))
        if self.is_base_name(requested):
            return Selection(None, "named")
        self.lookup(requested)  # 404 / 422 before anything is reserved
        return Selection(requested, "named")

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
        stack = AsyncExitStack()
        self.admission.enter()
        stack.callback(self.admission.leave)
        try:
            await stack.enter_async_context(self.adapters.use(selection.adapter_id))
            record.queue_seconds = time.perf_counter() - started
            prompt_tokens = self.engine.count_tokens(request.prompt)
            if prompt_tokens + request.max_tokens > limit:
                raise InvalidInput(
                    f"prompt ({prompt_tokens} tokens) plus max_tokens ({request.max_tokens}) exceeds the "
                    f"context of {limit} tokens"
                )
            chunks = self.engine.generate(request)
        except BaseException:
            await stack.aclose()
            raise
        self.metrics.in_flight.set(self.admission.in_flight)
        return Generation(self, record, selection, chunks, stack, started)


# -- middleware ------------------------------------------------------------------------------------------------


def _json_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status)


class LimitsMiddleware:
    """API key (everything but ``/health``) and body size limit, before any body is parsed."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"] != "/health":
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                error = Unauthorized(
                    "missing or wrong API key: send 'Authorization: Bearer <key>' (the server's --api-key)"
                )
                await _json_response(error.http_status, error.code, error.message)(scope, receive, send)
                return
        length = headers.get("content-length")
        too_large = PayloadTooLarge(f"request body larger than the limit of {self.max_body_bytes} bytes")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await _json_response(too_large.http_status, too_large.code, too_large.message)(
                scope, receive, send
            )
            return
        if scope["method"] == "POST" and "json" not in headers.get("content-type", ""):
            # every body here is JSON; accept it from clients that leave the content type out (curl -d)
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"] + [
                (b"content-type", b"application/json")
            ]
        if length is not None or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        # no Content-Length (chunked upload): read the body here, up to the limit, then replay it
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await _json_response(too_large.http_status, too_large.code, too_large.message)(
                    scope, receive, send
                )
                return
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# -- the app ---------------------------------------------------------------------------------------------------


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}"
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    message = f"{loc}: {first.get('msg')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return message


def create_app(state: ServerState, *, manage_engine: bool = True) -> FastAPI:
    """The app for ``state``. With ``manage_engine`` its lifespan starts the engine, preloads and shuts the
    engine down (any ASGI server); :func:`clara_core.serving.runner.serve` does that itself instead, so that
    a failing start is one clear error rather than a server log."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            await state.engine.start()
            for adapter_id in state.settings.preload:
                await state.adapters.load(adapter_id)
        yield
        if manage_engine:
            await state.engine.shutdown()

    app = FastAPI(title="clara", version="0.1.0", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.clara = state

    def failed(request: Request, status: int, code: str, message: str) -> JSONResponse:
        state.observe(
            RequestRecord(
                request_id="", endpoint=request.url.path, status=status, error_code=code, selection="none"
            )
        )
        return _json_response(status, code, message)

    @app.exception_handler(ClaraError)
    async def clara_error(request: Request, exc: ClaraError) -> JSONResponse:
        if getattr(exc, "_clara_observed", False):
            return _json_response(exc.http_status, exc.code, exc.message)
        return failed(request, exc.http_status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return failed(request, 422, "invalid_input", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _json_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return failed(request, 500, "internal_error", f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        caps = state.engine.capabilities
        return {
            "status": "ok",
            "engine": state.settings.engine_name,
            "base": {"name": state.base.name, "base_model_hash": state.base.base_model_hash},
            "loaded_adapters": state.engine.loaded_adapters(),
            "default_adapter": state.default_adapter,
            "max_loaded": state.settings.max_loaded,
            "queue": {"in_flight": state.admission.in_flight, "max_queue": state.settings.max_queue},
            "router": state.settings.router_name,
            "capabilities": attrs.asdict(caps),
            "engine_details": state.engine.health(),
            "uptime_seconds": round(time.time() - state.started_at, 1),
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        state.metrics.in_flight.set(state.admission.in_flight)
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/adapters")
    async def adapters() -> dict[str, Any]:
        loaded = {a["id"]: a for a in state.adapters.describe()}
        available = []
        for record in state.list_adapters():
            if record.base_model_hash != state.base.base_model_hash:
                continue
            available.append(
                {
                    "id": record.id,
                    "domain": record.domain,
                    "method": record.method,
                    "rank": record.rank,
                    "loaded": record.id in loaded,
                }
            )
        return {
            "loaded": list(loaded.values()),
            "available": available,
            "default_adapter": state.default_adapter,
            "max_loaded": state.settings.max_loaded,
        }

    @app.post("/load_adapter")
    async def load_adapter(body: AdapterBody) -> dict[str, Any]:
        record, loaded_now = await state.adapters.load(body.adapter_id)
        return {
            "adapter_id": record.id,
            "loaded": True,
            "already_loaded": not loaded_now,
            "load_seconds": round(state.adapters.load_seconds.get(record.id, 0.0), 4),
            "loaded_adapters": list(state.adapters.loaded),
        }

    @app.post("/unload_adapter")
    async def unload_adapter(body: AdapterBody) -> dict[str, Any]:
        await state.adapters.unload(body.adapter_id)
        if state.default_adapter == body.adapter_id:
            state.default_adapter = None
        return {
            "adapter_id": body.adapter_id,
            "loaded": False,
            "loaded_adapters": list(state.adapters.loaded),
        }

    @app.post("/activate_adapter")
    async def activate_adapter(body: ActivateBody) -> dict[str, Any]:
        adapter_id = body.adapter_id
        if adapter_id is not None and state.is_base_name(adapter_id):
            adapter_id = None
        if adapter_id is not None:
            await state.adapters.load(adapter_id)
        state.default_adapter = adapter_id
        return {"default_adapter": adapter_id}

    @app.post("/generate")
    async def generate(body: GenerateBody) -> Any:
        request = GenerationRequest(
            prompt=body.prompt,
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=stop_list(body.stop),
            seed=body.seed,
            ignore_eos=body.ignore_eos,
        )
        requested = body.adapter_id
        run = await state.generation("/generate", request, requested, stream=body.stream)
        info = run.selection.to_json()
        if not body.stream:
            text, last = await run.collect()
            return {
                "id": run.record.request_id,
                "text": text,
                **info,
                "finish_reason": last.finish_reason,
                "usage": _usage(last),
            }

        async def events() -> AsyncIterator[str]:
            async for chunk in run.iterate():
                event: dict[str, Any] = {"id": run.record.request_id, "text": chunk.text, **info}
                if chunk.finish_reason is not None:
                    event["finish_reason"] = chunk.finish_reason
                    event["usage"] = _usage(chunk)
                yield sse(event)
            yield sse("[DONE]")

        return DisconnectAwareStream(_closing(events(), run))

    from .openai_api import add_openai_routes

    add_openai_routes(app, state)
    app.add_middleware(
        LimitsMiddleware, api_key=state.settings.api_key, max_body_bytes=state.settings.max_body_bytes
    )
    return app


def _usage(chunk: GenerationChunk) -> dict[str, int]:
    return {
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
    }


async def _closing(events: AsyncIterator[str], run: Generation) -> AsyncIterator[str]:
    """Yield ``events``; however the stream ends (done, error, client gone), release the generation."""
    try:
        async for event in events:
            yield event
    except ClaraError as exc:
        yield sse(error_body(exc.code, exc.message))
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
        await run.finish(499, "client_closed")
