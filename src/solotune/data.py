"""Records -> prompt template -> tokens with a loss mask -> batches.

Five record formats, detected from the keys of the records:
  alpaca           {"instruction", "input" (optional), "output"}
  prompt_response  {"prompt", "response"}
  messages         {"messages": [{"role", "content"}, ...]}  (the tokenizer's chat template)
  text             {"text"}                                   (continued pre-training)
  preference       {"prompt" (optional), "chosen", "rejected"}  (DPO, ORPO, SimPO; see `Pair`)
Everything is read, checked and tokenized before the model is loaded, so a bad record costs
seconds, not a model load.

What the loop schedules is a *unit*: an `Example` (one sequence) or a `Pair` (a chosen and a
rejected sequence, which always share a micro-batch). Both give their `sequences`.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from solotune.builtin_data import builtin_preference_records, builtin_records
from solotune.config import DataConfig
from solotune.errors import SolotuneError
from solotune.prompting import format_instruction

IGNORE_INDEX = -100  # label of a position that carries no loss (prompt, padding)

REQUIRED_KEYS = {
    "alpaca": ("instruction", "output"),
    "prompt_response": ("prompt", "response"),
    "messages": ("messages",),
    "text": ("text",),
    "preference": ("chosen", "rejected"),  # "prompt" too, unless the answers carry it (see pair_parts)
}
ASSISTANT_MARKER = "Assistant:"  # where a pair without a prompt field (Anthropic HH) has its last turn


@dataclass
class Record:
    """One raw record and where it came from (for error messages)."""

    fields: dict
    where: str
    problem: str | None = None  # set when the record could not even be read (broken JSON line, bad UTF-8)


@dataclass
class Example:
    """One tokenized record."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where there is no loss
    record_index: int

    @property
    def sequences(self) -> list[Example]:
        return [self]


@dataclass
class Pair:
    """One preference record: the prompt with its chosen answer and with its rejected one, each a
    sequence whose loss positions are the answer's tokens. Laid out chosen, then rejected."""

    chosen: Example
    rejected: Example

    @property
    def record_index(self) -> int:
        return self.chosen.record_index

    @property
    def sequences(self) -> list[Example]:
        return [self.chosen, self.rejected]


def sequences_of(units: list) -> list[Example]:
    """Every sequence of `units` (Examples and Pairs), in layout order."""
    return [s for u in units for s in u.sequences]


@dataclass
class DataStats:
    records: int
    truncated: int  # longer than max_len, cut (data.too_long = truncate)
    dropped: int  # no response token left after truncation, or too long (data.too_long = drop)
    tokens: int
    loss_tokens: int
    skipped: int = 0  # malformed records left out (data.on_bad_record = skip)
    skip_reasons: list[str] = field(default_factory=list)  # the first few


@dataclass
class Batch:
    """A micro-batch, with its token counts (plain ints, counted once when it is built).

    Padded (`collate`): one right-padded row per record. Padding-free (`collate_packed`): one
    row holding the records back to back, with positions restarting at each record and the
    records' lengths in `segment_lengths`, which the attention uses to keep records apart.
    """

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)
    record_indices: list[int]
    n_tokens: int  # non-padding tokens
    n_loss_tokens: int  # positions whose next token carries loss
    # Flat indices (into B*T) of the positions whose next token carries loss, counted on the
    # host so that the loss needs no data-dependent shapes (nor a device sync) to find them.
    loss_positions: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None  # padding-free only
    segment_lengths: tuple[int, ...] | None = None  # padding-free only
    # (N+1,) int32 offsets of the segments in the row, made on the host with the row and moved
    # with it: attention built from the lengths on the device would copy them there in every
    # step, and a copy from pageable host memory waits for the device (a sync).
    segment_offsets: torch.Tensor | None = None  # padding-free only
    # (B, T) int32: each position's record and place in it, which key its dropout masks
    # (model/dropout.py): the same in any layout of the same records.
    token_keys: torch.Tensor | None = None
    # (N,) for each loss position (in `loss_positions` order), the index of its sequence in the
    # batch: what sums token log-probs into sequence log-probs (preference objectives).
    loss_sequences: torch.Tensor | None = None
    n_pairs: int = 0  # preference pairs: sequences 2i and 2i + 1 are pair i's chosen and rejected
    # (2 * n_pairs,) the reference model's sequence log-probs where they were computed before
    # training (--pref.precompute-ref; training/objective.py)
    reference_logps: torch.Tensor | None = None

    @property
    def n_sequences(self) -> int:
        return len(self.record_indices)

    @property
    def n_positions(self) -> int:
        """All positions, padding included."""
        return self.input_ids.numel()

    @property
    def has_padding(self) -> bool:
        return self.n_tokens < self.n_positions

    def model_inputs(self) -> dict:
        """Keyword arguments of the model's forward for this batch (training, no KV cache).

        No attention mask where there is no padding (padding-free rows, batches of equal
        lengths): transformers would read an all-ones mask back from the device to find that it
        can skip it, a device sync in every forward.
        """
        mask = self.attention_mask if self.has_padding else None
        inputs = {"input_ids": self.input_ids, "attention_mask": mask, "use_cache": False}
        if self.segment_lengths is not None:
            inputs.update(
                position_ids=self.position_ids,
                segment_lengths=self.segment_lengths,
                segment_offsets=self.segment_offsets,
            )
        return inputs

    def for_step(self, step_key: int) -> Batch:
        """The batch with a step's key (model/dropout.step_key) mixed into its token keys: the
        same token draws new dropout masks in each step, the same ones in any layout."""
        return replace(self, token_keys=self.token_keys ^ step_key)

    def to(self, device: torch.device) -> Batch:
        """The batch on `device`, without waiting for it: on CUDA each tensor goes through pinned
        host memory as an asynchronous copy, queued behind the work already on the GPU; a copy
        from pageable memory would be a device sync for every tensor of every micro-batch."""
        names = (
            "input_ids",
            "attention_mask",
            "labels",
            "loss_positions",
            "position_ids",
            "segment_offsets",
            "token_keys",
            "loss_sequences",
            "reference_logps",
        )
        return replace(self, **{n: _to_device(getattr(self, n), device) for n in names if getattr(self, n) is not None})


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.device.type == "cpu" and torch.device(device).type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# Reading


def read_records(cfg: DataConfig, pairs: bool = False) -> list[Record]:
    """The first `cfg.samples` records of the configured source; the built-in one as preference
    pairs where `pairs` (a preference objective) or `cfg.format` asks for them."""
    if cfg.path is None:
        rows = [Record(r, f"built-in record {i}") for i, r in enumerate(_builtin(pairs or cfg.format == "preference"))]
    else:
        rows = read_source(cfg.path, cfg.split)
    if cfg.samples is not None:
        rows = rows[: cfg.samples]
    if not rows:
        raise SolotuneError(f"{cfg.path}: no records found")
    return rows


def _builtin(pairs: bool) -> list[dict]:
    if not pairs:
        return builtin_records()
    return [
        {"prompt": format_instruction(r["instruction"], r["input"]), "chosen": r["chosen"], "rejected": r["rejected"]}
        for r in builtin_preference_records()
    ]


def read_source(path: str, split: str) -> list[Record]:
    """Records from a .json / .jsonl / .parquet file, or from a hub data set."""
    p = Path(path).expanduser()
    if p.suffix in (".json", ".jsonl", ".parquet"):
        if not p.is_file():
            raise SolotuneError(f"data file {p} not found")
        reader = {".json": _read_json, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[p.suffix]
        return reader(p)
    if p.exists() or path.startswith((".", "/", "~")):
        raise SolotuneError(f"{path}: expected a .json, .jsonl or .parquet file, or a hub data set name")
    return _read_hub(path, split)


def _read_json(p: Path) -> list[Record]:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise SolotuneError(f"{p}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise SolotuneError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise SolotuneError(f"{p}: expected a JSON list of records")
    return [Record(r, f"{p} record {i}") for i, r in enumerate(data)]


def _read_jsonl(p: Path) -> list[Record]:
    rows = []
    with p.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            # A broken line becomes a record with a problem: `tokenize_records` reports it or
            # skips it (data.on_bad_record), like any other malformed record.
            try:
                rows.append(Record(json.loads(raw.decode("utf-8")), f"{p}:{n}"))
            except UnicodeDecodeError:
                rows.append(Record({}, f"{p}:{n}", "not valid UTF-8"))
            except json.JSONDecodeError as e:
                rows.append(Record({}, f"{p}:{n}", f"not valid JSON ({e.msg})"))
    return rows


def _read_parquet(p: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise SolotuneError(f"{p}: not a readable Parquet file ({e})") from None
    return [Record(r, f"{p} row {i}") for i, r in enumerate(table.to_pylist())]


def _read_hub(name: str, split: str) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, missing data set, bad split: all end here
        raise SolotuneError(
            f"could not load data set {name!r} (split {split!r}) from the Hugging Face hub: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}. "
            "Offline? Pass a local .json, .jsonl or .parquet file with --data PATH."
        ) from None
    return [Record(r, f"{name}[{split}] row {i}") for i, r in enumerate(ds)]


# ---------------------------------------------------------------------------------------------
# Formats and templates


def detect_format(records: list[Record], requested: str) -> str:
    """The record format: the requested one, or the first whose keys the first record has."""
    if requested != "auto":
        return requested
    first = next((r for r in records if r.problem is None), records[0])
    if isinstance(first.fields, dict):
        for fmt, keys in REQUIRED_KEYS.items():
            if all(k in first.fields for k in keys):
                return fmt
    raise SolotuneError(
        f"{first.where}: cannot tell the record format; expected keys "
        + "; or ".join(", ".join(k) for k in REQUIRED_KEYS.values())
    )


def check_record(record: Record, fmt: str) -> None:
    """Raise SolotuneError naming the record if it does not fit `fmt`."""
    r, where = record.fields, record.where
    if record.problem:
        raise SolotuneError(f"{where}: {record.problem}")
    if not isinstance(r, dict):
        raise SolotuneError(f"{where}: expected an object with keys {', '.join(REQUIRED_KEYS[fmt])}, got {r!r:.60}")
    for key in REQUIRED_KEYS[fmt]:
        if key not in r:
            raise SolotuneError(f"{where}: missing field {key!r} (format {fmt})")
    if fmt == "messages":
        _check_messages(r["messages"], where)
        return
    if fmt == "preference":
        pair_parts(record)
        return
    text_keys = REQUIRED_KEYS[fmt] + (("input",) if fmt == "alpaca" and r.get("input") is not None else ())
    for key in text_keys:
        if not isinstance(r[key], str):
            raise SolotuneError(f"{where}: field {key!r} must be a string, got {type(r[key]).__name__}")
        _check_unicode(r[key], where, key)
    if not r[REQUIRED_KEYS[fmt][-1]].strip():
        raise SolotuneError(f"{where}: field {REQUIRED_KEYS[fmt][-1]!r} is empty")


def pair_parts(record: Record) -> tuple[str | list[dict], str, str]:
    """(prompt, chosen, rejected) of a preference record: the prompt as text or as chat messages,
    each answer as text. Takes the layouts data sets use: {prompt, chosen, rejected} as text or
    messages (UltraFeedback-binarized: each answer the whole conversation), or no prompt field
    with the prompt inside both answers (Anthropic HH: text up to the last "Assistant:")."""
    r, where = record.fields, record.where
    prompt = r.get("prompt")
    conversations = {k: _answer_conversation(r[k], where, k) for k in ("chosen", "rejected")}
    if any(c is not None for c in conversations.values()):
        prompt = _chat_prompt(prompt, conversations, where)
        chosen, rejected = (conversations[k][-1]["content"] for k in ("chosen", "rejected"))
    else:
        chosen, rejected = r["chosen"], r["rejected"]
        if prompt is None:
            prompt, chosen, rejected = _split_shared_prompt(chosen, rejected, where)
        elif isinstance(prompt, list):
            _check_messages(prompt + [{"role": "assistant", "content": chosen}], where)
        elif not isinstance(prompt, str):
            raise SolotuneError(f"{where}: field 'prompt' must be a string or a list of messages")
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        _check_unicode(answer, where, key)
        if not answer.strip():
            raise SolotuneError(f"{where}: the {key} answer is empty")
    if isinstance(prompt, str):
        _check_unicode(prompt, where, "prompt")
    if chosen == rejected:
        raise SolotuneError(f"{where}: chosen and rejected are the same answer")
    return prompt, chosen, rejected


def _answer_conversation(answer, where: str, key: str) -> list[dict] | None:
    """An answer given as chat messages (ending in the assistant's turn), or None for text."""
    if isinstance(answer, str):
        return None
    if not isinstance(answer, list) or not answer:
        raise SolotuneError(f"{where}: field {key!r} must be a string or a non-empty list of messages")
    _check_messages(answer, where)
    if answer[-1]["role"] != "assistant":
        raise SolotuneError(f"{where}: {key} must end with the assistant's answer")
    return answer


def _chat_prompt(prompt, conversations: dict, where: str) -> list[dict]:
    """The prompt messages of a chat pair: the `prompt` field (a string is one user turn), or the
    turns before the answers, which chosen and rejected must share (and which, where both are
    given, must be the prompt)."""
    if any(c is None for c in conversations.values()):
        raise SolotuneError(f"{where}: chosen and rejected must both be text or both be messages")
    turns, other = (c[:-1] for c in conversations.values())
    if turns != other:
        raise SolotuneError(f"{where}: chosen and rejected answer different conversations")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if prompt is None:
        prompt = turns
    elif turns and turns != prompt:
        raise SolotuneError(f"{where}: the answers' conversations do not start with the prompt")
    if not isinstance(prompt, list) or not prompt:
        raise SolotuneError(f"{where}: no prompt: give a 'prompt' field or the turns before each answer")
    for i, m in enumerate(prompt):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise SolotuneError(f"{where}: prompt[{i}] must have string 'role' and 'content'")
    return prompt


def _split_shared_prompt(chosen, rejected, where: str) -> tuple[str, str, str]:
    """A text pair without a prompt field: the prompt is the shared text up to and including the
    last "Assistant:" before the answers part."""
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(answer, str):
            raise SolotuneError(f"{where}: field {key!r} must be a string or a list of messages")
    shared = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(ASSISTANT_MARKER, 0, shared)
    if cut < 0:
        raise SolotuneError(
            f"{where}: missing field 'prompt' (format preference), and the answers share no "
            f"{ASSISTANT_MARKER!r} turn to take it from"
        )
    cut += len(ASSISTANT_MARKER)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise SolotuneError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise SolotuneError(f"{where}: messages[{i}] must have string 'role' and 'content'")
        _check_unicode(m["content"], where, f"messages[{i}].content")
    if not any(m["role"] == "assistant" for m in messages):
        raise SolotuneError(f"{where}: no 'assistant' message to learn from")


def _check_unicode(text: str, where: str, key: str) -> None:
    """JSON can spell lone UTF-16 surrogates (\\ud800), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SolotuneError(
            f"{where}: field {key!r} holds invalid Unicode ({e.reason} at character {e.start})"
        ) from None


# ---------------------------------------------------------------------------------------------
# Tokenization


def tokenize_records(
    records: list[Record], tokenizer, cfg: DataConfig, pairs: bool = False
) -> tuple[list, DataStats, str]:
    """Check and tokenize every record; returns the units (Examples, or Pairs where `pairs`: a
    preference objective), counts and the detected format. Preference records trained with SFT
    give their chosen answer's sequence."""
    fmt = detect_format(records, cfg.format)
    if pairs and fmt != "preference":
        raise SolotuneError(
            f"{records[0].where}: a preference objective needs records with 'chosen' and 'rejected' answers "
            f"(and a 'prompt'), not {fmt} records"
        )
    if fmt == "preference":
        return _tokenize_pairs(records, tokenizer, cfg, pairs)
    examples, truncated, dropped, skipped = [], 0, 0, []
    for i, record in enumerate(records):
        try:
            check_record(record, fmt)
        except SolotuneError as e:
            _bad_record(e, cfg, skipped)
            continue
        ids, labels = _tokenize(record, fmt, tokenizer, cfg.train_on_prompt)
        if len(ids) > cfg.max_len and cfg.too_long == "drop":
            dropped += 1
            continue
        if len(ids) > cfg.max_len:
            truncated += 1
            ids, labels = ids[: cfg.max_len], labels[: cfg.max_len]
        if all(x == IGNORE_INDEX for x in labels[1:]):
            dropped += 1
            continue
        examples.append(Example(ids, labels, i))
    return examples, _data_stats(records, examples, truncated, dropped, skipped, cfg), fmt


def _bad_record(error: SolotuneError, cfg: DataConfig, skipped: list[str]) -> None:
    """Stop on a malformed record, or note it as skipped (data.on_bad_record)."""
    if cfg.on_bad_record == "error":
        raise SolotuneError(f"{error} (or skip such records with --data.on-bad-record skip)") from None
    skipped.append(str(error))


def _data_stats(records, units: list, truncated: int, dropped: int, skipped: list[str], cfg: DataConfig) -> DataStats:
    if not units:
        why = f"; {len(skipped)} malformed, e.g. {skipped[0]}" if skipped else ""
        raise SolotuneError(f"no usable record: none has a response token within max_len = {cfg.max_len}{why}")
    sequences = sequences_of(units)
    return DataStats(
        records=len(records),
        truncated=truncated,
        dropped=dropped,
        tokens=sum(len(e.input_ids) for e in sequences),
        loss_tokens=count_loss_tokens(sequences),
        skipped=len(skipped),
        skip_reasons=skipped[:3],
    )


def _tokenize_pairs(records: list[Record], tokenizer, cfg: DataConfig, pairs: bool) -> tuple[list, DataStats, str]:
    """Preference records as Pairs (or, for SFT, their chosen sequences). A pair longer than
    max_len has its answers cut (data.too_long = truncate) or is dropped; one whose prompt
    leaves no answer token within max_len is a bad record."""
    units, truncated, dropped, skipped = [], 0, 0, []
    for i, record in enumerate(records):
        try:
            check_record(record, "preference")
            prompt_ids, answers = _tokenize_pair(record, tokenizer)
            if len(prompt_ids) >= cfg.max_len:
                raise SolotuneError(
                    f"{record.where}: the prompt's {len(prompt_ids)} tokens leave no answer token within "
                    f"max_len = {cfg.max_len}"
                )
        except SolotuneError as e:
            _bad_record(e, cfg, skipped)
            continue
        too_long = any(len(prompt_ids) + len(a) > cfg.max_len for a in answers)
        if too_long and cfg.too_long == "drop":
            dropped += 1
            continue
        truncated += too_long
        chosen, rejected = (_answer_example(prompt_ids, a, i, cfg) for a in answers)
        units.append(Pair(chosen, rejected) if pairs else chosen)
    return units, _data_stats(records, units, truncated, dropped, skipped, cfg), "preference"


def _answer_example(prompt_ids: list[int], answer_ids: list[int], index: int, cfg: DataConfig) -> Example:
    """The prompt and an answer as one sequence cut to max_len, the loss on the answer's tokens
    (on the prompt's too with data.train_on_prompt, for SFT on the chosen answers)."""
    ids = (prompt_ids + answer_ids)[: cfg.max_len]
    prompt_labels = prompt_ids if cfg.train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    return Example(ids, (prompt_labels + answer_ids)[: cfg.max_len], index)


def _tokenize_pair(record: Record, tokenizer) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, [chosen ids, rejected ids]): the prompt tokenized once, each answer after it
    as the model would continue it (the chat template's assistant turn, or the text and EOS)."""
    prompt, chosen, rejected = pair_parts(record)
    if isinstance(prompt, str):
        prompt_ids = tokenizer(prompt)["input_ids"]
        answers = [
            tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in (chosen, rejected)
        ]
        return prompt_ids, answers
    if not getattr(tokenizer, "chat_template", None):
        raise SolotuneError(f"{record.where}: chat-message pairs need a tokenizer with a chat template")
    prompt_ids = _render(tokenizer, prompt, gen_prompt=True)
    answers = []
    for answer in (chosen, rejected):
        ids = _render(tokenizer, prompt + [{"role": "assistant", "content": answer}])
        if ids[: len(prompt_ids)] != prompt_ids:
            raise SolotuneError(f"{record.where}: the chat template renders the prompt differently before an answer")
        answers.append(ids[len(prompt_ids) :])
    return prompt_ids, answers


def _render(tokenizer, messages: list[dict], gen_prompt: bool = False) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen_prompt)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def _tokenize(record: Record, fmt: str, tokenizer, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    r = record.fields
    if fmt == "messages":
        return _tokenize_messages(r["messages"], tokenizer, record.where, train_on_prompt)
    if fmt == "text":
        ids = tokenizer(r["text"])["input_ids"] + [tokenizer.eos_token_id]
        return ids, list(ids)
    if fmt == "alpaca":
        prompt, response = format_instruction(r["instruction"], r.get("input") or ""), r["output"]
    else:
        prompt, response = r["prompt"], r["response"]
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt_ids + response_ids
    prompt_labels = prompt_ids if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    return ids, prompt_labels + response_ids


def _tokenize_messages(messages: list[dict], tokenizer, where: str, train_on_prompt: bool):
    """Render with the chat template; loss on the assistant turns (each turn's own tokens)."""
    if not getattr(tokenizer, "chat_template", None):
        raise SolotuneError(f"{where}: 'messages' records need a tokenizer with a chat template")

    def render(msgs, gen_prompt=False):
        return _render(tokenizer, msgs, gen_prompt)

    ids = render(messages)
    labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = len(render(messages[:i], gen_prompt=True)), len(render(messages[: i + 1]))
        labels[start:end] = ids[start:end]
    return ids, labels


# ---------------------------------------------------------------------------------------------
# Batching


def plan_steps(n_examples: int, batch: int, epochs: int, seed: int, shuffle: bool) -> list[list[int]]:
    """The example indices of every optimizer step, epoch after epoch (last batch may be short)."""
    steps = []
    for epoch in range(epochs):
        order = list(range(n_examples))
        if shuffle:
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
        steps.extend(order[i : i + batch] for i in range(0, n_examples, batch))
    return steps


def count_steps(n_examples: int, batch: int, epochs: int, max_steps: int | None) -> int:
    """How many optimizer steps `plan_steps` gives, cut to `max_steps`: what a run will take."""
    planned = -(-n_examples // batch) * epochs
    return min(planned, max_steps) if max_steps else planned


def largest_step_early(steps: list[list[int]], steps_per_epoch: int, size) -> list[list[int]]:
    """The same steps with each epoch's largest (by `size(step)`, the first of equals) moved to
    the front of its epoch. The optimizer state exists before the first step
    (`optim.create_state`), so nothing that persists between steps grows after it, and no later
    step of the epoch can hold more. The other steps keep their order."""
    reordered = []
    for start in range(0, len(steps), steps_per_epoch):
        epoch = steps[start : start + steps_per_epoch]
        k = max(range(len(epoch)), key=lambda i: size(epoch[i]))
        if size(epoch[0]) == size(epoch[k]):  # as large already: nothing to move
            k = 0
        reordered += [epoch[k], *epoch[:k], *epoch[k + 1 :]]
    return reordered


def split_micro_batches(indices: list[int], grad_accum: int) -> list[list[int]]:
    """Split one step's examples into consecutive micro-batches of ceil(n / grad_accum) examples:
    `grad_accum` of them when that divides, fewer for a short last step (none is empty)."""
    size = -(-len(indices) // grad_accum)
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def make_batch(units: list, pad_id: int, padding_free: bool) -> Batch:
    """A micro-batch of units (Examples or Pairs) as one padding-free row, or padded to its
    longest sequence; a pair's two sequences side by side."""
    sequences = sequences_of(units)
    batch = collate_packed(sequences) if padding_free else collate(sequences, pad_id)
    n_pairs = sum(isinstance(u, Pair) for u in units)
    return replace(batch, n_pairs=n_pairs) if n_pairs else batch


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad a list of examples to the longest one."""
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    targets = loss_positions(examples, [row * T for row in range(B)])
    keys = torch.stack([token_keys(e.record_index, torch.arange(T)) for e in examples])
    return Batch(
        input_ids,
        attention_mask,
        labels,
        [e.record_index for e in examples],
        n_tokens=sum(len(e.input_ids) for e in examples),
        n_loss_tokens=len(targets),
        loss_positions=targets,
        token_keys=keys,
        loss_sequences=loss_sequences(examples),
    )


def collate_packed(examples: list[Example]) -> Batch:
    """One padding-free row: the records back to back, each attending only to itself.

    Each record's first label is cleared: in the row it would be "predicted" from the end of
    the previous record. In a padded batch that position is never a target either, so the
    per-record losses are the same as `collate`'s.
    """
    input_ids, labels, positions, starts, records = [], [], [], [], []
    for e in examples:
        starts.append(len(input_ids))
        records += [e.record_index] * len(e.input_ids)
        input_ids += e.input_ids
        labels += [IGNORE_INDEX] + e.labels[1:]
        positions += range(len(e.input_ids))
    row, targets = torch.tensor([input_ids]), loss_positions(examples, starts)
    position_ids = torch.tensor([positions])
    return Batch(
        row,
        torch.ones_like(row),
        torch.tensor([labels]),
        [e.record_index for e in examples],
        n_tokens=row.shape[1],
        n_loss_tokens=len(targets),
        loss_positions=targets,
        position_ids=position_ids,
        segment_lengths=tuple(len(e.input_ids) for e in examples),
        segment_offsets=torch.tensor(starts + [len(input_ids)], dtype=torch.int32),
        token_keys=token_keys(torch.tensor(records), position_ids[0]).unsqueeze(0),
        loss_sequences=loss_sequences(examples),
    )


RECORD_STRIDE = 0x9E3779B1  # odd: records far apart in the key space, before the dropout's hash


def token_keys(record_index, positions: torch.Tensor) -> torch.Tensor:
    """Each token's identity as an int32: its record and its position in it (wrapping)."""
    keys = (torch.as_tensor(record_index, dtype=torch.int64) * RECORD_STRIDE + positions) % (1 << 32)
    return (keys - (keys >= 1 << 31).long() * (1 << 32)).to(torch.int32)


def loss_positions(examples: list[Example], starts: list[int]) -> torch.Tensor:
    """Flat indices of the positions predicting a response token; `starts`: each record's offset."""
    return torch.tensor(
        [start + t for e, start in zip(examples, starts) for t, y in enumerate(e.labels[1:]) if y != IGNORE_INDEX],
        dtype=torch.long,
    )


def loss_sequences(examples: list[Example]) -> torch.Tensor:
    """For each loss position (in `loss_positions` order), the index of its example."""
    return torch.tensor(
        [row for row, e in enumerate(examples) for y in e.labels[1:] if y != IGNORE_INDEX], dtype=torch.long
    )


def count_loss_tokens(examples: list[Example]) -> int:
    return sum(sum(1 for x in e.labels[1:] if x != IGNORE_INDEX) for e in examples)
