"""The built-in routers on their own: fake embeddings (one axis per domain) and hand-made adapter records."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

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
