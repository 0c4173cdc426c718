"""A real ``clara serve`` (transformers engine) on 127.0.0.1 with a tiny model and real PEFT adapters.

One server for the module: hot-swap without base reload, 32 concurrent requests over 4 adapters each getting
its own adapter's output, LRU eviction, hash and checksum refusals, API key, the openai client, metrics, and
every bad input, with the server still serving after each.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from clara_core.cli import ClaraContext, cli
from clara_core.plugins import PluginManager
from clara_core.registry import Registry
from clara_core.workspace import Workspace

pytestmark = pytest.mark.slow

KEY = "test-secret"
LORAS = ["steuer-lora-r4-v1", "sozial-lora-r4-v1", "verfahren-lora-r4-v1", "bau-lora-r4-v1"]
DORA = "umwelt-dora-r4-v1"
OTHER_BASE_ADAPTER = "fremd-lora-r4-v1"
TAMPERED = "kaputt-lora-r4-v1"
PROMPTS = ["Das Finanzamt setzt", "Der Bescheid ist", "Die Verwaltung entscheidet", "Leistungen nach diesem"]


def _register(ws: Workspace, path: Path, domain: str, base: str) -> None:
    obj = ClaraContext(workspace=ws.root, plugins=PluginManager(load_entry_points=False))
    result = CliRunner().invoke(
        cli, ["adapters", "register", str(path), "--domain", domain, "--base", base], obj=obj
    )
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def workspace_with_adapters(
    tmp_path_factory: pytest.TempPathFactory, tiny_base_dir: Path, other_base_dir: Path
) -> Workspace:
    from clara_core.tinymodels import random_lora_adapter

    root = tmp_path_factory.mktemp("serve")
    ws, _ = Workspace.init(root / "ws")
    with Registry.open(ws.registry_path) as registry:
        registry.add_base(tiny_base_dir, name="tiny", workspace=ws)
        registry.add_base(other_base_dir, name="other", workspace=ws)
    made = root / "made"
    for i, adapter_id in enumerate(LORAS):
        _register(
            ws,
            random_lora_adapter(tiny_base_dir, made / adapter_id, seed=i + 1),
            adapter_id.split("-")[0],
            "tiny",
        )
    _register(ws, random_lora_adapter(tiny_base_dir, made / DORA, seed=7, use_dora=True), "umwelt", "tiny")
    _register(ws, random_lora_adapter(other_base_dir, made / "fremd", seed=8), "fremd", "other")
    _register(ws, random_lora_adapter(tiny_base_dir, made / "kaputt", seed=9), "kaputt", "tiny")
    with Registry.open(ws.registry_path) as registry:
        tampered = registry.get_adapter(TAMPERED).path / "adapter_model.safetensors"
    data = bytearray(tampered.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the weights: the checksum no longer matches
    tampered.write_bytes(bytes(data))
    return ws


@pytest.fixture(scope="module")
def server(workspace_with_adapters: Workspace) -> Iterator[Any]:
    from clara_core.serving.runner import BackgroundServer, prepare
    from clara_core.serving.state import ServeSettings

    settings = ServeSettings(max_loaded=4, max_queue=256, api_key=KEY, preload=[LORAS[0]])
    state = prepare(
        workspace_with_adapters,
        PluginManager(),  # the installed plugins: clara-plugin-transformers provides the engine
        engine_name="transformers",
        base_name="tiny",
        settings=settings,
    )
    with BackgroundServer(state) as background:
        yield background


@pytest.fixture
def client(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def generate(
    client: httpx.Client, prompt: str, adapter: str | None, max_tokens: int = 10, **extra: Any
) -> dict:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, **extra}
    if adapter is not None:
        body["adapter_id"] = adapter
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    text = client.get("/metrics").text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def engine_details(client: httpx.Client) -> dict:
    return client.get("/health").json()["engine_details"]


def assert_still_serving(client: httpx.Client) -> None:
    assert (
        generate(client, PROMPTS[0], LORAS[0], max_tokens=2, ignore_eos=True)["usage"]["completion_tokens"]
        == 2
    )


# -- tests -----------------------------------------------------------------------------------------------------


def test_health_is_open_and_describes_the_server(server: Any) -> None:
    health = httpx.get(server.url + "/health").json()
    assert health["engine"] == "transformers"
    assert health["base"]["name"] == "tiny"
    assert LORAS[0] in health["loaded_adapters"]
    assert health["capabilities"]["mixed_adapter_batching"] is True
    assert health["queue"]["max_queue"] == 256
    assert health["engine_details"]["base_loads"] == 1


def test_api_key_is_required_everywhere_but_health(server: Any) -> None:
    for path in ("/adapters", "/v1/models", "/metrics"):
        response = httpx.get(server.url + path)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        wrong = httpx.get(server.url + path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
    response = httpx.post(server.url + "/generate", json={"prompt": "x", "max_tokens": 1})
    assert response.status_code == 401
    ok = httpx.get(server.url + "/adapters", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200


def test_hot_swap_loads_on_first_request_without_reloading_the_base(client: httpx.Client) -> None:
    before = engine_details(client)
    assert LORAS[1] not in client.get("/health").json()["loaded_adapters"]
    result = generate(client, PROMPTS[1], LORAS[1])
    assert result["adapter_id"] == LORAS[1]
    after = engine_details(client)
    assert LORAS[1] in client.get("/health").json()["loaded_adapters"]
    assert after["base_loads"] == before["base_loads"] == 1
    assert after["adapter_loads"] == before["adapter_loads"] + 1
    assert metric(client, "clara_adapter_loads_total", adapter=LORAS[1]) == 1


def test_32_concurrent_requests_over_4_adapters_each_get_their_own_output(client: httpx.Client) -> None:
    for adapter in LORAS:
        client.post("/load_adapter", json={"adapter_id": adapter}).raise_for_status()
    # each adapter alone, one request at a time (greedy)
    alone = {(a, p): generate(client, p, a, max_tokens=12)["text"] for a in LORAS for p in PROMPTS}
    for p in PROMPTS:  # the adapters differ, so a mix-up would show
        assert len({alone[(a, p)] for a in LORAS}) == len(LORAS)
    jobs = [(LORAS[i % 4], PROMPTS[(i // 4) % 4]) for i in range(32)]
    peak_before = engine_details(client)["peak_batch"]

    def run(job: tuple[str, str]) -> dict:
        return generate(client, job[1], job[0], max_tokens=12)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, jobs))
    for (adapter, prompt), result in zip(jobs, results, strict=True):
        assert result["adapter_id"] == adapter
        assert result["text"] == alone[(adapter, prompt)], (adapter, prompt)
    details = engine_details(client)
    assert details["peak_batch"] > max(1, peak_before // 2)  # requests really shared forward passes
    assert details["base_loads"] == 1


def test_dora_and_base_rows_in_a_mixed_load_match_running_alone(client: httpx.Client) -> None:
    adapters: list[str | None] = [LORAS[0], DORA, None, LORAS[1]]
    alone = {
        (a, p): generate(client, p, a or "tiny", max_tokens=10)["text"] for a in adapters for p in PROMPTS[:2]
    }
    assert alone[(DORA, PROMPTS[0])] != alone[(None, PROMPTS[0])]
    jobs = [(adapters[i % 4], PROMPTS[i % 2]) for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda j: generate(client, j[1], j[0] or "tiny", max_tokens=10), jobs))
    for (adapter, prompt), result in zip(jobs, results, strict=True):
        assert result["text"] == alone[(adapter, prompt)]
        assert result["adapter_id"] == adapter


def test_lru_evicts_the_least_recently_used_idle_adapter(client: httpx.Client) -> None:
    for adapter in LORAS:  # fill the 4 slots, in this order of use
        generate(client, PROMPTS[0], adapter, max_tokens=1)
    loaded = client.get("/health").json()["loaded_adapters"]
    assert sorted(loaded) == sorted(LORAS)
    evictions = metric(client, "clara_adapter_evictions_total", adapter=LORAS[0])
    generate(client, PROMPTS[0], DORA, max_tokens=2)  # a fifth adapter: LORAS[0] was used longest ago
    loaded = client.get("/health").json()["loaded_adapters"]
    assert LORAS[0] not in loaded and DORA in loaded and len(loaded) == 4
    assert metric(client, "clara_adapter_evictions_total", adapter=LORAS[0]) == evictions + 1
    generate(client, PROMPTS[0], LORAS[0], max_tokens=1)  # and it comes back on demand
    assert LORAS[1] not in client.get("/health").json()["loaded_adapters"]


def test_adapter_for_another_base_or_with_changed_files_is_refused(
    client: httpx.Client, workspace_with_adapters: Workspace
) -> None:
    with Registry.open(workspace_with_adapters.registry_path) as reg:
        tiny, other = reg.get_base("tiny"), reg.get_base("other")
        tampered = reg.get_adapter(TAMPERED)
    loaded_before = client.get("/health").json()["loaded_adapters"]
    for path, body in (
        ("/load_adapter", {"adapter_id": OTHER_BASE_ADAPTER}),
        ("/generate", {"prompt": "x", "adapter_id": OTHER_BASE_ADAPTER}),
    ):
        response = client.post(path, json=body)
        assert response.status_code == 409
        message = response.json()["error"]["message"]
        assert other.base_model_hash[:12] in message and tiny.base_model_hash[:12] in message
    response = client.post("/load_adapter", json={"adapter_id": TAMPERED})
    assert response.status_code == 409
    message = response.json()["error"]["message"]
    assert (tampered.adapter_checksum or "")[:12] in message and "changed" in message
    assert client.get("/health").json()["loaded_adapters"] == loaded_before
    assert metric(client, "clara_adapter_refusals_total", adapter=TAMPERED) >= 1
    assert_still_serving(client)


BAD_INPUTS = [
    ("/generate", {"prompt": "x", "adapter_id": "nicht-lora-r4-v1"}, 404, "not_found"),
    ("/generate", {"prompt": "x", "adapter_id": "../../etc/passwd"}, 422, "invalid_input"),
    ("/generate", {"prompt": "", "max_tokens": 4}, 422, "invalid_input"),
    ("/generate", {"prompt": "   ", "max_tokens": 4}, 422, "invalid_input"),
    ("/generate", {"prompt": "x", "max_tokens": -5}, 422, "invalid_input"),
    ("/generate", {"prompt": "x", "max_tokens": 0}, 422, "invalid_input"),
    ("/generate", {"prompt": "x", "max_tokens": 10**9}, 422, "invalid_input"),
    ("/generate", {"prompt": "x", "max_tokens": "many"}, 422, "invalid_input"),
    ("/generate", {"prompt": 42}, 422, "invalid_input"),
    ("/generate", {"prompt": "x", "temperature": -1}, 422, "invalid_input"),
    ("/generate", {"prompt": "x", "top_p": 0}, 422, "invalid_input"),
    ("/generate", {"prompt": "x", "stop": 3}, 422, "invalid_input"),
    ("/generate", {"prompt": "x", "stream": "yes"}, 422, "invalid_input"),
    ("/generate", {"prompt": "x", "adapter": "typo"}, 422, "invalid_input"),
    ("/generate", {"max_tokens": 3}, 422, "invalid_input"),
    ("/generate", {"prompt": "x", "adapter_id": "auto"}, 422, "invalid_input"),
    ("/generate", [1, 2], 422, "invalid_input"),
    ("/load_adapter", {"adapter_id": "nicht-lora-r4-v1"}, 404, "not_found"),
    ("/load_adapter", {}, 422, "invalid_input"),
    ("/unload_adapter", {"adapter_id": "nicht-lora-r4-v1"}, 404, "not_found"),
    ("/activate_adapter", {"adapter_id": "nicht-lora-r4-v1"}, 404, "not_found"),
    ("/v1/completions", {"model": "nicht-lora-r4-v1", "prompt": "x"}, 404, "not_found"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 2}, 422, "invalid_input"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -1}, 422, "invalid_input"),
    ("/v1/completions", {"prompt": "x"}, 422, "invalid_input"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 422, "invalid_input"),
    (
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]},
        422,
        "invalid_input",
    ),
    (
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": ""}]},
        422,
        "invalid_input",
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "code"), BAD_INPUTS, ids=lambda v: str(v)[:40])
def test_bad_input_gets_a_json_error_and_the_server_keeps_serving(
    client: httpx.Client, path: str, body: Any, status: int, code: str
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert_still_serving(client)


def test_malformed_json_unknown_route_and_oversized_body(client: httpx.Client) -> None:
    response = client.post(
        "/generate", content=b'{"prompt": "x",', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert "malformed JSON" in response.json()["error"]["message"]
    response = client.get("/nowhere")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    big = json.dumps({"prompt": "x" * (2 << 20)})
    response = client.post("/generate", content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
    assert_still_serving(client)


def test_activate_unload_and_adapters_listing(client: httpx.Client) -> None:
    assert (
        client.post("/activate_adapter", json={"adapter_id": LORAS[2]}).json()["default_adapter"] == LORAS[2]
    )
    result = generate(client, PROMPTS[0], None, max_tokens=6)
    assert result["adapter_id"] == LORAS[2] and result["selection"] == "default"
    assert result["text"] == generate(client, PROMPTS[0], LORAS[2], max_tokens=6)["text"]
    assert client.post("/activate_adapter", json={"adapter_id": None}).json()["default_adapter"] is None
    base = generate(client, PROMPTS[0], None, max_tokens=6)
    assert base["adapter_id"] is None
    assert base["text"] == generate(client, PROMPTS[0], "tiny", max_tokens=6)["text"]
    assert client.post("/unload_adapter", json={"adapter_id": LORAS[2]}).status_code == 200
    listing = client.get("/adapters").json()
    assert LORAS[2] not in [a["id"] for a in listing["loaded"]]
    available = {a["id"] for a in listing["available"]}
    assert set(LORAS) <= available and OTHER_BASE_ADAPTER not in available
    again = client.post("/unload_adapter", json={"adapter_id": LORAS[2]})
    assert again.status_code == 404


def test_stop_strings_and_seeded_sampling(client: httpx.Client) -> None:
    full = generate(client, PROMPTS[0], LORAS[0], max_tokens=12)["text"]
    cut = next((c for c in full[2:] if c.strip() and c != "\ufffd"), None)
    if cut is not None:
        stopped = generate(client, PROMPTS[0], LORAS[0], max_tokens=12, stop=[cut])
        assert stopped["finish_reason"] == "stop" and stopped["text"] == full[: full.index(cut)]
    a = generate(client, PROMPTS[1], LORAS[0], max_tokens=8, temperature=1.0, seed=5)
    b = generate(client, PROMPTS[1], LORAS[0], max_tokens=8, temperature=1.0, seed=5)
    assert a["text"] == b["text"]


def test_openai_client_completions_chat_and_streaming(server: Any, client: httpx.Client) -> None:
    import openai

    oc = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    ids = {m.id for m in oc.models.list().data}
    assert {"tiny", *LORAS} <= ids
    completion = oc.completions.create(model=LORAS[3], prompt=PROMPTS[2], max_tokens=8, temperature=0)
    assert completion.model == LORAS[3]
    assert completion.choices[0].text == generate(client, PROMPTS[2], LORAS[3], max_tokens=8)["text"]
    assert completion.usage is not None and 1 <= completion.usage.completion_tokens <= 8
    streamed = "".join(
        c.choices[0].text
        for c in oc.completions.create(
            model=LORAS[3], prompt=PROMPTS[2], max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == completion.choices[0].text
    messages = [{"role": "user", "content": "Wer setzt die Steuer fest?"}]
    chat = oc.chat.completions.create(model=LORAS[1], messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.model == LORAS[1]
    chunks = list(
        oc.chat.completions.create(
            model=LORAS[1],
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == chat.choices[0].message.content
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    base_chat = oc.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert base_chat.model == "tiny"
    with pytest.raises(openai.NotFoundError):
        oc.completions.create(model="nicht-lora-r4-v1", prompt="x", max_tokens=2)
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_client_disconnect_mid_stream_frees_its_slot(server: Any, client: httpx.Client) -> None:
    body = {
        "prompt": PROMPTS[0],
        "adapter_id": LORAS[0],
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as streamer,
        streamer.stream("POST", "/generate", json=body) as response,
    ):
        assert response.status_code == 200
        next(response.iter_lines())
        # leaving the block closes the connection mid-stream
    for _ in range(500):
        health = client.get("/health").json()
        if health["queue"]["in_flight"] == 0 and health["engine_details"]["running"] == 0:
            break
        time.sleep(0.01)
    else:
        pytest.fail(f"slot not freed: {health}")
    assert metric(client, "clara_requests_total", status="499") >= 1
    assert_still_serving(client)


def test_metrics_count_requests_tokens_latency_and_loads(client: httpx.Client) -> None:
    requests = metric(client, "clara_requests_total", endpoint="/generate", adapter=LORAS[0], status="200")
    tokens = metric(client, "clara_tokens_total", adapter=LORAS[0], kind="completion")
    latency = metric(client, "clara_request_latency_seconds_count", adapter=LORAS[0])
    generate(client, PROMPTS[3], LORAS[0], max_tokens=5, ignore_eos=True)
    assert (
        metric(client, "clara_requests_total", endpoint="/generate", adapter=LORAS[0], status="200")
        == requests + 1
    )
    assert metric(client, "clara_tokens_total", adapter=LORAS[0], kind="completion") == tokens + 5
    assert metric(client, "clara_request_latency_seconds_count", adapter=LORAS[0]) == latency + 1
    text = client.get("/metrics").text
    for name in (
        "clara_adapter_loads_total",
        "clara_time_to_first_token_seconds",
        "clara_in_flight_requests",
    ):
        assert re.search(rf"^{name}", text, re.M), name


def test_serve_and_query_runs_a_real_clara_serve_process(
    client: httpx.Client, workspace_with_adapters: Workspace
) -> None:
    from clara_core.serving.demo import serve_and_query

    queries = [(PROMPTS[0], LORAS[2]), (PROMPTS[1], None), (PROMPTS[2], DORA)]
    answers = serve_and_query(
        workspace_with_adapters.root, queries, base="tiny", max_tokens=6, echo=lambda line: None
    )
    for (prompt, adapter), answer in zip(queries, answers, strict=True):
        assert answer["adapter_id"] == adapter
        assert answer["text"] == generate(client, prompt, adapter or "tiny", max_tokens=6)["text"]


def test_more_adapters_than_slots_under_concurrent_load_all_answered_with_their_own_output(
    workspace_with_adapters: Workspace, client: httpx.Client
) -> None:
    """4 adapters, 2 slots, 24 concurrent requests: every request waits its turn for a slot (none refused)
    and gets exactly its own adapter's greedy answer (the module server, all 4 loaded, gives the reference)."""
    from clara_core.serving.runner import BackgroundServer, prepare
    from clara_core.serving.state import ServeSettings

    alone = {(a, p): generate(client, p, a, max_tokens=8)["text"] for a in LORAS for p in PROMPTS[:2]}
    for p in PROMPTS[:2]:
        assert len({alone[(a, p)] for a in LORAS}) == len(LORAS)
    state = prepare(
        workspace_with_adapters,
        PluginManager(),
        engine_name="transformers",
        base_name="tiny",
        settings=ServeSettings(max_loaded=2, max_queue=64),
    )
    jobs = [(LORAS[(i * 3) % 4], PROMPTS[(i // 4) % 2]) for i in range(24)]
    with BackgroundServer(state) as small, httpx.Client(base_url=small.url, timeout=120) as c:
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            results = list(pool.map(lambda j: generate(c, j[1], j[0], max_tokens=8), jobs))
        for (adapter, prompt), result in zip(jobs, results, strict=True):
            assert result["adapter_id"] == adapter
            assert result["text"] == alone[(adapter, prompt)], (adapter, prompt)
        assert metric(c, "clara_adapter_evictions_total") >= 2  # the 4 adapters really took turns
        for adapter in LORAS:
            assert metric(c, "clara_adapter_queue_wait_seconds_count", adapter=adapter) == 6
        assert metric(c, "clara_requests_total", status="200") == 24
        assert metric(c, "clara_requests_total", status="503") == 0
        health = c.get("/health").json()
        assert health["queue"]["waiting"] == 0 and len(health["loaded_adapters"]) == 2
