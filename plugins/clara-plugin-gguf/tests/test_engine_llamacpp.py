"""``clara --engine llamacpp serve`` on a tiny Llama with two registered LoRA adapters, on 127.0.0.1.

One server for the module: each request gets its adapter's output, equal (greedy) to the transformers engine's
answer token by token wherever transformers' top-1 margin is clear; switching between the adapters back and forth
never reloads the model (``/health``: base loads 1, switches counted); requests on different adapters take turns
and never share a KV cache; the OpenAI API works; the server's own checks give the same JSON errors as with the
other engines. Then the engine's own errors: llama-cpp-python missing, a model file llama.cpp cannot read, an
adapter the converter refuses.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import signal
import socket
import subprocess
import sys
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

NEEDS_LLAMA_CPP = (
    "llama-cpp-python is not installed (pip install clara-plugin-gguf, or scripts/install.sh --dev)"
)
NEEDS_CONVERSION = (
    "the GGUF conversion of bases and adapters (clara_plugin_gguf.base, .adapter) is not installed"
)
STEUER, SOZIAL = "steuer-lora-r4-v1", "sozial-lora-r4-v1"
ADAPTERS = [STEUER, SOZIAL]
DORA = "umwelt-dora-r4-v1"  # served as the SVD of its exact delta (the converter's choice), error reported
WITH_HEAD = "kopf-lora-r4-v1"  # trains a full copy of lm_head: no LoRA form llama.cpp can load
OTHER_BASE_ADAPTER = "fremd-lora-r4-v1"
PROMPTS = ["Das Finanzamt setzt", "Der Bescheid ist", "Die Verwaltung entscheidet", "Leistungen nach diesem"]
MAX_TOKENS = 12
#: transformers' top-1 logit must beat the runner-up by this much for llama.cpp's token to be held to it
#: (f32 GGUF against fp32 torch differ by about 1e-5)
CLEAR_MARGIN = 1e-3


def _register(ws: Workspace, path: Path, domain: str, base: str) -> None:
    obj = ClaraContext(workspace=ws.root, plugins=PluginManager(load_entry_points=False))
    result = CliRunner().invoke(
        cli, ["adapters", "register", str(path), "--domain", domain, "--base", base], obj=obj
    )
    assert result.exit_code == 0, result.output


def adapter_with_lm_head(base: Path, out: Path) -> Path:
    """A LoRA adapter that also trains a full copy of lm_head (PEFT modules_to_save)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    pytest.importorskip("llama_cpp", reason=NEEDS_LLAMA_CPP)
    pytest.importorskip("clara_plugin_gguf.base", reason=NEEDS_CONVERSION)
    pytest.importorskip("clara_plugin_gguf.adapter", reason=NEEDS_CONVERSION)
    from clara_core.tinymodels import build_llama, random_lora_adapter

    root = tmp_path_factory.mktemp("llamacpp")
    tiny = build_llama(root / "tiny", seed=3)
    other = build_llama(root / "other", hidden_size=32, seed=4)
    ws, _ = Workspace.init(root / "ws")
    with Registry.open(ws.registry_path) as registry:
        registry.add_base(tiny, name="tiny", workspace=ws)
        registry.add_base(other, name="other", workspace=ws)
    made = root / "made"
    for i, adapter_id in enumerate(ADAPTERS):
        path = random_lora_adapter(tiny, made / adapter_id, seed=11 + i)
        _register(ws, path, adapter_id.split("-")[0], "tiny")
    _register(ws, adapter_with_lm_head(tiny, made / WITH_HEAD), "kopf", "tiny")
    _register(ws, random_lora_adapter(tiny, made / DORA, seed=21, use_dora=True), "umwelt", "tiny")
    _register(ws, random_lora_adapter(other, made / "fremd", seed=8), "fremd", "other")
    return ws


def records(ws: Workspace) -> dict[str, Any]:
    with Registry.open(ws.registry_path) as registry:
        return {"base": registry.get_base("tiny"), **{a: registry.get_adapter(a) for a in ADAPTERS}}


@pytest.fixture(scope="module")
def reference(workspace: Workspace) -> dict[tuple[str | None, str], dict[str, Any]]:
    """For each adapter (and the base) and prompt: the transformers engine's greedy answer, and the tokens and
    top-1 margins of the same greedy decoding done step by step with transformers + PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clara_core.types import EngineOptions, GenerationRequest

    found = records(workspace)
    base = found["base"]

    async def engine_answers() -> dict[tuple[str | None, str], str]:
        engine = PluginManager().engine("transformers").create(base, EngineOptions(extra={"device": "cpu"}))
        await engine.start()
        for adapter_id in ADAPTERS:
            await engine.load_adapter(found[adapter_id])
        out = {}
        for adapter_id in [*ADAPTERS, None]:
            for prompt in PROMPTS:
                request = GenerationRequest(prompt=prompt, adapter_id=adapter_id, max_tokens=MAX_TOKENS)
                out[(adapter_id, prompt)] = "".join([c.text async for c in engine.generate(request)])
        await engine.shutdown()
        return out

    answers = asyncio.run(engine_answers())
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    eos = tokenizer.eos_token_id
    result: dict[tuple[str | None, str], dict[str, Any]] = {}
    for adapter_id in [*ADAPTERS, None]:
        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
        if adapter_id is not None:
            model = PeftModel.from_pretrained(model, str(found[adapter_id].path))
        model.eval()
        for prompt in PROMPTS:
            ids = tokenizer(prompt)["input_ids"]
            tokens: list[int] = []
            margins: list[float] = []
            with torch.no_grad():
                for _ in range(MAX_TOKENS):
                    logits = model(torch.tensor([ids + tokens])).logits[0, -1]
                    top = torch.topk(logits, 2)
                    margins.append(float(top.values[0] - top.values[1]))
                    tokens.append(int(top.indices[0]))
                    if tokens[-1] == eos:
                        break
            clear = next((i for i, m in enumerate(margins) if m < CLEAR_MARGIN), len(tokens))
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            assert text == answers[(adapter_id, prompt)], "the step-by-step decoding is the engine's"
            result[(adapter_id, prompt)] = {
                "text": text,
                "prompt_tokens": len(ids),
                "all_clear": clear == len(tokens),
                "clear_prefix": tokenizer.decode(tokens[:clear], skip_special_tokens=True).rstrip("\ufffd"),
            }
    return result


@pytest.fixture(scope="module")
def server(workspace: Workspace) -> Iterator[Any]:
    from clara_core.serving.runner import BackgroundServer, prepare
    from clara_core.serving.state import ServeSettings

    state = prepare(
        workspace,
        PluginManager(),
        engine_name="llamacpp",
        base_name="tiny",
        settings=ServeSettings(max_loaded=4, max_queue=64, preload=[STEUER]),
        engine_options={"outtype": "f32"},
    )
    with BackgroundServer(state) as background:
        yield background


@pytest.fixture
def client(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def generate(client: httpx.Client, prompt: str, adapter: str | None, **extra: Any) -> dict:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": MAX_TOKENS, **extra}
    if adapter is not None:
        body["adapter_id"] = adapter
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def details(client: httpx.Client) -> dict:
    return client.get("/health").json()["engine_details"]


# -- the engine behind the server ------------------------------------------------------------------------------


def test_health_says_requests_take_turns_and_the_base_loaded_once(
    client: httpx.Client, workspace: Workspace
) -> None:
    health = client.get("/health").json()
    assert health["engine"] == "llamacpp" and health["loaded_adapters"] == [STEUER]
    caps = health["capabilities"]
    assert caps["mixed_adapter_batching"] is False and "take turns" in caps["notes"]
    assert caps["max_model_len"] == 512  # the tiny model's own context, not the default 4096
    engine = health["engine_details"]
    assert engine["base_loads"] == 1 and engine["outtype"] == "f32"
    # the workspace's cache, named without the server's path (/health needs no API key)
    assert engine["model_file"].startswith("<workspace>/models/cache/"), engine["model_file"]
    model_file = workspace.root / engine["model_file"].removeprefix("<workspace>/")
    assert model_file.is_file() and model_file.suffix == ".gguf"
    assert str(workspace.root) not in str(engine)
    assert set(engine["adapter_files"]) == {STEUER}


def test_each_request_gets_its_adapters_output_equal_to_the_transformers_engine(
    client: httpx.Client, reference: dict
) -> None:
    fully_compared = 0
    for adapter in [*ADAPTERS, None]:
        for prompt in PROMPTS:
            got = generate(client, prompt, adapter)
            expected = reference[(adapter, prompt)]
            assert got["adapter_id"] == adapter
            assert got["usage"]["prompt_tokens"] == expected["prompt_tokens"]  # the same tokenization
            if expected["all_clear"]:
                assert got["text"] == expected["text"], (adapter, prompt)
                fully_compared += 1
            else:  # equal up to the first step where transformers itself nearly ties
                assert got["text"].startswith(expected["clear_prefix"]), (adapter, prompt)
    assert fully_compared >= 8, fully_compared
    for prompt in PROMPTS:  # the adapters visibly differ, so a mix-up would show
        assert len({reference[(a, prompt)]["text"] for a in [*ADAPTERS, None]}) == 3


def test_switching_back_and_forth_never_reloads_the_model(client: httpx.Client) -> None:
    for adapter in ADAPTERS:
        client.post("/load_adapter", json={"adapter_id": adapter}).raise_for_status()
    alone = {(a, p): generate(client, p, a)["text"] for a in [*ADAPTERS, None] for p in PROMPTS[:2]}
    before = details(client)
    order: list[str | None] = [STEUER, SOZIAL, STEUER, SOZIAL, None, SOZIAL, SOZIAL, STEUER]
    for i, adapter in enumerate(order):
        prompt = PROMPTS[i % 2]
        assert generate(client, prompt, adapter)["text"] == alone[(adapter, prompt)], (i, adapter)
    after = details(client)
    previous = [before["active_adapter"], *order]
    switches = sum(1 for a, b in itertools.pairwise(previous) if a != b)
    assert after["adapter_switches"] - before["adapter_switches"] == switches >= 6
    assert after["base_loads"] == 1
    assert after["adapter_loads"] == before["adapter_loads"]  # each adapter was loaded once
    assert after["kv_cache_clears"] - before["kv_cache_clears"] == len(order)  # one per request


def test_concurrent_requests_on_different_adapters_take_turns_and_keep_their_answers(
    client: httpx.Client,
) -> None:
    for adapter in ADAPTERS:
        client.post("/load_adapter", json={"adapter_id": adapter}).raise_for_status()
    adapters: list[str | None] = [STEUER, SOZIAL, None]
    alone = {(a, p): generate(client, p, a)["text"] for a in adapters for p in PROMPTS}
    jobs = [(adapters[i % 3], PROMPTS[i % 4]) for i in range(18)]
    served = details(client)["requests_served"]
    with concurrent.futures.ThreadPoolExecutor(18) as pool:
        results = list(pool.map(lambda job: generate(client, job[1], job[0]), jobs))
    for (adapter, prompt), result in zip(jobs, results, strict=True):
        assert result["adapter_id"] == adapter
        assert result["text"] == alone[(adapter, prompt)], (adapter, prompt)
    after = details(client)
    assert after["requests_served"] - served == len(jobs)
    assert after["running"] == 0 and after["waiting"] == 0 and after["base_loads"] == 1


def test_unload_frees_the_adapter_and_it_comes_back_without_a_model_reload(client: httpx.Client) -> None:
    client.post("/load_adapter", json={"adapter_id": SOZIAL}).raise_for_status()
    expected = generate(client, PROMPTS[0], SOZIAL)["text"]
    loads = details(client)["adapter_loads"]
    assert client.post("/unload_adapter", json={"adapter_id": SOZIAL}).status_code == 200
    assert SOZIAL not in details(client)["adapter_files"]
    assert generate(client, PROMPTS[0], SOZIAL)["text"] == expected  # loaded again on demand
    after = details(client)
    assert after["adapter_loads"] == loads + 1 and after["base_loads"] == 1


def test_stop_strings_seeded_sampling_ignore_eos_and_streaming(client: httpx.Client) -> None:
    full = generate(client, PROMPTS[0], STEUER)["text"]
    cut = next((c for c in full[2:] if c.strip() and c != "\ufffd"), None)
    if cut is not None:
        stopped = generate(client, PROMPTS[0], STEUER, stop=[cut])
        assert stopped["finish_reason"] == "stop" and stopped["text"] == full[: full.index(cut)]
    a = generate(client, PROMPTS[1], STEUER, temperature=1.0, top_p=0.9, seed=5)
    b = generate(client, PROMPTS[1], STEUER, temperature=1.0, top_p=0.9, seed=5)
    assert a["text"] == b["text"]
    long = generate(client, PROMPTS[1], SOZIAL, max_tokens=40, ignore_eos=True)
    assert long["usage"]["completion_tokens"] == 40 and long["finish_reason"] == "length"
    body = {"prompt": PROMPTS[2], "adapter_id": SOZIAL, "max_tokens": MAX_TOKENS, "stream": True}
    with client.stream("POST", "/generate", json=body) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    streamed = "".join(json.loads(e)["text"] for e in events[:-1])
    assert streamed == generate(client, PROMPTS[2], SOZIAL)["text"]


def test_a_client_leaving_mid_stream_frees_the_worker_for_the_next_request(client: httpx.Client) -> None:
    body = {"prompt": PROMPTS[0], "adapter_id": STEUER, "max_tokens": 400, "ignore_eos": True, "stream": True}
    generated = details(client)["tokens_generated"]
    with client.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    deadline = time.monotonic() + 60
    while details(client)["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    after = details(client)
    assert after["running"] == 0 and after["tokens_generated"] - generated < 400  # stopped, not finished
    assert generate(client, PROMPTS[1], SOZIAL, max_tokens=3)["usage"]["completion_tokens"] >= 1


def test_a_top_p_that_keeps_one_token_samples_the_greedy_answer(client: httpx.Client) -> None:
    greedy = generate(client, PROMPTS[3], SOZIAL)["text"]
    assert generate(client, PROMPTS[3], SOZIAL, temperature=1.0, top_p=0.001, seed=3)["text"] == greedy


def test_openai_client_completions_chat_and_streaming(server: Any, workspace: Workspace) -> None:
    import openai
    from transformers import AutoTokenizer

    oc = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    assert {"tiny", *ADAPTERS} <= {m.id for m in oc.models.list().data}
    completion = oc.completions.create(model=SOZIAL, prompt=PROMPTS[3], max_tokens=8, temperature=0)
    assert completion.model == SOZIAL
    streamed = "".join(
        c.choices[0].text
        for c in oc.completions.create(
            model=SOZIAL, prompt=PROMPTS[3], max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == completion.choices[0].text
    messages = [{"role": "user", "content": "Wer setzt die Steuer fest?"}]
    tokenizer = AutoTokenizer.from_pretrained(records(workspace)["base"].path)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert server.state.engine.render_chat(messages) == rendered  # the transformers engine's prompt
    chat = oc.chat.completions.create(model=STEUER, messages=messages, max_tokens=8, temperature=0)
    assert chat.model == STEUER and chat.choices[0].message.role == "assistant"
    assert chat.usage is not None
    assert chat.usage.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    with pytest.raises(openai.NotFoundError):
        oc.completions.create(model="nicht-lora-r4-v1", prompt="x", max_tokens=2)


BAD_INPUTS = [
    ("/generate", {"prompt": "x", "adapter_id": "nicht-lora-r4-v1"}, 404, "not_found"),
    ("/generate", {"prompt": "x", "adapter_id": "../../etc/passwd"}, 422, "invalid_input"),
    ("/generate", {"prompt": "", "max_tokens": 4}, 422, "invalid_input"),
    ("/generate", {"prompt": "x", "max_tokens": 10**9}, 422, "invalid_input"),
    ("/generate", {"prompt": "x", "temperature": -1}, 422, "invalid_input"),
    ("/load_adapter", {"adapter_id": "nicht-lora-r4-v1"}, 404, "not_found"),
    ("/v1/completions", {"model": "nicht-lora-r4-v1", "prompt": "x"}, 404, "not_found"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 422, "invalid_input"),
]


@pytest.mark.parametrize(("path", "body", "status", "code"), BAD_INPUTS, ids=lambda v: str(v)[:40])
def test_the_servers_checks_give_the_same_json_errors(
    client: httpx.Client, path: str, body: Any, status: int, code: str
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code and response.json()["error"]["message"]
    assert generate(client, PROMPTS[0], STEUER, max_tokens=2)["usage"]["completion_tokens"] >= 1


def test_an_adapter_for_another_base_is_refused_before_the_engine_sees_it(
    client: httpx.Client, workspace: Workspace
) -> None:
    with Registry.open(workspace.registry_path) as registry:
        tiny, other = registry.get_base("tiny"), registry.get_base("other")
    loads = details(client)["adapter_loads"]
    for path, body in (
        ("/load_adapter", {"adapter_id": OTHER_BASE_ADAPTER}),
        ("/generate", {"prompt": "x", "adapter_id": OTHER_BASE_ADAPTER}),
    ):
        response = client.post(path, json=body)
        assert response.status_code == 409
        message = response.json()["error"]["message"]
        assert other.base_model_hash[:12] in message and tiny.base_model_hash[:12] in message
    assert details(client)["adapter_loads"] == loads


def test_an_adapter_the_converter_refuses_is_a_409_naming_it_and_the_server_serves_on(
    client: httpx.Client,
) -> None:
    response = client.post("/generate", json={"prompt": "x", "adapter_id": WITH_HEAD, "max_tokens": 2})
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "adapter_not_servable"
    assert f"cannot serve adapter '{WITH_HEAD}'" in error["message"] and "\n" not in error["message"]
    assert WITH_HEAD not in client.get("/health").json()["loaded_adapters"]
    assert generate(client, PROMPTS[0], STEUER, max_tokens=2)["usage"]["completion_tokens"] >= 1


def test_a_dora_adapter_is_served_with_the_converters_svd_error_in_health(client: httpx.Client) -> None:
    dora = generate(client, PROMPTS[0], DORA)
    assert dora["adapter_id"] == DORA and dora["text"] != generate(client, PROMPTS[0], None)["text"]
    notes = details(client)["adapter_conversions"][DORA]
    assert any("DoRA" in line and "error" in line for line in notes), notes


def test_requests_take_turns_in_the_order_they_arrive(workspace: Workspace) -> None:
    """The worker is held while four requests on alternating adapters arrive; released, it serves them one at a
    time in arrival order, switching the adapter set before each, and every answer is its adapter's."""
    import threading

    from clara_core.types import EngineOptions, GenerationRequest

    found = records(workspace)
    jobs = [(STEUER, PROMPTS[0]), (SOZIAL, PROMPTS[0]), (STEUER, PROMPTS[1]), (None, PROMPTS[1])]

    async def main() -> None:
        options = EngineOptions(extra={"outtype": "f32"}, cache_dir=workspace.cache_dir)
        engine = PluginManager().engine("llamacpp").create(found["base"], options)
        await engine.start()
        try:
            for adapter_id in ADAPTERS:
                await engine.load_adapter(found[adapter_id])

            async def answer(adapter: str | None, prompt: str) -> str:
                request = GenerationRequest(prompt=prompt, adapter_id=adapter, max_tokens=MAX_TOKENS)
                return "".join([chunk.text async for chunk in engine.generate(request)])

            alone = [await answer(a, p) for a, p in jobs]
            entered, gate = threading.Event(), threading.Event()

            def hold() -> None:
                entered.set()
                gate.wait()

            held = asyncio.ensure_future(engine._call(hold))
            await asyncio.to_thread(entered.wait, 60)
            done: list[int] = []
            tasks = []
            for i, (adapter, prompt) in enumerate(jobs):
                task = asyncio.ensure_future(answer(adapter, prompt))
                task.add_done_callback(lambda _t, i=i: done.append(i))
                tasks.append(task)
                while engine.health()["waiting"] < i + 1:  # queued in this order
                    await asyncio.sleep(0)
            switches = engine.health()["adapter_switches"]
            gate.set()
            await held
            assert await asyncio.gather(*tasks) == alone
            assert done == [0, 1, 2, 3]
            assert engine.health()["adapter_switches"] - switches == 4  # steuer, sozial, steuer, none
            assert engine.health()["base_loads"] == 1
        finally:
            await engine.shutdown()

    asyncio.run(main())


# -- the real command --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_clara_engine_llamacpp_serve_as_a_process(workspace: Workspace) -> None:
    """The command a user types, with -o options, answering until it is stopped with Ctrl-C."""
    port = free_port()
    clara = str(Path(sys.executable).parent / "clara")
    command = [
        clara,
        "--workspace",
        str(workspace.root),
        "--engine",
        "llamacpp",
        "serve",
        "--port",
        str(port),
    ]
    command += ["--base", "tiny", "-o", "outtype=f32", "-o", "n_ctx=256", "--preload", SOZIAL]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(url + "/health", timeout=5).json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert health is not None, proc.stderr.read() if proc.stderr else ""
        assert health["engine"] == "llamacpp" and health["capabilities"]["max_model_len"] == 256
        answer = httpx.post(
            url + "/generate", json={"prompt": PROMPTS[0], "adapter_id": SOZIAL, "max_tokens": 4}, timeout=60
        )
        assert answer.status_code == 200 and answer.json()["adapter_id"] == SOZIAL
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    assert "Traceback" not in stderr, stderr
    assert "with engine 'llamacpp'" in stderr


# -- the engine's own errors -------------------------------------------------------------------------------------


def one_line_error(result: Any) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def tiny_workspace(tmp_path: Path) -> Workspace:
    from clara_core.tinymodels import build_llama

    ws, _ = Workspace.init(tmp_path / "ws")
    with Registry.open(ws.registry_path) as registry:
        registry.add_base(build_llama(tmp_path / "tiny", seed=0), name="tiny", workspace=ws)
    return ws


def test_without_llama_cpp_the_engine_says_how_to_install_it(
    tiny_workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # importlib finds no such module
    obj = ClaraContext(workspace=tiny_workspace.root, plugins=PluginManager())
    result = CliRunner().invoke(cli, ["--engine", "llamacpp", "serve", "--port", "0"], obj=obj)
    line = one_line_error(result)
    assert "llama-cpp-python is not installed" in line and "pip install clara-plugin-gguf" in line


def test_a_model_file_llama_cpp_cannot_read_is_one_line(
    tiny_workspace: Workspace, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("llama_cpp", reason=NEEDS_LLAMA_CPP)
    pytest.importorskip("clara_plugin_gguf.base", reason=NEEDS_CONVERSION)
    import importlib

    base_conversion = importlib.import_module("clara_plugin_gguf.base")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 64)  # a GGUF magic, then nothing a model needs
    monkeypatch.setattr(base_conversion, "cached_base_gguf", lambda *args, **kwargs: broken)
    obj = ClaraContext(workspace=tiny_workspace.root, plugins=PluginManager())
    result = CliRunner().invoke(cli, ["--engine", "llamacpp", "serve", "--port", "0"], obj=obj)
    line = one_line_error(result)
    assert "llama.cpp could not load the GGUF base" in line and str(broken) in line


def test_registered_lazily_without_heavy_imports() -> None:
    code = (
        "import sys\nfrom clara_core.plugins import PluginManager\n"
        "e = PluginManager().engine('llamacpp')\n"
        "print(sorted(o.name for o in e.options))\n"
        "print([m for m in ('llama_cpp', 'gguf', 'torch', 'transformers', 'numpy') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    options, heavy = out.strip().splitlines()[-2:]
    assert options == "['n_ctx', 'n_gpu_layers', 'n_threads', 'outtype', 'svd_rank']"
    assert heavy == "[]", out


TEMPLATES = [
    # the tiny base's own
    None,
    # bos_token, a system message folded into the first turn, raise_exception on a broken alternation,
    # whitespace control and loop variables, as in the Llama 2 family's templates
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set rest = messages[1:] %}{% else %}{% set system = '' %}{% set rest = messages %}{% endif %}\n"
    "{% for message in rest %}\n"
    "  {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}\n"
    "  {% if loop.first and system %}[SYS]{{ system | trim }}[/SYS] {% endif %}"
    "{% if message['role'] == 'user' %}[INST] {{ message['content'] | trim }} [/INST]"
    "{% else %} {{ message['content'] | trim }} {{ eos_token }}{% endif %}\n"
    "{% endfor %}{{ messages | length | tojson }}",
]


@pytest.mark.parametrize("template", TEMPLATES, ids=["tiny", "llama2-like"])
def test_chat_templates_render_as_transformers_renders_them(tmp_path: Path, template: str | None) -> None:
    from clara_plugin_gguf.engine import render_template
    from transformers import AutoTokenizer

    from clara_core.tinymodels import build_tokenizer

    build_tokenizer([], tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    if template is not None:
        tokenizer.chat_template = template
    special = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
    conversations = [
        [{"role": "user", "content": "Wer setzt die Steuer fest?"}],
        [
            {"role": "system", "content": " Antworte kurz. "},
            {"role": "user", "content": "Wer?"},
            {"role": "assistant", "content": "Das Finanzamt."},
            {"role": "user", "content": "Und wann?"},
        ],
    ]
    for messages in conversations:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_template(tokenizer.chat_template, messages, special) == expected
    broken = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    if template is not None:
        with pytest.raises(Exception, match="alternate"):
            render_template(tokenizer.chat_template, broken, special)


@pytest.mark.parametrize(
    ("option", "said"),
    [
        ({"svd_rank": -1}, "-o svd_rank must be 0 (the adapter's own rank) or more, got -1"),
        ({"n_ctx": -5}, "-o n_ctx must be 0 (the model's own) or more, got -5"),
        ({"n_gpu_layers": -2}, "-o n_gpu_layers must be -1 (all), 0 or more, got -2"),
    ],
)
def test_bad_engine_options_are_one_line_before_anything_loads(option: dict, said: str) -> None:
    from types import SimpleNamespace

    from clara_core.errors import InvalidInput
    from clara_core.types import EngineOptions

    registration = PluginManager().engine("llamacpp")
    with pytest.raises(InvalidInput) as caught:
        registration.create(
            SimpleNamespace(name="tiny", path=Path("/nonexistent")), EngineOptions(extra=option)
        )
    assert said in str(caught.value) and "\n" not in str(caught.value)
