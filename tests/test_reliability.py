"""Numerics guards and steady memory over a long run."""

import pytest
import torch

from solotune import train as train_module
from solotune.adapters import apply_lora
from solotune.config import DataConfig, LoraConfig, PrecisionConfig, TrainConfig
from solotune.data import Record, tokenize_records
from solotune.errors import SolotuneError
from solotune.precision import resolve_policy
from solotune.testing import make_model
from solotune.train import train_loop

FP32 = PrecisionConfig(mp="off")


def examples_of(tokenizer, rows):
    return tokenize_records([Record(r, f"row {i}") for i, r in enumerate(rows)], tokenizer, DataConfig())[0]


def test_a_nan_loss_stops_the_run_naming_step_and_records(tokenizer):
    """An fp32 run whose loss becomes NaN stops before the update, saying where."""
    model = apply_lora(make_model(tokenizer), LoraConfig(r=4, dropout=0.0))
    examples = examples_of(tokenizer, [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(8)])
    with torch.no_grad():  # poison the embedding of "5", a byte only record 5 holds
        model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("5")] = float("nan")
    cfg = TrainConfig(batch=4, shuffle=False)
    with pytest.raises(SolotuneError, match=r"non-finite loss .* at step 2, records \[4, 5, 6, 7\]"):
        train_loop(model, examples, tokenizer.pad_token_id, resolve_policy(FP32, "cpu", True), cfg)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p).all(), f"{n} was updated by the bad step"


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_memory_holds_steady_over_500_steps(tokenizer, monkeypatch):
    """RSS after step 100 and after step 500 within 5%: nothing accumulates per step."""
    rss = []
    original = train_module.train_step

    def measured_step(*args, **kwargs):
        out = original(*args, **kwargs)
        rss.append(resident_mib())
        return out

    monkeypatch.setattr(train_module, "train_step", measured_step)
    model = apply_lora(make_model(tokenizer), LoraConfig(r=4))
    examples = examples_of(tokenizer, [{"prompt": f"question {i}?", "response": f"answer {i}."} for i in range(64)])
    cfg = TrainConfig(batch=4, epochs=32, max_steps=500)
    result = train_loop(model, examples, tokenizer.pad_token_id, resolve_policy(FP32, "cpu", True), cfg)
    assert len(result.losses) == len(rss) == 500
    assert rss[-1] == pytest.approx(rss[99], rel=0.05), f"RSS {rss[99]:.1f} MiB at step 100, {rss[-1]:.1f} MiB at 500"
