"""The frozen base in 4 or 8 bits (QLoRA).

The weights come from bitsandbytes, through transformers (`BitsAndBytesConfig`).
4-bit (NF4 or FP4): each block of 64 weights is stored as 4-bit codes plus one absmax scale;
double quantization stores those scales in 8 bits too (Dettmers et al., 2023). int8: LLM.int8()
rows with an fp32 scale each. The layers left dense (embeddings, norms, the LM head, and weights
tied to them) stay in the run's base dtype. bitsandbytes is imported only when a run asks for it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from solotune.config import QuantConfig
from solotune.errors import SolotuneError

BLOCKSIZE_4BIT = 64  # weights per absmax scale (bitsandbytes' default, as in the QLoRA paper)


def bitsandbytes(what: str):
    """The bitsandbytes module, or a clear error naming the feature that needs it."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise SolotuneError(f"{what} needs the bitsandbytes package: pip install bitsandbytes") from None
    return bnb


def compute_dtype(cfg: QuantConfig, run_compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype 4-bit weights are de-quantized to for each matmul; auto: the run's."""
    from solotune.model.precision import DTYPES

    return run_compute_dtype if cfg.compute_dtype == "auto" else DTYPES[cfg.compute_dtype]


def quantization_config(cfg: QuantConfig, run_compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for `cfg`, or None when the base is not quantized."""
    if cfg.method == "none":
        return None
    bitsandbytes(f"--quant {cfg.method}")
    from transformers import BitsAndBytesConfig

    if cfg.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.method,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(cfg, run_compute_dtype),
    )


def keep_4bit_layout_trainable(model: torch.nn.Module) -> int:
    """Keep every 4-bit weight in the layout that bitsandbytes' autograd reads; returns how many
    weights had to be converted back.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight in place the
    first time the layer runs in eval mode on inputs that need no gradient (the generations
    before training, a merge's reference forward). The repacked weight is multiplied by a
    kernel with no backward, so training silently stops at every 4-bit layer; it computes in
    bf16 whatever the input dtype; and transformers' `dequantize()` misreads it. Switching the
    repacking off gives one layout on every CPU. A weight repacked already is converted back
    (bitsandbytes' own inverse; its scales were rounded to bf16 on the way).
    """
    restored = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            restored += 1
    return restored


RECORD_FILE = "solotune-quantization.json"  # beside a QLoRA adapter: the base it was trained on


def save_record(adapter_dir: Path, cfg: QuantConfig, run_compute_dtype: torch.dtype) -> None:
    """Note in the adapter folder how its base was quantized, so that `generate` and `merge`
    load the same 4-bit base (an adapter trained on a 4-bit base has learned around its rounding)."""
    from solotune.model.precision import DTYPE_NAMES

    record = {**dataclasses.asdict(cfg), "compute_dtype": DTYPE_NAMES[compute_dtype(cfg, run_compute_dtype)]}
    (Path(adapter_dir) / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_record(adapter_dir: str | Path) -> tuple[QuantConfig, torch.dtype] | None:
    """The quantization an adapter was trained on (and its compute dtype); None for plain LoRA."""
    from solotune.model.precision import DTYPES

    path = Path(adapter_dir) / RECORD_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return QuantConfig(**record), DTYPES[record["compute_dtype"]]


def quant_state_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors that de-quantize the model's quantized weights. They are not parameters, but
    they are part of what the weights cost (the memory tracker counts them as parameters)."""
    unique = {}  # by storage: a LoRA wrapper shows its base layer's weight too
    for m in model.modules():
        for t in _state_tensors(m):
            unique.setdefault(t.untyped_storage()._cdata, t)
    return list(unique.values())


def _state_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """4-bit: the absmax scales (with double quantization also their own scales and code book);
    int8: the row scales. Empty for a layer that is not quantized."""
    weight = getattr(module, "weight", None)
    tensors = []
    state = getattr(weight, "quant_state", None)
    while state is not None:  # a QuantState; double quantization nests another in `state2`
        tensors += [t for t in (state.absmax, state.code, state.offset) if isinstance(t, torch.Tensor)]
        state = getattr(state, "state2", None)
    # int8: on the weight until the first forward, then moved to the layer's matmul state
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = getattr(getattr(module, "state", None), "SCB", None)
    return tensors + ([scales] if isinstance(scales, torch.Tensor) else [])


def _is_quantized(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return getattr(weight, "quant_state", None) is not None or (hasattr(module, "state") and hasattr(weight, "SCB"))


@dataclass
class QuantizedLinears:
    """What the quantized linear layers hold, against the same weights in 16 bits."""

    layers: int
    weight_bytes: int  # the packed codes
    state_bytes: int  # scales and code books
    dense_16bit_bytes: int

    @property
    def fraction(self) -> float:
        return (self.weight_bytes + self.state_bytes) / self.dense_16bit_bytes

    def line(self) -> str:
        total = (self.weight_bytes + self.state_bytes) / 2**20
        return (
            f"quantized base: {self.layers} linear layers in {total:,.1f} MiB (codes {self.weight_bytes / 2**20:,.1f} + "
            f"scales {self.state_bytes / 2**20:,.1f}), {100 * self.fraction:.1f}% of their 16-bit size "
            f"({self.dense_16bit_bytes / 2**20:,.1f} MiB)"
        )

    def as_dict(self) -> dict:
        return {
            "layers": self.layers,
            "weight_bytes": self.weight_bytes,
            "state_bytes": self.state_bytes,
            "dense_16bit_bytes": self.dense_16bit_bytes,
            "fraction_of_16bit": self.fraction,
        }


def quantized_linears(model: torch.nn.Module) -> QuantizedLinears | None:
    """Count the quantized linear layers' storage; None when the model has none."""
    layers = weight_bytes = state_bytes = dense = 0
    seen = set()  # weights and state storages counted (layers may share a code book)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not _is_quantized(module) or id(weight) in seen:
            continue  # not quantized, or a LoRA wrapper showing its base layer's weight
        seen.add(id(weight))
        layers += 1
        weight_bytes += weight.untyped_storage().nbytes()
        for t in _state_tensors(module):
            if t.untyped_storage()._cdata not in seen:
                seen.add(t.untyped_storage()._cdata)
                state_bytes += t.untyped_storage().nbytes()
        state = getattr(weight, "quant_state", None)
        shape = state.shape if state is not None else weight.shape
        dense += 2 * shape[0] * shape[1]
    return QuantizedLinears(layers, weight_bytes, state_bytes, dense) if layers else None
