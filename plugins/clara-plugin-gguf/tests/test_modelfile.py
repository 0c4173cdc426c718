"""The Modelfile of an Ollama export: chat templates of the common families recognised by rendering probe
conversations (not by parsing Jinja) and translated, unknown ones left out with a note, stop parameters, file
names, and `--create` running a fake `ollama` that records its argv."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the chat template is rendered with the base's tokenizer")

from clara_plugin_gguf.modelfile import (
    TemplateTranslation,
    modelfile_text,
    run_ollama_create,
    translate_chat_template,
    write_modelfile,
)

from clara_core.records import BaseRecord

QWEN2 = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- for message in messages %}{%- if (message.role == 'user') or (message.role == 'system' "
    "and not loop.first) or (message.role == 'assistant') %}{{- '<|im_start|>' + message.role + '\\n' + "
    "message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
    "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
ODD = "{% for message in messages %}### {{ message['role'] }}: {{ message['content'] }}\n{% endfor %}### assistant:"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clara_core.tinymodels import build_tokenizer

    out = tmp_path_factory.mktemp("gguf-tok") / "tok"
    build_tokenizer(["Der Bescheid ist schriftlich zu begründen."], out, vocab_size=300)
    return out


def base_with_template(tokenizer_dir: Path, tmp_path: Path, template: str | None) -> BaseRecord:
    folder = tmp_path / "base"
    shutil.copytree(tokenizer_dir, folder)
    jinja = folder / "chat_template.jinja"
    if template is None:
        jinja.unlink(missing_ok=True)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    else:
        jinja.write_text(template)
    return BaseRecord(
        name="b", path=folder, base_model_hash="0" * 64, tokenizer_hash=None, architecture="LlamaForCausalLM",
        model_type="llama", config={}, size_bytes=0, created="2026-01-01T00:00:00Z",
    )  # fmt: skip


def test_clara_template_of_the_demo_and_tiny_bases(tokenizer_dir, tmp_path):
    translation = translate_chat_template(base_with_template(tokenizer_dir, tmp_path, None))
    assert translation.template is None and "no chat template" in translation.note
    shutil.rmtree(tmp_path / "base")
    from clara_core.tinymodels import CHAT_TEMPLATE

    translation = translate_chat_template(base_with_template(tokenizer_dir, tmp_path, CHAT_TEMPLATE))
    assert translation.family == "clara"
    assert translation.template == (
        "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}</s>\n{{ end }}<|assistant|>\n"
    )
    assert translation.stops == ["</s>", "<|user|>", "<|system|>"]


@pytest.mark.parametrize(
    ("template", "family", "system", "stops"),
    [
        (QWEN2, "chatml", "You are a helpful assistant.", ["<|im_end|>", "<|im_start|>", "</s>"]),
        (LLAMA3, "llama3", None, ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "</s>"]),
        (LLAMA2, "llama2", None, ["[INST]", "</s>"]),
        (MISTRAL, "mistral", None, ["[INST]", "</s>"]),
    ],
)
def test_common_families_are_recognised_by_their_rendering(
    tokenizer_dir, tmp_path, template, family, system, stops
):
    translation = translate_chat_template(base_with_template(tokenizer_dir, tmp_path, template))
    assert translation.family == family
    assert translation.system == system  # Qwen2's default system prompt becomes the Modelfile's SYSTEM
    assert translation.stops == stops
    text = modelfile_text(model_file="m.gguf", adapter_file="a.gguf", translation=translation)
    assert f'TEMPLATE """{translation.template}"""' in text
    assert ('SYSTEM """You are a helpful assistant."""' in text) == (family == "chatml")
    if family == "mistral":
        assert "takes no system message" in translation.note


def test_a_template_of_no_known_family_is_left_out_and_said(tokenizer_dir, tmp_path):
    translation = translate_chat_template(base_with_template(tokenizer_dir, tmp_path, ODD))
    assert translation.family is None and translation.template is None
    assert "none of the known families" in translation.note
    text = modelfile_text(model_file="m.gguf", adapter_file=None, translation=translation)
    assert "TEMPLATE" not in text and 'PARAMETER stop "</s>"' in text


def test_modelfile_names_its_files_relative_to_itself(tmp_path):
    translation = TemplateTranslation("clara", "{{ .Prompt }}", None, ["</s>", 'say "stop"'], "")
    path = write_modelfile(
        tmp_path / "Modelfile", model_file="tiny.f16.gguf", adapter_file="x.lora.gguf", translation=translation,
        header="written by a test",
    )  # fmt: skip
    lines = path.read_text().splitlines()
    assert lines[0] == "# written by a test"
    assert lines[1:3] == ["FROM ./tiny.f16.gguf", "ADAPTER ./x.lora.gguf"]
    assert lines[-2:] == ['PARAMETER stop "</s>"', 'PARAMETER stop "say \\"stop\\""']
    merged = modelfile_text(model_file="x.f16.gguf", adapter_file=None, translation=translation)
    assert "ADAPTER" not in merged and merged.startswith("FROM ./x.f16.gguf\n")


def fake_ollama(bin_dir: Path, exit_code: int = 0) -> Path:
    """An ``ollama`` script that records its argv and working folder."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    record = bin_dir / "calls.jsonl"
    script = bin_dir / "ollama"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"open({str(record)!r}, 'a').write(json.dumps({{'argv': sys.argv[1:], 'cwd': os.getcwd()}}) + '\\n')\n"
        "print('transferring model data' if not {exit} else 'Error: no such file', file=sys.stderr)\n"
        "sys.exit({exit})\n".replace("{exit}", str(exit_code))
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return record


def test_create_runs_ollama_create_in_the_export_folder(tmp_path, monkeypatch):
    export = tmp_path / "export"
    export.mkdir()
    modelfile = export / "Modelfile"
    modelfile.write_text("FROM ./m.gguf\n")
    record = fake_ollama(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    message = run_ollama_create("steuer-lora-r4-v1", modelfile)
    assert message.startswith("Created the Ollama model 'steuer-lora-r4-v1'")
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert calls == [{"argv": ["create", "steuer-lora-r4-v1", "-f", "Modelfile"], "cwd": str(export)}]


def test_create_failing_or_missing_ollama_is_reported_not_raised(tmp_path, monkeypatch):
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text("FROM ./m.gguf\n")
    fake_ollama(tmp_path / "bin", exit_code=1)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    message = run_ollama_create("x", modelfile)
    assert "failed (exit 1: Error: no such file)" in message and "\n" not in message
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert run_ollama_create("x", modelfile).startswith("--create: no 'ollama' on PATH")
