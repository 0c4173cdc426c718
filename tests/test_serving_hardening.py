"""Issue 12, server side: what a hostile or broken client must not be able to do to ``clara serve``.

A real HTTP server on a free port of 127.0.0.1 with a probe engine registered into a fresh plugin manager:
the engine blocks or records where a test needs to see what the server does meanwhile (no timing, no model).
Raw sockets send what well-behaved HTTP clients never would.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import select
import socket
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from click.testing import CliRunner

from clara_core import hashing, hookimpl
from clara_core.cli import ClaraContext, cli
from clara_core.errors import Conflict
from clara_core.plugins import PluginManager
from clara_core.registry import AdapterDraft, Registry
from clara_core.serving.runner import BackgroundServer, prepare
from clara_core.serving.state import PREFIX_CHARS_PER_TOKEN, ServeSettings
from clara_core.types import Engine, EngineCapabilities, EngineImpl, GenerationChunk, GenerationRequest
from clara_core.workspace import Workspace

KEY = "s3cret-key"
CONTEXT = 256


class ProbeEngine(EngineImpl):
    """Answers '<adapter>:<prompt>'. ``count_tokens`` of a prompt starting with 'block' waits for the test;
    a prompt 'hold' streams one chunk and waits. Records every load and every length it tokenised."""

    capabilities = EngineCapabilities(mixed_adapter_batching=True, max_model_len=CONTEXT)

    def __init__(self, base: Any, options: Any) -> None:
        self.base_path = base.path
        self.loaded: list[str] = []
        self.loads: list[tuple[str, str | None]] = []
        self.counted: list[int] = []
        self.counting = threading.Event()
        self.release = threading.Event()

    async def start(self) -> None:
        pass

    async def load_adapter(self, adapter: Any) -> None:
        self.loads.append((adapter.id, adapter.adapter_checksum))
        self.loaded.append(adapter.id)

    async def unload_adapter(self, adapter_id: str) -> None:
        self.loaded.remove(adapter_id)

    def loaded_adapters(self) -> list[str]:
        return list(self.loaded)

    def health(self) -> dict[str, Any]:
        """Details like the llamacpp engine's: file paths, some nested, beside plain numbers."""
        return {
            "model_file": str(self.base_path / "model.gguf"),
            "adapter_files": {"a": ["/tmp/clara-cache/a.gguf", 3]},
            "loads": len(self.loads),
        }

    def count_tokens(self, text: str) -> int:
        self.counted.append(len(text))
        if text.startswith("block"):
            self.counting.set()
            self.release.wait(60)
        return len(text.split())

    def render_chat(self, messages: Any) -> str:
        return "\n".join(m["content"] for m in messages)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        text = f"{request.adapter_id or 'base'}:{request.prompt[:40]}"
        if request.prompt == "hold":
            yield GenerationChunk(text=text, prompt_tokens=1, completion_tokens=1)
            await asyncio.to_thread(self.release.wait, 60)
            text = ""
        yield GenerationChunk(text=text, finish_reason="stop", prompt_tokens=1, completion_tokens=2)


class ProbePlugin:
    @hookimpl
    def register_engines(self, register: Callable) -> None:
        register(Engine("probe", ProbeEngine, "test engine that blocks and records"))


@pytest.fixture
def ids(workspace_with_base: Workspace, fake_adapter: Callable[..., Path]) -> list[str]:
    made = []
    with Registry.open(workspace_with_base.registry_path) as registry:
        base = registry.get_base("tiny")
        for i, domain in enumerate(["steuer", "sozial"]):
            folder = fake_adapter(domain, seed=i)
            draft = AdapterDraft(
                domain=[domain],
                method="lora",
                rank=4,
                base_model_hash=base.base_model_hash,
                adapter_checksum=hashing.adapter_checksum(folder),
            )
            made.append(registry.register_adapter(draft, folder, workspace_with_base, place="copy").id)
    return made


@pytest.fixture
def start(workspace_with_base: Workspace, ids: list[str]) -> Iterator[Callable[..., BackgroundServer]]:
    servers: list[BackgroundServer] = []

    def run(**settings: Any) -> BackgroundServer:
        manager = PluginManager(load_entry_points=False)
        manager.register(ProbePlugin(), name="probe")
        state = prepare(
            workspace_with_base,
            manager,
            engine_name="probe",
            base_name=None,
            settings=ServeSettings(**{"api_key": KEY, **settings}),
        )
        server = BackgroundServer(state).start()
        servers.append(server)
        return server

    yield run
    for server in servers:
        engine(server).release.set()
        server.stop()


def engine(server: BackgroundServer) -> ProbeEngine:
    probe = server.state.engine
    assert isinstance(probe, ProbeEngine)
    return probe


def client(server: BackgroundServer, timeout: float = 30) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=timeout)


def raw_exchange(
    server: BackgroundServer,
    head: bytes,
    body: Iterator[bytes] = iter(()),
    timeout: float = 10,
    until_closed: bool = False,
) -> bytes:
    """Send ``head`` and then ``body`` on a raw socket; return the server's response (head and a body of its
    Content-Length), or what came before the server closed the connection (a send that fails because the
    server already answered and closed is fine). ``until_closed``: also wait for the server to close."""
    url = urlsplit(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=timeout) as sock:
        try:
            sock.sendall(head)
            for piece in body:
                sock.sendall(piece)
        except OSError:
            pass
        received = b""
        while True:
            if b"\r\n\r\n" in received:
                response_head, _, rest = received.partition(b"\r\n\r\n")
                lengths = [
                    int(line.split(b":", 1)[1])
                    for line in response_head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                ]
                if lengths and len(rest) >= lengths[0] and not until_closed:
                    return received
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                return received
            if not data:
                return received
            received += data


def metric_lines(c: httpx.Client) -> list[str]:
    return [line for line in c.get("/metrics").text.splitlines() if not line.startswith("#")]


# -- 1: authentication never fails open or loud, and /metrics does not grow with invented paths ----------------


def test_a_non_ascii_bearer_token_is_401_and_random_paths_do_not_grow_metrics(start: Callable) -> None:
    server = start()
    with client(server) as c, httpx.Client(base_url=server.url, timeout=30) as anonymous:
        assert c.post("/generate", json={"prompt": "x"}).status_code == 200
        before = metric_lines(c)
        for i in range(10):
            for token in (b"Bearer \xfc", b"Bearer \xff\xfe" + str(i).encode(), b"\xfc"):
                response = anonymous.post(f"/nowhere-{i}/x{i}", headers={"Authorization": token}, json={})
                assert response.status_code == 401, response.text
                assert response.json()["error"]["code"] == "unauthorized"
            response = anonymous.post("/v1/completions", headers={"Authorization": b"Bearer \xfc"}, json={})
            assert response.status_code == 401
            assert c.get(f"/random-{i}").status_code == 404  # with the key: unknown route, still no series
        assert metric_lines(c) == before
        bad = c.post("/generate", json={"prompt": 5})  # a failure on a real route: labelled by its template
        assert bad.status_code == 422
        assert any('endpoint="/generate"' in line and 'status="422"' in line for line in metric_lines(c))


# -- 2: the body limit counts bytes that arrive, whatever the headers claim -------------------------------------


def test_content_length_beside_chunked_transfer_does_not_bypass_the_body_limit(start: Callable) -> None:
    server = start(max_body_bytes=64 * 1024, read_timeout=1)
    head = (
        b"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    piece = b'{"prompt": "' + b"a" * 16 * 1024

    def chunks() -> Iterator[bytes]:
        for _ in range(64):  # 1 MiB, sixteen times the limit
            yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        yield b"0\r\n\r\n"

    answer = raw_exchange(server, head, chunks(), until_closed=True)  # and the server hangs up
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"payload_too_large" in answer  # the rest was discarded, and the connection closed after 1 s
    with client(server) as c:  # and the server serves on
        assert c.post("/generate", json={"prompt": "x"}).json()["text"] == "base:x"


# -- slow clients: a request head (and body) has a deadline -----------------------------------------------------


def test_a_client_that_never_finishes_its_request_head_or_body_is_cut_off(start: Callable) -> None:
    server = start(read_timeout=0.5)
    # a partial head: the server closes the connection after the deadline (the socket would wait 10 s)
    assert raw_exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ") == b""
    # a complete head, then a body that stops short of its Content-Length: 408
    head = (
        b"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    answer = raw_exchange(server, head, iter([b'{"prompt": "x']), until_closed=True)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout" in answer and b"connection: close" in answer.lower()
    # a body answered with 413 before it was read, then streamed on and on: discarded, and cut off
    url = urlsplit(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(head.replace(b"Content-Length: 100", b"Content-Length: " + str(10**12).encode()))
        assert sock.recv(65536).startswith(b"HTTP/1.1 413")
        closed = False
        for _ in range(400):  # the server hangs up after read_timeout (0.5 s); each turn waits 0.05 s at most
            try:
                sock.sendall(b"x" * 4096)
                readable, _, _ = select.select([sock], [], [], 0.05)
                if readable and sock.recv(65536) == b"":
                    closed = True
                    break
            except OSError:  # reset by the closed peer
                closed = True
                break
        assert closed
    with client(server) as c:  # keep-alive clients that do send are served as before
        for _ in range(3):
            assert c.get("/health").status_code == 200


# -- 3 and 5: parameters that would break the engine are 422 ---------------------------------------------------


@pytest.mark.parametrize(
    "path,base",
    [
        ("/generate", {"prompt": "x"}),
        ("/v1/completions", {"model": "tiny", "prompt": "x"}),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 8},
        ),
    ],
)
def test_sampling_parameters_out_of_bounds_are_422(start: Callable, path: str, base: dict) -> None:
    server = start()
    with client(server) as c:
        for bad in ({"temperature": 1e-45}, {"temperature": 5.5}, {"top_p": 1e-300}, {"top_p": 0}):
            response = c.post(path, json={**base, **bad})
            assert response.status_code == 422, (bad, response.text)
            assert next(iter(bad)) in response.json()["error"]["message"]
        for bad_seed in (2**64, 2**63, -(2**63) - 1):
            response = c.post(path, json={**base, "seed": bad_seed})
            assert response.status_code == 422 and "seed" in response.json()["error"]["message"]
        for good in (
            {"temperature": 0},
            {"temperature": 0.01, "seed": 2**63 - 1},
            {"top_p": 0.001, "seed": -1},
        ):
            assert c.post(path, json={**base, **good}).status_code == 200, good


def test_a_lone_surrogate_anywhere_in_the_text_is_422_not_500(start: Callable, ids: list[str]) -> None:
    server = start()
    bodies = {
        "/generate": [
            '{"prompt": "a\\ud800b"}',
            '{"prompt": "x", "stop": ["\\udfff"]}',
            '{"prompt": "x", "adapter_id": "\\ud800"}',
        ],
        "/v1/completions": [
            '{"model": "tiny", "prompt": ["\\ud800"]}',
            '{"model": "\\ud834", "prompt": "x"}',
        ],
        "/v1/chat/completions": [
            '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
            '{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
        ],
        "/load_adapter": ['{"adapter_id": "\\ud800"}'],
    }
    with client(server) as c:
        for path, raw_bodies in bodies.items():
            for body in raw_bodies:
                response = c.post(path, content=body.encode(), headers={"Content-Type": "application/json"})
                assert response.status_code == 422, (path, body, response.text)
                assert "surrogate" in response.json()["error"]["message"]
        assert c.post("/generate", json={"prompt": "x", "adapter_id": ids[0]}).status_code == 200


# -- 4: tokenising never stalls the event loop, and a huge prompt is refused on a prefix -----------------------


def test_tokenising_runs_off_the_event_loop(start: Callable) -> None:
    server = start()
    probe = engine(server)
    with client(server) as c, concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(c.post, "/generate", json={"prompt": "block me"})
        assert probe.counting.wait(30)
        try:
            health = httpx.get(server.url + "/health", timeout=5)  # answered while the tokenizer works
        finally:
            probe.release.set()
        assert health.status_code == 200
        assert pending.result(timeout=30).status_code == 200


def test_a_prompt_far_beyond_the_context_is_refused_without_tokenising_all_of_it(start: Callable) -> None:
    server = start()
    probe = engine(server)
    prompt = "Wort " * 200_000  # 1 MB of text, 200 000 tokens for a context of 256
    with client(server) as c:
        response = c.post("/generate", json={"prompt": prompt, "max_tokens": 16})
    assert response.status_code == 422
    assert "exceeds the context of 256 tokens" in response.json()["error"]["message"]
    assert probe.counted and max(probe.counted) <= (CONTEXT - 16) * PREFIX_CHARS_PER_TOKEN < len(prompt)


# -- 8: the server notices that a loaded id's registry row changed ---------------------------------------------


def test_a_loaded_adapter_whose_registry_row_changed_is_reloaded_or_refused(
    start: Callable, ids: list[str], workspace_with_base: Workspace
) -> None:
    server = start()
    probe = engine(server)
    first, second = ids
    with Registry.open(workspace_with_base.registry_path) as registry:
        other = registry.get_adapter(second)
    with client(server) as c:
        assert c.post("/generate", json={"prompt": "x", "adapter_id": first}).status_code == 200
        assert [i for i, _ in probe.loads] == [first]
        # the id now names other files (as after 'adapters rm' and a new adapter under a reused id)
        with sqlite3.connect(workspace_with_base.registry_path) as db:
            db.execute(
                "UPDATE adapters SET path = ?, adapter_checksum = ? WHERE id = ?",
                [other.stored_path, other.adapter_checksum, first],
            )
        assert c.post("/generate", json={"prompt": "x", "adapter_id": first}).status_code == 200
        assert probe.loads[-1] == (first, other.adapter_checksum)  # unloaded and loaded again: the new files
        assert probe.loaded.count(first) == 1
        # while a request still runs on the loaded weights, a request after a change waits its turn (503)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            held = pool.submit(c.post, "/generate", json={"prompt": "hold", "adapter_id": first})
            for _ in range(3000):
                if server.state.adapters.in_use.get(first):
                    break
                threading.Event().wait(0.01)
            with sqlite3.connect(workspace_with_base.registry_path) as db:
                db.execute("DELETE FROM adapters WHERE id = ?", [first])
            busy = c.post("/generate", json={"prompt": "x", "adapter_id": first})
            assert busy.status_code == 503 and busy.json()["error"]["code"] == "adapter_changed"
            probe.release.set()
            assert held.result(timeout=30).status_code == 200
        # removed from the registry: 404, and the old weights leave the engine
        gone = c.post("/generate", json={"prompt": "x", "adapter_id": first})
        assert gone.status_code == 404
        assert first not in probe.loaded


# -- 13: a locked registry does not stall the event loop -------------------------------------------------------


def test_health_answers_while_another_process_holds_the_registry_locked(
    start: Callable, ids: list[str], workspace_with_base: Workspace
) -> None:
    server = start()
    looking_up = threading.Event()
    inner = server.state._registry_lookup

    def lookup(adapter_id: str) -> Any:
        looking_up.set()
        return inner(adapter_id)

    server.state._registry_lookup = lookup
    lock = sqlite3.connect(workspace_with_base.registry_path, isolation_level=None)
    lock.execute("PRAGMA locking_mode=EXCLUSIVE")
    lock.execute("BEGIN EXCLUSIVE")  # as 'sqlite3 registry.db' in another terminal would
    try:
        with client(server, timeout=60) as c, concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(c.post, "/generate", json={"prompt": "x", "adapter_id": ids[0]})
            assert looking_up.wait(30)
            health = httpx.get(server.url + "/health", timeout=5)
            assert health.status_code == 200
            lock.close()
            assert pending.result(timeout=60).json()["text"] == f"{ids[0]}:x"
    finally:
        lock.close()


# -- 11 and 12: keys no client can send are refused at start ---------------------------------------------------


@pytest.mark.parametrize("key", ["schlüssel", " key", "key\n", "\tkey", "key\x7fx"])
def test_an_api_key_no_client_can_send_is_refused_at_start(workspace_with_base: Workspace, key: str) -> None:
    obj = ClaraContext(workspace=workspace_with_base.root, plugins=PluginManager(load_entry_points=False))
    for args, env in ((["serve", "--api-key", key], {}), (["serve"], {"CLARA_API_KEY": key})):
        result = CliRunner().invoke(cli, args, obj=obj, env=env)
        assert result.exit_code != 0
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "API key" in lines[0], result.output
        assert "Traceback" not in result.output


def test_an_empty_api_key_counts_as_no_key() -> None:
    from clara_core.commands.serve import api_key_setting

    assert api_key_setting("") is None and api_key_setting(None) is None
    assert api_key_setting("a-b_c.d~e+f/g=") == "a-b_c.d~e+f/g="


def test_serve_help_says_how_to_keep_the_key_out_of_the_process_list() -> None:
    result = CliRunner().invoke(cli, ["serve", "--help"], terminal_width=200)
    assert "CLARA_API_KEY" in result.output and "process list" in result.output
    assert "--read-timeout" in result.output


# -- 10: base weights changed after registration ---------------------------------------------------------------


def test_serve_refuses_a_base_whose_weights_changed_since_registration(
    workspace: Workspace, tiny_base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    base_dir = tmp_path / "base"
    shutil.copytree(tiny_base_dir, base_dir)
    with Registry.open(workspace.registry_path) as registry:
        registry.add_base(base_dir, name="tiny", workspace=workspace)
    manager = PluginManager(load_entry_points=False)
    manager.register(ProbePlugin(), name="probe")

    hashed: list[Path] = []
    real_sha256_file = hashing.sha256_file

    def counting(path: Path) -> str:
        hashed.append(path)
        return real_sha256_file(path)

    monkeypatch.setattr(hashing, "sha256_file", counting)
    prepare(workspace, manager, engine_name="probe", base_name=None, settings=ServeSettings())
    assert hashed == []  # unchanged: the registry's per-file hash cache answers, nothing is read

    weights = base_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the last tensor
    weights.write_bytes(bytes(data))
    said: list[str] = []
    with pytest.raises(Conflict) as refused:
        prepare(
            workspace,
            manager,
            engine_name="probe",
            base_name=None,
            settings=ServeSettings(),
            echo=said.append,
        )
    assert said == ["clara: hashing model.safetensors of base 'tiny' to check it against the registry ..."]
    message = str(refused.value)
    assert "changed since it was registered" in message
    assert f"clara base add {base_dir.resolve()} --name tiny-2" in message
    assert hashed == [weights.resolve()] or [p.name for p in hashed] == ["model.safetensors"]


def _json(response: httpx.Response) -> Any:
    return json.loads(response.text)


# -- 21: clients see ids and hashes, never the server's paths --------------------------------------------------


def test_error_bodies_name_ids_not_server_paths(
    start: Callable, ids: list[str], workspace_with_base: Workspace, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    server = start()
    with Registry.open(workspace_with_base.registry_path) as registry:
        folder = registry.get_adapter(ids[0]).path
    shutil.rmtree(folder)  # the adapter's files are gone: 409 that used to name their absolute path
    with client(server) as c:
        conflict = c.post("/generate", json={"prompt": "x", "adapter_id": ids[0]})
        assert conflict.status_code == 409
        message = conflict.json()["error"]["message"]
        assert f"<adapter {ids[0]}>" in message
        # the registry itself unreadable: its error used to name the registry's absolute path
        registry_db = workspace_with_base.registry_path
        registry_db.rename(registry_db.with_suffix(".aside"))
        registry_db.write_bytes(b"not a database at all, but long enough to be read as one" * 100)
        broken = c.post("/generate", json={"prompt": "x", "adapter_id": ids[1]})
        assert broken.status_code >= 400
        for response in (conflict, broken):
            text = response.text
            assert str(workspace_with_base.root) not in text and str(folder) not in text, text
            assert "/tmp" not in text and str(Path.home()) not in text, text
    assert any(str(folder) in record.getMessage() for record in caplog.records)  # the log keeps them


def test_health_needs_no_key_and_shows_no_server_paths(
    start: Callable, workspace_with_base: Workspace
) -> None:
    server = start()
    with httpx.Client(base_url=server.url, timeout=30) as c:  # no API key: /health is open
        response = c.get("/health")
    assert response.status_code == 200
    details = response.json()["engine_details"]
    assert details["model_file"] == "<base tiny>/model.gguf"
    assert details["adapter_files"] == {"a": ["<server path>", 3]} and details["loads"] == 0
    assert str(workspace_with_base.root) not in response.text and "/tmp" not in response.text


def test_redaction_keeps_routes_and_hides_paths() -> None:
    from clara_core.serving.errors import redact_paths

    message = "no chat template; use /v1/completions or /generate. Read /etc/hosts and '/tmp/x y/z'"
    assert redact_paths(message) == (
        "no chat template; use /v1/completions or /generate. Read <server path> and '<server path> y/z'"
    )
    assert redact_paths(
        "in /srv/ws/models/a/b", [("/srv/ws", "<workspace>"), ("/srv/ws/models/a", "<a>")]
    ) == ("in <a>/b")


# -- 7: the weights served under an id are the weights whose checksum was checked (real engine) ----------------


@pytest.mark.slow
def test_weights_swapped_after_the_check_are_refused_not_served(
    workspace_with_base: Workspace, tiny_base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from clara_core.serving import adapters as adapter_module
    from clara_core.tinymodels import random_lora_adapter

    made = {}
    with Registry.open(workspace_with_base.registry_path) as registry:
        base = registry.get_base("tiny")
        for seed, domain in ((1, "steuer"), (2, "sozial")):
            folder = random_lora_adapter(tiny_base_dir, tmp_path / domain, seed=seed)
            draft = AdapterDraft(
                domain=[domain],
                method="lora",
                rank=4,
                base_model_hash=base.base_model_hash,
                adapter_checksum=hashing.adapter_checksum(folder),
            )
            record = registry.register_adapter(draft, folder, workspace_with_base, place="copy")
            made[domain] = record
    victim, other = made["steuer"], made["sozial"]
    weights = victim.path / hashing.ADAPTER_WEIGHTS
    original = weights.read_bytes()
    state = prepare(
        workspace_with_base,
        PluginManager(),  # the installed transformers engine
        engine_name="transformers",
        base_name=None,
        settings=ServeSettings(api_key=KEY),
    )
    real_check = adapter_module.check_adapter_for_base
    swap = threading.Event()

    def check_then_swap(record: Any, base_record: Any) -> str:
        checksum = real_check(record, base_record)
        if (
            swap.is_set() and record.id == victim.id
        ):  # the other adapter's weights arrive right after the check
            shutil.copyfile(other.path / hashing.ADAPTER_WEIGHTS, weights)
        return checksum

    monkeypatch.setattr(adapter_module, "check_adapter_for_base", check_then_swap)
    body = {"prompt": "Das Finanzamt setzt", "max_tokens": 8, "ignore_eos": True}
    with BackgroundServer(state) as server, client(server, timeout=120) as c:
        own = c.post("/generate", json={**body, "adapter_id": victim.id}).json()["text"]
        foreign = c.post("/generate", json={**body, "adapter_id": other.id}).json()["text"]
        assert own != foreign
        assert c.post("/unload_adapter", json={"adapter_id": victim.id}).status_code == 200
        swap.set()
        refused = c.post("/generate", json={**body, "adapter_id": victim.id})
        assert refused.status_code == 409, refused.text
        assert "files changed since registration" in refused.json()["error"]["message"]
        assert victim.id not in c.get("/health").json()["loaded_adapters"]
        swap.clear()
        weights.write_bytes(original)
        assert c.post("/generate", json={**body, "adapter_id": victim.id}).json()["text"] == own
