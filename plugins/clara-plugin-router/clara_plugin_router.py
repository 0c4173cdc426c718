"""clara's built-in routers.

``embedding``: texts become the base model's own mean-pooled hidden states (no extra model); each adapter gets
one or more centroids of a sample of its training data; a prompt goes to the adapter of the most similar
centroid (cosine, after removing the mean that all domains' embeddings share: ``scores``), or to the base when the
plain cosine to that adapter's mean direction (``score``) is below a threshold (fitted on held-out training texts:
95% of them pass; or set with ``--threshold X``). Centroids are cached per adapter checksum: a refit after one adapter changed embeds
only that adapter's texts.

``keyword``: per-domain regular expressions from ``clara router keywords add``, plus words the router learns
from the training data (frequent in one domain's texts, rare in the others'); a prompt goes to the adapter
with the most hits, to the base when nothing matches.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from clara_core.plugin_api import (
    InvalidInput,
    Option,
    RouteDecision,
    Router,
    RouteRequest,
    RouterFitRequest,
    RouterImpl,
    hookimpl,
)

STATE_FILE = "router.json"


def _threshold(options: Mapping[str, Any]) -> float | None:
    value = options.get("threshold")
    if value in (None, ""):
        return None
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"threshold must be a number between 0 and 1, got {value!r}") from None
    if not 0.0 <= threshold <= 1.0:
        raise InvalidInput(f"threshold must be between 0 and 1, got {threshold:g}")
    return threshold


def _positive_int(options: Mapping[str, Any], name: str, default: int) -> int:
    value = options.get(name, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} must be a whole number, got {value!r}") from None
    if number < 1:
        raise InvalidInput(f"{name} must be at least 1, got {number}")
    return number


def _read_state(state_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((state_dir / STATE_FILE).read_text(encoding="utf-8"))
    return data


# -- embedding ----------------------------------------------------------------------------------------------------


def _kmeans(points: Any, k: int, iterations: int = 20) -> Any:
    """k centroids of unit ``points`` (spherical k-means, deterministic farthest-point start)."""
    import numpy as np

    k = min(k, len(points))
    centroids = [points[0]]
    for _ in range(1, k):
        sims = np.max(points @ np.stack(centroids).T, axis=1)
        centroids.append(points[int(np.argmin(sims))])
    c = np.stack(centroids)
    for _ in range(iterations):
        assign = np.argmax(points @ c.T, axis=1)
        for j in range(k):
            members = points[assign == j]
            if len(members):
                c[j] = members.mean(axis=0)
        c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return c


def _unit(x: Any) -> Any:
    import numpy as np

    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class EmbeddingRouter(RouterImpl):
    needs_embeddings = True

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def fit(self, request: RouterFitRequest) -> None:
        import numpy as np

        if request.embed is None:
            raise InvalidInput("the embedding router needs the base model's embeddings")
        threshold = _threshold(request.options)
        k = _positive_int(request.options, "centroids", 1)
        cache: dict[str, Any] = {}
        if request.previous is not None and (request.previous / STATE_FILE).is_file():
            old = _read_state(request.previous)
            if old.get("base_model_hash") == request.base.base_model_hash:
                cache = old.get("cache", {})
        raw: dict[str, Any] = {}
        entries: dict[str, Any] = {}
        for adapter in request.adapters:
            texts = list(request.examples.get(adapter.id, []))
            if not texts:
                raise InvalidInput(
                    f"adapter '{adapter.id}' has no training texts to fit the embedding router on"
                )
            key = json.dumps([adapter.adapter_checksum, len(texts), sorted(texts)[:3]], ensure_ascii=False)
            hit = cache.get(adapter.id)
            if hit is not None and hit.get("key") == key:
                vectors = np.asarray(hit["mean_raw"]), np.asarray(hit["vectors"])
            else:
                emb = np.asarray(request.embed(texts), dtype=np.float64)
                vectors = emb.mean(axis=0), emb
            raw[adapter.id] = vectors
            entries[adapter.id] = {
                "key": key,
                "mean_raw": vectors[0].tolist(),
                "vectors": vectors[1].tolist(),
            }
        # the mean over adapters (not texts): every domain counts the same
        centre = np.mean([m for m, _ in raw.values()], axis=0)
        centroids = {a: _kmeans(_unit(v - centre), k).tolist() for a, (_, v) in raw.items()}
        plain = {a: _unit(_unit(v).mean(axis=0)).tolist() for a, (_, v) in raw.items()}
        self.state = {
            "base_model_hash": request.base.base_model_hash,
            "centre": centre.tolist(),
            "centroids": centroids,
            "plain": plain,
            "cache": entries,
            "threshold": threshold,
            "threshold_source": "option" if threshold is not None else "held-out",
        }
        if threshold is None:
            held = [t for a in request.adapters for t in request.held_out.get(a.id, [])]
            if held:
                best = [d.score for d in self._route_embedded(np.asarray(request.embed(held)), 0.0)]
                # 95% of held-out in-domain texts stay above it
                self.state["threshold"] = max(0.0, float(np.quantile(best, 0.05)) - 0.02)
            else:
                self.state["threshold"] = 0.0

    def _route_embedded(self, emb: Any, threshold: float) -> list[RouteDecision]:
        """The adapter whose centroid is most similar once the mean all domains share is removed (what tells
        domains apart); the score is the plain cosine to that adapter's mean direction (how close the prompt is
        to the adapter's texts at all), and below ``threshold`` the base answers."""
        import numpy as np

        emb = np.asarray(emb, dtype=np.float64)
        x = _unit(emb - np.asarray(self.state["centre"]))
        plain = _unit(emb)
        ids = list(self.state["centroids"])
        sims = np.stack([np.max(x @ np.asarray(self.state["centroids"][a]).T, axis=1) for a in ids], axis=1)
        out = []
        for row, p in zip(sims, plain, strict=True):
            scores = {a: round(max(0.0, float(s)), 6) for a, s in zip(ids, row, strict=True)}
            best = ids[int(np.argmax(row))]
            score = max(0.0, float(p @ np.asarray(self.state["plain"][best])))
            out.append(RouteDecision(best if score >= threshold else None, score, scores))
        return out

    def route(self, request: RouteRequest) -> RouteDecision:
        return self.route_batch([request])[0]

    def route_batch(self, requests: Sequence[RouteRequest]) -> list[RouteDecision]:
        if not requests:
            return []
        embed = requests[0].embed
        if embed is None:
            raise InvalidInput("the embedding router needs the base model's embeddings")
        return self._route_embedded(embed([r.prompt for r in requests]), float(self.state["threshold"]))

    def save(self, state_dir: Path) -> None:
        (state_dir / STATE_FILE).write_text(json.dumps(self.state), encoding="utf-8")

    def load(self, state_dir: Path) -> None:
        self.state = _read_state(state_dir)


# -- keyword ------------------------------------------------------------------------------------------------------

_WORD = re.compile(r"[^\W\d_]{4,}")


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


class KeywordRouter(RouterImpl):
    def __init__(self) -> None:
        self.patterns: dict[str, list[str]] = {}  # adapter id -> hand-written regular expressions
        self.learned: dict[str, list[str]] = {}  # adapter id -> learned words
        self.threshold = 0.0
        self._compiled: dict[str, list[re.Pattern[str]]] = {}

    def fit(self, request: RouterFitRequest) -> None:
        self.threshold = _threshold(request.options) or 0.0
        learn = (
            _positive_int(request.options, "learn", 40) if str(request.options.get("learn", "")) != "0" else 0
        )
        self.patterns = {}
        for adapter in request.adapters:
            pats = [p for d in adapter.domain for p in request.keywords.get(d, [])]
            if pats:
                self.patterns[adapter.id] = pats
        self.learned = {}
        if learn:
            # documents per word and adapter: a word is a keyword of an adapter when it is in many of that
            # adapter's texts and in few of the others' (smoothed ratio of the document frequencies)
            df = {
                a.id: Counter(w for t in request.examples.get(a.id, []) for w in set(_words(t)))
                for a in request.adapters
            }
            n = {a: max(1, len(request.examples.get(a, []))) for a in df}
            for adapter_id, counts in df.items():
                others = [b for b in df if b != adapter_id]

                def weight(word: str, a: str = adapter_id, o: list[str] = others) -> float:
                    mine = df[a][word] / n[a]
                    theirs = max((df[b][word] / n[b] for b in o), default=0.0)
                    return mine * math.log((mine + 0.01) / (theirs + 0.01))

                def ratio(word: str, a: str = adapter_id, o: list[str] = others) -> float:
                    theirs = max((df[b][word] / n[b] for b in o), default=0.0)
                    return (df[a][word] / n[a] + 0.01) / (theirs + 0.01)

                ranked = sorted((w for w, c in counts.items() if c >= 2), key=lambda w: (-weight(w), w))
                # a keyword is at least 3 times as common in its domain's texts as in any other's
                self.learned[adapter_id] = [w for w in ranked[:learn] if weight(w) > 0 and ratio(w) >= 3.0]
        if not any(self.patterns.values()) and not any(self.learned.values()):
            domains = ", ".join(sorted({d for a in request.adapters for d in a.domain}))
            raise InvalidInput(
                f"no keywords for {domains}; add some with 'clara router keywords add DOMAIN WORD...' or give "
                "training data to learn them from"
            )
        self._compile()

    def _compile(self) -> None:
        self._compiled = {
            a: [re.compile(p, re.IGNORECASE) for p in pats] for a, pats in self.patterns.items()
        }
        self._sets = {a: set(words) for a, words in self.learned.items()}

    def route(self, request: RouteRequest) -> RouteDecision:
        words = _words(request.prompt)
        hits: dict[str, float] = {}
        for adapter_id in set(self._compiled) | set(self._sets):
            count = 2.0 * sum(len(p.findall(request.prompt)) for p in self._compiled.get(adapter_id, []))
            learned = self._sets.get(adapter_id, set())
            count += sum(1 for w in words if w in learned)
            hits[adapter_id] = count
        total = sum(hits.values())
        if total == 0:
            return RouteDecision(None, 0.0, dict.fromkeys(hits, 0.0))
        scores = {a: round(h / total, 6) for a, h in hits.items()}
        best = max(sorted(scores), key=lambda a: scores[a])
        chosen = best if scores[best] >= self.threshold else None
        return RouteDecision(chosen, scores[best], scores)

    def save(self, state_dir: Path) -> None:
        state = {"patterns": self.patterns, "learned": self.learned, "threshold": self.threshold}
        (state_dir / STATE_FILE).write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")

    def load(self, state_dir: Path) -> None:
        state = _read_state(state_dir)
        self.patterns, self.learned = state["patterns"], state["learned"]
        self.threshold = float(state["threshold"])
        self._compile()


@hookimpl
def register_routers(register: Any) -> None:
    register(
        Router(
            "embedding",
            EmbeddingRouter,
            "the base model's mean-pooled hidden states, nearest adapter centroid by cosine; below the "
            "threshold the base answers",
            [
                Option(
                    "threshold",
                    float,
                    None,
                    "similarity below which the base answers (0..1; default: fitted on held-out texts)",
                ),
                Option("centroids", int, 1, "centroids per adapter"),
            ],
        )
    )
    register(
        Router(
            "keyword",
            KeywordRouter,
            "per-domain regular expressions ('clara router keywords') and words learned from the training "
            "data; no match: the base answers",
            [
                Option("threshold", float, None, "least share of the hits the chosen adapter needs (0..1)"),
                Option("learn", int, 40, "words to learn per domain from its training data (0: none)"),
            ],
        )
    )
