"""A Ray cluster of containers: a head and two workers from the project image on a private network.

The work folder lives on a volume every container mounts. The driver runs a small study on the
head (``--executor ray --address auto``); one worker container is stopped while it evaluates; the
study must finish on the remaining worker and give every item the result of a local run of the
same study in the same image. Skipped when ``docker info`` does not answer; the image is this
commit's (built when absent, once for every test file that needs it; ``PRUNELAB_IMAGE`` /
``make test IMAGE=...`` choose another tag).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import polars as pl
import pytest

from ..conftest import DATA, ROOT, SUBJECTS, built_image, require, study_text

DOCKER = os.environ.get("DOCKER", "docker")
VERSION = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]
IMAGE = os.environ.get("PRUNELAB_IMAGE", f"prunelab:{VERSION}")  # `make test` passes the Makefile's IMAGE
# more `docker run` arguments, e.g. to try a development tree mounted into a base image
EXTRA_RUN_ARGS = shlex.split(os.environ.get("PRUNELAB_CLUSTER_RUN_ARGS", ""))
WORKERS = ("worker-1", "worker-2")
COLUMNS = ["variant", "task", "metric", "item_id", "correct", "nll_sum", "tokens"]


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([DOCKER, *args], capture_output=True, text=True, check=check, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> str:
    """``PRUNELAB_IMAGE`` where it exists, else this commit's image, built once (conftest built_image).

    Skips (fails under PRUNELAB_REQUIRE_TOOLS=docker) when no Docker engine answers.
    """
    require("docker")
    if docker("image", "inspect", IMAGE, check=False).returncode == 0:
        return IMAGE
    return built_image()[0]


@pytest.fixture(scope="module")
def shared(image, tiny_qwen3, tmp_path_factory) -> Path:
    """The volume: the tiny model, a two-subject data folder and the study file (container paths)."""
    root = tmp_path_factory.mktemp("ray-cluster")
    shutil.copytree(tiny_qwen3, root / "model")
    for split in ("test", "dev"):
        (root / "data" / "mmlu" / split).mkdir(parents=True)
        for subject in SUBJECTS:
            shutil.copy(DATA / "mmlu" / split / f"{subject}_{split}.csv", root / "data" / "mmlu" / split)
    shutil.copytree(DATA / "gsm8k", root / "data" / "gsm8k")
    (root / "data" / "wikitext-2").mkdir()
    lines = (DATA / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "data" / "wikitext-2" / "wiki.test.raw").write_text("".join(lines[:300]), encoding="utf-8")
    text = study_text(Path("/shared/model"), Path("/shared/data"), evaluation="[evaluation.mmlu]\nlimit = 4\n")
    (root / "tiny.toml").write_text(text.replace('dtype = "float32"', 'dtype = "float32"\ndevice = "cpu"'))
    root.chmod(0o777)
    return root


@pytest.fixture(scope="module")
def cluster(image, shared):
    """Head (no CPUs for work: the driver runs there) and two 1-CPU workers on an internal network."""
    tag = f"prunelab-ray-test-{uuid.uuid4().hex[:8]}"
    names = {"head": f"{tag}-head", **{w: f"{tag}-{w}" for w in WORKERS}}
    docker("network", "create", "--internal", tag)  # no route out: the containers talk to each other only
    common = ["run", "-d", "--network", tag, "--user", f"{os.getuid()}:{os.getgid()}", "-e", "HOME=/tmp",
              "-e", "RAY_AUTH_MODE=disabled", "-e", "OMP_NUM_THREADS=1", "-e", "HF_HUB_OFFLINE=1",
              "-v", f"{shared}:/shared", "--shm-size=512m", "--entrypoint", "ray", *EXTRA_RUN_ARGS]
    try:
        docker(*common, "--name", names["head"], "--hostname", "head", image,
               "start", "--head", "--port=6379", "--num-cpus=0", "--include-dashboard=false", "--block")
        for worker in WORKERS:
            docker(*common, "--name", names[worker], image,
                   "start", f"--address={names['head']}:6379", "--num-cpus=1", "--block")
        wait_for_nodes(names["head"], 3)
        yield names
    finally:
        for name in names.values():
            docker("rm", "-f", name, check=False)
        docker("network", "rm", tag, check=False)


def wait_for_nodes(head: str, count: int, timeout: float = 180) -> None:
    code = "import ray; ray.init(address='auto', log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = docker("exec", head, "python", "-c", code, check=False, timeout=120)
        if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(2)
    raise AssertionError(f"the Ray cluster did not reach {count} nodes: {done.stderr[-1000:]}")


def prunelab_in(container: str, *args: str, detach: bool = False):
    command = [DOCKER, "exec", container, "prunelab", *args]
    if detach:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def items(out: Path) -> pl.DataFrame:
    run = next((out / "tiny").glob("*-*"))
    assert json.loads((run / "manifest.json").read_text())["config_hash"]
    return pl.read_parquet(run / "items.parquet").sort(COLUMNS[:4]).select(COLUMNS)


def test_cluster_survives_a_stopped_worker_and_equals_the_local_run(cluster, shared):
    local = prunelab_in(cluster["head"], "study", "run", "/shared/tiny.toml", "--out", "/shared/local")
    assert local.returncode == 0, local.stderr[-2000:]

    driver = prunelab_in(cluster["head"], "study", "run", "/shared/tiny.toml", "--out", "/shared/ray",
                         "--executor", "ray", "--address", "auto", "--workers", "2", detach=True)
    work = shared / "ray" / "tiny" / ".work"
    deadline = time.monotonic() + 600
    while len(list(work.rglob("*.parquet")) if work.is_dir() else []) < 4:
        assert driver.poll() is None, driver.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "no chunk written in time"
        time.sleep(0.1)
    docker("stop", "-t", "0", cluster["worker-1"])  # the whole node goes, mid-run
    _, stderr = driver.communicate(timeout=900)
    assert driver.returncode == 0, stderr[-2000:]
    assert "a Ray worker was lost" in stderr
    assert items(shared / "ray").equals(items(shared / "local"))
