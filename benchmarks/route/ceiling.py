"""How far can any router get on the law corpora, by their text alone? The upper bounds behind the routing
benchmark's 95% target, measured on the same two splits as ``bench_route.py`` (fitted on train sections only):

1. **near copies**: dev sections (and unseen-law sections) whose body has a near-identical counterpart
   (tf-idf cosine >= 0.8) in *another* domain's training sections; no router that reads the text can tell
   such a pair apart, so about half of them are lost whatever the features;
2. **supervised classifiers on all words** of each section (no model, no truncation): a linear SVM, logistic
   regression and multinomial naive Bayes on tf-idf words: discriminative classifiers trained on the labels,
   a stronger reader than any centroid router;
3. **the embedding router's own code** (clara-plugin-router's ``EmbeddingRouter``, its defaults) on the exact
   bag of the first 128 BPE tokens (what a base whose token embeddings kept every token apart would give) and on
   random projections of it to 512 / 2048 dimensions (what a randomly initialised base's layer 0 is).

Needs scikit-learn (``pip install scikit-learn``; not a dependency of clara).

Usage: python benchmarks/route/ceiling.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_route import DOMAINS, UNSEEN, find_gesetze, read

NEAR_COPY = 0.8


def splits(gesetze: Path) -> dict[str, tuple[dict[str, list[dict]], list[dict]]]:
    train = {d: read(gesetze / d / "train.jsonl") for d in DOMAINS}
    dev = {d: read(gesetze / d / "dev.jsonl") for d in DOMAINS}
    return {
        "dev": (train, [r for d in DOMAINS for r in dev[d]]),
        "unseen laws": (
            {d: [r for r in train[d] if r["law"] not in UNSEEN[d]] for d in DOMAINS},
            [r for d in DOMAINS for r in train[d] + dev[d] if r["law"] in UNSEEN[d]],
        ),
    }


def body(record: dict) -> str:
    """The section's text without its heading line (the heading names the section, not the law)."""
    return record["text"].split("\n", 1)[-1]


def near_copies(fit: dict[str, list[dict]], evaluated: list[dict]) -> dict[str, Any]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    fitted = [r for d in DOMAINS for r in fit[d]]
    vec = TfidfVectorizer(sublinear_tf=True).fit([body(r) for r in fitted + evaluated])
    sims = (
        vec.transform([body(r) for r in evaluated]) @ vec.transform([body(r) for r in fitted]).T
    ).toarray()
    examples = []
    count = 0
    for record, row in zip(evaluated, sims, strict=True):
        other = [(s, f) for s, f in zip(row, fitted, strict=True) if f["domain"] != record["domain"]]
        best, twin = max(other, key=lambda pair: pair[0])
        if best >= NEAR_COPY:
            count += 1
            if len(examples) < 6:
                examples.append(
                    f"{record['law']} {record['section']} ({record['domain']}) ~ {twin['law']} {twin['section']} "
                    f"({twin['domain']}): {best:.2f}"
                )
    return {"count": count, "of": len(evaluated), "share": count / len(evaluated), "examples": examples}


def word_classifiers(fit: dict[str, list[dict]], evaluated: list[dict]) -> dict[str, float]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import MultinomialNB
    from sklearn.svm import LinearSVC

    fitted = [r for d in DOMAINS for r in fit[d]]
    vec = TfidfVectorizer(sublinear_tf=True, min_df=2)
    x = vec.fit_transform([r["text"] for r in fitted])
    y = [r["domain"] for r in fitted]
    xe = vec.transform([r["text"] for r in evaluated])
    out = {}
    for name, clf in (
        ("linear SVM", LinearSVC(C=1.0)),
        ("logistic regression", LogisticRegression(C=10.0, max_iter=2000)),
        ("naive Bayes", MultinomialNB(alpha=0.1)),
    ):
        predicted = clf.fit(x, y).predict(xe)
        out[name] = sum(p == r["domain"] for p, r in zip(predicted, evaluated, strict=True)) / len(evaluated)
    return out


def router_on_bags(fit: dict[str, list[dict]], evaluated: list[dict], tokenizer: Any, sample: int) -> dict:
    """The embedding router (its defaults, no threshold) on bags of the first 128 tokens: exact, and randomly
    projected as a random base's token embeddings project them."""
    import numpy as np
    from clara_plugin_router import EmbeddingRouter

    from clara_core.plugin_api import RouteRequest, RouterFitRequest
    from clara_core.routing.embed import MAX_TOKENS

    vocab = len(tokenizer)

    def bags(texts: list[str]) -> Any:
        out = np.zeros((len(texts), vocab), dtype=np.float32)
        for i, text in enumerate(texts):
            ids = tokenizer(text, truncation=True, max_length=MAX_TOKENS)["input_ids"]
            np.add.at(out[i], ids, 1.0 / max(1, len(ids)))
        return out

    adapters = [SimpleNamespace(id=d, domain=[d], adapter_checksum=d) for d in DOMAINS]
    base = SimpleNamespace(base_model_hash="bags", name="bags")
    examples = {d: [r["text"] for r in fit[d][:sample]] for d in DOMAINS}
    results = {}
    rng = np.random.default_rng(0)
    for label, dim in (("exact bag of tokens", None), ("random projection to 512", 512), ("to 2048", 2048)):
        table = None if dim is None else rng.normal(0.0, 0.02, (vocab, dim)).astype(np.float32)

        def embed(texts: Any, *, layer: int | None = None, table: Any = table) -> Any:
            b = bags(list(texts))
            return b if table is None else b @ table

        router = EmbeddingRouter()
        router.fit(
            RouterFitRequest(
                adapters=adapters, base=base, options={"threshold": 0.0}, examples=examples, embed=embed
            )
        )
        routed = router.route_batch([RouteRequest(prompt=r["text"], embed=embed) for r in evaluated])
        results[label] = sum(
            d.adapter_id == r["domain"] for d, r in zip(routed, evaluated, strict=True)
        ) / len(evaluated)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--sample", type=int, default=400, help="training texts per domain for the router")
    args = parser.parse_args()
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise SystemExit("ceiling.py needs scikit-learn: pip install scikit-learn") from None
    from clara_core.tinymodels import build_tokenizer

    gesetze = find_gesetze()
    corpus = [r["text"] for d in [*DOMAINS, "allgemein"] for r in read(gesetze / d / "train.jsonl")]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(corpus, Path(tmp), vocab_size=8000)  # the benchmark base's tokenizer
    results = {}
    for name, (fit, evaluated) in splits(gesetze).items():
        print(f"{name} ({len(evaluated)} sections)", flush=True)
        copies = near_copies(fit, evaluated)
        print(f"  near copies in another domain: {copies['count']} ({copies['share']:.1%})")
        for example in copies["examples"]:
            print(f"    {example}")
        words = word_classifiers(fit, evaluated)
        for label, acc in words.items():
            print(f"  {label} on all words: {acc:.1%}")
        bags = router_on_bags(fit, evaluated, tokenizer, args.sample)
        for label, acc in bags.items():
            print(f"  embedding router, {label}: {acc:.1%}")
        results[name] = {"near_copies": copies, "word_classifiers": words, "embedding_router_on_bags": bags}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
