"""The CLI boundary: every expected failure of reading or writing is one line naming the file, exit 2,
and costs no model load; a real bug keeps its traceback; ``--debug`` / ``PRUNELAB_DEBUG=1`` show it all.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prunelab import cli, runner
from prunelab.errors import PrunelabError
from prunelab.model import loading as modeling
from prunelab.runner import session as session_module

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
    monkeypatch.setattr(session_module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
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
    monkeypatch.setattr(session_module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "calib.txt").write_bytes(b"text \xff\xfe more")
    study = tmp_path / "s.toml"
    study.write_text('model = "Qwen/Qwen3-0.6B"\n[calibration]\nsource = "calib.txt"\n'
                     '[[strategies]]\nname = "wanda"\nsparsity = 50\n')
    with pytest.raises(PrunelabError, match=r"calib\.txt:1: not UTF-8 text"):
        runner.load_study(study)
    (tmp_path / "calib.txt").write_text("\n\n")
    with pytest.raises(PrunelabError, match=r"calib\.txt: calibration file has no text"):
        runner.load_study(study)


# ---------------------------------------------------------------------- code from data (issue 27 part 1)
EVIL_CODE = "from pathlib import Path\nPath({marker!r}).write_text('the model folder ran its code')\n"


def run_cli(*args: str, stdin: str = "y\n", timeout: float = 300) -> subprocess.CompletedProcess:
    """``prunelab ARGS`` in a fresh process whose standard input answers "y" to any prompt."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "prunelab.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env)


def assert_one_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def remote_code_folder(tiny_qwen3: Path, tmp_path: Path, where: str) -> tuple[Path, Path]:
    """A copy of the tiny model whose config (or tokenizer config) points at a Python file that would
    write ``marker`` when imported."""
    folder, marker = tmp_path / "evil-model", tmp_path / "marker.txt"
    shutil.copytree(tiny_qwen3, folder)
    (folder / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    name = "config.json" if where == "config" else "tokenizer_config.json"
    doc = json.loads((folder / name).read_text())
    if where == "config":  # a model type transformers does not know: only the folder's code defines it
        doc.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig",
                                                "AutoModelForCausalLM": "evil.EvilModel"})
    else:
        doc.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
    (folder / name).write_text(json.dumps(doc))
    return folder, marker


@pytest.mark.parametrize("where", ["config", "tokenizer"])
def test_a_folders_own_code_never_runs_even_when_stdin_answers_yes(where, tiny_qwen3, data, tmp_path):
    """A config only the folder's code defines is refused in one line; a tokenizer config naming the
    folder's own class falls back to the folder's tokenizer.json. Neither asks, neither runs the code."""
    folder, marker = remote_code_folder(tiny_qwen3, tmp_path, where)
    result = run_cli("eval", "--model", str(folder), "--tasks", "wikitext", "--limit", "1", "--seqlen", "16",
                     "--data-dir", str(data))
    assert not marker.exists(), "the model folder's code ran"
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
    if where == "config":
        line = assert_one_line(result)
        assert f"{folder}/config.json" in line and "--trust-remote-code" in line
    else:
        assert result.returncode == 0, result.stderr


def test_a_known_model_type_with_an_auto_map_loads_the_built_in_class_without_its_code(tiny_qwen3, tmp_path):
    folder, marker = remote_code_folder(tiny_qwen3, tmp_path, "config")
    doc = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**doc, "model_type": "qwen3"}))
    loaded = modeling.load_model(str(folder), device="cpu", dtype="float32")
    assert type(loaded.model).__module__.startswith("transformers.") and not marker.exists()


class WritesAFile:
    """Unpickling this calls ``open(marker, "w")``: a pickle that runs code when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("allow", [False, True], ids=["refused", "--allow-pickle"])
def test_pickle_weights_are_never_unpickled(allow, tiny_qwen3, data, tmp_path):
    """Without safetensors the folder is refused in one line; with --allow-pickle torch's weights-only
    loader reads it and refuses the payload, reported in one line too. The payload never runs."""
    import pickle

    folder, marker = tmp_path / "pickled", tmp_path / "marker.txt"
    shutil.copytree(tiny_qwen3, folder)
    (folder / "model.safetensors").unlink()
    import torch

    torch.save({"model.embed_tokens.weight": WritesAFile(marker)}, folder / "pytorch_model.bin",
               pickle_module=pickle)
    result = run_cli("eval", "--model", str(folder), "--tasks", "wikitext", "--limit", "1", "--data-dir",
                     str(data), *(["--allow-pickle"] if allow else []))
    line = assert_one_line(result)
    assert not marker.exists(), "the pickle ran"
    if not allow:
        assert "pytorch_model.bin" in line and "safetensors" in line and "--allow-pickle" in line


# ---------------------------------------------------------------------- links planted in a work folder (part 2)
@pytest.mark.parametrize("planted", ["lock", "log.jsonl", "config.json", "a-variant-folder"])
def test_a_link_planted_in_the_work_folder_is_one_line_and_nothing_outside_is_written(
        planted, tiny_qwen3, small_data, tmp_path, capsys, monkeypatch):
    from .conftest import study_text

    monkeypatch.setattr(session_module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    study = tmp_path / "tiny.toml"
    study.write_text(study_text(tiny_qwen3, small_data))
    work = tmp_path / "out" / "tiny" / ".work"
    work.mkdir(parents=True)
    victim = tmp_path / "victim"
    if planted == "a-variant-folder":
        victim.mkdir()
    else:
        victim.write_text("precious\n")
    (work / planted).symlink_to(victim)
    line = one_line_error(capsys, "study", "run", str(study), "--out", str(tmp_path / "out"))
    assert f"{work / planted}: is a symbolic link" in line
    assert (list(victim.iterdir()) == [] if victim.is_dir() else victim.read_text() == "precious\n")


def test_a_study_folder_that_is_a_link_is_refused(tiny_qwen3, small_data, tmp_path, capsys, monkeypatch):
    from .conftest import study_text

    monkeypatch.setattr(session_module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    study = tmp_path / "tiny.toml"
    study.write_text(study_text(tiny_qwen3, small_data))
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "tiny").symlink_to(tmp_path / "elsewhere")
    line = one_line_error(capsys, "study", "run", str(study), "--out", str(tmp_path / "out"))
    assert "out/tiny: is a symbolic link" in line and not any((tmp_path / "elsewhere").iterdir())


# ---------------------------------------------------------------------- bounded before allocated (part 3)
def test_bombs_are_refused_in_one_line_before_any_model(tiny_qwen3, data, tmp_path, capsys, no_model):
    """A GGUF declaring a million layers, a config.json declaring a million layers, a grid of a million
    variants and a YAML alias bomb: each one line naming the file, no model, no expansion."""
    from prunelab.runner import studyfile

    from .model.test_fuzz_models import gguf_declaring

    gguf = tmp_path / "deep.gguf"
    gguf.write_bytes(gguf_declaring(gguf, block_count=10**6))
    line = one_line_error(capsys, "eval", "--model", str(gguf), "--tasks", "wikitext", "--data-dir", str(data))
    assert str(gguf) in line and "block_count = 1000000 decoder layers" in line

    folder = tmp_path / "deep"
    shutil.copytree(tiny_qwen3, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**6}))
    line = one_line_error(capsys, "eval", "--model", str(folder), "--tasks", "wikitext", "--data-dir", str(data))
    assert f"{folder / 'config.json'}: the model declares num_hidden_layers" in line

    grid = tmp_path / "grid.toml"
    grid.write_text('model = "Qwen/Qwen3-0.6B"\n[[strategies]]\nname = "magnitude"\n'
                    f"sparsity = {list(range(1000))}\nscope = {['layer'] * 1000}\n")
    original = studyfile.grid_points
    try:
        studyfile.grid_points = lambda grid: pytest.fail("the grid was expanded")
        line = one_line_error(capsys, "study", "run", str(grid), "--out", str(tmp_path / "out"))
    finally:
        studyfile.grid_points = original
    assert f"{grid}: its [[strategies]] grids expand to 1,000,000 variants, more than" in line

    bomb = tmp_path / "bomb.yaml"
    levels = ['model: "Qwen/Qwen3-0.6B"', 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi", strict=True)]
    bomb.write_text("\n".join(levels) + "\n")
    line = one_line_error(capsys, "study", "run", str(bomb), "--out", str(tmp_path / "out"))
    assert f"{bomb}: invalid YAML: more than" in line and "alias" in line


# ---------------------------------------------------------------------- leftovers and messages (part 4)
def test_a_study_file_name_that_is_not_a_folder_name_gets_a_slug_and_says_so(tmp_path, capsys):
    study = tmp_path / "mon étude (v2).toml"
    study.write_text('model = "Qwen/Qwen3-0.6B"\n[evaluation]\ntasks = ["wikitext"]\n')
    loaded = runner.load_study(study)
    assert loaded.name == "mon-etude-v2" and loaded.settings["study"] == "mon-etude-v2"
    assert any("mon-etude-v2" in note and "not a plain folder name" in note for note in loaded.notes)
    study.write_text('name = "bad name"\nmodel = "Qwen/Qwen3-0.6B"\n')
    with pytest.raises(PrunelabError, match="study name 'bad name' is not a plain folder name"):
        runner.load_study(study)  # a name the user wrote is theirs to fix


def test_a_write_that_fails_half_way_names_its_file(tmp_path):
    """The file-size limit (``ulimit -f``): the OS says only "File too large"; the line names the file."""
    import resource

    root = tmp_path / "artifacts"
    (root / "s" / "v").mkdir(parents=True)
    (root / "s" / "v" / "manifest.json").write_text(json.dumps({"study": "s", "version": "v"}))

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    result = subprocess.run([sys.executable, "-m", "prunelab.cli", "index", "--root", str(root)],
                            capture_output=True, text=True, timeout=120, preexec_fn=small_files,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = assert_one_line(result)
    assert line == f"error: {root / 'index.html'}: File too large", line
    assert not list(root.glob(".*.tmp")), "the staging file was left behind"


def test_printed_paths_are_never_wrapped(tmp_path):
    root = tmp_path / ("a-long-folder-name-" * 6) / "with spaces in it" / "artifacts"
    root.mkdir(parents=True)
    result = subprocess.run([sys.executable, "-m", "prunelab.cli", "index", "--root", str(root)],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    assert f"wrote {root / 'index.html'}\n" in result.stdout, result.stdout
