"""How a model was asked in training, recorded with what was trained, so that it is asked the
same way afterwards.

A run trains on prompts in one of four formats: the Alpaca template, the tokenizer's chat
template, prompt and response as given, or plain text. A model asked in another format than the
one it learned answers badly or not at all (a chat-trained adapter asked with raw text answered
''). The run writes its format (`PromptFormat.save`) beside the adapter or model it saves; `merge`
and `export` carry it on, and `generate`, `chat`, the generations before and after a run and
`export --ollama` ask in it. A model without a record (a plain hub model) is asked through its
chat template where it has one, else with the text as given, and the output says which.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from solotune.errors import SolotuneError

FORMAT_FILE = "solotune-prompt-format.json"  # in an adapter or model folder
KINDS = ("alpaca", "chat", "prompt_response", "text")

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_instruction(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt for an instruction (and optional input), up to the response."""
    if input_text:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_NO_INPUT.format(instruction=instruction)


class Ask(NamedTuple):
    """A prompt to generate from: as the user wrote it, as the model gets it, and whether the
    tokenizer adds its special tokens to it."""

    shown: str
    text: str
    special_tokens: bool = True


@dataclass(frozen=True)
class PromptFormat:
    """How prompts are put to a model: `kind` (one of KINDS) and, for "chat", the template text
    the run's tokenizer had (so that a later tokenizer with another template changes nothing)."""

    kind: str
    chat_template: str | None = None
    origin: str = "recorded by the training run"  # for the line that says which format is used

    def render(self, conversation: list[dict], tokenizer) -> str:
        """The model input for a conversation ({"role", "content"} turns, the last the user's),
        up to where the model's answer starts."""
        if self.kind == "chat":
            return tokenizer.apply_chat_template(
                conversation, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
            )
        if self.kind == "alpaca":
            # Earlier turns as context: the template has one instruction and one response.
            history = "".join(f"{m['content']}\n\n" for m in conversation[:-1])
            return format_instruction(conversation[-1]["content"], history.strip())
        return "".join(m["content"] for m in conversation)

    @property
    def special_tokens(self) -> bool:
        """Whether the tokenizer adds its special tokens (BOS) to a rendered prompt: not to a chat
        template's, which writes its own, as training tokenized it."""
        return self.kind != "chat"

    def ask(self, question: str, tokenizer) -> Ask:
        """One user question, as the model's input."""
        return self.ask_turns([{"role": "user", "content": question}], tokenizer)

    def ask_turns(self, conversation: list[dict], tokenizer) -> Ask:
        """A conversation whose last turn is the user's, as the model's input."""
        return Ask(conversation[-1]["content"], self.render(conversation, tokenizer), self.special_tokens)

    def describe(self) -> str:
        names = {
            "alpaca": "the Alpaca template",
            "chat": "the chat template",
            "prompt_response": "prompts as given (prompt/response training)",
            "text": "text as given",
        }
        return f"prompt format: {names[self.kind]} ({self.origin})"

    def save(self, folder: str | Path) -> None:
        data = {"kind": self.kind, "chat_template": self.chat_template}
        (Path(folder) / FORMAT_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


RAW = PromptFormat("text", origin="--raw")


def format_of_data(data_format: str, tokenizer, chat_pairs: bool = False, alpaca_pairs: bool = False) -> PromptFormat:
    """The format a run's data puts prompts in (data.py's record formats)."""
    if data_format == "messages" or chat_pairs:
        return PromptFormat("chat", tokenizer.chat_template)
    if data_format == "alpaca" or alpaca_pairs:
        return PromptFormat("alpaca")
    if data_format in ("prompt_response", "preference"):
        return PromptFormat("prompt_response")
    return PromptFormat("text")


def read_format(folder: str | Path | None) -> PromptFormat | None:
    """The format recorded in an adapter or model folder, or None where there is none."""
    path = Path(folder) / FORMAT_FILE if folder else None
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        kind = data["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        raise SolotuneError(
            f"{path}: not a readable prompt-format record; delete it to ask with the chat template"
        ) from None
    if kind not in KINDS:
        raise SolotuneError(f"{path}: unknown prompt format {kind!r} (known: {', '.join(KINDS)})")
    return PromptFormat(kind, data.get("chat_template"))


def format_for(folders: list, tokenizer) -> PromptFormat:
    """The format to ask a model in: the first record among `folders` (an adapter, then its
    base), else its tokenizer's chat template, else the text as given."""
    for folder in folders:
        found = read_format(folder)
        if found:
            return found
    if getattr(tokenizer, "chat_template", None):
        return PromptFormat("chat", tokenizer.chat_template, origin="no training record: the tokenizer's own")
    return PromptFormat("text", origin="no training record and no chat template")


def copy_format(source: str | Path, destination: str | Path) -> None:
    """Carry a folder's record over to a folder made from it (merge)."""
    found = read_format(source)
    if found:
        found.save(destination)
