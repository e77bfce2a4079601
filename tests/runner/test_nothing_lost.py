"""Nothing lost: a study whose disk fills up half-way keeps every finished chunk and says, in one line,
to run again; on resume, chunks damaged on disk are detected (checksum, or a file that no longer
parses) and computed again; the result equals an uninterrupted run item for item.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import polars as pl

from prunelab.runner.run import run_study
from prunelab.runner.studyfile import WORK, load_study
from prunelab.runner.workfolder import WorkFolder, checksum_path

from ..conftest import cli, run_folder, sorted_items, study_text

STRATEGIES = """
[[strategies]]
name = "drop-layers"
layers = [1]

[[strategies]]
name = "magnitude"
sparsity = [50]
"""
FINISHED_BEFORE_THE_DISK_FILLS = 7


def tiny_study(model, data) -> str:
    """test_runner's tiny study without GSM8K (generation is the slow part, and chunks are chunks)."""
    return study_text(model, data, strategies=STRATEGIES).replace(
        'tasks = ["mmlu", "gsm8k", "wikitext"]', 'tasks = ["mmlu", "wikitext"]')


def work_chunks(out) -> list:
    return sorted((out / "tiny" / WORK).rglob("*.parquet"))


def test_disk_full_then_damaged_chunks_then_resume_equals_uninterrupted(
        tiny_qwen3, small_data, tmp_path, capsys, monkeypatch, one_thread):  # noqa: F811 - fixtures
    study = tmp_path / "tiny.toml"
    study.write_text(tiny_study(tiny_qwen3, small_data))
    broken, whole = tmp_path / "broken", tmp_path / "whole"
    run_study(load_study(study), whole)

    # 1. the disk fills up while the 8th chunk is written
    real_write = pl.DataFrame.write_parquet
    writes = []

    def filling_disk(frame, file, *args, **kwargs):
        if len(writes) == FINISHED_BEFORE_THE_DISK_FILLS:
            with open(file, "wb") as partial:  # a half-written file, as a real full disk leaves it
                partial.write(b"PAR1")
            raise OSError(errno.ENOSPC, "No space left on device")
        writes.append(file)
        return real_write(frame, file, *args, **kwargs)

    monkeypatch.setattr(pl.DataFrame, "write_parquet", filling_disk)
    status, err = cli(capsys, "study", "run", str(study), "--out", str(broken))
    monkeypatch.undo()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "no space left on device" in lines[0] and "run the same command again to resume" in lines[0]
    work = WorkFolder(broken / "tiny" / WORK)
    kept = work_chunks(broken)
    assert len(kept) == FINISHED_BEFORE_THE_DISK_FILLS
    assert all(work.chunk_problem(path) is None for path in kept)
    assert not list(work.root.rglob("*.tmp")), "a failed write left a half file behind"
    plan = json.loads((work.root / "plan.json").read_text())
    total = len(plan["variants"]) * sum(len(r) for r in plan["chunks"].values())

    # 2. damage three finished chunks: a flipped byte, a truncated file, a lost checksum (still whole)
    flipped, truncated, unchecked = kept[0], kept[3], kept[5]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x40
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    checksum_path(unchecked).unlink()

    # 3. resume: the two damaged chunks are recomputed, the rest is kept, the result is the uninterrupted one
    status, err = cli(capsys, "study", "run", str(study), "--out", str(broken))
    assert status == 0, err
    assert "recomputing 2 damaged chunk(s)" in err
    assert f"resuming: {FINISHED_BEFORE_THE_DISK_FILLS - 2} of {total} items" in err
    assert sorted_items(run_folder(broken)).equals(sorted_items(run_folder(whole)))
    sessions = json.loads((run_folder(broken) / "manifest.json").read_text())["timings"]["sessions"]
    assert [s["chunks"] for s in sessions] == [FINISHED_BEFORE_THE_DISK_FILLS, total - FINISHED_BEFORE_THE_DISK_FILLS + 2]


def test_a_damaged_work_marker_is_one_line_and_keeps_the_chunks(tiny_qwen3, small_data, tmp_path, capsys):  # noqa: F811
    study = tmp_path / "tiny.toml"
    study.write_text(tiny_study(tiny_qwen3, small_data))
    work = tmp_path / "out" / "tiny" / WORK
    work.mkdir(parents=True)
    (work / "config.json").write_bytes(b'{"config_hash": "ab')
    (work / "keep.parquet").write_bytes(b"finished work")
    status, err = cli(capsys, "study", "run", str(study), "--out", str(tmp_path / "out"))
    assert status == 2 and len(err.strip().splitlines()) == 1 and str(work / "config.json") in err, err
    assert (work / "keep.parquet").read_bytes() == b"finished work"


# ---------------------------------------------------------------------- nothing left behind (issue 27 part 4)
KILLED_IN_STAGING = """
import os, signal, sys
from pathlib import Path
from prunelab.readers import staging_folder

with staging_folder(Path(sys.argv[1])) as staging:
    (staging / "model.safetensors").write_bytes(bytes(1 << 20))
    print(staging, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9 half-way: no finally runs
"""


def killed_staging(target) -> Path:
    """The staging folder a process killed -9 while assembling ``target`` leaves behind."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", KILLED_IN_STAGING, str(target)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == -9, result.stderr
    staging = Path(result.stdout.strip())
    assert staging.is_dir() and staging.parent == target.parent
    return staging


def test_a_prune_killed_while_saving_is_cleaned_by_the_next_and_a_live_ones_is_kept(tiny_qwen3, tmp_path, capsys):  # noqa: F811
    from prunelab.readers import staging_folder

    out = tmp_path / "models" / "dropped"
    left = killed_staging(out)
    with staging_folder(tmp_path / "models" / "busy") as busy:  # this process is alive: its folder stays
        status, err = cli(capsys, "prune", "--model", str(tiny_qwen3), "--method", "drop-layers", "--layers", "1",
                          "--out", str(out))
        assert status == 0, err
        assert not left.exists(), "the killed prune's staging folder is still there"
        assert busy.is_dir(), "a running process's staging folder was removed"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["dropped"]


def test_an_interrupted_prune_removes_its_staging_folder_at_exit(tiny_qwen3, tmp_path, capsys, monkeypatch):  # noqa: F811
    from prunelab.model import export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "build_recipe", interrupted)  # after the weights are written
    status, _ = cli(capsys, "prune", "--model", str(tiny_qwen3), "--method", "drop-layers", "--layers", "1",
                    "--out", str(tmp_path / "models" / "dropped"))
    assert status == 130
    assert list((tmp_path / "models").iterdir()) == []


def test_a_failed_run_write_leaves_no_partial_folder_and_a_killed_ones_is_swept(tmp_path, monkeypatch):
    import pytest

    from prunelab.report import artifacts

    from ..report.test_artifacts import MANIFEST, NOW, synthetic_items

    root = tmp_path / "artifacts"
    from prunelab.records import json_digest

    version = artifacts.version_id(json_digest(MANIFEST["config"]), "abc1234", NOW)
    left = killed_staging(root / "synthetic" / version)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(artifacts, "render_run", disk_full)
        with pytest.raises(OSError):
            artifacts.write_run(root, "synthetic", synthetic_items(), MANIFEST, now=NOW, commit="abc1234")
    assert list((root / "synthetic").iterdir()) == [], "a .partial run folder was left"
    assert not left.exists()
    run = artifacts.write_run(root, "synthetic", synthetic_items(), MANIFEST, now=NOW, commit="abc1234")
    assert [p.name for p in (root / "synthetic").iterdir()] == [run.name]
