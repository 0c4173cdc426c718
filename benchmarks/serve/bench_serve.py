"""Serving benchmark: mixed-adapter batching in clara against one-request-at-a-time adapter switching.

One run, same machine, same model, same requests (4 adapters, 32 concurrent requests, fixed prompt and output
lengths, greedy, ``ignore_eos`` so every answer has exactly the output length):

(a) ``clara serve`` (transformers engine), the 32 requests spread over the 4 adapters, all sent at once;
(b) a baseline that serves one request at a time with plain transformers + PEFT, switching the active adapter
    per request (``set_adapter`` then ``generate``);
(c) ``clara serve`` with the same 32 requests all on one adapter.

Also: time to load an adapter into the running server, to switch between loaded adapters (a 1-token request
alternating adapters), and to reload the whole model with another adapter (what Ollama and llama-cpp-python do).

    python benchmarks/serve/bench_serve.py [--quick] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ADAPTERS = 4
REQUESTS = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_workspace(root: Path, size: dict[str, int], rank: int) -> tuple[Path, list[str]]:
    from clara_core import hashing
    from clara_core.registry import AdapterDraft, Registry
    from clara_core.tinymodels import build_llama, random_lora_adapter
    from clara_core.workspace import Workspace

    ws, _ = Workspace.init(root / "ws")
    texts = [
        "Das Finanzamt setzt die Steuer fest. Der Bescheid ist schriftlich zu begründen. "
        "Gegen den Bescheid ist der Widerspruch zulässig. Leistungen nach diesem Buch erhalten "
        "erwerbsfähige Leistungsberechtigte. Die Behörde entscheidet nach pflichtgemäßem Ermessen."
    ] * 50
    base_dir = build_llama(root / "base", texts=texts, **size)
    ids = []
    with Registry.open(ws.registry_path) as registry:
        base = registry.add_base(base_dir, name="benchbase", workspace=ws)
        for i in range(ADAPTERS + 1):  # one extra for the hot-load measurement
            folder = random_lora_adapter(base_dir, root / f"made{i}", rank=rank, seed=i + 1, scale=0.05)
            draft = AdapterDraft(
                domain=[f"dom{i}"],
                method="lora",
                rank=rank,
                base_model_hash=base.base_model_hash,
                adapter_checksum=hashing.adapter_checksum(folder),
            )
            ids.append(registry.register_adapter(draft, folder, ws, place="move").id)
    return ws.root, ids


def prompt_of(tokenizer: Any, length: int) -> str:
    words = [
        "Das",
        "Finanzamt",
        "setzt",
        "die",
        "Steuer",
        "fest",
        "und",
        "der",
        "Bescheid",
        "ist",
        "schriftlich",
        "zu",
        "begründen",
    ]
    text = ""
    i = 0
    while len(tokenizer(text, add_special_tokens=True)["input_ids"]) < length:
        text += ("" if not text else " ") + words[i % len(words)]
        i += 1
    return text


async def fire(url: str, jobs: list[tuple[str, str]], out_tokens: int) -> tuple[float, int, list[str]]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one(adapter: str, prompt: str) -> dict:
            body = {"prompt": prompt, "adapter_id": adapter, "max_tokens": out_tokens, "ignore_eos": True}
            response = await client.post("/generate", json=body)
            response.raise_for_status()
            return response.json()

        started = time.perf_counter()
        results = await asyncio.gather(*(one(a, p) for a, p in jobs))
        elapsed = time.perf_counter() - started
    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    return elapsed, tokens, [r["text"] for r in results]


def run_server(workspace: Path, port: int, device: str, max_batch: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "CLARA_HOME": str(workspace)}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clara_core.cli",
            "serve",
            "--port",
            str(port),
            "--max-loaded",
            str(ADAPTERS + 1),
            "--max-queue",
            "256",
            "-o",
            f"device={device}",
            "-o",
            f"max_batch_size={max_batch}",
            "-o",
            f"threads={threads}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError("server did not come up")


def baseline(
    base_dir: Path, adapter_dirs: list[Path], jobs: list[tuple[int, str]], out_tokens: int, device: str
) -> tuple[float, int, list[str]]:
    """(b): plain transformers + PEFT, one request at a time, switching the active adapter per request."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32 if device == "cpu" else torch.bfloat16
    )
    model = model.to(device).eval()
    peft = PeftModel.from_pretrained(model, str(adapter_dirs[0]), adapter_name="a0")
    for i, folder in enumerate(adapter_dirs[1:], start=1):
        peft.load_adapter(str(folder), adapter_name=f"a{i}")
    peft.to(device).eval()
    texts = []
    started = time.perf_counter()
    tokens = 0
    with torch.no_grad():
        for adapter, prompt in jobs:
            peft.set_adapter(f"a{adapter}")
            ids = tokenizer(prompt, return_tensors="pt").to(device)
            out = peft.generate(
                **ids,
                max_new_tokens=out_tokens,
                min_new_tokens=out_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[0, ids["input_ids"].shape[1] :]
            tokens += int(new.shape[0])
            texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return time.perf_counter() - started, tokens, texts


def reload_time(base_dir: Path, adapter_dir: Path, device: str, repeats: int) -> float:
    """What switching costs where the model must be reloaded with the other adapter (up to its first
    forward pass, since safetensors are memory-mapped and read lazily)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=torch.float32 if device == "cpu" else torch.bfloat16
        )
        model = PeftModel.from_pretrained(model.to(device), str(adapter_dir)).eval()
        with torch.no_grad():  # weights are memory-mapped: the first forward is part of the reload
            model(input_ids=torch.tensor([[1, 2, 3]], device=device))
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        del model
    return statistics.median(times)


def load_versus_reload(root: Path, size: dict[str, int], rank: int, device: str) -> dict[str, float]:
    """On a larger base: hot-loading an adapter into the running engine (checksum and hash checks included) and
    switching between loaded adapters, against reloading base + adapter (Ollama / llama-cpp-python)."""
    import torch
    from clara_plugin_transformers.engine import TransformersEngine

    from clara_core import hashing
    from clara_core.checks import check_adapter_for_base
    from clara_core.registry import AdapterDraft, Registry
    from clara_core.tinymodels import build_llama, random_lora_adapter
    from clara_core.types import EngineOptions, GenerationRequest
    from clara_core.workspace import Workspace

    ws, _ = Workspace.init(root / "large-ws")
    base_dir = build_llama(root / "large-base", **size)
    with Registry.open(ws.registry_path) as registry:
        base = registry.add_base(base_dir, name="large", workspace=ws)
        records = []
        for i in range(2):
            folder = random_lora_adapter(base_dir, root / f"large-a{i}", rank=rank, seed=i, scale=0.05)
            draft = AdapterDraft(
                domain=[f"large{i}"],
                method="lora",
                rank=rank,
                base_model_hash=base.base_model_hash,
                adapter_checksum=hashing.adapter_checksum(folder),
            )
            records.append(registry.register_adapter(draft, folder, ws, place="move"))
    params = sum(f.stat().st_size for f in base_dir.glob("*.safetensors")) / 4

    async def engine_side() -> dict[str, float]:
        engine = TransformersEngine(
            base, EngineOptions(extra={"device": device, "threads": torch.get_num_threads()})
        )
        await engine.start()
        loads = []
        for record in records:
            started = time.perf_counter()
            check_adapter_for_base(record, base)
            await engine.load_adapter(record)
            loads.append(time.perf_counter() - started)

        async def one(adapter: str) -> float:
            started = time.perf_counter()
            async for _ in engine.generate(
                GenerationRequest(prompt="Das Finanzamt", adapter_id=adapter, max_tokens=1)
            ):
                pass
            return time.perf_counter() - started

        await one(records[0].id)
        alternating = statistics.median([await one(records[i % 2].id) for i in range(20)])
        same = statistics.median([await one(records[0].id) for _ in range(20)])
        await engine.shutdown()
        return {"hot_load": statistics.median(loads), "alternating": alternating, "same": same}

    measured = asyncio.run(engine_side())
    reload = reload_time(base_dir, records[1].path, device, 3)
    return {
        "large_base_params_millions": params / 1e6,
        "large_hot_load_seconds": measured["hot_load"],
        "large_request_seconds_alternating_adapters": measured["alternating"],
        "large_request_seconds_same_adapter": measured["same"],
        "large_reload_model_seconds": reload,
        "large_reload_over_hot_load": reload / measured["hot_load"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller model and shorter outputs (smoke run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--repeats", type=int, default=3, help="runs of (a) and (c); the best counts")
    parser.add_argument("--baseline-repeats", type=int, default=2, help="runs of (b); the best counts")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads for every side (0: torch's default)"
    )
    args = parser.parse_args()
    size = (
        {"hidden_size": 128, "intermediate_size": 256, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4}
        if args.quick
        else {
            "hidden_size": 512,
            "intermediate_size": 1408,
            "num_layers": 8,
            "num_heads": 8,
            "num_kv_heads": 8,
        }
    )
    out_tokens = 16 if args.quick else args.output_tokens
    rank = 16
    import httpx
    import torch
    from transformers import AutoTokenizer

    if args.threads > 0:
        torch.set_num_threads(args.threads)  # the baseline and reloads run in this process

    from clara_core.registry import Registry

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"building a {size} Llama and {ADAPTERS + 1} rank-{rank} LoRA adapters ...", file=sys.stderr)
        workspace, ids = build_workspace(root, size, rank)
        with Registry.open(workspace / "metadata" / "registry.db") as registry:
            base_dir = registry.get_base("benchbase").path
            adapter_dirs = [registry.get_adapter(i).path for i in ids]
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        prompt = prompt_of(tokenizer, args.prompt_tokens)
        prompt_tokens = len(tokenizer(prompt)["input_ids"])
        mixed_jobs = [(ids[i % ADAPTERS], prompt) for i in range(REQUESTS)]
        single_jobs = [(ids[0], prompt) for _ in range(REQUESTS)]

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = run_server(workspace, port, args.device, REQUESTS, args.threads)
        try:
            wait_ready(url, proc)
            for adapter in ids[:ADAPTERS]:
                httpx.post(
                    url + "/load_adapter", json={"adapter_id": adapter}, timeout=120
                ).raise_for_status()
            asyncio.run(fire(url, mixed_jobs[:8], 4))  # warm-up
            # (a) and (c) interleaved, best of `repeats` each, so that a noisy neighbour hurts both alike
            a_times, c_times = [], []
            for _ in range(args.repeats):
                a_time, a_tokens, a_texts = asyncio.run(fire(url, mixed_jobs, out_tokens))
                c_time, c_tokens, _ = asyncio.run(fire(url, single_jobs, out_tokens))
                a_times.append(a_time)
                c_times.append(c_time)
            a_time, c_time = min(a_times), min(c_times)
            # hot load of a fifth adapter into the running server
            started = time.perf_counter()
            loaded = httpx.post(url + "/load_adapter", json={"adapter_id": ids[ADAPTERS]}, timeout=120).json()
            hot_load = time.perf_counter() - started

            # switching between loaded adapters: 1-token requests, alternating vs. always the same
            def one_token(adapter: str) -> float:
                t = time.perf_counter()
                httpx.post(
                    url + "/generate",
                    json={"prompt": prompt, "adapter_id": adapter, "max_tokens": 1},
                    timeout=60,
                ).raise_for_status()
                return time.perf_counter() - t

            alternating = statistics.median(one_token(ids[i % ADAPTERS]) for i in range(40))
            same = statistics.median(one_token(ids[0]) for _ in range(40))
            health = httpx.get(url + "/health").json()
        finally:
            proc.terminate()
            proc.wait(30)

        b_jobs = [(i % ADAPTERS, prompt) for i in range(REQUESTS)]
        b_runs = [
            baseline(base_dir, adapter_dirs[:ADAPTERS], b_jobs, out_tokens, args.device)
            for _ in range(args.baseline_repeats)
        ]
        b_time, b_tokens, b_texts = min(b_runs, key=lambda run: run[0])
        reload = reload_time(base_dir, adapter_dirs[1], args.device, 3)
        same_answers = sum(x == y for x, y in zip(a_texts, b_texts, strict=True))
        large_size = (
            {"hidden_size": 256, "intermediate_size": 688, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4}
            if args.quick
            else {
                "hidden_size": 2048,
                "intermediate_size": 5632,
                "num_layers": 8,
                "num_heads": 16,
                "num_kv_heads": 16,
            }
        )
        print(f"load versus reload on a larger base {large_size} ...", file=sys.stderr)
        large = load_versus_reload(root, large_size, rank, args.device)

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.device}",
        "torch_threads": health["engine_details"].get("threads"),
        "model": size,
        "adapters": ADAPTERS,
        "rank": rank,
        "requests": REQUESTS,
        "prompt_tokens": prompt_tokens,
        "output_tokens": out_tokens,
        "repeats": {"a_and_c": args.repeats, "b": args.baseline_repeats},
        "a_mixed_tokens_per_s": a_tokens / a_time,
        "b_one_at_a_time_tokens_per_s": b_tokens / b_time,
        "c_single_adapter_tokens_per_s": c_tokens / c_time,
        "a_over_b": (a_tokens / a_time) / (b_tokens / b_time),
        "a_over_c": (a_tokens / a_time) / (c_tokens / c_time),
        "hot_load_seconds": hot_load,
        "hot_load_server_seconds": loaded.get("load_seconds"),
        "switch_request_seconds_alternating": alternating,
        "request_seconds_same_adapter": same,
        "reload_model_seconds": reload,
        "reload_over_hot_load": reload / hot_load,
        "greedy_answers_equal_to_baseline": f"{same_answers}/{REQUESTS}",
        **large,
        "base_loads": health["engine_details"]["base_loads"],
        "peak_batch": health["engine_details"]["peak_batch"],
    }
    print(json.dumps(result, indent=2))
    print(
        f"\n(a) mixed {result['a_mixed_tokens_per_s']:.0f} tok/s | (b) one at a time "
        f"{result['b_one_at_a_time_tokens_per_s']:.0f} tok/s | (c) one adapter "
        f"{result['c_single_adapter_tokens_per_s']:.0f} tok/s | a/b {result['a_over_b']:.1f}x (target >= 3) | "
        f"a/c {result['a_over_c']:.2f} (target >= 0.8)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
