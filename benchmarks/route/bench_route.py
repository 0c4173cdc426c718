"""Routing benchmark: accuracy and latency of each router on the law corpora, against the time of generating
32 tokens with the same base.

Two splits, both fitted on training sections only:
- dev: fitted on every law's train sections, evaluated on the dev sections of the same laws;
- unseen laws: one law per domain left out of the fit entirely (UStG, SGB I, VwVG + VwZG), evaluated on all of
  its sections (a router that memorised law names fails here).

Usage: python benchmarks/route/bench_route.py [--quick] [--base DIR] [--json results.json] [--plots DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DOMAINS = ["steuerrecht", "sozialrecht", "verfahren"]
#: trained adapters for the arrow router, kept between runs
CACHE = Path(tempfile.gettempdir()) / "clara-bench-route-adapters"
#: configurations measured: label -> (router, options)
CONFIGS = {
    # the embedding router as first built: last hidden states, centred, no whitening
    "embedding-last": ("embedding", {"layer": -1, "whiten": 0.0}),
    "embedding": ("embedding", {}),  # its defaults: token embeddings (layer 0), centred, whitened
    "embedding-auto": ("embedding", {"layer": "auto"}),  # the layer chosen by held-out accuracy
    "keyword": ("keyword", {}),
    "arrow": ("arrow", {}),  # from the trained adapters' own weights
}
UNSEEN = {"steuerrecht": {"UStG 1980"}, "sozialrecht": {"SGB 1"}, "verfahren": {"VwVG", "VwZG 2005"}}


def find_gesetze() -> Path:
    for candidate in (
        ROOT.parent / "shared" / "data" / "gesetze",
        ROOT.parents[1] / "shared" / "data" / "gesetze",
    ):
        if candidate.is_dir():
            return candidate
    raise SystemExit("law corpora not found (../shared/data/gesetze)")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def side_by_side(base: Path, embed: Any, prompts: list[str], tokens: int = 32) -> dict[str, Any]:
    """Per prompt, one after the other: embedding it at layer 0 (the embedding router's default), embedding it
    at the last layer (the router as first built) and generating ``tokens`` tokens (greedy) from it. On a
    shared machine a burst of other work then slows all three alike, and the per-prompt ratio holds."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    rows = []
    with torch.no_grad():
        for prompt in prompts:
            row = {}
            for name, layer in (("layer 0", 0), ("last layer", -1)):
                start = time.perf_counter()
                embed([prompt], layer=layer)
                row[name] = time.perf_counter() - start
            ids = tok(prompt, return_tensors="pt", truncation=True, max_length=128)
            start = time.perf_counter()
            model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            row["generate"] = time.perf_counter() - start
            rows.append(row)
    median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    ratio = {k: statistics.median(r[k] / r["generate"] for r in rows) for k in ("layer 0", "last layer")}
    return {"prompts": len(rows), "median_seconds": median, "median_ratio_to_generate": ratio}


def trained_adapter(base: Any, data: Path, domain: str, clara: Any, ws: Path, *, steps: int) -> Path | None:
    """A small LoRA adapter of ``domain`` trained on ``data`` (the seen laws' train sections), kept in a cache
    folder between runs (keyed by the base's hash, the data and the settings): the cached folder to register,
    or ``None`` when it was trained (and registered) now."""
    settings = ["--rank", "8", "--max-steps", str(steps), "--batch-size", "8", "--max-seq-len", "128"]
    settings += ["--lr", "3e-3", "--dropout", "0", "--seed", "0"]
    key = hashlib.sha256(
        json.dumps([base.base_model_hash, hashlib.sha256(data.read_bytes()).hexdigest(), settings]).encode()
    ).hexdigest()[:16]
    cached = CACHE / f"{domain}-{key}"
    if (cached / "adapter_model.safetensors").is_file():
        print(f"{domain}: trained adapter from the cache {cached}", flush=True)
        return cached
    start = time.perf_counter()
    clara("train", "--base", "base", "--domain", domain, "--dataset", str(data), *settings)
    listed = json.loads(clara("adapters", "list", "--json"))
    out = ws / next(a["path"] for a in listed if a["domain"] == [domain])  # relative to the workspace
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = CACHE / f".{domain}-{key}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(out, partial)
    partial.rename(cached)
    print(f"{domain}: trained {steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny base, small samples (a smoke run)")
    parser.add_argument(
        "--base",
        type=Path,
        help="a local base folder (a pretrained causal LM in transformers format, with its tokenizer) to route "
        "with instead of the randomly initialised one this script builds",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--plots", type=Path, help="write the confusion matrices (PNG) into this folder")
    parser.add_argument("--sample", type=int, default=400, help="training texts per adapter")
    parser.add_argument(
        "--routers",
        default=",".join(CONFIGS),
        help=f"comma-separated configurations to run (default: all of {', '.join(CONFIGS)})",
    )
    parser.add_argument("--train-steps", type=int, default=30, help="training steps of each arrow adapter")
    args = parser.parse_args()

    from click.testing import CliRunner

    from clara_core.cli import ClaraContext, cli
    from clara_core.plugins import PluginManager
    from clara_core.registry import Registry
    from clara_core.routing import evaluate, fit_router, load_router, local_embedder, plot_confusion
    from clara_core.tinymodels import build_llama, random_lora_adapter
    from clara_core.workspace import Workspace

    gesetze = find_gesetze()
    tmp = Path(tempfile.mkdtemp(prefix="bench-route-"))
    corpus = [r["text"] for d in [*DOMAINS, "allgemein"] for r in read(gesetze / d / "train.jsonl")]
    size = (
        {"hidden_size": 64, "vocab_size": 512}
        if args.quick
        else {
            "hidden_size": 512,
            "vocab_size": 8000,
            "intermediate_size": 1024,
            "num_layers": 4,
            "num_heads": 8,
            "num_kv_heads": 4,
        }
    )
    if args.base is not None:
        if not (args.base / "config.json").is_file():
            raise SystemExit(f"--base {args.base}: no config.json there; give a transformers model folder")
        base = args.base.resolve()
        size = {"path": str(base)}
    else:
        base = build_llama(tmp / "base", texts=corpus, seed=0, **size)
    ws, _ = Workspace.init(tmp / "ws")
    with Registry.open(ws.registry_path) as registry:
        base_record = registry.add_base(base, name="base", workspace=ws)

    splits = {}
    train = {d: read(gesetze / d / "train.jsonl") for d in DOMAINS}
    dev = {d: read(gesetze / d / "dev.jsonl") for d in DOMAINS}
    splits["dev"] = (
        {d: write(tmp / f"train-{d}.jsonl", train[d]) for d in DOMAINS},
        write(tmp / "dev.jsonl", [r for d in DOMAINS for r in dev[d]]),
    )
    seen = {
        d: write(tmp / f"seen-{d}.jsonl", [r for r in train[d] if r["law"] not in UNSEEN[d]]) for d in DOMAINS
    }
    splits["unseen laws"] = (
        seen,
        write(tmp / "unseen.jsonl", [r for d in DOMAINS for r in train[d] + dev[d] if r["law"] in UNSEEN[d]]),
    )

    def clara(*argv: str) -> str:
        out = CliRunner().invoke(
            cli, list(argv), obj=ClaraContext(workspace=ws.root, plugins=PluginManager())
        )
        assert out.exit_code == 0, out.output
        return str(out.output)

    arrow = any(CONFIGS[label][0] == "arrow" for label in args.routers.split(","))
    for i, domain in enumerate(DOMAINS):
        if arrow:  # the arrow router reads the adapters' weights: they must have learned their domain
            folder = trained_adapter(
                base_record, seen[domain], domain, clara, ws.root, steps=args.train_steps
            )
        else:  # the other routers only read the training texts: any adapter will do
            folder = random_lora_adapter(base, tmp / "made" / domain, seed=i + 1)
        if folder is not None:
            clara("adapters", "register", str(folder), "--domain", domain, "--base", "base")
    embed = local_embedder(base_record)

    sample = 40 if args.quick else args.sample
    results = []
    plugins = PluginManager()
    for split, (data, labeled) in splits.items():
        records = [(r["text"], r["domain"]) for r in read(labeled)]
        if args.quick:
            records = records[::10]
        for label in args.routers.split(","):
            router, options = CONFIGS[label]
            start = time.perf_counter()
            fit_router(ws, plugins, router, data=data, sample=sample, embed=embed, options=options)
            fit_s = time.perf_counter() - start
            loaded = load_router(ws, plugins, router)
            result = evaluate(loaded, records, embed if loaded.router.needs_embeddings else None)
            result.update(split=split, fit_seconds=fit_s, config=label, options=options)
            result["summary"] = loaded.router.summary()
            results.append(result)
            if args.plots:
                args.plots.mkdir(parents=True, exist_ok=True)
                name = f"confusion-{label}-{split.replace(' ', '-')}.png"
                plot_confusion(result, args.plots / name)
            print(
                f"{split:12} {label:15} accuracy {result['accuracy']:.1%}  p50 "
                f"{result['latency_seconds']['p50'] * 1000:.2f} ms  p95 {result['latency_seconds']['p95'] * 1000:.2f} ms"
                f"  ({result['records']} prompts)"
                + (f"\n    {result['summary']}" if result["summary"] else ""),
                flush=True,
            )
    prompts = [r["text"] for d in DOMAINS for r in dev[d][: 2 if args.quick else 7]]
    latency = side_by_side(base, embed, prompts)
    generate = latency["median_seconds"]["generate"]
    for name, ratio in latency["median_ratio_to_generate"].items():
        print(
            f"embedding a prompt at the {name}: {latency['median_seconds'][name] * 1000:.1f} ms, "
            f"{ratio:.1%} of generating 32 tokens (median of {latency['prompts']} prompts)"
        )
    print(f"generating 32 tokens: {generate * 1000:.1f} ms (median of {latency['prompts']})")
    summary = {
        "base": size,
        "sample": sample,
        "generate_32_tokens_seconds": generate,
        "side_by_side": latency,
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
