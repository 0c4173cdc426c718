"""What an adapter load costs the transformers engine's worker thread, side by side in one run: plain LoRA
adapters applied from their factors (the engine's path now) against loading them with PEFT (the engine's path
before, still used for DoRA and other adapters PEFT has to compute).

The worker loads between two decoding steps, so every running request waits for this time; the file read and
checksum happen before, off the worker, for both paths, and so does parsing the factors for the direct path
(PEFT's path parses its state dict on the worker): not measured here. For each base
size: 16 rank-8 LoRA adapters on every linear projection, loaded into 4 slots round robin (load one, unload
the oldest), as ``--max-loaded 4`` does under load; median and p95 of load plus unload, after a warm-up round.
Both paths answer the same prompt with the same greedy tokens (checked).

Usage: python benchmarks/serve/bench_load.py [--rounds N] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

SIZES = {
    "tiny (hidden 128, 2 layers; bench_queue.py's base)": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 4,
    },
    "small (hidden 512, 8 layers; bench_serve.py's base)": {
        "hidden_size": 512,
        "intermediate_size": 1024,
        "num_layers": 8,
        "num_heads": 8,
        "num_kv_heads": 8,
    },
}
ADAPTERS, SLOTS = 16, 4


def measure(base: Path, files: list[Any], *, peft: bool, rounds: int) -> dict[str, Any]:
    from clara_plugin_transformers.engine import TransformersEngine

    from clara_core.plugin_api import EngineOptions, GenerationRequest

    engine = TransformersEngine(SimpleNamespace(path=base, name="b"), EngineOptions(extra={"device": "cpu"}))
    if peft:
        engine._direct_factors = lambda *args: None  # the engine as it was: every adapter through PEFT
    times: list[float] = []
    loaded: list[str] = []
    went_through_peft: list[bool] = []

    def swap(step: int) -> None:  # on the engine's worker thread, as a load between two decoding steps
        name = f"a{step % ADAPTERS}"
        # what load_adapter prepares off the worker (parsing and copying the factors; None for PEFT's path)
        factors = engine._direct_factors(name, files[step % ADAPTERS])
        start = time.perf_counter()
        if len(loaded) == SLOTS:
            engine._unload_adapter(loaded.pop(0))
        engine._load_adapter(name, files[step % ADAPTERS], factors)
        elapsed = time.perf_counter() - start
        loaded.append(name)
        if step >= ADAPTERS:  # the first round warms up
            times.append(elapsed)

    async def run() -> str:
        await engine.start()
        for step in range((rounds + 1) * ADAPTERS):
            await engine._call(lambda s=step: swap(s))
        text = ""
        request = GenerationRequest(
            prompt="Der Bescheid", adapter_id=loaded[-1], max_tokens=8, ignore_eos=True
        )
        async for chunk in engine.generate(request):
            text += chunk.text
        went_through_peft.append(engine.peft is not None)
        await engine.shutdown()
        return text

    answer = asyncio.run(run())
    times.sort()
    return {
        "median_ms": 1000 * statistics.median(times),
        "p95_ms": 1000 * times[int(0.95 * (len(times) - 1))],
        "loads": len(times),
        "went_through_peft": went_through_peft[0],
        "answer": answer,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="measured rounds over the 16 adapters")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    import torch

    from clara_core.hashing import read_adapter_files
    from clara_core.tinymodels import build_llama, random_lora_adapter

    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, size in SIZES.items():
            root = Path(tmp) / str(size["hidden_size"])
            base = build_llama(root / "base", texts=["Der Bescheid des Finanzamts"] * 50, **size)
            files = [
                read_adapter_files(random_lora_adapter(base, root / f"a{i}", rank=8, seed=i + 1, scale=0.05))
                for i in range(ADAPTERS)
            ]
            direct = measure(base, files, peft=False, rounds=args.rounds)
            peft = measure(base, files, peft=True, rounds=args.rounds)
            assert not direct["went_through_peft"] and peft["went_through_peft"]
            assert direct["answer"] == peft["answer"], (direct["answer"], peft["answer"])
            speedup = peft["median_ms"] / direct["median_ms"]
            print(
                f"{label}: load + unload, median (p95): from factors {direct['median_ms']:.2f} ms "
                f"({direct['p95_ms']:.2f}), with PEFT {peft['median_ms']:.2f} ms ({peft['p95_ms']:.2f}): "
                f"{speedup:.0f}x; same greedy answer",
                flush=True,
            )
            results[label] = {"from_factors": direct, "peft": peft, "speedup": speedup}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
