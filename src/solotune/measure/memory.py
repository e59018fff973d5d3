"""Measuring peak memory over the training loop, and what it is made of.

CUDA: the caching allocator's peak (`max_memory_allocated`, and `max_memory_reserved`).
CPU: the process's resident-set high-water mark (VmHWM), reset just before the loop by writing
"5" to /proc/self/clear_refs (Linux), so that model loading does not count.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from solotune.model.quant import quant_state_tensors

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

    # No device sync in either: the caching allocator allocates and frees on the host, when an op
    # is issued, so its counters are current without waiting for the GPU.
    def reset(self) -> None:
        """Start a new interval: forget peaks reached so far."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.reset_ok = _reset_rss_high_water_mark()

    def read(self) -> PeakMemory:
        """The peak since the last reset."""
        if self.device.type == "cuda":
            return PeakMemory(
                "cuda_allocator",
                torch.cuda.max_memory_allocated(self.device) / MIB,
                torch.cuda.max_memory_reserved(self.device) / MIB,
            )
        return PeakMemory("cpu_rss", rss_high_water_mark_mib(), reset_ok=self.reset_ok)


def apply_memory_limit(limit_bytes: int, device: torch.device) -> str:
    """Make this process fail to allocate past `limit_bytes`, as a smaller device would; say how."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(limit_bytes / total, 1.0), index)
        return f"memory limit: {limit_bytes / MIB:,.0f} MiB of the GPU's {total / MIB:,.0f} MiB"
    # RLIMIT_DATA counts private writable memory (the heap, anonymous mappings): close to what
    # tensors occupy, unlike RLIMIT_AS, which also counts libraries and reserved address space.
    resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    return f"memory limit: {limit_bytes / MIB:,.0f} MiB of data segment (CPU)"


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


CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations")


class TensorMemoryTracker(TorchDispatchMode):
    """Follows every tensor storage created and freed on a device, and the peak of their total.

    Each storage is counted once (views share it) under one category: parameters, gradients,
    optimizer state, or activations (everything else: saved activations and temporaries).
    Gradients are recognised when autograd assigns them to a parameter, optimizer state by
    being created inside `optimizer.step()`; the tracker installs its own hooks for both, so
    the training step knows nothing about it. The parts at the peak add up to the tracked peak
    by construction. On CUDA the tracked peak sits below the allocator's `max_memory_allocated`
    by what no tensor op creates (cuBLAS workspaces, kernels' scratch space; see memory_report)
    and by the allocator's 512-byte rounding of each block.

    Under FSDP2 (sharding.py) a sharded tensor counts its rank's shard. FSDP2 gathers a layer's
    weights into storage it grows and shrinks in place (`resize_`, which is no tensor op): the
    tracker follows those resizes through FSDP2's two helpers, and counts them as parameters.
    Its sharded gradients are set, not accumulated by autograd: they are recognised when the
    optimizer step begins.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
        super().__init__()
        self.device_type = device.type
        self.live: dict[int, list] = {}  # storage id -> [bytes, category]
        self.totals = dict.fromkeys(CATEGORIES, 0)
        self.current_bytes = 0  # sum of totals, kept as it changes: this runs on every op
        self.peak_bytes, self.peak_parts = 0, dict(self.totals)
        self.part_max = dict(self.totals)  # each part's own maximum, whenever it was reached
        self._phase = "activations"
        self.after_update: dict[str, int] | None = None  # see state_after_update_mib
        self._finalizers: dict[int, weakref.finalize] = {}  # of the live storages
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._hooks = [
            optimizer.register_step_pre_hook(lambda *_: self._enter_optimizer_step()),
            optimizer.register_step_post_hook(lambda *_: self._leave_optimizer_step()),
            *_follow_fsdp_storage(self._resized),
        ]
        for t in [*model.parameters(), *quant_state_tensors(model)]:  # a quantized weight's scales are part of it
            self._track(t, "parameters")
        for p in model.parameters():
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))
                self._track(p.grad, "gradients")
        for state in optimizer.state.values():
            for t in state.values():
                self._track(t, "optimizer_state")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self._track(t, self._phase)
        return out

    def __exit__(self, *exc):
        self.close()  # one interval per tracker: the hooks go with it
        return super().__exit__(*exc)

    def close(self) -> None:
        """Remove the hooks and the storages' finalizers (the tracker's totals stay readable).

        Without this, every parameter's storage would keep a finalizer pointing back at the
        tracker: one more per tracked step, and every tracker alive for as long as the model.
        """
        for h in self._hooks:
            h.remove()
        for f in self._finalizers.values():
            f.detach()
        self._finalizers.clear()

    def parts_mib(self) -> dict[str, float]:
        """The peak and its parts, in MiB."""
        return {"tracked_peak_mib": self.peak_bytes / MIB, **{f"{k}_mib": v / MIB for k, v in self.peak_parts.items()}}

    def state_after_update_mib(self) -> dict[str, float] | None:
        """Parameters, gradients and optimizer state right after the last optimizer update: what the
        training state holds from step to step (what FSDP2 divides among the ranks); None before
        any update."""
        if self.after_update is None:
            return None
        return {f"{k}_mib": v / MIB for k, v in self.after_update.items()}

    def _set_phase(self, phase: str) -> None:
        self._phase = phase

    def _leave_optimizer_step(self) -> None:
        self.after_update = {k: self.totals[k] for k in ("parameters", "gradients", "optimizer_state")}
        self._set_phase("activations")

    def _enter_optimizer_step(self) -> None:
        for p in self._params:  # FSDP2's gradients were set, not accumulated: no hook saw them
            self._on_grad(p)
        self._set_phase("optimizer_state")

    def _track(self, t, category: str) -> None:
        if isinstance(t, DTensor):
            t = t.to_local()
        if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        n = storage.nbytes()
        self.live[key] = [n, category]
        self.totals[category] += n
        self.current_bytes += n
        self._finalizers[key] = weakref.finalize(storage, self._free, key)
        self._note_growth(category)

    def _note_growth(self, category: str) -> None:
        if self.totals[category] > self.part_max[category]:
            self.part_max[category] = self.totals[category]
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_parts = self.current_bytes, dict(self.totals)

    def _free(self, key: int) -> None:
        self._finalizers.pop(key, None)
        entry = self.live.pop(key, None)
        if entry:
            self.totals[entry[1]] -= entry[0]
            self.current_bytes -= entry[0]

    def _resized(self, t: torch.Tensor) -> None:
        """FSDP2 grew or shrank `t`'s storage in place: its bytes now, counted as parameters."""
        key = t.untyped_storage()._cdata
        if key not in self.live:
            self._track(t, "parameters")
            return
        entry = self.live[key]
        n = t.untyped_storage().nbytes()
        self.totals[entry[1]] -= entry[0]
        self.totals["parameters"] += n
        self.current_bytes += n - entry[0]
        entry[:] = [n, "parameters"]
        self._note_growth("parameters")

    def _on_grad(self, p: torch.Tensor) -> None:
        if p.grad is None:  # backward reached the parameter with nothing to add (selfcheck reports it)
            return
        grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        entry = self.live.get(grad.untyped_storage()._cdata)
        if entry and entry[1] != "gradients":
            self.totals[entry[1]] -= entry[0]
            self.totals["gradients"] += entry[0]
            entry[1] = "gradients"
            self._note_growth("gradients")


class _Hook:
    """A removable hook that undoes a patch (what `register_*_hook` returns, for the tracker's list)."""

    def __init__(self, undo):
        self.remove = undo


def _follow_fsdp_storage(on_resize) -> list[_Hook]:
    """Call `on_resize(tensor)` after FSDP2 grows or frees a tensor's storage in place, until the
    returned hooks are removed. FSDP2 does it through two module-level helpers, which it imports
    by name into two modules: each name is patched where it is looked up."""
    import torch.distributed.fsdp._fully_shard._fsdp_param as fsdp_param
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as fsdp_group

    hooks = []
    for module in (fsdp_param, fsdp_group):
        for name in ("alloc_storage", "free_storage"):
            original = getattr(module, name, None)
            if original is None:
                continue

            def patched(tensor, _original=original):
                _original(tensor)
                on_resize(tensor)

            setattr(module, name, patched)
            hooks.append(_Hook(lambda m=module, n=name, o=original: setattr(m, n, o)))
    return hooks


def step_size(record_lengths: list[list[int]], padding_free: bool) -> tuple[int, int, int]:
    """What a step's activation peak grows with, from the record lengths of each of its
    micro-batches; the largest counts in each measure (activations are freed between
    micro-batches): positions; the positions attention lays its inputs out in; and the
    attention area (length squared, summed), which attention that materialises its scores needs.

    A padded micro-batch counts every row at its longest. A padding-free row is one row of its
    records, but its attention may run them as one right-padded batch (attention.py), which
    holds padded copies of q, k, v and the output: a row of similar records can then need more
    than a longer row of unequal ones, so both layouts are measured as the attention runs them.
    """
    if padding_free:
        sizes = [_packed_size(lengths) for lengths in record_lengths]
    else:
        sizes = [(len(ls) * max(ls), len(ls) * max(ls), len(ls) * max(ls) ** 2) for ls in record_lengths]
    return tuple(max(measure) for measure in zip(*sizes))


def _packed_size(lengths: list[int]) -> tuple[int, int, int]:
    from solotune.fastpaths.attention import padding_pays

    if padding_pays(tuple(lengths)):
        return sum(lengths), len(lengths) * max(lengths), len(lengths) * max(lengths) ** 2
    return sum(lengths), sum(lengths), sum(n * n for n in lengths)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (created at its first step)."""
    return sum(t.nbytes for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor))


class PeakSteps:
    """The steps that can set the loop's peak, for `--train.track-memory peak`.

    A step's peak is what persists between steps (parameters, optimizer state) plus the
    activations of its largest micro-batch, which grow with its `step_size`. A step cannot set a
    new peak when an earlier step was at least as large in every measure with the same optimizer
    state; every other step (the first, one after the optimizer state grows, any larger in some
    measure) is one to follow. The steps kept for comparison are the undominated ones. The loop's
    optimizer has its state before the first step (`optim.create_state`), so that normally the
    first step, the epoch's largest (`data.largest_step_early`), is the only one.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.state_bytes: int | None = None
        self.largest: list[tuple[int, ...]] = []  # undominated sizes so far

    def can_set_peak(self, size: tuple[int, ...]) -> bool:
        """Whether a step of `size` (`step_size`) can set a new peak; remembers it if so."""
        state = optimizer_state_bytes(self.optimizer)
        if state != self.state_bytes:  # more persists from now on: earlier steps say nothing
            self.state_bytes, self.largest = state, []
        if any(_dominates(earlier, size) for earlier in self.largest):
            return False
        self.largest = [earlier for earlier in self.largest if not _dominates(size, earlier)] + [size]
        return True


def _dominates(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether a step of size `a` is at least as large as one of size `b` in every measure."""
    return all(x >= y for x, y in zip(a, b))


class MemoryBreakdown:
    """The tensor tracker over the steps `--train.track-memory` asks for, and the parts of the
    largest peak it saw.

    always: one tracker over the whole loop. peak: a tracker over a rehearsal of the run's
    largest step before the loop (loop.py), and over each step of the loop that can still set
    the peak (`PeakSteps`: normally none), none on the others, which run at full speed (and
    compiled, with --train.compile). off: no tracker; the measured peak only.
    """

    def __init__(self, mode: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
        self.mode, self.model, self.optimizer, self.device = mode, model, optimizer, device
        self.peak_steps = PeakSteps(optimizer)
        self.whole_loop = TensorMemoryTracker(model, optimizer, device) if mode == "always" else None
        self.largest: TensorMemoryTracker | None = None
        self.tracked_steps = 0
        self.part_max = dict.fromkeys(CATEGORIES, 0)  # over every tracked step (mode peak)

    def __enter__(self) -> MemoryBreakdown:
        if self.whole_loop:
            self.whole_loop.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.whole_loop:
            self.whole_loop.__exit__(*exc)

    def follows(self, size: tuple[int, int]) -> bool:
        """Whether the next step, of `size` (`step_size`), runs under a tracker."""
        if self.mode == "always":
            return True
        return self.mode == "peak" and self.peak_steps.can_set_peak(size)

    @contextlib.contextmanager
    def step(self, followed: bool):
        """The context of one step: a tracker of its own where it is followed (mode peak)."""
        self.tracked_steps += followed
        if not followed or self.whole_loop:
            yield
            return
        with self._tracked():
            yield

    @contextlib.contextmanager
    def rehearsal(self, size: tuple[int, ...]):
        """The context of a rehearsal of a step of `size` (mode peak): tracked, and from then on
        the steps it is at least as large as need no following."""
        with self._tracked():
            yield
        self.peak_steps.can_set_peak(size)

    @contextlib.contextmanager
    def _tracked(self):
        tracker = TensorMemoryTracker(self.model, self.optimizer, self.device)
        with tracker:
            yield
        if self.largest is None or tracker.peak_bytes > self.largest.peak_bytes:
            self.largest = tracker
        self.part_max = {k: max(v, tracker.part_max[k]) for k, v in self.part_max.items()}

    def part_max_mib(self) -> dict[str, float] | None:
        """Each part's own maximum over the loop, in MiB (the steps `peak` skips cannot exceed
        the steps it follows in any part); None with mode off.

        This is what a technique does to a part; the split at the peak hides it where the peak
        falls when the part is small (a full fine-tune peaks in the optimizer step, when the
        activations are gone)."""
        if self.mode == "off":
            return None
        part_max = self.whole_loop.part_max if self.whole_loop else self.part_max
        return {f"{k}_mib": v / MIB for k, v in part_max.items()}

    def tracker(self) -> TensorMemoryTracker | None:
        """The tracker whose peak the report shows; None with mode off."""
        return self.whole_loop or self.largest


def memory_report(peak: PeakMemory, tracker: TensorMemoryTracker | None, part_max: dict | None = None) -> dict:
    """The measured peak (allocator or RSS): the tracked tensor peak's four parts, plus the rest.

    The rest is memory no tensor op of the loop created: on CUDA the cuBLAS workspaces and
    kernels' scratch space (measured on an H200: 64 MiB for a tiny model; the tracked parts were
    95-98% of the allocator peak for a 135M model); on the CPU the Python process, its libraries
    and the allocator's caches. Without a tracker (`--train.track-memory off`) the parts
    are None: only the measured peak is known. `part_max`: MemoryBreakdown.part_max_mib.
    """
    if tracker is None:
        parts = dict.fromkeys(
            ["tracked_peak_mib", *(f"{c}_mib" for c in CATEGORIES), "untracked_mib", "state_after_update"]
        )
        part_max = None
    else:
        parts = tracker.parts_mib()
        parts["untracked_mib"] = max(peak.peak_mib - parts["tracked_peak_mib"], 0.0)
        parts["state_after_update"] = tracker.state_after_update_mib()
    return {
        "kind": peak.kind,
        "peak_mib": peak.peak_mib,
        "reserved_mib": peak.reserved_mib,
        **parts,
        "part_max": part_max,
    }
