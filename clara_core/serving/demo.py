"""Start ``clara serve`` for a workspace, ask it some questions over HTTP, stop it (the quickstart's last step).

    from clara_core.serving.demo import serve_and_query
    answers = serve_and_query(workspace_root, [("Das Finanzamt", "steuerrecht-lora-r8-v1"), ("Hallo", None)])

The server is a real ``clara serve`` process on a free port of 127.0.0.1; it is stopped whatever happens.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ClaraError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def serve_and_query(
    workspace: Path | str,
    queries: Sequence[tuple[str, str | None]],
    *,
    engine: str | None = None,
    base: str | None = None,
    max_tokens: int = 32,
    max_loaded: int = 4,
    chat: bool = False,
    engine_options: Sequence[str] = (),
    router: str | None = None,
    startup_timeout: float = 300.0,
    echo: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Serve ``workspace``, send each ``(prompt, adapter_id)`` (``None``: the base) in one concurrent burst so
    the engine batches them, and return the answers (``prompt``, ``text``, ``adapter_id``, ``usage``,
    ``seconds``) in the order of ``queries``. Adapters are hot-swapped in on first use. With ``chat`` the
    prompt is a user message through the base's chat template (``/v1/chat/completions``, greedy), else a raw
    prompt (``/generate``, greedy). ``engine_options`` are ``NAME=VALUE`` strings (``clara serve -o``). With
    ``router`` the server routes (``clara serve --router NAME``): a query for adapter ``"auto"`` goes to the
    adapter it picks, and its answer has ``route`` (the chosen adapter, score and scores)."""
    import httpx

    out = echo or (lambda line: print(line, file=sys.stderr))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "clara_core.cli", "--workspace", str(workspace)]
    if engine:
        command += ["--engine", engine]
    command += ["serve", "--port", str(port), "--max-loaded", str(max_loaded)]
    if base:
        command += ["--base", base]
    for option in engine_options:
        command += ["-o", option]
    if router:
        command += ["--router", router]
    env = {k: v for k, v in os.environ.items() if k != "CLARA_API_KEY"}
    out(f"Starting clara {' '.join(command[3:])} ...")
    # The server's log goes to a file, not a pipe nobody reads while it runs (a full pipe would stall it).
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    error = log.read().strip().splitlines()
                    raise ClaraError(
                        f"clara serve did not start: {error[-1] if error else 'exit ' + str(proc.returncode)}"
                    )
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise ClaraError(f"clara serve did not answer on {url} within {startup_timeout:.0f} s")
                time.sleep(0.2)
            out(f"Server up on {url}; sending {len(queries)} request(s) ...")
            return _query_all(url, queries, max_tokens, chat)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _query_all(
    url: str, queries: Sequence[tuple[str, str | None]], max_tokens: int, chat: bool
) -> list[dict[str, Any]]:
    import asyncio

    import httpx

    async def run() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            base_name = (await client.get("/health")).json()["base"]["name"]

            async def one(prompt: str, adapter_id: str | None) -> dict[str, Any]:
                started = time.perf_counter()
                if chat:
                    response = await client.post(
                        "/v1/chat/completions",
                        json={
                            "model": adapter_id or base_name,
                            "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": max_tokens,
                            "temperature": 0,
                        },
                    )
                else:
                    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens}
                    if adapter_id is not None:
                        body["adapter_id"] = adapter_id
                    response = await client.post("/generate", json=body)
                if response.status_code != 200:
                    message = response.json().get("error", {}).get("message", response.text)
                    raise ClaraError(
                        f"query for adapter {adapter_id or 'base'} failed ({response.status_code}): {message}"
                    )
                answer = response.json()
                if chat:
                    answer = {
                        "text": answer["choices"][0]["message"]["content"],
                        "adapter_id": answer["clara"]["adapter_id"],
                        "finish_reason": answer["choices"][0]["finish_reason"],
                        "usage": answer["usage"],
                        "route": answer["clara"].get("route"),
                    }
                answer["seconds"] = round(time.perf_counter() - started, 3)
                answer["prompt"] = prompt
                return dict(answer)

            return list(await asyncio.gather(*(one(p, a) for p, a in queries)))

    return asyncio.run(run())
