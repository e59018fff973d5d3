"""`solotune export`: a fine-tuned model as one GGUF file, for llama.cpp, Ollama and LM Studio.

Written with the `gguf` package alone (llama.cpp's own Python writer, tensor-name maps and numpy
quantizers): no compiler, no llama.cpp checkout. A LoRA adapter is merged first (a QLoRA adapter
into its de-quantized base, `adapters.merged_model`); a full fine-tune or merged folder is read
as it is. The file holds the architecture's tensor names, the hyperparameters llama.cpp reads,
the tokenizer (vocabulary, merges, token types, special tokens) and the chat template.

Two things differ from the Hugging Face layout and are done here as llama.cpp's converter does:
- llama.cpp's "llama" architecture applies RoPE to interleaved pairs of each head's dimensions,
  Hugging Face's Llama to its two halves; q_proj's and k_proj's rows are reordered to match
  (`_interleave_rope_rows`). Qwen2 uses the halves in both.
- A byte-level BPE tokenizer is identified for llama.cpp by its pre-tokenizer name (how text is
  split before BPE). A model converted from GGUF keeps the original file's name
  (`models.GGUF_ORIGIN_FILE`); otherwise it is taken from the family, and "default" is said out
  loud. A SentencePiece-style one needs scores, which llama.cpp joins pieces by: they come from
  the merge order (`_merge_scores`).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from solotune.artifacts import atomic_path, write_atomic
from solotune.errors import SolotuneError
from solotune.prompting import PromptFormat, format_instruction, read_format

# --type: the GGML type of the 2-D weights (norms and other 1-D tensors stay F32, and a weight
# whose rows do not split into the type's blocks falls back to F16, as llama.cpp does).
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
SUPPORTED = {  # Hugging Face architecture -> llama.cpp architecture
    "LlamaForCausalLM": "llama",  # Llama 2 and 3, SmolLM2
    "MistralForCausalLM": "llama",  # llama.cpp runs Mistral as a Llama
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass
class Exported:
    """What `export_gguf` wrote."""

    path: str
    type: str
    mib: float
    seconds: float
    tensors: int
    fallback_f16: int  # 2-D weights whose rows do not split into the type's blocks
    modelfile: str | None


def export_gguf(
    out: str | Path,
    gguf_type: str = "f16",
    adapter: str | None = None,
    model: str | None = None,
    ollama: bool = False,
) -> Exported:
    """Merge if needed and write one GGUF file (via a temporary name, then renamed); with
    `ollama`, also a Modelfile beside it. `adapter`: a LoRA folder (its base from its config,
    or `model`); otherwise `model`: a full fine-tuned or merged folder."""
    start = time.perf_counter()
    out = Path(out)
    if gguf_type not in TYPES:
        raise SolotuneError(f"--type {gguf_type}: unknown; choose one of {', '.join(TYPES)}")
    if not adapter and not model:
        raise SolotuneError("export: pass --adapter FOLDER (a LoRA run) or --model FOLDER (a full fine-tune)")
    _check_writable(out)
    config = _config_of(adapter, model)
    arch = _architecture(config)
    net, tokenizer, origin, base = _load(adapter, model)
    fmt = read_format(adapter or model)
    if fmt and fmt.chat_template:  # the template the run trained with, whatever the tokenizer has now
        tokenizer.chat_template = fmt.chat_template
    about = About(origin.get("general.name") or Path(base).name, out.stem, fmt)
    with atomic_path(out) as part:  # nothing partial is left
        counts = _write(part, arch, net, tokenizer, gguf_type, origin, about)
    modelfile = write_modelfile(out, tokenizer, fmt) if ollama else None
    return Exported(str(out), gguf_type, out.stat().st_size / 2**20, time.perf_counter() - start, *counts, modelfile)


def _check_writable(out: Path) -> None:
    """Refuse an output that cannot be written before any model work."""
    if out.is_dir():
        raise SolotuneError(f"--gguf {out}: is a folder; give a file name, e.g. {out / 'model.gguf'}")
    try:
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise SolotuneError(f"--gguf {out}: cannot write there ({e.strerror})") from None


def _config_of(adapter: str | None, model: str | None):
    """The model's config, read before its weights (an unsupported model fails in a second)."""
    from transformers import AutoConfig

    from solotune.config import ModelConfig
    from solotune.model.adapters import adapter_base_model
    from solotune.model.models import resolve_model_source

    name = model or adapter_base_model(adapter)
    source = resolve_model_source(ModelConfig(name=name))  # a local folder that is gone fails here
    try:
        return AutoConfig.from_pretrained(source)
    except OSError as e:  # a hub id that is neither cached nor reachable
        raise SolotuneError(f"export: model {name} not found ({str(e).splitlines()[0]})") from None


def _architecture(config) -> str:
    """llama.cpp's name for the model's architecture, or one line saying what is supported."""
    name = (config.architectures or ["?"])[0]
    if name not in SUPPORTED:
        raise SolotuneError(f"export: {name} is not supported; supported: {', '.join(SUPPORTED)}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "linear"):
        raise SolotuneError(f"export: RoPE scaling {rope.get('rope_type')!r} is not supported yet (default, linear)")
    return SUPPORTED[name]


def _load(adapter: str | None, model: str | None):
    """The plain fp32 model, its tokenizer, its GGUF origin (if it was converted from one) and
    the folder of the model it was trained from."""
    from solotune.config import ModelConfig
    from solotune.model.adapters import merged_model
    from solotune.model.models import gguf_origin, load_model, load_tokenizer, resolve_model_source

    if adapter:
        net, tokenizer, merge = merged_model(adapter, model)
        print(merge.line)
        return net, tokenizer, gguf_origin(adapter) or gguf_origin(merge.base), merge.base
    mcfg = ModelConfig(name=model)
    source = resolve_model_source(mcfg)
    net = load_model(source, mcfg, torch.float32, torch.device("cpu")).eval()
    return net, load_tokenizer(source, mcfg), gguf_origin(source), source


@dataclass(frozen=True)
class About:
    """What the file says about itself besides the weights."""

    base_name: str  # the base model's
    finetune: str  # the fine-tune's: the file's stem
    prompt_format: PromptFormat | None  # the one the run trained in, as `solotune.prompt_format`


def _write(path: Path, arch: str, model, tokenizer, gguf_type: str, origin: dict, about: About) -> tuple[int, int]:
    """The GGUF file: metadata, tokenizer, tensors. Returns (tensors, F16 fallbacks)."""
    import gguf

    # Its INFO lines list every key it writes; its one warning (a tokenizer without merges, like
    # a byte-level vocabulary's) is not a problem here.
    logging.getLogger("gguf").setLevel(logging.ERROR)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(about.base_name)
    writer.add_finetune(about.finetune)
    if about.prompt_format:
        writer.add_string(GGUF_FORMAT_KEY, about.prompt_format.kind)
    _add_hyperparameters(writer, model.config, arch)
    _add_tokenizer(writer, tokenizer, model.config, arch, origin)
    qtype = gguf.GGMLQuantizationType[gguf_type.upper()]
    file_type = {"f32": "ALL_F32"}.get(gguf_type, f"MOSTLY_{gguf_type.upper()}")
    writer.add_file_type(gguf.LlamaFileType[file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tensors = fallbacks = 0
    for gguf_name, array in _tensors(model, arch):
        tensor_type = qtype if array.ndim == 2 else gguf.GGMLQuantizationType.F32
        block = gguf.GGML_QUANT_SIZES[tensor_type][0]
        if array.shape[-1] % block:
            tensor_type, fallbacks = gguf.GGMLQuantizationType.F16, fallbacks + 1
        writer.add_tensor(gguf_name, gguf.quants.quantize(array, tensor_type), raw_dtype=tensor_type)
        tensors += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors, fallbacks


def _add_hyperparameters(writer, config, arch: str) -> None:
    """What llama.cpp reads to build the graph, from the Hugging Face config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if rope.get("rope_type") == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def _tensors(model, arch: str):
    """(GGUF name, fp32 numpy array) for every weight, in llama.cpp's layout."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads the embedding for a tied head
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise SolotuneError(f"export: no GGUF name for the weight {name} of {type(model).__name__}")
        array = tensor.detach().float().numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            array = _interleave_rope_rows(array, heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            array = _interleave_rope_rows(array, kv_heads)
        yield gguf_name, array


def _interleave_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's rows from halves (x0..x(d/2-1), then the rest: Hugging Face's rotate
    half) to interleaved pairs (x0, x(d/2), x1, ...: llama.cpp's RoPE on its "llama" graph)."""
    shape = weight.shape
    halves = weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:])
    return halves.swapaxes(1, 2).reshape(shape)


def _add_tokenizer(writer, tokenizer, config, arch: str, origin: dict) -> None:
    """The vocabulary in id order with its token types, the merges, special tokens and chat
    template. Byte-level BPE is llama.cpp's "gpt2" model; a BPE with byte fallback over
    SentencePiece pieces (Llama 2, Mistral 7B) is its "llama" model, which also needs scores."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise SolotuneError(
            f"export: a {model.get('type')} tokenizer is not supported; supported: byte-level BPE "
            "(Llama 3, SmolLM2, Qwen2) and SentencePiece BPE with byte fallback (Llama 2, Mistral 7B)"
        )
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    # The embedding may have more rows than the tokenizer has tokens: those are unused.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(config.vocab_size)]
    types = [_token_type(i, by_id, tokenizer) for i in range(config.vocab_size)]
    if model.get("byte_fallback"):
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(_merge_scores(tokens, model["merges"]))
        writer.add_add_space_prefix(
            tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False)["input_ids"])[0].startswith(
                "\u2581"
            )
        )
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(origin, config, arch, len(by_id)))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)  # in the files the gguf package's reader knows
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=config.vocab_size)
    probe = tokenizer("a")["input_ids"]
    special.add_special_token = {
        "bos": bool(probe) and probe[0] == tokenizer.bos_token_id,  # what the tokenizer does, not a guess
        "eos": bool(probe) and probe[-1] == tokenizer.eos_token_id and len(probe) > 1,
    }
    special.add_to_gguf(writer, quiet=True)


def _token_type(i: int, by_id: dict, tokenizer) -> int:
    import gguf

    if i not in by_id:
        return gguf.TokenType.UNUSED
    if i == tokenizer.unk_token_id:
        return gguf.TokenType.UNKNOWN
    added = tokenizer.added_tokens_decoder.get(i)
    if added is not None:
        return gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    if re.fullmatch(r"<0x[0-9A-F]{2}>", by_id[i]):  # a byte-fallback piece
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL


def _merge_scores(tokens: list[str], merges: list) -> list[float]:
    """SentencePiece scores from the merge order: llama.cpp's "llama" tokenizer joins the pair
    whose joined piece scores highest, so the piece of merge r scores -r, and a piece no merge
    makes (a character, a byte, a special token) scores below every merge."""
    rank = {}
    for r, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    return [-float(rank.get(token, len(merges) + i)) for i, token in enumerate(tokens)]


# llama.cpp's pre-tokenizer names for byte-level BPE families it knows, by a model's family.
PRE_TOKENIZERS = {"qwen2": "qwen2", "llama3": "llama-bpe"}


def _pre_tokenizer(origin: dict, config, arch: str, n_tokens: int) -> str:
    """The pre-tokenizer name llama.cpp splits text by before BPE."""
    if origin.get("tokenizer.ggml.pre"):
        return origin["tokenizer.ggml.pre"]
    family = "qwen2" if arch == "qwen2" else "llama3" if n_tokens >= 128000 else None
    if family:
        return PRE_TOKENIZERS[family]
    print("export: llama.cpp's pre-tokenizer for this tokenizer is unknown; writing 'default' (GPT-2's splitting)")
    return "default"


# --ollama: Ollama's Go templates for the chat formats solotune recognises in a Jinja chat
# template, by a marker the format uses, with the tokens that end an answer.
OLLAMA_FORMATS = {
    "<|im_start|>": (  # ChatML: SmolLM2, Qwen2
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n",
        ["<|im_end|>"],
    ),
    "<|start_header_id|>": (  # Llama 3
        "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ["<|eot_id|>"],
    ),
    "[INST]": (  # Llama 2, Mistral
        '{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
        "{{ else }}{{ .Content }}</s>{{ end }}{{ end }}",
        ["[INST]", "</s>"],
    ),
}
MODELFILE = "Modelfile"
GGUF_FORMAT_KEY = "solotune.prompt_format"
# Ollama's templates for the formats that are not a chat template: the Alpaca prompt, or the
# user's text as given.
OLLAMA_PLAIN = {
    "alpaca": format_instruction("{{ .Prompt }}"),
    "prompt_response": "{{ .Prompt }}",
    "text": "{{ .Prompt }}",
}


def write_modelfile(gguf_path: Path, tokenizer, fmt: PromptFormat | None = None) -> str:
    """An Ollama Modelfile beside the GGUF file (`ollama create NAME -f Modelfile`), asking in the
    format the run trained in (`fmt`; without a record, the chat template's)."""
    template = tokenizer.chat_template or ""
    found = next((fmt for marker, fmt in OLLAMA_FORMATS.items() if marker in template), None)
    lines = [f"FROM ./{gguf_path.name}"]
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    if fmt and fmt.kind in OLLAMA_PLAIN:
        lines.append(f'TEMPLATE """{OLLAMA_PLAIN[fmt.kind]}"""')
    elif found:
        go_template, format_stops = found
        lines.append(f'TEMPLATE """{go_template}"""')
        stops = format_stops + [s for s in stops if s not in format_stops]
    else:
        lines.append("# No TEMPLATE: the chat format is not one solotune translates; Ollama reads the GGUF's own.")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    path = gguf_path.parent / MODELFILE
    write_atomic(path, "\n".join(lines) + "\n")
    return str(path)


def describe(result: Exported) -> str:
    """The summary line of an export."""
    fallback = f", {result.fallback_f16} kept as F16 (rows not a multiple of the block)" if result.fallback_f16 else ""
    line = (
        f"exported {result.path}: {result.type}, {result.tensors} tensors{fallback}, "
        f"{result.mib:,.1f} MiB in {result.seconds:.1f} s"
    )
    if result.modelfile:
        line += f"; Ollama: ollama create NAME -f {result.modelfile}"
    return line
