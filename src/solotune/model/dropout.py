"""Dropout whose masks depend on the data, not on how it is batched.

A mask drawn from torch's generator depends on the order of the draws: the micro-batch size,
gradient accumulation, padding-free rows and the number of processes each change which numbers
a token gets. Measured on the built-in data (fp32, LoRA dropout 0.05): `--grad-accum 1` and `4`
differed by 2.2e-4 in the loss at step 2 (6e-7 with dropout off), so an ablation's cells
differed by noise as well as by the technique.

Here each element's mask is a hash of what it is: the run's seed, the optimizer step, the
record and the position in it (`data.token_keys`, made on the host with the batch), the
dropout module and the feature. The same token in the same step gets the same mask however
the step is cut, so those switches change memory and speed alone; a resumed run and a replay
under activation checkpointing draw the same masks with no generator state at all. Backward
recomputes the mask from the (tokens,) keys instead of keeping a (tokens x features) one.

The hash is multiply and xor-shift rounds on int32 (wrapping), vectorised: a forward and
backward at 2,048 x 576 took 1.25x to 1.45x torch's dropout on a 2-core AVX2 CPU and keeps
0.008 MiB for backward instead of 4.5 (benchmarks/dropout_cost.py).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from peft.tuners.lora import LoraLayer

MULTIPLIER = 0x45D9F3B  # an odd constant of a 32-bit integer hash known to mix well
FEATURE_SALT = 0x3243F6A9  # keeps the feature keys apart from the token keys
_INT32 = 1 << 32


class _Stream:
    """The keys of the micro-batch being run. Not thread-local: on CUDA, autograd runs backward,
    and with it the forward that activation checkpointing replays, on a thread of its own."""

    token_keys: torch.Tensor | None = None  # (B, T) int32


_stream = _Stream()


@contextlib.contextmanager
def keyed_by(token_keys: torch.Tensor | None):
    """Draw the masks of what runs inside (forward and backward, where checkpointing replays the
    forward) from the micro-batch's `token_keys` (data.Batch: each token's record and position,
    with the step's key mixed in by the loop, `Batch.for_step`)."""
    previous, _stream.token_keys = _stream.token_keys, token_keys
    try:
        yield
    finally:
        _stream.token_keys = previous


def step_key(seed: int, step: int) -> int:
    """The run's seed and an optimizer step as one int32, to mix into a step's token keys."""
    return _mix_int(_mix_int(seed) ^ step)


def _mix_int(u: int) -> int:
    """`_mix` on a Python int, as int32."""
    u &= _INT32 - 1
    for _ in range(2):
        u = ((u ^ (u >> 16)) * MULTIPLIER) & (_INT32 - 1)
    u ^= u >> 16
    return u - _INT32 if u >= 1 << 31 else u


def _mix(u: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of each element of an int32 tensor (multiplication wraps). The
    shift is made logical by the mask, since >> on int32 keeps the sign."""
    for _ in range(2):
        u = (u ^ ((u >> 16) & 0xFFFF)) * MULTIPLIER
    return u ^ ((u >> 16) & 0xFFFF)


def keep_mask(token_keys: torch.Tensor, key, features: int, p: float) -> torch.Tensor:
    """(B, T, features) bool: True where an element is kept, each with probability 1 - p.

    The token and feature keys are each fully mixed first, on (B, T) and (features,) alone; the
    (B, T, features) elements then need one multiply, xor-shift, multiply round of their xor
    (five elementwise ops; two full rounds measured 1.6x the time for no better statistics).
    `key`: the dropout module's salt, an int or a 0-dim int32 tensor."""
    tokens = _mix(token_keys ^ key).unsqueeze(-1)
    feature_ids = torch.arange(features, device=token_keys.device, dtype=torch.int32)
    feature_keys = _mix(feature_ids ^ FEATURE_SALT)
    u = (tokens ^ feature_keys) * MULTIPLIER
    u = (u ^ ((u >> 16) & 0xFFFF)) * MULTIPLIER
    threshold = -(1 << 31) + round(p * _INT32)  # hashes are uniform over the int32 range
    return u >= threshold


class _KeyedDropout(torch.autograd.Function):
    """x * mask / (1 - p), keeping the (B, T) keys for backward, not the mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, token_keys: torch.Tensor, salt: torch.Tensor, p: float) -> torch.Tensor:
        ctx.save_for_backward(token_keys, salt)
        ctx.p, ctx.features = p, x.shape[-1]
        return torch.where(keep_mask(token_keys, salt, x.shape[-1], p), x, 0) * (1.0 / (1.0 - p))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        token_keys, salt = ctx.saved_tensors
        kept = keep_mask(token_keys, salt, ctx.features, ctx.p)
        return torch.where(kept, grad, 0) * (1.0 / (1.0 - ctx.p)), None, None, None


class KeyedDropout(torch.nn.Module):
    """Dropout at rate `p` with masks keyed to the data (see the module's docstring); `salt`
    tells this module's masks from the others'.

    Outside `keyed_by` (a probe, a forward with no step), or on an input whose leading shape
    is not the batch's tokens (a mixture-of-experts layer's routed subset), it draws from
    torch's generator, as nn.Dropout does.
    """

    def __init__(self, p: float, salt: int, device: torch.device | None = None):
        super().__init__()
        self.p = p
        # A tensor, not an int: under torch.compile a constant would be guarded on, and each
        # layer's own value would compile a graph of its own.
        salt_tensor = torch.tensor(_mix_int(salt), dtype=torch.int32, device=device)
        self.register_buffer("salt", salt_tensor, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keys = _stream.token_keys
        if keys is None or x.shape[:-1] != keys.shape:
            return torch.native_dropout(x, self.p, True)[0]  # keeps a 1-byte mask; F.dropout a float one on the CPU
        return _KeyedDropout.apply(x, keys, self.salt, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, keyed to the data"


class SharedDropout(KeyedDropout):
    """Keyed dropout that hands the same dropped tensor to every adapter reading one input.

    PEFT gives q, k and v a dropout each: three full-width masks and three dropped copies of the
    same hidden states, in every layer. Here `input_key` (set by a hook on each adapted layer to
    the layer's own input) says which input is being dropped; a repeat of the same input
    returns the cached result. The cache lives for one forward of the parent block (a hook
    clears it). A checkpointed replay can stop early, after the last tensor backward needs and
    before the parent's hook, so the step also calls `release_dropout_caches` after each
    backward: nothing outlives the step.
    """

    instances: weakref.WeakSet[SharedDropout] = weakref.WeakSet()

    def __init__(self, p: float, salt: int, device: torch.device | None = None):
        super().__init__(p, salt, device)
        self.input_key: torch.Tensor | None = None
        self._cached: tuple[torch.Tensor, torch.Tensor] | None = None  # (input_key, dropped)
        SharedDropout.instances.add(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if self._cached is not None and self._cached[0] is self.input_key and self._cached[1].dtype == x.dtype:
            return self._cached[1]
        dropped = super().forward(x)
        self._cached = (self.input_key, dropped) if self.input_key is not None else None
        return dropped

    def clear(self) -> None:
        self.input_key, self._cached = None, None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared"


def release_dropout_caches() -> None:
    """Drop what every SharedDropout holds (after a backward: nothing needs it any more)."""
    for shared in SharedDropout.instances:
        shared.clear()


def use_keyed_dropout(model: torch.nn.Module, shared: bool) -> int:
    """Replace every LoRA adapter's nn.Dropout with keyed dropout; with `shared`, the adapters
    under one parent block that read the same input (q, k and v) share one. Returns how many
    dropout modules the model has now."""
    salt = 0
    for parent in model.modules():
        adapted = [m for m in parent.children() if isinstance(m, LoraLayer)]
        dropouts = [(m, name) for m in adapted for name, d in m.lora_dropout.items() if isinstance(d, torch.nn.Dropout)]
        if shared and len(dropouts) >= 2:
            salt += 1
            first, name = dropouts[0]
            _share(parent, dropouts, SharedDropout(first.lora_dropout[name].p, salt, _device_of(first, name)))
            continue
        for layer, name in dropouts:
            salt += 1
            layer.lora_dropout[name] = KeyedDropout(layer.lora_dropout[name].p, salt, _device_of(layer, name))
    return salt


def _device_of(layer: LoraLayer, adapter: str) -> torch.device:
    return layer.lora_A[adapter].weight.device


def _share(parent: torch.nn.Module, dropouts: list, shared: SharedDropout) -> None:
    for layer, name in dropouts:
        layer.lora_dropout[name] = shared
        layer.register_forward_pre_hook(lambda _m, args, s=shared: setattr(s, "input_key", args[0] if args else None))
    parent.register_forward_hook(lambda *_, s=shared: s.clear())
