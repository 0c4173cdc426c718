"""GGUF benchmark: export time, adapter switching in the llamacpp engine against reloading, and the engine's
tokens/s against plain llama-cpp-python.

One run, one machine, one base large enough that loading it is not free (a random Llama built locally, a few
hundred MB in f16; no hub), two rank-16 LoRA adapters on every linear projection:

(1) export: converting the base to GGUF (f16) and an adapter to a GGUF LoRA adapter, cold (nothing cached) and
    again (cached per base hash / adapter checksum);
(2) switching: in the llamacpp engine (base loaded once, both adapters loaded once), the latency of a 1-token
    request alternating between the adapters, against a 1-token request on the adapter it already has, and
    against reloading the model with the other adapter, ``Llama(model_path, lora_path=...)`` then the same
    1-token request (what llama-cpp-python, llama-server and Ollama need to change adapters);
(3) tokens/s: one request at a time (a 16-token prompt, 128 answer tokens, greedy, ``ignore_eos``) sent to a real
    ``clara --engine llamacpp serve`` process, against plain llama-cpp-python's own ``Llama.generate`` loop on the
    same GGUF base and adapter (``lora_path``) in this process, interleaved, best of ``--repeats`` each; both use
    the same threads and an f16 KV cache, and their greedy answers are compared.

    python benchmarks/gguf/bench_gguf.py [--quick] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
from bench_serve import free_port, wait_ready

TEXTS = [
    "Das Finanzamt setzt die Steuer fest. Der Bescheid ist schriftlich zu begründen. "
    "Gegen den Bescheid ist der Widerspruch zulässig. Leistungen nach diesem Buch erhalten "
    "erwerbsfähige Leistungsberechtigte. Die Behörde entscheidet nach pflichtgemäßem Ermessen."
] * 50
PROMPT = "Das Finanzamt setzt die Steuer fest und der Bescheid ist schriftlich zu begründen"


def build_workspace(root: Path, size: dict[str, int], rank: int) -> tuple[Path, Any, list[Any]]:
    from clara_core import hashing
    from clara_core.registry import AdapterDraft, Registry
    from clara_core.tinymodels import build_llama, random_lora_adapter
    from clara_core.workspace import Workspace

    ws, _ = Workspace.init(root / "ws")
    base_dir = build_llama(root / "base", texts=TEXTS, **size)
    records = []
    with Registry.open(ws.registry_path) as registry:
        base = registry.add_base(base_dir, name="benchbase", workspace=ws)
        for i in range(2):
            folder = random_lora_adapter(base_dir, root / f"made{i}", rank=rank, seed=i + 1, scale=0.05)
            draft = AdapterDraft(
                domain=[f"dom{i}"],
                method="lora",
                rank=rank,
                base_model_hash=base.base_model_hash,
                adapter_checksum=hashing.adapter_checksum(folder),
            )
            records.append(registry.register_adapter(draft, folder, ws, place="move"))
    return ws.root, base, records


def timed(fn: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def export_times(base: Any, adapter: Any, cache: Path) -> dict[str, Any]:
    from clara_plugin_gguf.adapter import cached_adapter_gguf
    from clara_plugin_gguf.base import cached_base_gguf

    def quiet(_line: str) -> None:
        pass

    base_cold, base_file = timed(lambda: cached_base_gguf(base, "f16", cache, echo=quiet))
    base_warm, _ = timed(lambda: cached_base_gguf(base, "f16", cache, echo=quiet))
    adapter_cold, adapter_file = timed(lambda: cached_adapter_gguf(adapter, base, cache, echo=quiet))
    adapter_warm, _ = timed(lambda: cached_adapter_gguf(adapter, base, cache, echo=quiet))
    return {
        "base_export_seconds": base_cold,
        "base_export_cached_seconds": base_warm,
        "base_gguf_mb": Path(base_file).stat().st_size / 1e6,
        "adapter_export_seconds": adapter_cold,
        "adapter_export_cached_seconds": adapter_warm,
        "adapter_gguf_mb": Path(adapter_file).stat().st_size / 1e6,
    }


def switching(base: Any, records: list[Any], cache: Path, threads: int, rounds: int) -> dict[str, Any]:
    """1-token requests in the engine (alternating adapters / the same one) against reloading with the other
    adapter."""
    import llama_cpp
    from clara_plugin_gguf.adapter import cached_adapter_gguf
    from clara_plugin_gguf.engine import LlamaCppEngine

    from clara_core.types import EngineOptions, GenerationRequest

    options = {"outtype": "f16", "n_ctx": 512, "n_threads": threads, "n_gpu_layers": 0}

    async def engine_side() -> dict[str, Any]:
        engine = LlamaCppEngine(base, EngineOptions(extra=options, cache_dir=cache))
        await engine.start()
        for record in records:
            await engine.load_adapter(record)

        async def one(adapter: str) -> float:
            started = time.perf_counter()
            async for _ in engine.generate(
                GenerationRequest(prompt=PROMPT, adapter_id=adapter, max_tokens=1)
            ):
                pass
            return time.perf_counter() - started

        async def set_only(adapter: str) -> float:  # the adapter-set call alone, on the engine's worker
            started = time.perf_counter()
            await engine._call(lambda: engine._set_adapter(adapter))
            return time.perf_counter() - started

        ids = [r.id for r in records]
        await one(ids[0])
        alternating = [await one(ids[i % 2]) for i in range(1, rounds + 1)]
        same = [await one(ids[0]) for _ in range(rounds)]
        set_calls = [await set_only(ids[i % 2]) for i in range(1, rounds + 1)]
        health = engine.health()
        await engine.shutdown()
        return {
            "alternating": statistics.median(alternating),
            "same": statistics.median(same),
            "set_call": statistics.median(set_calls),
            "base_loads": health["base_loads"],
            "switches": health["adapter_switches"],
            "model_file": health["model_file"],
            "base_load_seconds": health["base_load_seconds"],
        }

    measured = asyncio.run(engine_side())
    other = cached_adapter_gguf(records[1], base, cache, echo=lambda _line: None)
    reloads, reload_requests = [], []
    for _ in range(3):
        started = time.perf_counter()
        llm = llama_cpp.Llama(
            measured["model_file"],
            lora_path=str(other),
            n_ctx=512,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        loaded = time.perf_counter()
        tokens = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
        next(iter(llm.generate(tokens, top_k=1, temp=0.0, repeat_penalty=1.0)))
        reloads.append(loaded - started)
        reload_requests.append(time.perf_counter() - started)
        llm.close()
    reload = statistics.median(reloads)
    # what a switch adds to a request: the adapter-set call, and llama.cpp re-planning its graph for the new
    # adapter set at the next decode (never less than the call itself, whatever the noise)
    switch = max(measured["alternating"] - measured["same"], measured["set_call"])
    return {
        "engine_base_load_seconds": measured["base_load_seconds"],
        "request_seconds_alternating_adapters": measured["alternating"],
        "request_seconds_same_adapter": measured["same"],
        "switch_call_seconds": measured["set_call"],
        "switch_seconds": switch,
        "reload_with_other_adapter_seconds": reload,
        "reload_over_switch": reload / switch,
        "request_seconds_after_reload": statistics.median(reload_requests),
        "request_after_reload_over_alternating": statistics.median(reload_requests) / measured["alternating"],
        "engine_base_loads": measured["base_loads"],
        "engine_adapter_switches": measured["switches"],
    }


def run_server(workspace: Path, port: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "CLARA_HOME": str(workspace)}
    command = [sys.executable, "-m", "clara_core.cli", "--engine", "llamacpp", "serve", "--port", str(port)]
    command += ["-o", "outtype=f16", "-o", "n_ctx=512", "-o", f"n_threads={threads}"]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def throughput(
    workspace: Path, records: list[Any], base: Any, cache: Path, threads: int, out_tokens: int, repeats: int
) -> dict[str, Any]:
    import httpx
    import llama_cpp
    from clara_plugin_gguf.adapter import cached_adapter_gguf
    from clara_plugin_gguf.base import cached_base_gguf

    adapter = records[0]
    base_file = cached_base_gguf(base, "f16", cache, echo=lambda _line: None)
    adapter_file = cached_adapter_gguf(adapter, base, cache, echo=lambda _line: None)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = run_server(workspace, port, threads)
    plain = llama_cpp.Llama(
        str(base_file),
        lora_path=str(adapter_file),
        n_ctx=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    body = {"prompt": PROMPT, "adapter_id": adapter.id, "max_tokens": out_tokens, "ignore_eos": True}

    prompt_tokens: list[int] = []

    def served() -> tuple[float, int, str]:
        started = time.perf_counter()
        response = httpx.post(url + "/generate", json=body, timeout=600)
        response.raise_for_status()
        answer = response.json()
        prompt_tokens.append(answer["usage"]["prompt_tokens"])
        return time.perf_counter() - started, answer["usage"]["completion_tokens"], answer["text"]

    def library() -> tuple[float, int, str]:
        started = time.perf_counter()
        plain.reset()  # no prompt reuse from the previous run: the engine prefills every request too
        tokens = plain.tokenize(PROMPT.encode(), add_bos=False, special=True)
        out: list[int] = []
        for token in plain.generate(tokens, top_k=1, temp=0.0, repeat_penalty=1.0):
            out.append(token)
            if len(out) == out_tokens:
                break
        elapsed = time.perf_counter() - started
        return elapsed, len(out), plain.detokenize(out).decode("utf-8", errors="replace")

    try:
        wait_ready(url, proc)
        httpx.post(url + "/load_adapter", json={"adapter_id": adapter.id}, timeout=600).raise_for_status()
        served()  # warm-up both
        library()
        engine_runs, plain_runs = [], []
        for _ in range(repeats):  # interleaved, so that a noisy neighbour hurts both alike
            engine_runs.append(served())
            plain_runs.append(library())
        health = httpx.get(url + "/health").json()
    finally:
        proc.terminate()
        proc.wait(60)
        plain.close()
    engine_best = min(engine_runs, key=lambda run: run[0])
    plain_best = min(plain_runs, key=lambda run: run[0])
    engine_tps = engine_best[1] / engine_best[0]
    plain_tps = plain_best[1] / plain_best[0]
    return {
        "prompt_tokens": prompt_tokens[-1],
        "output_tokens": out_tokens,
        "engine_tokens_per_s": engine_tps,
        "plain_llama_cpp_tokens_per_s": plain_tps,
        "engine_over_plain": engine_tps / plain_tps,
        "greedy_answers_equal": engine_best[2] == plain_best[2],
        "server_base_loads": health["engine_details"]["base_loads"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small model, short answers (smoke run)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="llama.cpp threads on every side (1: immune to busy neighbours)",
    )
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved tokens/s runs; the best counts")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    load_at_start = os.getloadavg()
    size = (
        {"hidden_size": 128, "intermediate_size": 256, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4}
        if args.quick
        else {
            "hidden_size": 1024,
            "intermediate_size": 2816,
            "num_layers": 12,
            "num_heads": 16,
            "num_kv_heads": 16,
        }
    )
    out_tokens = 16 if args.quick else args.output_tokens
    rank = 16
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"building a {size} Llama and 2 rank-{rank} LoRA adapters ...", file=sys.stderr)
        workspace, base, records = build_workspace(root, size, rank)
        cache = workspace / "models" / "cache"
        print("export ...", file=sys.stderr)
        exports = export_times(base, records[0], cache)
        print("switching against reloading ...", file=sys.stderr)
        switch = switching(base, records, cache, args.threads, 40)
        print("tokens/s: clara --engine llamacpp serve against plain llama-cpp-python ...", file=sys.stderr)
        speed = throughput(workspace, records, base, cache, args.threads, out_tokens, args.repeats)
        params = sum(f.stat().st_size for f in Path(base.path).glob("*.safetensors")) / 4

    import llama_cpp

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU",
        "load_average_at_start": load_at_start,
        "llama_cpp_python": llama_cpp.__version__,
        "threads": args.threads,
        "model": size,
        "params_millions": params / 1e6,
        "rank": rank,
        **exports,
        **switch,
        **speed,
        "load_average_at_end": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))
    print(
        f"\nswitch {result['switch_seconds'] * 1000:.2f} ms vs reload "
        f"{result['reload_with_other_adapter_seconds'] * 1000:.0f} ms: {result['reload_over_switch']:.0f}x "
        f"(target >= 20) | engine {result['engine_tokens_per_s']:.1f} tok/s vs plain "
        f"{result['plain_llama_cpp_tokens_per_s']:.1f} tok/s: {result['engine_over_plain']:.2f} (target >= 0.9)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
