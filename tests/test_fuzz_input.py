"""Random and malformed input to the data reader and the config loader: the result is always
valid records or our own error with a message, never another exception."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from solotune.config import DataConfig, load_yaml, validate
from solotune.data import read_records, tokenize_records
from solotune.errors import SolotuneError
from solotune.testing import make_tokenizer

TOKENIZER = make_tokenizer()
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
record_like = st.dictionaries(
    st.sampled_from(["instruction", "input", "output", "prompt", "response", "text", "messages", "role", "extra"]),
    json_values,
    max_size=5,
)


def read_and_tokenize(path):
    for on_bad_record in ("error", "skip"):
        cfg = DataConfig(path=str(path), max_len=64, on_bad_record=on_bad_record)
        try:
            examples, stats, _ = tokenize_records(read_records(cfg), TOKENIZER, cfg)
        except SolotuneError as e:
            assert str(e)  # a message, naming what is wrong
            continue
        assert examples and stats.records == len(examples) + stats.skipped + stats.dropped


@FAST
@given(rows=st.lists(record_like | json_values, min_size=1, max_size=5))
def test_jsonl_records_are_read_or_refused_clearly(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    read_and_tokenize(path)


@FAST
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_are_refused_clearly(tmp_path_factory, raw):
    folder = tmp_path_factory.mktemp("fuzz")
    for name in ("data.json", "data.jsonl"):
        (folder / name).write_bytes(raw)
        read_and_tokenize(folder / name)


config_keys = st.sampled_from(
    [
        "model",
        "data",
        "lora",
        "train",
        "precision",
        "generate",
        "device",
        "r",
        "batch",
        "grad_accum",
        "lr",
        "mp",
        "max_len",
        "target_modules",
        "bogus",
    ]
)
config_like = st.dictionaries(
    config_keys, json_values | st.dictionaries(config_keys, json_values, max_size=4), max_size=4
)


@FAST
@given(data=config_like)
def test_config_files_load_or_are_refused_clearly(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    try:
        validate(load_yaml(path))
    except SolotuneError as e:
        assert str(e)
