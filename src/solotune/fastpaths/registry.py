"""The fast paths, in the order the set-up check tries them, and the decision it hands on.

The order matters once: the chunked head is compared on the batch layout the run will use, so
padding-free rows are decided before it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from solotune.data import Batch, Example, make_batch
from solotune.fastpaths.attention import PADDING_FREE
from solotune.fastpaths.loss import CHUNKED_HEAD, ResponseLoss
from solotune.fastpaths.swiglu import FUSED_SWIGLU
from solotune.fastpaths.technique import FastPath

FAST_PATHS: tuple[FastPath, ...] = (FUSED_SWIGLU, PADDING_FREE, CHUNKED_HEAD)


@dataclass
class FastPaths:
    """The fast paths a run uses, as decided once by the set-up check (selfcheck.py) and handed
    to everything that computes the loss the run's way: the loop, the evaluation, the estimate.

    Each path's value is read by its config field's name (`fast.padding_free`, `fast.ce_chunk`).
    """

    kept: dict[str, object] = field(default_factory=lambda: {p.field: p.off for p in FAST_PATHS})
    kernels: str = "none"  # "liger": Liger's RMSNorm and RoPE (kernels.py), numerics rather than a path
    largest_difference: float = 0.0  # of the paths kept, relative (selfcheck.TOLERANCE)
    notes: list[str] = field(default_factory=list)  # one line per fast path turned off, saying why

    @classmethod
    def asked(cls, train_cfg) -> FastPaths:
        """The paths `train_cfg` asks for, unchecked: for a caller that has checked them, or that
        runs the loop on a model it built for it (tests, benchmarks, the estimate)."""
        kernels = "liger" if train_cfg.kernels == "liger" else "none"
        return cls({p.field: getattr(train_cfg, p.field) for p in FAST_PATHS}, kernels=kernels)

    def __getattr__(self, name: str):
        kept = self.__dict__.get("kept", {})
        if name in kept:
            return kept[name]
        raise AttributeError(f"{type(self).__name__} has no {name!r}")

    def loss_fn(self) -> ResponseLoss:
        return ResponseLoss(self.ce_chunk)

    def batch(self, examples: list[Example], pad_id: int) -> Batch:
        """A micro-batch laid out as the run computes it."""
        return make_batch(examples, pad_id, self.padding_free)

    @contextlib.contextmanager
    def during_steps(self, model, max_len: int):
        """Every kept path's context, for the loop's steps (or an evaluation's forwards)."""
        with contextlib.ExitStack() as stack:
            for path in FAST_PATHS:
                if self.kept[path.field] != path.off:
                    stack.enter_context(path.during_steps(model, max_len))
            yield

    def as_dict(self) -> dict:
        return {
            **self.kept,
            "kernels": self.kernels,
            "largest_difference": self.largest_difference,
            "notes": self.notes,
        }

    def line(self) -> str:
        names = ["Liger RMSNorm + RoPE"] if self.kernels == "liger" else []
        names += [p.name for p in FAST_PATHS if self.kept[p.field] != p.off]
        if not names:
            return "set-up check: no fast path in use"
        return (
            f"set-up check: {', '.join(names)} match the model's plain forward "
            f"(largest difference {self.largest_difference:.1e}, relative)"
        )
