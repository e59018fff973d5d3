import pytest
import torch
from peft import PeftModel

from solotune.config import LoraConfig
from solotune.errors import SolotuneError
from solotune.model.adapters import apply_lora, count_parameters, merge_adapter, resolve_targets, save_trained
from solotune.testing import make_architecture, make_model


@pytest.fixture
def inputs(tokenizer):
    return tokenizer(["a short test input", "another one"], return_tensors="pt", padding=True)


def perturb_adapters(model, seed=1):
    """LoRA's B starts at zero; give it values so that the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05


def test_lora_equals_the_base_model_at_init(tokenizer, inputs):
    base = make_model(tokenizer)
    with torch.no_grad():
        reference = base(**inputs).logits
        lora = apply_lora(base, LoraConfig(dropout=0.0)).eval()
        assert torch.equal(lora(**inputs).logits, reference)


def test_only_adapter_parameters_train(tokenizer):
    model = apply_lora(make_model(tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    summary = count_parameters(model)
    hidden, layers, kv = 64, 2, 32  # v_proj maps 64 -> 2 kv heads x 16
    assert summary.trainable == layers * (4 * hidden + 4 * hidden + 4 * hidden + 4 * kv)
    assert summary.line().startswith(
        f"trainable params: {summary.trainable:,} || all params: {summary.total:,} || trainable%: "
    )


def test_all_linear_adapts_every_projection(tokenizer):
    model = apply_lora(make_model(tokenizer), LoraConfig(target_modules=["all-linear"]))
    adapted = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize(
    "family, expected",
    [
        ("llama", ["q_proj", "k_proj", "v_proj"]),
        ("qwen2", ["q_proj", "k_proj", "v_proj"]),
        ("gemma", ["q_proj", "k_proj", "v_proj"]),
        ("granite", ["q_proj", "k_proj", "v_proj"]),
        ("gpt2", ["c_attn"]),
        ("gpt_neox", ["query_key_value"]),
        ("phi3", ["qkv_proj"]),
    ],
)
def test_the_default_targets_are_each_models_attention_input_projections(tokenizer, family, expected):
    model = make_architecture(family, tokenizer)
    assert resolve_targets(model, ["attention"])[0] == expected
    adapted = apply_lora(model, LoraConfig())
    assert {n.split(".")[-4] for n, p in adapted.named_parameters() if p.requires_grad} == set(expected)


def test_unknown_target_module_lists_the_real_ones(tokenizer):
    with pytest.raises(
        SolotuneError,
        match=r"qkv_proj not in this model; its linear layers are: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj",
    ):
        apply_lora(make_model(tokenizer), LoraConfig(target_modules=["q_proj", "qkv_proj"]))


def test_saved_adapter_reloads_in_peft_with_identical_logits(tokenizer, inputs, tmp_path):
    model = apply_lora(make_model(tokenizer), LoraConfig(dropout=0.0)).eval()
    perturb_adapters(model)
    save_trained(model, tokenizer, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(make_model(tokenizer), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)


def test_merged_equals_unmerged(tokenizer, inputs):
    model = apply_lora(make_model(tokenizer), LoraConfig(dropout=0.0)).eval()
    perturb_adapters(model)
    with torch.no_grad():
        unmerged = model(**inputs).logits
        base_out = make_model(tokenizer)(**inputs).logits
        merged = merge_adapter(model)
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        merged_out = merged(**inputs).logits
    assert not torch.allclose(unmerged, base_out, atol=1e-3)  # the adapter does change the output
    # fp32 rounding of W + BA vs W x + B(A x) on logits of magnitude ~10.
    torch.testing.assert_close(merged_out, unmerged, atol=1e-4, rtol=1e-4)
