import pytest

from solotune.config import RunConfig
from solotune.data import Record, tokenize_records
from solotune.errors import SolotuneError
from solotune.experiment.estimate import PRESETS, estimate_memory, model_config, search
from solotune.model.models import load_tokenizer, resolve_model_source
from solotune.model.precision import resolve_policy
from solotune.testing import save_model_folder
from solotune.training.loop import train_loop
from solotune.training.setup import build_model

PARTS = ("parameters", "gradients", "optimizer_state", "activations")
SEQ = 128  # every record below is exactly this long: prompt 100 + response 27 + EOS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_folder(tmp_path_factory.mktemp("est"), hidden_size=128, num_hidden_layers=4)


def run_config(model_dir, lora, mp, checkpointing, batch, grad_accum, quant="none", optim="adamw"):
    cfg = RunConfig(device="cpu")  # measured here: the CPU's paths simulated
    cfg.quant.method, cfg.train.optim = quant, optim
    if optim == "adamw8bit":
        cfg.lora.r = 32  # 32 x 128 adapters: bitsandbytes keeps tensors under 4,096 values in 32 bits
    cfg.model.name = str(model_dir)
    cfg.lora.enabled, cfg.precision.mp, cfg.train.grad_checkpointing = lora, mp, checkpointing
    cfg.train.batch, cfg.train.grad_accum, cfg.train.max_steps = batch, grad_accum, 2
    return cfg


def measured(cfg):
    source = resolve_model_source(cfg.model)
    tokenizer = load_tokenizer(source, cfg.model)
    rows = [Record({"prompt": "p" * 100, "response": "r" * 27}, f"row {i}") for i in range(16)]
    examples, _, _ = tokenize_records(rows, tokenizer, cfg.data)
    assert {len(e.input_ids) for e in examples} == {SEQ}
    policy = resolve_policy(cfg.precision, "cpu", frozen_base=cfg.lora.enabled)
    return train_loop(build_model(source, cfg, policy), examples, tokenizer.pad_token_id, policy, cfg.train).memory


@pytest.mark.parametrize(
    "lora, mp, checkpointing, batch, grad_accum, quant, optim",
    [
        (True, "off", False, 4, 1, "none", "adamw"),
        (True, "bf16", False, 4, 1, "none", "adamw"),
        (False, "off", False, 4, 1, "none", "adamw"),
        (False, "bf16", False, 4, 1, "none", "adamw"),
        (True, "off", True, 4, 1, "none", "adamw"),
        (True, "off", False, 8, 1, "none", "adamw"),
        (True, "off", False, 8, 4, "none", "adamw"),
        (True, "off", False, 4, 1, "nf4", "adamw"),
        (True, "bf16", True, 4, 1, "nf4", "adamw"),
        (True, "off", False, 4, 1, "fp4", "adamw"),
        (True, "off", False, 4, 1, "int8", "adamw"),
        (True, "off", False, 4, 1, "none", "adamw8bit"),
        (False, "off", False, 4, 1, "none", "sgd"),
    ],
)
def test_estimate_matches_the_measured_breakdown(model_dir, lora, mp, checkpointing, batch, grad_accum, quant, optim):
    cfg = run_config(model_dir, lora, mp, checkpointing, batch, grad_accum, quant, optim)
    real = measured(cfg)
    est = estimate_memory(model_config(str(model_dir)), cfg, SEQ).parts_mib
    assert est["tracked_peak_mib"] == pytest.approx(real["tracked_peak_mib"], rel=0.10)
    for part in PARTS:
        assert abs(est[f"{part}_mib"] - real[f"{part}_mib"]) <= max(0.10 * real[f"{part}_mib"], 5.0), part


def test_a_gpu_is_estimated_with_its_own_attention_layout(monkeypatch):
    """In 16 bits on CUDA a padding-free row goes through flash attention's variable-length op,
    which keeps q, k and v as they are; the CPU pads the records into a batch and keeps padded
    copies of them (the +10.1% of the H200's 7B step: 3,072 MiB; the estimate for a GPU now
    gives that step 30,322.4 MiB, measured there 30,323). The estimate for a GPU simulates the
    GPU's op, and differs from the CPU's by those copies: 3 x (tokens x hidden) 16-bit values
    per layer, where every record fills the row."""
    import functools

    from solotune.fastpaths import attention

    config = model_config("llama2-7b")
    shape = dict(hidden_size=512, num_attention_heads=4, num_key_value_heads=4, intermediate_size=1024)
    for name, value in dict(shape, num_hidden_layers=3, vocab_size=512).items():  # Llama's layers, head_dim 128
        setattr(config, name, value)
    cfg = RunConfig()
    cfg.precision.mp, cfg.train.batch, cfg.lora.dropout = "bf16", 4, 0.0
    calls = []

    @functools.wraps(attention.varlen_attn)  # its signature too: the call adapts to it
    def counted(*args, **kwargs):
        calls.append(1)
        return counted.__wrapped__(*args, **kwargs)

    monkeypatch.setattr(attention, "varlen_attn", counted)
    gpu = estimate_memory(config, cfg, 64).parts_mib
    assert calls  # the GPU's op ran, on fake tensors
    cpu = estimate_memory(config, RunConfig(device="cpu", precision=cfg.precision, train=cfg.train, lora=cfg.lora), 64)
    copies_mib = 3 * (4 * 64) * 512 * 2 * 3 / 2**20  # q, k, v x tokens x hidden x 2 bytes x layers
    # and the CPU's index of padded slots, a few (T,) integer tensors: under 0.01 MiB
    assert cpu.parts_mib["activations_mib"] - gpu["activations_mib"] == pytest.approx(copies_mib, abs=0.01)
    assert cpu.parts_mib["parameters_mib"] == gpu["parameters_mib"]


def test_presets_and_missing_configs():
    assert model_config("llama2-7b").num_hidden_layers == 32
    assert model_config("meta-llama/Llama-2-7b-hf").hidden_size == 4096
    assert set(PRESETS) >= {"llama2-7b", "llama2-13b", "llama3-8b", "mistral-7b", "qwen2.5-7b", "smollm2-135m"}
    with pytest.raises(SolotuneError, match=r"no config for model 'no-org/no-model'.*preset"):
        model_config("no-org/no-model")


def test_smollm2_lora_parameter_count_from_the_preset():
    est = estimate_memory(model_config("smollm2-135m"), RunConfig(), seq_len=16)
    assert (est.trainable, est.total) == (1_290_240, 135_805_248)  # as `train` prints for the real model


def test_search_lists_only_configurations_the_estimate_says_fit(model_dir):
    cfg = run_config(model_dir, lora=True, mp="off", checkpointing=False, batch=8, grad_accum=1)
    config = model_config(str(model_dir))
    full_b8 = estimate_memory(config, run_config(model_dir, False, "off", False, 8, 1), SEQ).parts_mib[
        "tracked_peak_mib"
    ]
    lora_b1 = estimate_memory(config, run_config(model_dir, True, "off", False, 8, 8), SEQ).parts_mib[
        "tracked_peak_mib"
    ]
    budget = (full_b8 + lora_b1) / 2  # room for LoRA at some micro-batch, not for full at 8
    found = search(config, cfg, SEQ, gpu_mib=budget, overhead_mib=0.0)
    assert found and all(c.peak_mib <= budget for c in found)
    assert not any(not c.lora and c.micro_batch == 8 and not c.grad_checkpointing for c in found)
    keys = [(c.grad_checkpointing, -c.micro_batch, c.quant != "none") for c in found]
    assert keys == sorted(keys)  # no recomputation first, then larger micro-batches, then 16-bit bases
    assert found[0].train_command(cfg, SEQ).startswith(f"solotune train --model {model_dir} --mp off")
    qlora = [c for c in found if c.quant == "nf4"]  # tried too: it fits wherever LoRA does, and more
    assert qlora and min(c.peak_mib for c in qlora) < min(c.peak_mib for c in found if c.lora and c.quant == "none")
    assert "--quant nf4" in qlora[0].train_command(cfg, SEQ) and qlora[0].describe().startswith("QLoRA NF4")


def test_estimate_command_prints_the_breakdown_and_the_verdict(capsys):
    from solotune.cli import main

    args = [
        "estimate",
        "--model",
        "llama2-7b",
        "--quant",
        "nf4",
        "--mp",
        "bf16",
        "--grad-checkpointing",
        "--seq-len",
        "64",
        "--batch",
        "2",
        "--gpu-mem",
        "8GB",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "optimizer state" in out and "fits in 7,629 MiB" in out


def test_a_process_of_two_is_estimated_as_it_runs(model_dir):
    """`--nproc 2` with batch 4: each rank runs micro-batches of 2, as one process does with
    `--grad-accum 2` (whose measured breakdown the estimate meets, 10% or 5 MiB a part); the
    rank adds only the fp32 buffer of the step's all-reduce."""
    two = run_config(model_dir, True, "off", False, 4, 1)
    two.nproc = 2
    one = run_config(model_dir, True, "off", False, 4, 2)
    real = measured(one)
    est_two, est_one = (estimate_memory(model_config(str(model_dir)), c, SEQ) for c in (two, one))
    for part in PARTS:
        assert abs(est_two.parts_mib[f"{part}_mib"] - real[f"{part}_mib"]) <= max(0.10 * real[f"{part}_mib"], 5.0), part
    buffer_mib = (est_two.trainable + 1) * 4 / 2**20
    assert est_two.parts_mib["tracked_peak_mib"] <= est_one.parts_mib["tracked_peak_mib"] + buffer_mib + 1e-9


def test_estimate_takes_gpus_for_processes(capsys):
    from solotune.cli import main

    assert main(["estimate", "--model", "smollm2-135m", "--gpus", "2", "--batch", "8", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "micro-batch 4 x 64 tokens" in out and "per process of 2" in out


def test_an_fsdp_rank_is_estimated_as_it_runs(model_dir, tmp_path):
    """Full fine-tuning over two FSDP2 processes (torchrun, gloo), every record SEQ tokens: rank
    0's measured breakdown against the estimate, which shards the model over a fake process
    group: the tensor peak within 10%, each part within 10% or 5 MiB, and the training state
    after an update (what FSDP2 divides by the ranks) within 10%."""
    import json
    import os
    import subprocess
    import sys

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"prompt": "p" * 100, "response": "r" * 27}] * 16))
    cmd = [sys.executable, "-m", "solotune.cli", "train", "--model", str(model_dir), "--data", str(data),
           "--no-lora", "--mp", "off", "--batch", "4", "--max-steps", "2", "--nproc", "2", "--no-generate.enabled",
           "--train.track-memory", "always", "--output-dir", str(tmp_path / "run")]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    real = json.loads((tmp_path / "run" / "metrics.json").read_text())["memory"]

    cfg = run_config(model_dir, False, "off", False, 4, 1)
    cfg.nproc = 2
    est = estimate_memory(model_config(str(model_dir)), cfg, SEQ).parts_mib
    assert est["tracked_peak_mib"] == pytest.approx(real["tracked_peak_mib"], rel=0.10)
    for part in PARTS:
        assert abs(est[f"{part}_mib"] - real[f"{part}_mib"]) <= max(0.10 * real[f"{part}_mib"], 5.0), part
    for part, mib in real["state_after_update"].items():
        assert est["state_after_update"][part] == pytest.approx(mib, rel=0.10), part
    single = estimate_memory(model_config(str(model_dir)), run_config(model_dir, False, "off", False, 4, 2), SEQ)
    held = sum(single.parts_mib["state_after_update"].values())
    assert sum(est["state_after_update"].values()) == pytest.approx(held / 2, rel=0.10)
