"""Padding-free attention: each record of a concatenated row attends only to itself.

A padding-free micro-batch is one row holding its records back to back (data.collate_packed).
The model gets the row's `segment_lengths` as a keyword argument, which transformers passes
down to the attention function of every layer. On CUDA in bf16/fp16 that is one call of
PyTorch's variable-length flash attention (torch.nn.attention.varlen) over the whole row.
Elsewhere SDPA's causal kernel runs once over the records set out as a right-padded batch when
their lengths are close (little work on padding), else once on each record's slice. Either way
no B x H x T x T mask is built, and no attention is computed across records. Without
`segment_lengths` it is SDPA with transformers' causal mask.

No mask builder is registered for the padding-free implementation, so transformers builds no
mask for it (a packed row needs none) and, above all, does not read the row's positions or
mask back from the device to decide: that read would be a device sync in every forward. The
implementation is therefore for padding-free rows only; `padding_free_attention` switches it
on for the training loop and off again before anything else runs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from solotune.data import collate, collate_packed
from solotune.errors import SolotuneError
from solotune.fastpaths.technique import FastPath, Probe, largest_difference, logits

NAME = "solotune_varlen"


try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10
    varlen_attn = None


# Left out of torch.compile (--train.compile): traced, the loop over segments would unroll into
# the graph with one slice per record; the layer's graph breaks here instead.
@torch.compiler.disable
def varlen_sdpa_attention(
    module, query, key, value, attention_mask, segment_lengths=None, segment_offsets=None, **kwargs
):
    """Attention of (B, H, T, D) tensors; with `segment_lengths`, causal within each segment.

    `segment_offsets`: the (N+1,) int32 offsets of the segments, already on the device
    (data.Batch); made here from the lengths where a caller has none. Under torch.compile they
    come around the compiled layer (`segments_aside`).
    """
    if segment_lengths is None:
        segment_lengths, segment_offsets = _aside.lengths, _aside.offsets
    if segment_lengths is None:  # rows without padding only (see the module's docstring)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if segment_offsets is None:
        segment_offsets = _cumulative_lengths(segment_lengths, query.device)
    if _flash_varlen_applies(query, kwargs):
        return _flash_varlen(query, key, value, segment_lengths, segment_offsets, kwargs.get("scaling")), None
    if padding_pays(segment_lengths):
        return _segments_as_batch(module, query, key, value, segment_lengths, segment_offsets, kwargs), None
    outputs, start = [], 0
    for n in segment_lengths:
        end = start + n
        out, _ = sdpa_attention_forward(
            module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None, **kwargs
        )
        outputs.append(out)  # (B, n, H, D)
        start = end
    return torch.cat(outputs, dim=1), None


class _Aside(threading.local):
    lengths: tuple[int, ...] | None = None
    offsets: torch.Tensor | None = None


_aside = _Aside()


@contextlib.contextmanager
def segments_aside(lengths: tuple[int, ...] | None, offsets: torch.Tensor | None):
    """The row's segments for the attention calls inside the block, passed around a compiled
    layer rather than through it (training.compile.CompiledLayers)."""
    saved = _aside.lengths, _aside.offsets
    _aside.lengths, _aside.offsets = lengths, offsets
    try:
        yield
    finally:
        _aside.lengths, _aside.offsets = saved


# Padding the segments into one batch costs attention work on the padding; one call per segment
# costs a kernel launch and a few autograd nodes each, forward and backward, in every layer. For
# records of similar lengths, the batch is much faster (benchmarks/overhead_proxy.py); the loop
# stays for rows whose padded work would exceed the real work by more than this factor.
PADDED_WORK_LIMIT = 1.5


def padding_pays(segment_lengths: tuple[int, ...]) -> bool:
    """Whether one padded causal call beats one call per segment: causal work grows as length squared."""
    longest = max(segment_lengths)
    real = sum(n * n for n in segment_lengths)
    return len(segment_lengths) > 1 and len(segment_lengths) * longest * longest <= PADDED_WORK_LIMIT * real


def _segments_as_batch(
    module, query, key, value, segment_lengths: tuple[int, ...], offsets: torch.Tensor, kwargs: dict
) -> torch.Tensor:
    """Causal SDPA over the row's segments as one right-padded batch: (1, H, T, D) in, (1, T, H, D) out.

    Right padding needs no mask: a real position attends only to earlier positions, all of its
    own segment. The padded positions' outputs are never gathered back, so they get no gradient.
    """
    n, longest = len(segment_lengths), max(segment_lengths)
    slots = _padded_slots(offsets, query.shape[2], longest)

    def padded(t: torch.Tensor) -> torch.Tensor:  # (1, H, T, D) -> (n, H, longest, D)
        rows = t[0].transpose(0, 1)  # (T, H, D)
        batch = rows.new_zeros(n * longest, *rows.shape[1:]).index_copy(0, slots, rows)
        return batch.view(n, longest, *rows.shape[1:]).transpose(1, 2)

    out, _ = sdpa_attention_forward(module, padded(query), padded(key), padded(value), None, **kwargs)
    return out.reshape(n * longest, *out.shape[2:]).index_select(0, slots).unsqueeze(0)  # (1, T, H, D)


def _padded_slots(offsets: torch.Tensor, T: int, longest: int) -> torch.Tensor:
    """(T,) slot of each position in n x longest: position j of segment i -> i * longest + j.

    Worked out on the device from the offsets, with no shape that depends on their values, so
    nothing is read back. Made anew in each layer: a tensor kept across steps would be memory
    that only the steps it was made in account for (memory.py).
    """
    offsets = offsets.long()
    t = torch.arange(T, device=offsets.device)
    segment = torch.searchsorted(offsets[1:], t, right=True)  # (T,) which segment each position is in
    return segment * longest + t - offsets[segment]


class _Simulated(threading.local):
    device_type: str | None = None


_simulated = _Simulated()


@contextlib.contextmanager
def simulating(device_type: str):
    """Attention as it would run on `device_type`, for the estimator's fake CPU tensors (a fake
    CUDA tensor aborts a CPU-only PyTorch): on "cuda", the flash variable-length path, whose
    custom op has a shape-only implementation, and so its layout of saved tensors."""
    saved = _simulated.device_type
    _simulated.device_type = device_type
    try:
        yield
    finally:
        _simulated.device_type = saved


def _flash_varlen_applies(query: torch.Tensor, kwargs: dict) -> bool:
    training_dropout = kwargs.get("dropout", 0.0)
    return (
        varlen_attn is not None
        and (query.is_cuda or _simulated.device_type == "cuda")
        and query.dtype in (torch.float16, torch.bfloat16)
        and query.shape[0] == 1
        and not training_dropout
    )


def _flash_varlen(
    query, key, value, segment_lengths: tuple[int, ...], offsets: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """One flash-attention call over the row: (1, H, T, D) in, (1, T, H, D) out."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    groups = q.shape[1] // k.shape[1]
    extra = {"scale": scale}
    params = _varlen_params()
    if "enable_gqa" in params:
        extra["enable_gqa"] = groups > 1
    elif groups > 1:  # older torch: repeat the key/value heads for grouped-query attention
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if "window_size" in params:
        extra["window_size"] = (-1, 0)  # causal
    else:
        extra["is_causal"] = True
    longest = max(segment_lengths)
    out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), offsets, offsets, longest, longest, **extra)
    return out.unsqueeze(0)


@functools.cache
def _varlen_params() -> frozenset[str]:
    return frozenset(inspect.signature(varlen_attn).parameters)


@functools.lru_cache(maxsize=8)
def _cumulative_lengths(segment_lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(N+1,) int32 offsets of the segments, made once per row and reused by every layer (a copy
    to the device: data.Batch carries them there instead, with the row)."""
    offsets = [0]
    for n in segment_lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


AttentionInterface.register(NAME, varlen_sdpa_attention)


def enable_padding_free(model, max_len: int) -> None:
    """Switch `model` (a transformers model, possibly PEFT-wrapped) to per-record attention.

    The set-up check (selfcheck.py) calls this and compares the result with padded batches;
    a model it cannot serve raises SolotuneError and trains on padded batches instead.
    """
    window = getattr(model.config, "sliding_window", None)
    if window and max_len > window:
        # Each record's slice runs SDPA's full causal kernel, which has no window.
        raise SolotuneError(f"its sliding attention window ({window} tokens) is shorter than max_len ({max_len})")
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, KeyError, AttributeError) as err:
        raise SolotuneError(
            f"it does not take transformers' attention interface ({type(model).__name__}: {err})"
        ) from err


@contextlib.contextmanager
def padding_free_attention(model, max_len: int):
    """Per-record attention for the duration of the block; the model's own afterwards."""
    previous = model.config._attn_implementation
    enable_padding_free(model, max_len)
    try:
        yield
    finally:
        disable_padding_free(model, previous)


def disable_padding_free(model, attn_implementation: str) -> None:
    """Back to the attention the model had before `enable_padding_free`."""
    if model.config._attn_implementation == NAME:
        model.set_attn_implementation(attn_implementation)


class PaddingFree(FastPath):
    """A micro-batch as one row of its records back to back, each attending only to itself
    (data.collate_packed), against each record run alone. Switched on in `difference`: a model
    it cannot serve raises there, and the path is off."""

    name, field, axis, label = "padding-free rows", "padding_free", "pf", "Padding-free"

    def difference(self, model, probe: Probe, kept: dict) -> float:
        alone = [logits(model, collate([e], probe.pad_id).to(probe.device))[0] for e in probe.records]  # (T_i, V)
        packed = collate_packed(probe.records).to(probe.device)
        enable_padding_free(model, probe.max_len)
        return largest_difference(logits(model, packed), alone, packed)

    def undo(self, model, probe: Probe) -> None:
        disable_padding_free(model, probe.attention)

    def during_steps(self, model, max_len: int):
        return padding_free_attention(model, max_len)


PADDING_FREE = PaddingFree()
