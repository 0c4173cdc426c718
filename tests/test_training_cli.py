"""clara train end to end in-process: the plan's command, registry fields, determinism, rebuild, bad inputs."""

from __future__ import annotations

import errno
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from clara_core import hashing
from clara_core.cli import ClaraContext, cli
from clara_core.plugins import PluginManager
from clara_core.workspace import Workspace

TEXTS = [
    "Das Finanzamt setzt die Einkommensteuer durch Steuerbescheid fest.",
    "Der Einspruch ist innerhalb eines Monats nach Bekanntgabe einzulegen.",
    "Die Umsatzsteuer beträgt im Regelfall neunzehn Prozent.",
    "Werbungskosten sind Aufwendungen zur Erwerbung, Sicherung und Erhaltung der Einnahmen.",
]


def run(workspace: Workspace, *args: str, plugins: PluginManager | None = None) -> Result:
    obj = ClaraContext(workspace=workspace.root, plugins=plugins or PluginManager())
    return CliRunner().invoke(cli, list(args), obj=obj, catch_exceptions=False)


def snapshot(workspace: Workspace) -> dict:
    """What a failed run must leave unchanged: registry rows and the adapters folder."""
    conn = sqlite3.connect(workspace.registry_path)
    try:
        state = {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            for table in ("adapters", "bases", "audit_log", "metrics_history")
        }
    finally:
        conn.close()
    state["folders"] = sorted(str(p.relative_to(workspace.root)) for p in workspace.adapters_dir.rglob("*"))
    return state


@pytest.fixture
def data_dir(workspace: Workspace) -> Path:
    folder = workspace.root / "data" / "training_batches"
    folder.mkdir(parents=True)
    (folder / "steuer_batch.jsonl").write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS * 4)
    )
    (folder / "dev.jsonl").write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS)
    )
    return folder


@pytest.fixture
def leo_base(workspace: Workspace, tiny_base_dir: Path) -> Path:
    target = workspace.base_dir / "leo_base"
    shutil.copytree(tiny_base_dir, target)
    return target


FAST = ("--max-steps", "12", "--lr", "5e-3", "--max-seq-len", "64", "--micro-batch-size", "4")


def test_plan_command_trains_and_registers_every_field(
    workspace: Workspace, leo_base: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(workspace.root)
    result = run(
        workspace,
        "train",
        "--base", "models/base/leo_base",
        "--domain", "steuerrecht",
        "--method", "lora",
        "--rank", "16",
        "--batch-size", "64",
        "--dataset", "data/training_batches/steuer_batch.jsonl",
        "--out-dir", "models/adapters/steuerrecht/lora-r16-v1",
        "--dev", "data/training_batches/dev.jsonl",
        "--license", "apache-2.0",
        "--max-steps", "3",
        "--max-seq-len", "64",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "is not registered yet; it is registered as 'leo_base'" in result.output
    assert "Registered steuerrecht-lora-r16-v1 at models/adapters/steuerrecht/lora-r16-v1" in result.output
    folder = workspace.root / "models/adapters/steuerrecht/lora-r16-v1"
    assert {p.name for p in folder.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "clara_adapter.json",
    }
    assert not list(workspace.tmp_dir.glob("train-*")), "staging folder left behind"
    assert not (workspace.metadata_dir / "runs").exists() or not any(
        (workspace.metadata_dir / "runs").iterdir()
    )

    entry = json.loads(run(workspace, "adapters", "show", "steuerrecht-lora-r16-v1", "--json").output)
    base = json.loads(run(workspace, "base", "list", "--json").output)[0]
    assert entry["base_model_hash"] == base["base_model_hash"] == hashing.base_model_hash(leo_base)
    assert entry["tokenizer_hash"] == base["tokenizer_hash"]
    assert entry["adapter_checksum"] == hashing.adapter_checksum(folder)
    sha = hashing.sha256_file(data_dir / "steuer_batch.jsonl")
    assert entry["dataset_ref"] == f"data/training_batches/steuer_batch.jsonl@sha256:{sha}"
    assert entry["license"] == "apache-2.0"
    assert entry["metrics"]["ppl_dev"] > 1
    assert entry["metrics"]["ppl_dev"] < entry["metrics"]["ppl_dev_base"]
    assert [h["name"] for h in entry["metrics_history"]] == ["ppl_dev", "ppl_dev_base"]
    assert entry["seed"] == 0
    assert entry["training_config"]["batch_size"] == 64
    assert (
        entry["training_config"]["micro_batch_size"] * entry["training_config"]["gradient_accumulation_steps"]
        == 64
    )
    assert set(entry["library_versions"]) >= {"torch", "transformers", "peft", "bitsandbytes", "accelerate"}
    assert entry["peft_config"]["r"] == 16 and entry["peft_config"]["peft_type"] == "LORA"
    assert entry["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    metadata = json.loads((folder / "clara_adapter.json").read_text())
    assert metadata["id"] == "steuerrecht-lora-r16-v1"
    assert metadata["adapter_checksum"] == entry["adapter_checksum"]


def test_same_inputs_and_seed_give_the_same_checksum_and_rebuild_matches(
    workspace: Workspace, leo_base: Path, data_dir: Path
) -> None:
    args = ("train", "--base", str(leo_base), "--domain", "steuerrecht", "--dataset",
            str(data_dir / "steuer_batch.jsonl"), "--batch-size", "8", "--dropout", "0.1", *FAST)  # fmt: skip
    first = run(workspace, *args)
    second = run(workspace, *args)
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    one = json.loads(run(workspace, "adapters", "show", "steuerrecht-lora-r16-v1", "--json").output)
    two = json.loads(run(workspace, "adapters", "show", "steuerrecht-lora-r16-v2", "--json").output)
    assert one["adapter_checksum"] == two["adapter_checksum"]
    assert (workspace.root / one["path"] / "adapter_model.safetensors").read_bytes() == (
        workspace.root / two["path"] / "adapter_model.safetensors"
    ).read_bytes()
    other_seed = run(workspace, *args, "--seed", "1")
    assert other_seed.exit_code == 0
    three = json.loads(run(workspace, "adapters", "show", "steuerrecht-lora-r16-v3", "--json").output)
    assert three["adapter_checksum"] != one["adapter_checksum"]

    before = snapshot(workspace)
    verified = run(workspace, "adapters", "verify", "--rebuild", "steuerrecht-lora-r16-v1")
    assert verified.exit_code == 0, verified.output
    assert "rebuilt  steuerrecht-lora-r16-v1: adapter_checksum matches" in verified.output
    assert snapshot(workspace)["adapters"] == before["adapters"]

    # A changed dataset is reported, not silently retrained.
    with open(data_dir / "steuer_batch.jsonl", "a") as handle:
        handle.write('{"text": "neu"}\n')
    changed = run(workspace, "adapters", "verify", "--rebuild", "steuerrecht-lora-r16-v1")
    assert changed.exit_code == 1
    assert "changed since training" in changed.output


def _bad(workspace: Workspace, *args: str, plugins: PluginManager | None = None) -> str:
    before = snapshot(workspace)
    result = run(workspace, "train", *args, plugins=plugins)
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.output
    assert snapshot(workspace) == before
    return last


@pytest.mark.parametrize(
    ("records", "extra", "expected"),
    [
        (None, (), "nope.jsonl: dataset not found"),
        (['{"text": "a"}', '{"text": "b",}'], (), "d.jsonl:2: invalid JSON"),
        (['{"text": "a"}', '{"frage": "a", "antwort": "b"}'], (), "d.jsonl:2: record of no known shape"),
        (['{"prompt": "Frage?", "completion": ""}'], (), "d.jsonl:1: empty completion"),
        (['{"text": "kurz"}', json.dumps({"text": "Steuer " * 100})], ("--no-truncate",), "d.jsonl:2:"),
        (['{"text": "a"}'], ("--rank", "0"), "--rank must be at least 1, got 0"),
        (
            ['{"text": "a"}'],
            ("--batch-size", "6", "--micro-batch-size", "4"),
            "--batch-size 6 is not a multiple",
        ),
        (['{"text": "a"}'], ("--method", "nonesuch"), "unknown trainer method 'nonesuch'; installed: "),
        (['{"text": "a"}'], ("--bits", "4"), "--bits is not an option of method 'lora'"),
    ],
)
def test_bad_dataset_and_options(
    workspace: Workspace, leo_base: Path, tmp_path: Path, records, extra, expected: str
) -> None:
    path = tmp_path / ("nope.jsonl" if records is None else "d.jsonl")
    if records is not None:
        path.write_text("\n".join(records) + "\n")
    line = _bad(
        workspace,
        "--base",
        str(leo_base),
        "--domain",
        "steuerrecht",
        "--dataset",
        str(path),
        *FAST[:6],
        *extra,
    )
    assert expected in line
    if "--no-truncate" in extra:
        assert "longer than --max-seq-len 64" in line


def test_base_not_a_model_and_changed_base(
    workspace: Workspace, leo_base: Path, data_dir: Path, tmp_path: Path
) -> None:
    dataset = str(data_dir / "steuer_batch.jsonl")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    line = _bad(workspace, "--base", str(empty), "--domain", "x", "--dataset", dataset)
    assert "not a model folder (no config.json)" in line

    assert run(workspace, "base", "add", str(leo_base)).exit_code == 0
    config = json.loads((leo_base / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (leo_base / "config.json").write_text(json.dumps(config))
    line = _bad(workspace, "--base", str(leo_base), "--domain", "x", "--dataset", dataset)
    assert "files of base 'leo_base' changed since it was registered" in line


def test_method_not_installed_names_the_package(workspace: Workspace, leo_base: Path, data_dir: Path) -> None:
    without_dora = PluginManager(only=["lora", "qlora"])
    line = _bad(
        workspace, "--base", str(leo_base), "--domain", "x", "--method", "dora",
        "--dataset", str(data_dir / "steuer_batch.jsonl"), plugins=without_dora,
    )  # fmt: skip
    assert "unknown trainer method 'dora'; installed: lora, qlora" in line
    assert "pip install clara-plugin-dora" in line


def test_output_folder_exists(workspace: Workspace, leo_base: Path, data_dir: Path) -> None:
    taken = workspace.adapters_dir / "steuerrecht" / "lora-r16-v1"
    taken.mkdir(parents=True)
    (taken / "keep.txt").write_text("mine")
    line = _bad(
        workspace, "--base", str(leo_base), "--domain", "steuerrecht", "--dataset",
        str(data_dir / "steuer_batch.jsonl"), "--out-dir", str(taken),
    )  # fmt: skip
    assert "output folder exists" in line
    assert (taken / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("/metadata/tmp/train-", "disk full while saving the adapter"),  # the final save, after training
        ("/metadata/runs/", "disk full while writing a checkpoint"),  # a checkpoint during training
    ],
)
def test_disk_full_while_saving_registers_nothing(
    workspace: Workspace,
    leo_base: Path,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    expected: str,
) -> None:
    import peft.peft_model

    real_save = peft.peft_model.safe_save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if where in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)
    line = _bad(
        workspace, "--base", str(leo_base), "--domain", "steuerrecht",
        "--dataset", str(data_dir / "steuer_batch.jsonl"), "--batch-size", "4", *FAST,
    )  # fmt: skip
    assert expected in line
    if where == "/metadata/runs/":  # the first checkpoint failed: nothing to resume, and no run folder left
        assert "run the same command again" in line
        assert not (workspace.metadata_dir / "runs").exists()
    else:
        assert "--resume" in line
    assert not list(workspace.tmp_dir.glob("train-*"))


@pytest.mark.parametrize("disk_full", [True, False])
def test_checkpoint_write_failure_from_torch_is_one_line(
    workspace: Workspace,
    leo_base: Path,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    disk_full: bool,
) -> None:
    """torch.save on a full disk raises a RuntimeError without errno ('unexpected pos ...'): the optimizer
    state of a checkpoint is written to /dev/full, which gives torch's genuine error."""
    import shutil as shutil_mod

    import torch

    real_save = torch.save
    real_usage = shutil_mod.disk_usage

    def save(obj, f, *args, **kwargs):
        if "/metadata/runs/" in str(f):
            f = "/dev/full"
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    if disk_full:
        monkeypatch.setattr(
            "shutil.disk_usage",
            lambda path: (
                real_usage(path)._replace(free=1024) if "/metadata/runs/" in str(path) else real_usage(path)
            ),
        )
    line = _bad(
        workspace, "--base", str(leo_base), "--domain", "steuerrecht",
        "--dataset", str(data_dir / "steuer_batch.jsonl"), "--batch-size", "4", *FAST,
    )  # fmt: skip
    if disk_full:
        assert "disk full while writing a checkpoint to" in line
    else:
        assert "could not write a checkpoint to" in line and "unexpected pos" in line and "MiB free" in line
    assert "run the same command again" in line
    assert not (workspace.metadata_dir / "runs").exists(), "a failed run left its folder behind"


def test_failed_run_leaves_no_run_folder(workspace: Workspace, leo_base: Path, data_dir: Path) -> None:
    # --target-modules is checked against the loaded model, inside the run's folder lock
    line = _bad(
        workspace, "--base", str(leo_base), "--domain", "steuerrecht", "--target-modules", "nope_proj",
        "--dataset", str(data_dir / "steuer_batch.jsonl"), "--batch-size", "4", *FAST,
    )  # fmt: skip
    assert "--target-modules: nope_proj not found in the base" in line
    assert not (workspace.metadata_dir / "runs").exists()


def test_short_run_warns_and_says_what_reaches_a_useful_length(
    workspace: Workspace, leo_base: Path, data_dir: Path
) -> None:
    result = run(
        workspace, "train", "--base", str(leo_base), "--domain", "steuerrecht",
        "--dataset", str(data_dir / "steuer_batch.jsonl"), "--batch-size", "64", "--max-seq-len", "64",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    warning = next(x for x in result.output.splitlines() if x.startswith("warning: this run trains only"))
    assert "only 1 optimizer step (" in warning and "--batch-size 64" in warning
    assert "--epochs 20 or --max-steps 20 gives 20 steps" in warning
    assert "Trained 1 step in" in result.output  # singular
    # with --max-steps the length is chosen on purpose: no warning
    chosen = run(
        workspace, "train", "--base", str(leo_base), "--domain", "steuerrecht",
        "--dataset", str(data_dir / "steuer_batch.jsonl"), "--batch-size", "64", "--max-seq-len", "64",
        "--max-steps", "1",
    )  # fmt: skip
    assert chosen.exit_code == 0 and "warning: this run trains only" not in chosen.output


def test_base_registered_elsewhere_is_found_by_its_convention_path(
    workspace: Workspace, tiny_base_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clara_core.registry import Registry
    from clara_core.training.plan import resolve_base

    elsewhere = tmp_path / "downloads" / "LeoLM-7b"
    shutil.copytree(tiny_base_dir, elsewhere)
    added = run(workspace, "base", "add", str(elsewhere), "--name", "leo_base")
    assert added.exit_code == 0, added.output
    monkeypatch.chdir(workspace.root)
    with Registry.open(workspace.registry_path) as registry:
        resolved = resolve_base("models/base/leo_base", registry, workspace)
    assert resolved.registered and resolved.name == "leo_base" and resolved.path == elsewhere
    monkeypatch.chdir(tmp_path)  # 'clara -w WS train --base models/base/leo_base' from another folder
    with Registry.open(workspace.registry_path) as registry:
        assert resolve_base("models/base/leo_base", registry, workspace).path == elsewhere
    monkeypatch.chdir(workspace.root)

    line = _bad(
        workspace, "--base", "models/base/leo_bsae", "--domain", "x",
        "--dataset", str(data_dir / "steuer_batch.jsonl"),
    )  # fmt: skip
    assert "--base models/base/leo_bsae: no such folder" in line and "did you mean --base leo_base?" in line
    line = _bad(
        workspace, "--base", "leo", "--domain", "x", "--dataset", str(data_dir / "steuer_batch.jsonl"),
    )  # fmt: skip
    assert "did you mean --base leo_base?" in line
