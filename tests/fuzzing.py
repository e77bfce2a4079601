"""Shared pieces of the fuzz suite (tests/*/test_fuzz_*.py): budgets, the reader contract, byte mutations.

Budgets are hypothesis profiles chosen by ``PRUNELAB_FUZZ``: ``ci`` (default: a few dozen examples
per reader, derandomized so CI is repeatable, seconds in all) and ``long`` (``make fuzz``: thousands
of random examples per reader). Every example's input is bounded in size and every reader call has
a deadline, so a hang or a blow-up fails the test instead of stalling it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from prunelab.errors import PrunelabError

SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=int(os.environ.get("PRUNELAB_FUZZ_EXAMPLES", 25)), deadline=5000,
                          derandomize=True, suppress_health_check=SLOW_OK, database=None)
settings.register_profile("long", max_examples=int(os.environ.get("PRUNELAB_FUZZ_EXAMPLES", 1000)), deadline=10000,
                          suppress_health_check=SLOW_OK, print_blob=True)
settings.load_profile(os.environ.get("PRUNELAB_FUZZ", "ci"))


@contextmanager
def scratch() -> Iterator[Path]:
    """A fresh folder per example (pytest's tmp_path is one per test, shared by all its examples)."""
    with tempfile.TemporaryDirectory(prefix="prunelab-fuzz-") as folder:
        yield Path(folder)


def honours_contract(read: Callable[[], Any], *names: str | os.PathLike) -> Any:
    """Call a reader: it returns a value, or raises ``PrunelabError`` naming one of ``names``.

    Any other exception propagates (hypothesis reports it with the input that caused it). Returns
    the value, or None after an error.
    """
    try:
        return read()
    except PrunelabError as exc:
        message = str(exc)
        assert any(Path(name).name in message for name in names), f"error does not name the file: {message!r}"
        assert message.strip(), "empty error message"
        return None


# ------------------------------------------------------------------------------------ strategies
json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)


@st.composite
def mutated(draw, original: bytes, max_edits: int = 4) -> bytes:
    """``original`` truncated, with bytes overwritten, inserted or deleted: what a bad disk or download does."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, max_edits))):
        kind = draw(st.sampled_from(["truncate", "flip", "overwrite8", "insert", "delete"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "truncate":
            del data[at:]
        elif kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "overwrite8":  # a length or count field replaced by any 64-bit value
            data[at:at + 8] = draw(st.binary(min_size=8, max_size=8))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif data:
            del data[at:at + draw(st.integers(1, 16))]
    return bytes(data)


def bytes_like(original: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, or mutations of a valid file (most bugs hide just past a valid prefix)."""
    return st.binary(max_size=512) | mutated(original)
