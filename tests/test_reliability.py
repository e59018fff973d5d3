"""Numerics guards and steady memory over a long run."""

import json

import pytest
import torch

from solotune.config import DataConfig, LoraConfig, PrecisionConfig, TrainConfig
from solotune.data import Record, tokenize_records
from solotune.errors import SolotuneError
from solotune.model.adapters import apply_lora
from solotune.model.precision import resolve_policy
from solotune.run import train as train_module
from solotune.testing import make_model
from solotune.training import loop as loop_module
from solotune.training.loop import train_loop

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
    original = loop_module.train_step

    def measured_step(*args, **kwargs):
        out = original(*args, **kwargs)
        rss.append(resident_mib())
        return out

    monkeypatch.setattr(loop_module, "train_step", measured_step)
    model = apply_lora(make_model(tokenizer), LoraConfig(r=4))
    examples = examples_of(tokenizer, [{"prompt": f"question {i}?", "response": f"answer {i}."} for i in range(64)])
    cfg = TrainConfig(batch=4, epochs=32, max_steps=500)
    result = train_loop(model, examples, tokenizer.pad_token_id, resolve_policy(FP32, "cpu", True), cfg)
    rss = rss[1:]  # the first: the memory breakdown's rehearsal of the largest step, before the loop
    assert len(result.losses) == len(rss) == 500
    assert rss[-1] == pytest.approx(rss[99], rel=0.05), f"RSS {rss[99]:.1f} MiB at step 100, {rss[-1]:.1f} MiB at 500"


def test_the_trained_weights_are_saved_before_anything_after_the_loop_can_fail(tiny_model_dir, tmp_path, monkeypatch):
    """A failure in the generations after training or in the matmul-peak measurement loses the
    report, not the trained adapter."""
    from solotune.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "response": f" {i + 1}"}) + "\n" for i in range(8)))

    def broken_peak(*_, **__):
        raise RuntimeError("the matmul benchmark failed")

    monkeypatch.setattr(train_module, "matmul_peak_flops", broken_peak)
    with pytest.raises(RuntimeError, match="matmul benchmark"):
        main(
            [
                "train",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(data),
                "--output-dir",
                str(tmp_path / "run"),
                "--batch",
                "4",
                "--mp",
                "off",
                "--no-generate.enabled",
                "--cpu-allocator",
                "glibc",
            ]
        )
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_damaged_matmul_peak_cache_is_measured_again(monkeypatch, tmp_path):
    from solotune.measure.flops import matmul_peak_flops

    monkeypatch.setenv("SOLOTUNE_CACHE", str(tmp_path))
    (tmp_path / "matmul_peak.json").write_text('{"half a file": ')
    peak = matmul_peak_flops(torch.device("cpu"), torch.float32)
    assert peak > 0 and json.loads((tmp_path / "matmul_peak.json").read_text())  # rewritten whole


def test_a_cached_matmul_peak_below_what_a_run_reached_is_measured_again(monkeypatch, tmp_path):
    """A peak measured while something else ran stays low in the cache; a run that goes faster
    than it (MFU above 100%) has it measured again, and never reports more than 100%."""
    from solotune.measure import flops
    from solotune.measure.flops import matmul_peak_flops

    measured = []
    monkeypatch.setattr(flops, "_measure_matmul", lambda *_: measured.append(1) or 1.0)  # as if measured under load
    monkeypatch.setenv("SOLOTUNE_CACHE", str(tmp_path))
    assert matmul_peak_flops(torch.device("cpu"), torch.float32) == 1.0 and len(measured) == 1
    assert matmul_peak_flops(torch.device("cpu"), torch.float32) == 1.0 and len(measured) == 1  # cached, kept
    monkeypatch.setattr(flops, "_measure_matmul", lambda *_: measured.append(1) or 3e6)  # quiet now
    assert matmul_peak_flops(torch.device("cpu"), torch.float32, at_least=2e6) == 3e6 and len(measured) == 2
    assert matmul_peak_flops(torch.device("cpu"), torch.float32) == 3e6 and len(measured) == 2  # cached
    monkeypatch.setattr(flops, "_measure_matmul", lambda *_: 1.0)  # still busy: the run's own rate is the floor
    assert matmul_peak_flops(torch.device("cpu"), torch.float32, at_least=5e6) == 5e6


def test_metrics_hold_null_where_a_number_is_not_finite(tmp_path):
    """NaN and Infinity are not JSON: a strict reader must be able to read every metrics file."""
    from solotune.artifacts import write_json

    write_json(tmp_path / "m.json", {"loss_curve": [1.5, float("nan")], "grad_norm": float("inf"), "steps": 2})
    strict = json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert strict == {"loss_curve": [1.5, None], "grad_norm": None, "steps": 2}
