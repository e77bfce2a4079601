"""The study image built and run for real, plus the cheap checks around it.

Without a Docker engine the image tests skip; the preflight failures, the lock stamp and the
provenance fallbacks run everywhere. With an engine (this project's machines and CI) `make image`
builds the image on the Debian base made by `make base-image` (no registry), reusing layers and the
wheelhouse, and `make study GPUS=` runs studies/smoke.toml in it on the CPU as the calling user with
models and data mounted read-only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prunelab import versions
from prunelab.report import artifacts
from tests.conftest import MODELS, SHARED, built_image, make, require
from tests.report.test_artifacts import render

ROOT = Path(__file__).resolve().parents[1]
DATA = SHARED / "data"


# --- Failure paths: one line, exit status 2, before any build ---------------------------------------


def reason(done: subprocess.CompletedProcess) -> str:
    """The preflight's own line (make adds its '*** Error' line after it)."""
    lines = [line for line in done.stderr.splitlines() if not line.startswith("make: ***")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_study_outside_studies_is_refused_before_the_build():
    done = make("study", "GPUS=", "STUDY=/tmp/elsewhere.toml", "DOCKER=true")
    assert done.returncode != 0
    assert "not under studies/" in reason(done)
    assert "docker build" not in done.stdout


def test_study_that_climbs_out_of_studies_is_refused():
    done = make("preflight", "GPUS=", "STUDY=studies/../README.md", "DOCKER=true")
    assert done.returncode != 0 and "leaves studies/" in reason(done)


def test_missing_study_file_is_refused():
    done = make("preflight", "GPUS=", "STUDY=studies/no-such-study.toml", "DOCKER=true")
    assert done.returncode != 0 and "no such file" in reason(done)


def test_no_daemon_is_refused_in_one_line():
    done = make("image", "DOCKER=false")
    assert done.returncode != 0
    assert "no Docker daemon answers" in reason(done)


def test_gpus_without_an_nvidia_runtime_says_what_to_install(tmp_path):
    # A docker that answers but lists no nvidia runtime, and a PATH without nvidia-container-cli.
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\n[ \"$1\" = info ] && [ -n \"$3\" ] && echo '{\"runc\":{}}'\nexit 0\n")
    fake.chmod(0o755)
    done = make("preflight", "GPUS=all", "STUDY=studies/smoke.toml", f"DOCKER={fake}",
                env={"PATH": f"/usr/bin:/bin:{Path(sys.executable).parent}"})
    assert done.returncode != 0
    line = reason(done)
    assert "nvidia-container-toolkit" in line and "580.65.06" in line and "GPUS=" in line


def test_stale_lock_is_refused(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text((ROOT / "requirements.lock").read_text())
    flags = "--extra ray"
    assert subprocess.run([sys.executable, "docker/lock.py", "stamp", str(lock), "torch==2.13.0", flags],
                          cwd=ROOT).returncode == 0
    check = [sys.executable, "docker/lock.py", "check", str(lock)]
    assert subprocess.run([*check, "torch==2.13.0", flags], cwd=ROOT).returncode == 0
    stale = subprocess.run([*check, "torch==2.14.0", flags], cwd=ROOT, capture_output=True, text=True)
    assert stale.returncode == 2 and "stale" in stale.stderr and len(stale.stderr.splitlines()) == 1


def test_committed_lock_matches_its_inputs():
    done = make("preflight", "GPUS=", "STUDY=studies/smoke.toml", "DOCKER=true")
    assert done.returncode == 0, done.stderr


def test_make_lock_would_not_change_the_lock():
    """Re-resolves against PyPI (uv, a few seconds); skips when PyPI cannot be reached."""
    done = make("lock-check", timeout=600)
    if done.returncode != 0 and "stale" not in done.stderr:
        pytest.skip(f"could not re-resolve the lock (offline?): {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stderr


# --- Provenance without a checkout ------------------------------------------------------------------


def test_git_commit_outside_a_checkout_reads_the_baked_commit(tmp_path, monkeypatch):
    monkeypatch.setenv(versions.GIT_COMMIT_ENV, "abc1234+dirty")
    assert versions.git_commit(tmp_path) == "abc1234+dirty"
    monkeypatch.setenv(versions.GIT_COMMIT_ENV, "unknown")
    assert versions.git_commit(tmp_path) is None
    monkeypatch.delenv(versions.GIT_COMMIT_ENV)
    assert versions.git_commit(tmp_path) is None


def test_git_commit_in_a_checkout_ignores_the_baked_commit(monkeypatch):
    monkeypatch.setenv(versions.GIT_COMMIT_ENV, "0000000")
    head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert versions.git_commit(ROOT).split("+")[0] == head


def test_container_provenance_reads_the_image_environment(monkeypatch):
    monkeypatch.setenv("PRUNELAB_IMAGE_TAG", "prunelab:0.1.0-abc1234")
    monkeypatch.setenv("PRUNELAB_BASE_IMAGE", "prunelab-base:bookworm")
    monkeypatch.setenv("PRUNELAB_BASE_IMAGE_ID", "unknown")
    assert artifacts.container_provenance() == {"image_tag": "prunelab:0.1.0-abc1234",
                                                "base_image": "prunelab-base:bookworm"}


# --- The image, built and run -----------------------------------------------------------------------

needs_docker = pytest.mark.needs("docker")


def expected_commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.strip()
    return f"{head}+dirty" if dirty else head


@pytest.fixture(scope="module")
def image() -> tuple[str, str]:
    """The project image for this commit, built once (tests/conftest.py built_image); tag and ID."""
    return built_image()


def in_image(tag: str, *command: str, entrypoint: str | None = None) -> subprocess.CompletedProcess:
    user = f"{os.getuid()}:{os.getgid()}"
    return subprocess.run(["docker", "run", "--rm", "--network", "none", "--user", user,
                           *(["--entrypoint", entrypoint] if entrypoint else []), tag, *command],
                          capture_output=True, text=True, timeout=300)


@needs_docker
@pytest.mark.slow
def test_image_tag_names_version_and_commit(image):
    tag, image_id = image
    version = next(line.split('"')[1] for line in (ROOT / "pyproject.toml").read_text().splitlines()
                   if line.startswith("version = "))
    assert tag == f"prunelab:{version}-{expected_commit().replace('+', '-')}"
    assert image_id.startswith("sha256:")


@needs_docker
@pytest.mark.slow
def test_plugins_are_listed_inside_the_image(image):
    done = in_image(image[0], "plugins")
    assert done.returncode == 0, done.stderr
    for name in ("mmlu", "gsm8k", "wikitext", "wanda", "magnitude", "drop-layers"):
        assert name in done.stdout, f"plugin {name} missing in the image: {done.stdout}"


@needs_docker
@pytest.mark.slow
def test_image_runs_as_non_root_and_carries_no_compiler(image):
    configured = subprocess.run(["docker", "image", "inspect", "--format", "{{.Config.User}}", image[0]],
                                capture_output=True, text=True, check=True).stdout.strip()
    assert configured and configured.split(":")[0] not in {"", "0", "root"}, configured
    default_user = subprocess.run(["docker", "run", "--rm", "--entrypoint", "id", image[0], "-u"],
                                  capture_output=True, text=True, timeout=120)
    assert default_user.stdout.strip() not in {"", "0"}, default_user
    compilers = in_image(image[0], "-c", "for c in gcc cc c++ g++ clang tcc; do command -v $c; done; true",
                         entrypoint="sh")
    assert compilers.returncode == 0 and compilers.stdout.strip() == "", f"compilers found: {compilers.stdout}"
    ray = in_image(image[0], "-c", "import ray, prunelab; print(ray.__version__)", entrypoint="python")
    assert ray.returncode == 0, ray.stderr  # the ray extra is in the image (cluster tests use it)


@needs_docker
@pytest.mark.slow
@pytest.mark.needs("models")
# About 6 minutes on an idle 2-core machine (BENCHMARKS.md, "The study image"); PRUNELAB_CONTAINER_SMOKE=0 skips it.
@pytest.mark.skipif(os.environ.get("PRUNELAB_CONTAINER_SMOKE") == "0",
                    reason="PRUNELAB_CONTAINER_SMOKE=0: the smoke study inside the image is skipped")
def test_smoke_study_runs_in_the_container_as_the_caller(image, tmp_path):
    tag, image_id = image
    out = tmp_path / "artifacts"
    done = make("study", "GPUS=", "STUDY=studies/smoke.toml", f"ARTIFACTS={out}", f"MODELS={MODELS}",
                f"DATA={DATA}", "DOCKER_RUN_ARGS=--network none", timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    (run,) = [p for p in (out / "smoke").iterdir() if not p.name.startswith(".")]
    for path in [out, *out.rglob("*")]:
        stat = path.stat()
        assert (stat.st_uid, stat.st_gid) == (os.getuid(), os.getgid()), f"{path} is not the caller's"

    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["git_commit"] == expected_commit()
    assert run.name.split("-")[1] == expected_commit()[:7]  # not "nogit"
    assert manifest["container_image"] == image_id and image_id.startswith("sha256:")
    assert manifest["image_tag"] == tag
    base_id = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}",
                              make("image-base").stdout.strip()], capture_output=True, text=True,
                             check=True).stdout.strip()
    assert manifest["base_image_id"] == base_id and base_id.startswith("sha256:")

    require("chromium")
    for page in (run / "report.html", out / "index.html"):
        dom, console = render(page, tmp_path / f"profile-{page.stem}")
        charts = page.read_text().count('<div class="chart" id=')
        assert charts >= 1, page
        assert f'data-charts-rendered="{charts}"' in dom and 'data-charts-failed="0"' in dom, page
        assert console == [], f"{page.name} logged to the console: {console}"
