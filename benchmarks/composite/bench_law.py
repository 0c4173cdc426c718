"""On the law corpora: what a 50/50 composite of a Steuerrecht and a Verfahren adapter keeps of each adapter's
perplexity gain on its domain (clara composite build --check).

    python benchmarks/composite/bench_law.py [--data ../shared/data/gesetze] [--steps 40] [--limit 16] \
        [--keep DIR] [--json out.json]

The base is a Llama built offline by clara_core.tinymodels (random weights, tokenizer trained on the law
corpora; the same model as benchmarks/eval). Two LoRA adapters are trained with clara train on the domains'
train.jsonl, each with its domain's dev.jsonl (the first --limit sections) as --dev, so the dev set is
recorded. Then ``clara composite build --strategy weighted --weights 0.5 0.5 --check`` scores the base, both
adapters and the composite on both dev sets (clara eval matrix) and reports, per adapter on its own dev set,
kept = (ppl_base - ppl_composite) / (ppl_base - ppl_adapter). Target: at least 80% for each. Prints a Markdown
table; paste it into benchmarks/composite/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# the evaluation benchmark's base model, corpus reader and in-process CLI helper: one copy of each
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
from bench_eval import MODEL, clara, texts_of

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DATA = ROOT.parent / "shared" / "data" / "gesetze"
DOMAINS = ("steuerrecht", "verfahren")
CORPORA = ("steuerrecht", "sozialrecht", "verfahren", "allgemein")
TARGET = 0.8


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DATA, help=f"the law corpora (default {DATA})")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per adapter")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--train-batch", type=int, default=8, help="--batch-size of the adapters")
    parser.add_argument("--train-seq", type=int, default=128, help="--max-seq-len of the adapters")
    parser.add_argument("--lr", default="3e-3")
    parser.add_argument("--limit", type=int, default=16, help="first N sections of each dev set (0: all)")
    parser.add_argument("--keep", type=Path, help="use this folder (kept) instead of a temporary one")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    data: Path = args.data
    for domain in DOMAINS:
        for name in ("train.jsonl", "dev.jsonl"):
            if not (data / domain / name).is_file():
                sys.exit(f"{data / domain / name} not found; give the law corpora with --data DIR")

    import torch

    from clara_core.tinymodels import build_llama
    from clara_core.workspace import Workspace

    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench-law-"))
    folder.mkdir(parents=True, exist_ok=True)
    ws = folder / "ws"
    base = ws / "models" / "base" / "bench-llama"
    started = time.perf_counter()
    if not (base / "config.json").is_file():
        Workspace.init(ws)
        corpus = [t for d in CORPORA if (data / d).is_dir() for t in texts_of(data / d / "train.jsonl")]
        build_llama(base, texts=corpus, **MODEL)
        clara(ws, "base", "add", str(base), "--name", "bench-llama")

    ids = []
    train_seconds = {}
    for domain in DOMAINS:
        lines = [
            x for x in (data / domain / "dev.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()
        ]
        dev = ws / "data" / f"{domain}-dev.jsonl"
        dev.parent.mkdir(parents=True, exist_ok=True)
        dev.write_text("\n".join(lines[: args.limit] if args.limit else lines) + "\n", encoding="utf-8")
        existing = json.loads(clara(ws, "adapters", "list", "--domain", domain, "--json"))
        if not existing:
            t0 = time.perf_counter()
            clara(
                ws, "train", "--base", "bench-llama", "--domain", domain, "--method", "lora",
                "--rank", str(args.rank), "--dataset", str(data / domain / "train.jsonl"), "--dev", str(dev),
                "--max-steps", str(args.steps), "--max-seq-len", str(args.train_seq),
                "--batch-size", str(args.train_batch), "--micro-batch-size", str(args.train_batch), "--lr", args.lr,
            )  # fmt: skip
            train_seconds[domain] = round(time.perf_counter() - t0, 1)
            existing = json.loads(clara(ws, "adapters", "list", "--domain", domain, "--json"))
        ids.append(existing[-1]["id"])

    t0 = time.perf_counter()
    built = json.loads(
        clara(
            ws,
            "composite",
            "build",
            "--adapters",
            *ids,
            "--strategy",
            "weighted",
            "--weights",
            "0.5",
            "0.5",
            "--check",
            "--json",
        )
    )
    check_seconds = round(time.perf_counter() - t0, 1)
    kept = built["check"]["kept"]
    print(f"\nclara composite build --weights 0.5 0.5 --check ({built['id']}, rank {built['rank']})")
    print("| adapter | its dev set | ppl base | ppl adapter | ppl composite | kept | target 80% |")
    print("|---|---|---:|---:|---:|---:|---|")
    for k in kept:
        share = k["kept"]
        met = "n/a" if share is None else ("met" if share >= TARGET else "**not met**")
        share_text = "n/a" if share is None else f"{100 * share:.1f}%"
        print(
            f"| {k['component']} | {k['domain']} ({k['eval_set']}) | {k['ppl_base']:.2f} | {k['ppl_component']:.2f}"
            f" | {k['ppl_composite']:.2f} | {share_text} | {met} |"
        )
    # the full matrix: each adapter on the other's domain too (from the check's report)
    report = json.loads(Path(built["check"]["report"]).read_text())
    cells = {
        (r["target"], r["details"]["domain"]): r["metrics"]["ppl"]
        for r in report["rows"]
        if "ppl" in r["metrics"] and "domain" in r["details"]
    }
    print(f"\n| model | {' | '.join(DOMAINS)} |")
    print(f"|---|{'---:|' * len(DOMAINS)}")
    for name in ["base", *ids, built["id"]]:
        print(f"| {name} | {' | '.join(f'{cells[(name, d)]:.2f}' for d in DOMAINS)} |")
    # the stricter view: what the composite keeps of the adapter's advantage over the other domain's adapter
    # there (the gain both adapters share, legal language in general, does not count)
    specific = {}
    print(
        "\n| adapter | its domain | ppl other adapter | ppl adapter | ppl composite | kept of the advantage |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for own, domain in zip(ids, DOMAINS, strict=True):
        other = next(i for i in ids if i != own)
        o, a, c = cells[(other, domain)], cells[(own, domain)], cells[(built["id"], domain)]
        specific[domain] = (o - c) / (o - a) if o > a else None
        share = "n/a" if specific[domain] is None else f"{100 * specific[domain]:.1f}%"
        print(f"| {own} | {domain} | {o:.2f} | {a:.2f} | {c:.2f} | {share} |")
    result = {
        "specific_kept": specific,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "args": {k: str(v) for k, v in vars(args).items()},
        "adapters": ids,
        "composite": built["id"],
        "kept": kept,
        "matrix": {f"{t}@{d}": v for (t, d), v in cells.items()},
        "train_seconds": train_seconds,
        "check_seconds": check_seconds,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    print(f"\ntraining {train_seconds} s, build + check {check_seconds} s; folder {folder}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
