"""Any causal LM: tiny random models of seven families, each through train, merge and generate
with the default settings (the attention projections as LoRA targets, every fast path asked for)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from solotune.cli import main
from solotune.testing import ARCHITECTURES, save_architecture_folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "data.jsonl"
    rows = [{"prompt": f"question {i}: " + "x" * (3 + 5 * i), "response": "y" * (4 + 3 * (12 - i))} for i in range(12)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def train(model_dir, data_file, out, *extra):
    args = [
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
        "--lora.dropout",
        "0",
        "--generate.max-new-tokens",
        "3",
        "--cpu-allocator",
        "glibc",
        *extra,
    ]
    assert main(args) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("family", list(ARCHITECTURES))
def test_every_family_trains_merges_and_generates_with_the_defaults(family, data_file, tmp_path, capsys):
    model_dir = save_architecture_folder(tmp_path / family, family)
    fast = train(model_dir, data_file, tmp_path / "fast")
    padded = train(model_dir, data_file, tmp_path / "padded", "--no-train.padding-free", "--train.ce-chunk", "0")
    out = capsys.readouterr().out
    assert "lora targets: " in out and "(the attention input projections of" in out

    # Padding-free equals padded step by step (fp32), or the set-up check turned it off and said why.
    paths = fast["fast_paths"]
    if paths["padding_free"]:
        torch.testing.assert_close(fast["train"]["loss_curve"], padded["train"]["loss_curve"], rtol=1e-5, atol=0)
    else:
        assert any(n.startswith("padding-free rows off for this model: ") for n in paths["notes"])
    # Every adapter trained: a lora_B that stayed zero is a layer backward never reached.
    weights = tmp_path / "fast" / "adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file

    lora_b = {k: v for k, v in load_file(weights).items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())

    assert main(["merge", "--adapter", str(tmp_path / "fast" / "adapter"), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__ == type(AutoModelForCausalLM.from_pretrained(model_dir)).__name__
    assert (
        main(
            [
                "generate",
                "--adapter",
                str(tmp_path / "fast" / "adapter"),
                "--instruction",
                "Say hi.",
                "--max-new-tokens",
                "3",
                "--mp",
                "off",
            ]
        )
        == 0
    )
    assert "generations (" in capsys.readouterr().out


def test_granite_logits_scaling_turns_the_chunked_head_off(data_file, tmp_path, capsys, monkeypatch):
    """Granite divides the logits by logits_scaling after the LM head, which the chunked loss
    would skip: its config declares it, and where no declaration were known the set-up check
    finds the difference; either way the run computes the full logits."""
    from solotune import selfcheck

    model_dir = save_architecture_folder(tmp_path / "granite", "granite")
    fast = train(model_dir, data_file, tmp_path / "run", "--max-steps", "2", "--no-generate.enabled")
    assert fast["fast_paths"]["ce_chunk"] == 0 and fast["fast_paths"]["padding_free"]
    assert (
        "chunked LM head + cross-entropy off for this model: its logits are scaled after the head "
        "(logits_scaling = 4.0)" in capsys.readouterr().out
    )
    monkeypatch.setattr(selfcheck, "LOGIT_CHANGES", {})
    measured = train(model_dir, data_file, tmp_path / "measured", "--max-steps", "2", "--no-generate.enabled")
    assert measured["fast_paths"]["ce_chunk"] == 0
    assert "chunked LM head + cross-entropy off for this model: it differs" in capsys.readouterr().out
    full = train(
        model_dir, data_file, tmp_path / "full", "--max-steps", "2", "--no-generate.enabled", "--train.ce-chunk", "0"
    )
    assert fast["train"]["loss_curve"] == full["train"]["loss_curve"]
