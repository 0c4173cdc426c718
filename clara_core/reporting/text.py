"""The terminal summary of a report (plain text, aligned tables)."""

from __future__ import annotations

from typing import Any

import click

from ..output import echo_table, human_size


def fmt_number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def fmt_change(trend: dict[str, Any]) -> str:
    if trend["change"] is None:
        return "-"
    rel = trend["relative_change"]
    text = f"{trend['change']:+.4g}"
    if rel is not None:
        text += f" ({rel:+.1%})"
    other = " (other eval set)" if trend.get("same_eval_set") is False else ""
    return f"{text} {trend['status']}{other}"


def counts(mapping: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in mapping.items()) or "-"


def print_report(report: dict[str, Any]) -> None:
    reg = report["registry"]
    adapters = reg["adapters"]
    since = f" since {report['since']}" if report["since"] else ""
    click.echo(f"clara report for {report['workspace']} ({report['generated']}{since})")
    click.echo("")
    click.echo(
        f"Registry: {len(reg['bases'])} base(s), {adapters['total']} adapter(s), "
        f"{human_size(adapters['size_bytes'])} of adapters"
    )
    for base in reg["bases"]:
        click.echo(
            f"  base {base['name']}: {base['model_type'] or '-'}, {human_size(base['size_bytes'])}, "
            f"{base['adapters']} adapter(s)"
        )
    if adapters["total"]:
        click.echo(f"  by domain: {counts(adapters['by_domain'])}")
        click.echo(f"  by method: {counts(adapters['by_method'])}")
        click.echo(f"  by kind:   {counts(adapters['by_kind'])}")
        click.echo(f"  by status: {counts(adapters['by_status'])}")

    metrics = report["metrics"]
    click.echo("")
    history = metrics["history"]
    click.echo(
        f"Metrics: {len(metrics['latest'])} adapter(s) with metrics; {history['values']} value(s) from "
        f"{history['runs']} evaluation run(s) in the history{since}"
    )
    rows = []
    for trend in metrics["trends"]:
        last = trend["points"][-1]
        rows.append(
            (
                last["adapter_id"],
                trend["metric"],
                fmt_number(trend["last"]),
                fmt_number(trend["previous"]),
                fmt_change(trend),
                trend["better"],
                len(trend["points"]),
            )
        )
    if rows:
        echo_table(("LATEST VERSION", "METRIC", "VALUE", "PREVIOUS", "CHANGE", "BETTER", "VERSIONS"), rows)

    serving = report["serving"]
    click.echo("")
    totals = serving["totals"]
    if serving["message"]:
        click.echo(f"Serving: {serving['message']}")
    if totals["requests"]:
        window = serving["window"]
        click.echo(
            f"Serving: {totals['requests']} request(s) from {window['first']} to {window['last']}, "
            f"{totals['errors']} error(s), {totals['prompt_tokens']} prompt + "
            f"{totals['completion_tokens']} completion tokens"
        )
        lat = totals["latency_seconds"]
        click.echo(
            f"  latency (successful requests): p50 {fmt_seconds(lat['p50'])}, p95 {fmt_seconds(lat['p95'])}, "
            f"p99 {fmt_seconds(lat['p99'])}"
        )
        echo_table(
            ("ADAPTER", "REQUESTS", "ERRORS", "PROMPT TOK", "COMPL TOK", "P50", "P95", "P99"),
            [
                (
                    u["adapter"],
                    u["requests"],
                    u["errors"],
                    u["prompt_tokens"],
                    u["completion_tokens"],
                    fmt_seconds(u["latency_seconds"]["p50"]),
                    fmt_seconds(u["latency_seconds"]["p95"]),
                    fmt_seconds(u["latency_seconds"]["p99"]),
                )
                for u in serving["per_adapter"]
            ],
        )
        if totals["error_codes"]:
            click.echo(f"  errors by code: {counts(totals['error_codes'])}")
        routing = serving["routing"]
        click.echo(f"  adapter selection: {counts(routing['by_selection'])}")
        if routing["routed_to"]:
            score = routing["route_score"]
            click.echo(
                f"  routed to: {counts(routing['routed_to'])} (score mean {fmt_number(score['mean'])}, "
                f"p50 {fmt_number(score['p50'])})"
            )
    if serving["before_since"]:
        click.echo(f"  {serving['before_since']} request(s) before {report['since']} not counted")
    for item in serving["malformed"]["files"]:
        lines = ", ".join(str(n) for n in item["first_lines"])
        more = ", ..." if item["count"] > len(item["first_lines"]) else ""
        click.echo(f"  skipped {item['count']} malformed line(s) in {item['file']} (line {lines}{more})")
    for item in serving["unreadable"]:
        click.echo(f"  could not read {item['file']}: {item['error']}")
    if report["eval_reports"]:
        click.echo("")
        click.echo(f"Evaluation reports: {len(report['eval_reports'])}, latest {report['eval_reports'][-1]}")
