"""An exported fine-tune run by a real llama.cpp (llama-cpp-python): `make test-gguf`.

A short LoRA fine-tune of the embedded default, exported as f16. llama.cpp must tokenize the
evaluation prompts as the Hugging Face tokenizer does, answer them greedily with the very tokens
transformers generates from the same file, and build the chat prompt the tokenizer's own chat
template builds.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from solotune.config import REFERENCE_PROMPTS, RunConfig
from solotune.model.adapters import merged_model
from solotune.run.export import export_gguf

pytestmark = pytest.mark.llamacpp
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test-gguf)")

NEW_TOKENS = 16
CHAT = [{"role": "user", "content": "What is 27 + 15?"}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(the GGUF file, transformers' model read from it, the tokenizer, llama.cpp's model)."""
    from solotune.run.train import run_training

    root = tmp_path_factory.mktemp("llamacpp")
    with pytest.MonkeyPatch.context() as env:
        env.delenv("SOLOTUNE_CACHE", raising=False)  # the user's one conversion of the default
        cfg = RunConfig(output_dir=str(root / "run"))
        cfg.data.samples, cfg.data.max_len, cfg.train.batch, cfg.train.max_steps = 16, 128, 4, 4
        cfg.train.lr, cfg.precision.mp, cfg.generate.enabled = 1e-3, "off", False
        run_training(cfg)
        path = root / "fine-tune.gguf"
        export_gguf(path, "f16", adapter=str(root / "run" / "adapter"))
        _, tokenizer, _ = merged_model(root / "run" / "adapter")
    hf = AutoModelForCausalLM.from_pretrained(root, gguf_file=path.name, dtype=torch.float32).eval()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, seed=0, verbose=False)
    return path, hf, tokenizer, llm


def hf_greedy(model, tokenizer, ids: list[int]) -> list[int]:
    """`NEW_TOKENS` greedy tokens, fewer if the end-of-sequence token comes first (it included)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    return out[0, len(ids) :].tolist()


def llama_greedy(llm, ids: list[int]) -> list[int]:
    """The same from llama.cpp (temperature 0 is its argmax)."""
    tokens = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        tokens.append(token)
        if len(tokens) == NEW_TOKENS or token == llm.token_eos():
            break
    return tokens


def test_llama_cpp_tokenizes_and_answers_as_transformers(exported):
    _, hf, tokenizer, llm = exported
    for prompt in REFERENCE_PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids, prompt
        expected, got = hf_greedy(hf, tokenizer, ids), llama_greedy(llm, ids)
        assert got == expected, (prompt, tokenizer.decode(got), tokenizer.decode(expected))


def test_llama_cpp_builds_the_chat_prompt_of_the_tokenizers_template(exported):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    _, hf, tokenizer, llm = exported
    template = llm.metadata["tokenizer.chat_template"]
    assert template == tokenizer.chat_template
    formatter = Jinja2ChatFormatter(template, eos_token=tokenizer.eos_token, bos_token=tokenizer.bos_token or "")
    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert formatter(messages=CHAT).prompt == prompt
    ids = tokenizer(prompt)["input_ids"]
    assert llama_greedy(llm, ids) == hf_greedy(hf, tokenizer, ids)


def test_llama_cpp_tokenizes_a_sentencepiece_vocabulary_as_transformers(tmp_path):
    """Llama 2's kind of tokenizer: llama.cpp joins pieces by the scores the export derives from
    the merge order, and falls back to byte pieces; its ids must equal the tokenizer's. (Not for
    text that starts with spaces: there the Hugging Face form of this tokenizer and SentencePiece,
    which llama.cpp follows, differ by one prefix piece.)"""
    from solotune.testing import make_architecture, make_sentencepiece_tokenizer

    tokenizer = make_sentencepiece_tokenizer()
    make_architecture("llama", tokenizer).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    export_gguf(tmp_path / "spm.gguf", "f16", model=str(tmp_path / "m"))
    llm = llama_cpp.Llama(model_path=str(tmp_path / "spm.gguf"), n_ctx=256, n_threads=2, verbose=False)
    for text in ["What is the cat?", "two  spaces,  at it", "héllo café 🤗", "1234 + 56 is 1290.\nthe end"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
