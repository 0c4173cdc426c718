"""Small Llama-architecture models with locally trained tokenizers, built offline.

Used by ``clara base create-demo`` / ``clara quickstart`` (a fresh machine has no model hub) and by the tests,
which need real models that train, serve and merge in seconds on a CPU. torch, transformers and tokenizers are
imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

#: A minimal chat template; roles become special tokens, turns end with the eos token.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_FALLBACK_TEXT = (
    "Die Verwaltung entscheidet über den Antrag. Das Finanzamt setzt die Steuer fest. "
    "Der Bescheid ist schriftlich zu begründen. Gegen den Bescheid ist der Widerspruch zulässig. "
    "Leistungen nach diesem Buch erhalten erwerbsfähige Leistungsberechtigte. "
)


def build_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = 512) -> Any:
    """Train a byte-level BPE tokenizer on ``texts`` and save it (with a chat template) to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts) or [_FALLBACK_TEXT], trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        model_max_length=4096,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    return wrapped


def build_llama(
    out_dir: Path,
    *,
    texts: Iterable[str] = (),
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_positions: int = 512,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised Llama model and its tokenizer (safetensors) to ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(texts, out_dir, vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _save_random_model(LlamaForCausalLM, config, tokenizer, out_dir, seed)


def build_qwen2(
    out_dir: Path,
    *,
    texts: Iterable[str] = (),
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_positions: int = 512,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> Path:
    """Like :func:`build_llama`, a Qwen2 model (biases on q/k/v, NeoX rotary order, tied embeddings as in the
    small Qwen2 models), for tests that need a second architecture."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(texts, out_dir, vocab_size=vocab_size)
    # transformers loads a qwen2 base's tokenizer as Qwen2Tokenizer, whose unk token is <|endoftext|>
    tokenizer.add_tokens(["<|endoftext|>"], special_tokens=True)
    tokenizer.save_pretrained(out_dir)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _save_random_model(Qwen2ForCausalLM, config, tokenizer, out_dir, seed)


def _save_random_model(model_class: Any, config: Any, tokenizer: Any, out_dir: Path, seed: int) -> Path:
    import torch
    from transformers import GenerationConfig

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = model_class(config)
    finally:
        torch.random.set_rng_state(generator_state)
    biases = [param for name, param in model.named_parameters() if name.endswith(".bias")]
    if biases:  # transformers starts biases at zero; random ones let a test notice a misplaced bias
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in biases:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def random_lora_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    use_dora: bool = False,
    use_rslora: bool = False,
    target_modules: list[str] | None = None,
    scale: float = 0.5,
) -> Path:
    """A PEFT LoRA (or DoRA) adapter for ``base_dir`` with random, non-zero A and B (for tests that need an
    adapter that visibly changes the model without training one)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,  # type: ignore[arg-type]
        target_modules=target_modules
        or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_dora=use_dora,
        use_rslora=use_rslora,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
