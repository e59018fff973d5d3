"""`solotune chat`: a conversation with a base model, an adapter or a merged model.

The history is kept as turns and put to the model in the format it was trained in (prompting.py)
at every answer; the answer streams as it is generated, then its tokens/s. `/reset` clears the
history, `/exit` (or Ctrl-D) ends; Ctrl-C stops an answer, and at the prompt ends the chat,
without a traceback. Without a terminal it reads one user turn per line from stdin and writes
each answer on its own line: how it is tested and scripted.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import torch
from transformers import TextStreamer

from solotune.config import GenerateConfig
from solotune.run.generate import decoding

EXIT, RESET = "/exit", "/reset"


def chat(loaded, cfg: GenerateConfig, interactive: bool) -> None:
    """Answer turn after turn until /exit, the end of input or Ctrl-C at the prompt."""
    print(loaded.format.describe())
    if interactive:
        print(f"{RESET} clears the conversation, {EXIT} or Ctrl-D ends it; Ctrl-C stops an answer.")
    history: list[dict] = []
    for text in _turns(interactive):
        if text == EXIT:
            break
        if text == RESET:
            history = []
            print("(conversation cleared)")
            continue
        history.append({"role": "user", "content": text})
        answer = _answer(loaded, history, cfg, interactive)
        if answer is None:  # stopped with Ctrl-C: the unanswered turn is dropped
            history.pop()
            continue
        history.append({"role": "assistant", "content": answer})


def _turns(interactive: bool) -> Iterator[str]:
    """The user's turns: typed at a prompt, or one per line of stdin (blank lines skipped)."""
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not interactive and not line:
            return
        if line.strip():
            yield line.strip()


def _answer(loaded, history: list[dict], cfg: GenerateConfig, interactive: bool) -> str | None:
    """The model's answer to the conversation so far, streamed; None if Ctrl-C stopped it."""
    model, tokenizer, policy = loaded.model, loaded.tokenizer, loaded.policy
    prompt = loaded.format.render(history, tokenizer)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=loaded.format.special_tokens)
    inputs = inputs.to(policy.device)
    print("model> " if interactive else "", end="", flush=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    try:
        with torch.inference_mode(), policy.autocast():
            out = model.generate(**inputs, **decoding(cfg, tokenizer), streamer=streamer)
    except KeyboardInterrupt:
        print("\n(answer stopped)")
        return None
    seconds = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1] :]
    print(f"[{len(new)} tokens, {len(new) / seconds:.1f} tokens/s]")
    return tokenizer.decode(new, skip_special_tokens=True).strip()
