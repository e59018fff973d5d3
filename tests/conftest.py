"""Shared fixtures: a byte-level tokenizer and tiny random Llama models (solotune.testing)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from solotune.testing import make_tokenizer, save_model_folder


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama + tokenizer folder, loadable with --model."""
    return save_model_folder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Keep converted models of a test out of the user's cache unless a test opts in."""
    if "SOLOTUNE_CACHE" not in os.environ:
        monkeypatch.setenv("SOLOTUNE_CACHE", str(tmp_path / "cache"))
