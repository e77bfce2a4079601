"""Load any decoder-only causal LM: a Hub id, a local Hugging Face folder, or a GGUF file.

GGUF files are dequantized once by transformers (slow: tens of seconds) and the result is cached
as safetensors keyed by the file's SHA-256, so every later load takes seconds. Device and dtype
are chosen for the machine (CUDA bf16; CPU float32 unless the CPU has native bf16) and can be
overridden; results always record which dtype produced them.
"""

from __future__ import annotations

import hashlib
import os
import pickle  # only for its error type: prunelab never unpickles
import re
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from prunelab.errors import FileProblem, PrunelabError
from prunelab.model.adapter import Adapter, adapt
from prunelab.readers import check_model_folder, read_gguf_header, reading, staging_folder, writing

DEFAULT_MODEL = "Qwen/Qwen3-0.6B"
#: weight files that are pickles: loading them means unpickling, which can run code (``--allow-pickle``)
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class LoadedModel:
    """A model ready to prune and score, with where it came from."""

    model: torch.nn.Module
    tokenizer: object
    adapter: Adapter
    source: str  # what the user asked for
    kind: str  # "hub", "dir" or "gguf"
    device: torch.device
    dtype: torch.dtype
    local_dir: Path | None = None  # the folder the weights were read from, when local

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AMX or AVX512-BF16), so bf16 is faster than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", flags))


def choose_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise PrunelabError(f"unknown device '{device}'") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise PrunelabError("device 'cuda' requested but no CUDA GPU is available")
    return chosen


def choose_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if dtype not in DTYPES:
        raise PrunelabError(f"unknown dtype '{dtype}' (choose auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def classify_source(spec: str) -> tuple[str, Path | None]:
    """Decide whether ``spec`` is a GGUF file, a local folder or a Hub id; missing paths are errors."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise PrunelabError(f"model file {spec} is not a .gguf file (pass a folder or a .gguf file)")
        return "gguf", path.resolve()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PrunelabError(f"model folder {spec} has no config.json (not a Hugging Face model folder)")
        return "dir", path.resolve()
    looks_like_path = spec.startswith(("/", "./", "../", "~")) or spec.lower().endswith(".gguf")
    if looks_like_path or not _HUB_ID.match(spec):
        raise PrunelabError(f"model not found: {spec} (no such file or folder)")
    return "hub", None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("PRUNELAB_CACHE", Path.home() / ".cache" / "prunelab"))


def gguf_to_folder(path: Path, *, trust_remote_code: bool = False) -> Path:
    """Dequantize a GGUF file once into a safetensors folder keyed by the file's hash; reuse it after.

    ``trust_remote_code`` is passed to transformers explicitly (a GGUF file carries no code, but the
    folder beside it may hold a config.json with an ``auto_map``): no prompt can ever appear.
    """
    target = cache_root() / "gguf" / file_sha256(path)[:32]
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    read_gguf_header(path)  # random bytes or a truncated file: one line, before transformers' traceback

    with staging_folder(target) as staging:  # and a conversion killed half-way is removed on the next
        # The header is whole; what transformers still rejects (an unsupported architecture, a tensor
        # type it cannot dequantize, missing metadata) is about this file's content.
        with warnings.catch_warnings(), reading(path, "cannot convert this GGUF file", extra=(KeyError, IndexError)):
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                         trust_remote_code=trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name,
                                                      trust_remote_code=trust_remote_code)
        # The weights are plain dequantized tensors now; drop the GGUF marker so they save normally.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with writing(target):
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            (staging / "source.txt").write_text(f"{path}\n")
            os.replace(staging, target)  # atomic: a half-written cache is never used
    return target


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load model and tokenizer, put them on the chosen device and dtype, and adapt the model.

    No code from the model's files runs unless asked: ``trust_remote_code`` is passed to every
    transformers call (so transformers never asks on a terminal), and weights are read from
    safetensors only unless ``allow_pickle`` (a pickle-only folder is refused before loading).
    """
    from transformers import AutoModelForCausalLM

    kind, path = classify_source(spec)
    chosen_device = choose_device(device)
    chosen_dtype = choose_dtype(dtype, chosen_device)
    local_dir = gguf_to_folder(path, trust_remote_code=trust_remote_code) if kind == "gguf" else path
    if local_dir is not None:
        # every JSON file and safetensors header, before any weight
        read_model_config(local_dir, trust_remote_code=trust_remote_code)
        if not allow_pickle:
            refuse_pickle_only(local_dir)
    where = str(local_dir) if local_dir is not None else spec
    tokenizer = load_tokenizer(where, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=chosen_dtype, trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
        )
    except (OSError, ValueError, pickle.UnpicklingError) as exc:  # --allow-pickle: torch's weights-only loader
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PrunelabError(f"could not load model '{spec}': {first}") from exc
    model.to(chosen_device).eval()
    return LoadedModel(model, tokenizer, adapt(model), spec, kind, chosen_device, chosen_dtype, local_dir)


def config_errors() -> tuple[type[BaseException], ...]:
    """What transformers' config classes raise on an ill-typed or missing field of a config file."""
    from huggingface_hub.errors import StrictDataclassError

    return (TypeError, LookupError, AttributeError, StrictDataclassError)


def read_model_config(folder: str | os.PathLike, *, trust_remote_code: bool = False):
    """The ``PretrainedConfig`` of a local model folder, after checking its files (``check_model_folder``).

    transformers builds the config from whatever config.json holds; an unknown ``model_type`` or a
    field of the wrong type surfaces as one of a few exception types, reported here against the file.
    A config whose class exists only as the folder's own code (``auto_map``, unknown ``model_type``)
    is refused unless ``trust_remote_code``.
    """
    from transformers import AutoConfig

    folder = Path(folder)
    config = check_model_folder(folder)
    if config.get("auto_map") and not trust_remote_code:
        from transformers import CONFIG_MAPPING

        if config["model_type"] not in CONFIG_MAPPING:
            raise FileProblem(folder / "config.json", "this model is defined by its own Python code (auto_map) "
                              "and model_type is not one transformers knows; prunelab runs a model's code only "
                              "with --trust-remote-code (do that only for code you trust)")
    with reading(folder / "config.json", "invalid model config", extra=config_errors()):
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)


def refuse_pickle_only(folder: Path) -> None:
    """A folder whose weights exist only as pickles (``pytorch_model.bin``) is refused: never unpickled."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
    if pickles:
        raise FileProblem(folder / pickles[0], "pickle weights, no safetensors: prunelab never unpickles (loading a "
                          "pickle can run code); convert the model to safetensors (e.g. save_pretrained with "
                          "safe_serialization in a sandbox you trust), or pass --allow-pickle (unsafe)")


def load_tokenizer(where: str, *, trust_remote_code: bool = False):
    """The tokenizer of a local folder or Hub id; a file it cannot parse is a ``FileProblem``.

    The ``tokenizers`` library reports a malformed tokenizer.json as a bare ``Exception`` (no
    subclass), so exactly that type is caught besides the usual families; any subclass is a bug.
    """
    from transformers import AutoTokenizer

    try:
        with reading(where, "could not load the tokenizer", extra=config_errors()):
            return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except Exception as exc:
        if type(exc) is not Exception:
            raise
        raise FileProblem(where, f"could not load the tokenizer: {' '.join(str(exc).split())[:200]}") from exc


@cache
def source_fingerprint(spec: str) -> str:
    """A short hash identifying the model's weights: the GGUF file, or a local folder's weight files."""
    kind, path = classify_source(spec)
    if kind == "gguf":
        return file_sha256(path)[:16]
    if kind == "dir":
        digest = hashlib.sha256()
        for file in sorted(path.glob("*")):
            if file.suffix in {".safetensors", ".bin", ".json"} and file.is_file():
                digest.update(file.name.encode())
                digest.update(file_sha256(file).encode())
        return digest.hexdigest()[:16]
    return f"hub:{spec}"
