"""The CUDA paths: allocator peak, fp16 with gradient scaling, bf16. Skipped without a GPU."""

import importlib.util
import json

import pytest
import torch

from solotune.config import RunConfig
from solotune.run.train import run_training
from solotune.testing import save_model_folder

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def cuda_run(tiny_model_dir, tmp_path, mp, steps=4, prompt_bytes=0, quant="none", **train):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": "x" * prompt_bytes + f"{i} times 2 is", "response": f" {2 * i}"} for i in range(32)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RunConfig(device="cuda", output_dir=str(tmp_path / f"run-{mp}"))
    cfg.model.name, cfg.data.path = str(tiny_model_dir), str(data)
    cfg.precision.mp, cfg.train.max_steps, cfg.train.batch = mp, steps, 8
    cfg.lora.dropout, cfg.generate.max_new_tokens, cfg.quant.method = 0.0, 4, quant
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return run_training(cfg)


def test_cuda_run_reports_the_allocator_peak(tiny_model_dir, tmp_path):
    m = cuda_run(tiny_model_dir, tmp_path, "off")
    mem = m["memory"]
    assert m["device"].startswith("cuda") and mem["kind"] == "cuda_allocator"
    assert mem["reserved_mib"] >= mem["peak_mib"] > 0
    # The four tracked parts add up to the tracked peak, and with what no op of the loop made
    # (cuBLAS workspaces: 64 MiB measured on an H200) to the allocator's peak.
    parts = sum(mem[f"{k}_mib"] for k in ("parameters", "gradients", "optimizer_state", "activations"))
    assert parts == pytest.approx(mem["tracked_peak_mib"], rel=1e-9)
    assert mem["tracked_peak_mib"] <= mem["peak_mib"] <= mem["tracked_peak_mib"] + 128
    assert mem["tracked_peak_mib"] + mem["untracked_mib"] == pytest.approx(mem["peak_mib"])


def test_fp16_runs_with_the_scaler_and_bf16_without(tiny_model_dir, tmp_path):
    fp16 = cuda_run(tiny_model_dir, tmp_path, "fp16")
    assert fp16["precision"]["grad_scaler"] and fp16["precision"]["base_dtype"] == "fp16"
    bf16 = cuda_run(tiny_model_dir, tmp_path, "bf16")
    assert not bf16["precision"]["grad_scaler"] and bf16["precision"]["base_dtype"] == "bf16"
    for m in (fp16, bf16):
        assert all(torch.isfinite(torch.tensor(m["train"]["loss_curve"])))


def test_mixed_precision_tracks_the_fp32_loss(tiny_model_dir, tmp_path):
    fp32 = cuda_run(tiny_model_dir, tmp_path, "off")["train"]["loss_curve"]
    bf16 = cuda_run(tiny_model_dir, tmp_path, "bf16")["train"]["loss_curve"]
    # Same data, order and seed: bf16 (8 mantissa bits) stays within 3% of fp32 over 4 steps.
    assert bf16 == pytest.approx(fp32, rel=0.03)


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """Wide and deep enough that activations, not weights, dominate the peak."""
    return save_model_folder(tmp_path_factory.mktemp("wide-llama"), hidden_size=256, num_hidden_layers=6)


def test_accumulation_and_checkpointing_lower_the_cuda_peak(wide_model_dir, tmp_path):
    peaks = {
        name: cuda_run(wide_model_dir, tmp_path / name, "off", prompt_bytes=300, **kw)["memory"]["peak_mib"]
        for name, kw in {"plain": {}, "accum": {"grad_accum": 8}, "ckpt": {"grad_checkpointing": True}}.items()
    }
    assert peaks["accum"] < 0.5 * peaks["plain"] and peaks["ckpt"] < 0.8 * peaks["plain"], peaks


def test_activation_offloading_lowers_the_cuda_peak_with_the_same_losses(wide_model_dir, tmp_path):
    runs = {
        name: cuda_run(wide_model_dir, tmp_path / name, "off", prompt_bytes=300, offload_activations=offload)
        for name, offload in {"plain": False, "offload": True}.items()
    }
    plain, offload = runs["plain"], runs["offload"]
    assert offload["memory"]["peak_mib"] < 0.7 * plain["memory"]["peak_mib"], (plain["memory"], offload["memory"])
    assert offload["train"]["loss_curve"] == pytest.approx(plain["train"]["loss_curve"], rel=1e-5)


def test_padding_free_flash_attention_matches_the_padded_batch(tokenizer):
    """bf16 on CUDA: the row goes through varlen flash attention; per-record logits match SDPA's padded ones."""
    from solotune.data import collate, collate_packed
    from solotune.fastpaths.attention import enable_padding_free, varlen_attn
    from solotune.testing import make_model, varied_examples

    if varlen_attn is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    exs = varied_examples(tokenizer)
    model = make_model(tokenizer, hidden_size=256, num_attention_heads=4, num_key_value_heads=2).to(
        "cuda", torch.bfloat16
    )
    padded, packed = collate(exs, tokenizer.pad_token_id).to("cuda"), collate_packed(exs).to("cuda")
    with torch.no_grad():
        ref = model(**padded.model_inputs()).logits.float()
        enable_padding_free(model, 512)
        row = model(**packed.model_inputs()).logits.float()[0]
    start = 0
    for i, e in enumerate(exs):
        n = len(e.input_ids)
        diff = (row[start : start + n] - ref[i, :n]).abs().max().item()
        assert diff < 0.05 * ref[i, :n].abs().max().item(), f"record {i}: max diff {diff}"  # bf16 rounding
        start += n


@pytest.mark.parametrize("optim", ["adamw8bit", "paged_adamw8bit"])
def test_cuda_qlora_trains_with_an_8bit_optimizer(tmp_path, optim):
    """NF4 base with bf16 compute on the GPU: trains, the quantized linears take <= 30% of their
    bf16 size, and the allocator peak holds the measured breakdown."""
    pytest.importorskip("bitsandbytes")
    model_dir = save_model_folder(tmp_path / "m", hidden_size=256, num_hidden_layers=2)
    plain = cuda_run(model_dir, tmp_path / "lora", "bf16", steps=6, lr=1e-2)
    m = cuda_run(model_dir, tmp_path / "qlora", "bf16", steps=6, quant="nf4", lr=1e-2, optim=optim)
    assert m["train"]["final_loss"] < m["train"]["loss_curve"][0]
    assert m["quantized_linears"]["fraction_of_16bit"] <= 0.30
    assert m["memory"]["parameters_mib"] < plain["memory"]["parameters_mib"]
    assert m["memory"]["optimizer_state_mib"] < plain["memory"]["optimizer_state_mib"]
    assert m["memory"]["tracked_peak_mib"] <= m["memory"]["peak_mib"] * 1.001


@pytest.mark.parametrize("mp", ["bf16", "fp16"])
def test_one_device_sync_per_optimizer_step_on_cuda(tokenizer, mp):
    """CUDA's own sync detector (`set_sync_debug_mode("warn")`) warns once per step: the read of
    the loss and gradient norm. As the loop runs it: padding-free attention on, each step's
    micro-batches built on the host and moved to the GPU inside the step, with new record
    lengths each step (nothing cached). fp16 included: the scaler's skip decision comes from
    that read."""
    import warnings

    from solotune.config import LoraConfig, PrecisionConfig, TrainConfig
    from solotune.data import collate_packed
    from solotune.fastpaths.attention import padding_free_attention
    from solotune.model.adapters import apply_lora
    from solotune.model.precision import resolve_policy
    from solotune.testing import make_model, varied_examples
    from solotune.training.optim import make_optimizer
    from solotune.training.step import StepContext, train_step

    policy = resolve_policy(PrecisionConfig(mp=mp), "cuda", frozen_base=True)
    model = apply_lora(make_model(tokenizer).to("cuda", policy.base_dtype), LoraConfig(r=4)).train()
    rows = [collate_packed(varied_examples(tokenizer, n=n)) for n in (5, 6, 7, 8)]  # other lengths each step
    optimizer, scheduler = make_optimizer(model, TrainConfig(), total_steps=len(rows))
    with padding_free_attention(model, 512):
        train_step(StepContext(model, optimizer, scheduler, policy), [rows[0].to(policy.device)])
        for row in rows[1:]:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    train_step(StepContext(model, optimizer, scheduler, policy), [row.to(policy.device)])
            finally:
                torch.cuda.set_sync_debug_mode(0)
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            assert len(syncs) == 1, [f"{w.filename}:{w.lineno}: {w.message}" for w in syncs]


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
def test_liger_kernels_give_the_plain_loss_and_gradients(tokenizer):
    """bf16 on CUDA: Liger's RMSNorm and RoPE against the model's own, loss and LoRA gradients
    (bf16 rounding: 1e-2 relative), and the set-up check keeps them."""
    from solotune.config import LoraConfig, PrecisionConfig, TrainConfig
    from solotune.data import collate_packed
    from solotune.fastpaths.kernels import use_liger
    from solotune.fastpaths.loss import ResponseLoss
    from solotune.fastpaths.selfcheck import RunShape, choose_fast_paths
    from solotune.model.adapters import apply_lora
    from solotune.model.precision import resolve_policy
    from solotune.testing import make_model, varied_examples

    policy = resolve_policy(PrecisionConfig(mp="bf16"), "cuda", frozen_base=True)
    model = apply_lora(make_model(tokenizer).to("cuda", torch.bfloat16), LoraConfig(r=4, dropout=0.0)).train()
    batch = collate_packed(varied_examples(tokenizer)).to("cuda")

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with policy.autocast():
            loss = ResponseLoss()(model, batch)
        loss.backward()
        return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    from solotune.fastpaths.attention import padding_free_attention

    with padding_free_attention(model, 512):
        plain_loss, plain = loss_and_grads()
        undo = use_liger(model)
        liger_loss, liger = loss_and_grads()
        undo()
    assert liger_loss == pytest.approx(plain_loss, rel=1e-2)
    for name, g in liger.items():
        assert (g - plain[name]).norm() <= 1e-2 * plain[name].norm(), name
    fast = choose_fast_paths(
        model, RunShape(varied_examples(tokenizer), tokenizer.pad_token_id, policy, TrainConfig(), 512)
    )
    assert fast.kernels == "liger", fast.notes
