"""Dropout keyed to the data (model/dropout.py): the same masks in any layout, shared where the
input is shared, replayed under checkpointing, and nothing kept past a step."""

import threading

import pytest
import torch

from solotune.config import LoraConfig, PrecisionConfig, TrainConfig
from solotune.data import collate, collate_packed, token_keys
from solotune.fastpaths.loss import ResponseLoss
from solotune.model.adapters import apply_lora
from solotune.model.dropout import KeyedDropout, SharedDropout, keep_mask, keyed_by, step_key
from solotune.model.precision import resolve_policy
from solotune.testing import make_model
from solotune.testing import varied_examples as examples
from solotune.training.loop import train_loop
from solotune.training.setup import enable_checkpointing
from solotune.training.step import accumulate_gradients

FP32 = resolve_policy(PrecisionConfig(mp="off"), "cpu", frozen_base=True)


def lora_inputs(model):
    """Record the tensor each adapter's lora_A receives, per adapted layer name."""
    seen = {}
    for name, m in model.named_modules():
        if name.endswith("lora_A.default"):
            m.register_forward_pre_hook(lambda mod, args, name=name: seen.update({name: args[0]}))
    return seen


def test_masks_are_uniform_and_differ_by_step_module_record_and_position():
    keys = token_keys(torch.arange(64).repeat_interleave(32), torch.arange(32).repeat(64)).view(64, 32)
    kept = keep_mask(keys ^ step_key(0, 0), 1, 256, p=0.3)
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.01)
    assert kept.float().mean(dim=(0, 1)).std().item() < 0.05  # no feature always kept or dropped
    other_step = keep_mask(keys ^ step_key(0, 1), 1, 256, p=0.3)
    other_seed = keep_mask(keys ^ step_key(1, 0), 1, 256, p=0.3)
    other_module = keep_mask(keys ^ step_key(0, 0), 2, 256, p=0.3)
    for other in (other_step, other_seed, other_module, kept[1:], kept[:, 1:]):  # ...; next record; next position
        n = min(kept.shape[1], other.shape[1])
        same = (kept[: other.shape[0], :n] == other[:, :n]).float().mean().item()
        assert same == pytest.approx(0.7**2 + 0.3**2, abs=0.02)  # as independent masks agree


def test_keyed_dropout_keeps_the_token_keys_for_backward_not_a_mask():
    """Backward keeps (tokens,) int32 keys, 1/features of a bool mask, and gives mask / (1 - p)
    times the incoming gradient."""
    x = torch.randn(2, 16, 64, requires_grad=True)
    keys = token_keys(torch.tensor([[0], [1]]), torch.arange(16))
    dropout = KeyedDropout(0.25, salt=1).train()
    saved = []
    with keyed_by(keys):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = dropout(x)
        grad_out = torch.randn_like(y)
        y.backward(grad_out)
    assert [(t.dtype, tuple(t.shape)) for t in saved] == [(torch.int32, (2, 16)), (torch.int32, ())]  # keys, salt
    kept = y != 0
    assert 0.65 < kept.float().mean().item() < 0.85
    assert torch.equal(kept, keep_mask(keys, dropout.salt, 64, 0.25))
    assert torch.allclose(y, x.detach() * kept / 0.75, rtol=1e-6)
    assert torch.allclose(x.grad, grad_out * kept / 0.75, rtol=1e-6)


def test_a_record_gets_the_same_masks_padded_or_in_a_padding_free_row(tokenizer):
    exs = examples(tokenizer)
    model = apply_lora(make_model(tokenizer), LoraConfig(r=4, dropout=0.5)).train()
    seen = lora_inputs(model)
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default"  # its input: the embeddings
    masks = []
    for batch in (collate(exs, tokenizer.pad_token_id), collate_packed(exs)):
        with keyed_by(batch.for_step(step_key(0, 3)).token_keys), torch.no_grad():
            model(**batch.model_inputs())
        masks.append(seen[name] != 0)
    padded, packed = masks
    start = 0
    for row, e in enumerate(exs):
        n = len(e.input_ids)
        assert torch.equal(padded[row, :n], packed[0, start : start + n]), f"record {row}"
        start += n
    assert 0.4 < packed.float().mean().item() < 0.6  # dropout at p = 0.5 did happen


def run_loop(tokenizer, dropout: float, **train):
    torch.manual_seed(0)
    model = apply_lora(make_model(tokenizer), LoraConfig(r=4, dropout=dropout))
    result = train_loop(model, examples(tokenizer, n=8), tokenizer.pad_token_id, FP32, TrainConfig(**train))
    return result.losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accumulation_and_layout_change_nothing_with_dropout_on(tokenizer):
    """GA 1 against GA 4, and padded against padding-free, with the default LoRA dropout: the same
    losses and adapters to 1e-5 (fp32). With torch's generator the masks followed the layout,
    and GA 1 against 4 differed by 2.2e-4 at step 2."""
    base = dict(batch=4, max_steps=3, lr=1e-2, track_memory="off")
    ref_losses, ref_weights = run_loop(tokenizer, LoraConfig().dropout, **base, grad_accum=1)
    no_dropout, _ = run_loop(tokenizer, 0.0, **base, grad_accum=1)
    assert abs(no_dropout[-1] - ref_losses[-1]) > 1e-4  # the dropout changes the numbers: the test can fail
    for other in (dict(grad_accum=4), dict(grad_accum=2, padding_free=False)):
        losses, weights = run_loop(tokenizer, LoraConfig().dropout, **base, **other)
        assert losses == pytest.approx(ref_losses, rel=1e-5), other
        for name, w in ref_weights.items():
            torch.testing.assert_close(weights[name], w, rtol=1e-5, atol=1e-6, msg=f"{other}: {name}")


def test_shared_dropout_draws_one_mask_per_block_input(tokenizer):
    exs = examples(tokenizer)
    model = apply_lora(
        make_model(tokenizer), LoraConfig(r=4, dropout=0.5, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    blocks = [m for m in model.modules() if isinstance(m, SharedDropout)]
    assert len(blocks) == 2  # one per attention block
    seen = lora_inputs(model.train())
    batch = collate(exs, tokenizer.pad_token_id)
    with keyed_by(batch.token_keys):
        model(**batch.model_inputs())
    for layer in range(2):
        q, k, v, o = (seen[f"base_model.model.model.layers.{layer}.self_attn.{p}_proj.lora_A.default"] for p in "qkvo")
        assert q is k is v  # one dropped copy of the block's input for q, k and v
        zeros = (q == 0).float().mean().item()
        assert 0.4 < zeros < 0.6  # dropout at p = 0.5 did happen
        assert o is not q  # o_proj reads another input: its own mask
    assert all(b._cached is None and b.input_key is None for b in blocks)  # nothing outlives the block


def gradients_with_and_without_checkpointing(tokenizer, backward) -> list[dict]:
    """A LoRA model's gradients (dropout 0.3) from `backward(model, batch)`, without and with
    activation checkpointing."""
    batch = collate(examples(tokenizer), tokenizer.pad_token_id).for_step(step_key(0, 1))
    grads = []
    for checkpointing in (False, True):
        model = make_model(tokenizer)
        if checkpointing:
            enable_checkpointing(model)
        model = apply_lora(model, LoraConfig(r=4, dropout=0.3)).train()
        backward(model, batch)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    return grads


def assert_same(grads: list[dict]) -> None:
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert g.abs().sum() > 0 or "lora_A" in name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-6, atol=1e-9, msg=name)


def test_checkpointing_replays_the_same_masks(tokenizer):
    """Checkpointed recomputation draws the same keyed masks: the gradients equal the
    un-checkpointed run's (fp32, 1e-6)."""
    assert_same(gradients_with_and_without_checkpointing(tokenizer, lambda m, b: accumulate_gradients(m, [b], FP32)))


def test_shared_dropout_holds_nothing_after_a_step_under_checkpointing(tokenizer):
    """Non-reentrant checkpointing stops its replay after the last tensor backward needs, before
    the hook that clears the shared mask's cache: the step itself releases what is left."""
    base = make_model(tokenizer)
    enable_checkpointing(base)
    model = apply_lora(base, LoraConfig(r=4, dropout=0.1, target_modules=["all-linear"])).train()
    shared = [m for m in model.modules() if isinstance(m, SharedDropout)]
    assert len(shared) == 4  # q/k/v and gate/up, in each of 2 layers
    policy = resolve_policy(PrecisionConfig(mp="off"), "cpu", frozen_base=True)
    accumulate_gradients(model, [collate(examples(tokenizer), tokenizer.pad_token_id)], policy)
    assert all(s._cached is None and s.input_key is None for s in shared)


def test_a_checkpointed_replay_on_another_thread_draws_the_same_masks(tokenizer):
    """On CUDA, autograd runs backward (and the forward checkpointing replays) on a thread of its
    own; here backward is run on another thread, as there. The replay must find the step's keys:
    held thread-locally it fell back to torch's masks, and the gradients were wrong."""

    def backward_on_another_thread(model, batch):
        with keyed_by(batch.token_keys):
            loss = ResponseLoss()(model, batch)
            worker = threading.Thread(target=loss.backward)
            worker.start()
            worker.join()

    assert_same(gradients_with_and_without_checkpointing(tokenizer, backward_on_another_thread))
