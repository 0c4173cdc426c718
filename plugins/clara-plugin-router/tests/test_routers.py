"""The built-in routers on their own: fake embeddings (one axis per domain) and hand-made adapter records."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import attrs
import pytest
from clara_plugin_router import EmbeddingRouter, KeywordRouter

from clara_core.plugin_api import InvalidInput, RouteRequest, RouterFitRequest

VOCAB = ["steuer", "sozial", "klage"]


def embed(texts, *, layer=None):
    """A vector per text: how often each domain word occurs, plus a constant all texts share."""
    return [[t.lower().count(w) + 0.1 for w in VOCAB] + [1.0] for t in texts]


def adapters(*domains: str, checksum: str = "c"):
    return [SimpleNamespace(id=f"{d}-lora-r4-v1", domain=[d], adapter_checksum=checksum + d) for d in domains]


BASE = SimpleNamespace(base_model_hash="h" * 64, name="tiny")
EXAMPLES = {
    "steuer-lora-r4-v1": ["steuer steuer", "die steuer", "steuer zahlen"],
    "sozial-lora-r4-v1": ["sozial sozial", "sozial hilfe", "die sozial"],
}


def fit(router, tmp_path: Path | None = None, **options):
    counted = []

    def counting(texts, *, layer=None):
        counted.extend(texts)
        return embed(texts, layer=layer)

    router.fit(
        RouterFitRequest(
            adapters=adapters("steuer", "sozial"),
            base=BASE,
            options=options,
            examples=EXAMPLES,
            held_out={"steuer-lora-r4-v1": ["steuer"], "sozial-lora-r4-v1": ["sozial"]},
            embed=counting,
            previous=tmp_path,
        )
    )
    return counted


def test_embedding_router_routes_by_centroid_and_leaves_the_rest_to_the_base(tmp_path: Path) -> None:
    router = EmbeddingRouter()
    fit(router, threshold=0.9)
    route = router.route_batch(
        [RouteRequest(prompt=p, embed=embed) for p in ["mehr steuer", "sozial frage", "ganz anderes"]]
    )
    assert [d.adapter_id for d in route] == ["steuer-lora-r4-v1", "sozial-lora-r4-v1", None]
    assert route[0].scores["steuer-lora-r4-v1"] > route[0].scores["sozial-lora-r4-v1"]
    router.save(tmp_path)
    again = EmbeddingRouter()
    again.load(tmp_path)
    assert again.route(RouteRequest(prompt="mehr steuer", embed=embed)).adapter_id == "steuer-lora-r4-v1"
    # refit on the same adapters: only the held-out texts are embedded again (centroids cached per checksum)
    counted = fit(EmbeddingRouter(), tmp_path)
    assert counted == ["steuer", "sozial"]


def test_fitted_threshold_lets_held_out_texts_through_and_options_are_checked() -> None:
    router = EmbeddingRouter()
    fit(router)
    assert router.state["threshold_source"] == "held-out" and 0 <= router.state["threshold"] <= 1
    assert router.route(RouteRequest(prompt="steuer", embed=embed)).adapter_id == "steuer-lora-r4-v1"
    with pytest.raises(InvalidInput, match="threshold must be between 0 and 1, got 1.5"):
        fit(EmbeddingRouter(), threshold=1.5)
    with pytest.raises(InvalidInput, match="centroids must be at least 1"):
        fit(EmbeddingRouter(), centroids=0)
    with pytest.raises(InvalidInput, match="needs the base model's embeddings"):
        router.route(RouteRequest(prompt="steuer"))


def test_layer_auto_chooses_the_most_accurate_layer_on_held_out_texts(tmp_path: Path) -> None:
    """Only layer 2 of a 4-layer base tells the domains apart (the others see every text alike, with noise):
    layer=auto compares 0, 1, 2, 3 and 4 on the held-out texts, chooses 2, says so, and routes at layer 2."""
    import numpy as np

    calls: list[int | None] = []

    def layered(texts, *, layer=None):
        calls.append(layer)
        informative = [[t.lower().count(w) + 0.1 for w in VOCAB] + [1.0] for t in texts]
        if layer == 2:
            return informative
        rng = np.random.default_rng(layer or 0)
        return (np.ones((len(texts), 4)) + 0.01 * rng.standard_normal((len(texts), 4))).tolist()

    base = SimpleNamespace(base_model_hash="h" * 64, name="tiny", config={"num_hidden_layers": 4})
    held = {
        "steuer-lora-r4-v1": ["steuer hoch", "die steuer steuer"],
        "sozial-lora-r4-v1": ["sozial geld", "sozial sozial"],
    }
    request = RouterFitRequest(
        adapters=adapters("steuer", "sozial"), base=base, options={"layer": "auto"}, examples=EXAMPLES,
        held_out=held, embed=layered,
    )  # fmt: skip
    router = EmbeddingRouter()
    router.fit(request)
    # every layer embeds each adapter's training texts and the held-out texts once (none again for the choice)
    assert sorted(calls) == sorted([0, 1, 2, 3, 4] * 3)
    assert router.state["layer"] == 2 and router.state["layer_accuracy"]["2"] == 1.0
    assert "chose layer 2" in router.summary() and "-o layer=2" in router.summary()
    calls.clear()
    assert router.route(RouteRequest(prompt="mehr steuer", embed=layered)).adapter_id == "steuer-lora-r4-v1"
    assert calls == [2]
    router.save(tmp_path)
    again = EmbeddingRouter()
    again.load(tmp_path)
    assert again.route(RouteRequest(prompt="sozial hilfe", embed=layered)).adapter_id == "sozial-lora-r4-v1"
    assert EmbeddingRouter().summary() is None  # a fixed layer has nothing to report
    with pytest.raises(InvalidInput, match="no held-out texts are left"):
        EmbeddingRouter().fit(attrs.evolve(request, held_out={}))
    with pytest.raises(InvalidInput, match="layer must be a whole number .* or 'auto', got 'middle'"):
        EmbeddingRouter().fit(attrs.evolve(request, options={"layer": "middle"}))


def test_keyword_router_uses_patterns_and_learned_words(tmp_path: Path) -> None:
    router = KeywordRouter()
    router.fit(
        RouterFitRequest(
            adapters=adapters("steuer", "sozial", "verfahren"),
            base=BASE,
            examples={
                **EXAMPLES,
                "verfahren-lora-r4-v1": ["klage beim gericht", "die klage", "klage erheben"],
            },
            keywords={"verfahren": [r"§ \d+ VwGO"]},
        )
    )
    assert router.route(RouteRequest(prompt="Nach § 42 VwGO")).adapter_id == "verfahren-lora-r4-v1"
    assert router.route(RouteRequest(prompt="Die Steuer ist hoch")).adapter_id == "steuer-lora-r4-v1"
    nothing = router.route(RouteRequest(prompt="Wetter"))
    assert nothing.adapter_id is None and nothing.score == 0.0
    router.save(tmp_path)
    again = KeywordRouter()
    again.load(tmp_path)
    assert again.route(RouteRequest(prompt="Klage!")).adapter_id == "verfahren-lora-r4-v1"
    with pytest.raises(InvalidInput, match="no keywords for sozial, steuer"):
        KeywordRouter().fit(
            RouterFitRequest(adapters=adapters("steuer", "sozial"), base=BASE, options={"learn": 0})
        )


def test_arrow_router_routes_prompts_along_the_adapters_delta_directions(tmp_path: Path) -> None:
    """Adapters whose deltas B @ A have known top right singular vectors (one direction per domain, per layer):
    prompts whose hidden states lie along a domain's direction go to that domain's adapter; a prompt
    orthogonal to every direction goes to the base."""
    import numpy as np
    import torch
    from clara_plugin_router import ArrowRouter, top_right_singular_vector
    from safetensors.torch import save_file

    dim, rank, layers = 16, 4, 2
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]  # orthonormal columns
    direction = {"steuer": basis[:, 0], "sozial": basis[:, 1], "klage": basis[:, 2]}
    records = []
    for d, u in direction.items():
        tensors = {}
        for layer in range(layers):
            for module in ("q_proj", "o_proj"):
                # A's rows: u strongly, plus a little noise; B random: the delta's top right singular vector is
                # close to u (o_proj gets a wrong direction: it is not read, its input is not the residual)
                a = 3.0 * np.outer(rng.standard_normal(rank), u) + 0.05 * rng.standard_normal((rank, dim))
                if module == "o_proj":
                    a = 3.0 * np.outer(rng.standard_normal(rank), basis[:, 5])
                b = rng.standard_normal((dim, rank))
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
                tensors[f"{prefix}.lora_A.weight"] = torch.tensor(a, dtype=torch.float32)
                tensors[f"{prefix}.lora_B.weight"] = torch.tensor(b, dtype=torch.float32)
                if module == "q_proj" and layer == 0 and d == "steuer":
                    v = top_right_singular_vector(a, b)
                    assert abs(float(v @ u)) > 0.99
                    full = np.linalg.svd(b @ a)[2][0]  # the same vector as the full SVD of the formed delta
                    assert abs(float(v @ full)) > 0.9999
        folder = tmp_path / d
        folder.mkdir()
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        records.append(
            SimpleNamespace(id=f"{d}-lora-r4-v1", domain=[d], adapter_checksum=d, path=str(folder))
        )

    asked: list[int | None] = []

    def hidden(texts, *, layer=None):
        """Each text's hidden state: the sum of the directions of the domain words in it, plus noise."""
        asked.append(layer)
        out = []
        for t in texts:
            v = 0.1 * rng.standard_normal(dim)
            for d, u in direction.items():
                v = v + 2.0 * t.count(d) * u
            if "leer" in t:
                v = basis[:, 7] + 0.01 * rng.standard_normal(dim)
            out.append(v.tolist())
        return out

    router = ArrowRouter()
    router.fit(
        RouterFitRequest(
            adapters=records,
            base=BASE,
            held_out={r.id: [f"{r.domain[0]} text", f"mehr {r.domain[0]}"] for r in records},
            embed=hidden,
        )
    )
    assert len(router.prototypes) == 3 * layers  # q_proj of each layer; o_proj left out
    assert 0 < router.state["threshold"] < 1
    asked.clear()
    decisions = router.route_batch(
        [
            RouteRequest(prompt=p, embed=hidden)
            for p in ["die steuer", "sozial hilfe", "klage erheben", "leer"]
        ]
    )
    assert [d.adapter_id for d in decisions] == [
        "steuer-lora-r4-v1",
        "sozial-lora-r4-v1",
        "klage-lora-r4-v1",
        None,
    ]
    assert sorted(asked) == [0, 1]  # the hidden states entering each adapted layer, one pass per layer
    assert decisions[0].scores["steuer-lora-r4-v1"] > 0.9 > 0.2 > decisions[0].scores["sozial-lora-r4-v1"]
    router.save(tmp_path)
    again = ArrowRouter()
    again.load(tmp_path)
    assert again.route(RouteRequest(prompt="sozial", embed=hidden)).adapter_id == "sozial-lora-r4-v1"
