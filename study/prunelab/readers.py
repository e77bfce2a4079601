"""Reading and writing the user's files: every way a file can be wrong ends as one ``FileProblem``.

Parsers report a bad file with their own exception types: the OS an ``OSError``, ``json`` and
``csv`` a ``ValueError`` or ``csv.Error``, the GGUF reader a ``ValueError`` or ``struct.error``,
safetensors a ``SafetensorError``, polars a ``PolarsError``, deep nesting a ``RecursionError``.
``reading`` turns exactly these families, raised while one named file is read, into a
``FileProblem`` that names the file; any other exception is a bug and keeps its traceback.

The checks here run before a model is loaded (a model folder's JSON files and safetensors
headers, a GGUF header, an output folder that can be created), so that a bad input costs
seconds, not a dequantization or an evaluation.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from prunelab.errors import FileProblem


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any], *, shared: bool = False) -> None:
    """``write(staging)`` then rename onto ``path``: a reader never sees half a file, a failed write leaves none.

    Nothing planted in the folder redirects the write: the staging file is created new (``O_EXCL``
    and ``O_NOFOLLOW``, after removing a leftover or a link of that name) and the rename replaces a
    link at ``path`` instead of writing through it. A failure names ``path`` (``writing``).
    ``shared``: several processes may write this same file at once (the same content, e.g. Ray
    workers): each stages under a name of its own, so none renames another's half-written file.
    """
    path = Path(path)
    tag = f".{os.getpid()}-{os.urandom(4).hex()}" if shared else ""
    staging = path.with_name(f".{path.name}{tag}.tmp")
    try:
        with writing(path):
            create_new(staging)
            write(staging)
            os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(OSError):
            staging.unlink(missing_ok=True)  # unlinks a link itself, never its target
        raise


def create_new(path: Path) -> None:
    """An empty regular file at ``path``, created here: a leftover (or a planted link) is removed first."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o666))


NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def open_no_follow(path: Path, flags: int) -> int:
    """``os.open`` that refuses a symbolic link at ``path`` (a lock or log file replaced by a link
    would truncate or append to the file it points at)."""
    try:
        return os.open(path, flags | NOFOLLOW, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (not NOFOLLOW and path.is_symlink()):
            raise FileProblem(path, LINK_REFUSED) from None
        raise


LINK_REFUSED = "is a symbolic link: prunelab never writes through a link in its own folders (remove it)"


def refuse_links(root: Path, path: Path) -> Path:
    """``path``, after checking that no folder or file from below ``root`` down to it is a symbolic link.

    ``root`` is the user's choice (an ``--out`` that is itself a link is fine); what lies inside is
    prunelab's, and a link planted there would send its writes elsewhere.
    """
    relative = Path(os.path.relpath(path, root))
    if relative.parts[:1] == ("..",) or relative.is_absolute():
        raise FileProblem(path, f"is outside {root}: refusing to write there")
    current = root
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            raise FileProblem(current, LINK_REFUSED)
    return path


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """A failed write names ``path``: the OS's errors from ``write()`` carry no file name (``File too
    large``, ``No space left on device``), and polars/pyarrow/safetensors report theirs in their own types.
    """
    from polars.exceptions import PolarsError
    from pyarrow import ArrowException
    from safetensors import SafetensorError

    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise
    except (PolarsError, ArrowException, SafetensorError) as exc:
        raise FileProblem(path, f"cannot write: {describe(exc)}") from exc


STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]*)\.(?P<pid>\d+)-[^.]+\.partial$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname())[:40]


@contextmanager
def staging_folder(target: Path) -> Iterator[Path]:
    """A new hidden folder beside ``target`` to assemble it in, then ``os.replace`` it onto ``target``.

    It is removed when the block ends (done, failed, Ctrl-C, SIGTERM), and one left by a process
    that was killed (its host and pid are in the name, ``.<target>.<host>.<pid>-XXXX.partial``) is
    removed by the next call for the same folder: a kill -9 leaves nothing for long.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_staging(target.parent)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{_host()}.{os.getpid()}-",
                                    suffix=".partial"))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is a normal folder
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def sweep_staging(parent: Path) -> list[Path]:
    """Remove the staging folders in ``parent`` whose process (on this host) is gone; returns them."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            found = STAGING.match(entry.name)
            if found and found["host"] == _host() and not _alive(int(found["pid"])) and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process: leave its folder
        return True
    return True

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
GGUF_MAX_DIMS = 4  # ggml tensors have at most four dimensions
# Declared counts are checked against these before anything is allocated (docs/errors.md, "bounds").
# No real model comes near: the deepest have ~130 decoder layers, the largest GGUF files a few
# thousand tensors and a few dozen metadata keys.
MAX_LAYERS = 1024
MAX_GGUF_TENSORS = 100_000
MAX_GGUF_METADATA = 10_000
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")  # what HF configs call the depth
MODEL_JSON_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "model.safetensors.index.json")


@cache
def parse_errors() -> tuple[type[BaseException], ...]:
    """The exception families parsers raise on bad bytes (imported on first use: the CLI starts fast)."""
    import yaml
    from polars.exceptions import PolarsError
    from pyarrow import ArrowException
    from safetensors import SafetensorError

    return (OSError, ValueError, struct.error, csv.Error, EOFError, zlib.error, yaml.YAMLError, SafetensorError,
            PolarsError, ArrowException, RecursionError)


def read_parquet(path: str | os.PathLike, what: str = "not a readable parquet file"):
    """A parquet file as a polars frame, parsed by pyarrow.

    polars' own reader can panic (an uncatchable-looking ``PanicException``, not an ``Exception``)
    on a damaged file; pyarrow reports the same damage as an ``ArrowException`` or ``OSError``.
    """
    import polars as pl
    import pyarrow.parquet as pq

    with reading(path, what):
        return pl.from_arrow(pq.read_table(path))


def describe(exc: BaseException) -> str:
    """What went wrong, in a few words: the OS's reason, or the parser's first line."""
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return "no space left on device"
        return (exc.strerror or str(exc) or type(exc).__name__).strip()
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte {exc.start})"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    text = " ".join(str(exc).split()) or type(exc).__name__  # YAML puts the position on a second line
    return text if len(text) <= 300 else text[:297] + "..."


@contextmanager
def reading(path: str | os.PathLike, what: str = "", extra: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn a parser's or the OS's complaint about ``path`` into ``FileProblem(path, what: reason)``.

    ``extra``: further exception types one particular reader is known to raise on bad bytes.
    """
    try:
        yield
    except (*parse_errors(), *extra) as exc:
        reason = describe(exc)
        raise FileProblem(path, f"{what}: {reason}" if what else reason) from exc


def read_utf8(path: str | os.PathLike, what: str = "cannot read") -> str:
    """A UTF-8 text file; bytes that are not UTF-8 are reported with their line (``file:line``)."""
    path = Path(path)
    with reading(path, what):
        data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise FileProblem(f"{path}:{line}", describe(exc)) from exc


def read_json(path: str | os.PathLike, what: str = "invalid JSON", kind: type = dict) -> Any:
    """A JSON file whose top level is a ``kind`` (an object by default)."""
    path = Path(path)
    text = read_utf8(path)
    with reading(path, what):
        value = json.loads(text)
    if not isinstance(value, kind):
        expected = "an object" if kind is dict else f"a {kind.__name__}"
        raise FileProblem(path, f"{what}: expected {expected}, found {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------- model files
class _Truncated(Exception):  # noqa: N818 - internal signal, reported as a FileProblem
    """The GGUF header claims more bytes than the file has."""


class _GGUFCursor:
    """Little-endian reads from a mapped GGUF file; a read past the end raises ``_Truncated``.

    Every count read from the file is checked against the bytes left before it is looped over,
    so a corrupt count fails at once instead of looping for a very long time.
    """

    SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    STRING, ARRAY = 8, 9

    def __init__(self, data) -> None:
        self.data, self.at = data, 0

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.at + size > len(self.data):
            raise _Truncated
        value = struct.unpack_from("<" + fmt, self.data, self.at)[0]
        self.at += size
        return value

    def count(self, least_bytes_each: int, what: str) -> int:
        n = self.take("Q")
        if n * least_bytes_each > len(self.data) - self.at:
            raise _Truncated(f"{what} count {n} does not fit in the file")
        return n

    def string(self) -> bytes:
        n = self.count(1, "string length")
        self.at += n
        return bytes(self.data[self.at - n:self.at])

    def value(self, kind: int, depth: int = 0):
        if kind in self.SCALARS:
            return self.take(self.SCALARS[kind])
        if kind == self.STRING:
            return self.string()
        if kind == self.ARRAY and depth < 4:
            item = self.take("I")
            if item in self.SCALARS:  # skip a numeric array in one step
                n = self.count(struct.calcsize(self.SCALARS[item]), "array")
                self.at += n * struct.calcsize(self.SCALARS[item])
                return None
            for _ in range(self.count(12 if item == self.ARRAY else 8, "array")):
                self.value(item, depth + 1)
            return None
        raise ValueError(f"unknown metadata value type {kind}")


def read_gguf_header(path: str | os.PathLike) -> dict[str, Any]:
    """Version, architecture and tensor count of a GGUF file, after checking that it is whole.

    Walks the metadata and tensor infos with bounds checks (the ``gguf`` package's reader parses
    every tokenizer string into numpy objects: ~10 s for a small model, and a truncated file gets a
    numpy message) and checks that every tensor's data lies inside the file.
    """
    import mmap

    from gguf import GGML_QUANT_SIZES

    path = Path(path)
    what = "not a valid GGUF file"
    with reading(path, what), open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise FileProblem(path, f"{what}: only {size} bytes")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            cursor = _GGUFCursor(data)
            if data[:4] != GGUF_MAGIC:
                raise FileProblem(path, f"{what}: it starts with {bytes(data[:4])!r}, not b'GGUF'")
            version = struct.unpack_from("<I", data, 4)[0]
            if version not in GGUF_VERSIONS:
                raise FileProblem(path, f"{what}: unsupported GGUF version {version}")
            cursor.at = 8
            try:
                tensor_count, kv_count = cursor.count(24, "tensor"), cursor.count(12, "metadata")
                for count, limit, what_count in ((tensor_count, MAX_GGUF_TENSORS, "tensors"),
                                                 (kv_count, MAX_GGUF_METADATA, "metadata keys")):
                    if count > limit:
                        raise FileProblem(path, f"{what}: the header declares {count} {what_count}, more than "
                                                f"prunelab's limit of {limit}")
                metadata = {}
                for _ in range(kv_count):
                    key = cursor.string().decode("utf-8")
                    if key in metadata:
                        raise FileProblem(path, f"{what}: metadata key {key!r} appears twice")
                    metadata[key] = cursor.value(cursor.take("I"))
                tensors, names = [], set()
                for _ in range(tensor_count):
                    name = cursor.string().decode("utf-8")
                    if name in names:
                        raise FileProblem(path, f"{what}: tensor {name!r} appears twice")
                    names.add(name)
                    n_dims = cursor.take("I")
                    if n_dims > GGUF_MAX_DIMS:
                        raise FileProblem(path, f"{what}: tensor {name} has {n_dims} dimensions")
                    dims = [cursor.take("Q") for _ in range(n_dims)]
                    tensors.append((name, dims, cursor.take("I"), cursor.take("Q")))
            except _Truncated as exc:
                raise FileProblem(path, f"{what}: truncated header{f' ({exc})' if str(exc) else ''}") from None
            alignment = metadata.get("general.alignment") or 32
            if not isinstance(alignment, int) or alignment <= 0:
                raise FileProblem(path, f"{what}: general.alignment is {alignment!r}")
            start = -(-cursor.at // alignment) * alignment
            for name, dims, kind, offset in tensors:
                known = [t for t in GGML_QUANT_SIZES if t.value == kind]
                if not known:
                    raise FileProblem(path, f"{what}: tensor {name} has unknown type {kind}")
                block, type_size = GGML_QUANT_SIZES[known[0]]
                if not dims or 0 in dims or dims[0] % block:
                    raise FileProblem(path, f"{what}: tensor {name} has shape {dims} (type {known[0].name})")
                elements = 1
                for dim in dims:
                    elements *= dim
                if start + offset + elements // block * type_size > size:
                    raise FileProblem(path, f"{what}: truncated (tensor {name} ends past the end of the file)")
    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, bytes) or not architecture:
        raise FileProblem(path, f"{what}: no general.architecture")
    layers = metadata.get(f"{architecture.decode('utf-8', errors='replace')}.block_count")
    check_layer_count(path, layers, "block_count")
    return {"version": version, "architecture": architecture.decode("utf-8", errors="replace"), "tensors": len(tensors)}


def check_layer_count(path: Path, layers: Any, key: str) -> None:
    """A declared number of decoder layers above ``MAX_LAYERS`` is refused before a model is built."""
    if isinstance(layers, int | float) and not isinstance(layers, bool) and layers > MAX_LAYERS:
        shown = layers if isinstance(layers, int) else f"{layers:g}"
        raise FileProblem(path, f"the model declares {key} = {shown} decoder layers, more than prunelab's "
                                f"limit of {MAX_LAYERS}")


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every tensor; safetensors checks the header and that data covers the file."""
    from safetensors import safe_open

    path = Path(path)
    with reading(path, "not a valid safetensors file"), safe_open(str(path), "pt") as f:
        return {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) for name in f.keys()}  # noqa: SIM118 - safe_open is not a dict


def check_model_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """A Hugging Face model folder's config (returned), its other JSON files and its safetensors headers.

    What transformers would report as an unrelated traceback (a truncated shard, a tokenizer.json
    that is not JSON) becomes one line naming the file, before any weight is read.
    """
    folder = Path(folder)
    config = read_json(folder / "config.json", "invalid model config")
    if not isinstance(config.get("model_type"), str):
        raise FileProblem(folder / "config.json", "invalid model config: no model_type string")
    for table in (config, config.get("text_config")):
        for key in LAYER_KEYS:
            if isinstance(table, dict):
                check_layer_count(folder / "config.json", table.get(key), key)
    for name in MODEL_JSON_FILES:
        if (folder / name).exists():
            read_json(folder / name, "invalid JSON")
    for shard in sorted(folder.glob("*.safetensors")):
        read_safetensors_header(shard)
    return config


# ---------------------------------------------------------------------------------------- outputs
def check_output_folder(path: str | os.PathLike, what: str = "--out") -> Path:
    """A folder that exists or can be created (no parent is a regular file), and is writable.

    Run before a model is loaded, so that a typo in ``--out`` does not cost an evaluation.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise FileProblem(path, f"{what} exists and is not a folder")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise FileProblem(path, f"{what} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FileProblem(path, f"{what} cannot be written: no permission in {existing}")
    return path


def check_output_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """A file path whose folder can be created and that is not itself a folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise FileProblem(path, f"{what} is a folder, expected a file name")
    check_output_folder(path.parent if str(path.parent) else Path("."), what)
    return path
