"""Data parallel through torchrun on the CPU (gloo): two processes train exactly as one does."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from solotune.cli import main


@pytest.fixture
def data_file(tmp_path):
    f = tmp_path / "data.jsonl"
    rows = [{"prompt": f"{i} plus {i} is" + " x" * (i % 5), "response": f" {2 * i}" + "." * (i % 3)} for i in range(16)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def run_args(model_dir, data_file, out, *extra):
    return ["train", "--model", str(model_dir), "--data", str(data_file), "--output-dir", str(out), "--batch", "4",
            "--max-steps", "3", "--mp", "off", "--lora.dropout", "0", "--no-generate.enabled", *extra]  # fmt: skip


def test_two_processes_train_exactly_as_one_with_accumulation(tiny_model_dir, data_file, tmp_path):
    """`--nproc 2` (torchrun, gloo) against one process with `--grad-accum 2`: the same micro-batches,
    so the same per-step losses and the same adapter, to 1e-5 (fp32)."""
    assert main(run_args(tiny_model_dir, data_file, tmp_path / "one", "--grad-accum", "2")) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "solotune.cli", *run_args(tiny_model_dir, data_file, tmp_path / "two", "--nproc", "2")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["train"]["loss_curve"] == pytest.approx(one["train"]["loss_curve"], rel=1e-5)
    assert two["train"]["tokens"] == one["train"]["tokens"]  # the job's, summed over the ranks
    assert len(two["memory"]["per_rank_peak_mib"]) == 2
    weights = [load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    for name, w in weights[0].items():
        torch.testing.assert_close(weights[1][name], w, rtol=1e-5, atol=1e-7, msg=name)
    assert proc.stdout.count("trainable params:") == 2  # rank 0 alone speaks: the start line and the summary


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--no-lora"], "full fine-tuning across processes needs FSDP2"),
        (["--train.save-every", "1"], "checkpoints across processes are not supported yet"),
        (["--grad-accum", "4"], "times --grad-accum (4) must divide the batch (4)"),
    ],
)
def test_what_two_processes_cannot_do_is_refused_in_one_line(
    tiny_model_dir, data_file, tmp_path, capsys, extra, message
):
    assert main(run_args(tiny_model_dir, data_file, tmp_path / "o", "--nproc", "2", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
