"""clara eval against a plain one-forward-per-text transformers loop, in one run; then one clara eval matrix.

    python benchmarks/eval/bench_eval.py [--window 512] [--batch-size 16] [--steps 40] [--no-matrix] [--json out.json]

Part 1 (throughput): the same model (a Llama built offline by clara_core.tinymodels, tokenizer trained on the
law corpora; base + one LoRA adapter), the same dev set (../shared/data/gesetze/steuerrecht/dev.jsonl), the
same tokens (BOS + text + EOS as training scores them) and the same sliding windows (--window, stride half of
it). clara eval batches windows longest first with padding masked; the baseline runs one forward per window, as
the transformers documentation's perplexity loop does. Tokens/s counts the tokens fed to the model during
scoring only (model loading and tokenisation are timed for neither side). The two perplexities must agree to
1e-4 relative.

Part 2 (matrix): three domain adapters (steuerrecht, sozialrecht, verfahren) trained quickly with clara train
(--steps optimizer steps each: tiny, quickly trained adapters), then clara eval matrix with the base on the three
domains' dev sets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DATA = ROOT.parent / "shared" / "data" / "gesetze"
DOMAINS = ("steuerrecht", "sozialrecht", "verfahren")
MODEL = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_layers": 4,
    "num_heads": 8,
    "num_kv_heads": 4,
    "max_positions": 2048,
}


def texts_of(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.open(encoding="utf-8") if line.strip()]


def clara(workspace: Path, *args: str) -> str:
    from click.testing import CliRunner

    from clara_core.cli import ClaraContext, cli
    from clara_core.plugins import PluginManager

    result = CliRunner().invoke(
        cli, ["-w", str(workspace), *args], obj=ClaraContext(plugins=PluginManager()), catch_exceptions=False
    )
    if result.exit_code != 0:
        sys.exit(f"clara {' '.join(args)} failed:\n{result.output}")
    return result.stdout


def baseline(base: Path, adapter: Path, dev: Path, window: int) -> dict:
    """One forward per window, as a user writes it from the transformers documentation."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    encoded = [
        [tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        for t in texts_of(dev)
    ]
    stride = window // 2
    nll, scored, fed = 0.0, 0, 0
    started = time.perf_counter()
    with torch.no_grad():
        for ids in encoded:
            seq = torch.tensor([ids])
            prev_end = 0
            for begin in range(0, len(ids), stride):
                end = min(begin + window, len(ids))
                trg_len = end - prev_end
                input_ids = seq[:, begin:end]
                target_ids = input_ids.clone()
                target_ids[:, :-trg_len] = -100
                loss = model(input_ids=input_ids, labels=target_ids).loss
                count = int((target_ids[:, 1:] != -100).sum())
                nll += float(loss) * count
                scored += count
                fed += end - begin
                prev_end = end
                if end == len(ids):
                    break
    seconds = time.perf_counter() - started
    return {
        "ppl": math.exp(nll / scored),
        "tokens": scored,
        "fed": fed,
        "seconds": seconds,
        "tps": fed / seconds,
    }


def throughput(ws: Path, base: Path, folder: Path, dev: Path, args: argparse.Namespace) -> dict:
    from clara_core.tinymodels import random_lora_adapter

    adapter = folder / "adapter-throughput"
    if not (adapter / "adapter_config.json").is_file():
        random_lora_adapter(base, adapter, rank=8, seed=0, scale=0.02)
        clara(ws, "adapters", "register", str(adapter), "--domain", "bench", "--method", "lora")
    ours = json.loads(
        clara(
            ws,
            "eval",
            "bench-lora-r8-v1",
            "--dev",
            str(dev),
            "--window",
            str(args.window),
            "--batch-size",
            str(args.batch_size),
            "--json",
        )
    )["rows"][0]
    plain = baseline(base, adapter, dev, args.window)
    rel = abs(ours["metrics"]["ppl"] - plain["ppl"]) / plain["ppl"]
    tps = ours["details"]["tokens_per_second"]
    result: dict = {
        "clara_eval": {
            "ppl": ours["metrics"]["ppl"],
            "tokens_per_second": tps,
            "seconds": ours["details"]["seconds"],
        },
        "baseline": plain,
        "speedup": tps / plain["tps"],
        "ppl_rel_diff": rel,
    }
    print(
        f"dev set {dev} ({ours['details']['texts']} texts, {ours['details']['tokens']:,} scored tokens), window {args.window}"
    )
    print(f"{'variant':<40} {'tokens/s':>10} {'vs baseline':>12} {'ppl':>12}")
    print(
        f"{'baseline: one forward per window':<40} {plain['tps']:>10,.0f} {'1.00x':>12} {plain['ppl']:>12.6f}"
    )
    print(
        f"{'clara eval (batched, longest first)':<40} {tps:>10,.0f} {tps / plain['tps']:>11.2f}x {ours['metrics']['ppl']:>12.6f}"
    )
    print(f"ppl relative difference {rel:.2e} ({'ok' if rel < 1e-4 else 'ABOVE 1e-4'})")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per matrix adapter")
    parser.add_argument("--no-matrix", action="store_true")
    parser.add_argument("--no-throughput", action="store_true", help="only the matrix (part 2)")
    parser.add_argument("--train-batch", type=int, default=16, help="batch size of the matrix adapters")
    parser.add_argument("--train-seq", type=int, default=256, help="--max-seq-len of the matrix adapters")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--limit",
        type=int,
        help="only the first N sections of each dev set (a shared machine; say so in the README)",
    )
    parser.add_argument("--data", type=Path, default=DATA, help=f"the law corpora (default {DATA})")
    parser.add_argument("--keep", type=Path, help="use this folder (kept) instead of a temporary one")
    args = parser.parse_args()
    data: Path = args.data

    import torch

    from clara_core.tinymodels import build_llama
    from clara_core.workspace import Workspace

    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench-eval-"))
    folder.mkdir(parents=True, exist_ok=True)
    ws = folder / "ws"
    base = ws / "models" / "base" / "bench-llama"
    if not (base / "config.json").is_file():
        Workspace.init(ws)
        corpus = [t for d in (*DOMAINS, "allgemein") for t in texts_of(data / d / "train.jsonl")]
        build_llama(base, texts=corpus, **MODEL)
        clara(ws, "base", "add", str(base), "--name", "bench-llama")

    def dev_set(domain: str) -> Path:
        source = data / domain / "dev.jsonl"
        if not args.limit:
            return source
        lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
        target = folder / f"{domain}-dev-{args.limit}.jsonl"
        target.write_text("\n".join(lines[: args.limit]) + "\n", encoding="utf-8")
        return target

    dev = dev_set("steuerrecht")

    # Part 1: throughput against the plain loop
    result: dict = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_before": os.getloadavg()[0],
        },
        "window": args.window,
        "limit": args.limit,
        "batch_size": args.batch_size,
    }
    if not args.no_throughput:
        result.update(throughput(ws, base, folder, dev, args))

    # Part 2: the matrix
    if not args.no_matrix:
        ids = []
        for domain in DOMAINS:
            existing = json.loads(clara(ws, "adapters", "list", "--domain", domain, "--json"))
            if not existing:
                clara(
                    ws, "train", "--base", "bench-llama", "--domain", domain, "--method", "lora", "--rank", "8",
                    "--dataset", str(data / domain / "train.jsonl"), "--max-steps", str(args.steps),
                    "--max-seq-len", str(args.train_seq), "--batch-size", str(args.train_batch), "--lr", "3e-3",
                )  # fmt: skip
                existing = json.loads(clara(ws, "adapters", "list", "--domain", domain, "--json"))
            ids.append(existing[-1]["id"])
        sets = [f"--sets={d}={dev_set(d)}" for d in DOMAINS]
        started = time.perf_counter()
        matrix = json.loads(
            clara(
                ws,
                "eval",
                "matrix",
                *ids,
                *sets,
                "--base-too",
                "--window",
                str(args.window),
                "--batch-size",
                str(args.batch_size),
                "--plot",
                str(folder / "matrix.png"),
                "--json",
            )
        )
        result["matrix"] = {**matrix, "seconds": time.perf_counter() - started, "steps": args.steps}
        print(
            f"\nclara eval matrix (ppl, lower is better, * best per column; adapters: {args.steps} steps each)"
        )
        print(f"| model | {' | '.join(DOMAINS)} |")
        print(f"|---|{'---:|' * len(DOMAINS)}")
        for name in matrix["models"]:
            cells = [
                f"{'**' if matrix['best'][d] == name else ''}{matrix['values'][name][d]:.2f}"
                f"{'**' if matrix['best'][d] == name else ''}"
                for d in DOMAINS
            ]
            print(f"| {name} | {' | '.join(cells)} |")
        print(f"heatmap: {folder / 'matrix.png'}")
    result["machine"]["load_after"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
