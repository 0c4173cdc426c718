"""Server limits and routing on a real HTTP server with a fake engine and a fake router, registered into a
fresh plugin manager: requests are held open on purpose, so full queues, busy adapters and disconnects are
deterministic (no timing, no model)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
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
from clara_core.serving.runner import BackgroundServer, prepare
from clara_core.serving.state import ServeSettings
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
        self.load_order: list[str] = []
        self.release = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop = asyncio.new_event_loop()
        self.cancelled: list[str] = []
        self.started = 0

    async def start(self) -> None:
        self.started += 1
        self.release = asyncio.Event()
        self.unload_open = asyncio.Event()  # cleared by a test: unloads wait until it is set again
        self.unload_open.set()
        self.loop = asyncio.get_running_loop()

    async def load_adapter(self, adapter: Any) -> None:
        self.loaded.append(adapter.id)
        self.load_order.append(adapter.id)

    async def unload_adapter(self, adapter_id: str) -> None:
        await self.unload_open.wait()
        self.loaded.remove(adapter_id)

    def loaded_adapters(self) -> list[str]:
        return list(self.loaded)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        finished = False
        try:
            text = f"{request.adapter_id or 'base'}:{request.prompt}"
            if request.prompt == "fail":
                raise InvalidInput("this engine refuses the prompt 'fail'")
            if request.prompt == "crash":  # an engine failure after the first chunk
                yield GenerationChunk(text=text, prompt_tokens=1, completion_tokens=1)
                raise RuntimeError("the device fell over\nsecond line")
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
    # fitted the way 'clara router fit' does it: state and manifest in metadata/routers/keywords/
    from clara_core.routing import fit_router

    data = workspace_with_base.root / "texts.jsonl"
    data.write_text('{"text": "eine Frage"}\n')
    manager = PluginManager(load_entry_points=False)
    manager.register(FakePlugin(), name="fake")
    fit_router(
        workspace_with_base, manager, "keywords", data=dict.fromkeys(["steuer", "sozial", "verfahren"], data)
    )
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
    assert int(response.headers["Retry-After"]) >= 1
    assert "--max-queue" in response.json()["error"]["message"]
    for client, context, _ in held:
        context.__exit__(None, None, None)
        client.close()
    wait_for(lambda: in_flight(server.url) == 0)
    assert httpx.post(server.url + "/generate", json={"prompt": "x"}).json()["text"] == "base:x"


class Watch:
    """Snapshots of the adapter manager's queue, taken on the server's loop at every change: the test thread
    waits on a condition for a state instead of sleeping."""

    def __init__(self, server: BackgroundServer) -> None:
        self.manager = server.state.adapters
        self.condition = threading.Condition()
        self.waiting: list[str] = []
        self.draining: dict[str, str] = {}
        self.loading: list[str] = []
        self.evicting: set[str] = set()
        self.manager.on_change = self.changed

    def changed(self) -> None:
        with self.condition:
            self.waiting = [w.adapter_id for w in self.manager.waiters]
            self.draining = dict(self.manager.draining)
            self.loading = list(self.manager.loading)
            self.evicting = set(self.manager.evicting)
            self.condition.notify_all()

    def until(self, predicate: Callable[[Watch], bool]) -> None:
        with self.condition:
            assert self.condition.wait_for(lambda: predicate(self), timeout=30), vars(self)


def close(held: tuple[httpx.Client, Any, Any]) -> None:
    client, context, _ = held
    context.__exit__(None, None, None)
    client.close()


def test_a_request_for_an_unloaded_adapter_waits_for_the_lru_slot_instead_of_503(
    start: Callable, setup: tuple[Workspace, list[str]]
) -> None:
    ids = setup[1]
    server, plugin = start(max_loaded=2)
    watch = Watch(server)
    held = [open_stream(server.url, {"prompt": HOLD, "adapter_id": a}) for a in ids[:2]]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(
            httpx.post, server.url + "/generate", json={"prompt": "x", "adapter_id": ids[2]}
        )
        # it waits; ids[0], used longest ago, drains for it (no new requests), ids[1] keeps serving
        watch.until(lambda w: w.waiting == [ids[2]] and w.draining == {ids[0]: ids[2]})
        assert httpx.post(server.url + "/generate", json={"prompt": "y", "adapter_id": ids[1]}).json()[
            "text"
        ] == (f"{ids[1]}:y")
        health = httpx.get(server.url + "/health").json()["queue"]
        assert health["waiting"] == 1 and health["waiting_by_adapter"] == {ids[2]: 1}
        busy = httpx.post(server.url + "/unload_adapter", json={"adapter_id": ids[0]})
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "adapter_in_use"
        assert not waiting.done()
        close(held[0])  # ids[0]'s request ends: its slot goes to the waiting request
        response = waiting.result(timeout=30)
    assert response.status_code == 200 and response.json()["text"] == f"{ids[2]}:x"
    assert plugin.engines[0].loaded == [ids[1], ids[2]]
    close(held[1])
    metrics = httpx.get(server.url + "/metrics").text
    assert f'clara_adapter_queue_wait_seconds_count{{adapter="{ids[2]}"}} 1.0' in metrics
    assert f'clara_adapter_evictions_total{{adapter="{ids[0]}"}} 1.0' in metrics
    assert 'status="503"' not in metrics


def test_a_wait_past_the_queue_timeout_is_503_with_retry_after(
    start: Callable, setup: tuple[Workspace, list[str]]
) -> None:
    ids = setup[1]
    server, plugin = start(max_loaded=1, queue_timeout=0.2)
    held = open_stream(server.url, {"prompt": HOLD, "adapter_id": ids[0]})
    for path, body in (
        ("/generate", {"prompt": "x", "adapter_id": ids[1]}),
        ("/v1/completions", {"prompt": "x", "model": ids[1], "stream": True}),
        ("/load_adapter", {"adapter_id": ids[1]}),
    ):
        response = httpx.post(server.url + path, json=body)
        assert response.status_code == 503, path
        assert response.headers["Retry-After"] == "1"
        error = response.json()["error"]
        assert error["code"] == "queue_timeout"
        assert "--queue-timeout 0.2" in error["message"] and "--max-loaded 1" in error["message"]
    assert httpx.get(server.url + "/health").json()["queue"]["waiting"] == 0  # nothing left behind
    metrics = httpx.get(server.url + "/metrics").text
    assert f'clara_adapter_queue_timeouts_total{{adapter="{ids[1]}"}} 3.0' in metrics
    assert f'clara_requests_total{{adapter="{ids[1]}",endpoint="/generate",status="503"}} 1.0' in metrics
    close(held)
    assert httpx.post(server.url + "/generate", json={"prompt": "z", "adapter_id": ids[1]}).json()[
        "text"
    ] == (f"{ids[1]}:z")
    assert plugin.engines[0].loaded == [ids[1]]


def test_waiting_adapters_are_served_first_come_first_served_and_busy_ones_do_not_starve_them(
    start: Callable, setup: tuple[Workspace, list[str]]
) -> None:
    rare, other, busy = setup[1][1], setup[1][2], setup[1][0]
    server, plugin = start(max_loaded=1)
    watch = Watch(server)
    held = open_stream(server.url, {"prompt": HOLD, "adapter_id": busy})
    with concurrent.futures.ThreadPoolExecutor(4) as pool:

        def ask(adapter: str, prompt: str) -> concurrent.futures.Future:
            return pool.submit(
                httpx.post,
                server.url + "/generate",
                json={"prompt": prompt, "adapter_id": adapter},
                timeout=30,
            )

        first = ask(rare, "1")
        watch.until(lambda w: w.waiting == [rare] and w.draining == {busy: rare})
        second = ask(other, "2")
        watch.until(lambda w: w.waiting == [rare, other])
        # a new request for the loaded adapter queues behind the rare one instead of keeping its slot busy
        third = ask(busy, "3")
        watch.until(lambda w: w.waiting == [rare, other, busy])
        fourth = ask(rare, "4")  # joins the rare adapter's turn: one load serves both
        watch.until(lambda w: w.waiting == [rare, other, busy, rare])
        close(held)
        answers = [f.result(timeout=30) for f in (first, second, third, fourth)]
    assert [a.json()["text"] for a in answers] == [f"{rare}:1", f"{other}:2", f"{busy}:3", f"{rare}:4"]
    assert plugin.engines[0].load_order == [busy, rare, other, busy]


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
    import shutil

    shutil.rmtree(workspace.metadata_dir / "routers" / "keywords")
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


def test_engine_failure_counts_as_engine_error_not_client_closed(
    setup: tuple[Workspace, list[str]],
) -> None:
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
        failed = httpx.post(server.url + "/generate", json={"prompt": "crash", "adapter_id": ids[0]})
        assert failed.status_code == 500
        error = failed.json()["error"]
        assert error["code"] == "engine_error"
        assert error["message"] == (
            "engine 'holding' failed during generation: RuntimeError: the device fell over"
        )
        with httpx.stream(
            "POST", server.url + "/v1/completions", json={"model": ids[0], "prompt": "crash", "stream": True}
        ) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        assert events[0]["choices"][0]["text"] == f"{ids[0]}:crash"
        assert events[-1]["error"]["code"] == "engine_error"
        metrics = httpx.get(server.url + "/metrics").text
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(r["status"], r["error_code"], r["adapter_id"]) for r in lines] == [
        (500, "engine_error", ids[0]),
        (500, "engine_error", ids[0]),
    ]
    assert f'clara_engine_errors_total{{adapter="{ids[0]}"}} 2.0' in metrics
    assert f'clara_requests_total{{adapter="{ids[0]}",endpoint="/generate",status="500"}} 1.0' in metrics
    assert 'status="499"' not in metrics


def test_an_adapter_being_evicted_is_not_loaded_again_before_its_unload_ends(
    start: Callable, setup: tuple[Workspace, list[str]]
) -> None:
    a, b, c = setup[1]
    server, plugin = start(max_loaded=2)
    engine = plugin.engines[0]
    watch = Watch(server)
    for adapter in (a, c):  # both slots taken, a used longest ago, both idle
        assert (
            httpx.post(server.url + "/generate", json={"prompt": "x", "adapter_id": adapter}).status_code
            == 200
        )
    asyncio.run_coroutine_threadsafe(asyncio.sleep(0), engine.loop).result()
    engine.loop.call_soon_threadsafe(engine.unload_open.clear)
    asyncio.run_coroutine_threadsafe(asyncio.sleep(0), engine.loop).result()  # the clear has run
    with concurrent.futures.ThreadPoolExecutor(2) as pool:

        def ask(adapter: str) -> concurrent.futures.Future:
            return pool.submit(
                httpx.post, server.url + "/generate", json={"prompt": "y", "adapter_id": adapter}, timeout=30
            )

        for_b = ask(b)  # evicts a; the engine's unload of a hangs
        watch.until(lambda w: w.evicting == {a} and w.loading == [b])
        for_a = ask(a)  # c is idle, but a must not load while the engine still unloads it
        watch.until(lambda w: w.waiting == [b, a])  # b's request waits for its load, a's for a's unload
        assert watch.loading == [b] and watch.evicting == {a} and engine.load_order == [a, c]
        engine.loop.call_soon_threadsafe(engine.unload_open.set)
        answers = [for_b.result(timeout=30), for_a.result(timeout=30)]
    assert [r.json()["text"] for r in answers] == [f"{b}:y", f"{a}:y"]
    assert engine.load_order == [a, c, b, a] and sorted(engine.loaded) == sorted([b, a])
