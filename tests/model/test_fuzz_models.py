"""Fuzz the readers of model files: GGUF and safetensors headers, config.json, tokenizer files,
prunelab.json and masks.safetensors. Each returns a valid value or raises a PrunelabError naming the
file (tests/fuzzing.py: ``honours_contract``); anything else is a finding.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from prunelab.errors import FileProblem
from prunelab.model.export import RECIPE_FILE, read_recipe
from prunelab.model.loading import load_tokenizer, read_model_config
from prunelab.prune.masks import MaskSet
from prunelab.readers import check_model_folder, read_gguf_header, read_safetensors_header

from ..conftest import MODELS, require
from ..fuzzing import bytes_like, honours_contract, json_values, mutated, scratch


def tiny_gguf(path) -> bytes:
    """A valid GGUF v3 file: a few metadata fields (string, int, array) and two small tensors."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_string("general.name", "fuzz")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("blk.0.attn_q.weight", np.ones((4, 4), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def tiny_safetensors(path, tensors=None) -> bytes:
    from safetensors.torch import save_file

    save_file(tensors or {"a": torch.ones(2, 3, dtype=torch.bool), "b": torch.zeros(4)}, str(path))
    return path.read_bytes()


with scratch() as _folder:
    GGUF = tiny_gguf(_folder / "t.gguf")
    SAFETENSORS = tiny_safetensors(_folder / "t.safetensors")
    MASKS = tiny_safetensors(_folder / "m.safetensors", {"layers.0.mlp.up_proj.weight": torch.rand(3, 4) > 0.5})


def test_the_valid_seeds_read():
    with scratch() as folder:
        (folder / "t.gguf").write_bytes(GGUF)
        assert read_gguf_header(folder / "t.gguf") == {"version": 3, "architecture": "llama", "tensors": 2}
        (folder / "t.safetensors").write_bytes(SAFETENSORS)
        assert read_safetensors_header(folder / "t.safetensors") == {"a": ("BOOL", (2, 3)), "b": ("F32", (4,))}


@pytest.mark.parametrize(("cut", "fragment"), [(0, "only 0 bytes"), (3, "only 3 bytes"), (40, ""), (len(GGUF) - 7, "")])
def test_truncated_gguf_is_one_problem_naming_it(cut, fragment):
    with scratch() as folder:
        path = folder / "cut.gguf"
        path.write_bytes(GGUF[:cut])
        with pytest.raises(FileProblem, match="not a valid GGUF file") as caught:
            read_gguf_header(path)
        assert str(path) in str(caught.value) and fragment in str(caught.value)


@given(bytes_like(GGUF))
def test_fuzz_gguf_header(data):
    with scratch() as folder:
        path = folder / "model.gguf"
        path.write_bytes(data)
        header = honours_contract(lambda: read_gguf_header(path), path)
        if header is not None:  # what the header walker accepts, the gguf package reads the same way
            assert header == gguf_package_view(path)


def gguf_package_view(path) -> dict:
    """The independent reference: the ``gguf`` package's own reader (slow on real tokenizers)."""
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.fields["general.architecture"]
    return {"version": int(reader.fields["GGUF.version"].parts[-1][0]),
            "architecture": bytes(field.parts[field.data[0]]).decode(), "tensors": len(reader.tensors)}


@pytest.mark.slow
def test_real_gguf_headers_agree_with_the_gguf_package():
    require("models")
    files = sorted(MODELS.glob("smollm2/*.gguf"))  # ~10 s in gguf
    for path in files:
        assert read_gguf_header(path) == gguf_package_view(path), path


@given(bytes_like(SAFETENSORS))
def test_fuzz_safetensors_header(data):
    with scratch() as folder:
        path = folder / "model.safetensors"
        path.write_bytes(data)
        header = honours_contract(lambda: read_safetensors_header(path), path)
        if header is not None:
            assert all(isinstance(name, str) and isinstance(shape, tuple) for name, (_, shape) in header.items())


@given(bytes_like(MASKS))
def test_fuzz_masks(data):
    with scratch() as folder:
        path = folder / "masks.safetensors"
        path.write_bytes(data)
        masks = honours_contract(lambda: MaskSet.load(path), path)
        if masks is not None:
            assert all(keep.dtype == torch.bool for keep in masks.values())


def test_masks_of_another_dtype_are_refused():
    with scratch() as folder:
        tiny_safetensors(folder / "masks.safetensors", {"w": torch.ones(2)})
        with pytest.raises(FileProblem, match="masks are bool"):
            MaskSet.load(folder / "masks.safetensors")


CONFIG = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 128, "vocab_size": 16}
config_documents = st.one_of(
    json_values,
    st.fixed_dictionaries({"model_type": st.sampled_from(["llama", "qwen3", "qwen2", "gemma3_text", "nosuch"])},
                          optional={k: json_values for k in ("hidden_size", "num_hidden_layers", "rope_scaling",
                                                             "torch_dtype", "architectures", "vocab_size")}),
    st.builds(lambda extra: {**CONFIG, **extra}, st.dictionaries(st.sampled_from(sorted(CONFIG) + [
        "rope_scaling", "rope_parameters", "torch_dtype", "dtype", "tie_word_embeddings", "bos_token_id",
        "auto_map", "quantization_config", "layer_types", "max_position_embeddings"]), json_values, max_size=3)),
)


def as_file_bytes(value) -> st.SearchStrategy[bytes]:
    text = json.dumps(value, allow_nan=False).encode()
    return st.just(text) | mutated(text, max_edits=2)


@given(config_documents.flatmap(as_file_bytes))
def test_fuzz_config_json(data):
    with scratch() as folder:
        (folder / "config.json").write_bytes(data)
        config = honours_contract(lambda: read_model_config(folder), folder / "config.json")
        if config is not None:
            assert isinstance(config.model_type, str)


def tiny_tokenizer_files(folder) -> dict[str, bytes]:
    """A small valid fast tokenizer (word level, a handful of tokens) as saved by transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2, "</s>": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix == ".json"}


with scratch() as _folder:
    TOKENIZER = tiny_tokenizer_files(_folder)


@given(st.sampled_from(sorted(TOKENIZER)).flatmap(
    lambda name: st.tuples(st.just(name), mutated(TOKENIZER[name], max_edits=2) | json_values.flatmap(as_file_bytes))))
def test_fuzz_tokenizer_files(case):
    name, data = case
    with scratch() as folder:
        for other, content in TOKENIZER.items():
            (folder / other).write_bytes(content)
        (folder / "config.json").write_text(json.dumps(CONFIG))
        (folder / name).write_bytes(data)

        def read():
            check_model_folder(folder)  # what load_model runs first: every JSON file parses
            return load_tokenizer(str(folder))

        tokenizer = honours_contract(read, folder)
        if tokenizer is not None:
            assert isinstance(tokenizer("a b")["input_ids"], list)


@given(json_values.flatmap(as_file_bytes) | st.builds(
    lambda extra: json.dumps({"format": "prunelab-recipe/1", **extra}).encode(),
    st.dictionaries(st.text(max_size=8), json_values, max_size=3)))
def test_fuzz_recipe(data):
    with scratch() as folder:
        (folder / RECIPE_FILE).write_bytes(data)
        recipe = honours_contract(lambda: read_recipe(folder), folder / RECIPE_FILE)
        if recipe is not None:
            assert recipe["format"].startswith("prunelab-recipe/")


# ---------------------------------------------------------------------- declared counts (issue 27 part 3)
def gguf_declaring(path, *, block_count: int, tensors: int | None = None) -> bytes:
    """The tiny GGUF with another ``llama.block_count`` (and, if given, another declared tensor count)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(block_count)
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = bytearray(path.read_bytes())
    if tensors is not None:
        data[8:16] = tensors.to_bytes(8, "little")  # the header's tensor count, right after magic and version
    return bytes(data)


@given(st.integers(0, 2**32 - 1))
def test_fuzz_gguf_declared_layers_are_bounded(block_count):
    """Any declared depth: read as is up to MAX_LAYERS, refused (naming the limit) beyond it."""
    from prunelab.readers import MAX_LAYERS

    with scratch() as folder:
        path = folder / "t.gguf"
        path.write_bytes(gguf_declaring(path, block_count=block_count))
        if block_count <= MAX_LAYERS:
            assert read_gguf_header(path)["tensors"] == 1
        else:
            with pytest.raises(FileProblem, match=rf"block_count = {block_count} decoder layers, more than .* {MAX_LAYERS}"):
                read_gguf_header(path)


def test_a_declared_tensor_count_beyond_the_limit_is_refused_before_reading_them(tmp_path):
    from prunelab.readers import MAX_GGUF_TENSORS

    path = tmp_path / "t.gguf"
    data = gguf_declaring(path, block_count=1, tensors=MAX_GGUF_TENSORS + 1)
    path.write_bytes(data + bytes(24 * (MAX_GGUF_TENSORS + 1)))  # room for them: the size check alone passes
    with pytest.raises(FileProblem, match=f"declares {MAX_GGUF_TENSORS + 1} tensors, more than"):
        read_gguf_header(path)


@given(st.sampled_from(["num_hidden_layers", "n_layer", "num_layers"]), st.integers(0, 10**12),
       st.booleans())
def test_fuzz_config_json_declared_layers_are_bounded(key, layers, nested):
    from prunelab.readers import MAX_LAYERS

    with scratch() as folder:
        table = {key: layers}
        config = {"model_type": "llama", **({"text_config": table} if nested else table)}
        (folder / "config.json").write_text(json.dumps(config))
        if layers > MAX_LAYERS:
            with pytest.raises(FileProblem, match=rf"config\.json: the model declares {key} = "):
                check_model_folder(folder)
        else:
            assert check_model_folder(folder) == config
