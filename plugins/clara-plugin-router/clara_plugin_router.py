"""clara's built-in routers.

``embedding``: texts become the base model's own mean-pooled hidden states (no extra model) at one layer (option
``layer``; default 0, the token embeddings: the forward pass stops there, and on a base whose deeper layers say
little it carries the most domain vocabulary); each adapter gets one or more centroids of a sample of its training
data; a prompt goes to the adapter of the most similar centroid (cosine, after subtracting the mean all domains
share and whitening by the within-domain covariance: ``scores``), or to the base when the plain cosine to that
adapter's mean direction (``score``) is below a threshold (fitted on held-out training texts: 95% of them pass;
or set with ``--threshold X``). Embeddings are cached per adapter checksum and layer: a refit after one adapter
changed embeds only that adapter's texts. The state is versioned (``EMBEDDING_FORMAT``); a state of another format
is refused with the command to refit.

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


#: The embedding router's state format; a state of another format is refused (refit).
EMBEDDING_FORMAT = 2
ARRAYS_FILE = "arrays.npz"
#: Most whitening directions kept (the within-domain covariance is low-rank plus the shrinkage target).
MAX_DIRECTIONS = 256
#: ``layer=auto``: choose the layer by held-out accuracy
AUTO = "auto"


def _flag(options: Mapping[str, Any], name: str, default: bool) -> bool:
    value = options.get(name, default)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise InvalidInput(f"{name} must be true or false, got {value!r}")


def _fraction(options: Mapping[str, Any], name: str, default: float) -> float:
    value = options.get(name, default)
    try:
        number = float(value if value is not None else default)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} must be a number between 0 and 1, got {value!r}") from None
    if not 0.0 <= number <= 1.0:
        raise InvalidInput(f"{name} must be between 0 and 1, got {number:g}")
    return number


def _layer(options: Mapping[str, Any]) -> int | str:
    value = options.get("layer", 0)
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        return int(value if value is not None else 0)
    except (TypeError, ValueError):
        raise InvalidInput(
            f"layer must be a whole number (0: token embeddings, -1: last) or 'auto', got {value!r}"
        ) from None


def _layer_candidates(base: Any) -> list[int]:
    """The layers ``layer=auto`` compares: the token embeddings, a quarter, half and three quarters of the way,
    and the last hidden states (``config.num_hidden_layers`` of the base; without it, first and last)."""
    config = dict(getattr(base, "config", None) or {})
    count = config.get("num_hidden_layers") or (config.get("text_config") or {}).get("num_hidden_layers")
    if not isinstance(count, int) or count < 1:
        return [0, -1]
    return sorted({0, round(count / 4), round(count / 2), round(3 * count / 4), count})


class _Whitening:
    """``x -> W (x - centre)`` with ``W`` the inverse square root of the shrunk within-domain covariance
    ``(1 - whiten) * mu * I + whiten * S`` (``mu``: the mean eigenvalue of ``S``), kept low-rank: the top
    directions of ``S`` and one scale for everything else. ``whiten=0`` leaves ``x - centre`` as it is."""

    def __init__(self, centre: Any, dirs: Any, scales: Any, rest: float) -> None:
        self.centre, self.dirs, self.scales, self.rest = centre, dirs, scales, rest

    @classmethod
    def fit(cls, groups: Sequence[Any], centre: Any, whiten: float) -> _Whitening:
        import numpy as np

        dim = len(centre)
        if whiten <= 0.0:
            return cls(centre, np.zeros((0, dim)), np.zeros(0), 1.0)
        within = np.concatenate([g - g.mean(axis=0) for g in groups])
        n = max(1, len(within))
        _, sv, vt = np.linalg.svd(within / math.sqrt(n), full_matrices=False)
        eigen = sv**2
        mu = float(eigen.sum()) / dim
        if mu <= 0.0:  # every text of a domain embeds the same: nothing to whiten
            return cls(centre, np.zeros((0, dim)), np.zeros(0), 1.0)
        keep = min(MAX_DIRECTIONS, len(eigen))
        shrink = max(1.0 - whiten, 1e-3)
        # scaled by sqrt(mu): the numbers stay near 1 (cosines do not care)
        rest = 1.0 / math.sqrt(shrink)
        scales = np.sqrt(mu) / np.sqrt((1.0 - shrink) * eigen[:keep] + shrink * mu)
        return cls(centre, vt[:keep], scales, rest)

    def __call__(self, x: Any) -> Any:
        y = x - self.centre
        if not len(self.scales):
            return y
        proj = y @ self.dirs.T
        return self.rest * y + (proj * (self.scales - self.rest)) @ self.dirs


class EmbeddingRouter(RouterImpl):
    needs_embeddings = True

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        self.arrays: dict[str, Any] = {}
        self._white: _Whitening | None = None

    def fit(self, request: RouterFitRequest) -> None:
        import numpy as np

        if request.embed is None:
            raise InvalidInput("the embedding router needs the base model's embeddings")
        threshold = _threshold(request.options)
        k = _positive_int(request.options, "centroids", 1)
        chosen = _layer(request.options)
        centre_on = _flag(request.options, "centre", True)
        whiten = _fraction(request.options, "whiten", 0.5)
        embed = request.embed
        ids = [a.id for a in request.adapters]
        for adapter in request.adapters:
            if not request.examples.get(adapter.id):
                raise InvalidInput(
                    f"adapter '{adapter.id}' has no training texts to fit the embedding router on"
                )
        cache = self._previous_cache(request)
        held = [t for a in request.adapters for t in request.held_out.get(a.id, [])]
        held_owner = [i for i, a in enumerate(request.adapters) for _ in request.held_out.get(a.id, [])]
        scores: dict[int, float] = {}
        held_at: dict[int, Any] = {}  # the held-out texts embedded, by layer
        examples_at: dict[int, Any] = {}  # the training texts embedded (with their cache entries), by layer

        def embedded_held(at: int) -> Any:
            if at not in held_at:
                held_at[at] = np.asarray(embed(held, layer=at), dtype=np.float64)
            return held_at[at]

        if chosen == AUTO:
            if not held:
                raise InvalidInput(
                    "layer=auto chooses the layer by held-out accuracy, but no held-out texts are left: give "
                    "more training data (or a larger --sample), or set the layer (-o layer=0)"
                )
            for candidate in _layer_candidates(request.base):
                examples_at[candidate] = self._embed_examples(request, candidate, cache)
                self._fit_centroids(examples_at[candidate][0], ids, k, centre_on, whiten)
                routed = self._route_embedded(embedded_held(candidate), 0.0)
                right = sum(d.adapter_id == ids[o] for d, o in zip(routed, held_owner, strict=True))
                scores[candidate] = right / len(held)
            # the most accurate; among equals the earliest layer (the cheapest forward pass)
            layer = max(scores, key=lambda c: (scores[c], -c if c >= 0 else -1e9))
        else:
            layer = int(chosen)
        raw, cache_meta, arrays = examples_at.get(layer) or self._embed_examples(request, layer, cache)
        white = self._fit_centroids(raw, ids, k, centre_on, whiten)
        self.arrays.update(arrays)
        self.state = {
            "format": EMBEDDING_FORMAT,
            "base_model_hash": request.base.base_model_hash,
            "adapters": ids,
            "layer": layer,
            "layer_option": chosen,
            "layer_accuracy": {str(c): round(v, 4) for c, v in scores.items()},
            "centre": centre_on,
            "whiten": whiten,
            "rest": white.rest,
            "centroids_per_adapter": k,
            "cache": cache_meta,
            "threshold": threshold,
            "threshold_source": "option" if threshold is not None else "held-out",
        }
        if threshold is None:
            if held:
                best = [d.score for d in self._route_embedded(embedded_held(layer), 0.0)]
                # 95% of held-out in-domain texts stay above it
                self.state["threshold"] = max(0.0, float(np.quantile(best, 0.05)) - 0.02)
            else:
                self.state["threshold"] = 0.0

    def _previous_cache(self, request: RouterFitRequest) -> dict[str, Any]:
        """The embeddings the last fit of this base stored, by adapter id: ``(key, array)``."""
        import numpy as np

        if request.previous is None or not (request.previous / STATE_FILE).is_file():
            return {}
        try:
            old = _read_state(request.previous)
            if (
                old.get("format") != EMBEDDING_FORMAT
                or old.get("base_model_hash") != request.base.base_model_hash
            ):
                return {}
            with np.load(request.previous / ARRAYS_FILE, allow_pickle=False) as stored:
                return {
                    a: (entry["key"], np.asarray(stored[entry["array"]], dtype=np.float64))
                    for a, entry in old.get("cache", {}).items()
                }
        except (OSError, ValueError, KeyError):
            return {}  # an unreadable cache is only a slower fit

    def _embed_examples(
        self, request: RouterFitRequest, layer: int, cache: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Each adapter's training texts embedded at ``layer`` (from ``cache`` where the adapter's checksum,
        the layer and the texts are the same), the cache entries to store and their arrays."""
        import numpy as np

        raw: dict[str, Any] = {}
        cache_meta: dict[str, Any] = {}
        arrays: dict[str, Any] = {}
        for i, adapter in enumerate(request.adapters):
            texts = list(request.examples.get(adapter.id, []))
            key = json.dumps(
                [adapter.adapter_checksum, layer, len(texts), sorted(texts)[:3]], ensure_ascii=False
            )
            hit = cache.get(adapter.id)
            if hit is not None and hit[0] == key:
                emb = hit[1]
            else:
                assert request.embed is not None
                emb = np.asarray(request.embed(texts, layer=layer), dtype=np.float64)
            raw[adapter.id] = emb
            cache_meta[adapter.id] = {"key": key, "array": f"cache{i}"}
            arrays[f"cache{i}"] = emb.astype(np.float32)
        return raw, cache_meta, arrays

    def _fit_centroids(
        self, raw: dict[str, Any], ids: list[str], k: int, centre_on: bool, whiten: float
    ) -> Any:
        """Centre, whitening and centroids from the embedded training texts ``raw`` (set on this router)."""
        import numpy as np

        dim = next(iter(raw.values())).shape[1]
        # the mean over adapters (not texts): every domain counts the same
        centre = np.mean([v.mean(axis=0) for v in raw.values()], axis=0) if centre_on else np.zeros(dim)
        white = _Whitening.fit(list(raw.values()), centre, whiten)
        owners: list[int] = []
        centroids = []
        for i, a in enumerate(ids):
            c = _kmeans(_unit(white(raw[a])), k)
            centroids.append(c)
            owners += [i] * len(c)
        self.arrays = dict(
            centre=centre,
            dirs=white.dirs,
            scales=white.scales,
            centroids=np.concatenate(centroids),
            owners=np.asarray(owners, dtype=np.int64),
            plain=np.stack([_unit(_unit(raw[a]).mean(axis=0)) for a in ids]),
        )
        self._white = white
        self.state = {"adapters": ids}  # what _route_embedded reads while the fit goes on
        return white

    def summary(self) -> str | None:
        scores = self.state.get("layer_accuracy") or {}
        if not scores:
            return None
        table = ", ".join(f"{layer} {acc:.1%}" for layer, acc in scores.items())
        return (
            f"layer=auto: held-out accuracy by layer {table}; chose layer {self.state['layer']} "
            f"(fixed with -o layer={self.state['layer']})"
        )

    def _route_embedded(self, emb: Any, threshold: float) -> list[RouteDecision]:
        """The adapter whose centroid is most similar once the embeddings are centred and whitened (what tells
        domains apart); the score is the plain cosine to that adapter's mean direction (how close the prompt
        is to the adapter's texts at all), and below ``threshold`` the base answers."""
        import numpy as np

        assert self._white is not None
        emb = np.asarray(emb, dtype=np.float64)
        ids = list(self.state["adapters"])
        x = _unit(self._white(emb))
        sims_all = x @ np.asarray(self.arrays["centroids"]).T
        owners = np.asarray(self.arrays["owners"])
        sims = np.stack([np.max(sims_all[:, owners == i], axis=1) for i in range(len(ids))], axis=1)
        plain = _unit(emb) @ np.asarray(self.arrays["plain"]).T
        out = []
        for row, p in zip(sims, plain, strict=True):
            scores = {a: round(max(0.0, float(s)), 6) for a, s in zip(ids, row, strict=True)}
            best = int(np.argmax(row))
            score = max(0.0, float(p[best]))
            out.append(RouteDecision(ids[best] if score >= threshold else None, score, scores))
        return out

    def route(self, request: RouteRequest) -> RouteDecision:
        return self.route_batch([request])[0]

    def route_batch(self, requests: Sequence[RouteRequest]) -> list[RouteDecision]:
        if not requests:
            return []
        embed = requests[0].embed
        if embed is None:
            raise InvalidInput("the embedding router needs the base model's embeddings")
        emb = embed([r.prompt for r in requests], layer=int(self.state["layer"]))
        return self._route_embedded(emb, float(self.state["threshold"]))

    def save(self, state_dir: Path) -> None:
        import numpy as np

        with (state_dir / ARRAYS_FILE).open("wb") as f:
            np.savez(f, **self.arrays)
        (state_dir / STATE_FILE).write_text(json.dumps(self.state), encoding="utf-8")

    def load(self, state_dir: Path) -> None:
        import numpy as np

        state = _read_state(state_dir)
        found = state.get("format", 1)
        if found != EMBEDDING_FORMAT:
            raise ValueError(
                f"its state has format {found}, written by an older clara-plugin-router; this one reads format "
                f"{EMBEDDING_FORMAT}"
            )
        with np.load(state_dir / ARRAYS_FILE, allow_pickle=False) as stored:
            self.arrays = {
                name: np.asarray(stored[name]) for name in stored.files if not name.startswith("cache")
            }
        self.state = state
        self._white = _Whitening(
            self.arrays["centre"], self.arrays["dirs"], self.arrays["scales"], float(state["rest"])
        )


# -- arrow --------------------------------------------------------------------------------------------------------

ARROW_FORMAT = 1
#: LoRA modules whose input is not the (normed) residual stream entering their decoder layer: left out
_NOT_RESIDUAL = {"o_proj", "out_proj", "down_proj", "dense", "c_proj", "wo", "fc2", "dense_4h_to_h"}
_LAYER_OF = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def top_right_singular_vector(a: Any, b: Any, iterations: int = 50, seed: int = 0) -> Any:
    """The top right singular vector of ``b @ a`` (LoRA's delta, up to its scale) by power iteration on
    ``a.T @ (b.T @ b) @ a``, never forming the ``out x in`` delta: each step costs ``O(r * (in + out))``."""
    import numpy as np

    gram = b.T @ b  # r x r
    v = np.random.default_rng(seed).standard_normal(a.shape[1])
    v /= max(float(np.linalg.norm(v)), 1e-12)
    for _ in range(iterations):
        w = a.T @ (gram @ (a @ v))
        norm = float(np.linalg.norm(w))
        if norm == 0.0:
            return v
        v = w / norm
    return v


def lora_prototypes(folder: Path) -> list[tuple[int, str, Any]]:
    """``(layer, module, v)`` for every LoRA pair of the PEFT adapter in ``folder``: ``v`` the top right
    singular vector of its delta (the direction of the input the adapter changes most)."""
    import numpy as np
    from safetensors.torch import load_file

    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        raise InvalidInput(f"{folder}: no adapter_model.safetensors; the arrow router reads the LoRA weights")
    tensors = load_file(str(file))
    out = []
    for key, a in sorted(tensors.items()):
        if ".lora_A." not in key:
            continue
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        found = _LAYER_OF.search(key)
        if b is None or found is None or a.dim() != 2:
            continue
        module = key.split(".lora_A.")[0].rsplit(".", 1)[-1]
        v = top_right_singular_vector(a.double().numpy(), b.double().numpy())
        out.append((int(found.group(1)), module, np.asarray(v)))
    return out


class ArrowRouter(RouterImpl):
    """Training-free routing from the adapters' own weights (PEFT's Arrow, at prompt level): per LoRA module
    the top right singular vector ``v`` of its delta ``B @ A`` is a prototype; a prompt's score for an adapter is
    the mean over the adapter's modules of ``|<h, v>|``, ``h`` the prompt's normalised mean hidden state entering
    that module's decoder layer. The best adapter wins; the base answers when its score is below the threshold
    (fitted on held-out training texts as for ``embedding``, or set by hand)."""

    needs_embeddings = True

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        self.prototypes: Any = None  # (n, dim)
        self.layers: Any = None  # (n,) the decoder layer of each prototype
        self.owners: Any = None  # (n,) the adapter (index into state["adapters"]) of each prototype

    def fit(self, request: RouterFitRequest) -> None:
        import numpy as np

        if request.embed is None:
            raise InvalidInput("the arrow router needs the base model's hidden states")
        threshold = _threshold(request.options)
        dim = len(request.embed(["a"], layer=0)[0])
        rows, layers, owners = [], [], []
        for index, adapter in enumerate(request.adapters):
            mine = [
                (layer, v)
                for layer, module, v in lora_prototypes(Path(adapter.path))
                if module not in _NOT_RESIDUAL and len(v) == dim
            ]
            if not mine:
                raise InvalidInput(
                    f"adapter '{adapter.id}' has no LoRA module on the hidden states (q/k/v, gate/up "
                    "projections); the arrow router cannot route to it"
                )
            for layer, v in mine:
                rows.append(v)
                layers.append(layer)
                owners.append(index)
        self.prototypes = np.stack(rows)
        self.layers = np.asarray(layers, dtype=np.int64)
        self.owners = np.asarray(owners, dtype=np.int64)
        self.state = {
            "format": ARROW_FORMAT,
            "adapters": [a.id for a in request.adapters],
            "threshold": threshold,
            "threshold_source": "option" if threshold is not None else "held-out",
        }
        if threshold is None:
            held = [t for a in request.adapters for t in request.held_out.get(a.id, [])]
            best = [d.score for d in self._route(held, request.embed, 0.0)] if held else [0.0]
            self.state["threshold"] = max(0.0, float(np.quantile(best, 0.05)) - 0.01)

    def _route(self, prompts: Sequence[str], embed: Any, threshold: float) -> list[RouteDecision]:
        import numpy as np

        ids = list(self.state["adapters"])
        sums = np.zeros((len(prompts), len(ids)))
        counts = np.bincount(self.owners, minlength=len(ids)).astype(np.float64)
        for layer in sorted(set(self.layers.tolist())):
            h = _unit(np.asarray(embed(list(prompts), layer=int(layer)), dtype=np.float64))
            here = self.layers == layer
            sims = np.abs(h @ self.prototypes[here].T)  # (prompts, prototypes of this layer)
            for j, owner in enumerate(self.owners[here]):
                sums[:, owner] += sims[:, j]
        scores = sums / np.maximum(counts, 1.0)
        out = []
        for row in scores:
            best = int(np.argmax(row))
            score = float(row[best])
            per = {a: round(float(x), 6) for a, x in zip(ids, row, strict=True)}
            out.append(RouteDecision(ids[best] if score >= threshold else None, score, per))
        return out

    def route(self, request: RouteRequest) -> RouteDecision:
        return self.route_batch([request])[0]

    def route_batch(self, requests: Sequence[RouteRequest]) -> list[RouteDecision]:
        if not requests:
            return []
        if requests[0].embed is None:
            raise InvalidInput("the arrow router needs the base model's hidden states")
        return self._route([r.prompt for r in requests], requests[0].embed, float(self.state["threshold"]))

    def save(self, state_dir: Path) -> None:
        import numpy as np

        with (state_dir / ARRAYS_FILE).open("wb") as f:
            np.savez(f, prototypes=self.prototypes, layers=self.layers, owners=self.owners)
        (state_dir / STATE_FILE).write_text(json.dumps(self.state), encoding="utf-8")

    def load(self, state_dir: Path) -> None:
        import numpy as np

        state = _read_state(state_dir)
        if state.get("format") != ARROW_FORMAT:
            raise ValueError(f"its state has format {state.get('format')}; this router reads {ARROW_FORMAT}")
        with np.load(state_dir / ARRAYS_FILE, allow_pickle=False) as stored:
            self.prototypes = np.asarray(stored["prototypes"])
            self.layers = np.asarray(stored["layers"])
            self.owners = np.asarray(stored["owners"])
        self.state = state


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
                Option(
                    "layer",
                    str,
                    "0",
                    "hidden states after this many decoder layers (0: the token embeddings, -1: the last); "
                    "the forward pass stops there. 'auto': the most accurate on the held-out texts of "
                    "0, 1/4, 1/2, 3/4 of the layers and the last (the earliest among equals)",
                ),
                Option("centre", bool, True, "subtract the mean embedding of the domains before comparing"),
                Option(
                    "whiten",
                    float,
                    0.5,
                    "whitening by the within-domain covariance (0: none, 1: full; shrunk towards the identity)",
                ),
            ],
        )
    )
    register(
        Router(
            "arrow",
            ArrowRouter,
            "training-free, from the adapters' own LoRA weights: per module the top right singular vector of "
            "its delta against the prompt's hidden state entering that layer (experimental)",
            [
                Option(
                    "threshold", float, None, "score below which the base answers (0..1; default: held-out)"
                )
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
