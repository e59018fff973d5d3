"""End to end through the `solotune` command, on a tiny model the tests build."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from solotune.cli import main


@pytest.fixture
def data_file(tmp_path):
    f = tmp_path / "data.jsonl"
    rows = [
        {"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(1, i + 2)))} for i in range(12)
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def train_args(model_dir, data_file, out, *extra):
    return [
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
        "--generate.max-new-tokens",
        "4",
        *extra,
    ]


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """One LoRA run (3 steps), shared by the tests that read its artifacts."""
    tmp = tmp_path_factory.mktemp("run")
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "response": f" {i + 1}"}) + "\n" for i in range(12)))
    assert main(train_args(tiny_model_dir, data, tmp / "out", "--grad-accum", "2", "--lora.dropout", "0")) == 0
    return tmp / "out"


def test_train_writes_metrics_config_and_a_peft_adapter(lora_run):
    m = json.loads((lora_run / "metrics.json").read_text())
    assert m["params"]["line"].startswith("trainable params: ")
    assert 0 < m["params"]["trainable"] < m["params"]["total"]
    t = m["train"]
    assert t["steps"] == 3 and len(t["loss_curve"]) == 3
    assert t["avg_loss"] == pytest.approx(sum(t["loss_curve"]) / 3) and t["final_loss"] == t["loss_curve"][-1]
    assert t["tokens_per_s"] > 0 and t["runtime_s"] > 0 and 0 <= t["padding_fraction"] < 1
    mem = m["memory"]
    assert mem["peak_mib"] > 0 and mem["kind"] in ("cpu_rss", "cuda_allocator")
    assert mem["tracked_peak_mib"] > mem["parameters_mib"] > 0
    assert m["config"]["train"]["grad_accum"] == 2 and m["versions"]["torch"] == torch.__version__
    assert len(m["generations"]["before"]) == len(m["generations"]["after"]) == 4
    assert all(g["seconds"] > 0 for g in m["generations"]["after"])
    assert (lora_run / "config.yaml").is_file()
    assert {p.name for p in (lora_run / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}


def test_train_prints_the_parameter_line_and_summary(tiny_model_dir, data_file, tmp_path, capsys):
    assert main(train_args(tiny_model_dir, data_file, tmp_path / "o", "--max-steps", "1", "--no-generate.enabled")) == 0
    out = capsys.readouterr().out
    assert "trainable params: " in out and " || all params: " in out and " || trainable%: " in out
    assert "average loss:" in out and "peak RSS of the loop" in out and "tokens/s" in out


def generated_answer(capsys, *source) -> str:
    """The answer line `solotune generate` prints for the prompt "3 + 1 =" (greedy, 6 tokens)."""
    argv = ["generate", *source, "--prompt", "3 + 1 =", "--max-new-tokens", "6", "--mp", "off"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    prompt_line = lines.index("> '3 + 1 ='")
    assert "tokens/s in its batch" in lines[prompt_line + 2]
    return lines[prompt_line + 1]


def test_generate_answers_with_the_adapter_not_the_bare_base(lora_run, tiny_model_dir, tmp_path, capsys, tokenizer):
    """The answer through `--adapter` is the adapted model's greedy answer, and it differs from the
    base's. The 3-step adapter barely moves the tiny model, so a copy with large random B matrices
    stands in for a trained one: an adapter the CLI ignored would answer as the base does."""
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "strong-adapter"
    shutil.copytree(lora_run / "adapter", adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name, w in weights.items():
        if "lora_B" in name:
            weights[name] = torch.randn(w.shape, generator=generator, dtype=w.dtype)
    save_file(weights, adapter / "adapter_model.safetensors")

    with_adapter = generated_answer(capsys, "--adapter", str(adapter))
    # The adapter was trained on prompt/response records: it is asked with the text as given, and
    # so is the base (without --raw, a base without a record is asked through its chat template).
    base_only = generated_answer(capsys, "--model", str(tiny_model_dir), "--raw")
    assert with_adapter != base_only

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).eval()
    inputs = tokenizer("3 + 1 =", return_tensors="pt")
    with torch.no_grad():
        tokens = reference.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = tokenizer.decode(tokens[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert with_adapter.strip() == repr(expected.strip())


def test_merge_matches_the_adapter_model(lora_run, tiny_model_dir, tmp_path, tokenizer):
    assert main(["merge", "--adapter", str(lora_run / "adapter"), "--output", str(tmp_path / "merged")]) == 0
    inputs = tokenizer("5 + 1 =", return_tensors="pt")
    adapter_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_run / "adapter"
    ).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapter_model(**inputs).logits, atol=1e-4, rtol=1e-4)


def test_full_finetune_saves_a_plain_model(tiny_model_dir, data_file, tmp_path):
    assert (
        main(
            train_args(
                tiny_model_dir, data_file, tmp_path / "o", "--no-lora", "--max-steps", "1", "--no-generate.enabled"
            )
        )
        == 0
    )
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["params"]["trainable"] == m["params"]["total"]
    assert (tmp_path / "o" / "model" / "model.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "model")


def test_a_finished_run_folder_is_not_overwritten(lora_run, tiny_model_dir, data_file, capsys):
    assert main(train_args(tiny_model_dir, data_file, lora_run)) == 2
    assert "already holds a finished run" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--grad-accum", "3"], "solotune: error: train.grad_accum = 3: must divide the batch (8)"),
        (
            ["train", "--model", "./no/such/folder", "--mp", "off"],
            "solotune: error: model folder ./no/such/folder not found",
        ),
        (
            ["train", "--model", "no-such-org/no-such-model", "--mp", "off"],
            "solotune: error: could not load model 'no-such-org/no-such-model' from the Hugging Face hub",
        ),
        (["train", "--data", "missing.json"], "solotune: error: data file missing.json not found"),
        (
            ["generate", "--adapter", "/nonexistent/adapter"],
            "solotune: error: model folder /nonexistent/adapter not found",
        ),
    ],
)
def test_user_errors_are_one_clear_line(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.rglob("metrics.json"))


def test_no_traceback_reaches_the_user(tmp_path):
    """The real process: exit status 2 and the message alone on stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "solotune.cli", "train", "--lora.dropout", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "solotune: error: lora.dropout = 2.0: must be in [0, 1)"


def test_unknown_target_module_is_reported_before_training(tiny_model_dir, data_file, tmp_path, capsys):
    assert main(train_args(tiny_model_dir, data_file, tmp_path / "o", "--target-modules", "qkv")) == 2
    assert (
        "lora.target_modules: qkv not in this model; its linear layers are: down_proj, gate_proj"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "o").exists()  # the run folder it created is gone again
