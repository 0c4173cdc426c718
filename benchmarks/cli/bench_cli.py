"""Wall time of `clara --help` and `clara adapters list` on a registry of 10,000 adapters, side by side with
`python -c "import torch"`, in one run.

    python benchmarks/cli/bench_cli.py [--adapters 10000] [--repeat 5]

Targets (issue 2): `clara --help` under a third of the torch import; `adapters list` on 10,000 adapters under
one second. Prints a Markdown table; paste it into benchmarks/cli/README.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clara_core.registry import AdapterDraft, Registry, utcnow
from clara_core.workspace import Workspace, domain_key


def fill_registry(workspace: Workspace, count: int) -> None:
    """Insert ``count`` adapter rows in one transaction (rows only: listing reads the registry, not files)."""
    domains = ["steuerrecht", "sozialrecht", "verfahren", "allgemein"]
    methods = ["lora", "qlora", "dora"]
    with Registry.open(workspace.registry_path) as registry:
        rows = []
        versions: dict[tuple[str, str, int], int] = {}
        for i in range(count):
            domain, method, rank = domains[i % 4], methods[(i // 4) % 3], 8 * (1 + i % 4)
            draft = AdapterDraft(
                domain=[domain], method=method, rank=rank, base_model_hash="b" * 64, adapter_checksum=f"{i:064x}",
                alpha=2.0 * rank, target_modules=["q_proj", "v_proj"], tokenizer_hash="t" * 64,
                dataset_ref=f"data/{domain}.jsonl@sha256:{'d' * 64}", license="apache-2.0",
                metrics={"ppl_dev": 5.0 + (i % 100) / 10}, created=utcnow(),
            )  # fmt: skip
            version = versions[(domain, method, rank)] = versions.get((domain, method, rank), 0) + 1
            rows.append(
                Registry._adapter_row(
                    draft,
                    f"{domain}-{method}-r{rank}-v{version}",
                    [domain],
                    domain_key([domain]),
                    method,
                    version,
                    f"models/adapters/{domain}/{method}-r{rank}-v{version}",
                )
            )
        registry.db.conn.execute("BEGIN IMMEDIATE")
        registry.db.table("adapters").insert_all(rows, batch_size=1000)
        registry.db.conn.execute("COMMIT")


def timed(cmd: list[str], repeat: int, env: dict[str, str]) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, env=env)
        times.append(time.perf_counter() - start)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {result.stderr.decode()[-500:]}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapters", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("CLARA_HOME", "CLARA_LOAD_PLUGINS")}
    clara = str(Path(sys.executable).with_name("clara"))
    with tempfile.TemporaryDirectory() as tmp:
        workspace, _ = Workspace.init(Path(tmp) / "ws")
        fill_registry(workspace, args.adapters)
        cases = [
            ('python -c "import torch"', [sys.executable, "-c", "import torch"]),
            ("clara --help", [clara, "--help"]),
            (
                f"clara adapters list ({args.adapters:,} adapters)",
                [clara, "-w", str(workspace.root), "adapters", "list"],
            ),
            (
                f"clara adapters list --json ({args.adapters:,} adapters)",
                [clara, "-w", str(workspace.root), "adapters", "list", "--json"],
            ),
        ]
        for _, cmd in cases:  # warm the page cache and .pyc files once
            subprocess.run(cmd, capture_output=True, env=env)
        results = [(label, timed(cmd, args.repeat, env)) for label, cmd in cases]
    torch_median = statistics.median(results[0][1])
    print(f"| command | median of {args.repeat} (s) | min (s) | vs import torch |")
    print("|---|---|---|---|")
    for label, times in results:
        median = statistics.median(times)
        print(f"| `{label}` | {median:.3f} | {min(times):.3f} | {median / torch_median:.2f}x |")


if __name__ == "__main__":
    main()
