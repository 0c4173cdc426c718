"""The report as one self-contained HTML page: inline CSS, plots drawn by matplotlib as SVG and embedded as
``data:`` images, no script and nothing fetched from the network.

matplotlib is imported here only (``pip install 'clara-core[plot]'``); :func:`require_matplotlib` says so in
one line when it is missing.
"""

from __future__ import annotations

import base64
import html
import io
from typing import TYPE_CHECKING, Any

from ..errors import ClaraError
from ..output import human_size
from .text import fmt_change, fmt_number, fmt_seconds

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The most metric trend plots drawn (one per metric name); the table lists them all.
MAX_TREND_PLOTS = 12
#: The most adapters drawn in a per-adapter plot (those with the most requests); the table lists them all.
MAX_BARS = 15
_COLOURS = ("#2f6db5", "#e0862b", "#3a9a5b", "#c8453a", "#7d5bb5", "#8a6a4f", "#d36fb0", "#6f6f6f")

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; background: #fff; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
.meta { color: #666; } .note { background: #fff6e0; border-left: 4px solid #e0a82b; padding: 0.5em 1em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; } th { background: #f3f5f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.worse { color: #b3261e; font-weight: 600; } .improved { color: #1e7b34; font-weight: 600; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; border: 1px solid #e5e5e5; padding: 0.4em; background: #fff; }
figure img { display: block; width: 500px; height: auto; } figcaption { font-size: 0.85em; color: #555; }
.cards { display: flex; gap: 1em; flex-wrap: wrap; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 1em; min-width: 9em; }
.card b { display: block; font-size: 1.5em; }
"""


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ClaraError(
            "--html needs matplotlib to draw the plots, and it is not installed; install it with "
            "pip install 'clara-core[plot]' (or scripts/install.sh), or leave out --html"
        ) from None


# -- plots ------------------------------------------------------------------------------------------------------


def _figure(width: float = 6.4, height: float = 3.4) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    fig.set_layout_engine("constrained")
    return fig


def _svg_data_uri(fig: Figure) -> str:
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "clara-report"}):
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue().encode("utf-8")).decode("ascii")


def _plot_block(fig: Figure, caption: str, name: str) -> str:
    return (
        f'<figure data-plot="{html.escape(name)}"><img alt="{html.escape(caption)}" src="{_svg_data_uri(fig)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _short(label: str, n: int = 28) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


def _plot_timeline(serving: dict[str, Any]) -> str | None:
    points = serving["timeline"]["points"]
    if not points:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    xs = list(range(len(points)))
    ok = [p["requests"] - p["errors"] for p in points]
    errors = [p["errors"] for p in points]
    ax.bar(xs, ok, color=_COLOURS[0], label="ok")
    ax.bar(xs, errors, bottom=ok, color=_COLOURS[3], label="errors")
    step = max(1, len(points) // 8)
    bucket = serving["timeline"]["bucket"]
    labels = [p["start"][5:16].replace("T", " ") if bucket == "hour" else p["start"][:10] for p in points]
    ax.set_xticks(xs[::step], labels[::step], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("requests")
    ax.set_title(f"Requests per {bucket} (UTC)")
    ax.legend(fontsize=8)
    return _plot_block(fig, f"Requests and errors per {bucket}", "timeline")


def _top(serving: dict[str, Any]) -> str:
    n = len(serving["per_adapter"])
    return f" (top {MAX_BARS} of {n} by requests)" if n > MAX_BARS else ""


def _plot_latency(serving: dict[str, Any]) -> str | None:
    rows = [u for u in serving["per_adapter"] if u["latency_seconds"]["count"]][:MAX_BARS]
    if not rows:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    width = 0.27
    for i, q in enumerate(("p50", "p95", "p99")):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        ax.bar(xs, [u["latency_seconds"][q] * 1000 for u in rows], width, label=q, color=_COLOURS[i])
    ax.set_xticks(range(len(rows)), [_short(u["adapter"]) for u in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("latency (ms)")
    ax.set_title("Latency of successful requests by adapter" + _top(serving))
    ax.legend(fontsize=8)
    return _plot_block(fig, "Latency percentiles per adapter", "latency")


def _plot_tokens(serving: dict[str, Any]) -> str | None:
    rows = serving["per_adapter"][:MAX_BARS]
    if not rows or not any(u["total_tokens"] for u in rows):
        return None
    fig = _figure()
    ax = fig.add_subplot()
    xs = range(len(rows))
    prompt = [u["prompt_tokens"] for u in rows]
    ax.bar(xs, prompt, color=_COLOURS[0], label="prompt")
    ax.bar(xs, [u["completion_tokens"] for u in rows], bottom=prompt, color=_COLOURS[1], label="completion")
    ax.set_xticks(list(xs), [_short(u["adapter"]) for u in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("tokens")
    ax.set_title("Tokens by adapter" + _top(serving))
    ax.legend(fontsize=8)
    return _plot_block(fig, "Prompt and completion tokens per adapter", "tokens")


def _plot_counts(mapping: dict[str, int], title: str, name: str, colour: str) -> str | None:
    if not mapping:
        return None
    if len(mapping) > MAX_BARS:
        title += f" (top {MAX_BARS} of {len(mapping)})"
        mapping = dict(list(mapping.items())[:MAX_BARS])
    fig = _figure(6.4, max(2.0, 0.45 * len(mapping) + 1.2))
    ax = fig.add_subplot()
    labels = list(mapping)[::-1]
    ax.barh(range(len(labels)), [mapping[k] for k in labels], color=colour)
    ax.set_yticks(range(len(labels)), [_short(k) for k in labels], fontsize=8)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("requests")
    ax.set_title(title)
    return _plot_block(fig, title, name)


def _plot_registry(registry: dict[str, Any]) -> str | None:
    rows = registry["adapters"]["by_domain_and_method"]
    if not rows:
        return None
    domains = sorted({r["domain"] for r in rows})
    methods = sorted({r["method"] for r in rows})
    count = {(r["domain"], r["method"]): r["count"] for r in rows}
    fig = _figure(6.4, 3.0)
    ax = fig.add_subplot()
    bottom = [0] * len(domains)
    for i, method in enumerate(methods):
        values = [count.get((d, method), 0) for d in domains]
        ax.bar(range(len(domains)), values, bottom=bottom, label=method, color=_COLOURS[i % len(_COLOURS)])
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xticks(range(len(domains)), [_short(d) for d in domains], fontsize=8)
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("adapters")
    ax.set_title("Adapters by domain and method")
    ax.legend(fontsize=8)
    return _plot_block(fig, "Adapters by domain and method", "registry")


def _plot_trends(metrics: dict[str, Any]) -> list[str]:
    by_metric: dict[str, list[dict[str, Any]]] = {}
    for trend in metrics["trends"]:
        by_metric.setdefault(trend["metric"], []).append(trend)
    blocks = []
    from matplotlib.ticker import MaxNLocator

    for metric, trends in sorted(by_metric.items())[:MAX_TREND_PLOTS]:
        fig = _figure(6.4, 3.0)
        ax = fig.add_subplot()
        for i, trend in enumerate(trends):
            xs = [p["version"] for p in trend["points"]]
            ys = [p["value"] for p in trend["points"]]
            ax.plot(
                xs,
                ys,
                marker="o",
                color=_COLOURS[i % len(_COLOURS)],
                label=f"{trend['domain']}/{trend['method']}",
            )
        ax.set_xlabel("version")
        ax.set_ylabel(metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        better = trends[0]["better"]
        ax.set_title(f"{metric} over versions ({better} is better)")
        ax.legend(fontsize=8)
        blocks.append(_plot_block(fig, f"{metric} by version, per domain and method", f"trend:{metric}"))
    return blocks


# -- the page ---------------------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _card(label: str, value: Any) -> str:
    return f'<div class="card"><b>{_e(value)}</b>{_e(label)}</div>'


def render_html(report: dict[str, Any]) -> str:
    """The whole page for ``report`` (as :func:`clara_core.reporting.collect.collect_report` returns it)."""
    require_matplotlib()
    reg, metrics, serving = report["registry"], report["metrics"], report["serving"]
    adapters = reg["adapters"]
    totals = serving["totals"]
    since = f" · requests since {report['since']}" if report["since"] else ""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>clara report {_e(report['generated'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>clara report</h1>",
        f'<p class="meta">{_e(report["workspace"])} · generated {_e(report["generated"])}{_e(since)}</p>',
        '<div class="cards">',
        _card("bases", len(reg["bases"])),
        _card("adapters", adapters["total"]),
        _card("adapter storage", human_size(adapters["size_bytes"])),
        _card("requests", totals["requests"]),
        _card("errors", totals["errors"]),
        _card("latency p95", fmt_seconds(totals["latency_seconds"]["p95"])),
        "</div>",
    ]

    # registry
    parts.append("<h2>Registry</h2>")
    parts.append(
        _table(
            ["base", "model type", "size", "adapters"],
            [[b["name"], b["model_type"], human_size(b["size_bytes"]), b["adapters"]] for b in reg["bases"]],
            {2, 3},
        )
        if reg["bases"]
        else '<p class="note">No base model is registered.</p>'
    )
    if adapters["total"]:
        plot = _plot_registry(reg)
        if plot:
            parts.append(f'<div class="plots">{plot}</div>')
        parts.append(
            _table(
                ["id", "kind", "domain", "method", "rank", "version", "status", "base", "size"],
                [
                    [
                        a["id"],
                        a["kind"],
                        ", ".join(a["domain"]),
                        a["method"],
                        a["rank"],
                        a["version"],
                        a["status"],
                        a["base"],
                        human_size(a["size_bytes"] or 0),
                    ]
                    for a in reg["adapter_list"]
                ],
                {4, 5, 8},
            )
        )
    else:
        parts.append('<p class="note">No adapter is registered.</p>')

    # metrics
    parts.append("<h2>Metrics and trends over versions</h2>")
    history = metrics["history"]
    parts.append(
        f'<p class="meta">{history["values"]} metric value(s) from {history["runs"]} evaluation run(s) in the '
        f"history{_e(since)}; trend: the latest version of each domain and method against the version before.</p>"
    )
    if metrics["trends"]:
        parts.append(f'<div class="plots">{"".join(_plot_trends(metrics))}</div>')
        rows = []
        for t in metrics["trends"]:
            status = t["status"]
            change = fmt_change(t)
            rows.append(
                "<tr>"
                + "".join(
                    f"<td>{_e(c)}</td>"
                    for c in (t["domain"], t["method"], t["metric"], t["points"][-1]["adapter_id"])
                )
                + f'<td class="num">{_e(fmt_number(t["last"]))}</td>'
                + f'<td class="num">{_e(fmt_number(t["previous"]))}</td>'
                + f'<td class="{_e(status)}">{_e(change)}</td>'
                + f"<td>{_e(t['better'])}</td><td class='num'>{len(t['points'])}</td></tr>"
            )
        head = "".join(
            f"<th>{h}</th>"
            for h in (
                "domain",
                "method",
                "metric",
                "latest",
                "value",
                "previous",
                "change",
                "better",
                "versions",
            )
        )
        parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    else:
        parts.append('<p class="note">No adapter has metrics yet (run clara eval).</p>')

    # serving
    parts.append("<h2>Serving</h2>")
    if serving["message"]:
        parts.append(f'<p class="note">{_e(serving["message"])}</p>')
    if totals["requests"]:
        window = serving["window"]
        lat = totals["latency_seconds"]
        parts.append(
            f'<p class="meta">{totals["requests"]} request(s) from {_e(window["first"])} to {_e(window["last"])}; '
            f"{totals['prompt_tokens']} prompt and {totals['completion_tokens']} completion tokens; latency of "
            f"successful requests p50 {_e(fmt_seconds(lat['p50']))}, p95 {_e(fmt_seconds(lat['p95']))}, "
            f"p99 {_e(fmt_seconds(lat['p99']))}.</p>"
        )
        routing = serving["routing"]
        plots: list[str | None] = [
            _plot_timeline(serving),
            _plot_latency(serving),
            _plot_tokens(serving),
            _plot_counts(totals["error_codes"], "Errors by code", "errors", _COLOURS[3]),
            _plot_counts(routing["by_selection"], "Adapter selection", "routing", _COLOURS[4]),
            _plot_counts(routing["routed_to"], "Routed requests by adapter", "routed", _COLOURS[2]),
        ]
        parts.append(f'<div class="plots">{"".join(p for p in plots if p)}</div>')
        parts.append(
            _table(
                [
                    "adapter",
                    "requests",
                    "errors",
                    "prompt tokens",
                    "completion tokens",
                    "p50",
                    "p95",
                    "p99",
                    "error codes",
                ],
                [
                    [
                        u["adapter"],
                        u["requests"],
                        u["errors"],
                        u["prompt_tokens"],
                        u["completion_tokens"],
                        fmt_seconds(u["latency_seconds"]["p50"]),
                        fmt_seconds(u["latency_seconds"]["p95"]),
                        fmt_seconds(u["latency_seconds"]["p99"]),
                        ", ".join(f"{k} {v}" for k, v in u["error_codes"].items()) or "-",
                    ]
                    for u in serving["per_adapter"]
                ],
                {1, 2, 3, 4, 5, 6, 7},
            )
        )
    if serving["before_since"]:
        parts.append(
            f'<p class="meta">{serving["before_since"]} request(s) before {_e(report["since"])} not counted.</p>'
        )
    for item in serving["malformed"]["files"]:
        lines = ", ".join(str(n) for n in item["first_lines"])
        parts.append(
            f'<p class="note">Skipped {item["count"]} malformed line(s) in {_e(item["file"])} '
            f"(line {_e(lines)}{', ...' if item['count'] > len(item['first_lines']) else ''}).</p>"
        )
    for item in serving["unreadable"]:
        parts.append(f'<p class="note">Could not read {_e(item["file"])}: {_e(item["error"])}</p>')
    if report["eval_reports"]:
        parts.append("<h2>Evaluation reports</h2><ul>")
        parts.extend(f"<li>{_e(name)}</li>" for name in report["eval_reports"][-20:])
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
