"""clara report: the registry, metrics with their trend over versions, and serving usage, for monitoring."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import click

#: What --json / --html given without a FILE stand for: a new file in metadata/reports/.
DEFAULT_FILE = "<metadata/reports>"


def _default_path(reports_dir: Path, stamp: str, suffix: str) -> Path:
    return reports_dir / f"{stamp}-report{suffix}"


@click.command()
@click.option(
    "--since",
    metavar="DATE",
    help="Count only requests (and metric history) from this UTC date or date and time on, in ISO form: "
    "2026-11-25, 2026-11-25T14:00, 2026-11-25T14:00+02:00.",
)
@click.option(
    "--json",
    "json_file",
    metavar="[FILE]",
    is_flag=False,
    flag_value=DEFAULT_FILE,
    help="Write the report as JSON to FILE ('-': standard output, and nothing else is printed); "
    "given without FILE: metadata/reports/<timestamp>-report.json.",
)
@click.option(
    "--html",
    "html_file",
    metavar="[FILE]",
    is_flag=False,
    flag_value=DEFAULT_FILE,
    help="Write one self-contained HTML page with plots to FILE (opens without network; needs matplotlib, "
    "the 'plot' extra); given without FILE: metadata/reports/<timestamp>-report.html.",
)
@click.pass_obj
def report(obj, since: str | None, json_file: str | None, html_file: str | None) -> None:
    """Summarise the registry, the latest metrics per adapter with their trend over versions, and serving usage.

    Serving usage (requests, tokens, latency p50/p95/p99 of successful requests, errors per adapter and error
    code, adapter selection and routing decisions) comes from the per-request JSON lines the server writes to
    metadata/logs/ ('clara serve --log-requests'). Lines that are not request records are skipped and
    counted per file. Without --json/--html a summary is printed; with them it is printed too, unless the
    JSON goes to standard output.

    \b
    Examples:
      clara report
      clara report --since 2026-11-01 --html
      clara report --json - | jq .serving.totals
    """
    from ..fileio import write_json_atomic, write_text_atomic
    from ..reporting.collect import collect_report, parse_since
    from ..reporting.text import print_report

    since_at = parse_since(since) if since is not None else None  # a bad date fails before anything is read
    if html_file is not None:
        from ..reporting.html import require_matplotlib

        require_matplotlib()
    workspace = obj.workspace()
    with obj.registry() as registry:
        data = collect_report(registry, workspace, since=since_at)

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    reports_dir = workspace.metadata_dir / "reports"
    written: list[Path] = []
    html_text = None
    if html_file is not None:
        from ..reporting.html import render_html

        html_text = render_html(data)  # rendered whole before any file is written
    if json_file == "-":
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print_report(data)
    for chosen, suffix, write in (
        (json_file, ".json", lambda p: write_json_atomic(p, data)),
        (html_file, ".html", lambda p: write_text_atomic(p, html_text or "")),
    ):
        if chosen is None or chosen == "-":
            continue
        path = _default_path(reports_dir, stamp, suffix) if chosen == DEFAULT_FILE else Path(chosen)
        _write(path, write)
        written.append(path)
    for path in written:
        click.echo(f"Wrote {path}", err=json_file == "-")


def _write(path: Path, write) -> None:
    from ..errors import ClaraError
    from ..fileio import storage_error

    if path.is_dir():
        raise ClaraError(f"{path} is a folder; give a file name for the report")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    except OSError as exc:
        error = storage_error(exc, path.parent, f"writing {path}")
        raise (error or ClaraError(f"cannot write {path}: {exc.strerror or exc}")) from None
