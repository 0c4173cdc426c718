"""clara router fit|eval|keywords and clara route: choose the adapter for a prompt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..output import echo_json, echo_table

DEFAULT_ROUTER = "embedding"


def _embed_for(loaded: Any) -> Any:
    from ..routing import local_embedder

    return local_embedder(loaded.base) if loaded.router.needs_embeddings else None


@click.group()
def router() -> None:
    """Fit, evaluate and edit routers (which adapter answers a prompt; see also 'clara route').

    A router is fitted on the registered adapters of one base and saved in metadata/routers/NAME/. Registering,
    removing or changing an adapter, or editing keywords, makes it stale: clara then refuses it and names the
    command to refit. Built-in routers (clara-plugin-router): 'embedding' (the base model's own hidden states),
    'keyword' (patterns per domain) and 'arrow' (experimental: from the adapters' LoRA weights); 'clara plugins'
    lists all.
    """


@router.command("fit")
@click.option(
    "--router", "name", default=DEFAULT_ROUTER, show_default=True, metavar="NAME", help="Router to fit."
)
@click.option(
    "--adapters",
    "adapter_ids",
    multiple=True,
    metavar="ID",
    help="Adapters to choose among (repeat; default: every trained adapter of the base; composites and merged "
    "models only when named here).",
)
@click.option(
    "--data",
    "data",
    multiple=True,
    metavar="DOMAIN=FILE",
    help="Training texts of a domain (JSONL as for 'clara train'); default: each adapter's dataset_ref.",
)
@click.option("--base", "base_name", metavar="NAME", help="Base model (default: the only or default base).")
@click.option(
    "--threshold",
    type=float,
    metavar="X",
    help="Similarity (0..1) below which the base answers (default: the router's own; the embedding router fits it on held-out texts).",
)
@click.option(
    "--sample",
    type=int,
    default=200,
    show_default=True,
    help="Training texts per adapter to fit on (a fixed sample; up to a fifth as many more are held out).",
)
@click.option(
    "-o",
    "--option",
    "raw_options",
    multiple=True,
    metavar="NAME=VALUE",
    help="A router option (see 'clara plugins'), e.g. -o centroids=2.",
)
@click.pass_obj
def fit(
    obj: Any,
    name: str,
    adapter_ids: tuple[str, ...],
    data: tuple[str, ...],
    base_name: str | None,
    threshold: float | None,
    sample: int,
    raw_options: tuple[str, ...],
) -> None:
    """Fit a router on registered adapters and their training data.

    \b
    Examples:
      clara router fit
      clara router fit --router keyword
      clara router fit --data steuerrecht=data/steuer.jsonl --data sozialrecht=data/sozial.jsonl
    """
    from ..errors import InvalidInput
    from ..routing import fit_router, parse_data_options, parse_router_options

    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise InvalidInput(f"--threshold must be between 0 and 1, got {threshold:g}")
    plugins = obj.plugins
    options = parse_router_options(plugins, name, raw_options)
    if threshold is not None:
        options["threshold"] = threshold
    manifest = fit_router(
        obj.workspace(),
        plugins,
        name,
        adapter_ids=adapter_ids,
        data=parse_data_options(data),
        base_name=base_name,
        options=options,
        sample=sample,
    )
    counts = ", ".join(f"{a} ({n} texts)" for a, n in manifest["examples"].items())
    click.echo(f"Fitted router '{manifest['router']}' for base '{manifest['base']}' on {counts}.")
    if manifest.get("summary"):
        click.echo(manifest["summary"])


@click.command()
@click.argument("prompt")
@click.option(
    "--router",
    "name",
    default=DEFAULT_ROUTER,
    show_default=True,
    metavar="NAME",
    help="Fitted router to ask.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON.")
@click.pass_obj
def route(obj: Any, prompt: str, name: str, as_json: bool) -> None:
    """Say which adapter a router picks for PROMPT (or the base), with the score per adapter and the time.

    \b
    Example:
      clara route "Wann ist die Einkommensteuererklärung abzugeben?"
    """
    from ..routing import check_prompt, load_router, route_prompt

    check_prompt(prompt)
    loaded = load_router(obj.workspace(), obj.plugins, name)
    embed = _embed_for(loaded)
    if embed is not None:
        embed(["warm-up"])  # loading the model is not routing time
    decision, seconds = route_prompt(loaded, prompt, embed)
    if as_json:
        echo_json(
            {
                "router": loaded.name,
                "adapter_id": decision.adapter_id,
                "score": decision.score,
                "scores": decision.scores,
                "seconds": seconds,
            }
        )
        return
    chosen = decision.adapter_id or f"(base '{loaded.base.name}')"
    click.echo(f"{chosen}  score {decision.score:.3f}  ({seconds * 1000:.1f} ms, router '{loaded.name}')")
    rows = sorted(decision.scores.items(), key=lambda kv: -kv[1])
    echo_table(["adapter", "score"], [[a, f"{s:.3f}"] for a, s in rows])


@router.command("eval")
@click.option(
    "--router",
    "name",
    default=DEFAULT_ROUTER,
    show_default=True,
    metavar="NAME",
    help="Fitted router to evaluate.",
)
@click.option(
    "--labeled",
    "labeled",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE.jsonl",
    help="JSON lines with 'text' and 'domain' (a law corpus's dev.jsonl has both; domain 'base' for prompts the base should answer).",
)
@click.option(
    "--plot",
    "plot",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE.png",
    help="Also draw the confusion matrix (needs matplotlib, the 'plot' extra).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def eval_cmd(obj: Any, name: str, labeled: Path, plot: Path | None, as_json: bool) -> None:
    """Accuracy, precision and recall per domain, confusion matrix and latency p50/p95 on labelled prompts.

    \b
    Example:
      clara router eval --router embedding --labeled dev.jsonl --plot confusion.png
    """
    from ..routing import evaluate, load_router, plot_confusion, read_labeled

    loaded = load_router(obj.workspace(), obj.plugins, name)
    known = {d for domains in loaded.domains.values() for d in domains}
    records = read_labeled(labeled, known)
    embed = _embed_for(loaded)
    if embed is not None:
        embed(["warm-up"])
    result = evaluate(loaded, records, embed)
    if plot is not None:
        plot_confusion(result, plot)
        result["plot"] = str(plot)
    if as_json:
        echo_json(result)
        return
    lat = result["latency_seconds"]
    click.echo(
        f"router '{loaded.name}' on {result['records']} prompts: accuracy {result['accuracy']:.1%}, "
        f"latency p50 {lat['p50'] * 1000:.1f} ms, p95 {lat['p95'] * 1000:.1f} ms"
    )

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1%}"

    echo_table(
        ["domain", "precision", "recall", "prompts"],
        [[d, pct(m["precision"]), pct(m["recall"]), m["support"]] for d, m in result["per_domain"].items()],
    )
    click.echo("confusion (rows: labelled, columns: routed to)")
    labels = result["labels"]
    echo_table(["", *labels], [[t, *row] for t, row in zip(labels, result["confusion"], strict=True)])
    if plot is not None:
        click.echo(f"Wrote {plot}")


@router.group("keywords")
def keywords() -> None:
    """Keywords and regular expressions per domain for the 'keyword' router (refit it after a change)."""


@keywords.command("add")
@click.argument("domain")
@click.argument("patterns", nargs=-1, required=True)
@click.pass_obj
def keywords_add(obj: Any, domain: str, patterns: tuple[str, ...]) -> None:
    """Add PATTERNS (words or regular expressions, matched case-insensitively) to DOMAIN.

    \b
    Example:
      clara router keywords add steuerrecht Steuer Finanzamt '§ \\d+ EStG'
    """
    from ..routing import edit_keywords

    now = edit_keywords(obj.workspace(), domain.strip().lower(), add=patterns)
    click.echo(f"{domain}: {len(now)} keywords; refit with 'clara router fit --router keyword'")


@keywords.command("rm")
@click.argument("domain")
@click.argument("patterns", nargs=-1, required=True)
@click.pass_obj
def keywords_rm(obj: Any, domain: str, patterns: tuple[str, ...]) -> None:
    """Remove PATTERNS from DOMAIN."""
    from ..routing import edit_keywords

    now = edit_keywords(obj.workspace(), domain.strip().lower(), remove=patterns)
    click.echo(f"{domain}: {len(now)} keywords; refit with 'clara router fit --router keyword'")


@keywords.command("list")
@click.argument("domain", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_obj
def keywords_list(obj: Any, domain: str | None, as_json: bool) -> None:
    """List the keywords (of DOMAIN, or of all domains)."""
    from ..routing import load_keywords

    words = load_keywords(obj.workspace())
    if domain:
        words = {domain.strip().lower(): words.get(domain.strip().lower(), [])}
    if as_json:
        click.echo(json.dumps(words, ensure_ascii=False, indent=2))
        return
    echo_table(["domain", "keywords"], [[d, "  ".join(p)] for d, p in sorted(words.items())])
