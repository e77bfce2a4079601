"""Fuzz the study file reader (TOML and YAML): any file either validates into a Study or raises a
PrunelabError naming it, without loading a model. Documents are built from the real keys and option
names (so the fuzzer reaches the deep checks) with values of any type, then serialized as YAML, as
TOML, or mutated byte by byte; the shipped study files are mutated too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from prunelab.errors import PrunelabError
from prunelab.registry import default_registry
from prunelab.runner import session as session_module
from prunelab.runner.studyfile import BENCH_DEFAULTS, EVALUATION_KEYS, load_study

from ..conftest import ROOT
from ..fuzzing import honours_contract, json_scalars, mutated, scratch

REGISTRY = default_registry()
OPTION_NAMES = sorted({o.name for s, _ in REGISTRY.strategies.values() for o in s.options} | {"name"})
values = st.one_of(json_scalars, st.sampled_from([50, 0.5, "2:4", "0-3", "each", "smallest", [1, 2], "c4"]),
                   st.lists(json_scalars | st.integers(0, 100), max_size=3))
strategy_blocks = st.dictionaries(st.sampled_from(OPTION_NAMES), values, max_size=4).flatmap(
    lambda block: st.sampled_from(sorted(REGISTRY.strategies) + ["nosuch"]).map(lambda name: {"name": name, **block})
    | st.just(block))
evaluation = st.dictionaries(st.sampled_from(sorted(EVALUATION_KEYS)), values, max_size=4).flatmap(
    lambda table: st.dictionaries(st.sampled_from(sorted(REGISTRY.evaluators)),
                                  st.dictionaries(st.sampled_from(["limit", "fraction", "seqlen", "num_fewshot",
                                                                   "max_new_tokens", "sample", "x"]), values,
                                                  max_size=3), max_size=2).map(lambda tasks: {**table, **tasks}))
documents = st.fixed_dictionaries(
    {"model": st.sampled_from(["Qwen/Qwen3-0.6B", "./m.gguf", "${NOSUCHVAR}/m", "~/m"]) | values},
    optional={"name": st.sampled_from(["s", "bad name", ""]) | values, "dtype": values, "device": values,
              "prune_seed": values, "trust_remote_code": values, "evaluation": evaluation | values,
              "strategies": st.lists(strategy_blocks, max_size=3) | values,
              "calibration": st.dictionaries(st.sampled_from(["source", "samples", "seqlen", "x"]), values, max_size=3),
              "bench": st.booleans() | st.dictionaries(st.sampled_from(sorted(BENCH_DEFAULTS)), values, max_size=2),
              "stray": values})


def toml_value(value) -> str:
    """A scalar or list in TOML syntax (JSON's strings, numbers, booleans and arrays are TOML's too)."""
    if value is None:
        return '""'  # TOML has no null
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def to_toml(doc: dict) -> str:
    lines = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)
             and not (k == "strategies" and isinstance(v, list) and v and all(isinstance(b, dict) for b in v))]
    for key, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"[{json.dumps(key)}]")
            lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
            for sub, inner in table.items():
                if isinstance(inner, dict):
                    lines.append(f"[{json.dumps(key)}.{json.dumps(sub)}]")
                    lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in inner.items() if not isinstance(v, dict)]
    for block in doc.get("strategies", []) if isinstance(doc.get("strategies"), list) else []:
        if isinstance(block, dict):
            lines.append("[[strategies]]")
            lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in block.items()]
    return "\n".join(lines) + "\n"


def read_study(path: Path):
    return load_study(path, registry=REGISTRY)


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    monkeypatch.setattr(session_module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))


@given(documents, st.sampled_from(["yaml", "toml"]), st.booleans())
def test_fuzz_study_documents(doc, form, mutate):
    text = (yaml.safe_dump(doc) if form == "yaml" else to_toml(doc)).encode()
    with scratch() as folder:
        path = folder / f"fuzz.{form}"
        path.write_bytes(text)
        study = honours_contract(lambda: read_study(path), path)
        if study is not None:
            assert study.tasks and all(t in REGISTRY.evaluators for t in study.tasks)
            assert json.loads(json.dumps(study.settings, default=str))


SHIPPED = {p.name: p.read_bytes() for p in sorted((ROOT / "studies").glob("*.toml"))}


@given(st.sampled_from(sorted(SHIPPED)).flatmap(lambda name: mutated(SHIPPED[name], max_edits=3)),
       st.sampled_from(["toml", "yaml"]))
def test_fuzz_shipped_study_bytes(data, form):
    with scratch() as folder:
        path = folder / f"fuzz.{form}"
        path.write_bytes(data)
        honours_contract(lambda: read_study(path), path)


# ---------------------------------------------------------------------- bounds (issue 27 part 3)
def alias_bomb(depth: int, width: int) -> str:
    """``a0`` is a list; each next anchor lists the previous one ``width`` times: width**depth leaves."""
    lines = ['model: "Qwen/Qwen3-0.6B"', "x0: &a0 [1, 2]"]
    for level in range(1, depth + 1):
        lines.append(f"x{level}: &a{level} [{', '.join([f'*a{level - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def expanded_nodes(depth: int, width: int) -> int:
    """Nodes of ``alias_bomb`` once expanded, by hand: the mapping, its keys and values, every list."""
    sizes = [3]  # [1, 2]: the list and its two items
    for _ in range(depth):
        sizes.append(1 + width * sizes[-1])
    return 1 + 2 + sum(1 + size for size in sizes)  # the mapping, "model" key and value, each x key and value


@given(st.integers(1, 12), st.integers(1, 12))
def test_fuzz_yaml_alias_expansion_is_bounded(depth, width):
    """Refused (one line, naming the file and the limit) exactly when the expanded document passes the limit."""
    from prunelab.runner.studyfile import MAX_YAML_NODES

    with scratch() as folder:
        path = folder / "bomb.yaml"
        path.write_text(alias_bomb(depth, width))
        if expanded_nodes(depth, width) > MAX_YAML_NODES:
            with pytest.raises(PrunelabError, match=rf"^{path}: invalid YAML: more than {MAX_YAML_NODES:,} nodes"):
                load_study(path)
        else:
            honours_contract(lambda: load_study(path), path)


def test_a_recursive_yaml_alias_is_one_line(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text('model: "Qwen/Qwen3-0.6B"\nstrategies: &s [*s]\n')
    with pytest.raises(PrunelabError, match="recursive alias"):
        load_study(path)


@given(st.lists(st.integers(1, 400), min_size=1, max_size=3))
def test_fuzz_grid_size_is_bounded_before_expansion(lengths):
    """The product of a block's list lengths, summed over blocks, against MAX_VARIANTS -- checked before
    a single grid point is made (``grid_points`` is never called past the limit)."""
    from prunelab.runner import studyfile

    block = {"name": "magnitude", **{key: list(range(1, n + 1)) for key, n in zip(["sparsity", "x", "y"][:len(lengths)], lengths, strict=True)}}
    size = 1
    for n in lengths:
        size *= n
    with scratch() as folder:
        path = folder / "grid.toml"
        rows = "\n".join(f"{k} = {json.dumps(v)}" for k, v in block.items())
        path.write_text(f'model = "Qwen/Qwen3-0.6B"\n[[strategies]]\n{rows}\n')
        if size > studyfile.MAX_VARIANTS:
            with pytest.raises(PrunelabError, match=rf"expand to {size:,} variants, more than"):
                load_study(path)
        else:
            honours_contract(lambda: load_study(path), path)


def test_a_study_file_beyond_the_size_limit_is_refused_unread(tmp_path):
    from prunelab.runner.studyfile import MAX_STUDY_BYTES

    path = tmp_path / "big.toml"
    path.write_text('model = "Qwen/Qwen3-0.6B"\n' + "#" * MAX_STUDY_BYTES)
    with pytest.raises(PrunelabError, match="more than prunelab's limit"):
        load_study(path)
