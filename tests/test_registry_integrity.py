"""The registry's structure and integrity: one schema, one set of naming rules, imports that cannot reach outside
the workspace, deletions only of what clara placed, ids never reused, duplicates refused under concurrency."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import attrs
import pytest

from clara_core import hashing
from clara_core.migrations import migrations
from clara_core.registry import Registry
from clara_core.workspace import Workspace


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CLARA_HOME", "CLARA_LOAD_PLUGINS")}
    env["CLARA_LOAD_PLUGINS"] = ""
    return env


def adapter_rows(workspace: Workspace) -> list[tuple]:
    conn = sqlite3.connect(workspace.registry_path)
    try:
        return conn.execute("SELECT id, path, adapter_checksum FROM adapters ORDER BY id").fetchall()
    finally:
        conn.close()


def conn_table_info(workspace: Workspace, table: str) -> list[tuple]:
    conn = sqlite3.connect(workspace.registry_path)
    try:
        return conn.execute(f"PRAGMA table_info({table})").fetchall()
    finally:
        conn.close()


# -- structure -----------------------------------------------------------------------------------------------


def test_the_registry_does_not_import_the_workspace_module():
    """registry.py and workspace.py no longer import each other: naming rules live in clara_core.naming."""
    probe = "import sys, clara_core.registry; print('clara_core.workspace' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_the_declared_adapter_columns_are_the_migrated_table(workspace):
    from clara_core.records import ADAPTER_COLUMNS, BASE_COLUMNS, AdapterRecord, BaseRecord

    table = conn_table_info(workspace, "adapters")
    sql_types = {str: "TEXT", int: "INTEGER", float: "REAL"}
    assert [(name, kind) for _, name, kind, *_ in table] == [
        (c.name, sql_types[c.sql_type]) for c in ADAPTER_COLUMNS
    ]
    not_null = {name for _, name, _, notnull, *_ in table if notnull}
    assert not_null == {c.name for c in ADAPTER_COLUMNS if c.not_null} - {"id"}
    base_table = conn_table_info(workspace, "bases")
    assert [(name, kind) for _, name, kind, *_ in base_table] == [
        (c.name, sql_types[c.sql_type]) for c in BASE_COLUMNS
    ]
    assert [f.name for f in attrs.fields(BaseRecord)] == [c.name for c in BASE_COLUMNS]
    record_fields = [f.name for f in attrs.fields(AdapterRecord)]
    assert sorted(record_fields) == sorted(
        [c.name for c in ADAPTER_COLUMNS if c.name != "domain_key"] + ["stored_path"]
    )


def test_a_registry_written_before_m002_keeps_its_provenance_and_removed_ids(tmp_path, tiny_base_dir):
    """m002 backfills: rows clara registered may still be deleted, imported ones not; ids removed earlier
    are never handed out again."""
    from sqlite_utils import Database

    ws = Workspace(tmp_path / "old")
    ws.metadata_dir.mkdir(parents=True)
    db = Database(ws.registry_path)
    migrations.apply(db, stop_before="m002_provenance_and_removed_ids")
    common = {
        "kind": "adapter", "domain": '["steuerrecht"]', "domain_key": "steuerrecht", "method": "lora",
        "rank": 4, "base_model_hash": "b" * 64, "created": "2026-01-01T00:00:00Z", "status": "ready",
    }  # fmt: skip
    db["adapters"].insert_all(
        [
            {
                **common,
                "id": "steuerrecht-lora-r4-v1",
                "version": 1,
                "path": "models/adapters/steuerrecht/lora-r4-v1",
            },
            {
                **common,
                "id": "steuerrecht-lora-r4-v3",
                "version": 3,
                "path": "models/adapters/steuerrecht/lora-r4-v3",
            },
        ]
    )
    audit = [
        ("adapter.register", "steuerrecht-lora-r4-v1", {"adapter_checksum": "c1"}),
        ("adapter.register", "steuerrecht-lora-r4-v2", {"adapter_checksum": "c2"}),
        ("adapter.remove", "steuerrecht-lora-r4-v2", {}),
        ("registry.import", "/x.json", {"added": ["steuerrecht-lora-r4-v3"], "unchanged": []}),
    ]
    for action, subject, details in audit:
        db["audit_log"].insert({"ts": "2026-01-02T00:00:00Z", "action": action, "subject": subject,
                                "details": json.dumps(details)})  # fmt: skip
    db.close()
    with Registry.open(ws.registry_path) as registry:
        assert registry.get_adapter("steuerrecht-lora-r4-v1").placed_by_clara is True
        assert registry.get_adapter("steuerrecht-lora-r4-v3").placed_by_clara is False
        assert registry.removed("steuerrecht-lora-r4-v2")["adapter_checksum"] == "c2"
        assert registry._next_version("steuerrecht", "lora", 4) == 4


# -- first hour: unknown names -----------------------------------------------------------------------------


def test_unknown_adapter_ids_suggest_the_closest_registered_ones(run_cli, workspace_with_base, fake_adapter):
    run_cli("adapters", "register", str(fake_adapter()), "--domain", "steuerrecht")
    run_cli("adapters", "register", str(fake_adapter(seed=1)), "--domain", "sozialrecht")
    for command in (("show",), ("rm", "--yes"), ("verify",)):
        result = run_cli("adapters", *command, "steuer-lora-r4-v2")
        assert result.exit_code == 1
        assert result.output.strip().splitlines() == [
            "Error: adapter 'steuer-lora-r4-v2' is not registered; did you mean steuerrecht-lora-r4-v1, "
            "sozialrecht-lora-r4-v1? "
            "see 'clara adapters list'"
        ], command
    far = run_cli("adapters", "show", "zzz-qqq-r1-v1")
    assert far.output.strip() == "Error: adapter 'zzz-qqq-r1-v1' is not registered; see 'clara adapters list'"


def test_unknown_base_names_and_paths_suggest_the_registered_base(workspace_with_base):
    with Registry.open(workspace_with_base.registry_path) as registry:
        for asked in ("tinyy", "models/base/tiny"):
            with pytest.raises(
                Exception, match=r"is not registered \(registered: tiny\); did you mean tiny\?"
            ):
                registry.get_base(asked)


def test_list_with_a_filter_that_matches_nothing_says_what_exists(
    run_cli, workspace, workspace_with_base, fake_adapter
):
    empty = run_cli("adapters", "list", "--domain", "nosuch")
    assert "No adapters registered yet" in empty.output  # truly empty: the first-run hint
    run_cli("adapters", "register", str(fake_adapter()), "--domain", "steuerrecht")
    run_cli("adapters", "register", str(fake_adapter(seed=1)), "--domain", "sozialrecht")
    result = run_cli("adapters", "list", "--domain", "nosuch")
    assert result.exit_code == 0
    assert result.output.strip() == "No adapter with domain 'nosuch'; domains: sozialrecht, steuerrecht"
    typo = run_cli("adapters", "list", "--domain", "Steuerrech", "--method", "lora")
    assert typo.output.strip() == (
        "No adapter with domain 'steuerrech' and method 'lora'; domains: sozialrecht, steuerrecht; "
        "methods: lora; did you mean steuerrecht?"
    )
    method = run_cli("adapters", "list", "--method", "dora")
    assert method.output.strip() == "No adapter with method 'dora'; methods: lora; did you mean lora?"
    assert json.loads(run_cli("adapters", "list", "--domain", "nosuch", "--json").output) == []


# -- issue 12.6: import-json and rm --------------------------------------------------------------------------


def _export(run_cli, ws: Workspace) -> dict:
    assert run_cli("adapters", "export-json").exit_code == 0
    return json.loads((ws.metadata_dir / "adapter_registry.json").read_text())


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"path": "BASE"}, "lies outside this workspace's models/adapters/"),
        ({"path": "/etc"}, "lies outside this workspace's models/adapters/"),
        ({"path": "models/adapters"}, "lies outside this workspace's models/adapters/"),
        ({"path": "models/adapters/../../.."}, "must not contain '..'"),
        ({"path": "metadata"}, "lies outside this workspace's models/adapters/"),
        ({"id": "../../x y"}, "does not match its domain, method, rank and version"),
        ({"id": "steuerrecht-lora-r4-v9"}, "does not match its domain, method, rank and version"),
        ({"method": "lo/ra"}, "invalid method"),
        ({"domain": ["../x"]}, "invalid domain"),
        ({"seed": {"x": 1}}, "'seed' must be an integer"),
        ({"lineage": [{"component_id": "../x"}]}, "lineage: invalid adapter id"),
    ],
)
def test_import_json_refuses_entries_that_reach_outside_the_adapter_folders(
    run_cli, workspace_with_base, fake_adapter, tiny_base_dir, tmp_path, change, expected
):
    ws = workspace_with_base
    run_cli("adapters", "register", str(fake_adapter()), "--domain", "steuerrecht")
    document = _export(run_cli, ws)
    fresh, _ = Workspace.init(tmp_path / "fresh")
    entry = document["adapters"][0]
    entry.update({k: (str(tiny_base_dir) if v == "BASE" else v) for k, v in change.items()})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(document))
    result = run_cli("adapters", "import-json", str(bad), workspace_dir=fresh.root)
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert expected in result.output and "nothing was imported" in result.output
    assert adapter_rows(fresh) == []


@pytest.mark.parametrize(
    "base, expected",
    [
        ({"name": "../../x y", "path": "/"}, "invalid base name"),
        ({"name": "ok", "path": "/"}, "is not a model folder"),
        ({"name": "ok", "path": "/etc"}, "is not a model folder (no config.json)"),
        ({"name": "ok", "path": "models/adapters"}, "is not a model folder"),
        ({"name": "ok", "path": "/nowhere", "size_bytes": "big"}, "'size_bytes' must be an integer"),
    ],
)
def test_import_json_refuses_bad_base_entries(run_cli, workspace, tmp_path, base, expected):
    document = {"bases": [{**base, "base_model_hash": "f" * 64}], "adapters": []}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(document))
    result = run_cli("adapters", "import-json", str(bad))
    assert result.exit_code == 1 and expected in result.output, result.output
    with Registry.open(workspace.registry_path) as registry:
        assert registry.list_bases() == []


def test_rm_of_an_imported_adapter_never_deletes_its_folder(
    run_cli, workspace_with_base, fake_adapter, tmp_path
):
    """The review's attack: an entry pointing at the base model's folder, then rm. The import is refused; and an
    entry pointing into the adapter folders is unregistered by rm without deleting what clara did not place."""
    ws = workspace_with_base
    run_cli("adapters", "register", str(fake_adapter()), "--domain", "steuerrecht")
    document = _export(run_cli, ws)
    fresh, _ = Workspace.init(tmp_path / "fresh")
    folder = fresh.adapters_dir / "steuerrecht" / "lora-r4-v1"
    folder.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(ws.adapters_dir / "steuerrecht" / "lora-r4-v1", folder)
    assert (
        run_cli(
            "adapters",
            "import-json",
            str(ws.metadata_dir / "adapter_registry.json"),
            workspace_dir=fresh.root,
        ).exit_code
        == 0
    )
    with Registry.open(fresh.registry_path) as registry:
        assert registry.get_adapter("steuerrecht-lora-r4-v1").placed_by_clara is False
        assert [e["action"] for e in registry.audit_entries("steuerrecht-lora-r4-v1")] == ["adapter.import"]
    shown = run_cli("adapters", "show", "steuerrecht-lora-r4-v1", workspace_dir=fresh.root)
    assert "placed by         you ('adapters rm' keeps the folder)" in shown.output
    result = run_cli("adapters", "rm", "steuerrecht-lora-r4-v1", "--yes", workspace_dir=fresh.root)
    assert result.exit_code == 0, result.output
    assert "its files stay in" in result.output and "clara did not place them" in result.output
    assert (folder / "adapter_model.safetensors").is_file()
    assert adapter_rows(fresh) == []
    assert document["adapters"][0]["path"] == "models/adapters/steuerrecht/lora-r4-v1"


def test_rm_of_an_in_place_adapter_keeps_its_folder_and_rm_of_a_copy_deletes_it(
    run_cli, workspace_with_base, fake_adapter
):
    ws = workspace_with_base
    inside = ws.root / "mine" / "adapter"
    inside.parent.mkdir()
    import shutil

    shutil.copytree(fake_adapter(), inside)
    assert (
        run_cli("adapters", "register", str(inside), "--domain", "steuerrecht", "--in-place").exit_code == 0
    )
    assert (
        run_cli("adapters", "register", str(fake_adapter(seed=2)), "--domain", "steuerrecht").exit_code == 0
    )
    kept = run_cli("adapters", "rm", "steuerrecht-lora-r4-v1", "--yes")
    assert kept.exit_code == 0 and inside.is_dir(), kept.output
    copied = ws.adapters_dir / "steuerrecht" / "lora-r4-v2"
    deleted = run_cli("adapters", "rm", "steuerrecht-lora-r4-v2", "--yes")
    assert deleted.output.strip() == f"Removed steuerrecht-lora-r4-v2 and deleted {copied}"
    assert not copied.exists()


# -- issue 12.8 and 12.9: ids are never reused ----------------------------------------------------------------


def test_removed_ids_are_never_reused_and_history_is_not_inherited(
    run_cli, workspace_with_base, fake_adapter
):
    ws = workspace_with_base
    assert run_cli("adapters", "register", str(fake_adapter()), "--domain", "steuerrecht").exit_code == 0
    with Registry.open(ws.registry_path) as registry:
        registry.add_metrics("steuerrecht-lora-r4-v1", {"ppl_dev": 9.0}, eval_set="dev")
    assert run_cli("adapters", "rm", "steuerrecht-lora-r4-v1", "--yes").exit_code == 0
    again = run_cli("adapters", "register", str(fake_adapter(seed=5)), "--domain", "steuerrecht")
    assert again.exit_code == 0 and "steuerrecht-lora-r4-v2" in again.output, again.output
    with Registry.open(ws.registry_path) as registry:
        assert registry.metrics_history("steuerrecht-lora-r4-v2") == []
        assert registry.get_adapter("steuerrecht-lora-r4-v2").metrics == {}
    shown = run_cli("adapters", "show", "steuerrecht-lora-r4-v1")
    assert shown.exit_code == 1 and "was removed on" in shown.output
    # Removing the newest one too does not free its number either.
    assert run_cli("adapters", "rm", "steuerrecht-lora-r4-v2", "--yes").exit_code == 0
    third = run_cli("adapters", "register", str(fake_adapter(seed=6)), "--domain", "steuerrecht")
    assert "steuerrecht-lora-r4-v3" in third.output, third.output


def test_a_removed_id_cannot_be_taken_by_an_explicit_folder_or_an_import(
    workspace_with_base, fake_adapter, run_cli, tmp_path
):
    from clara_core.errors import Conflict
    from clara_core.registry import AdapterDraft

    ws = workspace_with_base
    run_cli("adapters", "register", str(fake_adapter()), "--domain", "steuerrecht")
    document = _export(run_cli, ws)
    run_cli("adapters", "rm", "steuerrecht-lora-r4-v1", "--yes")
    source = fake_adapter(seed=9)
    with Registry.open(ws.registry_path) as registry:
        draft = AdapterDraft(
            domain=["steuerrecht"], method="lora", rank=4,
            base_model_hash=registry.get_base("tiny").base_model_hash,
            adapter_checksum=hashing.adapter_checksum(source),
        )  # fmt: skip
        with pytest.raises(Conflict, match="belonged to an adapter removed on .*ids are never reused"):
            registry.register_adapter(
                draft, source, ws, place="copy", target=ws.adapters_dir / "steuerrecht" / "lora-r4-v1"
            )
    entry = document["adapters"][0]
    entry["adapter_checksum"] = "0" * 64
    other = tmp_path / "other.json"
    other.write_text(json.dumps(document))
    result = run_cli("adapters", "import-json", str(other))
    assert result.exit_code == 1 and "ids are never reused" in result.output
    assert adapter_rows(ws) == []


# -- issue 12.14: concurrent registration of one folder -------------------------------------------------------


def test_eight_processes_registering_one_folder_make_one_row(workspace_with_base, fake_adapter):
    ws = workspace_with_base
    source = fake_adapter()
    command = [sys.executable, "-m", "clara_core.cli", "-w", str(ws.root), "adapters", "register", str(source),
               "--domain", "verfahren"]  # fmt: skip
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
        for _ in range(8)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0] + [1] * 7, outputs
    refusals = [err.strip() for (_, err), p in zip(outputs, procs, strict=True) if p.returncode]
    assert all(
        line.endswith("is already registered as 'verfahren-lora-r4-v1' (same adapter_checksum)")
        for line in refusals
    ), refusals
    rows = adapter_rows(ws)
    assert [(r[0], r[2]) for r in rows] == [("verfahren-lora-r4-v1", hashing.adapter_checksum(source))]
    assert [p.name for p in (ws.adapters_dir / "verfahren").iterdir()] == ["lora-r4-v1"]
    assert not [p for p in ws.tmp_dir.iterdir() if p.name.startswith("copy-")]


def test_suggestions_in_a_large_registry_compare_only_the_closest_domains(workspace):
    """A server with thousands of adapters answers unknown ids too: the hint still finds the right id while
    comparing only ids of the closest domains."""
    from clara_core.records import adapter_row

    rows = [
        adapter_row(
            {
                "id": f"{domain}-lora-r{rank}-v{version}",
                "kind": "adapter",
                "domain": [domain],
                "domain_key": domain,
                "method": "lora",
                "rank": rank,
                "base_model_hash": "b" * 64,
                "created": "2026-01-01T00:00:00Z",
                "path": f"models/adapters/{domain}/lora-r{rank}-v{version}",
                "status": "ready",
                "version": version,
            }
        )
        for domain in [f"amt{n}" for n in range(60)] + ["steuerrecht"]
        for rank in (4, 8)
        for version in range(1, 26)
    ]
    with Registry.open(workspace.registry_path) as registry:
        registry.db["adapters"].insert_all(rows)
        candidates = registry._suggestion_candidates("steuerrech-lora-r4-v3")
        assert len(candidates) == 50 and all(c.startswith("steuerrecht-") for c in candidates)
        with pytest.raises(Exception, match=r"did you mean steuerrecht-lora-r4-v3\b"):
            registry.get_adapter("steuerrech-lora-r4-v3")


def test_rm_never_deletes_a_base_another_adapter_or_a_workspace_folder(
    run_cli, workspace_with_base, fake_adapter, tiny_base_dir
):
    """Even a row that says clara placed it (a registry edited by hand, or written by an older clara) cannot
    make rm delete a base, a folder holding or inside another adapter, or the workspace's own folders."""
    import shutil

    ws = workspace_with_base
    for seed in range(2):
        run_cli("adapters", "register", str(fake_adapter(seed=seed)), "--domain", "steuerrecht")
    base_in_ws = ws.base_dir / "tiny"
    shutil.copytree(tiny_base_dir, base_in_ws)
    conn = sqlite3.connect(ws.registry_path)
    conn.execute("UPDATE bases SET path = 'models/base/tiny'")
    conn.commit()
    for target in (  # the last one stays for the rm below: the base's folder
        "metadata",
        "models/adapters/steuerrecht",
        "models/adapters/steuerrecht/lora-r4-v1/x",
        "models/base/tiny",
    ):
        (ws.root / target).mkdir(parents=True, exist_ok=True)
        conn.execute("UPDATE adapters SET path = ? WHERE id = 'steuerrecht-lora-r4-v2'", [target])
        conn.commit()
        with Registry.open(ws.registry_path) as registry:
            record = registry.get_adapter("steuerrecht-lora-r4-v2")
            assert record.placed_by_clara and registry.deletable_folder(record, ws) is None, target
    conn.close()
    result = run_cli("adapters", "rm", "steuerrecht-lora-r4-v2", "--yes")
    assert result.exit_code == 0 and "holds or lies in another model" in result.output
    assert (base_in_ws / "config.json").is_file() and ws.registry_path.is_file()
    assert (ws.adapters_dir / "steuerrecht" / "lora-r4-v1" / "adapter_model.safetensors").is_file()


def test_train_refuses_an_out_dir_whose_id_was_removed_before_it_trains(
    run_cli, workspace_with_base, fake_adapter, monkeypatch, plugin_manager
):
    import clara_plugin_lora

    plugin_manager.register(clara_plugin_lora)
    ws = workspace_with_base
    assert run_cli("adapters", "register", str(fake_adapter()), "--domain", "steuerrecht").exit_code == 0
    assert run_cli("adapters", "rm", "steuerrecht-lora-r4-v1", "--yes").exit_code == 0
    dataset = ws.root / "steuer.jsonl"
    dataset.write_text('{"text": "Die Einkommensteuer bemisst sich nach dem zu versteuernden Einkommen."}\n')
    monkeypatch.chdir(ws.root)
    result = run_cli(
        "train", "--base", "tiny", "--domain", "steuerrecht", "--rank", "4", "--dataset", str(dataset),
        "--out-dir", "models/adapters/steuerrecht/lora-r4-v1",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert (
        "belonged to an adapter removed on" in result.output and "choose another --out-dir" in result.output
    )
    assert "Traceback" not in result.output
    assert not (ws.adapters_dir / "steuerrecht" / "lora-r4-v1").exists()
    runs = ws.root / "metadata" / "runs"
    assert not runs.exists() or not list(runs.iterdir())  # refused before a run folder was made


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_serving_refuses_an_adapter_whose_files_say_its_init_changed_the_base(
    run_cli, workspace_with_base, fake_adapter, init
):
    # However such a folder got a row (import-json of an old registry, a hand edit), the check before every
    # load refuses it: its weights only fit the base as PEFT rewrote it during training.
    from clara_core.checks import check_adapter_for_base
    from clara_core.errors import Conflict

    ws = workspace_with_base
    assert run_cli("adapters", "register", str(fake_adapter()), "--domain", "steuerrecht").exit_code == 0
    with Registry.open(ws.registry_path) as registry:
        record = registry.get_adapter("steuerrecht-lora-r4-v1")
        base = registry.get_base("tiny")
    check_adapter_for_base(record, base)  # fits as registered
    config_path = record.path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["init_lora_weights"] = init
    config_path.write_text(json.dumps(config))
    with pytest.raises(Conflict, match=rf"init_lora_weights '{init}', which changed the base's weights"):
        check_adapter_for_base(record, base)
