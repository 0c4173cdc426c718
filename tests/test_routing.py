"""Routing: clara router fit / eval / keywords, clara route, the staleness check and every bad input, on the law
corpora (fitted centroids and learned keywords for steuerrecht, sozialrecht and verfahren over tiny adapters)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from clara_core.cli import ClaraContext, cli
from clara_core.plugins import PluginManager
from clara_core.registry import Registry
from clara_core.workspace import Workspace

from .conftest import GESETZE as _GESETZE
from .conftest import REPO_ROOT

DOMAINS = ["steuerrecht", "sozialrecht", "verfahren"]
# the corpora live beside the project (../shared); a worktree one folder deeper finds them one level up
GESETZE = next(
    (p for p in (_GESETZE, REPO_ROOT.parents[1] / "shared" / "data" / "gesetze") if p.is_dir()), _GESETZE
)
needs_gesetze = pytest.mark.skipif(not GESETZE.is_dir(), reason=f"law corpora not found at {GESETZE}")


def _run(ws: Workspace, *args: str) -> Result:
    obj = ClaraContext(
        workspace=ws.root, plugins=PluginManager()
    )  # the installed plugins: clara-plugin-router
    return CliRunner().invoke(cli, list(args), obj=obj)


@pytest.fixture(scope="module")
def law_ws(tmp_path_factory: pytest.TempPathFactory, tiny_base_dir: Path) -> Workspace:
    from clara_core.tinymodels import random_lora_adapter

    root = tmp_path_factory.mktemp("route")
    ws, _ = Workspace.init(root / "ws")
    with Registry.open(ws.registry_path) as registry:
        registry.add_base(tiny_base_dir, name="tiny", workspace=ws)
    for i, domain in enumerate(DOMAINS):
        made = random_lora_adapter(tiny_base_dir, root / "made" / domain, seed=i + 1)
        result = _run(ws, "adapters", "register", str(made), "--domain", domain, "--base", "tiny")
        assert result.exit_code == 0, result.output
    return ws


def _data_args() -> list[str]:
    return [f"--data={d}={GESETZE / d / 'train.jsonl'}" for d in DOMAINS]


@pytest.fixture(scope="module")
def dev_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three domains' dev sections, the first 15 of each (the tiny base runs on a shared CPU)."""
    path = tmp_path_factory.mktemp("dev") / "dev.jsonl"
    lines = [line for d in DOMAINS for line in (GESETZE / d / "dev.jsonl").read_text().splitlines()[:15]]
    path.write_text("\n".join(lines) + "\n")
    return path


@needs_gesetze
@pytest.mark.parametrize("router", ["keyword", "embedding", "arrow"])
def test_fit_eval_and_route_on_the_law_corpora(
    law_ws: Workspace, dev_file: Path, router: str, tmp_path: Path
) -> None:
    fitted = _run(
        law_ws,
        "router",
        "fit",
        "--router",
        router,
        *_data_args(),
        "--sample",
        "400" if router == "keyword" else "40",
    )
    assert fitted.exit_code == 0, fitted.output
    assert f"Fitted router '{router}' for base 'tiny'" in fitted.output
    manifest = json.loads((law_ws.metadata_dir / "routers" / router / "manifest.json").read_text())
    assert sorted(manifest["adapters"]) == sorted(f"{d}-lora-r4-v1" for d in DOMAINS)

    plot = tmp_path / "confusion.png"
    result = _run(
        law_ws,
        "router",
        "eval",
        "--router",
        router,
        "--labeled",
        str(dev_file),
        "--plot",
        str(plot),
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    n = 3 * 15
    assert report["records"] == n == sum(map(sum, report["confusion"]))
    assert set(DOMAINS) <= set(report["labels"])
    assert 0 < report["latency_seconds"]["p50"] <= report["latency_seconds"]["p95"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    diagonal = sum(report["confusion"][i][i] for i in range(len(report["labels"])))
    assert report["accuracy"] == pytest.approx(diagonal / n)
    if router == "keyword":
        # words learned from the training sections (Steuer, Leistungen, Verwaltungsakt, ...) carry over
        assert report["accuracy"] >= 0.6, report
        for domain in DOMAINS:
            assert report["per_domain"][domain]["recall"] >= 0.5, report["per_domain"]
    # the tiny base has random weights: its hidden states need not separate the domains, so the embedding
    # router's accuracy here says nothing (benchmarks/route/README.md); the machinery must still hold

    if router != "keyword":
        return
    printed = _run(law_ws, "router", "eval", "--router", router, "--labeled", str(dev_file))
    assert printed.exit_code == 0, printed.output
    assert "accuracy" in printed.output and "confusion" in printed.output and "p95" in printed.output

    routed = _run(
        law_ws, "route", "Das Finanzamt setzt die Einkommensteuer fest.", "--router", router, "--json"
    )
    assert routed.exit_code == 0, routed.output
    decision = json.loads(routed.stdout)
    assert set(decision["scores"]) == set(manifest["adapters"]) and decision["seconds"] > 0
    assert decision["adapter_id"] == "steuerrecht-lora-r4-v1"
    plain = _run(law_ws, "route", "Wie wird das Wetter morgen?", "--router", router)
    assert plain.exit_code == 0 and plain.output.startswith("(base 'tiny')"), plain.output


@needs_gesetze
def test_embedding_fit_is_cached_per_adapter_checksum(law_ws: Workspace) -> None:
    from clara_core.routing import fit_router, local_embedder, parse_data_options

    with Registry.open(law_ws.registry_path) as registry:
        base = registry.choose_base(None)
    inner = local_embedder(base)
    embedded: list[int] = []

    def counting(texts, *, layer=None):
        embedded.append(len(texts))
        return inner(texts, layer=layer)

    data = parse_data_options([a.split("=", 1)[1] for a in _data_args()])
    kwargs = {"data": data, "sample": 10, "embed": counting}
    fit_router(law_ws, PluginManager(), "embedding", **kwargs)
    first = sum(embedded)
    embedded.clear()
    fit_router(law_ws, PluginManager(), "embedding", **kwargs)
    assert first == 3 * 10 + sum(embedded)  # the second fit embeds only the held-out texts for the threshold
    embedded.clear()
    fit_router(law_ws, PluginManager(), "embedding", options={"layer": 1}, **kwargs)
    assert sum(embedded) == first  # another layer: other embeddings, nothing cached applies


@needs_gesetze
def test_layer_auto_compares_layers_on_held_out_texts_and_says_which_it_chose(law_ws: Workspace) -> None:
    import re

    result = _run(law_ws, "router", "fit", "-o", "layer=auto", "--sample", "10", *_data_args())
    assert result.exit_code == 0, result.output
    said = re.search(r"layer=auto: held-out accuracy by layer (.*); chose layer (\d+)", result.output)
    assert said, result.output
    compared = dict(part.split() for part in said.group(1).split(", "))
    assert sorted(compared, key=int) == ["0", "1", "2"]  # the tiny base's layers: 0, 1/4 .. 3/4, last
    best = max(float(v.rstrip("%")) for v in compared.values())
    assert float(compared[said.group(2)].rstrip("%")) == best  # the chosen layer is the most accurate
    manifest = json.loads((law_ws.root / "metadata" / "routers" / "embedding" / "manifest.json").read_text())
    assert manifest["summary"].startswith("layer=auto")
    routed = _run(law_ws, "route", "Wer setzt die Einkommensteuer fest?", "--json")
    assert routed.exit_code == 0, routed.output


def test_early_layers_stop_the_forward_pass_and_equal_the_full_passes_hidden_states(
    tiny_base_dir: Path,
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clara_core.errors import InvalidInput
    from clara_core.routing.embed import LocalEmbedder, _decoder_layers, layer_count

    texts = ["Das Finanzamt setzt die Steuer fest.", "Klage beim Verwaltungsgericht", "kurz"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).eval()
    count = layer_count(model)
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        full = model(**encoded, output_hidden_states=True).hidden_states
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    embedder = LocalEmbedder(tiny_base_dir)
    ran: list[int] = []
    for layer in [0, 1, count, -1]:
        expected = (full[layer] * mask).sum(1) / mask.sum(1)
        embedder(["warm-up"], layer=layer)  # loads the model
        handles = [
            m.register_forward_hook(lambda *_a, i=i: ran.append(i))
            for i, m in enumerate(_decoder_layers(embedder._model, count))
        ]
        try:
            ran.clear()
            got = embedder(texts, layer=layer)
        finally:
            for h in handles:
                h.remove()
        assert torch.tensor(got) == pytest.approx(expected, rel=1e-4, abs=1e-5), layer
        # only the decoder layers up to the wanted one ran
        assert sorted(set(ran)) == list(range(count if layer in (count, -1) else layer)), (layer, ran)
    with pytest.raises(InvalidInput, match=f"layer 9: the base has {count} decoder layers; use 0"):
        embedder(texts, layer=9)


@needs_gesetze
def test_a_router_state_of_an_older_format_is_refused_with_the_refit_command(
    law_ws: Workspace, tmp_path: Path
) -> None:
    import shutil

    shutil.copytree(law_ws.root, tmp_path / "ws")
    ws = Workspace.find(tmp_path / "ws")
    assert _run(ws, "router", "fit", *_data_args(), "--sample", "8").exit_code == 0
    state = ws.metadata_dir / "routers" / "embedding" / "state" / "router.json"
    assert json.loads(state.read_text())["format"] == 2
    # what the first embedding router wrote: centroids in the JSON, no format
    state.write_text(json.dumps({"base_model_hash": "x", "centre": [0.0], "centroids": {}, "threshold": 0.1}))
    result = _run(ws, "route", "Steuer?")
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "state has format 1" in lines[0] and "run 'clara router fit --router embedding'" in lines[0], lines
    bad = _run(ws, "router", "fit", *_data_args(), "--sample", "8", "-o", "layer=99")
    assert bad.exit_code != 0 and "layer 99: the base has" in bad.output and "Traceback" not in bad.output


def test_stale_router_and_bad_input_are_one_line(
    tmp_path: Path, tiny_base_dir: Path, fake_adapter: Callable[..., Path]
) -> None:
    ws, _ = Workspace.init(tmp_path / "ws")
    with Registry.open(ws.registry_path) as registry:
        registry.add_base(tiny_base_dir, name="tiny", workspace=ws)
    assert (
        _run(
            ws, "adapters", "register", str(fake_adapter("a")), "--domain", "steuer", "--base", "tiny"
        ).exit_code
        == 0
    )
    assert (
        _run(
            ws, "adapters", "register", str(fake_adapter("b", seed=1)), "--domain", "sozial", "--base", "tiny"
        ).exit_code
        == 0
    )
    data = tmp_path / "data"
    data.mkdir()
    (data / "steuer.jsonl").write_text(
        "".join(json.dumps({"text": f"Das Finanzamt setzt die Steuer {i} fest."}) + "\n" for i in range(10))
    )
    (data / "sozial.jsonl").write_text(
        "".join(
            json.dumps({"prompt": f"Leistungen nach dem Buch {i}?", "completion": "ja"}) + "\n"
            for i in range(10)
        )
    )

    def fails(*args: str, expect: str) -> None:
        result = _run(ws, *args)
        assert result.exit_code != 0, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in result.output, result.output
        assert expect in lines[0], lines[0]

    fails(
        "route",
        "Steuer?",
        "--router",
        "keyword",
        expect="not fitted yet; run 'clara router fit --router keyword'",
    )
    fails(
        "router", "fit", "--router", "keyword", expect="give its training data with --data sozial=FILE.jsonl"
    )
    fails("router", "fit", "--data", "steuer", expect="expected DOMAIN=FILE")
    fails("router", "fit", "--data", f"bau={data / 'steuer.jsonl'}", expect="no adapter of domain 'bau'")
    fails("router", "fit", "--threshold", "1.5", expect="--threshold must be between 0 and 1, got 1.5")
    fails("router", "fit", "-o", "threshold=-0.1", expect="between 0 and 1")
    fails("router", "fit", "-o", "nonsense=1", expect="router 'embedding' has no option 'nonsense'")
    fails(
        "router",
        "keywords",
        "add",
        "steuer",
        "§ (\\d+ EStG",
        expect="invalid regular expression '§ (\\\\d+ EStG'",
    )
    assert _run(ws, "router", "keywords", "add", "steuer", "Finanzamt", "§ \\d+ EStG").exit_code == 0
    listed = _run(ws, "router", "keywords", "list", "--json")
    assert json.loads(listed.output) == {"steuer": ["Finanzamt", "§ \\d+ EStG"]}
    fails("router", "keywords", "rm", "steuer", "Zoll", expect="domain 'steuer' has no keyword 'Zoll'")

    args = [
        "router",
        "fit",
        "--router",
        "keyword",
        "--data",
        f"steuer={data / 'steuer.jsonl'}",
        "--data",
        f"sozial={data / 'sozial.jsonl'}",
    ]
    assert _run(ws, *args).exit_code == 0
    routed = _run(ws, "route", "Was gilt nach § 7 EStG?", "--router", "keyword", "--json")
    assert json.loads(routed.output)["adapter_id"] == "steuer-lora-r4-v1"
    fails("route", "   ", "--router", "keyword", expect="empty prompt")

    labeled = tmp_path / "labeled.jsonl"
    labeled.write_text('{"text": "Finanzamt", "domain": "steuer"}\n{"text": "x", "domain": "bau"}\n')
    fails(
        "router",
        "eval",
        "--router",
        "keyword",
        "--labeled",
        str(labeled),
        expect=f"{labeled}:2: unknown domain 'bau'",
    )
    labeled.write_text('{"text": "Finanzamt", "domain": "steuer"}\n\n{"text": "x"\n')
    fails(
        "router",
        "eval",
        "--router",
        "keyword",
        "--labeled",
        str(labeled),
        expect=f"{labeled}:3: invalid JSON",
    )
    labeled.write_text('{"text": "Finanzamt", "domain": "steuer"}\n{"domain": "steuer"}\n')
    fails(
        "router",
        "eval",
        "--router",
        "keyword",
        "--labeled",
        str(labeled),
        expect=f"{labeled}:2: needs a non-empty string 'text'",
    )

    # keywords edited after the fit: stale
    assert _run(ws, "router", "keywords", "rm", "steuer", "Finanzamt").exit_code == 0
    fails(
        "route",
        "Steuer?",
        "--router",
        "keyword",
        expect="the keywords changed since the fit; run 'clara router fit --router keyword'",
    )
    assert _run(ws, *args).exit_code == 0
    # a composite built after the fit is not routed to unless named: the router stays fresh, and a refit does
    # not ask for the composite's training data (it has none of its own)
    built = _run(
        ws,
        "composite",
        "build",
        "--adapters",
        "steuer-lora-r4-v1",
        "sozial-lora-r4-v1",
        "--strategy",
        "additive",
    )
    assert built.exit_code == 0, built.output
    assert _run(ws, "route", "Was gilt nach § 7 EStG?", "--router", "keyword").exit_code == 0
    assert _run(ws, *args).exit_code == 0
    composite_id = json.loads(_run(ws, "composite", "list", "--json").stdout)[0]["id"]
    assert _run(ws, "adapters", "rm", composite_id, "--yes").exit_code == 0
    # an adapter registered after the fit: stale, with the command to refit
    assert (
        _run(
            ws, "adapters", "register", str(fake_adapter("c", seed=2)), "--domain", "bau", "--base", "tiny"
        ).exit_code
        == 0
    )
    fails(
        "route",
        "Steuer?",
        "--router",
        "keyword",
        expect="router 'keyword' is stale: adapter 'bau-lora-r4-v1' was registered after the fit; run 'clara router fit --router keyword'",
    )
    # fitted on a chosen set: a new adapter does not matter, a removed one does
    assert (
        _run(ws, *args, "--adapters", "steuer-lora-r4-v1", "--adapters", "sozial-lora-r4-v1").exit_code == 0
    )
    assert _run(ws, "route", "Steuer?", "--router", "keyword").exit_code == 0
    assert _run(ws, "adapters", "rm", "sozial-lora-r4-v1", "--yes").exit_code == 0
    fails(
        "route",
        "Steuer?",
        "--router",
        "keyword",
        expect="adapter 'sozial-lora-r4-v1' is no longer registered; run 'clara router fit --router keyword --adapters",
    )
    fails("route", "Steuer?", "--router", "nope", expect="nope")
