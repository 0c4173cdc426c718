"""The FastAPI app: clara's native API (``/generate``, adapters, ``/health``, ``/metrics``) for any engine.

:func:`create_app` takes a :class:`~clara_core.serving.state.ServerState` (a built, not yet started engine,
the served base, a registry lookup and the server's settings); the app starts the engine in its lifespan.
The shared state and the one generation path live in :mod:`.state`; the OpenAI-compatible routes in
:mod:`.openai_api`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ClaraError
from ..types import GenerationRequest
from .errors import PayloadTooLarge, RequestTimeout, Unauthorized, error_body
from .openai_api import add_openai_routes
from .params import Seed, Temperature, Text, TopP
from .requestlog import RequestRecord
from .state import ServerState, ServeSettings, closing, stop_list, usage
from .streaming import DisconnectAwareStream, sse

__all__ = ["LimitsMiddleware", "ServeSettings", "ServerState", "create_app"]

log = logging.getLogger("clara.serve")

# -- request bodies --------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterBody(_Strict):
    adapter_id: Text


class ActivateBody(_Strict):
    adapter_id: Text | None


class GenerateBody(_Strict):
    prompt: Text
    adapter_id: Text | None = None
    max_tokens: StrictInt = 64
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    stop: Text | list[Text] | None = None
    seed: Seed | None = None
    stream: StrictBool = False
    ignore_eos: StrictBool = False


# -- middleware ------------------------------------------------------------------------------------------------


def _json_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def _error_headers(exc: ClaraError) -> dict[str, str] | None:
    retry_after = getattr(exc, "retry_after", None)
    return {"Retry-After": str(retry_after)} if retry_after is not None else None


#: Sent with a 408: a client too slow to send its body is not waited for any longer.
_CLOSE = {"Connection": "close"}


class LimitsMiddleware:
    """API key (everything but ``/health``), body size limit and body deadline, before any body is parsed.

    The body is read here, counting the bytes that actually arrive (a ``Content-Length`` that says otherwise,
    or ``Transfer-Encoding: chunked`` beside it, changes nothing), and handed on only when complete and within
    the limit.
    """

    def __init__(
        self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int, read_timeout: float = 20.0
    ) -> None:
        self.app = app
        self.api_key = api_key.encode("utf-8") if api_key else None
        self.max_body_bytes = max_body_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.api_key is not None and scope["path"] != "/health":
            # compared as bytes: a header may carry any byte, and no byte of it may raise here
            given = next((v for k, v in scope["headers"] if k.lower() == b"authorization"), b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                error = Unauthorized(
                    "missing or wrong API key: send 'Authorization: Bearer <key>' (the server's --api-key)"
                )
                await _json_response(error.http_status, error.code, error.message)(scope, receive, send)
                return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length", "").strip()
        too_large = PayloadTooLarge(f"request body larger than the limit of {self.max_body_bytes} bytes")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await _json_response(too_large.http_status, too_large.code, too_large.message)(
                scope, receive, send
            )
            return
        if scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        if "json" not in headers.get("content-type", ""):
            # every body here is JSON; accept it from clients that leave the content type out (curl -d)
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"] + [
                (b"content-type", b"application/json")
            ]
        # read the body here, counting what arrives, up to the limit and the deadline, then replay it
        body = bytearray()
        try:
            async with asyncio.timeout(self.read_timeout):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # the client went away
                    body += message.get("body", b"")
                    if len(body) > self.max_body_bytes:
                        # the rest is discarded as it arrives, for --read-timeout at most (see .protocol)
                        await _json_response(too_large.http_status, too_large.code, too_large.message)(
                            scope, receive, send
                        )
                        return
                    if not message.get("more_body"):
                        break
        except TimeoutError:
            late = RequestTimeout(
                f"the request body did not arrive within {self.read_timeout:g} s (--read-timeout)"
            )
            await _json_response(late.http_status, late.code, late.message, _CLOSE)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# -- the app ---------------------------------------------------------------------------------------------------


def _route(request: Request) -> str:
    """The matched route's template (``/v1/completions``), or ``unmatched``: metric labels and logs never grow
    with the paths clients invent."""
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    # a bound of ours (a ValueError of a validator) says more than "not a string" of a union's other branch
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}"
    # union branches appear in the location as tags such as 'function-after[...]' or 'list[...]': not a field
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and "[" not in str(p)) or "body"
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

    def failed(
        request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> JSONResponse:
        state.observe(
            RequestRecord(
                request_id="", endpoint=_route(request), status=status, error_code=code, selection="none"
            )
        )
        return respond(status, code, message, headers)

    def respond(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        public = state.public(message)
        if public != message:  # the operator's log keeps the paths a client does not get
            log.warning("%s %s: %s", status, code, message)
        return _json_response(status, code, public, headers)

    @app.exception_handler(ClaraError)
    async def clara_error(request: Request, exc: ClaraError) -> JSONResponse:
        if getattr(exc, "_clara_observed", False):
            return respond(exc.http_status, exc.code, exc.message, _error_headers(exc))
        return failed(request, exc.http_status, exc.code, exc.message, _error_headers(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return failed(request, 422, "invalid_input", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return respond(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # a bug: the traceback goes to the server's log, the client gets the kind of error only
        log.error("internal error on %s", _route(request), exc_info=exc)
        return failed(
            request, 500, "internal_error", f"internal error ({type(exc).__name__}); see the server log"
        )

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
            "queue": {
                "in_flight": state.admission.in_flight,
                "max_queue": state.settings.max_queue,
                **state.adapters.queue(),
            },
            "router": state.settings.router_name,
            "capabilities": attrs.asdict(caps),
            # /health needs no API key: an engine's details (its model file, converted adapters) name ids
            "engine_details": _public(state, state.engine.health()),
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
        for record in await state.list_adapters_async():
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
                "usage": usage(last),
            }

        async def events() -> AsyncIterator[str]:
            async for chunk in run.iterate():
                event: dict[str, Any] = {"id": run.record.request_id, "text": chunk.text, **info}
                if chunk.finish_reason is not None:
                    event["finish_reason"] = chunk.finish_reason
                    event["usage"] = usage(chunk)
                yield sse(event)
            yield sse("[DONE]")

        return DisconnectAwareStream(closing(events(), run))

    add_openai_routes(app, state)
    app.add_middleware(
        LimitsMiddleware,
        api_key=state.settings.api_key,
        max_body_bytes=state.settings.max_body_bytes,
        read_timeout=state.settings.read_timeout,
    )
    return app


def _public(state: ServerState, value: Any) -> Any:
    """``value`` (an engine's health details) with every string as a client may read it: no server paths."""
    if isinstance(value, str):
        return state.public(value)
    if isinstance(value, dict):
        return {_public(state, k): _public(state, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_public(state, v) for v in value]
    return value
