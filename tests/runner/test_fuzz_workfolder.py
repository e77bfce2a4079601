"""Fuzz the files of a run's work folder: config.json (the configuration marker), plan.json, the
chunk parquet files with their checksums, and the event log. A damaged marker is a PrunelabError
naming it; a damaged plan is made again (None); a damaged chunk is never trusted; the log skips
what it cannot read.
"""

from __future__ import annotations

import json

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from prunelab.errors import FileProblem
from prunelab.plugin import MetricSpec, TaskResult
from prunelab.runner.chunks import Chunk, item_rows
from prunelab.runner.run import prune_reports, timings
from prunelab.runner.variants import Variant
from prunelab.runner.workfolder import WorkFolder, checksum_path

from ..fuzzing import bytes_like, honours_contract, json_values, mutated, scratch

VARIANT = Variant("magnitude[sparsity=50]", "magnitude", {"sparsity": 50})


def chunk_frame() -> pl.DataFrame:
    records = [{"item_id": f"virology/{i}", "prediction": "ABCD"[i % 4], "target": "A", "correct": i % 4 == 0,
                "loglikelihoods": [-1.0 - i, -2.0, -3.0, -4.0]} for i in range(3)]
    return item_rows(VARIANT, "mmlu", TaskResult("mmlu", {"n": 3, "acc": 1 / 3}, records),
                     (MetricSpec("acc", "accuracy", "correct"),))


FRAME = chunk_frame()
with scratch() as _folder:
    WorkFolder(_folder).write_chunk(_folder / "c.parquet", FRAME)
    CHUNK = (_folder / "c.parquet").read_bytes()
    CONFIG = json.dumps({"config_hash": "ab" * 32, "config": {"study": "s"}}).encode()
    PLAN = json.dumps({"variants": [{"name": "dense", "strategy": "dense", "params": {}},
                                    {"name": VARIANT.name, "strategy": VARIANT.strategy, "params": VARIANT.params}],
                       "chunks": {"mmlu": [[0, 2], [2, 3]], "wikitext": [[0, 1]]}}).encode()


@given(bytes_like(CHUNK), st.booleans(), st.none() | st.binary(max_size=80))
def test_fuzz_chunk_is_trusted_only_when_whole(data, with_checksum, checksum):
    with scratch() as root:
        work = WorkFolder(root)
        path = work.chunk(Chunk(VARIANT, "mmlu", 0, 0, 2))
        work.write_chunk(path, FRAME)
        path.write_bytes(data)
        if checksum is not None and with_checksum:  # a damaged checksum file: the chunk is not trusted
            checksum_path(path).write_bytes(checksum)
            data = None
        if not with_checksum:  # a chunk written before checksums existed: its schema is checked
            checksum_path(path).unlink()
        frame = honours_contract(lambda: work.read_chunk(path), path)
        if frame is not None:
            assert frame.schema == FRAME.schema or not with_checksum
            if with_checksum:
                assert data == CHUNK and frame.equals(FRAME)  # never a changed file, never a broken checksum
        trusted = work.finished_chunk(path)
        assert trusted == (frame is not None)
        if not trusted:  # moved aside, so the resumed run computes it again
            assert not path.exists() and path.with_name(path.name + ".damaged").exists()


def test_a_flipped_byte_is_caught_by_the_checksum():
    with scratch() as root:
        work = WorkFolder(root)
        path = work.chunk(Chunk(VARIANT, "mmlu", 0, 0, 2))
        work.write_chunk(path, FRAME)
        assert work.chunk_problem(path) is None and work.read_chunk(path).equals(FRAME)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        assert work.chunk_problem(path) == "checksum mismatch"
        with pytest.raises(FileProblem, match="damaged chunk"):
            work.read_chunk(path)


@given(bytes_like(CONFIG) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_work_config_marker(data):
    with scratch() as root:
        (root / "config.json").write_bytes(data)
        found = honours_contract(lambda: WorkFolder(root).config_hash(), root / "config.json")
        assert found is None or isinstance(found, str)


@given(st.one_of(mutated(PLAN), json_values.map(lambda v: json.dumps(v).encode()), st.builds(
    lambda variants, chunks: json.dumps({"variants": variants, "chunks": chunks}).encode(),
    st.lists(json_values, max_size=3), json_values)))
def test_fuzz_plan(data):
    with scratch() as root:
        (root / "plan.json").write_bytes(data)
        plan = WorkFolder(root).load_plan()  # damaged: None, and the plan is made again
        if plan is not None:
            assert all(isinstance(v, Variant) and isinstance(v.params, dict) for v in plan.variants)
            assert all(isinstance(a, int) and isinstance(b, int) for ranges in plan.chunks.values() for a, b in ranges)
            assert all(chunk.size == chunk.stop - chunk.start for chunk in plan.every_chunk())


EVENTS = [{"event": "chunk", "variant": "dense", "task": "mmlu", "chunk": 0, "items": 2, "seconds": 0.5, "session": "a"},
          {"event": "prune", "variant": "m", "seconds": 1.0, "report": {}}, {"event": "load", "seconds": 2.0}]
event_lines = st.sampled_from(EVENTS).flatmap(lambda e: st.dictionaries(st.sampled_from(sorted(e)), json_values).map(
    lambda changes: json.dumps({**e, **changes}).encode()))


@given(st.lists(st.binary(max_size=40) | json_values.map(json.dumps).map(str.encode) | event_lines, max_size=6))
def test_fuzz_event_log(lines):
    with scratch() as root:
        (root / "log.jsonl").write_bytes(b"\n".join(lines))
        events = WorkFolder(root).events()
        assert all(isinstance(e, dict) for e in events)
        timings(events, 0.0)
        prune_reports(events)


# ---------------------------------------------------------------------- planted links (issue 27 part 2)
WORK_ENTRIES = ["config.json", "plan.json", "lock", "log.jsonl", "reference", "reference/wikitext-0000.safetensors",
                "v-1234abcd", "v-1234abcd/mmlu-0000.parquet", "v-1234abcd/mmlu-0000.parquet.sha256",
                "v-1234abcd/bench.json"]


@given(st.sets(st.sampled_from(WORK_ENTRIES), min_size=1, max_size=4), st.booleans())
def test_fuzz_links_in_a_work_folder_are_refused_before_anything_is_written(linked, to_a_folder):
    """Whichever entries of a work folder are links (to a file or a folder outside): every use of the
    folder (``config_hash``, ``claim``) refuses with one line naming a link, and nothing outside changes."""
    with scratch() as base:
        root = base / "out" / "study" / ".work"
        (root / "v-1234abcd").mkdir(parents=True)
        (root / "reference").mkdir()
        outside = base / "outside"
        outside.mkdir()
        (outside / "victim").write_text("precious")
        for name in sorted(linked, key=len, reverse=True):  # deepest first: a linked folder hides its entries
            path = root / name
            if path.is_dir() and not path.is_symlink():
                for child in sorted(path.iterdir()):
                    child.unlink()
                path.rmdir()
            elif path.exists():
                path.unlink()
            if path.parent.is_dir() and not path.parent.is_symlink():
                path.symlink_to(outside if to_a_folder else outside / "victim")
        links = [str(root / name) for name in linked if (root / name).is_symlink()]
        work = WorkFolder(root)
        for use in (work.config_hash, lambda: work.claim({"study": "study"}, "d" * 64)):
            with pytest.raises(FileProblem, match="is a symbolic link") as error:
                use()
            assert str(error.value.path) in links
        assert sorted(p.name for p in outside.iterdir()) == ["victim"] and (outside / "victim").read_text() == "precious"
