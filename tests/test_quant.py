"""QLoRA (4-bit and 8-bit frozen bases via bitsandbytes) and the low-memory optimizers, on the CPU."""

import json

import pytest
import torch

from solotune.cli import main
from solotune.config import DataConfig, RunConfig, TrainConfig, validate
from solotune.data import Record, collate, tokenize_records
from solotune.errors import SolotuneError
from solotune.measure.memory import MIB
from solotune.model.adapters import load_adapter, save_trained
from solotune.model.models import load_model
from solotune.model.precision import resolve_policy
from solotune.model.quant import quant_state_tensors, quantization_config, quantized_linears
from solotune.testing import save_model_folder
from solotune.training.loop import train_loop
from solotune.training.setup import build_model

pytest.importorskip("bitsandbytes")  # in requirements.txt; a user's install may lack it

SHAPE = dict(hidden_size=256, num_hidden_layers=2)  # 256 x 256 weights: whole 64-weight blocks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_folder(tmp_path_factory.mktemp("quant-model"), **SHAPE)


@pytest.fixture(params=["standard", "cpu-gemm"])
def weight_layout(request, monkeypatch):
    """Both layouts bitsandbytes uses, whatever this CPU: on CPUs with AVX512-BF16 its Linear4bit
    layers are built to repack their weights into a CPU gemm layout the first time they run in
    eval mode without gradients (generations, a merge's reference forward)."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: request.param == "cpu-gemm")
    return request.param


def config(method="nf4", optim="adamw", mp="off", r=8, lr=1e-2) -> RunConfig:
    cfg = RunConfig()
    cfg.quant.method, cfg.train.optim, cfg.precision.mp = method, optim, mp
    cfg.lora.r, cfg.lora.dropout, cfg.train.lr, cfg.train.warmup_ratio = r, 0.0, lr, 0.0
    return validate(cfg)


def records(tokenizer, n=8):
    rows = [{"prompt": f"say {i}", "response": "the same short answer every time"} for i in range(n)]
    return tokenize_records([Record(r, f"row {i}") for i, r in enumerate(rows)], tokenizer, DataConfig())[0]


def train(model_dir, tokenizer, cfg: RunConfig, steps=6):
    torch.manual_seed(0)  # the LoRA init: the same adapter whatever ran before in the process
    policy = resolve_policy(cfg.precision, "cpu", frozen_base=True)
    model = build_model(str(model_dir), cfg, policy)
    train_cfg = TrainConfig(**{**vars(cfg.train), "batch": 4, "max_steps": steps, "epochs": 10})
    return model, train_loop(model, records(tokenizer), tokenizer.pad_token_id, policy, train_cfg)


def frozen_state(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if not p.requires_grad] + [
        t.clone() for t in quant_state_tensors(model)
    ]


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
def test_a_quantized_base_trains_and_only_the_adapters_change(model_dir, tokenizer, method):
    cfg = config(method)
    policy = resolve_policy(cfg.precision, "cpu", frozen_base=True)
    model = build_model(str(model_dir), cfg, policy)
    assert quantized_linears(model).layers == 2 * 7  # q, k, v, o, gate, up, down in each layer
    before, adapters = (
        frozen_state(model),
        {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
    )
    train_cfg = TrainConfig(batch=4, max_steps=8, epochs=10, lr=1e-2, warmup_ratio=0.0)
    result = train_loop(model, records(tokenizer), tokenizer.pad_token_id, policy, train_cfg)
    assert result.losses[-1] < 0.7 * result.losses[0]
    assert all(torch.equal(a, b) for a, b in zip(frozen_state(model), before))  # codes, scales, norms, embeddings
    assert all(not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if "lora_B" in n)


def test_the_quantized_linears_take_under_30_percent_of_their_bf16_size(model_dir):
    """Measured: the storage of the codes and the scales (double quantization) over 2 bytes per weight."""
    cfg = config("nf4")
    model = load_model(
        str(model_dir), cfg.model, torch.float32, torch.device("cpu"), quantization_config(cfg.quant, torch.bfloat16)
    )
    q = quantized_linears(model)
    attention, mlp = 2 * 256 * 256 + 2 * 256 * 128, 3 * 256 * 512  # q, o; k, v (2 of 4 heads); gate, up, down
    assert q.dense_16bit_bytes == 2 * 2 * (attention + mlp)  # 2 layers, 2 bytes a weight
    assert q.fraction <= 0.30
    assert q.weight_bytes == q.dense_16bit_bytes // 4  # 4 bits a weight


def test_the_memory_breakdown_counts_the_codes_and_their_scales_as_parameters(model_dir, tokenizer):
    model, result = train(model_dir, tokenizer, config("nf4"), steps=1)
    dense = sum(p.untyped_storage().nbytes() for p in {id(p): p for p in model.parameters()}.values())
    scales = sum(
        {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in quant_state_tensors(model)}.values()
    )
    assert result.memory["parameters_mib"] == pytest.approx((dense + scales) / MIB, rel=1e-6)


def test_the_adapter_saves_and_reloads_onto_the_quantized_base(model_dir, tokenizer, tmp_path):
    cfg = config("nf4")
    model, _ = train(model_dir, tokenizer, cfg, steps=3)
    save_trained(model, tokenizer, tmp_path / "adapter")
    batch = collate(records(tokenizer, 2), tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        trained = model(**batch.model_inputs()).logits
        base = load_model(
            str(model_dir), cfg.model, torch.float32, torch.device("cpu"), quantization_config(cfg.quant, torch.float32)
        )
        reloaded = load_adapter(base, tmp_path / "adapter").eval()(**batch.model_inputs()).logits
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-5)


def test_8bit_adamw_state_is_smaller_than_fp32_adamw(model_dir, tokenizer):
    """Measured optimizer state: two uint8 moments (+ a scale per 256) instead of two fp32 ones."""
    state = {}
    for optim in ("adamw", "adamw8bit"):
        _, result = train(model_dir, tokenizer, config("none", optim, r=32), steps=2)  # 32 x 256 adapters: 8-bit
        state[optim] = result.memory["optimizer_state_mib"]
    assert state["adamw8bit"] < 0.3 * state["adamw"]


def test_8bit_adamw_follows_fp32_adamw(model_dir, tokenizer):
    """The loss curves of 8-bit and fp32 AdamW over the same steps (2% tolerance, stated)."""
    curves = {
        optim: train(model_dir, tokenizer, config("none", optim, r=32, lr=3e-3))[1].losses
        for optim in ("adamw", "adamw8bit")
    }
    assert curves["adamw8bit"] == pytest.approx(curves["adamw"], rel=0.02)


def test_sgd_keeps_no_optimizer_state(model_dir, tokenizer):
    _, result = train(model_dir, tokenizer, config("none", "sgd", lr=0.5), steps=4)
    assert result.memory["optimizer_state_mib"] == 0 and result.losses[-1] < result.losses[0]


def test_bad_combinations_are_clear_errors(model_dir, tmp_path, capsys):
    cfg = config("nf4")
    cfg.lora.enabled = False
    with pytest.raises(
        SolotuneError, match="quant.method = 'nf4': a quantized base cannot be trained itself; it needs LoRA"
    ):
        validate(cfg)
    code = main(
        [
            "train",
            "--model",
            str(model_dir),
            "--optim",
            "paged_adamw8bit",
            "--device",
            "cpu",
            "--samples",
            "4",
            "--batch",
            "4",
            "--no-generate.enabled",
            "--output-dir",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "paged optimizers keep their state in CUDA unified memory and need a GPU" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("mp", ["off", "bf16"])
def test_a_qlora_run_trains_every_adapter_on_either_weight_layout(model_dir, weight_layout, mp, tmp_path):
    """The whole run, generations before training included: every lora_B moves off zero."""
    from safetensors.torch import load_file

    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"say {i}", "response": " the same answer"}) + "\n" for i in range(8))
    )
    args = [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--output-dir",
        str(tmp_path / "run"),
        "--quant",
        "nf4",
        "--mp",
        mp,
        "--batch",
        "4",
        "--lr",
        "1e-2",
        "--generate.max-new-tokens",
        "2",
        "--cpu-allocator",
        "glibc",
    ]
    assert main(args) == 0
    lora_b = {
        k: v for k, v in load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors").items() if "lora_B" in k
    }
    assert len(lora_b) == 2 * 3 and all(v.abs().sum() > 0 for v in lora_b.values())


def test_a_weight_repacked_for_cpu_inference_is_converted_back(model_dir, tokenizer):
    """A 4-bit weight bitsandbytes repacked already (its scales rounded to bf16 on the way) is
    put back in the standard layout, and trains: backward reaches the adapters again."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from solotune.model.quant import keep_4bit_layout_trainable

    cfg = config("nf4")
    model = load_model(
        str(model_dir), cfg.model, torch.float32, torch.device("cpu"), quantization_config(cfg.quant, torch.float32)
    )
    batch = collate(records(tokenizer, 2), tokenizer.pad_token_id)
    with torch.no_grad():
        before = model(**batch.model_inputs()).logits
    layers = [m for m in model.modules() if getattr(m.weight if hasattr(m, "weight") else None, "quant_state", None)]
    for m in layers:
        m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)
    assert keep_4bit_layout_trainable(model) == len(layers) == 14
    assert not any(m.weight.quant_state.packing_format_for_cpu for m in layers)
    with torch.no_grad():
        after = model(**batch.model_inputs()).logits
    # bitsandbytes' inverse is lossy: the scales went to bf16 and are quantized to 8 bits anew (measured 2%)
    assert (after - before).abs().max() <= 5e-2 * before.abs().max()
    from solotune.model.adapters import apply_lora

    adapted = apply_lora(model, cfg.lora).train()
    out = adapted(**batch.model_inputs()).logits
    out.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for n, p in adapted.named_parameters() if "lora_" in n)


def test_a_qlora_adapter_merges_into_its_dequantized_base(model_dir, tokenizer, tmp_path, capsys, weight_layout):
    """The merged model answers as the adapter on the 4-bit base did (fp32: within 1e-5 of the largest logit),
    and loads as a plain model; `generate` runs the adapter on the same 4-bit base; `export` writes
    the same merged model as GGUF (f32, read back by transformers)."""
    from solotune.model.adapters import merge_to_folder
    from solotune.model.quant import read_record, save_record
    from solotune.run.generate import load_for_inference

    cfg = config("nf4")
    model, _ = train(model_dir, tokenizer, cfg, steps=3)
    save_trained(model, tokenizer, tmp_path / "adapter")
    save_record(tmp_path / "adapter", cfg.quant, torch.float32)
    assert read_record(tmp_path / "adapter")[0].method == "nf4"
    diff = merge_to_folder(str(tmp_path / "adapter"), str(tmp_path / "merged"), str(model_dir))
    out = capsys.readouterr().out
    assert "de-quantized from nf4 to fp32" in out
    relative = float(out.split(" of the largest logit")[0].rsplit(" ", 1)[1])
    # fp32 rounding only: x @ (W + s BA) against x @ W + s (x @ A) @ B, at logits of ~10. Seen up
    # to 1.2e-5 across adapters; a wrong merge is off by the size of the update, ~1e-2 and more.
    assert 0 <= diff and relative < 5e-5
    merged = load_model(str(tmp_path / "merged"), cfg.model, torch.float32, torch.device("cpu"))
    assert quantized_linears(merged) is None and all(p.dtype == torch.float32 for p in merged.parameters())
    batch = collate(records(tokenizer, 2), tokenizer.pad_token_id)
    with torch.no_grad():
        merged_logits = merged(**batch.model_inputs()).logits
        model.eval()
        torch.testing.assert_close(merged_logits, model(**batch.model_inputs()).logits, rtol=1e-5, atol=2e-4)
    from transformers import AutoModelForCausalLM

    from solotune.run.export import export_gguf

    export_gguf(tmp_path / "qlora.gguf", "f32", adapter=str(tmp_path / "adapter"), model=str(model_dir))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="qlora.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch.model_inputs()).logits, merged_logits, rtol=1e-5, atol=1e-4)
    inference_model = load_for_inference(str(tmp_path / "adapter"), str(model_dir), cfg.precision, "cpu").model
    assert quantized_linears(inference_model).layers == 14


def test_a_qlora_run_with_8bit_adamw_resumes_exactly_from_a_checkpoint(model_dir, tokenizer, tmp_path):
    """The 8-bit moments and their scales go through the checkpoint: the resumed step equals the
    uninterrupted one bitwise (fp32)."""
    from solotune.training import checkpoint
    from solotune.training.optim import make_optimizer
    from solotune.training.step import StepContext, train_step

    cfg = config("nf4", "adamw8bit", r=32)
    policy = resolve_policy(cfg.precision, "cpu", frozen_base=True)
    batch = [collate(records(tokenizer, 4), tokenizer.pad_token_id)]

    def fresh():
        model = build_model(str(model_dir), cfg, policy).train()
        return (model, *make_optimizer(model, cfg.train, total_steps=4))

    model, optimizer, scheduler = fresh()
    for _ in range(2):
        train_step(StepContext(model, optimizer, scheduler, policy), batch)
    checkpoint.save(tmp_path, checkpoint.Payload(2, model, optimizer, scheduler, policy.scaler, {}), {}, keep=1)
    expected = train_step(StepContext(model, optimizer, scheduler, policy), batch).loss

    resumed, optimizer2, scheduler2 = fresh()
    checkpoint.restore(checkpoint.latest(tmp_path), resumed, optimizer2, scheduler2, policy.scaler)
    assert train_step(StepContext(resumed, optimizer2, scheduler2, policy), batch).loss == expected
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
