"""Tiny models and a byte-level tokenizer, built locally: for tests and benchmarks, no downloads."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: every UTF-8 byte is a token, so any text encodes."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(sorted(alphabet))})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model(tokenizer, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A tiny random Llama (GQA, RoPE, SwiGLU: the code path of Llama-2 and SmolLM2).

    `overrides` are LlamaConfig fields, e.g. the shape of a real model for memory benchmarks.
    """
    torch.manual_seed(seed)
    hidden = overrides.get("hidden_size", 64)
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        # Wide enough init that a frozen, final-normed LM head can express confident
        # predictions (at 0.02 the logits of a 64-wide model span ~1 nat, capping how low LoRA can go).
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    settings.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()


def save_model_folder(folder, seed: int = 0, **overrides):
    """A random model of the given shape and the byte tokenizer, saved as a HF folder; returns it."""
    tokenizer = make_tokenizer()
    make_model(tokenizer, seed=seed, **overrides).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def varied_examples(tokenizer, n: int = 5, train_on_prompt: bool = False):
    """`n` tokenized prompt/response records of different lengths (prompts grow, responses shrink)."""
    from solotune.config import DataConfig
    from solotune.data import Record, tokenize_records

    rows = [{"prompt": f"question {i}: " + "x" * (3 + 11 * i), "response": "y" * (4 + 7 * (n - i))} for i in range(n)]
    records = [Record(r, f"row {i}") for i, r in enumerate(rows)]
    return tokenize_records(records, tokenizer, DataConfig(train_on_prompt=train_on_prompt))[0]
