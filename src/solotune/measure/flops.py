"""Model FLOPs of a training step, and the device's measured matmul peak: together, MFU.

Counted, per step (multiply-add = 2 FLOPs):
  body       every weight matrix of the decoder (embedding lookup excluded): 2 FLOPs per weight
             per token forward, 2 for the input gradient, 2 more for the weight gradient where
             the weight trains: 4N per token under LoRA (frozen base), 6N under full fine-tuning;
  attention  Q K^T and A V of each record, causal (half of L^2), forward plus twice that backward;
  LM head    only at the positions that carry loss: the work the loss needs, not what a
             full-logits implementation spends on prompt and padding positions.
This is deliberately conservative: a loop that computes logits everywhere, or attends across
padding, does more arithmetic than it is credited for.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from solotune.artifacts import write_json
from solotune.data import Batch
from solotune.model.models import cache_dir
from solotune.model.precision import cpu_has_native_bf16


@dataclass(frozen=True)
class FlopModel:
    """The shape facts of a model that its training FLOPs depend on."""

    body_weights: int  # elements of the decoder's weight matrices, adapters included
    trained_body_weights: int  # those of them that train (and so need weight gradients)
    head_weights: int  # the LM head's (vocabulary x hidden)
    head_trains: bool
    attention_width: int  # heads x head dim, summed over layers

    @classmethod
    def of(cls, model: torch.nn.Module) -> FlopModel:
        head = model.get_output_embeddings().weight
        embed = model.get_input_embeddings().weight
        matrices = {id(p): p for p in model.parameters() if p.dim() == 2}
        matrices.pop(id(head), None)
        matrices.pop(id(embed), None)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = getattr(cfg, "num_attention_heads", None)
        if heads:
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
            width = cfg.num_hidden_layers * heads * head_dim
        else:  # no attention (a state-space model): its mixing is counted as the weights it uses
            width = 0
        return cls(
            body_weights=sum(p.numel() for p in matrices.values()),
            trained_body_weights=sum(p.numel() for p in matrices.values() if p.requires_grad),
            head_weights=head.numel(),
            head_trains=head.requires_grad,
            attention_width=width,
        )

    def step_flops(self, batches: list[Batch]) -> float:
        """FLOPs of one optimizer step over these micro-batches (forward and backward)."""
        tokens = sum(b.n_tokens for b in batches)
        loss_positions = sum(b.n_loss_tokens for b in batches)
        squares = sum(n * n for b in batches for n in _record_lengths(b))
        body = (4 * self.body_weights + 2 * self.trained_body_weights) * tokens
        attention = 3 * 2 * squares * self.attention_width  # 2 matmuls x 2 FLOPs x L^2 / 2 causal, x3 for backward
        head = (6 if self.head_trains else 4) * self.head_weights * loss_positions
        return body + attention + head

    def forward_flops(self, batches: list[Batch]) -> float:
        """FLOPs of a forward pass alone over these micro-batches (a reference model's, no_grad)."""
        tokens = sum(b.n_tokens for b in batches)
        loss_positions = sum(b.n_loss_tokens for b in batches)
        squares = sum(n * n for b in batches for n in _record_lengths(b))
        return 2 * (self.body_weights * tokens + squares * self.attention_width + self.head_weights * loss_positions)


def _record_lengths(batch: Batch) -> list[int]:
    if batch.segment_lengths is not None:
        return list(batch.segment_lengths)
    return batch.attention_mask.sum(dim=1).tolist()


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, at_least: float = 0.0) -> float:
    """The best FLOP/s of a large matmul on this device in this dtype (measured, cached).

    `at_least`: FLOP/s a run has just reached. A cached peak below it was measured while
    something else used the device (a cached 123 GFLOP/s on a CPU that does 184 quiet, and runs
    reported an MFU of 107%): it is measured again, and the peak kept is never below `at_least`."""
    key = f"{_device_name(device)}|{dtype}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    cache = cache_dir() / "matmul_peak.json"
    known = _read_cache(cache)
    if not isinstance(known.get(key), (int, float)) or known[key] <= 0 or known[key] < at_least:
        known[key] = max(_measure_matmul(device, dtype), at_least)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_json(cache, known)
        except OSError:
            pass  # a cache that cannot be written costs a measurement next time, nothing more
    return known[key]


def _device_name(device: torch.device) -> str:
    """What sets the peak: the GPU's name; on the CPU its model, vector ISA and whether it has bf16.

    Two CPUs sold under one name ("AMD EPYC") can differ by AVX512-BF16, which changes the bf16
    peak a hundredfold, so a peak cached on one must not be read on the other.
    """
    if device.type == "cuda":
        return f"cuda|{torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    bf16 = "native-bf16" if cpu_has_native_bf16() else "emulated-bf16"
    return f"cpu|{model}|{torch.backends.cpu.get_cpu_capability()}|{bf16}"


def _read_cache(path: Path) -> dict:
    """The cached peaks; an unreadable or damaged cache is an empty one."""
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _measure_matmul(device: torch.device, dtype: torch.dtype) -> float:
    """The best of the two layouts a linear layer runs: its forward `x @ W.T` and its weight gradient
    `g.T @ x`. A CPU that emulates bf16 runs these five to ten times faster than `a @ b` of two row-major
    operands (solotune.cpu_bf16), so that product would understate the peak and overstate MFU."""
    best = 0.0
    for n in (1024, 2048, 4096, 8192):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for left, right in ((a, b.T), (a.T, b)):
            torch.matmul(left, right)  # warm-up
            for _ in range(2):
                _sync(device)
                start = time.perf_counter()
                torch.matmul(left, right)
                _sync(device)
                elapsed = time.perf_counter() - start
                best = max(best, 2 * n**3 / elapsed)
        if elapsed > 0.1:  # long enough to reach the peak; larger only costs time
            break
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
