"""The set-up self-checks: fast paths that disagree with the plain forward are turned off and
said so; a parameter that backward does not reach stops the run."""

import contextlib
import dataclasses
import json

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from solotune.cli import main
from solotune.config import LoraConfig, PrecisionConfig, RunConfig, TrainConfig
from solotune.data import make_batch
from solotune.errors import SolotuneError
from solotune.experiment.ablate import fast_path_axis
from solotune.fastpaths import attention, registry, selfcheck
from solotune.fastpaths.selfcheck import RunShape, choose_fast_paths
from solotune.fastpaths.technique import FastPath, largest_difference, logits
from solotune.model.adapters import apply_lora
from solotune.model.precision import resolve_policy
from solotune.testing import make_model, save_architecture_folder, varied_examples
from solotune.training import setup, step
from solotune.training.gradients import check_gradients
from solotune.training.loop import train_loop

FP32 = resolve_policy(PrecisionConfig(mp="off"), "cpu", frozen_base=True)


@pytest.fixture
def data_file(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text(
        "".join(json.dumps({"prompt": f"{i} + 1 =" + " x" * i, "response": f" {i + 1}"}) + "\n" for i in range(8))
    )
    return f


def run(model_dir, data_file, out, *extra):
    return main(
        [
            "train",
            "--model",
            str(model_dir),
            "--data",
            str(data_file),
            "--output-dir",
            str(out),
            "--batch",
            "4",
            "--mp",
            "off",
            "--max-steps",
            "2",
            "--no-generate.enabled",
            "--cpu-allocator",
            "glibc",
            *extra,
        ]
    )


def test_the_fast_paths_of_a_llama_match_and_stay_on(tokenizer):
    model = apply_lora(make_model(tokenizer), LoraConfig(r=4))
    fast = choose_fast_paths(
        model, RunShape(varied_examples(tokenizer), tokenizer.pad_token_id, FP32, TrainConfig(), 512)
    )
    assert (fast.fused_swiglu, fast.padding_free, fast.ce_chunk) == (True, True, TrainConfig().ce_chunk)
    assert fast.notes == [] and fast.largest_difference < 1e-5
    assert model.training  # the probe ran in eval mode and left the model as it found it


def leaking_attention(module, query, key, value, attention_mask, segment_lengths=None, **kwargs):
    """A broken padding-free attention: causal over the whole row, so each record sees the ones before it."""
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


def test_padding_free_attention_that_lets_records_see_each_other_is_turned_off(tokenizer, monkeypatch):
    AttentionInterface.register(attention.NAME, leaking_attention)
    try:
        model = apply_lora(make_model(tokenizer), LoraConfig(r=4))
        fast = choose_fast_paths(
            model, RunShape(varied_examples(tokenizer), tokenizer.pad_token_id, FP32, TrainConfig(), 512)
        )
    finally:
        AttentionInterface.register(attention.NAME, attention.varlen_sdpa_attention)
    assert not fast.padding_free and fast.ce_chunk and fast.fused_swiglu
    assert fast.notes[0].startswith(
        "padding-free rows off for this model: it differs from the model's plain forward by"
    )
    assert model.config._attn_implementation == "sdpa"  # the model's own attention again


def test_a_sliding_window_shorter_than_max_len_trains_padded_and_says_why(tmp_path, data_file, capsys):
    model_dir = save_architecture_folder(tmp_path / "mistral", "llama", model_type="mistral", sliding_window=16)
    assert run(model_dir, data_file, tmp_path / "run", "--max-len", "64") == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert not m["fast_paths"]["padding_free"] and m["train"]["padding_fraction"] > 0
    assert (
        "padding-free rows off for this model: its sliding attention window (16 tokens) is shorter than max_len (64)"
        in capsys.readouterr().out
    )


def test_a_model_class_without_sdpa_trains_with_eager_attention(
    tiny_model_dir, data_file, tmp_path, capsys, monkeypatch
):
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "_supports_sdpa", False)
    assert run(tiny_model_dir, data_file, tmp_path / "run") == 0
    assert "attention: eager (this model class does not support SDPA attention)" in capsys.readouterr().out


def test_a_parameter_backward_does_not_reach_stops_the_run_and_names_it(
    tiny_model_dir, data_file, tmp_path, capsys, monkeypatch
):
    """As bitsandbytes' gemm layout did to every 4-bit layer: the adapter's output is cut from the graph."""
    build = setup.build_model

    def cut_q_adapters(*args):
        model = build(*args)
        for name, module in model.named_modules():
            if name.endswith("q_proj.lora_B.default"):
                module.register_forward_hook(lambda _m, _i, out: out.detach())
        return model

    monkeypatch.setattr(setup, "build_model", cut_q_adapters)
    assert run(tiny_model_dir, data_file, tmp_path / "run") == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert error.startswith(
        "solotune: error: step 1: of 12 trainable parameters, 4 got no gradient (backward does not reach them): "
    )
    assert "layers.0.self_attn.q_proj.lora_A.default.weight" in error and "Traceback" not in error
    assert not (tmp_path / "run").exists()  # nothing half-written left behind


def test_check_gradients_allows_a_zero_lora_a_gradient_only_while_its_b_is_zero(tokenizer):
    model = apply_lora(make_model(tokenizer), LoraConfig(r=4, dropout=0.0)).train()
    batch = make_batch(varied_examples(tokenizer), tokenizer.pad_token_id, padding_free=False)
    step.accumulate_gradients(model, [batch], FP32)
    check_gradients(model)  # B = 0 at init: every A's gradient is zero, and that is expected
    a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    assert a.grad.abs().sum() == 0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)
    with pytest.raises(SolotuneError, match=r"got all-zero gradients: .*lora_A"):
        check_gradients(model)  # the same zero gradients with B moved: A is cut off
    a.grad[0, 0] = float("nan")
    with pytest.raises(SolotuneError, match=r"1 got inf/NaN gradients: .*lora_A"):
        check_gradients(model)


BF16 = resolve_policy(PrecisionConfig(mp="bf16"), "cpu", frozen_base=True)


def noisy_bf16_attention(module, query, key, value, attention_mask, **kwargs):
    """A sound padding-free attention whose 16-bit results carry rounding noise of the size a
    real model showed in bf16 (2.8e-2 relative on the embedded default); exact in fp32."""
    out, weights = attention.varlen_sdpa_attention(module, query, key, value, attention_mask, **kwargs)
    if out.dtype != torch.float32:
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn(out.shape, generator=generator).to(out.dtype)
        out = out + 0.06 * out.abs().mean() * noise
    return out, weights


def bf16_fast_paths(tokenizer, padding_free_attention):
    """The set-up check of a bf16 LoRA model whose padding-free rows run `padding_free_attention`."""
    AttentionInterface.register(attention.NAME, padding_free_attention)
    try:
        model = apply_lora(make_model(tokenizer).to(torch.bfloat16), LoraConfig(r=4))
        return choose_fast_paths(
            model, RunShape(varied_examples(tokenizer), tokenizer.pad_token_id, BF16, TrainConfig(), 512)
        )
    finally:
        AttentionInterface.register(attention.NAME, attention.varlen_sdpa_attention)


def test_16bit_rounding_noise_does_not_turn_a_sound_path_off(tokenizer):
    """The fp32 twin decides the structure; the model in bf16 then needs only to be near (SANITY),
    so a sound path whose bf16 error passes the old 3e-2 bound is kept."""
    from solotune.fastpaths.selfcheck import SANITY, TOLERANCE

    fast = bf16_fast_paths(tokenizer, noisy_bf16_attention)
    assert fast.padding_free and fast.notes == []
    assert TOLERANCE[torch.bfloat16] < fast.largest_difference < SANITY  # the old bound would have refused it


def test_16bit_runs_find_a_leak_between_records_in_fp32_on_a_twin(tokenizer):
    fast = bf16_fast_paths(tokenizer, leaking_attention)
    assert not fast.padding_free and fast.fused_swiglu and fast.ce_chunk
    (note,) = fast.notes
    assert note.startswith("padding-free rows off for this model: it differs from the model's plain forward by ")
    assert note.endswith("(relative; tolerance 1e-04) (fp32, on a 1-layer twin)")
    assert float(note.split(" by ")[1].split(" ")[0]) > 0.5  # far from any rounding


def test_a_model_that_soft_caps_its_logits_keeps_the_full_head_by_declaration(tokenizer):
    """Gemma 2 caps its final logits after the head: the chunked head would leave that out, and
    a probe's small logits hide it from a measure. Its config says so."""
    from solotune.testing import make_architecture

    model = make_architecture("gemma", tokenizer, model_type="gemma2", final_logit_softcapping=30.0)
    fast = choose_fast_paths(
        model, RunShape(varied_examples(tokenizer), tokenizer.pad_token_id, FP32, TrainConfig(), 512)
    )
    assert fast.ce_chunk == 0
    assert (
        "chunked LM head + cross-entropy off for this model: its logits are soft-capped after the head "
        "(final_logit_softcapping = 30.0)" in fast.notes
    )


# ---------------------------------------------------------------------------------------------
# The fast-path interface: a new path is one FastPath, one config field and one registry line.


class HeadScale(FastPath):
    """A made-up path: the LM head's output times `scale`, through a forward hook. At 1.0 it
    changes nothing (a sound path); at 2.0 it computes something else (a faulty one)."""

    name, field, axis, label = "scaled head", "head_scale", "hs", "Scaled head"
    off = 0.0
    entered = 0  # how often the loop held `during_steps`

    def on_value(self, train_cfg) -> float:
        return 1.0

    def enable(self, model, probe) -> bool:
        scale = self.kept_value
        self.hook = model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: out * scale)
        return True

    def difference(self, model, probe, kept) -> float:
        self.hook.remove()
        plain = logits(model, probe.padded)
        self.enable(model, probe)
        return largest_difference(logits(model, probe.padded), plain, probe.padded)

    def undo(self, model, probe) -> None:
        self.hook.remove()

    def during_steps(self, model, max_len: int):
        HeadScale.entered += 1
        return contextlib.nullcontext()


@dataclasses.dataclass
class ConfigWithHeadScale(TrainConfig):
    head_scale: float = 1.0  # the one config field


@pytest.mark.parametrize(("scale", "kept"), [(1.0, True), (2.0, False)], ids=["sound", "faulty"])
def test_a_new_fast_path_is_checked_kept_or_turned_off_run_and_ablated(tokenizer, monkeypatch, scale, kept):
    path = HeadScale()
    path.kept_value = scale
    monkeypatch.setattr(registry, "FAST_PATHS", (*registry.FAST_PATHS, path))  # the one registry line
    monkeypatch.setattr(selfcheck, "FAST_PATHS", registry.FAST_PATHS)
    model = apply_lora(make_model(tokenizer), LoraConfig(r=4, dropout=0.0))
    cfg = ConfigWithHeadScale(head_scale=scale, batch=4, max_steps=1)
    fast = choose_fast_paths(model, RunShape(varied_examples(tokenizer), tokenizer.pad_token_id, FP32, cfg, 512))
    if kept:
        assert fast.head_scale == 1.0 and "scaled head" in fast.line() and fast.notes == []
        HeadScale.entered = 0
        train_loop(model, varied_examples(tokenizer), tokenizer.pad_token_id, FP32, cfg, fast=fast)
        assert HeadScale.entered == 1  # the loop held the path's context around its steps
    else:
        assert fast.head_scale == 0.0 and "scaled head" not in fast.line()
        assert fast.notes == ["scaled head off for this model: it differs from the model's plain forward by 1.0e+00 "
                              "(relative; tolerance 1e-04)"]  # fmt: skip
    axis = fast_path_axis(path)  # and its ablation axis
    assert [axis.overrides(RunConfig(), v) for v in axis.values] == [
        {"train.head_scale": 0.0},
        {"train.head_scale": True},
    ]
