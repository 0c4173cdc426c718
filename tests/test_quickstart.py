"""clara quickstart and clara base create-demo: offline demo base, two domain adapters, visible effect."""

from __future__ import annotations

import importlib.util
import json
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from clara_core import demo
from clara_core.cli import ClaraContext, cli
from clara_core.plugins import PluginManager
from clara_core.workspace import Workspace


def _words(text: str) -> set[str]:
    return {w.strip(".,?").lower() for w in text.split()}


def test_quickstart_trains_two_adapters_and_shows_their_effect(tmp_path: Path) -> None:
    root = tmp_path / "clara-workspace"
    result = CliRunner().invoke(
        cli,
        # 40 steps (the default is 300) already teach each adapter its domain's answer word for word
        ["quickstart", "--dir", str(root), "--steps", "40"],
        obj=ClaraContext(plugins=PluginManager()),
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    out = result.output
    everything = json.loads(
        CliRunner().invoke(cli, ["-w", str(root), "adapters", "list", "--json"], obj=ClaraContext()).output
    )
    assert sorted(e["kind"] for e in everything) == ["adapter", "adapter", "composite"]
    listed = [e for e in everything if e["kind"] == "adapter"]
    ids = sorted(entry["id"] for entry in listed)
    assert ids == ["sozialrecht-lora-r16-v1", "steuerrecht-lora-r16-v1"]
    for entry in listed:
        assert entry["dataset_ref"].startswith(f"data/{entry['domain'][0]}.jsonl@sha256:")
        assert entry["metrics"]["ppl_dev"] < entry["metrics"]["ppl_dev_base"]
    bases = json.loads(CliRunner().invoke(cli, ["-w", str(root), "base", "list", "--json"]).output)
    assert [b["name"] for b in bases] == ["demo-llama"]

    # For each domain's question: the base, then each adapter; the domain's own adapter answers it best.
    for domain, question in demo.demo_questions().items():
        assert f"[{domain}] {question}" in out
        block = out.split(f"[{domain}] {question}", 1)[1].split("\n\n", 1)[0]
        answers = {
            line.split(None, 1)[0]: ([*line.split(None, 1), ""])[1] for line in block.strip().splitlines()
        }
        assert set(answers) == {"expected", "base", *ids}
        expected = _words(demo.demo_answer(domain))
        own = f"{domain}-lora-r16-v1"
        assert len(_words(answers[own]) & expected) > len(_words(answers["base"]) & expected)
        assert len(_words(answers[own]) & expected) >= len(expected) // 3
    # Then the same questions over HTTP: one served base, each adapter hot-swapped in on its first request.
    served = out.split("6. Serving", 1)[1].split("What to run next", 1)[0]
    for domain in demo.demo_questions():
        own = f"{domain}-lora-r16-v1"
        line = next(x for x in served.splitlines() if x.strip().startswith(f"[{domain}] {own} answered"))
        text = line.split("): ", 1)[1]
        assert (
            len(_words(text) & _words(demo.demo_answer(domain))) >= len(_words(demo.demo_answer(domain))) // 3
        )
    assert "What to run next" in out
    assert "serve --port 8000" in out
    assert "adapters verify --rebuild" in out
    # It ends with a small evaluation: each adapter beats the base on its own domain, and there the value is
    # the ppl_dev training recorded (one implementation); the results are recorded.
    evaluation = out.split("7. Evaluation", 1)[1].split("What to run next", 1)[0]
    header = evaluation.splitlines()[1].split()

    def cells(name: str) -> dict[str, float]:
        line = next(x for x in evaluation.splitlines() if x.strip().startswith(name + " "))
        values = line.split(None, 1)[1].replace("*", "").split()
        return {d: float(v) for d, v in zip(header, values, strict=True)}

    for entry in listed:
        own = entry["domain"][0]
        assert cells(entry["id"])[own] == pytest.approx(entry["metrics"]["ppl_dev"], rel=1e-3)
        assert cells(entry["id"])[own] < cells("base")[own]
    shown = json.loads(
        CliRunner().invoke(cli, ["-w", str(root), "adapters", "show", ids[0], "--json"]).output
    )
    assert shown["metrics"]["ppl"] == pytest.approx(shown["metrics"]["ppl_dev"], rel=1e-5)

    # Then a composite of both adapters (each delta weighted 0.7) answers both domains' questions word for word,
    # as each domain's own adapter does, and keeps at least 80% of each adapter's perplexity gain on that
    # adapter's dev set (measured: 96% and 98% with the default steps).
    section = out.split("8. Composite", 1)[1].split("What to run next", 1)[0]
    composite = "steuerrecht_sozialrecht-weighted-r32-v1"
    assert f"Registered '{composite}'" in section and "exact" in section
    assert "weights 0.7 0.7" in section and "why 0.7" in section
    for domain, question in demo.demo_questions().items():
        block = section.split(f"[{domain}] {question}", 1)[1].split("\n\n", 1)[0]
        answers = {
            line.split(None, 1)[0]: ([*line.split(None, 1), ""])[1] for line in block.strip().splitlines()
        }
        assert set(answers) == {"expected", f"{domain}-lora-r16-v1", composite}
        assert answers[composite] == demo.demo_answer(domain) == answers[f"{domain}-lora-r16-v1"]
        line = next(x for x in section.splitlines() if x.strip().startswith(f"[{domain}] base "))
        assert float(line.rsplit("keeps ", 1)[1].rstrip("%")) >= 80
    checked = json.loads(
        CliRunner().invoke(cli, ["-w", str(root), "composite", "show", composite, "--json"]).output
    )["check"]
    assert {k["domain"] for k in checked} == {"steuerrecht", "sozialrecht"}
    assert all(k["kept"] >= 0.8 for k in checked)
    assert f"composite show {composite}" in out

    # It ends with the first adapter exported for Ollama and verified against transformers (or one line saying
    # why not, where llama-cpp-python is not installed).
    exported = out.split("Export for Ollama and llama.cpp", 1)[1].split("What to run next", 1)[0]
    if importlib.util.find_spec("llama_cpp") is None:
        assert "skipped: " in exported and "pip install" in exported
    else:
        [entry] = json.loads(CliRunner().invoke(cli, ["-w", str(root), "export", "list", "--json"]).stdout)
        assert entry["adapter_id"] == "steuerrecht-lora-r16-v1" and entry["present"]
        assert sorted(f["path"] for f in entry["files"]) == [
            "Modelfile",
            "demo-llama.f16.gguf",
            "steuerrecht-lora-r16-v1.lora.gguf",
        ]
        assert entry["details"]["verification"]["passed"] is True
        assert "verified with llama.cpp" in exported
        assert "ollama create steuerrecht-lora-r16-v1 -f Modelfile" in exported
    assert "export ollama" in out.split("What to run next", 1)[1]

    # Running it again reuses the base and adds new versions, never overwriting.
    again = CliRunner().invoke(
        cli,
        ["quickstart", "--dir", str(root), "--steps", "2", "--no-serve"],
        obj=ClaraContext(plugins=PluginManager()),
    )
    assert again.exit_code == 0, again.output
    assert "Demo base 'demo-llama' is already registered" in again.output
    assert "steuerrecht-lora-r16-v2" in again.output


def test_quickstart_with_a_method_that_is_not_installed(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        ["quickstart", "--dir", str(tmp_path / "ws"), "--method", "dora"],
        obj=ClaraContext(plugins=PluginManager(only=["lora", "qlora"])),
    )
    assert result.exit_code == 1
    assert "pip install clara-plugin-dora" in result.output.strip().splitlines()[-1]
    assert not (tmp_path / "ws").exists()


def test_create_demo_builds_a_loadable_model_and_refuses_an_existing_folder(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["base", "create-demo", str(target)])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(str(target))
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    assert model.config.model_type == "llama"
    assert tokenizer.chat_template
    assert len(tokenizer("Das Finanzamt setzt die Einkommensteuer fest.")["input_ids"]) < 12
    again = CliRunner().invoke(cli, ["base", "create-demo", str(target)])
    assert again.exit_code == 1
    assert "already exists" in again.output


def test_interrupted_quickstart_continues_when_run_again(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C during the first adapter's training (simulated at step 3): the same command again continues from
    the checkpoint, and a third run reuses both adapters instead of training new versions."""
    from clara_core.training import loop

    real_catch = loop._catch_sigint
    presses = {"steps": 0}

    @contextmanager
    def ctrl_c_at_step_3():
        def pressed() -> bool:
            presses["steps"] += 1
            return presses["steps"] >= 3

        yield pressed

    root = tmp_path / "ws"
    args = ["quickstart", "--dir", str(root), "--steps", "8", "--no-serve"]
    monkeypatch.setattr(loop, "_catch_sigint", ctrl_c_at_step_3)
    first = CliRunner().invoke(cli, args, obj=ClaraContext(plugins=PluginManager()))
    assert first.exit_code == 130, first.output
    last = first.output.strip().splitlines()[-1]
    assert "quickstart interrupted while training the steuerrecht adapter" in last
    assert "Run the same command again" in last and "--resume" not in first.output

    monkeypatch.setattr(loop, "_catch_sigint", real_catch)
    second = CliRunner().invoke(cli, args, obj=ClaraContext(plugins=PluginManager()))
    assert second.exit_code == 0, second.output
    assert "Continuing the interrupted lora training for steuerrecht from step 3" in second.output
    listed = json.loads(
        CliRunner().invoke(cli, ["-w", str(root), "adapters", "list", "--json"], obj=ClaraContext()).output
    )
    assert sorted(e["id"] for e in listed if e["kind"] == "adapter") == [
        "sozialrecht-lora-r16-v1",
        "steuerrecht-lora-r16-v1",
    ]
    steuer = next(e for e in listed if e["id"] == "steuerrecht-lora-r16-v1")
    assert steuer["training_config"]["resumed_from_step"] == 3

    third = CliRunner().invoke(cli, args, obj=ClaraContext(plugins=PluginManager()))
    assert third.exit_code == 0, third.output
    assert "'steuerrecht-lora-r16-v1' was already trained with these inputs; reusing it" in third.output
    assert "-v2" not in third.output
    assert "was already built from these adapters" in third.output  # the composite too


def test_next_commands_work_as_shown(tmp_path: Path, monkeypatch) -> None:
    """After the README's install, 'clara' is .venv/bin/clara, not on PATH: the printed commands name it."""
    venv_bin = tmp_path / "repo" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    clara = venv_bin / "clara"
    clara.write_text("#!/bin/sh\n")
    clara.chmod(0o755)
    monkeypatch.chdir(tmp_path / "repo")
    monkeypatch.setattr("sys.argv", [str(clara), "quickstart"])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert demo.clara_command() == ".venv/bin/clara"
    monkeypatch.setenv("PATH", f"{venv_bin}:/usr/bin:/bin")
    assert demo.clara_command() == "clara"  # activated: the short name is this clara
    monkeypatch.setattr("sys.argv", ["-c"])
    assert demo.clara_command().endswith(" -m clara_core.cli")

    lines: list[str] = []
    monkeypatch.setattr("sys.argv", [str(clara), "quickstart"])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    state = demo.Quickstart(workspace=Workspace.init(tmp_path / "repo" / "clara-workspace")[0])
    demo.step_next(state, lines.append)
    commands = [line.split()[0] for line in lines if line.startswith("  ") and "curl" not in line]
    assert commands and set(commands) == {".venv/bin/clara"}
    assert "  .venv/bin/clara -w clara-workspace adapters list" in "\n".join(lines)


def test_quickstart_answers_one_question_through_auto(tmp_path: Path) -> None:
    """The routing step: a router fitted on the demo adapters' own training data (their dataset_ref) sends the
    steuerrecht question to the steuerrecht adapter, through "auto" in a real server; the next steps show
    'clara route' and serve --router."""
    from clara_core.registry import Registry
    from clara_core.tinymodels import random_lora_adapter

    ws, _ = Workspace.init(tmp_path / "ws")
    state = demo.Quickstart(workspace=ws)
    base = demo.build_demo_base(ws.base_dir / demo.DEMO_BASE_NAME)
    with Registry.open(ws.registry_path) as registry:
        state.base = registry.add_base(base, name=demo.DEMO_BASE_NAME, workspace=ws)
    state.datasets = demo.write_demo_datasets(ws.root / "data")
    for i, (domain, (train, _dev)) in enumerate(state.datasets.items()):
        made = random_lora_adapter(base, tmp_path / "made" / domain, seed=i + 1)
        args = [
            "-w",
            str(ws.root),
            "adapters",
            "register",
            str(made),
            "--domain",
            domain,
            "--dataset",
            str(train),
        ]
        result = CliRunner().invoke(cli, args, obj=ClaraContext(plugins=PluginManager()))
        assert result.exit_code == 0, result.output
    with Registry.open(ws.registry_path) as registry:
        state.adapters = {a.domain[0]: a for a in registry.list_adapters()}
    lines: list[str] = []
    demo.step_route(state, PluginManager(), lines.append)
    out = "\n".join(lines)
    steuer = state.adapters["steuerrecht"].id
    assert "10. Routing: router 'embedding' fitted on" in out
    assert state.routed["adapter_id"] == steuer, out
    assert 0 < state.routed["score"] <= 1
    assert f'"auto" chose {steuer} (score {state.routed["score"]:.2f}) and answered: ' in out
    assert (ws.metadata_dir / "routers" / "embedding" / "manifest.json").is_file()

    # without a server: the decision alone
    quiet: list[str] = []
    demo.step_route(state, PluginManager(), quiet.append, serve=False)
    assert f"routed to {steuer} (score " in "\n".join(quiet)

    lines.clear()
    demo.step_next(state, lines.append)
    shown = "\n".join(lines)
    assert 'route "Wer bekommt Bürgergeld?"' in shown and "serve --router embedding" in shown
