"""``clara serve --router embedding``: "auto" in a real server (transformers engine, tiny model) routes clear
prompts to their adapter and an unrelated prompt to the base, through /generate and the OpenAI API, embedding
with the engine's already loaded base; /metrics counts the decisions; a stale router is refused at start."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from clara_core.cli import ClaraContext, cli
from clara_core.errors import Conflict, NotFound
from clara_core.plugins import PluginManager
from clara_core.registry import Registry
from clara_core.workspace import Workspace

pytestmark = pytest.mark.slow

KEY = "route-secret"
#: three domains with texts that share no words: even a random-weight base tells them apart
TEXTS = {
    "steuer": ["Finanzamt Steuer Einkommensteuer Steuerbescheid Umsatzsteuer Steuerpflicht"],
    "sozial": ["Sozialhilfe Bürgergeld Leistungsberechtigte Regelbedarf Jobcenter Grundsicherung"],
    "verfahren": ["Widerspruch Klage Verwaltungsgericht Anhörung Frist Zustellung Vollstreckung"],
}
CLEAR = {
    "steuer": "Steuerbescheid vom Finanzamt zur Einkommensteuer",
    "sozial": "Regelbedarf beim Bürgergeld vom Jobcenter",
    "verfahren": "Klage beim Verwaltungsgericht nach dem Widerspruch",
}
UNRELATED = "12345 67890 ?!?! ... 0000"


def _cli(ws: Workspace, *args: str) -> str:
    obj = ClaraContext(workspace=ws.root, plugins=PluginManager())
    result = CliRunner().invoke(cli, list(args), obj=obj)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def routed_ws(tmp_path_factory: pytest.TempPathFactory, tiny_base_dir: Path) -> Workspace:
    from clara_core.tinymodels import random_lora_adapter

    root = tmp_path_factory.mktemp("route-serve")
    ws, _ = Workspace.init(root / "ws")
    with Registry.open(ws.registry_path) as registry:
        registry.add_base(tiny_base_dir, name="tiny", workspace=ws)
    data = []
    for i, (domain, texts) in enumerate(TEXTS.items()):
        made = random_lora_adapter(tiny_base_dir, root / "made" / domain, seed=i + 1)
        _cli(ws, "adapters", "register", str(made), "--domain", domain, "--base", "tiny")
        words = texts[0].split()
        file = root / f"{domain}.jsonl"
        # many short texts of the domain's words in changing order and number
        lines = [" ".join(words[j % len(words) :] + words[: j % len(words)][: j % 3]) for j in range(30)]
        file.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
        data += ["--data", f"{domain}={file}"]
    _cli(ws, "router", "fit", "--router", "embedding", "--threshold", "0.5", *data)
    return ws


@pytest.fixture(scope="module")
def server(routed_ws: Workspace) -> Iterator[Any]:
    from clara_core.serving.runner import BackgroundServer, prepare
    from clara_core.serving.state import ServeSettings

    settings = ServeSettings(max_loaded=3, api_key=KEY, router_name="embedding")
    state = prepare(
        routed_ws, PluginManager(), engine_name="transformers", base_name="tiny", settings=settings
    )
    with BackgroundServer(state) as background:
        yield background


@pytest.fixture
def client(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def test_the_cli_routes_clear_prompts_and_leaves_unrelated_ones_to_the_base(routed_ws: Workspace) -> None:
    for domain, prompt in CLEAR.items():
        decision = json.loads(_cli(routed_ws, "route", prompt, "--json"))
        assert decision["adapter_id"] == f"{domain}-lora-r4-v1", decision
    unrelated = json.loads(_cli(routed_ws, "route", UNRELATED, "--json"))
    state = json.loads(
        (routed_ws.metadata_dir / "routers" / "embedding" / "state" / "router.json").read_text()
    )
    assert unrelated["adapter_id"] is None, (unrelated, state["threshold"])


def test_auto_routes_in_generate_and_the_openai_api(client: httpx.Client) -> None:
    for domain, prompt in CLEAR.items():
        body = client.post("/generate", json={"prompt": prompt, "adapter_id": "auto", "max_tokens": 4}).json()
        assert body["adapter_id"] == f"{domain}-lora-r4-v1", body
        assert body["selection"] == "routed" and body["route"]["score"] > 0
        assert set(body["route"]["scores"]) == {f"{d}-lora-r4-v1" for d in TEXTS}
    body = client.post("/generate", json={"prompt": UNRELATED, "adapter_id": "auto", "max_tokens": 4}).json()
    assert body["adapter_id"] is None and body["selection"] == "routed", body

    chat = client.post(
        "/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": CLEAR["sozial"]}], "max_tokens": 4},
    ).json()
    assert (
        chat["model"] == "sozial-lora-r4-v1" and chat["clara"]["route"]["adapter_id"] == "sozial-lora-r4-v1"
    )
    completion = client.post(
        "/v1/completions", json={"model": "auto", "prompt": CLEAR["verfahren"], "max_tokens": 4}
    )
    assert completion.json()["clara"]["adapter_id"] == "verfahren-lora-r4-v1"

    empty = client.post("/generate", json={"prompt": "  ", "adapter_id": "auto", "max_tokens": 4})
    assert empty.status_code in (400, 422) and "prompt" in empty.json()["error"]["message"], empty.text

    metrics = client.get("/metrics").text
    counted = {
        line.split('adapter="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("clara_route_decisions_total{")
    }
    assert counted["sozial-lora-r4-v1"] >= 2 and counted["steuer-lora-r4-v1"] >= 1, counted
    health = client.get("/health").json()
    assert health["engine_details"]["base_loads"] == 1


def test_engine_embeddings_are_the_cli_embeddings(server: Any) -> None:
    """The router is fitted with the CLI's embedder and used with the engine's: they must agree, also with
    adapters loaded (runs after the routing test, which loaded all three)."""
    import asyncio

    from clara_core.routing import local_embedder

    state = server.state
    assert state.router_embed is None  # the engine embeds: no second copy of the base
    assert len(state.engine.loaded_adapters()) == 3
    texts = [CLEAR["steuer"], UNRELATED, "kurz"]
    local = local_embedder(state.base)
    for layer in (0, 1, None):  # the router's default layer, a stop after one layer, the last layer
        engine_vectors = asyncio.run(state.engine.embed(texts, layer=layer))  # on the engine's worker thread
        for a, b in zip(engine_vectors, local(texts, layer=layer), strict=True):
            assert a == pytest.approx(b, rel=1e-3, abs=1e-4), layer
    assert asyncio.run(state.engine.embed(texts)) == asyncio.run(state.engine.embed(texts, layer=-1))


def test_a_stale_or_unfitted_router_is_refused_at_start(
    tmp_path: Path, routed_ws: Workspace, fake_adapter: Any
) -> None:
    from clara_core.serving.runner import prepare
    from clara_core.serving.state import ServeSettings

    with pytest.raises(
        NotFound, match="router 'keyword' is not fitted yet; run 'clara router fit --router keyword'"
    ):
        prepare(
            routed_ws,
            PluginManager(),
            engine_name="transformers",
            base_name="tiny",
            settings=ServeSettings(router_name="keyword"),
        )
    import shutil

    shutil.copytree(routed_ws.root, tmp_path / "ws")  # a copy: the module's server keeps its own
    ws = Workspace.find(tmp_path / "ws")
    _cli(ws, "adapters", "register", str(fake_adapter("neu", seed=5)), "--domain", "bau", "--base", "tiny")
    with pytest.raises(
        Conflict,
        match="adapter 'bau-lora-r4-v1' was registered after the fit; run 'clara router fit --router embedding'",
    ):
        prepare(
            ws,
            PluginManager(),
            engine_name="transformers",
            base_name="tiny",
            settings=ServeSettings(router_name="embedding"),
        )
