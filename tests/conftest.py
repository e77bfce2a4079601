"""Shared fixtures: tiny random-weight models with the real Qwen3 tokenizer, and real SmolLM2."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PRUNELAB_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
QWEN3_TOKENIZER = SHARED / "tokenizers" / "qwen3"


def tiny_config(arch: str, vocab_size: int = 151936):
    """A few-layer config of one architecture family; Qwen3 keeps head_dim != hidden/heads."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    )
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "gemma3":
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=64, tie_word_embeddings=True)
    raise ValueError(arch)


def build_tiny_model(arch: str, path: Path, seed: int = 0) -> Path:
    """Save a tiny random model of ``arch`` with the real Qwen3 tokenizer into ``path``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init, so predictions are not all ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(QWEN3_TOKENIZER).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(arch, root / arch) for arch in ("qwen3", "qwen2", "llama", "gemma3")}


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_models) -> Path:
    return tiny_models["qwen3"]


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M GGUF from ../shared/bin/fetch-test-models (skips where it is absent)."""
    fetch = SHARED / "bin" / "fetch-test-models"
    try:
        out = subprocess.run([str(fetch), "smollm2"], capture_output=True, text=True, check=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"SmolLM2 not available: {exc}")
    return Path(out.stdout.strip().split("\t")[1])
