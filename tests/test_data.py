import json
import re

import pytest

from solotune.builtin_data import builtin_records
from solotune.config import DataConfig
from solotune.data import (
    IGNORE_INDEX,
    collate,
    format_instruction,
    largest_step_early,
    plan_steps,
    read_records,
    split_micro_batches,
    tokenize_records,
)
from solotune.errors import SolotuneError


def tokenize(tokenizer, rows, tmp_path, suffix=".jsonl", **cfg):
    f = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        f.write_text(json.dumps(rows))
    dcfg = DataConfig(path=str(f), **cfg)
    return tokenize_records(read_records(dcfg), tokenizer, dcfg)


def decoded_labels(tokenizer, example):
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


def test_alpaca_template_with_and_without_input():
    assert format_instruction("Add.", "2 and 3").endswith(
        "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )
    no_input = format_instruction("Add.")
    assert "### Input" not in no_input and no_input.endswith("### Instruction:\nAdd.\n\n### Response:\n")


def test_loss_only_on_the_response(tokenizer, tmp_path):
    rows = [{"instruction": "Say hi.", "input": "", "output": "hi there"}]
    (ex,), stats, fmt = tokenize(tokenizer, rows, tmp_path)
    assert fmt == "alpaca"
    assert decoded_labels(tokenizer, ex) == "hi there</s>"
    assert tokenizer.decode(ex.input_ids).startswith("Below is an instruction")
    assert stats.loss_tokens == len("hi there") + 1


def test_train_on_prompt_puts_loss_on_everything(tokenizer, tmp_path):
    rows = [{"instruction": "Say hi.", "output": "hi"}]
    (ex,), _, _ = tokenize(tokenizer, rows, tmp_path, train_on_prompt=True)
    assert ex.labels == ex.input_ids


@pytest.mark.parametrize(
    "row, fmt, expected_label_text",
    [
        ({"prompt": "Q: 2+2?\nA:", "response": " 4"}, "prompt_response", " 4</s>"),
        ({"text": "plain text"}, "text", "plain text</s>"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            "messages",
            "yo</s>",
        ),
    ],
)
def test_other_formats(tokenizer, tmp_path, row, fmt, expected_label_text):
    (ex,), _, detected = tokenize(tokenizer, [row], tmp_path)
    assert detected == fmt
    # Labels are the tokens whose *next-token* prediction is trained; position 0 never is.
    assert decoded_labels(tokenizer, ex).endswith(expected_label_text)


def test_multi_turn_messages_train_each_assistant_turn_only(tokenizer, tmp_path):
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "B1"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "D2"},
    ]
    (ex,), _, _ = tokenize(tokenizer, [{"messages": msgs}], tmp_path)
    assert decoded_labels(tokenizer, ex) == "B1</s>D2</s>"


def test_json_parquet_and_samples(tokenizer, tmp_path):
    rows = [{"instruction": f"n{i}", "output": str(i)} for i in range(10)]
    examples, _, _ = tokenize(tokenizer, rows, tmp_path, suffix=".json", samples=4)
    assert [e.record_index for e in examples] == [0, 1, 2, 3]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    recs = read_records(DataConfig(path=str(tmp_path / "d.parquet")))
    assert len(recs) == 10 and recs[3].fields["output"] == "3"


def test_truncation_keeps_the_prompt_and_drops_records_without_response(tokenizer, tmp_path):
    rows = [{"prompt": "p" * 10, "response": "r" * 50}, {"prompt": "p" * 60, "response": "r"}]
    examples, stats, _ = tokenize(tokenizer, rows, tmp_path, max_len=32)
    assert stats.truncated == 2 and stats.dropped == 1
    assert len(examples) == 1 and len(examples[0].input_ids) == 32


@pytest.mark.parametrize(
    "content, message",
    [
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n',
            r"data.jsonl:2: missing field 'output' \(format alpaca\)",
        ),
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 5}\n',
            r"data.jsonl:2: field 'output' must be a string, got int",
        ),
        ('{"instruction": "a", "output": "  "}\n', r"data.jsonl:1: field 'output' is empty"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": \n', r"data.jsonl:2: not valid JSON"),
        ('{"foo": 1}\n', r"data.jsonl:1: cannot tell the record format; expected keys instruction, output"),
        ("[1, 2]\n", r"data.jsonl:1: cannot tell the record format"),
    ],
)
def test_bad_records_name_file_and_line(tokenizer, tmp_path, content, message):
    f = tmp_path / "data.jsonl"
    f.write_text(content)
    cfg = DataConfig(path=str(f))
    with pytest.raises(SolotuneError, match=message):
        tokenize_records(read_records(cfg), tokenizer, cfg)


def test_invalid_utf8_and_missing_file(tokenizer, tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    cfg = DataConfig(path=str(f))
    with pytest.raises(
        SolotuneError, match=r"data.jsonl:2: not valid UTF-8 \(or skip such records with --data.on-bad-record skip\)"
    ):
        tokenize_records(read_records(cfg), tokenizer, cfg)
    with pytest.raises(SolotuneError, match=r"data file .*missing.json not found"):
        read_records(DataConfig(path=str(tmp_path / "missing.json")))


def test_bad_records_can_be_skipped_and_long_ones_dropped(tokenizer, tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_bytes(
        b'{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n{"instruction": \n'
        b'{"instruction": "\xff", "output": "x"}\n{"instruction": "long", "output": "' + b"y" * 400 + b'"}\n'
    )
    cfg = DataConfig(path=str(f), on_bad_record="skip", max_len=200)
    examples, stats, _ = tokenize_records(read_records(cfg), tokenizer, cfg)
    assert stats.skipped == 3 and len(examples) == 2 and stats.truncated == 1
    assert stats.skip_reasons[0].endswith("data.jsonl:2: missing field 'output' (format alpaca)")
    assert (
        "data.jsonl:3: not valid JSON" in stats.skip_reasons[1]
        and "data.jsonl:4: not valid UTF-8" in stats.skip_reasons[2]
    )
    cfg.too_long = "drop"
    examples, stats, _ = tokenize_records(read_records(cfg), tokenizer, cfg)
    assert len(examples) == 1 and stats.dropped == 1 and stats.truncated == 0


def test_hub_dataset_offline_gives_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SolotuneError, match=r"could not load data set 'no-such-org/no-such-data'.*--data PATH"):
        read_records(DataConfig(path="no-such-org/no-such-data"))


def test_step_plan_is_seeded_and_covers_every_record_once_per_epoch():
    a = plan_steps(20, batch=8, epochs=2, seed=3, shuffle=True)
    assert a == plan_steps(20, batch=8, epochs=2, seed=3, shuffle=True)
    assert a != plan_steps(20, batch=8, epochs=2, seed=4, shuffle=True)
    assert [len(s) for s in a] == [8, 8, 4, 8, 8, 4]
    assert sorted(i for s in a[:3] for i in s) == list(range(20))
    assert split_micro_batches(list(range(8)), 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert split_micro_batches(list(range(5)), 4) == [[0, 1], [2, 3], [4]]


def test_collate_pads_right_and_masks_padding(tokenizer, tmp_path):
    rows = [{"prompt": "ab", "response": "c"}, {"prompt": "abcdef", "response": "ghij"}]
    examples, _, _ = tokenize(tokenizer, rows, tmp_path)
    batch = collate(examples, tokenizer.pad_token_id)
    assert batch.input_ids.shape == (2, 11)
    assert batch.attention_mask[0].tolist() == [1] * 4 + [0] * 7
    assert (batch.labels[0, 4:] == IGNORE_INDEX).all()
    assert batch.n_tokens == 15 and batch.n_positions == 22 and batch.n_loss_tokens == 2 + 5


def test_builtin_data_is_deterministic_and_its_answers_are_right():
    records = builtin_records()
    assert len(records) >= 200 and records == builtin_records()
    assert len({r["instruction"] + r["input"] for r in records}) > 150  # varied, not one template
    checked = 0
    for r in records:
        ins, inp, out = r["instruction"], r["input"], r["output"]
        if m := re.fullmatch(r"What is (\d+) \+ (\d+)\?", ins):
            assert out == f"{m[1]} + {m[2]} = {int(m[1]) + int(m[2])}."
        elif m := re.fullmatch(r"Reverse the letters of the word '(\w+)'\.", ins):
            assert out == m[1][::-1]
        elif ins.startswith("Sort these numbers"):
            assert [int(x) for x in out.split(", ")] == sorted(int(x) for x in inp.split(", "))
        elif ins.startswith("Turn the description into a JSON"):
            obj = json.loads(out)
            assert obj["name"] in inp and str(obj["age"]) in inp and obj["city"] in inp
        elif ins.startswith("Extract the email"):
            assert out in inp and "@" in out
        else:
            continue
        checked += 1
    assert checked >= 100


def test_each_epoch_runs_its_largest_step_first_and_keeps_the_rest_in_order():
    steps = plan_steps(20, batch=4, epochs=2, seed=3, shuffle=True)
    size = sum  # any key: here the sum of the indices
    reordered = largest_step_early(steps, steps_per_epoch=5, size=size)
    assert reordered != steps
    for epoch in (slice(0, 5), slice(5, 10)):
        before, after = steps[epoch], reordered[epoch]
        largest = max(before, key=size)
        assert after[0] is largest and [s for s in after if s is not largest] == [s for s in before if s is not largest]
    assert largest_step_early(steps[:7], 5, size)[5] == max(steps[5:7], key=size)  # a cut-short epoch too
