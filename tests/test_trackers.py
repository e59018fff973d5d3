"""Experiment trackers: what a run writes, read back with the tracker's own reader."""

import json
import sys

import pytest

from solotune.cli import main

tensorboard = pytest.importorskip("tensorboard", reason="tensorboard is not installed (the trackers extra)")


def test_tensorboard_holds_the_runs_numbers(tiny_model_dir, tmp_path):
    """Every step's loss, learning rate and gradient norm, the eval curve and the end-of-run
    summary, read back with TensorBoard's event reader, equal metrics.json's; the switches are
    its hyperparameters (the HParams view compares an ablation's cells)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--samples", "20", "--batch", "4", "--max-len", "400",
            "--mp", "off", "--eval.split", "0.2", "--eval.every", "2", "--no-generate.enabled",
            "--report-to", "tensorboard", "--output-dir", str(out)]  # fmt: skip
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    events = EventAccumulator(str(out / "tensorboard")).Reload()

    def steps(tag):
        return [e.step for e in events.Scalars(tag)]

    def values(tag):  # stored as float32
        return pytest.approx([e.value for e in events.Scalars(tag)], rel=1e-6)

    n = m["train"]["steps"]
    assert steps("train/loss") == list(range(1, n + 1)) and m["train"]["loss_curve"] == values("train/loss")
    assert m["train"]["lr"] == values("train/lr") and m["train"]["grad_norms"] == values("train/grad_norm")
    assert steps("eval/loss") == [s for s, _ in m["eval"]["loss_curve"]] == [0, 2, 4]
    assert [loss for _, loss in m["eval"]["loss_curve"]] == values("eval/loss")
    assert steps("summary/peak_mib") == [n] and [m["memory"]["peak_mib"]] == values("summary/peak_mib")
    assert [m["eval"]["accuracy_after"]["accuracy"]] == values("summary/accuracy_after")
    assert any(tag.startswith("config") for tag in events.Tags()["tensors"])
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert (
        hparams["mp"].string_value == "off"
        and hparams["lora"].string_value == "True"
        and hparams["batch"].number_value == 4
    )


def test_trackers_that_cannot_be_used_are_refused_in_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    base = ["train", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "o")]
    assert main([*base, "--report-to", "comet"]) == 2
    assert main([*base, "--report-to", "tensorboard,wandb"]) == 2
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    assert main([*base, "--report-to", "tensorboard"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3
    assert "unknown tracker" in errors[0] and "wandb: not supported yet" in errors[1]
    assert "the tensorboard package is not installed" in errors[2] and "solotune[trackers]" in errors[2]
    assert not (tmp_path / "o").exists()
