"""bf16 on a CPU that emulates it: the fast-layout linears and head compute autograd's numbers.

Whether this CPU emulates bf16 is forced both ways (`cpu_has_native_bf16`), so each path is tested on
every machine; the numbers are compared with autograd's own bf16 linear, whose products round
once to bf16 per element as these do (stated tolerances).
"""

import pytest
import torch
import torch.nn.functional as F

from solotune.config import DataConfig, LoraConfig, RunConfig, TrainConfig
from solotune.data import Record, collate_packed, tokenize_records
from solotune.fastpaths import cpu_bf16
from solotune.fastpaths.loss import ResponseLoss
from solotune.model.adapters import apply_lora
from solotune.model.precision import resolve_policy
from solotune.testing import make_model, save_model_folder
from solotune.testing import varied_examples as examples
from solotune.training.loop import train_loop
from solotune.training.setup import build_model

BF16 = torch.bfloat16


@pytest.fixture
def emulated(monkeypatch):
    """This CPU treated as one that multiplies bf16 in software."""
    monkeypatch.setattr(cpu_bf16, "cpu_has_native_bf16", lambda: False)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def test_column_major_keeps_shape_and_values():
    t = torch.randn(5, 3)
    cm = cpu_bf16.column_major(t)
    assert cm.shape == t.shape and torch.equal(cm, t)
    assert cm.stride() == (1, 5)


@pytest.mark.parametrize("weight_dtype", [torch.float32, BF16], ids=["fp32-weight", "bf16-weight"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_fast_layout_linear_equals_autocasts_linear(emulated, weight_dtype, bias):
    """Output equal; gradients of input, weight and bias within 1e-2 (one bf16 rounding) and in each one's dtype."""
    torch.manual_seed(0)
    ref = torch.nn.Linear(48, 96, bias=bias).to(weight_dtype)
    fast = torch.nn.Linear(48, 96, bias=bias).to(weight_dtype)
    fast.load_state_dict(ref.state_dict())
    assert cpu_bf16.use_fast_layouts(fast) == 1
    x = torch.randn(2, 7, 48)
    results = []
    for layer in (ref, fast):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=BF16):
            y = layer(xi)
        (y.float() * torch.linspace(-1, 1, 96)).sum().backward()
        results.append((y, xi.grad, *(p.grad for p in layer.parameters())))
    (y_ref, *grads_ref), (y, *grads) = results
    assert y.dtype == BF16 and torch.equal(y, y_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.dtype == g_ref.dtype
        assert relative(g, g_ref) < 1e-2


def test_outside_autocast_a_fast_layout_linear_is_a_plain_linear(emulated):
    layer = torch.nn.Linear(8, 4)
    cpu_bf16.use_fast_layouts(layer)
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    cpu_bf16.restore_layouts(layer)
    assert "forward" not in layer.__dict__


def loss_and_grads(model, batch, chunk):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=BF16):
        loss = ResponseLoss(chunk=chunk)(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
@pytest.mark.parametrize("chunk", [0, 7], ids=["full-logits", "fused-head"])
def test_a_model_with_fast_layouts_trains_as_autograd_does(tokenizer, monkeypatch, full, chunk):
    """Loss within 1e-3 and every gradient within 1e-2 of autograd's layouts, under bf16 autocast."""
    model = make_model(tokenizer)
    if full:
        model.train().requires_grad_(True)
    else:
        model = apply_lora(model, LoraConfig(r=4, dropout=0.0))
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # a non-zero update, so that gradients flow through both adapter matrices
                p.data.normal_(std=0.02)
    batch = collate_packed(examples(tokenizer))
    monkeypatch.setattr(cpu_bf16, "cpu_has_native_bf16", lambda: True)  # the reference: autograd's own layouts
    ref_loss, ref_grads = loss_and_grads(model, batch, chunk)
    monkeypatch.setattr(cpu_bf16, "cpu_has_native_bf16", lambda: False)
    assert cpu_bf16.use_fast_layouts(model) > 0
    loss, grads = loss_and_grads(model, batch, chunk)
    assert loss == pytest.approx(ref_loss, rel=1e-3)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert relative(g, ref_grads[name]) < 1e-2, name


@pytest.mark.parametrize("native", [False, True], ids=["emulated", "native"])
@pytest.mark.parametrize("mp", ["bf16", "off"])
def test_build_model_lays_out_linears_only_where_bf16_is_emulated(tmp_path, monkeypatch, native, mp):
    monkeypatch.setattr(cpu_bf16, "cpu_has_native_bf16", lambda: native)
    cfg = RunConfig()
    cfg.precision.mp = mp
    policy = resolve_policy(cfg.precision, "cpu", frozen_base=True)
    model = build_model(str(save_model_folder(tmp_path / "m", num_hidden_layers=1)), cfg, policy)
    patched = [m for m in model.modules() if "forward" in m.__dict__ and type(m) is torch.nn.Linear]
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert len(patched) == (len(linears) if mp == "bf16" and not native else 0)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_fast_layouts_hold_what_autograd_holds(tmp_path, tokenizer, monkeypatch, lora):
    """The tracked peak and its activations equal autograd's within 1%, to the same step's losses.

    Saving each frozen layer's input (which autograd's linear does not keep) added 26% of the
    activations of a LoRA step of the embedded default."""
    folder = str(save_model_folder(tmp_path / "m", hidden_size=128, intermediate_size=512, num_hidden_layers=2))
    rows = [{"prompt": "p" * 60, "response": "r" * 90}] * 4
    exs, _, _ = tokenize_records([Record(r, f"row {i}") for i, r in enumerate(rows)], tokenizer, DataConfig())
    results = {}
    for native in (True, False):
        monkeypatch.setattr(cpu_bf16, "cpu_has_native_bf16", lambda native=native: native)
        cfg = RunConfig()
        cfg.precision.mp, cfg.lora.enabled, cfg.lora.dropout = "bf16", lora, 0.0
        policy = resolve_policy(cfg.precision, "cpu", frozen_base=lora)
        torch.manual_seed(0)
        model = build_model(folder, cfg, policy)
        train = TrainConfig(batch=4, max_steps=1, track_memory="always")
        results[native] = train_loop(model, exs, tokenizer.pad_token_id, policy, train)
    ref, fast = results[True], results[False]
    assert fast.losses == pytest.approx(ref.losses, rel=1e-3)
    for part in ("tracked_peak_mib", "activations_mib"):
        assert fast.memory[part] == pytest.approx(ref.memory[part], rel=0.01), part


def test_matmul_copies_a_slice_of_rows_at_a_time_where_bf16_is_emulated(monkeypatch):
    """The same product as `a @ b` (within one bf16 rounding), never copying more than SLICE_ROWS rows."""
    torch.manual_seed(0)
    a, b = torch.randn(6, 50, dtype=BF16), torch.randn(50, 8, dtype=BF16)
    copies = []
    column_major = cpu_bf16.column_major
    monkeypatch.setattr(cpu_bf16, "column_major", lambda t: copies.append(t.shape[0]) or column_major(t))
    monkeypatch.setattr(cpu_bf16, "SLICE_ROWS", 16)
    monkeypatch.setattr(cpu_bf16, "cpu_has_native_bf16", lambda: True)
    assert torch.equal(cpu_bf16.matmul(a, b), a @ b) and copies == []
    monkeypatch.setattr(cpu_bf16, "cpu_has_native_bf16", lambda: False)
    product = cpu_bf16.matmul(a, b)
    assert copies == [16, 16, 16, 2] and product.dtype == BF16
    assert relative(product, a.float() @ b.float()) < 1e-2
    assert torch.equal(cpu_bf16.matmul(a.float(), b.float()), a.float() @ b.float())  # fp32: untouched


def test_a_peak_cached_on_a_cpu_with_bf16_is_not_read_on_one_without(monkeypatch):
    """The matmul peak's cache key tells the two apart: their bf16 peaks differ a hundredfold."""
    from solotune.measure import flops

    monkeypatch.setattr(flops, "cpu_has_native_bf16", lambda: True)
    with_bf16 = flops._device_name(torch.device("cpu"))
    monkeypatch.setattr(flops, "cpu_has_native_bf16", lambda: False)
    assert flops._device_name(torch.device("cpu")) != with_bf16
