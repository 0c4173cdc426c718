"""The registry: schema migrations, bases, adapters, versions under concurrency, JSON round trip, audit log."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from clara_core import hashing
from clara_core.errors import Conflict, InvalidInput, NotFound, RegistryError
from clara_core.migrations import migrations
from clara_core.registry import AdapterDraft, Registry, dataset_ref, parse_dataset_ref
from clara_core.workspace import Workspace


def row_counts(workspace: Workspace) -> dict[str, int]:
    conn = sqlite3.connect(workspace.registry_path)
    try:
        return {
            t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
            for t in ("bases", "adapters", "lineage", "metrics_history", "audit_log")
        }
    finally:
        conn.close()


def test_migrations_build_the_schema_from_an_empty_database(tmp_path):
    path = tmp_path / "metadata" / "registry.db"
    path.parent.mkdir()
    with Registry.open(path, create=True) as registry:
        tables = set(registry.db.table_names())
        applied = [m.name for m in migrations.applied(registry.db)]
        journal = registry.db.execute("PRAGMA journal_mode").fetchone()[0]
    assert {"bases", "adapters", "lineage", "metrics_history", "audit_log", "file_hashes"} <= tables
    assert applied == [m.name for m in migrations._migrations]
    assert journal == "wal"
    # Opening again applies nothing new and keeps the data.
    with Registry.open(path) as registry:
        assert [m.name for m in migrations.applied(registry.db)] == applied


def test_a_file_that_is_not_sqlite_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "registry.db"
    path.write_bytes(b"this is not a database, just text " * 100)
    before = path.read_bytes()
    with pytest.raises(RegistryError, match="not a clara registry"):
        Registry.open(path)
    assert path.read_bytes() == before


def test_a_registry_from_a_newer_schema_is_refused(workspace):
    conn = sqlite3.connect(workspace.registry_path)
    conn.execute(
        "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) VALUES ('clara', 'm999_future', 'x')"
    )
    conn.commit()
    conn.close()
    with pytest.raises(RegistryError, match="newer clara.*m999_future"):
        Registry.open(workspace.registry_path)


def test_an_unrelated_sqlite_database_is_refused(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE invoices (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(RegistryError, match="not a clara registry.*invoices"):
        Registry.open(path)


def test_base_add_records_hashes_and_uses_the_hash_cache(workspace, tiny_base_dir, monkeypatch):
    calls = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    with Registry.open(workspace.registry_path) as registry:
        base = registry.add_base(tiny_base_dir, name="Tiny", workspace=workspace)
        assert base.name == "tiny"
        assert base.architecture == "LlamaForCausalLM"
        assert len(base.base_model_hash) == 64 and base.tokenizer_hash
        assert "model.safetensors" in calls
        calls.clear()
        # Hashing again (verify, or a second workspace) reads nothing: the cache knows path, size and mtime.
        assert hashing.base_model_hash(tiny_base_dir, cache=registry) == base.base_model_hash
        assert calls == []
        with pytest.raises(Conflict, match="already registered as 'tiny'"):
            registry.add_base(tiny_base_dir, name="again", workspace=workspace)


def test_base_add_refuses_a_folder_that_is_not_a_model(run_cli, tmp_path, workspace):
    (tmp_path / "empty").mkdir()
    result = run_cli("base", "add", str(tmp_path / "empty"))
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {tmp_path / 'empty'}: not a model folder (no config.json); give the folder of a Hugging Face model"
    ]
    assert row_counts(workspace)["bases"] == 0


def test_register_copies_into_the_convention_with_increasing_versions(
    run_cli, workspace_with_base, fake_adapter
):
    ws = workspace_with_base
    source = fake_adapter(rank=4)
    first = run_cli("adapters", "register", str(source), "--domain", "Steuerrecht", "--license", "apache-2.0")
    second = run_cli("adapters", "register", str(fake_adapter(rank=4, seed=1)), "--domain", "steuerrecht")
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert "steuerrecht-lora-r4-v1" in first.output and "steuerrecht-lora-r4-v2" in second.output
    assert (ws.adapters_dir / "steuerrecht" / "lora-r4-v2" / "adapter_model.safetensors").is_file()
    assert source.is_dir()  # the original is left where it was
    with Registry.open(ws.registry_path) as registry:
        record = registry.get_adapter("steuerrecht-lora-r4-v1")
        assert record.domain == ["steuerrecht"]
        assert record.license == "apache-2.0"
        assert record.adapter_checksum == hashing.adapter_checksum(source)
        assert record.base_model_hash == registry.get_base("tiny").base_model_hash
        assert record.stored_path == "models/adapters/steuerrecht/lora-r4-v1"
        assert record.target_modules == ["q_proj", "v_proj"]
        assert [e["action"] for e in registry.audit_entries(record.id)] == ["adapter.register"]


@pytest.mark.parametrize("bad_id", ["../etc/passwd", "a/b", "UPPER-case", "with space", "x..y", ""])
def test_adapter_ids_outside_the_allowed_characters_are_refused(run_cli, workspace, bad_id):
    before = row_counts(workspace)
    result = run_cli("adapters", "show", bad_id)
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert "invalid adapter id" in result.output
    assert row_counts(workspace) == before


def test_bad_adapter_folders_are_refused_with_one_line(
    run_cli, workspace_with_base, tmp_path, fake_adapter, other_base_dir
):
    ws = workspace_with_base
    (tmp_path / "not-an-adapter").mkdir()
    pickled = fake_adapter("pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    foreign = fake_adapter("foreign", base_dir=other_base_dir)
    before = row_counts(ws)
    cases = {
        str(tmp_path / "not-an-adapter"): "not a PEFT adapter folder (no adapter_config.json)",
        str(tmp_path / "missing"): "no such folder",
        str(pickled): "pickle",
        str(foreign): "does not fit base 'tiny'",
    }
    for path, expected in cases.items():
        result = run_cli("adapters", "register", path, "--domain", "steuerrecht")
        assert result.exit_code == 1, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert expected in result.output
    assert row_counts(ws) == before
    assert not any(ws.adapters_dir.iterdir())


def test_registering_the_same_folder_twice_in_place_is_refused(run_cli, workspace_with_base, fake_adapter):
    source = fake_adapter()
    assert (
        run_cli("adapters", "register", str(source), "--domain", "sozialrecht", "--in-place").exit_code == 0
    )
    before = row_counts(workspace_with_base)
    again = run_cli("adapters", "register", str(source), "--domain", "sozialrecht", "--in-place")
    assert again.exit_code == 1
    assert "is already registered" in again.output
    copied = run_cli("adapters", "register", str(source), "--domain", "sozialrecht")
    assert copied.exit_code == 1
    assert "already registered as 'sozialrecht-lora-r4-v1' (same adapter_checksum)" in copied.output
    assert row_counts(workspace_with_base) == before


def test_eight_processes_registering_at_once_get_distinct_versions(workspace_with_base, fake_adapter):
    ws = workspace_with_base
    sources = [fake_adapter(seed=i) for i in range(8)]
    env = {k: v for k, v in os.environ.items() if k not in ("CLARA_HOME", "CLARA_LOAD_PLUGINS")}
    env["CLARA_LOAD_PLUGINS"] = ""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clara_core.cli",
                "-w",
                str(ws.root),
                "adapters",
                "register",
                str(src),
                "--domain",
                "verfahren",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for src in sources
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    with Registry.open(ws.registry_path) as registry:
        records = registry.list_adapters(domain="verfahren")
    assert sorted(r.version for r in records) == list(range(1, 9))
    assert sorted(r.adapter_checksum for r in records) == sorted(hashing.adapter_checksum(s) for s in sources)
    assert len({r.path for r in records}) == 8 and all(r.path.is_dir() for r in records)


def test_export_json_and_import_json_round_trip(run_cli, workspace_with_base, fake_adapter, tmp_path):
    ws = workspace_with_base
    run_cli("adapters", "register", str(fake_adapter()), "--domain", "steuerrecht", "--license", "mit")
    run_cli(
        "adapters", "register", str(fake_adapter(rank=8)), "--domain", "sozialrecht", "--domain", "verfahren"
    )
    with Registry.open(ws.registry_path) as registry:
        registry.add_metrics(
            "steuerrecht-lora-r4-v1", {"ppl_dev": 7.1, "domain_score": 0.83}, eval_set="dev.jsonl"
        )
        registry.add_lineage(
            "sozialrecht.verfahren-lora-r8-v1", [("steuerrecht-lora-r4-v1", 0.5)], "weighted"
        )
    assert run_cli("adapters", "export-json").exit_code == 0
    document = json.loads((ws.metadata_dir / "adapter_registry.json").read_text())
    entry = next(e for e in document["adapters"] if e["id"] == "steuerrecht-lora-r4-v1")
    assert list(entry)[:11] == [
        "id", "domain", "method", "rank", "base_model_hash", "tokenizer_hash", "created", "metrics", "dataset_ref",
        "adapter_checksum", "license",
    ]  # fmt: skip
    assert entry["metrics"] == {"ppl_dev": 7.1, "domain_score": 0.83}
    assert entry["domain"] == ["steuerrecht"] and entry["license"] == "mit"

    fresh, _ = Workspace.init(tmp_path / "fresh")
    result = run_cli(
        "adapters", "import-json", str(ws.metadata_dir / "adapter_registry.json"), workspace_dir=fresh.root
    )
    assert result.exit_code == 0, result.output
    assert "Imported 2 adapter(s)" in result.output
    out = tmp_path / "again.json"
    assert run_cli("adapters", "export-json", "--out", str(out), workspace_dir=fresh.root).exit_code == 0
    again = json.loads(out.read_text())
    for key in ("exported",):
        document.pop(key), again.pop(key)
    strip = lambda doc: [{k: v for k, v in e.items() if k != "status"} for e in doc["adapters"]]  # noqa: E731
    assert strip(again) == strip(document)
    assert [b["base_model_hash"] for b in again["bases"]] == [b["base_model_hash"] for b in document["bases"]]
    # Importing the same file again changes nothing.
    second = run_cli("adapters", "import-json", str(out), workspace_dir=fresh.root)
    assert "Imported 0 adapter(s); 2 already registered unchanged" in second.output


def test_import_json_with_a_conflicting_checksum_imports_nothing(
    run_cli, workspace_with_base, fake_adapter, tmp_path
):
    ws = workspace_with_base
    run_cli("adapters", "register", str(fake_adapter()), "--domain", "steuerrecht")
    run_cli("adapters", "export-json")
    document = json.loads((ws.metadata_dir / "adapter_registry.json").read_text())
    new_entry = {
        **document["adapters"][0],
        "id": "steuerrecht-lora-r4-v7",
        "version": 7,
        "path": "models/adapters/steuerrecht/lora-r4-v7",
    }
    document["adapters"][0]["adapter_checksum"] = "0" * 64
    document["adapters"].insert(0, new_entry)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(document))
    before = row_counts(ws)
    result = run_cli("adapters", "import-json", str(bad))
    assert result.exit_code == 1
    assert "different checksum" in result.output and "nothing was imported" in result.output
    assert row_counts(ws) == before
    (tmp_path / "broken.json").write_text("{not json")
    broken = run_cli("adapters", "import-json", str(tmp_path / "broken.json"))
    assert broken.exit_code == 1 and "not valid JSON" in broken.output


def test_verify_reports_every_mismatch(run_cli, workspace_with_base, fake_adapter):
    ws = workspace_with_base
    run_cli("adapters", "register", str(fake_adapter()), "--domain", "steuerrecht")
    run_cli("adapters", "register", str(fake_adapter(seed=3)), "--domain", "sozialrecht")
    ok = run_cli("adapters", "verify")
    assert ok.exit_code == 0 and "All 2 adapter(s) match" in ok.output
    tampered = ws.adapters_dir / "sozialrecht" / "lora-r4-v1" / "adapter_config.json"
    config = json.loads(tampered.read_text())
    config["lora_alpha"] = 99
    tampered.write_text(json.dumps(config))
    orphan = ws.adapters_dir / "verfahren" / "lora-r4-v9"
    shutil.copytree(ws.adapters_dir / "steuerrecht" / "lora-r4-v1", orphan)
    bad = run_cli("adapters", "verify")
    assert (
        "note     models/adapters/verfahren/lora-r4-v9 is not registered: register it with 'clara adapters register "
        "models/adapters/verfahren/lora-r4-v9 --domain verfahren --in-place', or delete it"
    ) in bad.output
    assert bad.exit_code == 1
    assert "ok       steuerrecht-lora-r4-v1" in bad.output
    assert "MISMATCH sozialrecht-lora-r4-v1: adapter_checksum changed" in bad.output
    assert "1 of 2 adapter(s) failed verification" in bad.output
    # The base path in the adapter's own config is not part of the checksum (it differs between machines).
    steuer = ws.adapters_dir / "steuerrecht" / "lora-r4-v1" / "adapter_config.json"
    config = json.loads(steuer.read_text())
    config["base_model_name_or_path"] = "/somewhere/else"
    steuer.write_text(json.dumps(config))
    assert run_cli("adapters", "verify", "steuerrecht-lora-r4-v1").exit_code == 0
    # Nor is the order of target_modules, a set that PEFT writes in varying order.
    config["target_modules"] = list(reversed(config["target_modules"]))
    steuer.write_text(json.dumps(config))
    assert run_cli("adapters", "verify", "steuerrecht-lora-r4-v1").exit_code == 0


def test_verify_detects_a_changed_base(run_cli, workspace, tiny_base_dir, fake_adapter, tmp_path):
    import shutil

    base_copy = tmp_path / "base-copy"
    shutil.copytree(tiny_base_dir, base_copy)
    assert run_cli("base", "add", str(base_copy), "--name", "copy").exit_code == 0
    assert run_cli("adapters", "register", str(fake_adapter()), "--domain", "steuerrecht").exit_code == 0
    config = json.loads((base_copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (base_copy / "config.json").write_text(json.dumps(config))
    result = run_cli("adapters", "verify", "--full")
    assert result.exit_code == 1
    assert "MISMATCH steuerrecht-lora-r4-v1: base files changed" in result.output


def test_rm_asks_then_deletes_and_audits(run_cli, workspace_with_base, fake_adapter):
    ws = workspace_with_base
    run_cli("adapters", "register", str(fake_adapter()), "--domain", "steuerrecht")
    folder = ws.adapters_dir / "steuerrecht" / "lora-r4-v1"
    declined = run_cli("adapters", "rm", "steuerrecht-lora-r4-v1", input="n\n")
    assert declined.exit_code == 1 and folder.is_dir()
    result = run_cli("adapters", "rm", "steuerrecht-lora-r4-v1", "--yes")
    assert result.exit_code == 0, result.output
    assert not folder.exists()
    with Registry.open(ws.registry_path) as registry:
        assert not registry.has_adapter("steuerrecht-lora-r4-v1")
        actions = [e["action"] for e in registry.audit_entries("steuerrecht-lora-r4-v1")]
        assert actions == ["adapter.register", "adapter.remove"]
    missing = run_cli("adapters", "rm", "steuerrecht-lora-r4-v1", "--yes")
    assert missing.exit_code == 1 and "is not registered" in missing.output


def test_rm_refuses_a_component_of_a_composite(run_cli, workspace_with_base, fake_adapter):
    ws = workspace_with_base
    run_cli("adapters", "register", str(fake_adapter()), "--domain", "steuerrecht")
    run_cli("adapters", "register", str(fake_adapter()), "--domain", "verfahren")
    with Registry.open(ws.registry_path) as registry:
        registry.add_lineage("verfahren-lora-r4-v1", [("steuerrecht-lora-r4-v1", 1.0)], "additive")
    result = run_cli("adapters", "rm", "steuerrecht-lora-r4-v1", "--yes")
    assert result.exit_code == 1 and "is a component of verfahren-lora-r4-v1" in result.output


def test_the_audit_log_is_append_only(workspace_with_base):
    with Registry.open(workspace_with_base.registry_path) as registry:
        assert registry.audit_entries("tiny")[0]["action"] == "base.add"
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            registry.db.execute("UPDATE audit_log SET action = 'forged'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            registry.db.execute("DELETE FROM audit_log")


def test_metrics_history_keeps_every_evaluation_with_its_checksum(workspace_with_base, fake_adapter):
    ws = workspace_with_base
    source = fake_adapter()
    with Registry.open(ws.registry_path) as registry:
        base = registry.get_base("tiny")
        draft = AdapterDraft(
            domain=["steuerrecht"], method="lora", rank=4, base_model_hash=base.base_model_hash,
            adapter_checksum=hashing.adapter_checksum(source), dataset_ref=dataset_ref("data/x.jsonl", "ab" * 32),
        )  # fmt: skip
        record = registry.register_adapter(draft, source, ws, place="copy")
        registry.add_metrics(record.id, {"ppl_dev": 9.0}, eval_set="dev", eval_set_sha256="11" * 32)
        registry.add_metrics(record.id, {"ppl_dev": 8.0, "domain_score": 0.5}, eval_set="dev")
        history = registry.metrics_history(record.id)
        latest = registry.get_adapter(record.id).metrics
    assert [(h["name"], h["value"]) for h in history] == [
        ("ppl_dev", 9.0),
        ("ppl_dev", 8.0),
        ("domain_score", 0.5),
    ]
    assert {h["adapter_checksum"] for h in history} == {record.adapter_checksum}
    assert latest == {"ppl_dev": 8.0, "domain_score": 0.5}
    assert parse_dataset_ref(record.dataset_ref) == ("data/x.jsonl", "ab" * 32)


def test_register_adapter_failure_leaves_no_folder_and_no_row(workspace_with_base, fake_adapter, monkeypatch):
    ws = workspace_with_base
    source = fake_adapter()
    staged = ws.tmp_dir / "staged"
    import shutil

    shutil.copytree(source, staged)
    with Registry.open(ws.registry_path) as registry:
        draft = AdapterDraft(
            domain=["steuerrecht"], method="lora", rank=4,
            base_model_hash=registry.get_base("tiny").base_model_hash, adapter_checksum="x",
        )  # fmt: skip
        monkeypatch.setattr(
            registry, "audit", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left"))
        )
        with pytest.raises(OSError):
            registry.register_adapter(draft, staged, ws, place="move")
        monkeypatch.undo()
        assert registry.list_adapters() == []
    assert staged.is_dir()  # moved back, not lost
    assert not (ws.adapters_dir / "steuerrecht" / "lora-r4-v1").exists()


def test_lookups_fail_clearly(workspace_with_base):
    with Registry.open(workspace_with_base.registry_path) as registry:
        with pytest.raises(NotFound, match="adapter 'nope-lora-r1-v1' is not registered"):
            registry.get_adapter("nope-lora-r1-v1")
        with pytest.raises(NotFound, match=r"base 'other' is not registered \(registered: tiny\)"):
            registry.get_base("other")
        with pytest.raises(InvalidInput, match="rank must be at least 1"):
            registry.register_adapter(
                AdapterDraft(domain=["x"], method="lora", rank=0, base_model_hash="h", adapter_checksum="c"),
                Path("/nonexistent"),
                workspace_with_base,
            )
