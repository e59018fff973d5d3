"""Measuring peak memory over the training loop, and the static parts of it.

CUDA: the caching allocator's peak (`max_memory_allocated`, and `max_memory_reserved`).
CPU: the process's resident-set high-water mark (VmHWM), reset just before the loop by writing
"5" to /proc/self/clear_refs (Linux), so that model loading does not count.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

MIB = 2**20


@dataclass
class PeakMemory:
    """Peak memory over an interval, in MiB."""

    kind: str  # "cuda_allocator" or "cpu_rss"
    peak_mib: float  # CUDA: allocated; CPU: resident set
    reserved_mib: float | None = None  # CUDA only: what the allocator held from the driver
    reset_ok: bool = True  # False where the CPU high-water mark could not be reset


class PeakMemoryProbe:
    """Resets the device's peak-memory counter and reads it back."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset_ok = True

    def reset(self) -> None:
        """Start a new interval: forget peaks reached so far."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.reset_ok = _reset_rss_high_water_mark()

    def read(self) -> PeakMemory:
        """The peak since the last reset."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return PeakMemory(
                "cuda_allocator",
                torch.cuda.max_memory_allocated(self.device) / MIB,
                torch.cuda.max_memory_reserved(self.device) / MIB,
            )
        return PeakMemory("cpu_rss", rss_high_water_mark_mib(), reset_ok=self.reset_ok)


def _reset_rss_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_high_water_mark_mib() -> float:
    """VmHWM of this process (Linux), else ru_maxrss (which cannot be reset)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MIB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MIB


def tensor_mib(tensors) -> float:
    """Total storage of distinct tensors (shared storage counted once), in MiB."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total / MIB


def static_breakdown(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Sizes (MiB) of the parts that live through the whole step: parameters, gradients, optimizer state.

    Gradients are measured as one full set for the trainable parameters (what exists at the
    end of backward); call this after the first step, when the optimizer state exists.
    """
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    grad_bytes = sum(p.numel() * p.element_size() for p in trainable)
    state = [v for s in optimizer.state.values() for v in s.values()]
    return {
        "parameters_mib": tensor_mib(params),
        "gradients_mib": grad_bytes / MIB,
        "optimizer_state_mib": tensor_mib(state),
    }


def memory_report(peak: PeakMemory, static: dict[str, float]) -> dict:
    """The peak and its parts; what the static parts do not explain is activations and the rest."""
    return {
        "kind": peak.kind,
        "peak_mib": peak.peak_mib,
        "reserved_mib": peak.reserved_mib,
        **static,
        # Activations and temporaries (and, in a CPU's RSS, the Python runtime and libraries).
        "activations_and_other_mib": max(peak.peak_mib - sum(static.values()), 0.0),
    }
