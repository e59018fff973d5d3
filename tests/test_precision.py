import pytest
import torch

from solotune.config import PrecisionConfig
from solotune.errors import SolotuneError
from solotune.model.precision import cpu_has_native_bf16, resolve_policy


def test_off_is_fp32_without_autocast_or_scaler():
    p = resolve_policy(PrecisionConfig(mp="off"), "cpu", frozen_base=True)
    assert p.compute_dtype == p.base_dtype == torch.float32 and not p.scaler.is_enabled()
    with p.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_fp16_scales_the_loss_and_lora_keeps_the_base_in_fp16():
    p = resolve_policy(PrecisionConfig(mp="fp16"), "cpu", frozen_base=True)
    assert p.scaler.is_enabled() and p.base_dtype == torch.float16
    with p.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16


def test_bf16_needs_no_scaler_and_full_finetuning_keeps_fp32_master_weights():
    p = resolve_policy(PrecisionConfig(mp="bf16"), "cpu", frozen_base=False)
    assert p.compute_dtype == torch.bfloat16 and p.base_dtype == torch.float32 and not p.scaler.is_enabled()
    assert resolve_policy(PrecisionConfig(mp="bf16", base_dtype="fp32"), "cpu", True).base_dtype == torch.float32


def test_auto_picks_bf16_only_on_cpus_with_native_bf16():
    p = resolve_policy(PrecisionConfig(), "cpu", frozen_base=True)
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert p.compute_dtype == expected
    assert any("mixed precision" in r for r in p.reasons)


def test_fp16_full_finetune_and_missing_gpu_are_refused():
    with pytest.raises(SolotuneError, match="base_dtype = fp16 with full fine-tuning"):
        resolve_policy(PrecisionConfig(mp="fp16", base_dtype="fp16"), "cpu", frozen_base=False)
    if not torch.cuda.is_available():
        with pytest.raises(SolotuneError, match="no CUDA GPU is visible"):
            resolve_policy(PrecisionConfig(), "cuda", frozen_base=True)
