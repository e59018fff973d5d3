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
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_sentencepiece_tokenizer():
    """A tiny SentencePiece-style tokenizer as Llama 2's is in Hugging Face form: BPE over
    "▁"-prefixed pieces, a few merges, every other character through its UTF-8 byte pieces."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in "▁abcdefghijklmnopqrstuvwxyzW?+0123456789,.'":
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "s"), ("▁", "a"), ("a", "t"), ("▁", "i")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tok = LlamaTokenizer(vocab=vocab, merges=merges, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
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


def make_architecture(family: str, tokenizer, seed: int = 0, **overrides):
    """A tiny random model of one of ARCHITECTURES (2 layers, hidden 64), from its config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **ARCHITECTURES[family],
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings)).eval()


_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
# Seven families whose code paths differ where solotune's fast paths reach: rotary or absolute
# positions, fused or separate q/k/v, gated or plain MLPs, logits scaled after the head.
ARCHITECTURES = {
    "llama": dict(model_type="llama", **_SHAPE),
    "qwen2": dict(model_type="qwen2", **_SHAPE),
    "gemma": dict(model_type="gemma", head_dim=16, **_SHAPE),
    "phi3": dict(model_type="phi3", **_SHAPE),
    "granite": dict(model_type="granite", logits_scaling=4.0, **_SHAPE),
    "gpt_neox": dict(
        model_type="gpt_neox",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
    ),
    # GPT-2 trains with its own dropout (0.1 by default), whose masks follow the batch layout:
    # at 0 its padded and padding-free steps can be compared.
    "gpt2": dict(
        model_type="gpt2",
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=512,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    ),
}


def save_architecture_folder(folder, family: str, **overrides):
    """A tiny random model of `family` and the byte tokenizer, saved as a HF folder; returns it."""
    tokenizer = make_tokenizer()
    make_architecture(family, tokenizer, **overrides).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def loss_and_grads(model, batch, loss_fn, dtype=None):
    """One forward (under CPU autocast to `dtype` if given) and backward: the loss and every gradient."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        loss = loss_fn(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(grads: dict, ref_grads: dict, rel: float = 1e-5) -> None:
    """The same parameters got gradients, each within `rel` of the reference's (relative norm)."""
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        diff = (g - ref_grads[name]).norm() / ref_grads[name].norm().clamp_min(1e-12)
        assert diff < rel, f"{name}: relative gradient difference {diff:.2e}"
