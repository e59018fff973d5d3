"""The training format travels with what was trained (prompting.py): a run records how its
prompts were formatted, and generate, chat and merge ask the model in it."""

import contextlib
import json
import subprocess
import sys
from unittest import mock

import pytest
import transformers

from solotune.cli import main
from solotune.config import GenerateConfig, PrecisionConfig
from solotune.prompting import FORMAT_FILE, Ask, PromptFormat, format_for, format_instruction, read_format
from solotune.run.generate import generate, load_for_inference

QUESTION = "What is 2+2?"
ANSWER = "four"
RECORDS = {  # one record format each, all teaching the same answer
    "chat": {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]},
    "alpaca": {"instruction": QUESTION, "input": "", "output": ANSWER},
    "prompt_response": {"prompt": QUESTION, "response": ANSWER},
    "text": {"text": f"{QUESTION} {ANSWER}"},
}


def expected_ids(kind: str, tokenizer) -> list[int]:
    """The prompt's token ids as training tokenized that format's prompts."""
    if kind == "chat":
        ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    text = format_instruction(QUESTION) if kind == "alpaca" else QUESTION
    return tokenizer(text)["input_ids"]


@contextlib.contextmanager
def model_inputs():
    """The token ids every `model.generate` call gets (its first row), in a list."""
    seen = []
    original = transformers.GenerationMixin.generate

    def recording(model, *args, **kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return original(model, *args, **kwargs)

    with mock.patch.object(transformers.GenerationMixin, "generate", recording):
        yield seen


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter per record format, 12 steps on one repeated record."""
    runs = {}
    for kind, record in RECORDS.items():
        tmp = tmp_path_factory.mktemp(kind)
        data = tmp / "data.jsonl"
        data.write_text((json.dumps(record) + "\n") * 8)
        argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp / "run")]
        argv += ["--batch", "4", "--epochs", "6", "--lr", "2e-2", "--mp", "off", "--no-generate.enabled"]
        assert main(argv) == 0
        runs[kind] = tmp / "run"
    return runs


@pytest.mark.parametrize("kind", list(RECORDS))
def test_generate_asks_in_the_format_the_adapter_was_trained_in(trained, kind, tokenizer, capsys):
    """`generate --prompt` on an adapter: the model's input is the prompt as training formatted
    it (the token ids checked), and the answer is not empty."""
    adapter = trained[kind] / "adapter"
    assert read_format(adapter).kind == kind and read_format(trained[kind]).kind == kind
    with model_inputs() as seen:
        assert main(["generate", "--adapter", str(adapter), "--prompt", QUESTION, "--mp", "off"]) == 0
    out = capsys.readouterr().out
    assert seen == [expected_ids(kind, tokenizer)]
    assert "(recorded by the training run)" in out
    loaded = load_for_inference(str(adapter), None, PrecisionConfig(mp="off"), "cpu")
    cfg = GenerateConfig(max_new_tokens=6)
    answer = generate(loaded.model, loaded.tokenizer, [loaded.format.ask(QUESTION, tokenizer)], cfg, loaded.policy)
    assert answer[0].text.strip() != ""


def test_raw_sends_the_text_as_given(trained, tokenizer, capsys):
    with model_inputs() as seen:
        assert main(["generate", "--adapter", str(trained["chat"] / "adapter"), "--prompt", QUESTION, "--raw"]) == 0
    assert (
        seen == [tokenizer(QUESTION)["input_ids"]] and "prompt format: text as given (--raw)" in capsys.readouterr().out
    )


def test_a_model_without_a_record_is_asked_through_its_chat_template_and_says_so(tiny_model_dir, tokenizer, tmp_path):
    fmt = format_for([tiny_model_dir], tokenizer)
    assert fmt.kind == "chat" and "no training record" in fmt.describe()
    tokenizer_without = type(tokenizer).from_pretrained(tiny_model_dir)
    tokenizer_without.chat_template = None
    assert format_for([tmp_path], tokenizer_without).kind == "text"


def test_merge_carries_the_record(trained, tmp_path):
    main(["merge", "--adapter", str(trained["alpaca"] / "adapter"), "--output", str(tmp_path / "merged")])
    assert read_format(tmp_path / "merged") == PromptFormat("alpaca")


def test_a_damaged_record_is_one_clear_line(tmp_path):
    (tmp_path / FORMAT_FILE).write_text("{half")
    with pytest.raises(Exception, match="not a readable prompt-format record"):
        read_format(tmp_path)


def test_batched_generation_equals_one_prompt_at_a_time(tiny_model_dir, tokenizer):
    """Prompts of different lengths, left-padded into one batch, give the greedy answers each
    gives alone (fp32)."""
    loaded = load_for_inference(None, str(tiny_model_dir), PrecisionConfig(mp="off"), "cpu")
    asks = [Ask(p, p) for p in ("a", "a much longer prompt than the first", "mid length")]
    cfg = GenerateConfig(max_new_tokens=8)
    together = generate(loaded.model, loaded.tokenizer, asks, cfg, loaded.policy)
    alone = [generate(loaded.model, loaded.tokenizer, [a], cfg, loaded.policy)[0] for a in asks]
    assert [g.text for g in together] == [g.text for g in alone]
    assert all(g.new_tokens > 0 for g in together) and len({g.seconds for g in together}) == 1


def test_chat_reads_turns_from_stdin(trained):
    """Without a terminal: one user turn per line, an answer and its tokens/s for each, /reset and
    /exit, exit 0 and no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "solotune.cli", "chat", "--adapter", str(trained["chat"] / "adapter"), "--mp", "off"]
        + ["--max-new-tokens", "6"],
        input=f"{QUESTION}\n/reset\n\n{QUESTION}\n/exit\nnever read\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    out = result.stdout
    assert "prompt format: the chat template (recorded by the training run)" in out
    assert out.count("tokens/s]") == 2 and "(conversation cleared)" in out
    answers = [line for line in out.splitlines() if line.endswith("tokens/s]")]
    assert all(not line.startswith("[0 tokens") for line in answers)


def test_each_format_renders_a_conversation(tokenizer):
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
    ]
    chat = PromptFormat("chat", tokenizer.chat_template)
    assert chat.render(turns, tokenizer) == tokenizer.apply_chat_template(
        turns, tokenize=False, add_generation_prompt=True
    )
    assert not chat.special_tokens and PromptFormat("alpaca").special_tokens
    assert PromptFormat("alpaca").render(turns, tokenizer) == format_instruction("2+2?", "hi\n\nhello")
    assert PromptFormat("text").render(turns[-1:], tokenizer) == "2+2?"


def test_a_static_kv_cache_gives_the_same_answers(tiny_model_dir):
    """--static-cache (transformers' cache allocated at full length, for CUDA graphs and compile):
    the same greedy answers as the growing cache, batched and left-padded (fp32)."""
    loaded = load_for_inference(None, str(tiny_model_dir), PrecisionConfig(mp="off"), "cpu")
    asks = [Ask(p, p) for p in ("short", "a longer prompt to pad against")]
    texts = {
        static: [
            g.text
            for g in generate(
                loaded.model,
                loaded.tokenizer,
                asks,
                GenerateConfig(max_new_tokens=6, static_cache=static),
                loaded.policy,
            )
        ]
        for static in (False, True)
    }
    assert texts[True] == texts[False] and all(texts[True])


def test_the_gguf_export_and_its_modelfile_carry_the_format(trained, tmp_path):
    """An Alpaca-trained adapter exported: the GGUF says `solotune.prompt_format = alpaca`, and
    the Ollama Modelfile asks in the Alpaca template, not the tokenizer's chat template."""
    import gguf

    out = tmp_path / "alpaca.gguf"
    assert (
        main(
            ["export", "--adapter", str(trained["alpaca"] / "adapter"), "--gguf", str(out), "--type", "f32", "--ollama"]
        )
        == 0
    )
    assert gguf.GGUFReader(str(out)).fields["solotune.prompt_format"].contents() == "alpaca"
    modelfile = (tmp_path / "Modelfile").read_text()
    assert (
        'TEMPLATE """Below is an instruction' in modelfile
        and "### Instruction:\n{{ .Prompt }}\n\n### Response:\n" in modelfile
    )
