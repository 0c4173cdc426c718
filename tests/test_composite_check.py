"""clara composite build --check on the tiny model with two trained adapters: the kept fraction of each
component's perplexity gain equals a hand computation from 'clara eval matrix', is recorded in the composite's
metrics history and shown by 'clara composite show'; components without a dev set are skipped or refused."""

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
from .test_eval_cli import FAST, SOZIAL, STEUER, _write

pytestmark = pytest.mark.slow

STEUER_ID = "steuerrecht-lora-r4-v1"
SOZIAL_ID = "sozialrecht-lora-r4-v1"


def run(ws: Workspace, *args: str) -> Result:
    obj = ClaraContext(workspace=ws.root, plugins=PluginManager())
    return CliRunner().invoke(cli, list(args), obj=obj, catch_exceptions=True)


def ok(ws: Workspace, *args: str) -> Result:
    result = run(ws, *args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_base_dir: Path) -> Workspace:
    """Two adapters trained with their dev sets, and one registered without any."""
    workspace, _ = Workspace.init(tmp_path_factory.mktemp("check") / "ws")
    data = workspace.root / "data"
    _write(data / "steuer.jsonl", [{"text": t} for t in STEUER * 4])
    _write(data / "steuer_dev.jsonl", [{"text": t} for t in STEUER])
    _write(data / "sozial.jsonl", [{"text": t} for t in SOZIAL * 4])
    _write(data / "sozial_dev.jsonl", [{"text": t} for t in SOZIAL])
    shutil.copytree(tiny_base_dir, workspace.base_dir / "tiny")
    ok(workspace, "base", "add", str(workspace.base_dir / "tiny"), "--name", "tiny")
    for domain, name in (("steuerrecht", "steuer"), ("sozialrecht", "sozial")):
        ok(
            workspace, "train", "--base", "tiny", "--domain", domain, "--method", "lora",
            "--dataset", str(data / f"{name}.jsonl"), "--dev", str(data / f"{name}_dev.jsonl"), *FAST,
        )  # fmt: skip
    made = write_fake_adapter(workspace.root / "made" / "umwelt", tiny_base_dir, rank=4, seed=1)
    ok(workspace, "adapters", "register", str(made), "--domain", "umwelt", "--method", "lora")
    return workspace


@pytest.fixture
def ws(trained: Workspace, tmp_path: Path) -> Workspace:
    shutil.copytree(trained.root, tmp_path / "ws")
    return Workspace.find(tmp_path / "ws")


def state(ws: Workspace) -> tuple:
    conn = sqlite3.connect(ws.registry_path)
    try:
        rows = tuple(
            conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in ("adapters", "lineage")
        )
    finally:
        conn.close()
    return rows, sorted(str(p) for p in (ws.root / "models").rglob("*"))


def test_kept_fraction_equals_the_matrix_by_hand_is_recorded_and_shown(ws: Workspace) -> None:
    built = json.loads(
        ok(
            ws, "composite", "build", "--adapters", STEUER_ID, SOZIAL_ID, "--weights", "0.5", "0.5",
            "--check", "--json",
        ).stdout
    )  # fmt: skip
    composite = built["id"]
    kept = {k["component"]: k for k in built["check"]["kept"]}
    assert set(kept) == {STEUER_ID, SOZIAL_ID}

    # the same numbers by hand from clara eval matrix (base, components, composite on both dev sets)
    matrix = json.loads(
        ok(
            ws, "eval", "matrix", STEUER_ID, SOZIAL_ID, composite, "--base-too",
            "--sets", f"steuerrecht={ws.root / 'data/steuer_dev.jsonl'}",
            "--sets", f"sozialrecht={ws.root / 'data/sozial_dev.jsonl'}", "--json",
        ).stdout
    )["values"]  # fmt: skip
    for component, domain in ((STEUER_ID, "steuerrecht"), (SOZIAL_ID, "sozialrecht")):
        base, own, comp = (matrix[m][domain] for m in ("base", component, composite))
        assert own < base  # trained: a gain to keep
        by_hand = (base - comp) / (base - own)
        got = kept[component]
        assert got["domain"] == domain
        assert (got["ppl_base"], got["ppl_component"], got["ppl_composite"]) == pytest.approx(
            (base, own, comp)
        )
        assert got["kept"] == pytest.approx(by_hand, rel=1e-6)
    # the table (without --json) and composite show afterwards
    text = ok(ws, "composite", "show", composite).output
    assert "Perplexity gain kept" in text
    for component in (STEUER_ID, SOZIAL_ID):
        line = next(x for x in text.splitlines() if x.startswith(component))
        assert f"{100 * kept[component]['kept']:.1f}%" in line
    shown = json.loads(ok(ws, "composite", "show", composite, "--json").stdout)["check"]
    assert {k["component"]: k["kept"] for k in shown} == pytest.approx(
        {c: k["kept"] for c, k in kept.items()}
    )
    # recorded through clara eval's path: the composite's metrics history, with the dev set's sha256
    conn = sqlite3.connect(ws.registry_path)
    try:
        names = {
            r[0] for r in conn.execute("SELECT name FROM metrics_history WHERE adapter_id = ?", [composite])
        }
    finally:
        conn.close()
    assert {"kept@steuerrecht", "kept@sozialrecht", "ppl@steuerrecht", "ppl@sozialrecht"} <= names
    # building again: exists, and the check runs again (a table printed, not JSON)
    again = ok(
        ws, "composite", "build", "--adapters", STEUER_ID, SOZIAL_ID, "--weights", "0.5", "0.5", "--check"
    ).output
    assert "exists already" in again and "KEPT" in again and f"{100 * kept[SOZIAL_ID]['kept']:.1f}%" in again


def test_unchecked_composite_says_so(ws: Workspace) -> None:
    composite = json.loads(
        ok(
            ws, "composite", "build", "--adapters", STEUER_ID, SOZIAL_ID, "--strategy", "additive", "--json"
        ).stdout
    )["id"]
    assert "not checked (build again with --check)" in ok(ws, "composite", "show", composite).output
    assert json.loads(ok(ws, "composite", "show", composite, "--json").stdout)["check"] is None


def test_component_without_dev_set_is_skipped_with_a_warning(ws: Workspace) -> None:
    result = ok(
        ws, "composite", "build", "--adapters", STEUER_ID, "umwelt-lora-r4-v1", "--strategy", "additive",
        "--check", "--json",
    )  # fmt: skip
    assert "--check skips 'umwelt-lora-r4-v1': no dev set recorded from training" in result.stderr
    kept = json.loads(result.stdout)["check"]["kept"]
    assert [k["component"] for k in kept] == [STEUER_ID]


def test_check_without_any_dev_set_or_with_merge_into_base_is_refused_before_building(
    ws: Workspace, tiny_base_dir: Path
) -> None:
    made = write_fake_adapter(ws.root / "made" / "umwelt2", tiny_base_dir, rank=2, seed=2)
    ok(ws, "adapters", "register", str(made), "--domain", "umwelt", "--method", "lora")
    before = state(ws)
    result = run(
        ws, "composite", "build", "--adapters", "umwelt-lora-r4-v1", "umwelt-lora-r2-v1", "--strategy", "additive",
        "--check",
    )  # fmt: skip
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "no component has a dev set recorded from training" in result.output
    assert "umwelt-lora-r4-v1, umwelt-lora-r2-v1" in result.output
    result = run(ws, "composite", "build", "--adapters", STEUER_ID, SOZIAL_ID, "--merge-into-base", "--check")
    assert result.exit_code != 0 and "build without --merge-into-base" in result.output
    (ws.root / "data/sozial_dev.jsonl").unlink()
    result = run(ws, "composite", "build", "--adapters", STEUER_ID, SOZIAL_ID, "--check")
    assert result.exit_code != 0 and "data/sozial_dev.jsonl, is missing" in result.output
    assert state(ws) == before  # nothing built, nothing registered
