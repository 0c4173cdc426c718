"""One record per finished request, handed to every observer: the seam for metrics and for JSON logs.

The server builds a :class:`RequestRecord` for each request, whatever its outcome, and calls
``observer.record(rec)`` on each :class:`RequestObserver`. Metrics are one observer; the evaluation issue's
per-request JSON lines in ``metadata/logs/`` are another (see :class:`JsonlRequestLog`).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Protocol

import attrs


@attrs.define
class RequestRecord:
    request_id: str
    endpoint: str
    status: int
    adapter_id: str | None = None
    #: "named" (the request named it), "default" (activated adapter or base), "routed" (adapter_id "auto"),
    #: "none" (refused before an adapter was chosen)
    selection: str = "named"
    route_score: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    queue_seconds: float = 0.0
    first_token_seconds: float | None = None
    latency_seconds: float = 0.0
    error_code: str | None = None
    stream: bool = False
    ts: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


class RequestObserver(Protocol):
    def record(self, rec: RequestRecord) -> None: ...


class JsonlRequestLog:
    """Appends one JSON line per request to ``path`` (for example ``metadata/logs/requests.jsonl``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def record(self, rec: RequestRecord) -> None:
        line = json.dumps(rec.to_json(), ensure_ascii=False)
        with self._lock, open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
