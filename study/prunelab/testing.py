"""Helpers for testing plugins: a tiny random-weight model folder, built offline in a second.

A plugin's tests need a real Hugging Face checkpoint to load, prune and score, but not a good one:
``build_tiny_model(path)`` writes a 4-layer model of any supported family (``llama``, ``qwen2``,
``qwen3``, ``gemma3``) with N(0, 0.2) weights and a byte-level BPE tokenizer trained on a few
sentences, so nothing comes from the Hub. Pass ``tokenizer=`` (a local tokenizer folder) to use a
real one instead. In a ``conftest.py``::

    from prunelab.testing import tiny_model_dir  # noqa: F401  (a session fixture: the folder's Path)

or call ``build_tiny_model(tmp_path)`` yourself. prunelab's own test suite builds its models with
these functions (``tests/conftest.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["ARCHITECTURES", "build_tiny_model", "random_model", "tiny_config", "tiny_tokenizer", "tiny_model_dir"]

ARCHITECTURES = ("qwen3", "qwen2", "llama", "gemma3")
TOKENIZER_VOCAB = 384
# What the offline tokenizer is trained on: enough text that prompts split into a few dozen tokens.
TRAINING_TEXT = (
    "The following are multiple choice questions (with answers) about biology, chemistry and algebra.",
    "Question: Which organ pumps blood through the body? Answer: the heart.",
    "A. one B. two C. three D. four. What is 2+2? The answer is 4.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 = + - * / ( ) # , . ; : ? !",
    "Wikipedia articles describe history, science, music, people and places in plain sentences.",
)


def tiny_config(arch: str = "llama", vocab_size: int = 151936, num_layers: int = 4) -> Any:
    """A few-layer config of one architecture family (hidden 64, MLP 128, 4 heads over 2 KV heads);
    Qwen3 keeps head_dim != hidden/heads, as the real models do."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
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
    raise ValueError(f"unknown architecture {arch!r} (one of {', '.join(ARCHITECTURES)})")


def random_model(config: Any, seed: int = 0) -> Any:
    """A float32 model of ``config`` with N(0, 0.2) matrices: larger than the default init, so
    predictions are not all ties."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model


def tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer trained here on ``TRAINING_TEXT`` (any text encodes; no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_tiny_model(path: str | Path, arch: str = "llama", *, seed: int = 0, num_layers: int = 4,
                     tokenizer: str | Path | None = None, vocab_size: int | None = None) -> Path:
    """Save a tiny random model of ``arch`` and a tokenizer into ``path`` (created); returns it.

    ``tokenizer``: a local tokenizer folder to copy; default: ``tiny_tokenizer()``. ``vocab_size``:
    the embedding's rows (default: the tokenizer's size; never fewer). Generation never stops at an
    end token, so a generation budget is always used up, which makes generating tests predictable.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    loaded = AutoTokenizer.from_pretrained(str(tokenizer)) if tokenizer is not None else tiny_tokenizer()
    if vocab_size is not None and vocab_size < len(loaded):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(loaded)} tokens")
    model = random_model(tiny_config(arch, vocab_size=vocab_size or len(loaded), num_layers=num_layers), seed)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    loaded.save_pretrained(path)
    return path


try:  # a fixture for plugin authors' conftest.py, where pytest is installed
    import pytest
except ImportError:  # pragma: no cover - prunelab itself does not need pytest
    pass
else:
    @pytest.fixture(scope="session")
    def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
        """A tiny random Llama-family model folder with an offline tokenizer (``build_tiny_model``)."""
        return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), "llama")
