"""`solotune export`: GGUF files read back by an independent reader (transformers' GGUF loader)
and compared with the merged Hugging Face model they came from."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from solotune.cli import main
from solotune.config import REFERENCE_PROMPTS, ModelConfig
from solotune.model.adapters import merged_model
from solotune.model.models import GGUF_ORIGIN_FILE, gguf_origin, resolve_model_source
from solotune.run.export import export_gguf
from solotune.testing import make_architecture, make_sentencepiece_tokenizer, save_architecture_folder

# Strings whose token ids must survive the round trip: ASCII, accents, emoji, code, digits.
TOKENIZER_PROBES = [
    "Hello world",
    "héllo café, naïve señor",
    "emoji 🤗🚀 and ✓",
    "def f(x):\n\treturn x**2  # ok",
    "1234567 + 89",
]


@pytest.fixture(scope="module")
def smollm2():
    """The embedded default's converted folder, shared with the user's cache (converted once)."""
    with pytest.MonkeyPatch.context() as env:
        env.delenv("SOLOTUNE_CACHE", raising=False)
        return resolve_model_source(ModelConfig())


@pytest.fixture(scope="module")
def adapters(smollm2, tmp_path_factory):
    """Tiny random Llama, Qwen2 and Mistral models with SmolLM2's tokenizer (a real BPE with
    merges), each with a LoRA adapter whose update is not zero (random A and B), so that the
    export has something to merge."""
    from peft import LoraConfig, get_peft_model

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    folders = {}
    for family, model_type in (("llama", "llama"), ("qwen2", "qwen2"), ("mistral", "mistral")):
        root = tmp_path_factory.mktemp(family)
        arch = "qwen2" if family == "qwen2" else "llama"
        make_architecture(arch, tokenizer, model_type=model_type).save_pretrained(root / "base")
        tokenizer.save_pretrained(root / "base")
        base = AutoModelForCausalLM.from_pretrained(root / "base")
        lora = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
        get_peft_model(base, lora).save_pretrained(root / "adapter")
        tokenizer.save_pretrained(root / "adapter")
        folders[family] = root / "adapter"
    return folders


def load_gguf(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def largest_logit_gap(a, b, tokenizer) -> tuple[float, float]:
    """The largest logit difference over the evaluation prompts, and the largest logit."""
    gap = scale = 0.0
    with torch.no_grad():
        for prompt in REFERENCE_PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")
            la, lb = a(**ids).logits, b(**ids).logits
            gap, scale = max(gap, (la - lb).abs().max().item()), max(scale, la.abs().max().item())
    return gap, scale


def greedy(model, tokenizer, prompt: str, n: int = 12) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return out[0, ids["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_an_adapter_exported_as_f16_answers_as_the_merged_model(family, adapters, tmp_path):
    """f16: the logits within 1e-2 of the largest logit on the evaluation prompts, and the same
    greedy tokens. On the Llama graph the q/k rows are reordered for llama.cpp's RoPE; a wrong
    order fails here by far more than the tolerance."""
    out = tmp_path / f"{family}.gguf"
    result = export_gguf(out, "f16", adapter=str(adapters[family]))
    merged, tokenizer, _ = merged_model(adapters[family])
    exported = load_gguf(out)
    gap, scale = largest_logit_gap(merged, exported, tokenizer)
    assert gap <= 1e-2 * scale, f"{family}: {gap:.2e} of {scale:.2e}"
    for prompt in REFERENCE_PROMPTS[:2]:
        assert greedy(exported, tokenizer, prompt) == greedy(merged, tokenizer, prompt)
    assert result.tensors == len(exported.state_dict()) and result.fallback_f16 == 0
    assert not list(tmp_path.glob("*.part"))


def test_a_sentencepiece_tokenizer_round_trips(tmp_path):
    """Llama 2's kind of tokenizer (llama.cpp's "llama" model, with scores from the merge order):
    the same ids for text with spaces, accents and emoji (byte pieces), and the same logits."""
    tokenizer = make_sentencepiece_tokenizer()
    make_architecture("llama", tokenizer).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    export_gguf(tmp_path / "spm.gguf", "f32", model=str(tmp_path / "m"))
    read_back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in ["What is the cat?", "  two spaces, at it", *TOKENIZER_PROBES]:
        assert read_back(text)["input_ids"] == tokenizer(text)["input_ids"], text
    import gguf

    fields = gguf.GGUFReader(tmp_path / "spm.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[0] == gguf.TokenType.UNKNOWN and types[3] == gguf.TokenType.BYTE and types[1] == gguf.TokenType.CONTROL
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    gap, scale = largest_logit_gap(original, load_gguf(tmp_path / "spm.gguf"), tokenizer)
    assert gap <= 1e-4 * scale


def test_q8_0_is_within_5_percent_and_q4_0_is_written_as_q4_0(adapters, tmp_path):
    import gguf

    merged, tokenizer, _ = merged_model(adapters["llama"])
    export_gguf(tmp_path / "q8.gguf", "q8_0", adapter=str(adapters["llama"]))
    gap, scale = largest_logit_gap(merged, load_gguf(tmp_path / "q8.gguf"), tokenizer)
    assert gap <= 0.05 * scale, f"{gap:.2e} of {scale:.2e}"
    export_gguf(tmp_path / "q4.gguf", "q4_0", adapter=str(adapters["llama"]))
    q4, q8 = (gguf.GGUFReader(tmp_path / name).tensors for name in ("q4.gguf", "q8.gguf"))
    types = {t.name: t.tensor_type.name for t in q4}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert sum(t.n_bytes for t in q4) < 0.6 * sum(t.n_bytes for t in q8)  # 18 bytes a block of 32 against 34


def test_the_embedded_default_round_trips_with_its_tokenizer_and_chat_template(smollm2, tmp_path, capsys):
    """SmolLM2-135M (a full model folder, as a full fine-tune saves one): f16 logits, greedy
    tokens, the token ids of ASCII, accents, emoji and code, the chat template, llama.cpp's
    pre-tokenizer name from the original GGUF, and the Ollama Modelfile."""
    out = tmp_path / "smollm2.gguf"
    assert main(["export", "--model", smollm2, "--gguf", str(out), "--ollama"]) == 0
    assert "exported" in capsys.readouterr().out
    original = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    exported = load_gguf(out)
    gap, scale = largest_logit_gap(original, exported, tokenizer)
    assert gap <= 1e-2 * scale, f"{gap:.2e} of {scale:.2e}"
    assert greedy(exported, tokenizer, REFERENCE_PROMPTS[0]) == greedy(original, tokenizer, REFERENCE_PROMPTS[0])
    read_back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    for text in TOKENIZER_PROBES:
        assert read_back(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert read_back.chat_template == tokenizer.chat_template
    import gguf

    fields = gguf.GGUFReader(str(out)).fields
    assert fields["tokenizer.ggml.pre"].contents() == gguf_origin(smollm2)["tokenizer.ggml.pre"] == "smollm"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./smollm2.gguf\nTEMPLATE") and "<|im_start|>{{ .Role }}" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_weights_trained_from_a_gguf_keep_its_origin(smollm2, tmp_path):
    """A run's saved adapter carries the GGUF origin of its base (what `export` reads)."""
    from solotune.model.models import copy_gguf_origin

    copy_gguf_origin(smollm2, tmp_path)
    assert gguf_origin(tmp_path) == gguf_origin(smollm2) and (tmp_path / GGUF_ORIGIN_FILE).is_file()


def test_bad_input_is_one_line_and_leaves_no_file(adapters, tmp_path, capsys):
    adapter = str(adapters["llama"])
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    unsupported = save_architecture_folder(tmp_path / "phi3", "phi3")
    orphan = tmp_path / "orphan"
    shutil.copytree(adapter, orphan)
    config = (orphan / "adapter_config.json").read_text()
    base = str(adapters["llama"].parent / "base")
    (orphan / "adapter_config.json").write_text(config.replace(base, str(tmp_path / "gone")))
    (tmp_path / "a-file").write_text("")
    cases = {
        "--type q3_k": ["--adapter", adapter, "--gguf", str(out), "--type", "q3_k"],
        "Phi3ForCausalLM is not supported; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM": [
            "--model",
            str(unsupported),
            "--gguf",
            str(out),
        ],
        "cannot write there": ["--adapter", adapter, "--gguf", str(tmp_path / "a-file" / "m.gguf")],
        "not found": ["--adapter", str(orphan), "--gguf", str(out)],
    }
    for expected, args in cases.items():
        assert main(["export", *args]) == 2, expected
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (expected, err)
    assert list(out.parent.iterdir()) == []


def test_an_ablation_exports_every_cell_and_tables_the_sizes(tiny_model_dir, tmp_path, capsys):
    """--export.gguf at the end of each run: the adapter cell merged, the full fine-tune as it
    is; the size and time in metrics.json, the run summary and Table 2."""
    grid = tmp_path / "grid"
    args = ["ablate", "--axes", "lora", "--model", str(tiny_model_dir), "--samples", "8", "--batch", "4",
            "--max-steps", "1", "--mp", "off", "--no-generate.enabled", "--export.gguf", "q8_0",
            "--output-dir", str(grid)]  # fmt: skip
    assert main(args) == 0
    sizes = {}
    for cell in ("lora-on", "lora-off"):
        folder = grid / "cells" / cell
        export = json.loads((folder / "metrics.json").read_text())["export"]
        assert export["path"] == str(folder / "model-q8_0.gguf") and export["type"] == "q8_0"
        assert export["mib"] == pytest.approx((folder / "model-q8_0.gguf").stat().st_size / 2**20)
        assert "exported " in (folder / "log.txt").read_text()
        sizes[cell] = f"{export['mib']:,.1f}"
    row = next(line for line in (grid / "table2.txt").read_text().splitlines() if line.startswith("GGUF MiB"))
    assert row.split()[2:] == [sizes["lora-off"], sizes["lora-on"]]  # the cells' column order
