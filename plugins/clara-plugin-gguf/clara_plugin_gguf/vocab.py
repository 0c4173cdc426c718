"""A base's tokenizer as GGUF metadata, checked to tokenize in llama.cpp exactly as in transformers.

Two vocabulary kinds, named as llama.cpp names them in ``tokenizer.ggml.model``:

- ``gpt2``: byte-level BPE (``tokenizer.json`` with merges). llama.cpp does not read the pre-tokenizer (the
  regular expressions that split text before BPE) from the file; it knows a fixed set by name
  (``tokenizer.ggml.pre``: ``gpt-2``, ``llama-bpe``, ``qwen2``, ``default``, ...). clara writes the name under
  which llama.cpp tokenizes identically to the Hugging Face tokenizer, found by trying candidates on
  :data:`PROBE_TEXTS` (German with umlauts, ß and §, digits, punctuation, whitespace runs, newlines, emoji) and
  refuses with one line naming what it tried where none matches.
- ``llama``: SentencePiece-style vocabularies (``tokenizer.model``, or a ``tokenizer.json`` with a Metaspace
  pre-tokenizer, Unigram, or BPE with byte fallback) with token scores; checked the same way (with and
  without the leading-space prefix).

Special tokens (bos/eos/unk/pad/sep ids, whether bos/eos are added) come from what the Hugging Face tokenizer
does, the chat template from ``tokenizer_config.json`` or ``chat_template.jinja``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from clara_core.plugin_api import BaseRecord, InvalidInput, first_line, write_json_atomic

#: Texts on which llama.cpp's tokenization must equal the Hugging Face tokenizer's.
PROBE_TEXTS: tuple[str, ...] = (
    "Der Bescheid ist schriftlich zu begründen.",
    "Grüße aus Köln: Äpfel, Öl und Übermaß; STRASSE, Straße, ẞ.",
    "§ 12 Abs. 3 Satz 1 EStG, §§ 1–4 SGB II und Art. 20a GG",
    "Die Frist beträgt 1 Monat; 2024 wurden 1.234.567,89 € gezahlt (19 %).",
    "1 12 123 1234 12345 123456 1234567 3.14 3..3 0,5 -7 +49 30 1234-567",
    "  zwei  Leerzeichen   drei    vier\tTab\t\tzwei Tabs \t gemischt   ",
    "Zeile eins\nZeile zwei\n\n\nnach drei Umbrüchen\r\nWindows\n \n  \n",
    "Emoji: 🙂👍🏽 🇩🇪 ✅ und 🦙🦙 sowie 😶\u200d🌫️!",
    "Fragen?! Ja!!! Nein... (vielleicht) [sicher] {nie} \"Zitat\" 'einfach' «Guillemets» „deutsch“ — Ende",
    "I've been told he's there, they'll go, we'd say, you're sure? I'M NOT, I'D SAY, WE'VE",
    "x = a+b*c; if (x >= 10) { return -1; } // Kommentar ``` ''' \"\"\" ------ ====== ......",
    "中文 日本語 한국어 русский язык ελληνικά العربية हिन्दी",
    " führendes Leerzeichen",
    "Ende ohne Punkt",
)

#: llama.cpp pre-tokenizer names to try for a byte-level BPE tokenizer, one per distinct behaviour, the
#: common ones first (llama.cpp's ``llama-vocab.cpp`` lists what each name means).
PRE_TOKENIZER_CANDIDATES: tuple[str, ...] = (
    "gpt-2",
    "llama-bpe",
    "qwen2",
    "default",
    "deepseek-llm",
    "deepseek-coder",
    "deepseek-v3",
    "falcon",
    "mpt",
    "starcoder",
    "refact",
    "command-r",
    "stablelm2",
    "olmo",
    "dbrx",
    "smaug-bpe",
    "poro-chat",
    "viking",
    "jais",
    "tekken",
    "smollm",
    "codeshell",
    "bloom",
    "gpt3-finnish",
    "exaone",
    "chameleon",
    "minerva-7b",
    "gpt-4o",
    "superbpe",
    "trillion",
    "bailingmoe",
    "seed-coder",
)

# GGUF token types (llama.cpp's LLAMA_TOKEN_TYPE_*).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")

Echo = Callable[[str], None]


class Vocabulary:
    """Everything the GGUF file says about the tokenizer (keys ``tokenizer.ggml.*`` and
    ``tokenizer.chat_template``)."""

    def __init__(
        self,
        *,
        model: str,
        tokens: list[str],
        token_types: list[int],
        scores: list[float] | None = None,
        merges: list[str] | None = None,
        special_ids: dict[str, int] | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        chat_template: str | list[dict[str, str]] | None = None,
        pre: str | None = None,
        add_space_prefix: bool | None = None,
    ) -> None:
        self.model = model
        self.tokens = tokens
        self.token_types = token_types
        self.scores = scores
        self.merges = merges or []
        self.special_ids = special_ids or {}
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.chat_template = chat_template
        self.pre = pre
        self.add_space_prefix = add_space_prefix

    def with_variant(self, pre: str | None, add_space_prefix: bool | None) -> Vocabulary:
        copy = Vocabulary(**{k: v for k, v in vars(self).items()})
        copy.pre, copy.add_space_prefix = pre, add_space_prefix
        return copy

    def add_to(self, writer: Any) -> None:
        """Write the ``tokenizer.*`` keys to a ``gguf.GGUFWriter``."""
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre or "default")
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


# -- reading the Hugging Face tokenizer ----------------------------------------------------------------------


def hf_tokenizer(path: Path) -> Any:
    """The base's transformers tokenizer (fast), loaded from ``path`` only."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise InvalidInput(f"{path}: the tokenizer does not load ({first_line(exc)})") from exc


def _mentions(node: Any, type_name: str) -> bool:
    if isinstance(node, dict):
        return node.get("type") == type_name or any(_mentions(v, type_name) for v in node.values())
    if isinstance(node, list):
        return any(_mentions(v, type_name) for v in node)
    return False


def _find(node: Any, type_name: str) -> dict | None:
    if isinstance(node, dict):
        if node.get("type") == type_name:
            return node
        for value in node.values():
            if (found := _find(value, type_name)) is not None:
                return found
    if isinstance(node, list):
        for value in node:
            if (found := _find(value, type_name)) is not None:
                return found
    return None


def _merge_strings(merges: Sequence[Any], path: Path) -> list[str]:
    out = []
    for merge in merges:
        if isinstance(merge, str):
            out.append(merge)
            continue
        left, right = merge
        if " " in left or " " in right:
            raise InvalidInput(
                f"{path}: a BPE merge contains a space ({left!r} + {right!r}); llama.cpp cannot read it"
            )
        out.append(f"{left} {right}")
    return out


def _special_ids(tokenizer: Any, n_vocab: int) -> dict[str, int]:
    ids = {}
    for kind in ("bos", "eos", "unk", "pad", "sep", "mask"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < n_vocab:
            ids[kind] = token_id
    return ids


def _adds_special(tokenizer: Any) -> tuple[bool, bool]:
    """Whether the tokenizer puts bos in front / eos at the end when asked to add special tokens."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos and (not plain or plain[0] != bos)
    add_eos = (
        eos is not None and len(full) > len(plain) and full[-1] == eos and (not plain or plain[-1] != eos)
    )
    return bool(add_bos), bool(add_eos)


def _chat_template(tokenizer: Any, path: Path) -> str | list[dict[str, str]] | None:
    template = getattr(tokenizer, "chat_template", None)
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, dict):
        return [{"name": name, "template": text} for name, text in template.items()]
    return template if isinstance(template, str) and template else None


def _token_table(tokenizer: Any, n_vocab: int, path: Path) -> tuple[list[str], list[int], dict[int, Any]]:
    vocab: dict[str, int] = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= n_vocab:
        raise InvalidInput(
            f"{path}: the tokenizer has token id {max(vocab.values())} but the model only {n_vocab} embeddings "
            "(config.json vocab_size); the tokenizer does not belong to these weights"
        )
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for text, token_id in vocab.items():
        tokens[token_id] = text
        types[token_id] = NORMAL
    added = dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    for token_id, token in added.items():
        if 0 <= token_id < n_vocab:
            tokens[token_id] = str(token.content if hasattr(token, "content") else token)
            types[token_id] = CONTROL if getattr(token, "special", False) else USER_DEFINED
    return tokens, types, added


def _bpe_vocabulary(tokenizer: Any, spec: dict, n_vocab: int, path: Path) -> Vocabulary:
    tokens, types, _ = _token_table(tokenizer, n_vocab, path)
    return Vocabulary(
        model="gpt2",
        tokens=tokens,
        token_types=types,
        merges=_merge_strings(spec["model"].get("merges") or [], path),
    )


def _spm_vocabulary(tokenizer: Any, spec: dict, n_vocab: int, path: Path) -> Vocabulary:
    tokens, types, added = _token_table(tokenizer, n_vocab, path)
    model = spec["model"]
    scores = [0.0] * n_vocab
    if model["type"] == "Unigram":
        for token_id, (_piece, score) in enumerate(model.get("vocab") or []):
            if token_id < n_vocab:
                scores[token_id] = float(score)
    else:
        # SentencePiece merges the highest-scoring pair first; the BPE merge rank gives that order.
        index = tokenizer.get_vocab()
        merged_score: dict[int, float] = {}
        for rank, merge in enumerate(_merge_strings(model.get("merges") or [], path)):
            left, right = merge.split(" ", 1)
            token_id = index.get(left + right)
            if token_id is not None and token_id not in merged_score:
                merged_score[token_id] = -float(rank)
        floor = -float(len(merged_score) + 1)
        for token_id in range(n_vocab):
            if token_id in merged_score:
                scores[token_id] = merged_score[token_id]
            elif len(tokens[token_id]) > 1 and token_id not in added:
                scores[token_id] = floor
    if (path / "tokenizer.model").is_file():
        scores = _sentencepiece_scores(path / "tokenizer.model", n_vocab) or scores
    unk = tokenizer.unk_token_id
    for token_id, text in enumerate(tokens):
        if types[token_id] != NORMAL:
            continue
        if _BYTE_TOKEN.match(text):
            types[token_id] = BYTE
        elif token_id == unk:
            types[token_id] = UNKNOWN
    if isinstance(unk, int) and 0 <= unk < n_vocab:
        types[unk] = UNKNOWN
    return Vocabulary(model="llama", tokens=tokens, token_types=types, scores=scores, pre="default")


def _sentencepiece_scores(model_file: Path, n_vocab: int) -> list[float] | None:
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        return None
    processor = SentencePieceProcessor()
    processor.LoadFromFile(str(model_file))
    scores = [0.0] * n_vocab
    for token_id in range(min(n_vocab, processor.vocab_size())):
        scores[token_id] = float(processor.GetScore(token_id))
    return scores


def _prefix_space(spec: dict) -> bool:
    """Whether a SentencePiece-style tokenizer.json puts '▁' in front of the text."""
    meta = _find(spec.get("pre_tokenizer"), "Metaspace")
    if meta is not None:
        if "prepend_scheme" in meta:
            return meta["prepend_scheme"] != "never"
        return bool(meta.get("add_prefix_space", True))
    prepend = _find(spec.get("normalizer"), "Prepend")
    return prepend is not None


def build_vocabulary(base: BaseRecord) -> Vocabulary:
    """The base's vocabulary as GGUF metadata, before the llama.cpp pre-tokenizer is chosen (``pre`` is
    ``None`` for byte-level BPE; :func:`read_vocabulary` chooses it)."""
    path = base.path
    spec_file = path / "tokenizer.json"
    if not spec_file.is_file():
        if (path / "tokenizer.model").is_file():
            raise InvalidInput(
                f"{path}: only a SentencePiece tokenizer.model, no tokenizer.json; save the fast tokenizer "
                "first (AutoTokenizer.from_pretrained(PATH).save_pretrained(PATH))"
            )
        raise InvalidInput(
            f"base '{base.name}' ({path}) has no tokenizer (tokenizer.json or tokenizer.model)"
        )
    spec = json.loads(spec_file.read_text(encoding="utf-8"))
    tokenizer = hf_tokenizer(path)
    n_vocab = int(base.config.get("vocab_size") or len(tokenizer))
    kind = (spec.get("model") or {}).get("type")
    byte_level = _mentions(spec.get("pre_tokenizer"), "ByteLevel") or _mentions(
        spec.get("decoder"), "ByteLevel"
    )
    if kind == "BPE" and byte_level:
        vocabulary = _bpe_vocabulary(tokenizer, spec, n_vocab, path)
    elif kind in ("BPE", "Unigram"):
        vocabulary = _spm_vocabulary(tokenizer, spec, n_vocab, path)
        vocabulary.add_space_prefix = _prefix_space(spec)
        if vocabulary.token_types.count(BYTE) < 256:
            raise InvalidInput(
                f"{spec_file}: a SentencePiece-style tokenizer without the 256 byte tokens (<0x00>...<0xFF>); "
                "llama.cpp needs them for characters outside the vocabulary, so it cannot be exported to GGUF"
            )
    else:
        raise InvalidInput(
            f"{spec_file}: a {kind or 'unknown'} tokenizer; clara exports byte-level BPE and SentencePiece-style "
            "tokenizers to GGUF"
        )
    vocabulary.special_ids = _special_ids(tokenizer, n_vocab)
    vocabulary.add_bos, vocabulary.add_eos = _adds_special(tokenizer)
    vocabulary.chat_template = _chat_template(tokenizer, path)
    return vocabulary


# -- checking it in llama.cpp --------------------------------------------------------------------------------

_BACKEND_READY = False


def llama_cpp_token_ids(gguf_path: Path, texts: Iterable[str]) -> list[list[int]]:
    """Token ids llama.cpp gives ``texts`` with the vocabulary of ``gguf_path`` (loaded vocab-only, no special
    tokens added, special-token text parsed as in transformers)."""
    global _BACKEND_READY
    llama_cpp = require_llama_cpp()
    from llama_cpp import _internals

    if not _BACKEND_READY:
        llama_cpp.llama_backend_init()
        _BACKEND_READY = True
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = _internals.LlamaModel(path_model=str(gguf_path), params=params, verbose=False)
    try:
        return [model.tokenize(text.encode("utf-8"), False, True) if text else [] for text in texts]
    finally:
        model.close()


def hf_token_ids(tokenizer: Any, texts: Iterable[str]) -> list[list[int]]:
    """Token ids the Hugging Face tokenizer gives ``texts`` (no special tokens added)."""
    return [list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]


def write_vocab_only(path: Path, vocabulary: Vocabulary) -> Path:
    """A vocabulary-only GGUF for checking the tokenizer in llama.cpp: ``vocabulary`` and no weights, with the
    smallest Llama hyper-parameters llama.cpp needs to open such a file (it reads them, never uses them)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(4096)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(1)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(len(vocabulary.tokens))
    vocabulary.add_to(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def _variants(vocabulary: Vocabulary, model_type: str) -> list[tuple[str | None, bool | None]]:
    if vocabulary.model == "llama":
        first = bool(vocabulary.add_space_prefix)
        return [("default", first), ("default", not first)]
    order = list(PRE_TOKENIZER_CANDIDATES)
    hint = {"qwen2": "qwen2"}.get(model_type)
    if hint:
        order.remove(hint)
        order.insert(0, hint)
    return [(name, None) for name in order]


def _describe(variant: tuple[str | None, bool | None], model: str) -> str:
    pre, prefix = variant
    if model == "llama":
        return f"sentencepiece {'with' if prefix else 'without'} space prefix"
    return str(pre)


def _texts_digest() -> str:
    return hashlib.sha256(json.dumps(PROBE_TEXTS, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def _cache_file(base: BaseRecord, cache_dir: Path | None) -> Path | None:
    if cache_dir is None or not base.tokenizer_hash:
        return None
    return Path(cache_dir) / "gguf" / f"tokenizer-{base.tokenizer_hash[:16]}.json"


def require_llama_cpp() -> Any:
    """The ``llama_cpp`` module, or :class:`InvalidInput` with the install line where it cannot be imported."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise InvalidInput(
            "checking the tokenizer in llama.cpp needs llama-cpp-python, which cannot be imported here "
            f"({first_line(exc)}); pip install llama-cpp-python"
        ) from exc
    return llama_cpp


def _llama_cpp_version() -> str:
    return str(getattr(require_llama_cpp(), "__version__", "unknown"))


def read_vocabulary(base: BaseRecord, *, cache_dir: Path | None = None, echo: Echo = print) -> Vocabulary:
    """The base's vocabulary for the GGUF file, with the llama.cpp tokenizer settings under which llama.cpp
    tokenizes :data:`PROBE_TEXTS` exactly like the Hugging Face tokenizer.

    The decision is cached in ``cache_dir/gguf/tokenizer-<tokenizer_hash16>.json`` (per llama-cpp-python
    version and probe texts), so it is probed once per tokenizer. Raises :class:`InvalidInput` naming every
    candidate tried where none tokenizes identically."""
    vocabulary = build_vocabulary(base)
    cache = _cache_file(base, cache_dir)
    version = _llama_cpp_version()
    if cache is not None and cache.is_file():
        try:
            saved = json.loads(cache.read_text(encoding="utf-8"))
        except ValueError:
            saved = {}
        if saved.get("llama_cpp") == version and saved.get("texts") == _texts_digest():
            return vocabulary.with_variant(saved.get("pre"), saved.get("add_space_prefix"))
    chosen = choose_variant(base, vocabulary, echo=echo)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            cache,
            {
                "llama_cpp": version,
                "texts": _texts_digest(),
                "pre": chosen.pre,
                "add_space_prefix": chosen.add_space_prefix,
            },
        )
    return chosen


def choose_variant(base: BaseRecord, vocabulary: Vocabulary, *, echo: Echo = print) -> Vocabulary:
    """Try each llama.cpp pre-tokenizer (or space-prefix setting) in turn; the first under which llama.cpp
    tokenizes every probe text like transformers wins.

    llama.cpp runs in a child process (:class:`_Prober`): a vocabulary it cannot handle may abort the process
    that loads it, and that must not be clara's."""
    require_llama_cpp()
    tokenizer = hf_tokenizer(base.path)
    expected = hf_token_ids(tokenizer, PROBE_TEXTS)
    tried = []
    with tempfile.TemporaryDirectory(prefix="clara-gguf-vocab-") as folder, _Prober(PROBE_TEXTS) as prober:
        for i, variant in enumerate(_variants(vocabulary, str(base.config.get("model_type") or ""))):
            candidate = vocabulary.with_variant(*variant)
            tried.append(_describe(variant, vocabulary.model))
            probe = write_vocab_only(Path(folder) / f"vocab-{i}.gguf", candidate)
            got = prober.token_ids(probe)
            if isinstance(got, str):
                tried[-1] += f" ({got})"  # e.g. a name this llama.cpp does not know
                continue
            if got == expected:
                if vocabulary.model == "gpt2":
                    echo(f"tokenizer: llama.cpp pre-tokenizer '{candidate.pre}' tokenizes like the base's")
                return candidate
    raise InvalidInput(
        f"base '{base.name}': llama.cpp tokenizes its tokenizer differently from transformers under every "
        f"setting tried ({', '.join(tried)}); it cannot be exported to GGUF faithfully"
    )


_PROBE_CHILD = """
import json, os, sys
from pathlib import Path
replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
os.dup2(2, 1)  # whatever llama.cpp prints must not mix with the replies
from clara_plugin_gguf.vocab import llama_cpp_token_ids
texts = json.loads(sys.stdin.readline())
for line in sys.stdin:
    try:
        reply = {"ids": llama_cpp_token_ids(Path(line.rstrip("\\n")), texts)}
    except Exception as exc:
        reply = {"error": "does not load"}
    replies.write(json.dumps(reply) + "\\n")
    replies.flush()
"""


class _Prober:
    """Tokenizes the probe texts with candidate vocab-only GGUFs in a child process, restarted when a
    candidate makes llama.cpp abort."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = list(texts)
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> _Prober:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop()

    def _start(self) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-c", _PROBE_CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
        )
        assert process.stdin is not None
        process.stdin.write(json.dumps(self.texts) + "\n")
        process.stdin.flush()
        return process

    def _stop(self) -> None:
        if self.process is not None:
            if self.process.stdin is not None:
                with contextlib.suppress(OSError):
                    self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def token_ids(self, gguf_path: Path) -> list[list[int]] | str:
        """The token ids per probe text, or why there are none (a short phrase)."""
        if self.process is None:
            self.process = self._start()
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write(f"{gguf_path}\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except OSError:
            line = ""
        if not line:
            self._stop()
            return "llama.cpp aborted"
        reply = json.loads(line)
        return reply["ids"] if "ids" in reply else str(reply["error"])
