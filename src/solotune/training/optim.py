"""The optimizer and its learning-rate schedule.

adamw: PyTorch's, two fp32 moments per trainable parameter (8 bytes). adamw8bit: bitsandbytes'
blockwise 8-bit moments (2 bytes, plus a scale per 256 values; tensors under 4,096 values keep
fp32). paged_*: the moments in CUDA unified memory, paged to CPU memory when the GPU runs short
(`train.check_device_support` refuses them on the CPU). sgd: plain SGD, no state at all.
"""

from __future__ import annotations

import torch
import transformers

from solotune.config import TrainConfig
from solotune.model.quant import bitsandbytes

BITSANDBYTES_OPTIMIZERS = {  # name -> the class's name in bitsandbytes.optim
    "adamw8bit": "AdamW8bit",
    "paged_adamw": "PagedAdamW",
    "paged_adamw8bit": "PagedAdamW8bit",
}


def new_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float):
    """The optimizer `name` over `params`."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    bnb = bitsandbytes(f"--optim {name}")
    return getattr(bnb.optim, BITSANDBYTES_OPTIMIZERS[name])(params, lr=lr, weight_decay=weight_decay)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, total_steps: int):
    """The configured optimizer over the model's trainable parameters, and its schedule: linear
    warm-up over `warmup_ratio` of the steps, then the configured decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = new_optimizer(cfg.optim, params, cfg.lr, cfg.weight_decay)
    name = "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule
    warmup = round(cfg.warmup_ratio * total_steps)
    scheduler = transformers.get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    return optimizer, scheduler


@torch.no_grad()
def create_state(optimizer: torch.optim.Optimizer) -> None:
    """Allocate the optimizer's state now, as its first step would, leaving the weights and every
    later update as they would have been (tested bit for bit).

    The state otherwise appears in the first update, and since it persists, the step after it
    could set a new peak though smaller: the memory breakdown had to follow that one too. With
    the state in place before the loop, the run's largest step can be rehearsed once
    (loop.py) and no step of the loop needs following.
    """
    if hasattr(optimizer, "init_state"):  # bitsandbytes: its own allocation, as its step() calls it
        for gindex, group in enumerate(optimizer.param_groups):
            for pindex, p in enumerate(group["params"]):
                if not optimizer.state[p]:
                    optimizer.init_state(group, p, gindex, pindex)
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    NoUpdate(optimizer).step()
    for p in params:
        p.grad = None


class NoUpdate:
    """An optimizer whose step allocates and computes what the wrapped one's would, and changes
    nothing: a step at learning rate 0 on zero gradients.

    PyTorch's AdamW at lr 0 leaves each weight as it was (its decay multiplies by 1 - 0 * wd),
    and on zero gradients its moments stay zero; the step count then goes back, so that the first
    real update has the bias correction of step 1. bitsandbytes' optimizers keep block statistics
    that even a zero step would change: for them the step allocates nothing more than their
    `init_state` did (create_state), and is skipped.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups  # for the gradient scaler's unscale_

    @torch.no_grad()
    def step(self) -> None:
        if hasattr(self.optimizer, "init_state"):
            return
        params = [p for group in self.param_groups for p in group["params"]]
        lrs = [group["lr"] for group in self.param_groups]
        for group in self.param_groups:
            group["lr"] = 0.0
        for p in params:
            if p.grad is not None:
                p.grad.zero_()
        try:
            self.optimizer.step()
        finally:
            for group, lr in zip(self.param_groups, lrs, strict=True):
                group["lr"] = lr
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"].zero_()
            elif "step" in state:
                state["step"] = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


class NoSchedule:
    """The schedule of a step that does not count (a rehearsal): it does not move."""

    def step(self) -> None:
        pass
