"""The CLI boundary: every expected failure of reading or writing is one line naming the file, exit 2,
and costs no model load; a real bug keeps its traceback; ``--debug`` / ``PRUNELAB_DEBUG=1`` show it all.
"""

from __future__ import annotations

import errno
import json
import shutil

import pytest

from prunelab import cli, runner
from prunelab.errors import PrunelabError
from prunelab.model import loading as modeling
from prunelab.runner import run as run_module

from .conftest import MODELS
from .model.test_fuzz_models import GGUF

REAL_GGUF = next(iter(sorted(MODELS.glob("*/*.gguf"))), None)


def one_line_error(capsys, *args: str) -> str:
    """Run ``prunelab ARGS`` in this process; it must fail with exit 2 and one stderr line (returned)."""
    capsys.readouterr()
    status = cli.main(list(args))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def data(tmp_path):
    """A data folder with a small WikiText-2 and a valid GSM8K."""
    root = tmp_path / "data"
    (root / "wikitext-2").mkdir(parents=True)
    (root / "wikitext-2" / "wiki.test.raw").write_text(" = Title = \n\n Some text . \n" * 20)
    (root / "gsm8k").mkdir()
    for split in ("test", "train"):
        (root / "gsm8k" / f"{split}.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}) + "\n")
    return root


@pytest.fixture
def no_model(monkeypatch, tmp_path):
    """Fail the test if a model's weights are loaded; GGUF conversions go to a scratch cache."""
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)


@pytest.mark.parametrize("content", [b"\x00\x01 definitely not a model " * 40, GGUF[:60], GGUF[:-9]],
                         ids=["random bytes", "header cut", "data cut"])
def test_broken_gguf_is_one_line(content, data, tmp_path, capsys, no_model):
    model = tmp_path / "model.gguf"
    model.write_bytes(content)
    line = one_line_error(capsys, "eval", "--model", str(model), "--tasks", "wikitext", "--data-dir", str(data))
    assert str(model) in line and "not a valid GGUF file" in line


@pytest.mark.needs("models")
def test_truncated_real_gguf_is_one_line(data, tmp_path, capsys, no_model):
    model = tmp_path / "cut.gguf"
    with open(REAL_GGUF, "rb") as source:
        model.write_bytes(source.read(3 << 20))  # the header and the first tensors of a real download
    line = one_line_error(capsys, "eval", "--model", str(model), "--tasks", "wikitext", "--data-dir", str(data))
    assert str(model) in line and "truncated" in line


@pytest.mark.parametrize("command", [
    ["eval", "--tasks", "wikitext", "--out", "{out}"],
    ["prune", "--method", "drop-layers", "--layers", "1", "--out", "{out}"],
    ["bench-model", "{model}", "--out", "{out}/bench.json"],
])
def test_out_under_a_regular_file_is_one_line_before_any_model(command, data, tmp_path, capsys, no_model, tiny_qwen3):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = [a.format(out=blocker / "sub", model=tiny_qwen3) for a in command]
    if args[0] != "bench-model":
        args += ["--model", str(tiny_qwen3)]
    if args[0] == "eval":
        args += ["--data-dir", str(data)]
    line = one_line_error(capsys, *args)
    assert str(blocker) in line and "is a file, not a folder" in line


def test_study_out_under_a_regular_file_is_one_line(tmp_path, capsys, no_model):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    study = tmp_path / "s.toml"
    study.write_text('model = "Qwen/Qwen3-0.6B"\n[evaluation]\ntasks = ["wikitext"]\n')
    line = one_line_error(capsys, "study", "run", str(study), "--out", str(blocker / "artifacts"))
    assert "is a file, not a folder" in line


def test_gsm8k_row_without_final_answer_is_one_line_before_any_model(data, capsys, no_model, tiny_qwen3):
    rows = [{"question": "1+1?", "answer": "1+1=2\n#### 2"}, {"question": "2+2?", "answer": "It is 4."}]
    (data / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = one_line_error(capsys, "eval", "--model", str(tiny_qwen3), "--tasks", "gsm8k", "--data-dir", str(data))
    assert f"{data / 'gsm8k' / 'test.jsonl'}:2: answer does not end with a '#### N' line" in line


@pytest.mark.parametrize(("name", "damage", "fragment"), [
    ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-100]), "not a valid safetensors file"),
    ("tokenizer.json", lambda p: p.write_text("{ not json"), "invalid JSON"),
    ("config.json", lambda p: p.write_text('{"model_type": "llama", "torch_dtype": []}'), "invalid model config"),
    ("tokenizer_config.json", lambda p: p.write_bytes(b"\xff\xfe"), "not UTF-8"),
])
def test_damaged_model_folder_is_one_line_naming_the_file(name, damage, fragment, tiny_qwen3, data, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_qwen3, folder)
    damage(folder / name)
    line = one_line_error(capsys, "eval", "--model", str(folder), "--tasks", "wikitext", "--data-dir", str(data))
    assert str(folder / name) in line and fragment in line


def test_os_errors_are_one_line_naming_the_file(monkeypatch, capsys):
    def disk_full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/some/where/items.parquet")

    monkeypatch.setitem(cli.COMMANDS, "plugins", (*cli.COMMANDS["plugins"][:2], disk_full))
    line = one_line_error(capsys, "plugins")
    assert line == "error: /some/where/items.parquet: no space left on device"


def test_a_real_bug_keeps_its_traceback(monkeypatch):
    def bug(args):
        return {}["missing"]

    monkeypatch.setitem(cli.COMMANDS, "plugins", (*cli.COMMANDS["plugins"][:2], bug))
    with pytest.raises(KeyError):
        cli.main(["plugins"])


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_whole_traceback(how, monkeypatch, tmp_path):
    study = tmp_path / "s.toml"
    study.write_text("model = [")
    if how == "env":
        monkeypatch.setenv("PRUNELAB_DEBUG", "1")
    args = ["study", "run", str(study), *(["--debug"] if how == "flag" else [])]
    with pytest.raises(PrunelabError, match="invalid TOML") as caught:
        cli.main(args)
    assert caught.value.__cause__ is not None  # the parser's own exception is kept for the traceback


def test_study_file_values_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    study = tmp_path / "s.yaml"
    study.write_text("model: Qwen/Qwen3-0.6B\ndevice: null\n")
    with pytest.raises(PrunelabError, match=rf"{study}.*device must be str, got None"):
        runner.load_study(study)
    study.write_text("model: Qwen/Qwen3-0.6B\ncalibration: {samples: 0}\nstrategies: [{name: wanda}]\n")
    with pytest.raises(PrunelabError, match=rf"^{study}: calibration samples must be a positive integer"):
        runner.load_study(study)


def test_read_model_config_keeps_valid_configs(tiny_qwen3):
    assert modeling.read_model_config(tiny_qwen3).model_type == "qwen3"


def test_damaged_calibration_file_fails_with_the_study_file(tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "calib.txt").write_bytes(b"text \xff\xfe more")
    study = tmp_path / "s.toml"
    study.write_text('model = "Qwen/Qwen3-0.6B"\n[calibration]\nsource = "calib.txt"\n'
                     '[[strategies]]\nname = "wanda"\nsparsity = 50\n')
    with pytest.raises(PrunelabError, match=r"calib\.txt:1: not UTF-8 text"):
        runner.load_study(study)
    (tmp_path / "calib.txt").write_text("\n\n")
    with pytest.raises(PrunelabError, match=r"calib\.txt: calibration file has no text"):
        runner.load_study(study)
