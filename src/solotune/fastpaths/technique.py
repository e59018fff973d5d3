"""What every fast path offers, and how one is compared with the model's plain forward.

A fast path changes how the model computes, never what: the same logits and loss, with less
memory or time. Each lives in one module that defines one `FastPath` (swiglu.FUSED_SWIGLU,
attention.PADDING_FREE, loss.CHUNKED_HEAD), listed in registry.FAST_PATHS. The set-up check
(selfcheck.py) goes through that list: where the run's config asks for a path (its `field`),
it switches it on (`enable`), compares it with the plain forward on a probe batch
(`difference`), and keeps it or switches it off again (`undo`). The loop holds `during_steps`
around its steps, the ablation gets an axis from `axis` and `label`.

Adding one: a module with its FastPath, a TrainConfig field, and its line in FAST_PATHS.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from solotune.data import Batch, Example, collate


@dataclass
class Probe:
    """What a fast path is checked on: a few short records of the run (every next token a
    target), padded into one batch on the run's device, and the longest record the run may have."""

    records: list[Example]
    pad_id: int
    max_len: int
    device: torch.device
    attention: str  # the model's own attention implementation, before any path
    padded: Batch = field(init=False)

    def __post_init__(self):
        self.padded = collate(self.records, self.pad_id).to(self.device)


class FastPath:
    """One fast path (see the module's docstring). Subclasses set the names and override what
    they do; by default a path needs no switching on, and nothing around the loop's steps."""

    name: str  # as the set-up check's lines name it
    field: str  # the TrainConfig field that asks for it; its value is the one kept
    off: object = False  # the field's value with the path off
    axis: str  # `solotune ablate --axes` key
    label: str  # the ablation table's column

    def on_value(self, train_cfg) -> object:
        """The field's value for an ablation's ON cell."""
        return True

    def enable(self, model, probe: Probe) -> bool:
        """Switch the path on in `model`; False where the model has nothing it applies to."""
        return True

    def difference(self, model, probe: Probe, kept: dict) -> float:
        """With the path on, the largest relative difference from the model's plain forward
        (`largest_difference`). `kept`: the values of the paths on, by field, this one's included."""
        raise NotImplementedError

    def undo(self, model, probe: Probe) -> None:
        """Switch the path off again."""

    def during_steps(self, model, max_len: int):
        """What the loop holds around its steps while the path is on."""
        return contextlib.nullcontext()


def restore_forwards(model: torch.nn.Module, patched) -> None:
    """Undo a path that gave modules the forward `patched` (a function bound to each): every
    such module runs its class's own forward again."""
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "__func__", None) is patched:
            del module.forward


def logits(model, batch: Batch) -> torch.Tensor:
    return model(**batch.model_inputs()).logits.float()


def largest_difference(logits: torch.Tensor, reference, batch: Batch) -> float:
    """The largest relative difference of a position's logit vector, ||logits - reference|| /
    ||reference||, over the real (non-padding) positions.

    Padded `batch`: `reference` is padded alike. Padding-free `batch`: `logits` is one row of
    the records back to back, `reference` a list with each record's logits (T_i, V).
    """
    if batch.segment_lengths is None:
        mask = batch.attention_mask.bool()
        return relative(logits[mask], reference[mask])
    if not isinstance(reference, list):  # padding-free against padding-free
        return relative(logits[0], reference[0])
    pieces, start = [], 0
    for ref, n in zip(reference, batch.segment_lengths):
        pieces.append(relative(logits[0, start : start + n], ref[:n]))
        start += n
    return max(pieces)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over rows of ||a - b|| / ||b|| for (N, V) tensors."""
    return ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-6)).max().item()
