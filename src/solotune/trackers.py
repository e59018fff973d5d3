"""Experiment trackers (`--report-to`): a run's numbers in the tools people follow runs in,
written through each tool's own library, offline.

Each step logs the loss, learning rate, gradient norm and tokens/s; each evaluation its loss;
the end of the run the peak memory and its breakdown, the eval loss and task accuracy, and the
run's switches as hyperparameters, so that the tracker's own compare view lays an ablation grid's
cells side by side (`solotune ablate` runs each cell as a run of its own).

TensorBoard: event files in the run folder's `tensorboard/` (`tensorboard --logdir runs/`, or
a grid's `cells/`), the switches and results in its HParams view. MLflow, W&B and trackio are
not supported yet.
"""

from __future__ import annotations

import json
from pathlib import Path

from solotune.errors import SolotuneError

SUPPORTED = ("tensorboard",)
NOT_YET = ("mlflow", "wandb", "trackio")
TENSORBOARD_DIR = "tensorboard"

# The switches shown as hyperparameters: what tells an ablation's cells apart, and the scale.
HPARAMS = {
    "lora": ("lora", "enabled"),
    "lora_r": ("lora", "r"),
    "mp": ("precision", "mp"),
    "quant": ("quant", "method"),
    "batch": ("train", "batch"),
    "grad_accum": ("train", "grad_accum"),
    "grad_checkpointing": ("train", "grad_checkpointing"),
    "lr": ("train", "lr"),
    "optim": ("train", "optim"),
    "max_len": ("data", "max_len"),
}


def parse_report_to(value: str) -> list[str]:
    """The tracker names of `--report-to a,b` ("none": no tracker)."""
    names = [n.strip() for n in value.split(",") if n.strip() and n.strip() != "none"]
    for name in names:
        if name in NOT_YET:
            raise SolotuneError(f"--report-to {name}: not supported yet; supported: {', '.join(SUPPORTED)}")
        if name not in SUPPORTED:
            raise SolotuneError(f"--report-to {name}: unknown tracker; supported: {', '.join(SUPPORTED)}, or none")
    return names


class TensorBoard:
    """A run's scalars, config and hyperparameters in TensorBoard event files."""

    def __init__(self, folder: Path, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SolotuneError(
                "--report-to tensorboard: the tensorboard package is not installed; "
                "pip install 'solotune[trackers]' (or tensorboard)"
            ) from None
        self.writer = SummaryWriter(str(folder))
        self.config = config
        self.writer.add_text("config", f"```\n{json.dumps(config, indent=2)}\n```")

    def log(self, step: int, values: dict) -> None:
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(name, value, step)

    def finish(self, step: int, summary: dict) -> None:
        """The run's results at its last step, and the switches with them (HParams view)."""
        self.log(step, summary)
        hparams = {name: _hparam(self.config[section][key]) for name, (section, key) in HPARAMS.items()}
        results = {f"hparam/{name}": value for name, value in summary.items() if value is not None}
        self.writer.add_hparams(hparams, results, run_name=".")
        self.writer.close()


def _hparam(value):
    """A number or a string: TensorBoard's writer would store a boolean as the number 1 or 0."""
    return value if isinstance(value, (int, float, str)) and not isinstance(value, bool) else str(value)


class Trackers:
    """Every tracker a run reports to, as one."""

    def __init__(self, names: list[str], run_dir: Path, config: dict):
        self.trackers = [TensorBoard(run_dir / TENSORBOARD_DIR, config) for name in names if name == "tensorboard"]

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log(self, step: int, values: dict) -> None:
        for t in self.trackers:
            t.log(step, values)

    def finish(self, step: int, summary: dict) -> None:
        for t in self.trackers:
            t.finish(step, summary)


def run_summary(metrics: dict) -> dict:
    """The end-of-run numbers a tracker gets, from metrics.json's."""
    t, mem, e = metrics["train"], metrics["memory"], metrics.get("eval") or {}
    summary = {
        "summary/peak_mib": mem["peak_mib"],
        "summary/tensor_peak_mib": mem["tracked_peak_mib"],
        **{
            f"summary/{part}_mib": mem[f"{part}_mib"]
            for part in ("parameters", "gradients", "optimizer_state", "activations")
        },
        "summary/tokens_per_s": t["tokens_per_s"],
        "summary/runtime_s": t["runtime_s"],
        "summary/avg_loss": t["avg_loss"],
        "summary/final_loss": t["final_loss"],
        "summary/eval_loss": e.get("loss_after"),
    }
    for when in ("before", "after"):
        if f"accuracy_{when}" in e:
            summary[f"summary/accuracy_{when}"] = e[f"accuracy_{when}"]["accuracy"]
    return summary
