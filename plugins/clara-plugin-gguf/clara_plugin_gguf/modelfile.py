"""The Ollama ``Modelfile`` of an export: ``FROM`` the base GGUF, one ``ADAPTER`` unless merged, the chat
template as an Ollama (Go) ``TEMPLATE``, a ``SYSTEM`` where the template has a default system prompt, and the
stop ``PARAMETER``s.

The tokenizer's Jinja chat template is not parsed: it is rendered on probe conversations (with and without a
system message, one and two turns) and the result compared, character for character, with what each known
family renders (ChatML as Qwen2 uses it, Llama 3, Llama 2 and Mistral ``[INST]``, and clara's demo and test
template). A family whose rendering matches on every probe gives its Go template; anything else leaves
``TEMPLATE`` out, and the message says so (Ollama then passes prompts through unchanged).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from clara_core.plugin_api import BaseRecord, ClaraError, first_line, write_text_atomic

Messages = Sequence[dict[str, str]]

#: What the probes say; plain words without surrounding spaces, so that templates which strip content agree.
_S, _U1, _A1, _U2 = "Antworte knapp.", "Was ist ein Bescheid?", "Ein Verwaltungsakt.", "Und ein Widerspruch?"
PROBES: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": _U1},),
    ({"role": "system", "content": _S}, {"role": "user", "content": _U1}),
    (
        {"role": "user", "content": _U1},
        {"role": "assistant", "content": _A1},
        {"role": "user", "content": _U2},
    ),
    (
        {"role": "system", "content": _S},
        {"role": "user", "content": _U1},
        {"role": "assistant", "content": _A1},
        {"role": "user", "content": _U2},
    ),
)


@attrs.frozen
class ChatFamily:
    """A chat format Ollama can be told about: how it renders (with the generation prompt), its Go template,
    and the markers that end an answer."""

    name: str
    render: Callable[[Messages, str | None], str]
    template: str
    stops: tuple[str, ...]
    #: the family puts a default system prompt first when the conversation has none (ChatML, Llama 3)
    default_system: Callable[[str], str | None] = lambda _rendered: None
    #: the family's own template refuses system messages (Mistral's): they are dropped, and the note says so
    no_system: bool = False


def _with_default(messages: Messages, system: str | None) -> list[dict[str, str]]:
    if system and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system}, *messages]
    return list(messages)


def _chatml(messages: Messages, system: str | None) -> str:
    body = "".join(
        f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in _with_default(messages, system)
    )
    return body + "<|im_start|>assistant\n"


def _chatml_default(rendered: str) -> str | None:
    head = "<|im_start|>system\n"
    if rendered.startswith(head) and "<|im_end|>" in rendered:
        return rendered[len(head) : rendered.index("<|im_end|>")]
    return None


def _llama3(messages: Messages, system: str | None) -> str:
    body = "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
        for m in _with_default(messages, system)
    )
    return body + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _llama3_default(rendered: str) -> str | None:
    head = "<|start_header_id|>system<|end_header_id|>\n\n"
    if rendered.startswith(head) and "<|eot_id|>" in rendered:
        return rendered[len(head) : rendered.index("<|eot_id|>")]
    return None


def _llama2(messages: Messages, _system: str | None) -> str:
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    out, first = "", True
    for m in messages:
        if m["role"] == "user":
            sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if first and system else ""
            out += ("" if first else "<s>") + f"[INST] {sys_block}{m['content']} [/INST]"
            first = False
        elif m["role"] == "assistant":
            out += f" {m['content']} </s>"
    return out


def _mistral(messages: Messages, _system: str | None) -> str:
    out = ""
    for m in messages:
        if m["role"] == "user":
            out += f"[INST] {m['content']} [/INST]"
        elif m["role"] == "assistant":
            out += f"{m['content']}</s>"
    return out


def _clara(messages: Messages, _system: str | None) -> str:
    return "".join(f"<|{m['role']}|>\n{m['content']}</s>\n" for m in messages) + "<|assistant|>\n"


FAMILIES: tuple[ChatFamily, ...] = (
    ChatFamily(
        "chatml",
        _chatml,
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        ("<|im_end|>", "<|im_start|>"),
        _chatml_default,
    ),
    ChatFamily(
        "llama3",
        _llama3,
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
        _llama3_default,
    ),
    ChatFamily(
        "llama2",
        _llama2,
        '{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{- $system = .Content }}{{- end }}'
        '{{- end }}{{- $first := true }}{{- range .Messages }}{{- if eq .Role "user" }}'
        "{{- if not $first }}<s>{{ end }}[INST] {{ if and $first $system }}<<SYS>>\n{{ $system }}\n<</SYS>>\n\n"
        "{{ end }}{{ .Content }} [/INST]{{- $first = false }}"
        '{{- else if eq .Role "assistant" }} {{ .Content }} </s>{{- end }}{{- end }}',
        ("[INST]", "</s>"),
    ),
    ChatFamily(
        "mistral",
        _mistral,
        '{{- range .Messages }}{{- if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
        '{{- else if eq .Role "assistant" }}{{ .Content }}</s>{{- end }}{{- end }}',
        ("[INST]", "</s>"),
        no_system=True,
    ),
    ChatFamily(
        "clara",
        _clara,
        "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}</s>\n{{ end }}<|assistant|>\n",
        ("</s>", "<|user|>", "<|system|>"),
    ),
)


@attrs.define
class TemplateTranslation:
    """The outcome of translating a chat template: ``family`` and ``template`` where one matched."""

    family: str | None
    template: str | None
    system: str | None
    stops: list[str]
    note: str


def render_probes(render: Callable[[Messages], str]) -> list[str | None]:
    """Each probe rendered with ``render``; ``None`` where the template refuses it (a system message)."""
    out: list[str | None] = []
    for probe in PROBES:
        try:
            out.append(render(probe))
        except Exception:  # Jinja's raise_exception ("system role not supported"): that probe says no
            out.append(None)
    return out


def match_family(rendered: Sequence[str | None]) -> tuple[ChatFamily, str | None] | None:
    """The family (and its default system prompt) that renders every probe as ``rendered`` does."""
    for family in FAMILIES:
        system = family.default_system(rendered[0]) if rendered[0] is not None else None
        refused = [r is None for r in rendered]
        if any(refused) and not family.no_system:
            continue
        if rendered[0] is None or rendered[2] is None:
            continue
        if all(r is None or r == family.render(p, system) for p, r in zip(PROBES, rendered, strict=True)):
            return family, system
    return None


def translate_chat_template(base: BaseRecord) -> TemplateTranslation:
    """Translate the chat template of ``base``'s tokenizer to Ollama's (see the module docstring)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base.path))
    except Exception as exc:
        raise ClaraError(f"base '{base.name}': its tokenizer cannot be loaded ({first_line(exc)})") from exc
    eos = [tokenizer.eos_token] if getattr(tokenizer, "eos_token", None) else []
    if not getattr(tokenizer, "chat_template", None):
        return TemplateTranslation(
            None, None, None, eos, "the base's tokenizer has no chat template: the Modelfile has no TEMPLATE"
        )
    bos = getattr(tokenizer, "bos_token", None) or ""

    def render(messages: Messages) -> str:
        text = str(tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True))
        # llama.cpp adds the BOS token itself (as transformers' template writes it): leave it out
        return text[len(bos) :] if bos and text.startswith(bos) else text

    found = match_family(render_probes(render))
    if found is None:
        return TemplateTranslation(
            None,
            None,
            None,
            eos,
            "the base's chat template is none of the known families (ChatML, Llama 3, Llama 2, Mistral, clara): "
            "the Modelfile has no TEMPLATE; add one by hand if you chat with the model through Ollama",
        )
    family, system = found
    stops = list(dict.fromkeys([*family.stops, *eos]))
    note = f"chat template: {family.name}"
    if family.no_system:
        note += " (its template takes no system message; Ollama drops them)"
    return TemplateTranslation(family.name, family.template, system, stops, note)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(
    *,
    model_file: str,
    adapter_file: str | None,
    translation: TemplateTranslation,
    header: str = "",
) -> str:
    """The Modelfile; ``model_file`` and ``adapter_file`` are file names beside it."""
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    lines.append(f"FROM ./{model_file}")
    if adapter_file is not None:
        lines.append(f"ADAPTER ./{adapter_file}")
    if translation.template is not None:
        lines.append(f'TEMPLATE """{translation.template}"""')
    if translation.system:
        lines.append(f'SYSTEM """{translation.system}"""')
    for stop in translation.stops:
        if stop and "\n" not in stop:
            lines.append(f"PARAMETER stop {_quote(stop)}")
    return "\n".join(lines) + "\n"


def write_modelfile(dest: Path, **kwargs: Any) -> Path:
    write_text_atomic(dest, modelfile_text(**kwargs))
    return dest


def create_command(name: str, modelfile: str = "Modelfile") -> list[str]:
    return ["ollama", "create", name, "-f", modelfile]


def run_ollama_create(name: str, modelfile: Path) -> str:
    """Run ``ollama create NAME -f Modelfile`` in the Modelfile's folder; one line saying what happened (a
    failure is reported, not raised: the export itself is good and stays)."""
    binary = shutil.which("ollama")
    command = " ".join(create_command(name))
    if binary is None:
        return f"--create: no 'ollama' on PATH; install Ollama and run: {command}"
    try:
        done = subprocess.run(
            [binary, *create_command(name, modelfile.name)[1:]],
            cwd=modelfile.parent,
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return (
            f"--create: '{command}' could not run ({first_line(exc)}); run it yourself in the export folder"
        )
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        return (
            f"--create: '{command}' failed (exit {done.returncode}: {why[-1] if why else 'no output'}); "
            "run it yourself in the export folder"
        )
    return f"Created the Ollama model '{name}' ({command}); try: ollama run {name}"
