"""The optimizer and its learning-rate schedule.

adamw: PyTorch's, two fp32 moments per trainable parameter (8 bytes). adamw8bit: bitsandbytes'
blockwise 8-bit moments (2 bytes, plus a scale per 256 values; tensors under 4,096 values keep
fp32). paged_*: the moments in CUDA unified memory, paged to CPU memory when the GPU runs short
(`precision.check_device_support` refuses them on the CPU). sgd: plain SGD, no state at all.
"""

from __future__ import annotations

import torch
import transformers

from solotune.config import TrainConfig
from solotune.quant import bitsandbytes

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
    could set a new peak though smaller: `--train.track-memory peak` had to follow that one too.
    With the state in place before the loop, the run's largest step can go first and be the only
    step the breakdown follows.
    """
    if hasattr(optimizer, "init_state"):  # bitsandbytes: its own allocation, as its step() calls it
        for gindex, group in enumerate(optimizer.param_groups):
            for pindex, p in enumerate(group["params"]):
                if not optimizer.state[p]:
                    optimizer.init_state(group, p, gindex, pindex)
        return
    # PyTorch's optimizers allocate inside step(): one step at lr 0 on zero gradients changes no
    # weight (AdamW's decay multiplies by 1 - 0 * wd, its moments stay zero), then the step count
    # goes back to 0, so that the first real update has the bias correction of step 1.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p in params:
        p.grad = None
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"].zero_()
        elif "step" in state:
            state["step"] = 0
