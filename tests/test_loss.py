"""The training loss (fastpaths/loss.py): the chunked LM head and cross-entropy compute the full
logits' loss and gradients (fp32, 1e-5), keep no logits for backward, and take any head."""

import pytest
import torch

from solotune.config import LoraConfig
from solotune.data import collate, collate_packed
from solotune.fastpaths import cpu_bf16
from solotune.fastpaths.attention import enable_padding_free
from solotune.fastpaths.loss import ResponseLoss, chunked_response_loss_sum, full_response_loss_sum
from solotune.model.adapters import apply_lora
from solotune.testing import assert_same_gradients, loss_and_grads, make_model
from solotune.testing import varied_examples as examples


def assert_chunked_equals_full(model, batch, dtype=None, rel=1e-5):
    """The chunked head + CE (7 positions a chunk, which does not divide the count) == the full logits."""
    ref_loss, ref_grads = loss_and_grads(model, batch, ResponseLoss(chunk=0), dtype)
    loss, grads = loss_and_grads(model, batch, ResponseLoss(chunk=7), dtype)
    assert loss == pytest.approx(ref_loss, rel=rel)
    assert_same_gradients(grads, ref_grads)
    return grads


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_chunked_cross_entropy_equals_the_full_logits(tokenizer, padding_free, full):
    """Loss and every gradient of the chunked LM head + CE match the full-logits path to 1e-5 (fp32)."""
    exs = examples(tokenizer)
    model = make_model(tokenizer)
    if padding_free:
        enable_padding_free(model, 512)
    model = apply_lora(model, LoraConfig(r=4, dropout=0.0)) if full is False else model.train()
    if full:
        for p in model.parameters():
            p.requires_grad_(True)
    batch = collate_packed(exs) if padding_free else collate(exs, tokenizer.pad_token_id)
    ref_loss, _ = loss_and_grads(model, batch, ResponseLoss(chunk=0))
    assert ref_loss == pytest.approx(full_response_loss_sum(model(**batch.model_inputs()).logits, batch.labels).item())
    assert_chunked_equals_full(model, batch)


def test_fused_head_under_bf16_autocast_matches_the_full_logits(tokenizer, monkeypatch):
    """Under bf16 autocast the fused head's matmuls run in bf16 as the unfused head's do: same loss and gradients.

    With the layouts of a CPU with bf16 in hardware on every machine; an emulating CPU's column-major
    head weight rounds differently, and test_cpu_bf16 compares it with autograd at bf16's tolerance."""
    monkeypatch.setattr(cpu_bf16, "cpu_has_native_bf16", lambda: True)
    exs = examples(tokenizer)
    model = apply_lora(make_model(tokenizer), LoraConfig(r=4, dropout=0.0))
    assert_chunked_equals_full(model, collate_packed(exs), dtype=torch.bfloat16, rel=1e-6)  # measured: equal


def test_adapted_lm_head_takes_the_checkpointed_chunks(tokenizer):
    """A head that is not a plain Linear (here LoRA on lm_head) runs the checkpointed chunks: same loss and gradients."""
    exs = examples(tokenizer)
    model = apply_lora(make_model(tokenizer), LoraConfig(r=4, dropout=0.0, target_modules=["q_proj", "lm_head"]))
    assert type(model.get_output_embeddings()) is not torch.nn.Linear
    grads = assert_chunked_equals_full(model, collate(exs, tokenizer.pad_token_id))
    assert any("lm_head" in name for name in grads)


def test_fused_head_keeps_no_logits_for_backward(tokenizer):
    """What the fused head + CE saves for backward is (N, H)-sized: no chunk of logits, no recomputation."""
    exs = examples(tokenizer)
    model = apply_lora(make_model(tokenizer), LoraConfig(r=4, dropout=0.0))
    batch = collate_packed(exs)
    hidden = model.get_decoder()(**batch.model_inputs()).last_hidden_state.detach().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = chunked_response_loss_sum(
            hidden, model.get_output_embeddings(), batch.labels, batch.loss_positions, chunk=7
        )
    n, h = batch.n_loss_tokens, hidden.shape[-1]
    assert max(t.numel() for t in saved) == n * h  # the gradient of the loss positions' hidden states
    loss.backward()
    assert hidden.grad.abs().sum() > 0
