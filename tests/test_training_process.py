"""clara train as real processes: torchrun DDP, SIGKILL mid-training then --resume, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from clara_core.workspace import Workspace

TEXTS = [
    "Das Finanzamt setzt die Einkommensteuer durch Steuerbescheid fest.",
    "Der Einspruch ist innerhalb eines Monats nach Bekanntgabe einzulegen.",
    "Die Umsatzsteuer beträgt im Regelfall neunzehn Prozent.",
    "Werbungskosten sind Aufwendungen zur Erwerbung, Sicherung und Erhaltung der Einnahmen.",
]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"CLARA_HOME", "CLARA_LOAD_PLUGINS"}}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def dataset(workspace: Workspace) -> Path:
    path = workspace.root / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS * 8))
    return path


def adapters_in(workspace: Workspace) -> list[tuple]:
    conn = sqlite3.connect(workspace.registry_path)
    try:
        return conn.execute("SELECT id, training_config FROM adapters").fetchall()
    finally:
        conn.close()


def _clara(workspace: Workspace, *args: str) -> list[str]:
    return [sys.executable, "-m", "clara_core.cli", "-w", str(workspace.root), *args]


def _train_args(base: Path, dataset: Path, *extra: str) -> list[str]:
    return [
        "train", "--base", str(base), "--domain", "steuerrecht", "--dataset", str(dataset),
        "--rank", "4", "--batch-size", "8", "--micro-batch-size", "8", "--max-seq-len", "64", *extra,
    ]  # fmt: skip


def _start_and_wait_for_checkpoint(command: list[str]) -> subprocess.Popen:
    """Start a training process and return once it reports its first checkpoint (read from its stderr)."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(), text=True)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "checkpoint saved at step 2" in line:
            return proc
    proc.wait()
    pytest.fail(
        f"training ended (rc {proc.returncode}) before its first checkpoint:\n{''.join(seen)[-2000:]}"
    )


def test_killed_process_leaves_nothing_and_resume_completes(
    workspace: Workspace, tiny_base_dir: Path, dataset: Path
) -> None:
    """Only the kill needs a real process; the refusal and the resume run in this one (two fewer interpreter
    starts), against the files the killed process left."""
    from click.testing import CliRunner

    from clara_core.cli import ClaraContext, cli
    from clara_core.plugins import PluginManager

    args = _train_args(tiny_base_dir, dataset, "--max-steps", "30", "--save-steps", "2")
    proc = _start_and_wait_for_checkpoint(_clara(workspace, *args))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert adapters_in(workspace) == []
    assert not any(p.is_file() for p in workspace.adapters_dir.rglob("*")), "half adapter left in models/"
    runs = list((workspace.metadata_dir / "runs").iterdir())
    assert len(runs) == 1 and list(runs[0].glob("checkpoint-*"))

    def clara(*extra: str):
        obj = ClaraContext(workspace=workspace.root, plugins=PluginManager())
        return CliRunner().invoke(cli, [*args, *extra], obj=obj)

    # the same command without --resume refuses to throw the checkpoint away
    again = clara()
    assert again.exit_code == 1
    assert "continue it with --resume" in again.output.strip().splitlines()[-1]
    assert adapters_in(workspace) == []
    assert list(runs[0].glob("checkpoint-*")), "the refused run removed the checkpoint"

    resumed = clara("--resume")
    assert resumed.exit_code == 0, resumed.output[-2000:]
    assert "Resuming from checkpoint-" in resumed.output
    rows = adapters_in(workspace)
    assert [r[0] for r in rows] == ["steuerrecht-lora-r4-v1"]
    config = json.loads(rows[0][1])
    assert config["resumed_from_step"] >= 2
    assert not runs[0].exists(), "a finished run keeps no checkpoints"


def test_ctrl_c_stops_cleanly_and_keeps_the_checkpoint(
    workspace: Workspace, tiny_base_dir: Path, dataset: Path
) -> None:
    args = _train_args(tiny_base_dir, dataset, "--max-steps", "60", "--save-steps", "2")
    proc = _start_and_wait_for_checkpoint(_clara(workspace, *args))
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None
    rest = proc.stderr.read()
    assert proc.wait() == 130
    last = rest.strip().splitlines()[-1]
    assert "interrupted at step" in last and "nothing was registered" in last and "--resume" in last
    assert "Traceback" not in rest
    assert adapters_in(workspace) == []
    assert not any(p.is_file() for p in workspace.adapters_dir.rglob("*"))
    runs = list((workspace.metadata_dir / "runs").iterdir())
    assert len(runs) == 1 and list(runs[0].glob("checkpoint-*"))


def test_torchrun_two_processes_register_one_adapter(
    workspace: Workspace, tiny_base_dir: Path, dataset: Path
) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "clara_core.cli", "-w", str(workspace.root),
        *_train_args(tiny_base_dir, dataset, "--max-steps", "4"),
    ]  # fmt: skip
    command[command.index("--micro-batch-size") + 1] = "2"
    # Two CPU processes (gloo), also on a machine with fewer than two GPUs: one process per GPU is the rule there.
    env = {**_env(), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch 8 = 2 x 2 accumulation x 2 processes" in result.stderr
    rows = adapters_in(workspace)
    assert [r[0] for r in rows] == ["steuerrecht-lora-r4-v1"]
    config = json.loads(rows[0][1])
    assert config["world_size"] == 2 and config["gradient_accumulation_steps"] == 2
    assert result.stdout.count("Registered steuerrecht-lora-r4-v1") == 1
    assert len(list(workspace.adapters_dir.rglob("adapter_model.safetensors"))) == 1


def test_more_torchrun_processes_than_gpus_is_one_line() -> None:
    from clara_core.errors import InvalidInput
    from clara_core.training.plan import check_gpus_for_processes

    check_gpus_for_processes(2, {"LOCAL_WORLD_SIZE": "2"})
    check_gpus_for_processes(1, {})  # a plain run
    with pytest.raises(InvalidInput) as caught:
        check_gpus_for_processes(1, {"LOCAL_WORLD_SIZE": "2"})
    assert str(caught.value) == (
        "torchrun started 2 processes on this machine, but it has 1 GPU (one process per GPU); use "
        "--nproc_per_node 1, or CUDA_VISIBLE_DEVICES= to train on the CPU"
    )
