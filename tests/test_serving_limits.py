"""Server limits and routing on a real HTTP server with a fake engine and a fake router, registered into a
fresh plugin manager: requests are held open on purpose, so full queues, busy adapters and disconnects are
deterministic (no timing, no model)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from clara_core import hookimpl
from clara_core.errors import InvalidInput
from clara_core.plugins import PluginManager
from clara_core.registry import AdapterDraft, Registry
from clara_core.serving.app import ServeSettings
from clara_core.serving.runner import BackgroundServer, prepare
from clara_core.types import (
    Engine,
    EngineCapabilities,
    EngineImpl,
    GenerationChunk,
    GenerationRequest,
    RouteDecision,
    Router,
    RouteRequest,
    RouterFitRequest,
    RouterImpl,
)
from clara_core.workspace import Workspace

HOLD = "hold"  # prompts starting with this wait until the test releases them


class HoldingEngine(EngineImpl):
    """Answers '<adapter>:<prompt>'; a prompt starting with HOLD streams one chunk, then waits for release."""

    capabilities = EngineCapabilities(mixed_adapter_batching=True, max_model_len=256)

    def __init__(self, base: Any, options: Any) -> None:
        self.loaded: list[str] = []
        self.release = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop = asyncio.new_event_loop()
        self.cancelled: list[str] = []
        self.started = 0

    async def start(self) -> None:
        self.started += 1
        self.release = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    async def load_adapter(self, adapter: Any) -> None:
        self.loaded.append(adapter.id)

    async def unload_adapter(self, adapter_id: str) -> None:
        self.loaded.remove(adapter_id)

    def loaded_adapters(self) -> list[str]:
        return list(self.loaded)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        finished = False
        try:
            text = f"{request.adapter_id or 'base'}:{request.prompt}"
            if request.prompt == "fail":
                raise InvalidInput("this engine refuses the prompt 'fail'")
            if request.prompt.startswith(HOLD):
                yield GenerationChunk(text=text, prompt_tokens=1, completion_tokens=1)
                await self.release.wait()
                text = ""
            finished = True
            yield GenerationChunk(text=text, finish_reason="stop", prompt_tokens=1, completion_tokens=2)
        finally:
            if not finished:
                self.cancelled.append(request.request_id)

    def render_chat(self, messages: Any) -> str:
        return "\n".join(m["content"] for m in messages)

    def count_tokens(self, text: str) -> int:
        return 1


class KeywordRouter(RouterImpl):
    """Routes prompts that mention a fitted keyword to its adapter, others to the base."""

    def __init__(self) -> None:
        self.keywords: dict[str, str] = {}

    def fit(self, request: RouterFitRequest) -> None:
        self.keywords = {a.domain[0]: a.id for a in request.adapters}

    def route(self, request: RouteRequest) -> RouteDecision:
        prompt = request.prompt
        scores = {aid: (0.9 if kw in prompt.lower() else 0.1) for kw, aid in self.keywords.items()}
        best = max(scores, key=lambda k: scores[k]) if scores else None
        if best is None or scores[best] < 0.5:
            return RouteDecision(None, 0.2, scores)
        return RouteDecision(best, scores[best], scores)

    def save(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "keywords.json").write_text(json.dumps(self.keywords))

    def load(self, state_dir: Path) -> None:
        self.keywords = json.loads((state_dir / "keywords.json").read_text())


class FakePlugin:
    engines: list[HoldingEngine]

    def __init__(self) -> None:
        self.engines = []

    def make(self, base: Any, options: Any) -> HoldingEngine:
        engine = HoldingEngine(base, options)
        self.engines.append(engine)
        return engine

    @hookimpl
    def register_engines(self, register: Callable) -> None:
        register(Engine("holding", self.make, "test engine that holds requests"))

    @hookimpl
    def register_routers(self, register: Callable) -> None:
        register(Router("keywords", KeywordRouter, "test router"))


@pytest.fixture
def setup(workspace_with_base: Workspace, fake_adapter: Callable[..., Path]) -> tuple[Workspace, list[str]]:
    from clara_core import hashing

    ids = []
    with Registry.open(workspace_with_base.registry_path) as registry:
        base = registry.get_base("tiny")
        for i, domain in enumerate(["steuer", "sozial", "verfahren"]):
            folder = fake_adapter(domain, seed=i)
            draft = AdapterDraft(
                domain=[domain],
                method="lora",
                rank=4,
                base_model_hash=base.base_model_hash,
                adapter_checksum=hashing.adapter_checksum(folder),
            )
            ids.append(registry.register_adapter(draft, folder, workspace_with_base, place="copy").id)
        router = KeywordRouter()
        router.fit(RouterFitRequest(adapters=registry.list_adapters(), base=base))
        router.save(workspace_with_base.metadata_dir / "routers" / "keywords")
    return workspace_with_base, ids


@pytest.fixture
def start(setup: tuple[Workspace, list[str]]) -> Iterator[Callable[..., tuple[BackgroundServer, FakePlugin]]]:
    servers: list[BackgroundServer] = []

    def run(**settings: Any) -> tuple[BackgroundServer, FakePlugin]:
        plugin = FakePlugin()
        manager = PluginManager(load_entry_points=False)
        manager.register(plugin, name="fake")
        state = prepare(
            setup[0], manager, engine_name="holding", base_name=None, settings=ServeSettings(**settings)
        )
        server = BackgroundServer(state).start()
        servers.append(server)
        return server, plugin

    yield run
    for server in servers:
        engine = server.state.engine
        assert isinstance(engine, HoldingEngine)
        engine.loop.call_soon_threadsafe(engine.release.set)  # let held requests end
        server.stop()


def open_stream(url: str, body: dict) -> tuple[httpx.Client, Any, Any]:
    """Start a streaming /generate and read its first event; the request stays open."""
    client = httpx.Client(base_url=url, timeout=30)
    context = client.stream("POST", "/generate", json={**body, "stream": True})
    response = context.__enter__()
    assert response.status_code == 200, response.read()
    lines = response.iter_lines()
    first = next(line for line in lines if line)
    assert first.startswith("data: ")
    return client, context, lines


def wait_for(predicate: Callable[[], bool]) -> None:
    for _ in range(500):
        if predicate():
            return
        time.sleep(0.01)
    pytest.fail("condition not reached")


def in_flight(url: str) -> int:
    return int(httpx.get(url + "/health").json()["queue"]["in_flight"])


def test_full_queue_answers_503_at_once_and_recovers(start: Callable) -> None:
    server, _ = start(max_queue=2)
    held = [open_stream(server.url, {"prompt": f"{HOLD} {i}"}) for i in range(2)]
    response = httpx.post(server.url + "/generate", json={"prompt": "x"}, timeout=5)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "queue_full"
    assert "--max-queue" in response.json()["error"]["message"]
    for client, context, _ in held:
        context.__exit__(None, None, None)
        client.close()
    wait_for(lambda: in_flight(server.url) == 0)
    assert httpx.post(server.url + "/generate", json={"prompt": "x"}).json()["text"] == "base:x"


def test_all_loaded_adapters_busy_refuses_a_new_one_then_evicts_lru(
    start: Callable, setup: tuple[Workspace, list[str]]
) -> None:
    ids = setup[1]
    server, plugin = start(max_loaded=2)
    held = [open_stream(server.url, {"prompt": HOLD, "adapter_id": a}) for a in ids[:2]]
    for path, body in (
        ("/generate", {"prompt": "x", "adapter_id": ids[2]}),
        ("/load_adapter", {"adapter_id": ids[2]}),
    ):
        response = httpx.post(server.url + path, json=body)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "adapters_busy"
        assert "--max-loaded" in response.json()["error"]["message"]
    busy = httpx.post(server.url + "/unload_adapter", json={"adapter_id": ids[0]})
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "adapter_in_use"
    # a loaded adapter still serves meanwhile
    assert httpx.post(server.url + "/generate", json={"prompt": "y", "adapter_id": ids[1]}).json()[
        "text"
    ] == (f"{ids[1]}:y")
    for client, context, _ in held:
        context.__exit__(None, None, None)
        client.close()
    wait_for(lambda: in_flight(server.url) == 0)
    response = httpx.post(server.url + "/generate", json={"prompt": "x", "adapter_id": ids[2]})
    assert response.json()["text"] == f"{ids[2]}:x"
    assert plugin.engines[0].loaded == [ids[1], ids[2]]  # ids[0] was used longest ago


def test_client_disconnect_closes_the_generation_and_frees_the_slot(start: Callable) -> None:
    server, plugin = start(max_queue=1)
    client, context, _ = open_stream(server.url, {"prompt": HOLD})
    assert in_flight(server.url) == 1
    context.__exit__(None, None, None)
    client.close()
    wait_for(lambda: in_flight(server.url) == 0)
    wait_for(lambda: len(plugin.engines[0].cancelled) == 1)
    assert httpx.post(server.url + "/generate", json={"prompt": "again"}).json()["text"] == "base:again"


def test_body_over_the_limit_is_413(start: Callable) -> None:
    server, _ = start(max_body_bytes=1000)
    response = httpx.post(server.url + "/generate", json={"prompt": "x" * 5000})
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}'

    response = httpx.post(
        server.url + "/generate", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert httpx.post(server.url + "/generate", json={"prompt": "small"}).status_code == 200


def test_auto_routes_through_the_router(start: Callable, setup: tuple[Workspace, list[str]]) -> None:
    ids = setup[1]
    server, _ = start(router_name="keywords")
    result = httpx.post(
        server.url + "/generate", json={"prompt": "Frage zur Steuer", "adapter_id": "auto"}
    ).json()
    assert result["adapter_id"] == ids[0] and result["selection"] == "routed"
    assert result["route"]["score"] == pytest.approx(0.9)
    assert set(result["route"]["scores"]) == set(ids)
    base = httpx.post(server.url + "/generate", json={"prompt": "Wetter morgen", "adapter_id": "auto"}).json()
    assert base["adapter_id"] is None and base["route"]["score"] == pytest.approx(0.2)
    completion = httpx.post(
        server.url + "/v1/completions", json={"model": "auto", "prompt": "sozial und so", "max_tokens": 4}
    ).json()
    assert completion["model"] == ids[1] and completion["clara"]["route"]["adapter_id"] == ids[1]
    chat = httpx.post(
        server.url + "/v1/chat/completions",
        json={
            "model": "auto",
            # the router reads what the user wrote last, not the system message or the rendered template
            "messages": [
                {"role": "system", "content": "Steuer"},
                {"role": "user", "content": "verfahren bitte"},
            ],
            "max_tokens": 4,
        },
    ).json()
    assert chat["model"] == ids[2] and chat["clara"]["selection"] == "routed"
    assert "auto" in {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
    metrics = httpx.get(server.url + "/metrics").text
    assert f'clara_route_decisions_total{{adapter="{ids[0]}"}} 1.0' in metrics


def test_router_that_is_not_fitted_is_a_clear_error(setup: tuple[Workspace, list[str]]) -> None:
    from clara_core.errors import ClaraError

    manager = PluginManager(load_entry_points=False)
    manager.register(FakePlugin(), name="fake")
    workspace = setup[0]
    (workspace.metadata_dir / "routers" / "keywords" / "keywords.json").unlink()
    (workspace.metadata_dir / "routers" / "keywords").rmdir()
    with pytest.raises(ClaraError, match="not fitted"):
        prepare(
            workspace,
            manager,
            engine_name="holding",
            base_name=None,
            settings=ServeSettings(router_name="keywords"),
        )
    with pytest.raises(ClaraError, match="unknown router 'nope'"):
        prepare(
            workspace,
            manager,
            engine_name="holding",
            base_name=None,
            settings=ServeSettings(router_name="nope"),
        )


def test_request_log_observer_writes_one_json_line_per_request(setup: tuple[Workspace, list[str]]) -> None:
    from clara_core.serving.requestlog import JsonlRequestLog

    workspace, ids = setup
    log_path = workspace.metadata_dir / "logs" / "requests.jsonl"
    manager = PluginManager(load_entry_points=False)
    manager.register(FakePlugin(), name="fake")
    state = prepare(
        workspace,
        manager,
        engine_name="holding",
        base_name=None,
        settings=ServeSettings(),
        observers=[JsonlRequestLog(log_path)],
    )
    with BackgroundServer(state) as server:
        assert (
            httpx.post(server.url + "/generate", json={"prompt": "a", "adapter_id": ids[0]}).status_code
            == 200
        )
        assert (
            httpx.post(
                server.url + "/generate", json={"prompt": "a", "adapter_id": "nicht-da-r1-v1"}
            ).status_code
            == 404
        )
        failed = httpx.post(server.url + "/generate", json={"prompt": "fail", "adapter_id": ids[1]})
        assert failed.status_code == 422 and "refuses" in failed.json()["error"]["message"]
        metrics = httpx.get(server.url + "/metrics").text
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(r["status"], r["adapter_id"]) for r in lines] == [(200, ids[0]), (404, None), (422, ids[1])]
    assert f'clara_requests_total{{adapter="{ids[1]}",endpoint="/generate",status="422"}} 1.0' in metrics
    assert lines[0]["completion_tokens"] == 2 and lines[0]["selection"] == "named" and lines[0]["request_id"]
