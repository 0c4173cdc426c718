"""clara eval / clara eval matrix end to end on the tiny model with trained adapters (one workspace per module)."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from clara_core.cli import ClaraContext, cli
from clara_core.plugins import PluginManager
from clara_core.workspace import Workspace

from .conftest import write_fake_adapter

pytestmark = pytest.mark.slow

STEUER = [
    "Das Finanzamt setzt die Einkommensteuer durch Steuerbescheid fest.",
    "Der Einspruch ist innerhalb eines Monats nach Bekanntgabe einzulegen.",
    "Die Umsatzsteuer beträgt im Regelfall neunzehn Prozent.",
    "Werbungskosten sind Aufwendungen zur Erwerbung, Sicherung und Erhaltung der Einnahmen.",
]
SOZIAL = [
    "Das Bürgergeld sichert den Lebensunterhalt erwerbsfähiger Leistungsberechtigter.",
    "Die Leistungen der Sozialhilfe werden auf Antrag erbracht.",
    "Der Träger der Grundsicherung berät die Leistungsberechtigten.",
    "Ein Bescheid der Sozialbehörde kann mit dem Widerspruch angefochten werden.",
]
FAST = ("--max-steps", "12", "--lr", "5e-3", "--max-seq-len", "64", "--micro-batch-size", "4", "--rank", "4")


def _write(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def run(ws: Workspace, *args: str) -> Result:
    obj = ClaraContext(workspace=ws.root, plugins=PluginManager())
    return CliRunner().invoke(cli, list(args), obj=obj, catch_exceptions=True)


def ok(ws: Workspace, *args: str) -> Result:
    result = run(ws, *args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def metrics_rows(ws: Workspace) -> list[tuple]:
    conn = sqlite3.connect(ws.registry_path)
    try:
        return conn.execute(
            "SELECT adapter_id, name, value, eval_set_sha256 FROM metrics_history ORDER BY id"
        ).fetchall()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, tiny_base_dir: Path) -> Workspace:
    """steuerrecht v1 (a random adapter: bad), v2 (trained), v3 (random again)."""
    workspace, _ = Workspace.init(tmp_path_factory.mktemp("eval") / "ws")
    data = workspace.root / "data"
    _write(data / "steuer.jsonl", [{"text": t} for t in STEUER * 4])
    _write(data / "steuer_dev.jsonl", [{"text": t} for t in STEUER])
    _write(data / "sozial_dev.jsonl", [{"text": t} for t in SOZIAL])
    shutil.copytree(tiny_base_dir, workspace.base_dir / "tiny")
    ok(workspace, "base", "add", str(workspace.base_dir / "tiny"), "--name", "tiny")
    bad = write_fake_adapter(workspace.root / "made" / "bad1", tiny_base_dir, rank=4, seed=1)
    ok(workspace, "adapters", "register", str(bad), "--domain", "steuerrecht", "--method", "lora")
    ok(
        workspace, "train", "--base", "tiny", "--domain", "steuerrecht", "--method", "lora",
        "--dataset", str(data / "steuer.jsonl"), "--dev", str(data / "steuer_dev.jsonl"), *FAST,
    )  # fmt: skip
    bad = write_fake_adapter(workspace.root / "made" / "bad3", tiny_base_dir, rank=4, seed=3)
    ok(workspace, "adapters", "register", str(bad), "--domain", "steuerrecht", "--method", "lora")
    return workspace


def test_train_ppl_dev_equals_clara_eval_and_beats_the_base(ws: Workspace) -> None:
    entry = json.loads(ok(ws, "adapters", "show", "steuerrecht-lora-r4-v2", "--json").stdout)
    result = json.loads(ok(ws, "eval", "steuerrecht-lora-r4-v2", "--base-too", "--json").stdout)
    rows = {r["target"]: r for r in result["rows"]}
    assert rows["steuerrecht-lora-r4-v2"]["eval_set"] == "data/steuer_dev.jsonl"  # the dev set of training
    ppl = rows["steuerrecht-lora-r4-v2"]["metrics"]["ppl"]
    assert ppl == pytest.approx(entry["metrics"]["ppl_dev"], rel=1e-5)
    assert rows["base"]["metrics"]["ppl"] == pytest.approx(entry["metrics"]["ppl_dev_base"], rel=1e-5)
    assert ppl < rows["base"]["metrics"]["ppl"]  # trained on the domain: better there than the base
    assert 0 < rows["steuerrecht-lora-r4-v2"]["metrics"]["bpb"] < rows["base"]["metrics"]["bpb"]
    # recorded: registry history with checksum and set sha256, a JSON report, latest value in list/show
    report = Path(result["report"])
    assert report.parent == ws.metadata_dir / "reports" and report.name.endswith("-eval.json")
    assert json.loads(report.read_text())["rows"][0]["metrics"]["ppl"] == ppl
    import hashlib

    sha = hashlib.sha256((ws.root / "data/steuer_dev.jsonl").read_bytes()).hexdigest()
    assert ("steuerrecht-lora-r4-v2", "ppl", ppl, sha) in metrics_rows(ws)
    listed = ok(ws, "adapters", "list").output
    line = next(x for x in listed.splitlines() if x.startswith("steuerrecht-lora-r4-v2"))
    assert f"ppl={ppl:.4g}" in line and "bpb=" in line
    shown = ok(ws, "adapters", "show", "steuerrecht-lora-r4-v2").output
    assert "latest metrics:" in shown and f"ppl  {ppl:.4g}  on data/steuer_dev.jsonl" in shown


def test_regression_gate_fails_on_a_worse_version_and_passes_otherwise(ws: Workspace) -> None:
    dev = str(ws.root / "data/steuer_dev.jsonl")
    ok(ws, "eval", "steuerrecht-lora-r4-v1", "--dev", dev)
    passed = ok(ws, "eval", "steuerrecht-lora-r4-v2", "--dev", dev, "--fail-on-regression")
    assert "gate: no metric worse" in passed.output
    before = len(metrics_rows(ws))
    failed = run(ws, "eval", "steuerrecht-lora-r4-v3", "--dev", dev, "--fail-on-regression")
    assert failed.exit_code == 1, failed.output
    line = next(x for x in failed.output.splitlines() if x.startswith("regression:") and " ppl " in x)
    v2 = [v for a, n, v, _ in metrics_rows(ws) if a == "steuerrecht-lora-r4-v2" and n == "ppl"][-1]
    assert "'steuerrecht-lora-r4-v3' ppl" in line and f"'steuerrecht-lora-r4-v2' {v2:.4f}" in line
    assert len(metrics_rows(ws)) == before + 2  # the measurement itself is kept (ppl, bpb)


def test_matrix_table_marks_the_best_and_writes_a_png(ws: Workspace) -> None:
    plot = ws.root / "matrix.png"
    result = ok(
        ws, "eval", "matrix", "steuerrecht-lora-r4-v2", "steuerrecht-lora-r4-v1", "--base-too",
        "--sets", f"steuerrecht={ws.root / 'data/steuer_dev.jsonl'}",
        "--sets", f"sozialrecht={ws.root / 'data/sozial_dev.jsonl'}", "--plot", str(plot), "--json",
    )  # fmt: skip
    out = json.loads(result.stdout)
    assert out["best"]["steuerrecht"] == "steuerrecht-lora-r4-v2"  # trained on it: best on it
    assert set(out["best"]) == {"steuerrecht", "sozialrecht"}
    assert set(out["values"]) == {"steuerrecht-lora-r4-v2", "steuerrecht-lora-r4-v1", "base"}
    for name, values in out["values"].items():  # the best per column is the smallest value
        assert all(values[d] >= out["values"][out["best"][d]][d] for d in values), name
    # own domain kept as ppl (what 'adapters list' shows), another domain's set as ppl@<domain>
    names = {n for a, n, _v, _s in metrics_rows(ws) if a == "steuerrecht-lora-r4-v2"}
    assert {"ppl", "ppl@sozialrecht", "bpb@sozialrecht"} <= names
    entry = json.loads(ok(ws, "adapters", "show", "steuerrecht-lora-r4-v2", "--json").stdout)
    assert entry["metrics"]["ppl"] == out["values"]["steuerrecht-lora-r4-v2"]["steuerrecht"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 1000
    table = ok(
        ws, "eval", "matrix", "steuerrecht-lora-r4-v2", "steuerrecht-lora-r4-v1",
        "--sets", f"steuerrecht={ws.root / 'data/steuer_dev.jsonl'}",
    ).output  # fmt: skip
    assert "*" in next(x for x in table.splitlines() if x.startswith("steuerrecht-lora-r4-v2"))


def test_qa_and_style_through_the_serving_engine(ws: Workspace) -> None:
    qa = _write(
        ws.root / "data" / "qa.jsonl",
        [{"prompt": "Frage: Wer setzt die Steuer fest?\nAntwort:", "answer": "Das Finanzamt"}] * 2,
    )
    result = json.loads(
        ok(
            ws, "eval", "steuerrecht-lora-r4-v2", "--qa", str(qa), "--style-ref",
            str(ws.root / "data/steuer.jsonl"), "--max-tokens", "6", "--json",
        ).stdout
    )  # fmt: skip
    by_kind = {r["eval_set_kind"]: r for r in result["rows"]}
    assert set(by_kind) == {"dev", "qa", "style"}
    qa_row = by_kind["qa"]
    assert set(qa_row["metrics"]) == {"qa_em", "qa_f1"} and 0 <= qa_row["metrics"]["qa_f1"] <= 1
    assert len(qa_row["details"]["examples"]) == 2
    style = by_kind["style"]["metrics"]
    assert -1 <= style["style_mean_cos"] <= 1 and -1 <= style["style_centroid_cos"] <= 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--dev", "missing.jsonl"), "missing.jsonl: dev set not found"),
        (("--dev", "data/latin1.jsonl"), "latin1.jsonl:1: not UTF-8"),
        (("--dev", "data/broken.jsonl"), "broken.jsonl:2: invalid JSON"),
        (
            ("--qa", "data/steuer_dev.jsonl"),
            'steuer_dev.jsonl:1: a QA record needs string "prompt" and "answer"',
        ),
    ],
)
def test_bad_input_is_one_line_and_records_nothing(
    ws: Workspace, args: tuple[str, ...], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ws.root)
    (ws.root / "data" / "latin1.jsonl").write_bytes('{"text": "Gebühr"}\n'.encode("latin-1"))
    (ws.root / "data" / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    before = metrics_rows(ws)
    reports = (
        set((ws.metadata_dir / "reports").glob("*")) if (ws.metadata_dir / "reports").exists() else set()
    )
    result = run(ws, "eval", "steuerrecht-lora-r4-v2", *args)
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert metrics_rows(ws) == before
    assert (set((ws.metadata_dir / "reports").glob("*")) if reports else set()) == reports


def test_changed_adapter_files_another_base_and_unknown_sets_form_are_refused(
    ws: Workspace, other_base_dir: Path
) -> None:
    ok(ws, "base", "add", str(other_base_dir), "--name", "other")
    other = write_fake_adapter(ws.root / "made" / "other", other_base_dir, rank=4)
    ok(ws, "adapters", "register", str(other), "--domain", "verfahren", "--method", "lora", "--base", "other")
    result = run(ws, "eval", "steuerrecht-lora-r4-v2", "verfahren-lora-r4-v1")
    assert result.exit_code != 0 and "were made for different bases" in result.output
    result = run(ws, "eval", "matrix", "steuerrecht-lora-r4-v2", "--sets", "steuerrecht")
    assert result.exit_code != 0 and "must read DOMAIN=FILE" in result.output
    folder = ws.root / "models/adapters/steuerrecht/lora-r4-v3"
    config = folder / "adapter_config.json"
    original = config.read_text()
    try:
        config.write_text(original.replace('"lora_dropout": 0.0', '"lora_dropout": 0.1'))
        result = run(ws, "eval", "steuerrecht-lora-r4-v3", "--dev", str(ws.root / "data/steuer_dev.jsonl"))
        assert result.exit_code != 0 and "files changed since registration" in result.output
    finally:
        config.write_text(original)
