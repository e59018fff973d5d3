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
    from solotune.fastpaths import selfcheck

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


def test_a_model_without_attention_trains_or_says_in_one_line_what_to_adapt(data_file, tmp_path, capsys):
    """Mamba has no attention heads (its FLOPs had no attention width to read: a traceback) and
    no attention projections; peft refuses two of its linear layers (a traceback too)."""
    from transformers import MambaConfig, MambaForCausalLM

    from solotune.testing import make_tokenizer

    tokenizer = make_tokenizer()
    folder = tmp_path / "mamba"
    config = MambaConfig(vocab_size=len(tokenizer), hidden_size=64, state_size=8, num_hidden_layers=2, pad_token_id=0)
    MambaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    args = ["--max-steps", "2", "--no-generate.enabled"]
    with pytest.raises(AssertionError):  # exit status 2, one line
        train(folder, data_file, tmp_path / "refused", *args)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("solotune: error: LoRA cannot adapt MambaForCausalLM this way: ")
    assert "Its linear layers: dt_proj, in_proj, lm_head, out_proj, x_proj; choose with --lora.target-modules" in error
    metrics = train(folder, data_file, tmp_path / "run", *args, "--lora.target-modules", "in_proj", "x_proj")
    assert metrics["train"]["steps"] == 2 and metrics["train"]["mfu"] > 0


def test_a_generation_transformers_cannot_make_is_skipped_and_named(data_file, tmp_path, capsys, monkeypatch):
    from solotune.run import train as train_module

    def broken(*_):
        raise ValueError("this model's generation config is invalid\nmore detail")

    monkeypatch.setattr(train_module, "generate", broken)
    model_dir = save_architecture_folder(tmp_path / "llama", "llama")
    metrics = train(model_dir, data_file, tmp_path / "run", "--max-steps", "2")
    assert metrics["train"]["steps"] == 2
    out = capsys.readouterr().out
    assert (
        "generations: skipped, transformers could not generate with this model "
        "(ValueError: this model's generation config is invalid)" in out
    )
