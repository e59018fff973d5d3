from pathlib import Path

import pytest

from solotune.cli import build_parser, config_from_args
from solotune.config import RunConfig, apply_override, config_paths, load_yaml, validate
from solotune.errors import SolotuneError

ROOT = Path(__file__).resolve().parents[1]


def parse(*argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_defaults_are_the_reference_experiment_and_valid():
    cfg = validate(RunConfig())
    assert cfg.lora.enabled and cfg.lora.r == 16
    assert cfg.lora.target_modules == ["attention"]  # q, k and v in Llama (tests/test_adapters.py)
    assert cfg.train.batch == 8 and cfg.train.grad_accum == 1


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads_and_validates(path):
    validate(load_yaml(path))


def test_yaml_then_cli_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lora:\n  r: 4\n  dropout: 0.0\ntrain:\n  batch: 4\n")
    cfg = parse(str(f), "--lora.r", "8", "--mp", "off", "--grad-accum", "4", "--grad-checkpointing")
    assert (cfg.lora.r, cfg.lora.dropout, cfg.train.batch) == (8, 0.0, 4)
    assert cfg.precision.mp == "off" and cfg.train.grad_accum == 4 and cfg.train.grad_checkpointing


def test_cli_aliases_and_lists():
    cfg = parse("--no-lora", "--samples", "200", "--max-len", "256", "--target-modules", "q_proj", "v_proj")
    assert not cfg.lora.enabled and cfg.data.samples == 200 and cfg.data.max_len == 256
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert parse("--train.max-steps", "none").train.max_steps is None


def test_unknown_yaml_key_is_an_error_naming_it(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lora:\n  rank: 4\n")
    with pytest.raises(SolotuneError, match=r"c.yaml.lora: unknown key 'rank' \(known keys: enabled, r, alpha"):
        load_yaml(f)


def test_wrong_type_names_the_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: fast\n")
    with pytest.raises(SolotuneError, match=r"train.lr: expected a number, got 'fast'"):
        load_yaml(f)
    f.write_text("train:\n  batch: true\n")
    with pytest.raises(SolotuneError, match=r"train.batch: expected an integer"):
        load_yaml(f)


def test_bad_cli_value_names_the_option():
    with pytest.raises(SolotuneError, match=r"--lora.r: expected an integer, got 'big'"):
        parse("--lora.r", "big")


def test_grad_accum_must_divide_batch():
    cfg = RunConfig()
    apply_override(cfg, "train.grad_accum", "3")
    with pytest.raises(SolotuneError, match=r"train.grad_accum = 3: must divide the batch \(8\).*\[1, 2, 4, 8\]"):
        validate(cfg)


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("lora.dropout", "1.5", r"lora.dropout = 1.5: must be in \[0, 1\)"),
        ("train.lr", "-1", r"train.lr = -1.0: must be positive"),
        ("data.max_len", "2", r"data.max_len = 2: must be at least 8"),
        ("precision.mp", "fp8", r"precision.mp: 'fp8' is not one of auto, off, bf16, fp16"),
    ],
)
def test_impossible_values_are_rejected(path, value, message):
    cfg = RunConfig()
    apply_override(cfg, path, value)
    with pytest.raises(SolotuneError, match=message):
        validate(cfg)


def test_missing_and_malformed_yaml(tmp_path):
    with pytest.raises(SolotuneError, match="not found"):
        load_yaml(tmp_path / "nope.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("lora: [unclosed\n")
    with pytest.raises(SolotuneError, match="not valid YAML"):
        load_yaml(f)
    f.write_text("- a\n- b\n")
    with pytest.raises(SolotuneError, match="expected a mapping"):
        load_yaml(f)


def test_compile_cannot_run_with_every_step_tracked():
    cfg = RunConfig()
    cfg.train.compile, cfg.train.track_memory = "on", "always"
    with pytest.raises(SolotuneError, match="train.compile = 'on': .*--train.track-memory peak or off"):
        validate(cfg)
    cfg.train.track_memory = "peak"
    validate(cfg)


@pytest.mark.parametrize(
    ("given", "compile_value", "track_value"),
    [
        ([], "auto", "peak"),
        (["--train.compile"], "on", "peak"),
        (["--no-train.compile", "--no-train.track-memory"], "off", "off"),
        (["--train.track-memory", "always"], "auto", "always"),
        (["--train.compile", "true", "--train.track-memory", "false"], "on", "off"),
    ],
)
def test_switches_take_a_value_a_bare_flag_or_a_negation(given, compile_value, track_value):
    from solotune.cli import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["train", *given]))
    assert (cfg.train.compile, cfg.train.track_memory) == (compile_value, track_value)


def test_switches_read_booleans_from_yaml(tmp_path):
    """A config written before the switches had three values still loads: true/false mean on/off."""
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  compile: true\n  track_memory: false\n")
    cfg = load_yaml(f)
    assert (cfg.train.compile, cfg.train.track_memory) == ("on", "off")
    f.write_text("train:\n  track_memory: true\n")
    assert load_yaml(f).train.track_memory == "peak"
    f.write_text("train:\n  compile: sometimes\n")
    with pytest.raises(SolotuneError, match="train.compile: 'sometimes' is not one of auto, on, off"):
        validate(load_yaml(f))


def test_every_table_of_config_paths_names_fields_that_exist():
    """The tables that spell config paths as strings are checked against the schema: a renamed
    field fails loudly, here and at import, instead of silently missing a table."""
    from solotune.cli import ALIASES
    from solotune.experiment.ablate import AXES, plan_cells
    from solotune.run.trackers import HPARAMS
    from solotune.training.checkpoint import FREE_ON_RESUME

    for table, name in ((ALIASES, "aliases"), (FREE_ON_RESUME, "resume"), (HPARAMS.values(), "hparams")):
        assert config_paths(table, name) is table
    for axis in AXES.values():  # each axis, both values (plan_cells checks each override)
        assert len(plan_cells(RunConfig(), [axis])) == len(axis.values)
    with pytest.raises(AssertionError, match="not a config path: train.grad_acum"):
        config_paths(["train.grad_accum", "train.grad_acum"], "a table")


def test_the_micro_batch_is_the_batch_split_over_accumulation_and_processes():
    cfg = RunConfig()
    cfg.train.batch, cfg.train.grad_accum, cfg.nproc = 16, 2, 4
    assert cfg.micro_batch() == 2
