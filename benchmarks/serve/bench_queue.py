"""Queueing benchmark: more adapters than slots, against every adapter loaded.

Two real ``clara serve`` processes on the same machine and workspace (16 rank-8 LoRA adapters on one tiny
base): one with ``--max-loaded 4`` (the adapters queue for 4 slots), one with ``--max-loaded 16`` (all loaded
up front). 32 closed-loop clients each send requests one after the other (fixed prompt, fixed answer length,
greedy, ``ignore_eos``); each request names an adapter drawn uniformly or from a Zipf law (rank k with weight
k^-s, s = 1.1). Every client draws the same adapter sequence on both servers. A refused request (any status
but 200) is counted and not retried. The two servers' runs are interleaved so that a noisy neighbour hurts
both alike; the best of ``--repeats`` runs counts.

    python benchmarks/serve/bench_queue.py [--requests-per-client 6] [--output-tokens 64] [--repeats 2] [--json out.json]

Reports, per distribution and server: throughput (completion tokens/s and requests/s), p50 and p95 latency,
refusals, adapter loads, and the mean wait for a slot (``clara_adapter_queue_wait_seconds``), plus the ratio of
the 4-slot throughput to the all-loaded one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_serve import free_port, wait_ready  # the sibling benchmark's server helpers (same folder)

SIZE = {"hidden_size": 128, "intermediate_size": 256, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4}
PROMPT = "Das Finanzamt setzt die Steuer fest und der Bescheid ist schriftlich zu begründen"


def build_workspace(root: Path, adapters: int, rank: int) -> tuple[Path, list[str]]:
    from clara_core import hashing
    from clara_core.registry import AdapterDraft, Registry
    from clara_core.tinymodels import build_llama, random_lora_adapter
    from clara_core.workspace import Workspace

    ws, _ = Workspace.init(root / "ws")
    base_dir = build_llama(root / "base", texts=[PROMPT] * 50, **SIZE)
    ids = []
    with Registry.open(ws.registry_path) as registry:
        base = registry.add_base(base_dir, name="benchbase", workspace=ws)
        for i in range(adapters):
            folder = random_lora_adapter(base_dir, root / f"made{i}", rank=rank, seed=i + 1, scale=0.05)
            draft = AdapterDraft(
                domain=[f"dom{i:02d}"],
                method="lora",
                rank=rank,
                base_model_hash=base.base_model_hash,
                adapter_checksum=hashing.adapter_checksum(folder),
            )
            ids.append(registry.register_adapter(draft, folder, ws, place="move").id)
    return ws.root, ids


def start_server(workspace: Path, max_loaded: int, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "CLARA_HOME": str(workspace)}
    command = [
        sys.executable,
        "-m",
        "clara_core.cli",
        "serve",
        "--port",
        str(port),
        "--max-loaded",
        str(max_loaded),
        "--max-queue",
        "256",
        "--queue-timeout",
        str(args.queue_timeout),
        "-o",
        f"device={args.device}",
        "-o",
        f"max_batch_size={args.clients}",
    ]
    if args.threads > 0:
        command += ["-o", f"threads={args.threads}"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, f"http://127.0.0.1:{port}"


def choices(ids: list[str], distribution: str, s: float, clients: int, per_client: int) -> list[list[str]]:
    """Each client's adapter sequence (seeded: the same on both servers)."""
    weights = [1.0] * len(ids) if distribution == "uniform" else [(k + 1) ** -s for k in range(len(ids))]
    return [random.Random(1000 + c).choices(ids, weights, k=per_client) for c in range(clients)]


def scrape(url: str) -> dict[str, float]:
    """The server-wide totals of the metrics the report needs."""
    import httpx

    wanted = (
        "clara_adapter_loads_total",
        "clara_adapter_evictions_total",
        "clara_adapter_queue_wait_seconds_sum",
        "clara_adapter_queue_wait_seconds_count",
        "clara_adapter_queue_timeouts_total",
        "clara_adapter_load_seconds_sum",
    )
    totals = dict.fromkeys(wanted, 0.0)
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


async def load_run(url: str, plan: list[list[str]], out_tokens: int) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    refused: dict[str, int] = {}
    tokens = 0
    limits = httpx.Limits(max_connections=len(plan) + 4, max_keepalive_connections=len(plan) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one_client(adapters: list[str]) -> None:
            nonlocal tokens
            for adapter in adapters:
                body = {"prompt": PROMPT, "adapter_id": adapter, "max_tokens": out_tokens, "ignore_eos": True}
                started = time.perf_counter()
                response = await client.post("/generate", json=body)
                if response.status_code != 200:
                    code = f"{response.status_code} {response.json().get('error', {}).get('code')}"
                    refused[code] = refused.get(code, 0) + 1
                    continue
                latencies.append(time.perf_counter() - started)
                tokens += response.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        await asyncio.gather(*(one_client(adapters) for adapters in plan))
        elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    return {
        "seconds": elapsed,
        "requests_ok": len(latencies),
        "refused": sum(refused.values()),
        "refused_by_code": refused,
        "tokens_per_second": tokens / elapsed,
        "requests_per_second": len(latencies) / elapsed,
        "p50_latency_seconds": pct(0.50),
        "p95_latency_seconds": pct(0.95),
        "mean_latency_seconds": statistics.fmean(latencies) if latencies else float("nan"),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(proc: subprocess.Popen, url: str, plan: list[list[str]], out_tokens: int) -> dict[str, Any]:
    before = scrape(url)
    cpu_before = cpu_seconds(proc.pid)
    result = asyncio.run(load_run(url, plan, out_tokens))
    cpu = cpu_seconds(proc.pid) - cpu_before
    after = scrape(url)
    tokens = result["tokens_per_second"] * result["seconds"]
    result["server_cpu_seconds"] = cpu
    # on a machine shared with other jobs the wall clock varies run to run; the server's own CPU time per
    # token does much less (each server runs one torch thread)
    result["tokens_per_cpu_second"] = tokens / cpu if cpu else float("nan")
    delta = {k: after[k] - before[k] for k in after}
    waits = delta["clara_adapter_queue_wait_seconds_count"]
    result.update(
        {
            "adapter_loads": int(delta["clara_adapter_loads_total"]),
            "evictions": int(delta["clara_adapter_evictions_total"]),
            "queue_timeouts": int(delta["clara_adapter_queue_timeouts_total"]),
            # checks and engine loads; the engine loads between decoding steps, so this stalls every row
            "load_seconds_total": delta["clara_adapter_load_seconds_sum"],
            "mean_slot_wait_seconds": delta["clara_adapter_queue_wait_seconds_sum"] / waits if waits else 0.0,
        }
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--slots", type=int, default=4, help="--max-loaded of the queueing server")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=6)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--zipf-s", type=float, default=1.1)
    parser.add_argument("--queue-timeout", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per case; the best counts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per server (0: torch's default)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        print(f"building a tiny Llama and {args.adapters} rank-8 LoRA adapters ...", file=sys.stderr)
        workspace, ids = build_workspace(Path(tmp), args.adapters, rank=8)
        servers = {
            "all_loaded": start_server(workspace, args.adapters, args),
            "queued": start_server(workspace, args.slots, args),
        }
        try:
            for proc, url in servers.values():
                wait_ready(url, proc)
            _, all_url = servers["all_loaded"]
            for adapter in ids:  # every adapter loaded up front on the all-loaded server
                httpx.post(
                    all_url + "/load_adapter", json={"adapter_id": adapter}, timeout=120
                ).raise_for_status()
            warm = choices(ids, "uniform", args.zipf_s, args.clients, 1)
            for _, url in servers.values():
                asyncio.run(load_run(url, warm, 2))
            runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
            for repeat in range(args.repeats):
                for distribution in ("uniform", "zipf"):
                    plan = choices(ids, distribution, args.zipf_s, args.clients, args.requests_per_client)
                    for name, (proc, url) in servers.items():
                        result = measured(proc, url, plan, args.output_tokens)
                        runs.setdefault(distribution, {}).setdefault(name, []).append(result)
                        print(
                            f"[{repeat + 1}/{args.repeats}] {distribution:7s} {name:10s} "
                            f"{result['tokens_per_second']:7.1f} tok/s  p50 {result['p50_latency_seconds']:.3f} s  "
                            f"p95 {result['p95_latency_seconds']:.3f} s  refused {result['refused']}  "
                            f"loads {result['adapter_loads']}  {result['tokens_per_cpu_second']:.0f} tok/cpu-s  "
                            f"load avg {os.getloadavg()[0]:.1f}",
                            file=sys.stderr,
                        )
        finally:
            for proc, _ in servers.values():
                proc.terminate()
            for proc, _ in servers.values():
                proc.wait(30)

    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.device}",
        "load_average_at_end": os.getloadavg(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": SIZE,
        "cases": {},
    }
    for distribution, by_server in runs.items():
        best = {
            name: max(results, key=lambda r: r["tokens_per_second"]) for name, results in by_server.items()
        }
        paired = [
            q["tokens_per_second"] / a["tokens_per_second"]
            for q, a in zip(by_server["queued"], by_server["all_loaded"], strict=True)
        ]
        paired_cpu = [
            q["tokens_per_cpu_second"] / a["tokens_per_cpu_second"]
            for q, a in zip(by_server["queued"], by_server["all_loaded"], strict=True)
        ]
        report["cases"][distribution] = {
            **best,
            "refused_total": sum(r["refused"] for results in by_server.values() for r in results),
            # each queued run right after its all-loaded run: the median of these ratios
            "throughput_ratio": statistics.median(paired),
            "throughput_ratio_runs": paired,
            "best_over_best_ratio": best["queued"]["tokens_per_second"]
            / best["all_loaded"]["tokens_per_second"],
            "tokens_per_cpu_second_ratio": statistics.median(paired_cpu),
            "runs": by_server,
        }
    for distribution, case in report["cases"].items():
        print(
            f"{distribution}: {args.slots} slots / all {args.adapters} loaded: wall-clock throughput ratio "
            f"{case['throughput_ratio']:.2f} (median of paired runs "
            f"{', '.join(f'{r:.2f}' for r in case['throughput_ratio_runs'])}), per server CPU second "
            f"{case['tokens_per_cpu_second_ratio']:.2f}; refused {case['refused_total']}"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
