"""Base conversion to GGUF: llama.cpp computes what transformers computes, names and row order agree with what
adapters will use, the tokenizer tokenizes identically, bad bases get one clear line, nothing half-written."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from clara_plugin_gguf.base import (
    SUPPORTED_ARCHITECTURES,
    cached_base_gguf,
    check_supported,
    convert_base,
    row_transform,
    tensor_name,
)

from clara_core.plugin_api import BaseRecord, InvalidInput

pytest.importorskip("gguf", reason="the GGUF plugin's tests need the gguf library (pip install gguf)")
pytest.importorskip(
    "llama_cpp", reason="the GGUF plugin's tests need llama-cpp-python (pip install llama-cpp-python)"
)


def _quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[BaseRecord, str], Path]:
    """``converted(base, outtype)``: the base as GGUF, converted once per module."""
    folder = tmp_path_factory.mktemp("converted")
    done: dict[tuple[str, str], Path] = {}

    def get(base: BaseRecord, outtype: str) -> Path:
        key = (base.base_model_hash, outtype)
        if key not in done:
            dest = folder / f"{base.name}-{outtype}.gguf"
            done[key] = convert_base(base, outtype, dest, echo=_quiet, cache_dir=folder / "cache")
        return done[key]

    return get


def _ids(base: BaseRecord, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(str(base.path))(text, add_special_tokens=False)["input_ids"])


@pytest.fixture
def compare(prompts: tuple[str, ...], hf_logits: Callable, gguf_logits: Callable) -> Callable:
    """``compare(base, gguf_path)``: [(transformers logits, llama.cpp logits)] per prompt, last position."""

    def run(base: BaseRecord, path: Path) -> list[tuple[Any, Any]]:
        return [
            (hf_logits(base.path, ids), gguf_logits(path, ids)) for ids in (_ids(base, p) for p in prompts)
        ]

    return run


# -- logits ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["llama_base", "qwen2_base"])
def test_f32_gguf_computes_what_transformers_computes(
    which: str, request: pytest.FixtureRequest, converted: Callable, compare: Callable
) -> None:
    base = request.getfixturevalue(which)
    for expected, got in compare(base, converted(base, "f32")):
        assert abs(expected - got).max() < 1e-4
        assert expected.argmax() == got.argmax()


# -- names and row order (what adapters rely on) ---------------------------------------------------------------


def test_tensor_names_follow_llama_cpp(llama_base: BaseRecord) -> None:
    config = llama_base.config
    assert tensor_name(config, "model.layers.0.self_attn.q_proj") == "blk.0.attn_q"
    assert tensor_name(config, "base_model.model.model.layers.1.mlp.down_proj") == "blk.1.ffn_down"
    assert tensor_name(config, "model.layers.1.self_attn.o_proj.weight") == "blk.1.attn_output"
    assert tensor_name(config, "lm_head") == "output"
    assert tensor_name(config, "model.embed_tokens") == "token_embd"
    with pytest.raises(InvalidInput, match="model.layers.7.self_attn.q_proj"):
        tensor_name(config, "model.layers.7.self_attn.q_proj")  # the tiny base has 2 layers
    with pytest.raises(InvalidInput, match="vision_tower"):
        tensor_name(config, "vision_tower.proj")


def _written(path: Path) -> dict[str, Any]:
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    # GGUFReader gives ggml's shape order; reshape to PyTorch's [out, in]
    return {t.name: np.array(t.data).reshape([int(n) for n in reversed(t.shape)]) for t in reader.tensors}


@pytest.mark.parametrize("which", ["llama_base", "qwen2_base"])
def test_row_transform_is_what_the_conversion_wrote(
    which: str, request: pytest.FixtureRequest, converted: Callable
) -> None:
    import torch
    from safetensors.torch import load_file

    base = request.getfixturevalue(which)
    hf = load_file(str(base.path / "model.safetensors"))
    written = _written(converted(base, "f32"))
    permuted = []
    for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj"):
        hf_module = f"model.layers.1.{module}"
        weight = hf[f"{hf_module}.weight"]
        transform = row_transform(base.config, hf_module)
        expected = transform(weight) if transform else weight
        gguf_weight = torch.from_numpy(written[f"{tensor_name(base.config, hf_module)}.weight"].copy())
        assert torch.equal(gguf_weight, expected)
        if transform is not None:
            permuted.append(module)
            assert not torch.equal(expected, weight)
            lora_b = torch.randn(weight.shape[0], 4)
            assert torch.equal(transform(lora_b) @ torch.ones(4, 3), transform(lora_b @ torch.ones(4, 3)))
    if base.model_type == "llama":
        assert permuted == ["self_attn.q_proj", "self_attn.k_proj"]
    else:
        assert permuted == []
        assert "blk.1.attn_q.bias" in written  # qwen2's biases are carried
        assert "output.weight" not in written  # tied embeddings: llama.cpp reuses token_embd


#: max |logit difference| to transformers (float32) per output type, on the tiny bases (logits ~0.5 in size);
#: measured: f16 ~3e-4, bf16 ~3e-3, q8_0 ~8e-3 (f32: ~2e-7)
TOLERANCE = {"f16": 1e-3, "bf16": 1e-2, "q8_0": 2.5e-2}


@pytest.mark.parametrize("outtype", sorted(TOLERANCE))
@pytest.mark.parametrize("which", ["llama_base", "qwen2_base"])
def test_smaller_types_stay_within_their_tolerance(
    which: str, outtype: str, request: pytest.FixtureRequest, converted: Callable, compare: Callable
) -> None:
    base = request.getfixturevalue(which)
    for expected, got in compare(base, converted(base, outtype)):
        diff = abs(expected - got).max()
        assert diff < TOLERANCE[outtype]
        top2 = sorted(expected)[-2:]
        if top2[1] - top2[0] > 2 * diff:  # a clear winner must stay the winner
            assert expected.argmax() == got.argmax()


def test_merged_deltas_are_added_in_hf_row_order(
    llama_base: BaseRecord, tmp_path: Path, prompts: tuple[str, ...], gguf_logits: Callable
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    generator = torch.Generator().manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(str(llama_base.path), dtype=torch.float32)
    deltas = {}
    for module in (
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.k_proj",
        "model.layers.1.mlp.up_proj",
    ):
        weight = model.get_submodule(module).weight
        deltas[module] = torch.randn(weight.shape, generator=generator) * 0.2
        with torch.no_grad():
            weight += deltas[module]
    path = convert_base(llama_base, "f32", tmp_path / "merged.gguf", deltas=deltas, echo=_quiet)
    for prompt in prompts:
        ids = _ids(llama_base, prompt)
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0, -1].numpy()
        assert abs(expected - gguf_logits(path, ids)).max() < 1e-4

    with pytest.raises(InvalidInput, match="shape"):
        convert_base(
            llama_base, "f32", tmp_path / "bad.gguf", deltas={"lm_head": torch.zeros(2, 2)}, echo=_quiet
        )
    assert not (tmp_path / "bad.gguf").exists()


def test_a_mistral_base_converts_like_llama(
    tiny_llama_dir: Path, tmp_path: Path, make_base: Callable, compare: Callable, converted: Callable
) -> None:
    import json
    import shutil

    folder = shutil.copytree(tiny_llama_dir, tmp_path / "tiny_mistral")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=None)
    (folder / "config.json").write_text(json.dumps(config))
    base = make_base(folder)
    assert row_transform(base.config, "model.layers.0.self_attn.k_proj") is not None
    for expected, got in compare(base, converted(base, "f32")):
        assert abs(expected - got).max() < 1e-4


# -- tokenizer -----------------------------------------------------------------------------------------------


def _llama_cpp_ids_of(base: BaseRecord, texts: list[str], tmp_path: Path) -> tuple[list, list]:
    from clara_plugin_gguf.vocab import (
        hf_token_ids,
        hf_tokenizer,
        llama_cpp_token_ids,
        read_vocabulary,
        write_vocab_only,
    )

    vocabulary = read_vocabulary(base, echo=_quiet)
    path = write_vocab_only(tmp_path / "vocab.gguf", vocabulary)
    return hf_token_ids(hf_tokenizer(base.path), texts), llama_cpp_token_ids(path, texts)


def test_the_demo_tokenizer_tokenizes_identically_in_llama_cpp(
    demo_base_dir: Path, make_base: Callable, tmp_path: Path
) -> None:
    from clara_plugin_gguf.vocab import PROBE_TEXTS, read_vocabulary

    from clara_core.demo import DEMO_DEV, DEMO_QA

    base = make_base(demo_base_dir)
    lines: list[str] = []
    echo = lines.append
    assert (
        read_vocabulary(base, echo=echo).pre == "gpt-2"
    )  # llama.cpp does not know the demo tokenizer by name
    assert lines == ["tokenizer: llama.cpp pre-tokenizer 'gpt-2' tokenizes like the base's"]
    # texts the choice was not made on: every demo question and answer, and a chat-formatted turn
    texts = [
        text for table in (DEMO_QA, DEMO_DEV) for pairs in table.values() for pair in pairs for text in pair
    ]
    texts += ["<|user|>\nWer setzt die Steuer fest?</s>\n<|assistant|>\n", *PROBE_TEXTS]
    expected, got = _llama_cpp_ids_of(base, texts, tmp_path)
    assert got == expected


def test_a_qwen2_tokenizer_gets_the_qwen2_pre_tokenizer(qwen2_base: BaseRecord) -> None:
    from clara_plugin_gguf.vocab import read_vocabulary

    # transformers gives a qwen2 base Qwen2's split pattern (digits one by one), whatever tokenizer.json says
    assert read_vocabulary(qwen2_base, echo=_quiet).pre == "qwen2"


def test_a_tokenizer_no_llama_cpp_pre_tokenizer_matches_is_refused(
    tiny_llama_dir: Path, tmp_path: Path, make_base: Callable
) -> None:
    import json
    import shutil

    folder = shutil.copytree(tiny_llama_dir, tmp_path / "odd_tokenizer")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {  # every 'e' on its own: no regex llama.cpp knows does that
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"String": "e"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(InvalidInput) as error:
        convert_base(make_base(folder), "f32", tmp_path / "odd.gguf", echo=_quiet)
    message = str(error.value)
    assert "\n" not in message
    assert "odd_tokenizer" in message and "gpt-2, llama-bpe, qwen2, default" in message
    assert not (tmp_path / "odd.gguf").exists()


def _spm_style_tokenizer(folder: Path, n_vocab: int) -> None:
    """Replace ``folder``'s tokenizer with one laid out like Llama 2's tokenizer.json: BPE with byte fallback
    over '▁'-marked words, the '▁' prefix added by the normalizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from clara_core.demo import demo_texts

    trainer = trainers.BpeTrainer(vocab_size=110, show_progress=False)
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained.train_from_iterator(demo_texts(), trainer)
    learned = trained.get_vocab()
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token, _ in sorted(learned.items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    assert len(vocab) <= n_vocab
    merges = [tuple(m) for m in json.loads(trained.to_str())["model"]["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    wrapped.save_pretrained(folder)


def test_a_sentencepiece_style_tokenizer_tokenizes_identically(
    tiny_llama_dir: Path, tmp_path: Path, make_base: Callable, compare: Callable
) -> None:
    import shutil

    from gguf import GGUFReader

    folder = shutil.copytree(tiny_llama_dir, tmp_path / "spm_llama")
    _spm_style_tokenizer(folder, json.loads((folder / "config.json").read_text())["vocab_size"])
    base = make_base(folder)
    path = convert_base(base, "f32", tmp_path / "spm.gguf", echo=_quiet)
    fields = GGUFReader(str(path)).fields
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    expected, got = _llama_cpp_ids_of(base, ["Grüße aus Köln 🙂 §§ 1–4", *PROMPTS_EXTRA], tmp_path)
    assert got == expected
    assert any(len(ids) > 0 for ids in got)
    for hf, gguf in compare(base, path):
        assert abs(hf - gguf).max() < 1e-4


PROMPTS_EXTRA = ["Das Finanzamt setzt die Einkommensteuer fest.", "  zwei  Leerzeichen\nund Zeilen"]


# -- bad bases -----------------------------------------------------------------------------------------------


def test_an_unsupported_architecture_is_named_with_the_supported_ones(
    llama_base: BaseRecord, tmp_path: Path
) -> None:
    import attrs

    gpt2 = attrs.evolve(llama_base, model_type="gpt2", config={**llama_base.config, "model_type": "gpt2"})
    for call in (lambda: check_supported(gpt2), lambda: convert_base(gpt2, "f32", tmp_path / "x.gguf")):
        with pytest.raises(InvalidInput) as error:
            call()
        message = str(error.value)
        assert "'gpt2'" in message and ", ".join(sorted(SUPPORTED_ARCHITECTURES)) in message
        assert "llama, mistral, qwen2" in message and "\n" not in message
    assert not (tmp_path / "x.gguf").exists()


def test_a_base_without_tokenizer_is_refused(
    tiny_llama_dir: Path, tmp_path: Path, make_base: Callable
) -> None:
    import shutil

    folder = tmp_path / "no_tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(tiny_llama_dir / name, folder / name)
    base = make_base(folder)
    with pytest.raises(InvalidInput, match=r"has no tokenizer \(tokenizer.json or tokenizer.model\)"):
        check_supported(base)
    with pytest.raises(InvalidInput, match="no tokenizer"):
        cached_base_gguf(base, "f32", tmp_path / "cache", echo=_quiet)
    assert not list((tmp_path / "cache").rglob("*.gguf"))


def test_an_unknown_outtype_is_refused(llama_base: BaseRecord, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="'q4_k'.*f32, f16, q8_0, bf16"):
        convert_base(llama_base, "q4_k", tmp_path / "x.gguf", echo=_quiet)


# -- cache and atomic writes ---------------------------------------------------------------------------------


def test_the_cached_base_is_converted_once(
    llama_base: BaseRecord, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clara_plugin_gguf import vocab

    lines: list[str] = []
    first = cached_base_gguf(llama_base, "f16", tmp_path, echo=lines.append)
    assert first == tmp_path / "gguf" / f"base-{llama_base.base_model_hash[:12]}-f16.gguf"
    assert any("tensors" in line for line in lines) and lines[-1].startswith(f"wrote {first}")
    before = first.stat()

    def no_probe(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("probed the tokenizer again")

    monkeypatch.setattr(vocab, "choose_variant", no_probe)
    again: list[str] = []
    assert cached_base_gguf(llama_base, "f16", tmp_path, echo=again.append) == first
    after = first.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns) and again == []
    # another output type is a new conversion, and the tokenizer decision comes from the cache
    other = cached_base_gguf(llama_base, "q8_0", tmp_path, echo=_quiet)
    assert other.name.endswith("-q8_0.gguf") and other.is_file()
    assert [p.name for p in (tmp_path / "gguf").glob("*.partial")] == []


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, OSError])
def test_an_interrupted_conversion_leaves_nothing_in_place(
    llama_base: BaseRecord, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interruption: type[BaseException]
) -> None:
    from clara_plugin_gguf import base as base_module

    real_encode = base_module._encode
    calls = []

    def failing_encode(array: Any, qtype: Any) -> Any:
        calls.append(1)
        if len(calls) == 5:
            raise interruption("interrupted mid-way")
        return real_encode(array, qtype)

    monkeypatch.setattr(base_module, "_encode", failing_encode)
    dest = tmp_path / "gguf" / "base.gguf"
    with pytest.raises(interruption):
        convert_base(llama_base, "f32", dest, echo=_quiet)
    assert len(calls) == 5
    assert list(dest.parent.iterdir()) == []
    calls.clear()
    with pytest.raises(interruption):
        cached_base_gguf(llama_base, "f32", tmp_path / "cache", echo=_quiet)
    assert not list((tmp_path / "cache").rglob("*.gguf")) and not list(
        (tmp_path / "cache").rglob("*.partial")
    )


def _fields(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    return {name: field.contents() for name, field in GGUFReader(str(path)).fields.items()}


def test_the_gguf_carries_the_tokenizer_and_model_metadata(
    llama_base: BaseRecord, converted: Callable
) -> None:
    from transformers import AutoTokenizer

    from clara_core.tinymodels import CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(str(llama_base.path))
    fields = _fields(converted(llama_base, "q8_0"))
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == 7
    assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count_kv"] == 2
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"][:3] == ["<pad>", "<s>", "</s>"]
    assert fields["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 3]  # special tokens are control tokens
    assert len(fields["tokenizer.ggml.merges"]) == len(
        json.loads((llama_base.path / "tokenizer.json").read_text())["model"]["merges"]
    )
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False  # the tokenizer adds no bos, nor must llama.cpp
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert fields["clara.base_model_hash"] == llama_base.base_model_hash


def test_llama3_rotary_scaling_is_carried(
    tiny_llama_dir: Path,
    tmp_path: Path,
    make_base: Callable,
    converted: Callable,
    compare: Callable,
    llama_base: BaseRecord,
) -> None:
    import shutil

    folder = shutil.copytree(tiny_llama_dir, tmp_path / "tiny_llama31")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    (folder / "config.json").write_text(json.dumps(config))
    base = make_base(folder)
    path = converted(base, "f32")
    assert "rope_freqs.weight" in _written(path)
    scaled = compare(base, path)
    for expected, got in scaled:
        assert abs(expected - got).max() < 1e-4
    # the scaling changes the logits: without rope_freqs the comparison above would fail
    plain = compare(llama_base, converted(llama_base, "f32"))
    assert max(abs(a[0] - b[0]).max() for a, b in zip(scaled, plain, strict=True)) > 1e-3


def test_concurrent_callers_convert_the_cached_base_once(
    llama_base: BaseRecord, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from clara_plugin_gguf import base as base_module

    real_convert = base_module.convert_base
    conversions = []

    def counting_convert(*args: Any, **kwargs: Any) -> Path:
        conversions.append(1)
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(base_module, "convert_base", counting_convert)
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(cached_base_gguf(llama_base, "f32", tmp_path, echo=_quiet))
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and len(set(results)) == 1 and results[0].is_file()
    assert conversions == [1]


def test_missing_llama_cpp_is_one_line_with_the_install_command(
    llama_base: BaseRecord, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    with pytest.raises(InvalidInput, match="pip install llama-cpp-python"):
        convert_base(llama_base, "f32", tmp_path / "x.gguf", echo=_quiet)
    assert not (tmp_path / "x.gguf").exists()


def test_a_sharded_bf16_llama_with_biases_converts(
    tiny_llama_dir: Path, tmp_path: Path, make_base: Callable, compare: Callable
) -> None:
    import shutil

    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    folder = tmp_path / "biased_llama"
    config = AutoConfig.from_pretrained(str(tiny_llama_dir))
    config.attention_bias = True
    config.mlp_bias = True
    torch.manual_seed(5)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape) * 0.05)
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="200KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_llama_dir / name, folder / name)
    assert (folder / "model.safetensors.index.json").is_file()
    base = make_base(folder)
    path = convert_base(base, "f32", tmp_path / "biased.gguf", echo=_quiet)
    written = _written(path)
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.ffn_down.bias"} <= set(written)
    for expected, got in compare(base, path):
        assert abs(expected - got).max() < 1e-4


def test_unreadable_weights_are_one_line(tiny_llama_dir: Path, tmp_path: Path, make_base: Callable) -> None:
    import shutil

    folder = shutil.copytree(tiny_llama_dir, tmp_path / "broken")
    base = make_base(folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(InvalidInput, match=r"model.safetensors: unreadable safetensors weights"):
        convert_base(base, "f32", tmp_path / "broken.gguf", echo=_quiet)
    assert not (tmp_path / "broken.gguf").exists()


def test_a_delta_on_a_tied_lm_head_unties_it(
    qwen2_base: BaseRecord, tmp_path: Path, prompts: tuple[str, ...], gguf_logits: Callable
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(qwen2_base.path), dtype=torch.float32)
    embed = model.get_input_embeddings().weight
    delta = torch.randn(embed.shape, generator=torch.Generator().manual_seed(4)) * 0.05
    model.lm_head.weight = torch.nn.Parameter(embed.detach().clone() + delta)  # untied: embeddings unchanged
    path = convert_base(qwen2_base, "f32", tmp_path / "untied.gguf", deltas={"lm_head": delta}, echo=_quiet)
    assert "output.weight" in _written(path)
    for prompt in prompts:
        ids = _ids(qwen2_base, prompt)
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0, -1].numpy()
        assert abs(expected - gguf_logits(path, ids)).max() < 1e-4


def test_a_sentencepiece_tokenizer_without_byte_tokens_is_refused(
    tiny_llama_dir: Path, tmp_path: Path, make_base: Callable
) -> None:
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from clara_core.demo import demo_texts

    folder = shutil.copytree(tiny_llama_dir, tmp_path / "unigram")
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>", show_progress=False
    )
    tokenizer.train_from_iterator(demo_texts(), trainer)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(folder)
    with pytest.raises(InvalidInput, match=r"without the 256 byte tokens"):
        convert_base(make_base(folder), "f32", tmp_path / "unigram.gguf", echo=_quiet)
    assert not (tmp_path / "unigram.gguf").exists()


def test_a_vocabulary_that_aborts_llama_cpp_does_not_take_clara_down(
    llama_base: BaseRecord, tmp_path: Path
) -> None:
    from clara_plugin_gguf.vocab import BYTE, NORMAL, Vocabulary, _Prober, build_vocabulary, write_vocab_only

    # a SentencePiece vocabulary without byte tokens: llama.cpp aborts on a character it cannot place
    crashing = Vocabulary(
        model="llama", tokens=["<unk>", "▁a", "a"], token_types=[2, NORMAL, NORMAL], scores=[0.0, -1.0, -2.0]
    )
    assert BYTE not in crashing.token_types
    good = build_vocabulary(llama_base).with_variant("gpt-2", None)
    texts = ["a ü 🙂"]
    with _Prober(texts) as prober:
        assert prober.token_ids(write_vocab_only(tmp_path / "crash.gguf", crashing)) == "llama.cpp aborted"
        ids = prober.token_ids(write_vocab_only(tmp_path / "good.gguf", good))
    assert isinstance(ids, list) and len(ids[0]) > 0
