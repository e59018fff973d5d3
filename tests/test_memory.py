import pytest
import torch

from solotune.config import DataConfig, LoraConfig, PrecisionConfig, TrainConfig
from solotune.data import Record, tokenize_records
from solotune.measure.memory import MIB, TensorMemoryTracker
from solotune.model.adapters import apply_lora, prepare_full_finetune
from solotune.model.precision import resolve_policy
from solotune.testing import make_model
from solotune.training.loop import train_loop
from solotune.training.setup import enable_checkpointing

SHAPE = dict(hidden_size=128, num_hidden_layers=4)


def measure(tokenizer, lora=True, checkpointing=False, steps=3):
    model = make_model(tokenizer, **SHAPE)
    if checkpointing:
        enable_checkpointing(model)
    model = apply_lora(model, LoraConfig(r=8, dropout=0.0)) if lora else prepare_full_finetune(model)
    rows = [{"prompt": "p" * 150, "response": "r" * 50}] * 12  # equal lengths: every step alike
    records = [Record(r, f"row {i}") for i, r in enumerate(rows)]
    examples, _, _ = tokenize_records(records, tokenizer, DataConfig())
    policy = resolve_policy(PrecisionConfig(mp="off"), "cpu", frozen_base=lora)
    result = train_loop(model, examples, tokenizer.pad_token_id, policy, TrainConfig(batch=4, max_steps=steps))
    return result.memory, model


def trainable_mib(model):
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / MIB


def test_the_parts_add_up_to_the_tracked_peak(tokenizer):
    mem, model = measure(tokenizer)
    parts = mem["parameters_mib"] + mem["gradients_mib"] + mem["optimizer_state_mib"] + mem["activations_mib"]
    assert parts == pytest.approx(mem["tracked_peak_mib"], rel=1e-12)
    # Each part is what it claims to be: all weights, and AdamW's two moments per trained weight.
    all_params = sum(p.numel() * p.element_size() for p in model.parameters()) / MIB
    assert mem["parameters_mib"] == pytest.approx(all_params, rel=1e-9)
    assert mem["optimizer_state_mib"] == pytest.approx(2 * trainable_mib(model), rel=0.01)
    assert mem["activations_mib"] > 0 and mem["peak_mib"] > mem["tracked_peak_mib"]  # RSS holds the runtime too
    assert mem["tracked_peak_mib"] + mem["untracked_mib"] == pytest.approx(mem["peak_mib"])


def test_lora_has_smaller_gradients_and_optimizer_state_than_full(tokenizer):
    lora, _ = measure(tokenizer, lora=True)
    full, model = measure(tokenizer, lora=False)
    assert lora["optimizer_state_mib"] < 0.2 * full["optimizer_state_mib"]
    assert lora["gradients_mib"] + lora["optimizer_state_mib"] < 0.2 * (
        full["gradients_mib"] + full["optimizer_state_mib"]
    )
    assert full["optimizer_state_mib"] == pytest.approx(2 * trainable_mib(model), rel=0.01)


def test_checkpointing_has_smaller_activations(tokenizer):
    plain, _ = measure(tokenizer)
    ckpt, _ = measure(tokenizer, checkpointing=True)
    assert ckpt["activations_mib"] < 0.7 * plain["activations_mib"], (ckpt, plain)
    assert ckpt["parameters_mib"] == pytest.approx(plain["parameters_mib"])


def test_tracker_counts_a_shared_storage_once(tokenizer):
    from solotune.measure.memory import TensorMemoryTracker

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = TensorMemoryTracker(model, optimizer, torch.device("cpu"))
    with tracker:
        x = torch.zeros(1024, 256)  # 1 MiB
        views = [x.view(-1), x[:10], x.t()]  # no new storage
        del views
    assert tracker.peak_parts["activations"] == 1024 * 256 * 4


def test_a_closed_tracker_is_not_kept_alive_by_the_model(tokenizer):
    """`--train.track-memory peak` makes a tracker per followed step: once closed, none may stay
    tied to the parameters' storages (a finalizer each), or every tracker lives as long as the model."""
    import gc
    import weakref

    model = make_model(tokenizer)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = TensorMemoryTracker(model, optimizer, torch.device("cpu"))
    with tracker:
        model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    alive = weakref.ref(tracker)
    del tracker
    gc.collect()
    assert alive() is None
