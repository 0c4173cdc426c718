"""A weighted composite of 3 adapters (mixed ranks, one rsLoRA, one DoRA): clara composite build against PEFT's
add_weighted_adapter (cat, svd, and linear where the ranks allow) in one run.

    python benchmarks/composite/bench_composite.py [--hidden 256] [--layers 4] [--repeat 3] [--json OUT]

For each method: build time, the max abs error of the merged weights against the exact dense sum of the
components' deltas (each computed by PEFT's own merge_and_unload, so DoRA and rsLoRA are PEFT's definition),
the worst relative Frobenius error of a module, and the max abs difference of the logits against the base
with the exact deltas added by hand. Prints a Markdown table; paste it into benchmarks/composite/README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WEIGHTS = {"steuer": 0.5, "verfahren": 0.3, "umwelt": 0.2}
ADAPTERS = {  # name: (rank, LoraConfig options)
    "steuer": (8, {}),
    "verfahren": (16, {"use_rslora": True}),
    "umwelt": (4, {"use_dora": True}),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_dir: Path, out: Path, rank: int, seed: int, **options: Any) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, task_type="CAUSAL_LM", **options)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.rand(param.shape, generator=generator))
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return out


def deltas_of(base_dir: Path, folder: Path) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    return {
        k[: -len(".weight")]: (v - before[k]).double()
        for k, v in merged.state_dict().items()
        if k in before and not torch.equal(v, before[k])
    }


def measure(deltas: dict[str, Any], exact: dict[str, Any]) -> tuple[float, float]:
    """Max abs error of the merged weights, worst relative Frobenius error of a module."""
    import torch

    abs_error, rel_error = 0.0, 0.0
    for module, want in exact.items():
        got = deltas.get(module, torch.zeros_like(want))
        abs_error = max(abs_error, float((got - want).abs().max()))
        rel_error = max(rel_error, float((got - want).norm() / want.norm()))
    return abs_error, rel_error


def logits_with(base_dir: Path, deltas: dict[str, Any], ids: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        for module, delta in deltas.items():
            model.get_submodule(module).weight.add_(delta.float())
        return model(ids).logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--profile", action="store_true", help="Print a profile of clara's last build.")
    args = parser.parse_args()

    import torch
    from click.testing import CliRunner
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from clara_core.cli import ClaraContext, cli
    from clara_core.composites import CompositeRequest, build_composite
    from clara_core.plugins import PluginManager
    from clara_core.tinymodels import build_llama
    from clara_core.workspace import Workspace

    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = Path(tempfile.mkdtemp(prefix="bench-composite-"))
    base_dir = build_llama(
        root / "base", hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_layers=args.layers
    )
    folders = {
        name: make_adapter(base_dir, root / name, rank, seed, **options)
        for seed, (name, (rank, options)) in enumerate(ADAPTERS.items(), 1)
    }
    ws, _ = Workspace.init(root / "ws")
    plugins = PluginManager()

    def run(*argv: str) -> None:
        result = CliRunner().invoke(cli, list(argv), obj=ClaraContext(workspace=ws.root, plugins=plugins))
        assert result.exit_code == 0, result.output

    run("base", "add", str(base_dir), "--name", "bench")
    ids = {}
    for name, folder in folders.items():
        run("adapters", "register", str(folder), "--domain", name)
        method = "dora" if ADAPTERS[name][1].get("use_dora") else "lora"
        ids[name] = f"{name}-{method}-r{ADAPTERS[name][0]}-v1"

    rows: list[dict[str, Any]] = []
    scenarios = {
        "lora r8 + rsLoRA r16 + DoRA r4": list(ADAPTERS),
        "lora r8 + rsLoRA r16": ["steuer", "verfahren"],
    }
    for label, names in scenarios.items():
        exact: dict[str, Any] = {}
        for name in names:
            folder = folders[name]
            for module, delta in deltas_of(base_dir, folder).items():
                exact[module] = exact.get(module, 0) + WEIGHTS[name] * delta
        tokens = torch.randint(3, 200, (1, 32), generator=torch.Generator().manual_seed(0))
        want_logits = logits_with(base_dir, exact, tokens)

        # clara: a fresh --out per run, so every run builds
        times = []
        for i in range(args.repeat):
            request = CompositeRequest(
                adapter_ids=[ids[n] for n in names], strategy="weighted", weights=[WEIGHTS[n] for n in names],
                out=root / f"out{label}{i}",
            )  # fmt: skip
            start = time.perf_counter()
            if i == args.repeat - 1 and "--profile" in sys.argv[1:]:
                import cProfile
                import pstats

                profiler = cProfile.Profile()
                result = profiler.runcall(build_composite, request, ws, plugins)
                pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
            else:
                result = build_composite(request, ws, plugins)
            times.append(time.perf_counter() - start)
            if i < args.repeat - 1:  # keep the last one registered; forget the others so the next run builds
                import shutil
                import sqlite3

                conn = sqlite3.connect(ws.registry_path)
                conn.execute("DELETE FROM lineage WHERE composite_id = ?", [result.record.id])
                conn.execute("DELETE FROM adapters WHERE id = ?", [result.record.id])
                conn.commit()
                conn.close()
                shutil.rmtree(result.record.path)
        clara_deltas = deltas_of(base_dir, result.record.path)
        abs_error, rel_error = measure(clara_deltas, exact)
        logits = float((logits_with(base_dir, clara_deltas, tokens) - want_logits).abs().max())
        rows.append(
            {
                "scenario": label,
                "method": "clara weighted",
                "rank": result.record.rank,
                "seconds": statistics.median(times),
                "max_abs_error": abs_error,
                "max_rel_error": rel_error,
                "recorded_rel_error": result.max_error,
                "logits_diff": logits,
            }
        )

        # PEFT add_weighted_adapter on the same adapters
        for combination in ("cat", "svd", "linear"):
            ranks = {ADAPTERS[n][0] for n in names}
            if combination == "linear" and len(ranks) > 1:
                rows.append(
                    {
                        "scenario": label,
                        "method": "peft linear",
                        "skipped": f"needs equal ranks (these are {sorted(ranks)})",
                    }
                )
                continue
            if combination == "cat":
                # What a user does with PEFT alone to get a composite folder: load the base and the adapters,
                # combine, save. clara's time above covers the same ground (plus checksums and registering).
                end_to_end = []
                for i in range(args.repeat):
                    start = time.perf_counter()
                    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
                    peft_model = PeftModel.from_pretrained(
                        model, str(folders[names[0]]), adapter_name=names[0]
                    )
                    for name in names[1:]:
                        peft_model.load_adapter(str(folders[name]), adapter_name=name)
                    peft_model.add_weighted_adapter(
                        names, [WEIGHTS[n] for n in names], "combined", combination_type="cat"
                    )
                    peft_model.save_pretrained(str(root / f"peft{label}{i}"), selected_adapters=["combined"])
                    end_to_end.append(time.perf_counter() - start)
                rows.append(
                    {
                        "scenario": label,
                        "method": "peft cat, load + merge + save",
                        "seconds": statistics.median(end_to_end),
                    }
                )
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            peft_model = PeftModel.from_pretrained(model, str(folders[names[0]]), adapter_name=names[0])
            for name in names[1:]:
                peft_model.load_adapter(str(folders[name]), adapter_name=name)
            try:
                start = time.perf_counter()
                peft_model.add_weighted_adapter(
                    names, [WEIGHTS[n] for n in names], "combined", combination_type=combination
                )
                seconds = time.perf_counter() - start
            except Exception as exc:
                rows.append(
                    {
                        "scenario": label,
                        "method": f"peft {combination}",
                        "skipped": f"{type(exc).__name__}: {exc}"[:120],
                    }
                )
                continue
            peft_model.set_adapter("combined")
            before = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).state_dict()
            with torch.no_grad():
                peft_logits = peft_model(tokens).logits
            merged = peft_model.merge_and_unload(adapter_names=["combined"])
            peft_deltas = {
                k[: -len(".weight")]: (v - before[k]).double()
                for k, v in merged.state_dict().items()
                if k in before and not torch.equal(v, before[k])
            }
            abs_error, rel_error = measure(peft_deltas, exact)
            rows.append(
                {
                    "scenario": label,
                    "method": f"peft {combination}",
                    "rank": "",
                    "seconds": seconds,
                    "max_abs_error": abs_error,
                    "max_rel_error": rel_error,
                    "recorded_rel_error": None,
                    "logits_diff": float((peft_logits - want_logits).abs().max()),
                }
            )

    print(f"Llama hidden {args.hidden}, {args.layers} layers; weights {WEIGHTS}; torch {torch.__version__}; {sys.platform}")  # fmt: skip
    print()
    print(
        "| scenario | method | build s | max abs error of W | worst rel. error | recorded | max logits diff |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "skipped" in row:
            print(f"| {row['scenario']} | {row['method']} | - | - | - | - | {row['skipped']} |")
            continue
        if "max_abs_error" not in row:  # a timing-only row (PEFT end to end)
            print(f"| {row['scenario']} | {row['method']} | {row['seconds']:.3f} | | | | |")
            continue
        recorded = "-" if row["recorded_rel_error"] is None else f"{row['recorded_rel_error']:.2e}"
        print(
            f"| {row['scenario']} | {row['method']} | {row['seconds']:.3f} | {row['max_abs_error']:.2e} | {row['max_rel_error']:.2e} "
            f"| {recorded} | {row['logits_diff']:.2e} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
