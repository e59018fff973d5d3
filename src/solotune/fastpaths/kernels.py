"""Fused GPU kernels from Liger-Kernel (Triton), where installed: RMSNorm and RoPE.

`--train.kernels auto` uses them on a CUDA GPU when the `liger-kernel` package is there, `liger`
insists (and stops with one line where it cannot), `none` never does. solotune keeps its own
fused SwiGLU and chunked LM head + cross-entropy: they hold what Liger's hold (the two SwiGLU
inputs; never the full logits), and the set-up check compares each with the model's plain
forward on every device. Liger's kernels go through the same check (`selfcheck`), and are
undone where they disagree.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from solotune.errors import SolotuneError

# What Liger replaces: the norms and the rotary embedding. Its SwiGLU and cross-entropy stay off
# (solotune's own do the same job and are checked on the CPU as well).
LIGER_PARTS = dict(rope=True, rms_norm=True, swiglu=False, cross_entropy=False, fused_linear_cross_entropy=False)


def choose_kernels(requested: str, device: torch.device) -> tuple[bool, str]:
    """Whether the run uses Liger's kernels, and the line that says why."""
    if requested == "none":
        return False, "kernels: none (requested)"
    installed = importlib.util.find_spec("liger_kernel") is not None
    if device.type != "cuda":
        if requested == "liger":
            raise SolotuneError(
                "--train.kernels liger: Liger's Triton kernels need a CUDA GPU; use --train.kernels none"
            )
        return False, "kernels: none (auto: Liger's kernels run on CUDA GPUs)"
    if not installed:
        if requested == "liger":
            raise SolotuneError("--train.kernels liger needs the liger-kernel package: pip install liger-kernel")
        return False, "kernels: none (auto: pip install liger-kernel for fused RMSNorm and RoPE)"
    return True, f"kernels: liger ({'requested' if requested == 'liger' else 'auto: installed, and a GPU'})"


def use_liger(model: torch.nn.Module) -> Callable[[], None]:
    """Put Liger's RMSNorm and RoPE into `model` (a transformers model, PEFT-wrapped or not);
    returns the function that takes them out again.

    Liger patches each norm module's `forward` on the instance, and names of the modeling module
    (`apply_rotary_pos_emb`, the RMSNorm class) for every model of that family built later in the
    process: the undo puts back every module name it changed.
    """
    # Liger looks for backends of other vendors (cutedsl, ascend) on first use and warns of each
    # one missing, on every run: nothing a user can act on.
    logging.getLogger("liger_kernel.backends.registry").setLevel(logging.ERROR)
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modeling = sys.modules[type(base).__module__]
    module_names = dict(vars(modeling))
    patched_before = {id(m) for m in base.modules() if "forward" in vars(m)}
    try:
        _apply_liger_kernel_to_instance(model=base, **LIGER_PARTS)
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise SolotuneError(f"Liger has no kernels for {type(base).__name__}: {e}") from None

    def undo() -> None:
        for name, value in module_names.items():
            if getattr(modeling, name, None) is not value:
                setattr(modeling, name, value)
        for m in base.modules():
            if "forward" in vars(m) and id(m) not in patched_before:
                del m.forward  # the class's own forward again
                vars(m).pop("extra_repr", None)

    return undo


# A candidate kernel set is kept only where it is this much faster than the model's own: within
# the timing's noise the plain path wins, as it has no kernels of its own to go wrong.
KEEP_IF_FASTER = 0.97


@dataclass
class Timing:
    """Seconds per forward + backward of the run's first micro-batch, and its peak memory."""

    seconds: float
    peak_mib: float | None = None  # CUDA only

    def describe(self) -> str:
        memory = f", {self.peak_mib:,.0f} MiB" if self.peak_mib is not None else ""
        return f"{1000 * self.seconds:.1f} ms{memory}"


def time_step(step: Callable[[], None], device: torch.device, repeats: int = 3, timer=time.perf_counter) -> Timing:
    """Run `step` once to warm up, then `repeats` times under the timer (the device synchronized
    around them: its work is asynchronous)."""
    step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = timer()
    for _ in range(repeats):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = (timer() - start) / repeats
    return Timing(seconds, torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None)


def keep_faster(name: str, candidate: Timing, plain: Timing) -> tuple[bool, str]:
    """Whether the candidate is faster by a margin, and the line that says so with the numbers."""
    keep = candidate.seconds <= KEEP_IF_FASTER * plain.seconds
    verdict = "kept" if keep else "off"
    why = "faster" if keep else f"not {100 * (1 - KEEP_IF_FASTER):.0f}% faster"
    return keep, (
        f"{name}: {verdict} ({why}: {candidate.describe()} a step with them, {plain.describe()} without, "
        "timed on the run's first micro-batch)"
    )
