"""One optimizer step (training/step.py): accumulation exact over any split, what a step changes
(adapters or every weight), gradient checkpointing, fp16 loss scaling, and the loop running the
same steps as a plain reference loop."""

import copy

import pytest
import torch
import transformers

from solotune.config import DataConfig, LoraConfig, PrecisionConfig, TrainConfig
from solotune.data import Record, collate, split_micro_batches, tokenize_records
from solotune.errors import SolotuneError
from solotune.model.adapters import apply_lora, prepare_full_finetune
from solotune.model.precision import resolve_policy
from solotune.testing import make_model
from solotune.training.loop import train_loop
from solotune.training.optim import make_optimizer
from solotune.training.setup import enable_checkpointing
from solotune.training.step import StepContext, accumulate_gradients, train_step

FP32 = PrecisionConfig(mp="off")


def examples_from(tokenizer, rows):
    records = [Record(r, f"test record {i}") for i, r in enumerate(rows)]
    examples, _, _ = tokenize_records(records, tokenizer, DataConfig(max_len=512))
    return examples


def varied_rows(n=8):
    """Records of clearly different lengths, so batches carry padding."""
    return [
        {"instruction": "Repeat the word." + " pad" * (i % 3), "input": "x" * i, "output": "ok " * (1 + 2 * i)}
        for i in range(n)
    ]


def lora_model(tokenizer, **kw):
    return apply_lora(make_model(tokenizer, **kw), LoraConfig(r=4, dropout=0.0)).train()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_gradient_accumulation_is_exact(tokenizer, full):
    """4 micro-batches of 2 give the gradients and loss of one batch of 8 (fp32, padded, varied lengths)."""
    examples = examples_from(tokenizer, varied_rows(8))
    policy = resolve_policy(FP32, "cpu", frozen_base=not full)
    results = {}
    for k in (1, 4):
        model = prepare_full_finetune(make_model(tokenizer).train()) if full else lora_model(tokenizer)
        micro = [
            collate([examples[i] for i in mb], tokenizer.pad_token_id) for mb in split_micro_batches(list(range(8)), k)
        ]
        loss = accumulate_gradients(model, micro, policy)
        results[k] = (loss.item(), grads(model))
    (loss1, g1), (loss4, g4) = results[1], results[4]
    assert loss4 == pytest.approx(loss1, rel=1e-6)
    assert g1.keys() == g4.keys() and len(g1) > 0
    for name in g1:
        rel = (g4[name] - g1[name]).norm() / g1[name].norm().clamp_min(1e-12)
        assert rel < 1e-5, f"{name}: relative gradient difference {rel:.2e}"


def run_loop(tokenizer, rows, model, steps=6, mp=FP32, lr=1e-2, **train):
    cfg = TrainConfig(batch=4, max_steps=steps, lr=lr, warmup_ratio=0.0, **train)
    policy = resolve_policy(mp, "cpu", frozen_base=True)
    return train_loop(model, examples_from(tokenizer, rows), tokenizer.pad_token_id, policy, cfg)


def test_loss_goes_down_on_a_small_data_set(tokenizer):
    rows = [{"instruction": "Say the magic word.", "output": "abracadabra"}] * 8
    result = run_loop(tokenizer, rows, lora_model(tokenizer), steps=16, epochs=8, lr=1e-2, schedule="constant")
    assert result.losses[-1] < 0.25 * result.losses[0]
    assert result.tokens > 0 and 0 <= 1 - result.tokens / result.positions < 1


def test_lora_changes_only_adapter_weights(tokenizer):
    model = lora_model(tokenizer)
    before = copy.deepcopy(model.state_dict())
    run_loop(tokenizer, varied_rows(8), model, steps=2)
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)


def test_full_finetuning_changes_the_base_weights(tokenizer):
    model = prepare_full_finetune(make_model(tokenizer).train())
    before = copy.deepcopy(model.state_dict())
    run_loop(tokenizer, varied_rows(8), model, steps=1)
    assert not torch.equal(
        model.state_dict()["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"]
    )


def saved_activation_bytes(model, batch):
    """Bytes autograd keeps for backward during one forward pass: the activation memory."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return total, out


def test_gradient_checkpointing_cuts_activation_memory_and_keeps_gradients(tokenizer):
    rows = [{"prompt": "p" * 100, "response": "r" * 100}] * 4
    batch = collate(examples_from(tokenizer, rows), tokenizer.pad_token_id)
    measured = {}
    for ckpt in (False, True):
        base = make_model(tokenizer, hidden_size=128, num_hidden_layers=4)
        if ckpt:
            enable_checkpointing(base)
        model = apply_lora(base, LoraConfig(r=4, dropout=0.0)).train()
        saved, logits = saved_activation_bytes(model, batch)
        logits.float().logsumexp(-1).mean().backward()
        measured[ckpt] = (saved, grads(model))
    (plain, g_plain), (ckpt, g_ckpt) = measured[False], measured[True]
    assert ckpt < 0.5 * plain, f"checkpointing kept {ckpt} of {plain} bytes"
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-5, atol=1e-7)


def test_fp16_uses_the_scaler_and_skips_overflowing_steps(tokenizer):
    policy = resolve_policy(PrecisionConfig(mp="fp16"), "cpu", frozen_base=True)
    assert policy.scaler.is_enabled()
    model = apply_lora(make_model(tokenizer).to(policy.base_dtype), LoraConfig(r=4, dropout=0.0)).train()
    micro = [collate(examples_from(tokenizer, varied_rows(4)), tokenizer.pad_token_id)]
    optimizer, scheduler = make_optimizer(model, TrainConfig(lr=1e-2, warmup_ratio=0.0), total_steps=4)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]

    policy.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)  # a scale this model's fp16 gradients take
    first = train_step(StepContext(model, optimizer, scheduler, policy), micro)
    assert not first.skipped and any(p.abs().sum() > 0 for p in lora_b)  # a real update happened

    policy.scaler.update(2.0**120)  # so large that the scaled fp16 gradients overflow
    snapshot = [p.detach().clone() for p in lora_b]
    lr = scheduler.get_last_lr()
    second = train_step(StepContext(model, optimizer, scheduler, policy), micro)
    assert second.skipped and policy.scaler.get_scale() < 2.0**120
    assert all(torch.equal(p, s) for p, s in zip(lora_b, snapshot))
    assert scheduler.get_last_lr() == lr and scheduler.last_epoch == 1  # the schedule waits for a real update


def test_fp16_trains_when_its_first_steps_overflow(tokenizer):
    """The gradient scaler starts high and halves until the scaled gradients fit: on a GPU the
    first fp16 steps overflow by design. There, as here, the overflow starts near the output and
    reaches the lower layers as inf, while the upper layers' gradients stay finite; clipping by
    the infinite norm turns those to zeros. The gradient check must wait for the first step the
    scaler applies, check that one, and the run trains."""
    policy = resolve_policy(PrecisionConfig(mp="fp16"), "cpu", frozen_base=True)
    policy.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)  # overflows part of this model's gradients
    model = apply_lora(make_model(tokenizer).to(policy.base_dtype), LoraConfig(r=4, dropout=0.0))
    examples = examples_from(tokenizer, varied_rows(4))
    accumulate_gradients(model.train(), [collate(examples, tokenizer.pad_token_id)], policy)
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    finite = [bool(g.isfinite().all()) for g in grads]
    assert any(finite) and not all(finite), finite  # the case the GPU met: a partial overflow,
    assert torch.nn.utils.get_total_norm(grads).item() == float("inf")  # inf, not NaN: clipping zeroes the rest
    model.zero_grad(set_to_none=True)

    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    cfg = TrainConfig(batch=4, max_steps=12, epochs=12, lr=1e-2, warmup_ratio=0.0, schedule="constant")
    result = train_loop(model, examples, tokenizer.pad_token_id, policy, cfg)
    assert 1 <= result.skipped_steps < 12  # overflowed first, then applied
    assert policy.scaler.get_scale() < 2.0**16
    assert all(not torch.equal(p, lora_b[n]) for n, p in model.named_parameters() if n in lora_b)
    applied = result.losses[result.skipped_steps :]
    assert applied[-1] < applied[0]


def test_the_gradient_check_still_stops_an_fp16_run_whose_parameter_gets_no_gradient(tokenizer):
    """Waiting for an applied step must not let a real fault through: a LoRA B cut off from
    backward stops the run at the first step the scaler applies."""
    policy = resolve_policy(PrecisionConfig(mp="fp16"), "cpu", frozen_base=True)
    policy.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    model = apply_lora(make_model(tokenizer).to(policy.base_dtype), LoraConfig(r=4, dropout=0.0))
    cut = next(m for n, m in model.named_modules() if n.endswith("q_proj.lora_B.default"))
    cut.register_forward_hook(lambda _m, _args, out: out.detach())
    cfg = TrainConfig(batch=4, max_steps=12, epochs=12, lr=1e-2, warmup_ratio=0.0)
    with pytest.raises(SolotuneError, match=r"got no gradient .*q_proj\.lora_B"):
        train_loop(model.train(), examples_from(tokenizer, varied_rows(4)), tokenizer.pad_token_id, policy, cfg)


def test_the_loop_follows_a_plain_reference_loop_step_by_step(tokenizer):
    """The loop with every fast path (padding-free rows, fused head and SwiGLU) against a plain
    loop written here: padded batches, the model's own loss (transformers' mean cross-entropy
    over the labelled positions), torch's AdamW, the same schedule and clipping. fp32, 1e-5,
    on whatever torch build runs it; and the same seed gives the same curve twice."""
    rows, steps = varied_rows(16), 4
    curves = [run_loop(tokenizer, rows, lora_model(tokenizer), steps=steps, shuffle=False).losses for _ in range(2)]
    assert curves[0] == curves[1]

    model = lora_model(tokenizer)
    examples = examples_from(tokenizer, rows)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    schedule = transformers.get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=steps)
    reference = []
    for step in range(steps):
        batch = examples[4 * step : 4 * step + 4]
        T = max(len(e.input_ids) for e in batch)
        ids = torch.tensor([e.input_ids + [tokenizer.pad_token_id] * (T - len(e.input_ids)) for e in batch])
        labels = torch.tensor([e.labels + [-100] * (T - len(e.labels)) for e in batch])
        mask = torch.tensor([[1] * len(e.input_ids) + [0] * (T - len(e.input_ids)) for e in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        reference.append(loss.item())
    torch.testing.assert_close(curves[0], reference, rtol=1e-5, atol=0)
