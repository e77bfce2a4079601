"""Shared fixtures: tiny random-weight models with the real Qwen3 tokenizer, and real SmolLM2."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PRUNELAB_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
QWEN3_TOKENIZER = SHARED / "tokenizers" / "qwen3"


MODELS = Path(os.environ.get("PRUNELAB_TEST_MODELS", Path.home() / ".cache" / "prunelab-test-models"))


# ---------------------------------------------------------------------------- optional system tools
# A test that needs something outside pip (a browser, a Docker engine, debootstrap, the real models)
# is skipped where it is missing, with a reason naming it and how to get it. PRUNELAB_REQUIRE_TOOLS
# (a comma list of tool names, or "all"; .ci/run sets it) turns those skips into failures, so CI
# proves the tests it has the tools for instead of silently skipping them.

def outside_make(environ) -> dict[str, str]:
    """The environment without make's own variables: under `make test` (CI) the child make would
    otherwise run as a sub-make and add a 'make[1]: ***' line to the one-line errors under test."""
    return {k: v for k, v in environ.items() if k not in {"MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES"}}


def make(*arguments: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    """``make ARGS`` in the project root, with this interpreter as PYTHON, outside any calling make."""
    return subprocess.run(["make", "--no-print-directory", "-s", f"PYTHON={sys.executable}", *arguments],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**outside_make(os.environ), **(env or {})})


def _docker_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _base_image_or_debootstrap() -> bool:
    """`make image` builds its Debian base with debootstrap unless that base is already built."""
    if shutil.which("debootstrap"):
        return True
    base = make("image-base").stdout.strip()
    try:
        return subprocess.run(["docker", "image", "inspect", base], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _test_models() -> bool:
    return any(MODELS.glob("smollm2/*.gguf"))


@dataclass(frozen=True)
class Tool:
    """Something a test needs that `make test` cannot pip-install, and how a person gets it."""

    name: str
    how: str
    present: Callable[[], bool]


TOOLS = {tool.name: tool for tool in (
    Tool("chromium", "apt-get install -y chromium (headless browser checks of the HTML pages)",
         lambda: bool(shutil.which("chromium") or shutil.which("chromium-browser"))),
    Tool("docker", "install Docker Engine and start it, so that `docker info` answers", _docker_answers),
    Tool("debootstrap", "apt-get install -y debootstrap (`make base-image` builds the image's base with it)",
         _base_image_or_debootstrap),
    Tool("models", "../shared/bin/fetch-test-models (real SmolLM2-135M and Qwen2.5-0.5B GGUF files)", _test_models),
)}
_FOUND: dict[str, bool] = {}


def required_tools() -> set[str]:
    listed = {name.strip() for name in os.environ.get("PRUNELAB_REQUIRE_TOOLS", "").split(",") if name.strip()}
    return set(TOOLS) if "all" in listed else listed


def require(name: str) -> None:
    """Skip the calling test (fail it, when PRUNELAB_REQUIRE_TOOLS names the tool) unless ``name`` is here."""
    tool = TOOLS[name]
    if name not in _FOUND:
        _FOUND[name] = tool.present()
    if _FOUND[name]:
        return
    message = f"needs {tool.name}: {tool.how}"
    if name in required_tools():
        pytest.fail(f"{message} (PRUNELAB_REQUIRE_TOOLS requires it here)", pytrace=False)
    pytest.skip(message)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(*tools): skip unless these system tools are here (tests/conftest.py TOOLS)")
    unknown = required_tools() - set(TOOLS)
    if unknown:
        raise pytest.UsageError(f"PRUNELAB_REQUIRE_TOOLS: unknown tool(s) {sorted(unknown)}; known: {sorted(TOOLS)}")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs"):
        for name in mark.args:
            require(name)


# The image takes minutes to build cold: the file that builds it goes first, so the other xdist
# worker runs the rest of the suite meanwhile; the Ray cluster file, which waits for that image, goes last.
FILE_ORDER = {"test_container_run.py": 0, "test_ray_cluster.py": 2}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: FILE_ORDER.get(item.path.name, 1))


def built_image() -> tuple[str, str]:
    """`make image` (warm: seconds to a minute; cold: see BENCHMARKS.md), once for all xdist workers.

    A file lock makes a second caller wait for the first build and then find it cached.
    Returns the tag and the image ID.
    """
    require("docker")
    require("debootstrap")
    lock_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"prunelab-image-{os.getuid()}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = make("image", timeout=3600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    tag = make("image-tag").stdout.strip()
    image_id = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", tag],
                              capture_output=True, text=True, check=True).stdout.strip()
    return tag, image_id


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


def random_model(config, seed: int = 0):
    """A float32 model of ``config`` with N(0, 0.2) matrices: larger than the default init, so predictions are not all ties."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model


def build_tiny_model(arch: str, path: Path, seed: int = 0) -> Path:
    """Save a tiny random model of ``arch`` with the real Qwen3 tokenizer into ``path``."""
    from transformers import AutoTokenizer

    model = random_model(tiny_config(arch), seed)
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


# ---------------------------------------------------------------------------- shared by several test modules
CALIBRATION_TEXT = DATA / "calibration" / "wikitext-2-valid.tokens.txt"
# MMLU-style prompts that share a few-shot prefix (the engine's prefix cache) and differ in length
PREFIX = "The following are multiple choice questions (with answers) about algebra.\n\n" + (
    "What is 2+2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: D\n\n" * 3
)
QUESTIONS = [PREFIX + f"Question {i}: is {'very ' * i}long?\nA. x\nB. y\nC. z\nD. w\nAnswer:" for i in range(6)]
SUBJECTS = ("abstract_algebra", "anatomy")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model gains nothing from threads on a busy machine


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls run on one thread: on a busy machine a second OpenMP thread mostly waits (here 40x slower).

    Modules of tiny-model tests use it for every test (``pytestmark = pytest.mark.usefixtures("one_thread")``).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> str:
    """The first 40 kB of WikiText-2 validation: enough calibration text for tiny models, fast to read."""
    path = tmp_path_factory.mktemp("calibration") / "wikitext-head.txt"
    path.write_text(CALIBRATION_TEXT.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """The shared data with MMLU cut to two subjects and WikiText-2 to its start: a study takes seconds."""
    root = tmp_path_factory.mktemp("data")
    for split in ("test", "dev"):
        (root / "mmlu" / split).mkdir(parents=True)
        for subject in SUBJECTS:
            shutil.copy(DATA / "mmlu" / split / f"{subject}_{split}.csv", root / "mmlu" / split)
    (root / "gsm8k").symlink_to(DATA / "gsm8k")
    (root / "wikitext-2").mkdir()  # the first 300 lines: tokenizing the whole test set takes seconds
    lines = (DATA / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "wikitext-2" / "wiki.test.raw").write_text("".join(lines[:300]), encoding="utf-8")
    return root


def study_text(model: Path, data: Path, *, strategies: str | None = None, evaluation: str = "") -> str:
    """A tiny study of ``model`` on ``data`` (two items per task); ``strategies`` replaces the default ones."""
    default = """
[[strategies]]
name = "drop-layers"
layers = [1, 3]

[[strategies]]
name = "magnitude"
sparsity = [50]
order = ["smallest"]
"""
    return f"""name = "tiny"
model = "{model}"
dtype = "float32"

[evaluation]
tasks = ["mmlu", "gsm8k", "wikitext"]
limit = 2
sample = "first"
seqlen = 64
max_new_tokens = 4
chunk_items = 1
data_dir = "{data}"
{evaluation}
{default if strategies is None else strategies}"""


def chunk_files(out: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "tiny" / ".work").rglob("*.parquet")}


def run_folder(out: Path) -> Path:
    (folder,) = [p for p in (out / "tiny").iterdir() if not p.name.startswith(".")]
    return folder


def sorted_items(folder: Path) -> pl.DataFrame:
    return pl.read_parquet(folder / "items.parquet").sort("variant", "task", "metric", "item_id")


def cli(capsys, *args: str) -> tuple[int, str]:
    """``prunelab ARGS`` in this process (no interpreter start-up): exit status and stderr."""
    from prunelab.cli import main

    capsys.readouterr()
    status = main(list(args))
    return status, capsys.readouterr().err


def make_identity(layer: torch.nn.Module) -> None:
    """Zero every Linear that writes into the residual stream (o_proj, down_proj): the layer returns its input."""
    with torch.no_grad():
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in {"o_proj", "down_proj"}:
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()


def install_example(example: Path, work: Path) -> str:
    """pip-install an example plugin (examples/...) into a private folder and return it (for PYTHONPATH).

    A copy is installed, so no build files land in the repository.
    """
    source = shutil.copytree(example, work / "src", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    return str(target)
