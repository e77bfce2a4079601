"""`bench-model`: sane positive numbers, exact parameter accounting after layer removal, 2:4 guard on CPU.

Speed itself is measured in benchmarks/bench_layer_removal.py, never asserted here.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from prunelab.cli import main
from prunelab.errors import PrunelabError
from prunelab.model.bench import (
    SEMI_STRUCTURED_NEEDS_CUDA,
    bench_model,
    convert_semi_structured,
    decode,
    expected_speedup,
    follows_2_4,
    parse_int_list,
    prefill,
    random_prompts,
)
from prunelab.model.export import save_pruned
from prunelab.model.loading import load_model
from prunelab.prune.api import prune
from prunelab.prune.masks import nm_mask

SMALL = {"prompt_lengths": (8, 16), "batches": (1, 2), "new_tokens": 3, "repeats": 2}



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dense_result(tiny_qwen3):
    return bench_model(str(tiny_qwen3), device="cpu", dtype="float32", **SMALL)


def test_bench_model_reports_sane_positive_numbers(dense_result, tiny_qwen3):
    r = dense_result
    model = load_model(str(tiny_qwen3), dtype="float32").model
    assert r["parameters"] == sum(p.numel() for p in model.parameters())
    assert r["parameter_bytes"] == 4 * r["parameters"]
    assert r["weights_file_bytes"] == (tiny_qwen3 / "model.safetensors").stat().st_size
    assert r["decoder_layers"] == 4 and r["dtype"] == "float32" and r["device"] == "cpu"
    assert r["peak_memory_bytes"] > r["parameter_bytes"]  # CPU: the resident set holds the weights and more
    assert [row["prompt_length"] for row in r["prefill"]] == [8, 16]
    assert [row["batch"] for row in r["decode"]] == [1, 2]
    for row in r["prefill"]:
        assert len(row["runs"]) == 2 and all(t > 0 for t in row["runs"])
        assert row["seconds"] == statistics.median(row["runs"])
        assert row["tokens_per_s"] == pytest.approx(row["prompt_length"] / row["seconds"])
    for row in r["decode"]:
        assert row["prompt_length"] == 8 and row["new_tokens"] == 3
        assert row["tokens_per_s"] == pytest.approx(row["batch"] * 3 / row["seconds"]) and row["tokens_per_s"] > 0
    json.dumps(r)  # the CLI writes it as JSON


def test_decode_loop_matches_greedy_generate(tiny_qwen3):
    """The timed loop is real generation: the same tokens as transformers' greedy generate."""
    loaded = load_model(str(tiny_qwen3), dtype="float32")
    prompt = random_prompts(loaded.adapter, 2, 12, seed=3)
    cache, first = prefill(loaded.adapter, prompt)
    ours = decode(loaded.adapter, cache, first, 5)
    reference = loaded.model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                      max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    assert torch.equal(ours, reference[:, 12:])


def test_removing_layers_removes_exactly_their_parameters(tiny_qwen3, dense_result, tmp_path):
    loaded = load_model(str(tiny_qwen3), dtype="float32")
    removed = sum(p.numel() for i in (1, 2) for p in loaded.adapter.layers[i].parameters())
    report = prune(loaded, "drop-layers", layers="1,2")
    folder = save_pruned(loaded, tmp_path / "pruned", report)
    result = bench_model(str(folder), device="cpu", dtype="float32", **SMALL)
    assert result["decoder_layers"] == 2
    assert dense_result["parameters"] - result["parameters"] == removed
    assert dense_result["weights_file_bytes"] - result["weights_file_bytes"] == pytest.approx(4 * removed, rel=0.01)


def test_expected_speedup_by_hand():
    bounds = expected_speedup(num_layers=30, removed=8, layer_params=3, head_params=28)
    assert bounds["decoder_only"] == pytest.approx(30 / 22)
    assert bounds["with_head"] == pytest.approx((90 + 28) / (66 + 28))
    assert expected_speedup(4, 0, 1, 1) == {"decoder_only": 1.0, "with_head": 1.0}


def test_follows_2_4():
    weight = torch.randn(8, 16)
    assert not follows_2_4(weight)
    pruned = weight * nm_mask(weight.abs(), 2, 4)
    assert follows_2_4(pruned)
    assert not follows_2_4(torch.zeros(4, 6))  # input size not a multiple of 4


def test_semi_structured_refuses_on_cpu(tiny_qwen3, capsys):
    with pytest.raises(PrunelabError, match="needs a CUDA GPU"):
        bench_model(str(tiny_qwen3), device="cpu", semi_structured=True)
    loaded = load_model(str(tiny_qwen3), dtype="float32")
    with pytest.raises(PrunelabError, match="needs a CUDA GPU"):
        convert_semi_structured(loaded.adapter)
    capsys.readouterr()
    assert main(["bench-model", str(tiny_qwen3), "--device", "cpu", "--semi-structured"]) == 2
    err = capsys.readouterr().err
    assert SEMI_STRUCTURED_NEEDS_CUDA.split(":")[0] in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1


def test_semi_structured_converts_exactly_the_2_4_linears(tiny_qwen3, monkeypatch):
    """Which weights go to the 2:4 kernels, checked on CPU with a stand-in for the CUDA-only converter.

    The real ``to_sparse_semi_structured`` needs a GPU; the selection around it (2:4 weights
    converted, others kept dense and listed, a kernel refusal kept dense with its reason) does not.
    """
    import prunelab.model.bench as benchmodel

    loaded = load_model(str(tiny_qwen3), dtype="float32")
    adapter = loaded.adapter
    prune(loaded.model, "magnitude", sparsity=50, pattern="2:4")
    dense_name = "mlp.down_proj"
    torch.nn.init.normal_(adapter.linear_modules(1)[dense_name].weight)  # layer 1's down_proj: dense again
    refused = adapter.linear_modules(2)["self_attn.q_proj"].weight

    def fake_converter(weight):
        if weight.data_ptr() == refused.data_ptr():
            raise RuntimeError("shape not supported by the kernel\nsecond line")
        return weight.clone()

    monkeypatch.setattr(benchmodel, "_device", lambda adapter: torch.device("cuda"))
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", fake_converter)
    linears = sum(len(adapter.linear_modules(i)) for i in range(adapter.num_layers))
    report = convert_semi_structured(adapter)
    assert report["skipped"] == {f"layers.1.{dense_name}": "not 2:4 sparse",
                                 "layers.2.self_attn.q_proj": "shape not supported by the kernel"}
    assert report["converted"] == linears - 2

    for index in range(adapter.num_layers):
        for module in adapter.linear_modules(index).values():
            torch.nn.init.normal_(module.weight)
    with pytest.raises(PrunelabError, match="prune with --pattern 2:4 first"):
        convert_semi_structured(adapter)


def test_bench_model_cli_writes_json(tiny_qwen3, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench-model", str(tiny_qwen3), "--device", "cpu", "--dtype", "float32", "--prompt-lengths", "8",
                 "--batch", "1", "--new-tokens", "2", "--repeats", "1", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["prefill"][0]["tokens_per_s"] > 0 and result["decode"][0]["tokens_per_s"] > 0
    assert "prefill 8 tokens" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "fragment"), [
    (["--batch", "1,x"], "--batch: expected comma-separated integers"),
    (["--prompt-lengths", "0"], "--prompt-lengths must be positive integers"),
    (["--prompt-lengths", "5000"], "exceeds the model's context"),
])
def test_bench_model_bad_input_is_one_line(tiny_qwen3, args, fragment, capsys):
    assert main(["bench-model", str(tiny_qwen3), "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_parse_int_list():
    assert parse_int_list("128, 512", "x") == [128, 512]
