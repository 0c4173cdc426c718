"""clara report: registry contents, metric trends over versions and serving usage from the request logs, checked
against hand computations; --since; bad input; empty and malformed logs."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result

from clara_core import hashing
from clara_core.registry import AdapterDraft, Registry
from clara_core.reporting.collect import percentile
from clara_core.serving.requestlog import JsonlRequestLog, RequestRecord
from clara_core.workspace import Workspace

T0 = dt.datetime(2026, 11, 20, 10, 0, tzinfo=dt.UTC).timestamp()
OLD = dt.datetime(2026, 11, 5, 9, 0, tzinfo=dt.UTC).timestamp()
STEUER_V1, STEUER_V2, SOZIAL = "steuer-lora-r4-v1", "steuer-lora-r4-v2", "sozial-lora-r4-v1"
SET_A, SET_B = "aa" * 32, "bb" * 32


def register(registry: Registry, ws: Workspace, folder: Path, domain: str) -> str:
    base = registry.get_base("tiny")
    draft = AdapterDraft(
        domain=[domain], method="lora", rank=4, base_model_hash=base.base_model_hash,
        adapter_checksum=hashing.adapter_checksum(folder),
        size_bytes=sum(f.stat().st_size for f in folder.iterdir()),
    )  # fmt: skip
    return registry.register_adapter(draft, folder, ws, place="copy").id


@pytest.fixture
def ws(workspace_with_base: Workspace, fake_adapter: Callable[..., Path]) -> Workspace:
    """steuer v1 and v2 and sozial v1 with metrics: ppl_dev 9 -> 8 (better, same eval set), qa_f1 0.4 -> 0.3
    (worse, on another eval set)."""
    ws = workspace_with_base
    with Registry.open(ws.registry_path) as registry:
        assert register(registry, ws, fake_adapter(seed=1), "steuer") == STEUER_V1
        assert register(registry, ws, fake_adapter(seed=2), "steuer") == STEUER_V2
        assert register(registry, ws, fake_adapter(seed=3), "sozial") == SOZIAL
        registry.add_metrics(STEUER_V1, {"ppl_dev": 9.0, "qa_f1": 0.4}, eval_set_sha256=SET_A, run_id="r1")
        registry.add_metrics(STEUER_V2, {"ppl_dev": 8.0}, eval_set="dev", eval_set_sha256=SET_A, run_id="r2")
        registry.add_metrics(STEUER_V2, {"qa_f1": 0.3}, eval_set="qa", eval_set_sha256=SET_B, run_id="r3")
        registry.add_metrics(SOZIAL, {"ppl_dev": 12.0}, eval_set="dev", run_id="r4")
    return ws


def rec(adapter_id: str | None, latency: float, *, ts: float = T0, status: int = 200, **kw) -> dict:
    fields = {"prompt_tokens": 10, "completion_tokens": 5} if status < 400 else {}
    return RequestRecord(
        request_id="r", endpoint="/generate", status=status, adapter_id=adapter_id, latency_seconds=latency,
        ts=ts, **{**fields, **kw},
    ).to_json()  # fmt: skip


#: 5 successes and one engine error for steuer v2, 2 routed successes and one 422 for sozial, one request for
#: the base, one refused before any adapter was chosen; spread over three hours.
RECORDS = [
    *(rec(STEUER_V2, x, ts=T0 + i) for i, x in enumerate([0.1, 0.2, 0.3, 0.4, 1.0])),
    rec(STEUER_V2, 0.05, status=500, error_code="engine_error", ts=T0 + 3600),
    rec(SOZIAL, 0.5, selection="routed", route_score=0.9, ts=T0 + 3600),
    rec(SOZIAL, 0.6, selection="routed", route_score=0.7, ts=T0 + 3601),
    rec(SOZIAL, 0.01, status=422, ts=T0 + 3602),
    rec(None, 0.2, selection="default", prompt_tokens=3, completion_tokens=7, ts=T0 + 7200),
    rec(None, 0.001, status=404, error_code="not_found", selection="none", ts=T0 + 7200),
]
OLD_RECORDS = [rec(SOZIAL, 5.0, ts=OLD), rec(STEUER_V1, 7.0, ts=OLD + 1, status=503, error_code="queue_full")]


def write_log(ws: Workspace, records: list[dict], name: str = "requests.jsonl", extra: bytes = b"") -> Path:
    """The lines the server's own request log writes for ``records``, then ``extra`` bytes as they are."""
    path = ws.metadata_dir / "logs" / name
    log = JsonlRequestLog(path)
    for record in records:
        log.record(RequestRecord(**record))
    with open(path, "ab") as handle:
        handle.write(extra)
    return path


def report_json(run_cli: Callable[..., Result], *args: str) -> dict:
    result = run_cli("report", "--json", "-", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_percentile_is_linear_between_closest_ranks() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([0.1, 0.2, 0.3, 0.4, 1.0], 95) == pytest.approx(0.4 + 0.6 * 0.8)


def test_registry_metrics_and_trend_over_versions(ws: Workspace, run_cli) -> None:
    report = report_json(run_cli)
    reg = report["registry"]
    assert [b["name"] for b in reg["bases"]] == ["tiny"] and reg["bases"][0]["adapters"] == 3
    assert reg["adapters"]["total"] == 3
    assert reg["adapters"]["by_domain"] == {"sozial": 1, "steuer": 2}
    assert reg["adapters"]["by_method"] == {"lora": 3}
    sizes = [a["size_bytes"] for a in reg["adapter_list"]]
    assert all(s > 0 for s in sizes) and reg["adapters"]["size_bytes"] == sum(sizes)

    trends = {(t["domain"], t["metric"]): t for t in report["metrics"]["trends"]}
    ppl = trends[("steuer", "ppl_dev")]
    assert [(p["version"], p["value"]) for p in ppl["points"]] == [(1, 9.0), (2, 8.0)]
    assert ppl["better"] == "lower" and ppl["status"] == "improved"
    assert ppl["change"] == -1.0 and ppl["relative_change"] == pytest.approx(-1 / 9)
    assert ppl["same_eval_set"] is True and ppl["points"][1]["eval_set"] == "dev"
    f1 = trends[("steuer", "qa_f1")]
    assert f1["better"] == "higher" and f1["status"] == "worse"
    assert f1["previous"] == 0.4 and f1["last"] == 0.3 and f1["relative_change"] == pytest.approx(-0.25)
    assert f1["same_eval_set"] is False and [p["eval_set_sha256"] for p in f1["points"]] == [SET_A, SET_B]
    assert trends[("sozial", "ppl_dev")]["status"] == "single"
    latest = {m["id"]: m["metrics"] for m in report["metrics"]["latest"]}
    assert latest[STEUER_V2] == {"ppl_dev": 8.0, "qa_f1": 0.3}
    assert report["metrics"]["history"]["values"] == 5 and report["metrics"]["history"]["runs"] == 4
    text = run_cli("report").stdout
    rows = [line.split() for line in text.splitlines() if line.startswith(STEUER_V2)]
    worse = ["-0.1", "(-25.0%)", "worse", "(other", "eval", "set)"]
    assert [STEUER_V2, "qa_f1", "0.3", "0.4", *worse, "higher", "2"] in rows
    assert [STEUER_V2, "ppl_dev", "8", "9", "-1", "(-11.1%)", "improved", "lower", "2"] in rows


def test_serving_numbers_match_a_hand_computation(ws: Workspace, run_cli) -> None:
    write_log(ws, RECORDS)
    serving = report_json(run_cli)["serving"]
    assert serving["status"] == "ok" and serving["malformed"]["total"] == 0
    totals = serving["totals"]
    assert totals["requests"] == 11 and totals["errors"] == 3
    assert totals["prompt_tokens"] == 7 * 10 + 3 and totals["completion_tokens"] == 7 * 5 + 7
    assert totals["error_codes"] == {"engine_error": 1, "http_422": 1, "not_found": 1}
    # successful latencies: 0.1 0.2 0.2 0.3 0.4 0.5 0.6 1.0 (n=8; p at position 7 * q / 100)
    lat = totals["latency_seconds"]
    assert lat["count"] == 8
    assert lat["p50"] == pytest.approx(0.35)
    assert lat["p95"] == pytest.approx(0.6 + 0.4 * 0.65)
    assert lat["p99"] == pytest.approx(0.6 + 0.4 * 0.93)
    per = {u["adapter"]: u for u in serving["per_adapter"]}
    assert list(per) == [STEUER_V2, SOZIAL, "(base)", "(none)"]  # most requests first
    steuer = per[STEUER_V2]
    assert (steuer["requests"], steuer["errors"], steuer["error_codes"]) == (6, 1, {"engine_error": 1})
    assert steuer["latency_seconds"]["p50"] == pytest.approx(0.3)
    assert steuer["latency_seconds"]["p95"] == pytest.approx(0.88)
    assert steuer["latency_seconds"]["p99"] == pytest.approx(0.976)
    assert per[SOZIAL]["errors"] == 1 and per[SOZIAL]["error_codes"] == {"http_422": 1}
    assert per["(none)"]["error_codes"] == {"not_found": 1} and per["(base)"]["completion_tokens"] == 7
    routing = serving["routing"]
    assert routing["by_selection"] == {"named": 7, "routed": 2, "default": 1, "none": 1}
    assert routing["routed_to"] == {SOZIAL: 2}
    assert routing["route_score"]["mean"] == pytest.approx(0.8)
    timeline = serving["timeline"]
    assert timeline["bucket"] == "hour"
    assert [(p["requests"], p["errors"]) for p in timeline["points"]] == [(5, 0), (4, 2), (2, 1)]
    assert serving["window"] == {"first": "2026-11-20T10:00:00Z", "last": "2026-11-20T12:00:00Z"}


def test_since_counts_only_later_requests_and_metric_history(ws: Workspace, run_cli) -> None:
    write_log(ws, OLD_RECORDS + RECORDS)
    everything = report_json(run_cli)["serving"]
    assert everything["totals"]["requests"] == 13 and everything["totals"]["errors"] == 4
    assert everything["timeline"]["bucket"] == "day"  # 15 days of logs: per day
    report = report_json(run_cli, "--since", "2026-11-15")
    assert report["since"] == "2026-11-15T00:00:00Z"
    serving = report["serving"]
    assert serving["totals"]["requests"] == 11 and serving["before_since"] == 2
    assert "queue_full" not in serving["totals"]["error_codes"]
    # a date and time with an offset: 12:30+02:00 is 10:30 UTC, after the first hour's five requests
    later = report_json(run_cli, "--since", "2026-11-20T12:30+02:00")["serving"]
    assert later["totals"]["requests"] == 6 and later["before_since"] == 7
    # metric values were all recorded now: none is before 2026-11-15, all are after a date in the future
    assert report["metrics"]["history"]["values"] == 5
    assert report_json(run_cli, "--since", "2999-01-01")["metrics"]["history"]["values"] == 0


@pytest.mark.parametrize("bad", ["yesterday", "2026-13-01", "20.11.2026", ""])
def test_a_since_that_is_not_a_date_is_one_clear_line(ws: Workspace, run_cli, bad: str) -> None:
    result = run_cli("report", "--since", bad)
    assert result.exit_code == 1
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and "--since" in lines[0] and "is not a date" in lines[0] and "2026-11-25" in lines[0]
    )


def test_missing_and_empty_log_folders_still_report_the_registry(ws: Workspace, run_cli) -> None:
    result = run_cli("report")
    assert result.exit_code == 0, result.output
    assert "Registry: 1 base(s), 3 adapter(s)" in result.stdout
    assert "no request logs: metadata/logs does not exist" in result.stdout
    report = report_json(run_cli)
    assert report["serving"]["status"] == "missing" and report["registry"]["adapters"]["total"] == 3
    (ws.metadata_dir / "logs").mkdir()
    report = report_json(run_cli)
    assert report["serving"]["status"] == "empty" and report["serving"]["totals"]["requests"] == 0
    assert "has no *.jsonl files" in report["serving"]["message"]
    assert report["metrics"]["trends"]  # the registry part is all there


def test_malformed_lines_are_skipped_and_counted_per_file(ws: Workspace, run_cli) -> None:
    good = RECORDS[:3]
    extra = (
        b"not json\n"
        + b"\n"  # blank lines are not records and not errors
        + json.dumps({**good[0], "status": "200"}).encode() + b"\n"
        + b"[1, 2]\n"
        + b"\xff\xfe{}\n"
        + json.dumps({**good[0], "latency_seconds": -1}).encode() + b"\n"
        + json.dumps({k: v for k, v in good[0].items() if k != "ts"}).encode() + b"\n"
        + b'{"request_id": "x", "endpo'  # a line cut short by a crash
    )  # fmt: skip
    write_log(ws, good, extra=extra)
    too_long = b'{"request_id": "' + b"x" * (1 << 20) + b'"}\n'  # over 1 MiB: read past, never whole
    write_log(
        ws, RECORDS[3:5], name="requests.jsonl.1", extra=b"{}\n" + too_long + json.dumps(RECORDS[5]).encode()
    )
    result = run_cli("report", "--json", "-")
    assert result.exit_code == 0, result.output
    serving = json.loads(result.stdout)["serving"]
    assert serving["totals"]["requests"] == 6  # the last line of requests.jsonl.1 counts, without its newline
    assert serving["malformed"]["total"] == 9
    files = {m["file"]: m for m in serving["malformed"]["files"]}
    assert files["metadata/logs/requests.jsonl"]["count"] == 7
    assert files["metadata/logs/requests.jsonl"]["first_lines"] == [4, 6, 7, 8, 9]  # the first five
    assert files["metadata/logs/requests.jsonl.1"] == {
        "file": "metadata/logs/requests.jsonl.1", "count": 2, "first_lines": [3, 4],
    }  # fmt: skip
    text = run_cli("report")
    assert text.exit_code == 0
    assert (
        "skipped 7 malformed line(s) in metadata/logs/requests.jsonl (line 4, 6, 7, 8, 9, ...)" in text.stdout
    )
    assert "skipped 2 malformed line(s) in metadata/logs/requests.jsonl.1 (line 3, 4)" in text.stdout


def test_json_files_go_to_metadata_reports_by_default_and_where_asked(
    ws: Workspace, run_cli, tmp_path: Path
) -> None:
    write_log(ws, RECORDS)
    result = run_cli("report", "--json")
    assert result.exit_code == 0, result.output
    written = list((ws.metadata_dir / "reports").glob("*-report.json"))
    assert len(written) == 1 and f"Wrote {written[0]}" in result.output
    assert json.loads(written[0].read_text())["serving"]["totals"]["requests"] == 11
    target = tmp_path / "out" / "r.json"
    result = run_cli("report", "--json", str(target), "--since", "2026-11-20")
    assert result.exit_code == 0, result.output
    assert json.loads(target.read_text())["since"] == "2026-11-20T00:00:00Z"
    assert not list(target.parent.glob(".*partial"))
    (ws.metadata_dir / "reports" / "20261120T100000Z-eval.json").write_text("{}")
    assert report_json(run_cli)["eval_reports"] == ["metadata/reports/20261120T100000Z-eval.json"]
    folder = run_cli("report", "--json", str(tmp_path))
    assert folder.exit_code == 1 and "is a folder" in folder.stderr


def test_html_without_matplotlib_is_one_line_and_writes_nothing(
    ws: Workspace, run_cli, tmp_path: Path, monkeypatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    result = run_cli("report", "--html", str(tmp_path / "r.html"))
    assert result.exit_code == 1
    assert "--html needs matplotlib" in result.stderr and "clara-core[plot]" in result.stderr
    assert not (tmp_path / "r.html").exists()


def test_report_help_and_cli_help_stay_light() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from clara_core.cli import cli; "
        "from click.testing import CliRunner; r = CliRunner().invoke(cli, ['report', '--help']); "
        "print(r.output); "
        "print('HEAVY', sorted(m for m in ('matplotlib', 'torch', 'fastapi', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--since DATE" in out and "--html" in out and "metadata/reports/" in out
    assert "HEAVY []" in out


@pytest.mark.slow
def test_report_reads_what_a_real_server_logged(ws: Workspace, run_cli) -> None:
    """A real server (transformers engine, tiny model) writes the log; the report counts what was asked."""
    import httpx

    from clara_core.plugins import PluginManager
    from clara_core.serving.runner import BackgroundServer, prepare
    from clara_core.serving.state import ServeSettings

    log = JsonlRequestLog(ws.metadata_dir / "logs" / "requests.jsonl")
    state = prepare(
        ws, PluginManager(), engine_name="transformers", base_name="tiny", settings=ServeSettings(),
        observers=[log],
    )  # fmt: skip
    completion = 0
    with BackgroundServer(state) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        for prompt, adapter in [("Das Finanzamt", STEUER_V2), ("Der Bescheid", STEUER_V2), ("Die", "tiny")]:
            answer = client.post("/generate", json={"prompt": prompt, "adapter_id": adapter, "max_tokens": 4})
            assert answer.status_code == 200, answer.text
            completion += answer.json()["usage"]["completion_tokens"]
        assert (
            client.post("/generate", json={"prompt": "x", "adapter_id": "nicht-da-r1-v1"}).status_code == 404
        )
    serving = report_json(run_cli)["serving"]
    assert serving["malformed"]["total"] == 0
    totals = serving["totals"]
    assert (totals["requests"], totals["errors"], totals["error_codes"]) == (4, 1, {"not_found": 1})
    assert totals["completion_tokens"] == completion and totals["latency_seconds"]["count"] == 3
    per = {u["adapter"]: u for u in serving["per_adapter"]}
    assert per[STEUER_V2]["requests"] == 2 and per[STEUER_V2]["errors"] == 0
    assert per["(base)"]["requests"] == 1
    assert serving["routing"]["by_selection"] == {"named": 3, "none": 1}
