"""Everything ``clara report`` shows, gathered into one JSON-ready dict.

Three parts: the registry's contents (bases, adapters by domain, method and kind, sizes), the latest metrics of
each adapter with their trend over versions (adapters of the same domain and method, ordered by version), and
serving usage read from the server's per-request JSON lines in ``metadata/logs/`` (see
:class:`clara_core.serving.requestlog.RequestRecord`). Logs are read line by line, so their size does not
matter; a line that is not a request record is skipped and counted per file, never fatal.

Only the standard library is imported here.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..errors import InvalidInput
from ..records import AdapterRecord, utcnow

if TYPE_CHECKING:
    from ..registry import Registry
    from ..workspace import Workspace

REPORT_FORMAT = "clara-report/1"
#: The percentiles of latency reported (linear interpolation between closest ranks, as numpy's default).
PERCENTILES = (50, 95, 99)
#: Metric names (substrings) for which a lower value is better; every other metric is better when higher.
LOWER_IS_BETTER = ("ppl", "perplexity", "bpb", "bits_per_byte", "loss", "latency", "seconds")
#: A request log line longer than this is malformed (a record is a few hundred bytes).
MAX_LINE_BYTES = 1 << 20
#: How many line numbers of malformed lines are named per file.
MALFORMED_LINES_SHOWN = 5
BASE_LABEL = "(base)"  # a request served by the base model (no adapter)
NONE_LABEL = "(none)"  # a request refused before an adapter was chosen


# -- --since --------------------------------------------------------------------------------------------------


def parse_since(text: str) -> dt.datetime:
    """``--since``: a date (``2026-11-25``) or a date and time (``2026-11-25T14:00``, ``...Z``, ``...+02:00``);
    without an offset it is UTC. Anything else is one clear error."""
    value = text.strip()
    try:
        parsed = dt.datetime.fromisoformat(value.replace(" ", "T", 1) if len(value) > 10 else value)
    except ValueError:
        raise InvalidInput(
            f"--since: '{text}' is not a date; give a date or a date and time in ISO form, for example "
            "2026-11-25 or 2026-11-25T14:00 (UTC unless it has an offset such as +02:00)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC)


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _iso_ts(ts: float) -> str:
    return _iso(dt.datetime.fromtimestamp(ts, dt.UTC))


def _created_after(created: str | None, since: dt.datetime | None) -> bool:
    if since is None:
        return True
    if not created:
        return False
    try:
        return parse_since(created) >= since
    except InvalidInput:
        return False


# -- numbers --------------------------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile of ascending ``sorted_values``: linear interpolation between the closest ranks
    (position ``(n - 1) * q / 100``, numpy's default); None for no values."""
    n = len(sorted_values)
    if n == 0:
        return None
    position = (n - 1) * q / 100
    lower = math.floor(position)
    upper = min(lower + 1, n - 1)
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * (position - lower)


def _summary(values: Iterable[float]) -> dict[str, Any]:
    ordered = sorted(values)
    out: dict[str, Any] = {"count": len(ordered)}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(ordered, q)
    out["mean"] = sum(ordered) / len(ordered) if ordered else None
    out["max"] = ordered[-1] if ordered else None
    return out


def lower_is_better(metric: str) -> bool:
    name = metric.lower()
    return any(part in name for part in LOWER_IS_BETTER)


# -- the registry -----------------------------------------------------------------------------------------------


def _domain_label(record: AdapterRecord) -> str:
    return "+".join(record.domain)


def registry_section(registry: Registry) -> tuple[dict[str, Any], list[AdapterRecord]]:
    bases = registry.list_bases()
    adapters = registry.list_adapters()
    base_names = {b.base_model_hash: b.name for b in bases}
    per_base = Counter(a.base_model_hash for a in adapters)
    by_domain: Counter[str] = Counter()
    for record in adapters:
        for domain in record.domain:
            by_domain[domain] += 1
    section = {
        "bases": [
            {
                "name": b.name,
                "model_type": b.model_type,
                "architecture": b.architecture,
                "size_bytes": b.size_bytes,
                "created": b.created,
                "adapters": per_base.get(b.base_model_hash, 0),
            }
            for b in bases
        ],
        "adapters": {
            "total": len(adapters),
            "size_bytes": sum(a.size_bytes for a in adapters),
            "by_domain": dict(sorted(by_domain.items())),
            "by_method": dict(sorted(Counter(a.method for a in adapters).items())),
            "by_kind": dict(sorted(Counter(a.kind for a in adapters).items())),
            "by_status": dict(sorted(Counter(a.status for a in adapters).items())),
            "by_domain_and_method": [
                {"domain": d, "method": m, "count": n}
                for (d, m), n in sorted(Counter((_domain_label(a), a.method) for a in adapters).items())
            ],
        },
        "adapter_list": [
            {
                "id": a.id,
                "kind": a.kind,
                "domain": a.domain,
                "method": a.method,
                "rank": a.rank,
                "version": a.version,
                "status": a.status,
                "base": base_names.get(a.base_model_hash, a.base_model_hash[:12]),
                "size_bytes": a.size_bytes,
                "created": a.created,
                "metrics": a.metrics,
            }
            for a in adapters
        ],
    }
    return section, adapters


# -- metrics and their trend over versions ----------------------------------------------------------------------


def _trend(metric: str, points: list[dict[str, Any]]) -> dict[str, Any]:
    lower = lower_is_better(metric)
    first, last = points[0]["value"], points[-1]["value"]
    trend: dict[str, Any] = {
        "better": "lower" if lower else "higher",
        "first": first,
        "last": last,
        "previous": None,
        "change": None,
        "relative_change": None,
        "status": "single",
        #: whether the last two values were measured on the same eval set (sha256); None where unknown
        "same_eval_set": None,
    }
    if len(points) > 1:
        previous = points[-2]["value"]
        change = last - previous
        trend.update(
            previous=previous,
            change=change,
            relative_change=(change / abs(previous)) if previous else None,
        )
        shas = points[-2]["eval_set_sha256"], points[-1]["eval_set_sha256"]
        if all(shas):
            trend["same_eval_set"] = shas[0] == shas[1]
        if change == 0:
            trend["status"] = "same"
        else:
            trend["status"] = "improved" if (change < 0) == lower else "worse"
    return trend


def metrics_section(
    registry: Registry, adapters: list[AdapterRecord], since: dt.datetime | None
) -> dict[str, Any]:
    latest = [
        {
            "id": a.id,
            "domain": a.domain,
            "method": a.method,
            "version": a.version,
            "metrics": {k: v for k, v in sorted(a.metrics.items()) if _is_number(v)},
        }
        for a in adapters
        if any(_is_number(v) for v in a.metrics.values())
    ]
    evaluations = 0
    runs: set[str] = set()
    last: str | None = None
    #: (adapter id, metric) -> the history row of its latest value: which eval set, when
    latest_rows: dict[tuple[str, str], dict[str, Any]] = {}
    for record in adapters:
        for row in registry.metrics_history(record.id):
            latest_rows[(record.id, row["name"])] = row
            if not _created_after(row.get("created"), since):
                continue
            evaluations += 1
            runs.add(row.get("run_id") or f"{record.id}@{row.get('created')}")
            last = max(last or "", row.get("created") or "") or None
    groups: dict[tuple[str, str], list[AdapterRecord]] = {}
    for record in adapters:
        groups.setdefault((_domain_label(record), record.method), []).append(record)
    trends = []
    for (domain, method), members in sorted(groups.items()):
        members.sort(key=lambda a: (a.version, a.created, a.id))
        names = sorted({k for a in members for k, v in a.metrics.items() if _is_number(v)})
        for name in names:
            points = []
            for a in members:
                if not _is_number(a.metrics.get(name)):
                    continue
                value = float(a.metrics[name])
                found = latest_rows.get((a.id, name))
                source = (
                    found if found is not None and found["value"] == value else None
                )  # the latest value did not come through the history (recorded at registration)
                points.append(
                    {
                        "adapter_id": a.id,
                        "version": a.version,
                        "rank": a.rank,
                        "value": value,
                        "eval_set": source["eval_set"] if source else None,
                        "eval_set_sha256": source["eval_set_sha256"] if source else None,
                        "evaluated": source["created"] if source else None,
                    }
                )
            trends.append(
                {"domain": domain, "method": method, "metric": name, "points": points, **_trend(name, points)}
            )
    return {
        "latest": latest,
        "trends": trends,
        "history": {"values": evaluations, "runs": len(runs), "last": last},
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# -- serving usage from the request logs ------------------------------------------------------------------------


class _Usage:
    """Counts for one slice of the requests (all of them, or one adapter's)."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.latencies = array("d")  # of successful requests
        self.first_token = array("d")  # of successful streamed requests that produced a token
        self.error_codes: Counter[str] = Counter()
        self.status: Counter[int] = Counter()

    def add(self, rec: dict[str, Any]) -> None:
        self.requests += 1
        status = rec["status"]
        self.status[status] += 1
        self.prompt_tokens += rec.get("prompt_tokens") or 0
        self.completion_tokens += rec.get("completion_tokens") or 0
        if is_error(rec):
            self.errors += 1
            self.error_codes[error_code(rec)] += 1
        else:
            self.latencies.append(float(rec.get("latency_seconds") or 0.0))
            if rec.get("first_token_seconds") is not None:
                self.first_token.append(float(rec["first_token_seconds"]))

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.errors / self.requests if self.requests else None,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "latency_seconds": _summary(self.latencies),
            "first_token_seconds": _summary(self.first_token),
            "error_codes": dict(self.error_codes.most_common()),
            "status": {str(k): v for k, v in sorted(self.status.items())},
        }


def is_error(rec: dict[str, Any]) -> bool:
    return rec["status"] >= 400 or bool(rec.get("error_code"))


def error_code(rec: dict[str, Any]) -> str:
    return rec.get("error_code") or f"http_{rec['status']}"


def adapter_label(rec: dict[str, Any]) -> str:
    if rec.get("adapter_id"):
        return str(rec["adapter_id"])
    return NONE_LABEL if rec.get("selection") == "none" else BASE_LABEL


_INT_FIELDS = ("prompt_tokens", "completion_tokens")
_NUMBER_FIELDS = ("latency_seconds", "queue_seconds")
_OPTIONAL_NUMBER_FIELDS = ("first_token_seconds", "route_score")
_OPTIONAL_TEXT_FIELDS = ("adapter_id", "error_code", "finish_reason")


def validate_record(value: Any) -> dict[str, Any] | None:
    """``value`` when it is a request record (the fields :class:`RequestRecord` writes, of the right types),
    else None. Fields that a record may leave out take their default."""
    if not isinstance(value, dict):
        return None
    if not _is_int(value.get("status")) or not isinstance(value.get("endpoint"), str):
        return None
    if not _is_number(value.get("ts")):
        return None
    for name in _INT_FIELDS:
        if name in value and not (_is_int(value[name]) and value[name] >= 0):
            return None
    for name in _NUMBER_FIELDS:
        if name in value and not (_is_number(value[name]) and value[name] >= 0):
            return None
    for name in _OPTIONAL_NUMBER_FIELDS:
        if value.get(name) is not None and not _is_number(value[name]):
            return None
    for name in _OPTIONAL_TEXT_FIELDS:
        if value.get(name) is not None and not isinstance(value[name], str):
            return None
    if not isinstance(value.get("selection", "named"), str):
        return None
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def log_files(log_dir: Path) -> list[Path]:
    """The request logs in ``log_dir``: ``*.jsonl`` and rotated ``*.jsonl.N`` files, by name."""
    if not log_dir.is_dir():
        return []
    found = [
        p
        for p in log_dir.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and (p.name.endswith(".jsonl") or (".jsonl." in p.name and p.name.rsplit(".", 1)[-1].isdigit()))
    ]
    return sorted(found)


def _lines(handle: BinaryIO) -> Iterator[bytes | None]:
    """The lines of ``handle``, one at a time; None for a line longer than :data:`MAX_LINE_BYTES` (read past in
    chunks, never held whole), which no request record is."""
    while True:
        line = handle.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
            yield line
            continue
        while line and not line.endswith(b"\n"):
            line = handle.readline(MAX_LINE_BYTES)
        yield None


def serving_section(
    log_dir: Path, since: dt.datetime | None, *, shown_as: str | None = None
) -> dict[str, Any]:
    """Usage from every request log in ``log_dir`` (streamed), counting requests at or after ``since``."""
    shown = shown_as or str(log_dir)
    files = log_files(log_dir)
    section: dict[str, Any] = {"log_dir": shown, "files": [], "status": "ok", "message": None}
    if not log_dir.is_dir():
        section.update(
            status="missing",
            message=f"no request logs: {shown} does not exist (start the server with 'clara serve --log-requests')",
        )
    elif not files:
        section.update(
            status="empty",
            message=f"no request logs: {shown} has no *.jsonl files (start the server with 'clara serve --log-requests')",
        )
    since_ts = since.timestamp() if since is not None else None
    total = _Usage()
    per_adapter: dict[str, _Usage] = {}
    per_endpoint: Counter[str] = Counter()
    selections: Counter[str] = Counter()
    routed: Counter[str] = Counter()
    route_scores = array("d")
    hours: Counter[int] = Counter()
    hour_errors: Counter[int] = Counter()
    malformed: list[dict[str, Any]] = []
    unreadable: list[dict[str, str]] = []
    before_since = 0
    first_ts: float | None = None
    last_ts: float | None = None
    for path in files:
        name = f"{shown}/{path.name}"
        bad_lines: list[int] = []
        bad = 0
        lines = 0
        try:
            with open(path, "rb") as handle:
                for lineno, raw in enumerate(_lines(handle), 1):
                    if raw is not None and not raw.strip():
                        continue
                    lines += 1
                    try:
                        rec = None if raw is None else validate_record(json.loads(raw.decode("utf-8")))
                    except (UnicodeDecodeError, ValueError, RecursionError):
                        rec = None
                    if rec is None:
                        bad += 1
                        if len(bad_lines) < MALFORMED_LINES_SHOWN:
                            bad_lines.append(lineno)
                        continue
                    ts = float(rec["ts"])
                    if since_ts is not None and ts < since_ts:
                        before_since += 1
                        continue
                    first_ts = ts if first_ts is None else min(first_ts, ts)
                    last_ts = ts if last_ts is None else max(last_ts, ts)
                    total.add(rec)
                    per_adapter.setdefault(adapter_label(rec), _Usage()).add(rec)
                    per_endpoint[rec["endpoint"]] += 1
                    selection = rec.get("selection") or "named"
                    selections[selection] += 1
                    if selection == "routed":
                        routed[adapter_label(rec)] += 1
                        if rec.get("route_score") is not None:
                            route_scores.append(float(rec["route_score"]))
                    hour = int(ts // 3600)
                    hours[hour] += 1
                    if is_error(rec):
                        hour_errors[hour] += 1
        except OSError as exc:
            unreadable.append({"file": name, "error": exc.strerror or str(exc)})
            continue
        section["files"].append({"file": name, "lines": lines, "malformed": bad})
        if bad:
            malformed.append({"file": name, "count": bad, "first_lines": bad_lines})
    section["malformed"] = {"total": sum(m["count"] for m in malformed), "files": malformed}
    section["unreadable"] = unreadable
    section["before_since"] = before_since
    section["window"] = {
        "first": _iso_ts(first_ts) if first_ts is not None else None,
        "last": _iso_ts(last_ts) if last_ts is not None else None,
    }
    section["totals"] = total.to_json()
    section["per_adapter"] = [
        {"adapter": label, **usage.to_json()}
        for label, usage in sorted(per_adapter.items(), key=lambda kv: (-kv[1].requests, kv[0]))
    ]
    section["endpoints"] = dict(per_endpoint.most_common())
    section["routing"] = {
        "by_selection": dict(selections.most_common()),
        "routed_to": dict(routed.most_common()),
        "route_score": _summary(route_scores),
    }
    section["timeline"] = _timeline(hours, hour_errors)
    if section["status"] == "ok" and total.requests == 0:
        section["status"] = "no_requests"
        section["message"] = (
            "no requests since " + _iso(since) if since is not None else "the request logs hold no requests"
        )
    return section


def _timeline(hours: Counter[int], hour_errors: Counter[int]) -> dict[str, Any]:
    """Requests and errors per hour, or per day when the logs span more than two days."""
    if not hours:
        return {"bucket": "hour", "points": []}
    span = max(hours) - min(hours)
    if span <= 48:
        points = [
            {"start": _iso_ts(h * 3600), "requests": hours[h], "errors": hour_errors.get(h, 0)}
            for h in range(min(hours), max(hours) + 1)
        ]
        return {"bucket": "hour", "points": points}
    days: Counter[int] = Counter()
    day_errors: Counter[int] = Counter()
    for h, n in hours.items():
        days[h // 24] += n
        day_errors[h // 24] += hour_errors.get(h, 0)
    points = [
        {"start": _iso_ts(d * 86400), "requests": days[d], "errors": day_errors.get(d, 0)}
        for d in range(min(days), max(days) + 1)
    ]
    return {"bucket": "day", "points": points}


# -- evaluation reports ---------------------------------------------------------------------------------------


def eval_reports(reports_dir: Path, since: dt.datetime | None, *, shown_as: str) -> list[str]:
    """The ``<timestamp>-eval.json`` reports in ``reports_dir`` (newest last), modified at or after ``since``."""
    if not reports_dir.is_dir():
        return []
    found = []
    for path in sorted(reports_dir.glob("*-eval.json")):
        try:
            if since is not None and path.stat().st_mtime < since.timestamp():
                continue
        except OSError:
            continue
        found.append(f"{shown_as}/{path.name}")
    return found


# -- everything -------------------------------------------------------------------------------------------------


def collect_report(
    registry: Registry, workspace: Workspace, *, since: dt.datetime | None = None
) -> dict[str, Any]:
    """The whole report for ``workspace``: registry, metrics, serving usage (logs at or after ``since``)."""
    registry_part, adapters = registry_section(registry)
    return {
        "format": REPORT_FORMAT,
        "generated": utcnow(),
        "workspace": str(workspace.root),
        "since": _iso(since) if since is not None else None,
        "registry": registry_part,
        "metrics": metrics_section(registry, adapters, since),
        "serving": serving_section(workspace.metadata_dir / "logs", since, shown_as="metadata/logs"),
        "eval_reports": eval_reports(workspace.metadata_dir / "reports", since, shown_as="metadata/reports"),
    }
