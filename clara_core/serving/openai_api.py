"""OpenAI-compatible endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (with SSE).

``model`` is an adapter id, the base's name, or ``auto`` (with ``--router``), as vLLM does; the official
``openai`` client works unchanged. Responses carry a ``clara`` field with the adapter used (and the route).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt

from ..errors import InvalidInput
from ..types import GenerationChunk, GenerationRequest
from .params import Seed, Temperature, Text, TopP, check_text
from .state import AUTO, Generation, ServerState, closing, stop_list, usage
from .streaming import DisconnectAwareStream, sse


class _OpenAIBody(BaseModel):
    # Unknown OpenAI fields (user, logit_bias, ...) are accepted and ignored, as vLLM does.
    model_config = ConfigDict(extra="allow")

    model: Text
    max_tokens: StrictInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: Text | list[Text] | None = None
    seed: Seed | None = None
    stream: StrictBool = False
    n: StrictInt = 1
    stream_options: dict[str, Any] | None = None


class CompletionBody(_OpenAIBody):
    prompt: Text | list[Text]
    echo: StrictBool = False
    logprobs: StrictInt | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[dict[str, Any]] | None = None


class ChatBody(_OpenAIBody):
    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None


def _check_common(body: _OpenAIBody) -> None:
    if body.n != 1:
        raise InvalidInput(f"n={body.n} is not supported; send n=1 (one choice per request)")


def _message_text(message: ChatMessage) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidInput("only text content parts are supported in chat messages")
        parts.append(check_text(part["text"], "messages: a text part"))
    return "".join(parts)


def _model_name(state: ServerState, run: Generation) -> str:
    return run.selection.adapter_id or state.base.name


def add_openai_routes(app: FastAPI, state: ServerState) -> None:
    def model_for(requested: str) -> str | None:
        return requested  # adapter id, base name or auto: ServerState.select resolves all three

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(state.started_at)
        data = [
            {"id": state.base.name, "object": "model", "created": created, "owned_by": "clara", "root": None}
        ]
        loaded = set(state.adapters.loaded)
        for record in await state.list_adapters_async():
            if record.base_model_hash == state.base.base_model_hash:
                data.append(
                    {
                        "id": record.id,
                        "object": "model",
                        "created": created,
                        "owned_by": "clara",
                        "root": state.base.name,
                        "parent": state.base.name,
                        "loaded": record.id in loaded,
                    }
                )
        if state.router is not None:
            data.append(
                {"id": AUTO, "object": "model", "created": created, "owned_by": "clara", "root": None}
            )
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> Any:
        _check_common(body)
        if body.echo or body.logprobs:
            raise InvalidInput("echo and logprobs are not supported")
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise InvalidInput("send one prompt per request (a list with exactly one string)")
            prompt = prompt[0]
        request = GenerationRequest(
            prompt=prompt,
            max_tokens=16 if body.max_tokens is None else body.max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            stop=stop_list(body.stop),
            seed=body.seed,
        )
        run = await state.generation("/v1/completions", request, model_for(body.model), stream=body.stream)
        rid, created, model = f"cmpl-{run.record.request_id}", int(time.time()), _model_name(state, run)
        clara = run.selection.to_json()
        if not body.stream:
            text, last = await run.collect()
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [
                    {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}
                ],
                "usage": usage(last),
                "clara": clara,
            }
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def events() -> Any:
            last: GenerationChunk | None = None
            async for chunk in run.iterate():
                last = chunk
                yield sse(
                    {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": model,
                        "choices": [
                            {
                                "index": 0,
                                "text": chunk.text,
                                "logprobs": None,
                                "finish_reason": chunk.finish_reason,
                            }
                        ],
                        "clara": clara,
                    }
                )
            if include_usage and last is not None:
                yield sse(
                    {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage(last),
                    }
                )
            yield sse("[DONE]")

        return DisconnectAwareStream(closing(events(), run))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody) -> Any:
        _check_common(body)
        if not body.messages:
            raise InvalidInput("messages is empty; send at least one message")
        messages = [{"role": m.role, "content": _message_text(m)} for m in body.messages]
        if not any(m["content"].strip() for m in messages):
            raise InvalidInput("the prompt is empty; the messages hold no text")
        prompt = await asyncio.to_thread(state.engine.render_chat, messages)  # long messages: off the loop
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        request = GenerationRequest(
            prompt=prompt,
            max_tokens=256 if max_tokens is None else max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            stop=stop_list(body.stop),
            seed=body.seed,
            add_special_tokens=False,
        )
        # routing looks at what the user wrote, not at the rendered template
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), prompt)
        run = await state.generation(
            "/v1/chat/completions", request, model_for(body.model), stream=body.stream, route_text=last_user
        )
        rid, created, model = f"chatcmpl-{run.record.request_id}", int(time.time()), _model_name(state, run)
        clara = run.selection.to_json()
        if not body.stream:
            text, last = await run.collect()
            return {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": last.finish_reason,
                    }
                ],
                "usage": usage(last),
                "clara": clara,
            }
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def events() -> Any:
            base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
            yield sse(
                {
                    **base,
                    "choices": [
                        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    ],
                    "clara": clara,
                }
            )
            last: GenerationChunk | None = None
            async for chunk in run.iterate():
                last = chunk
                delta = {"content": chunk.text} if chunk.text else {}
                if not delta and chunk.finish_reason is None:
                    continue
                yield sse(
                    {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": chunk.finish_reason}]}
                )
            if include_usage and last is not None:
                yield sse({**base, "choices": [], "usage": usage(last)})
            yield sse("[DONE]")

        return DisconnectAwareStream(closing(events(), run))
