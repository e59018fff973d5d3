"""The device and precision policy, decided once at set-up, and what the device must support.

The loop never asks "is this fp16?": it enters `policy.autocast()` and goes through
`policy.scaler`, which are no-ops when they are not needed.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import torch

from solotune.config import PrecisionConfig
from solotune.errors import SolotuneError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class PrecisionPolicy:
    """Where the run computes and in which dtypes."""

    device: torch.device
    compute_dtype: torch.dtype  # autocast dtype; fp32 means no autocast
    base_dtype: torch.dtype  # storage dtype of the model's own (non-adapter) weights
    scaler: torch.amp.GradScaler
    reasons: list[str] = field(default_factory=list)

    @property
    def mp(self) -> str:
        """The mixed-precision mode: off, bf16 or fp16."""
        return "off" if self.compute_dtype == torch.float32 else DTYPE_NAMES[self.compute_dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward-pass context: autocast to the compute dtype, or nothing in fp32."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def describe(self) -> str:
        """One line per decision, saying why."""
        return "\n".join(self.reasons)


def resolve_device(requested: str) -> tuple[torch.device, str]:
    """The torch device for "auto" / "cpu" / "cuda", and why."""
    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise SolotuneError("device = 'cuda' but no CUDA GPU is visible to PyTorch; use --device cpu")
    if requested == "cpu":
        return torch.device("cpu"), "device: cpu (requested)"
    if has_cuda:
        name = torch.cuda.get_device_name(0)
        how = "requested" if requested == "cuda" else "a GPU is available"
        return torch.device("cuda"), f"device: cuda ({name}; {how})"
    return torch.device("cpu"), "device: cpu (no CUDA GPU found)"


def sixteen_bit(device_name: str) -> str:
    """The 16-bit type mixed precision means on this device when it is on: bf16 where the GPU
    has it, else fp16; bf16 on CPUs, where fp16 is slower still (bf16 is native on AVX512-BF16
    and AMX, emulated elsewhere). The ablation's MP ON cell asks this."""
    device, _ = resolve_device(device_name)
    return _sixteen_bit_on(device)


def _sixteen_bit_on(device: torch.device) -> str:
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


def resolve_mp(requested: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The autocast dtype for the requested mixed-precision mode on this device, and why."""
    if requested == "off":
        return torch.float32, "mixed precision: off (fp32 everywhere)"
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if requested == "bf16" and not bf16_ok:
            raise SolotuneError("--mp bf16: this GPU has no bf16 support; use --mp fp16")
        if requested == "auto":
            requested = _sixteen_bit_on(device)
            why = "bf16 supported by this GPU" if bf16_ok else "no bf16 on this GPU"
            return DTYPES[requested], f"mixed precision: {requested} autocast (auto: {why})"
        return DTYPES[requested], f"mixed precision: {requested} autocast (requested)"
    fast_bf16 = cpu_has_native_bf16()
    if requested == "auto":
        if fast_bf16:
            return torch.bfloat16, "mixed precision: bf16 autocast (auto: this CPU has native bf16 matmuls)"
        return (
            torch.float32,
            "mixed precision: off (auto: this CPU has no native bf16, where bf16 runs many times slower than fp32)",
        )
    if requested == "fp16":
        return torch.float16, "mixed precision: fp16 autocast (requested; slow on CPUs without native fp16)"
    if fast_bf16:
        return torch.bfloat16, "mixed precision: bf16 autocast (requested)"
    return torch.bfloat16, (
        "mixed precision: bf16 autocast (requested; this CPU has no native bf16: slower than fp32, "
        "with each matmul laid out as its emulation runs fastest)"
    )


@functools.cache  # the CPU does not change under a process; read once
def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), read from /proc/cpuinfo.

    Without it PyTorch emulates bf16 matmuls: measured on an AVX2-only CPU, a bf16 autocast
    training step took 27x as long as fp32, and ~5x with the layouts of `cpu_bf16`
    (benchmarks/cpu_precision.py).
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_base_dtype(requested: str, compute_dtype: torch.dtype, frozen: bool) -> tuple[torch.dtype, str]:
    """Storage dtype of the model's weights, and why.

    Frozen weights (LoRA) need no fp32 master copy: stored in the compute dtype they take half
    the memory, and autocast does not keep a second 16-bit copy of each one for backward.
    Trained weights (full fine-tuning) stay fp32 so that small AdamW updates are not lost to
    rounding.
    """
    if requested != "auto":
        return DTYPES[requested], f"base weights: {requested} (requested)"
    if frozen and compute_dtype != torch.float32:
        name = DTYPE_NAMES[compute_dtype]
        return compute_dtype, f"base weights: {name} (auto: frozen under LoRA, stored in the compute dtype)"
    why = "trained, fp32 master weights" if not frozen else "no mixed precision"
    return torch.float32, f"base weights: fp32 (auto: {why})"


def resolve_policy(cfg: PrecisionConfig, device_name: str, frozen_base: bool) -> PrecisionPolicy:
    """Decide device, autocast dtype, weight dtype and gradient scaling for a run."""
    device, device_why = resolve_device(device_name)
    compute_dtype, mp_why = resolve_mp(cfg.mp, device)
    base_dtype, base_why = resolve_base_dtype(cfg.base_dtype, compute_dtype, frozen_base)
    if not frozen_base and base_dtype == torch.float16:
        raise SolotuneError(
            "base_dtype = fp16 with full fine-tuning: fp16 trained weights cannot be updated "
            "reliably (and gradient scaling refuses fp16 gradients); use --base-dtype fp32 or bf16"
        )
    # fp16 has 5 exponent bits: small gradients underflow to zero unless the loss is scaled up
    # before backward (Micikevicius et al., 2018). bf16 has fp32's range and needs no scaling.
    use_scaler = compute_dtype == torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    scaler_why = "gradient scaling: on (fp16)" if use_scaler else "gradient scaling: off"
    return PrecisionPolicy(device, compute_dtype, base_dtype, scaler, [device_why, mp_why, base_why, scaler_why])
