# The prunelab study image. `make image` builds it, `make study` runs a study in it; docs/docker.md
# explains both ways to get a base image (a registry, or `make base-image` from Debian's packages).
#
# No `# syntax=` line on purpose: it makes BuildKit pull a frontend image, which fails without a
# registry. The file builds with BuildKit and with the legacy builder alike (no RUN --mount).
#
# Default base: NVIDIA's CUDA 13.0.1 "base" flavour on Ubuntu 24.04 (Python 3.12), pinned by the
# digest of the tag's multi-arch (amd64, arm64) index. torch 2.13.0's Linux x86_64 wheel is a CUDA
# 13.0 build that brings its own CUDA runtime, cuBLAS, cuDNN and NCCL as nvidia-* wheels (all
# hash-pinned in requirements.lock), so the slim "base" flavour is enough; it sets
# NVIDIA_REQUIRE_CUDA, so a host driver too old for CUDA 13.0 is refused when the container starts.
# The digest was taken from public projects that pin this tag (several agree); check it where a
# registry is reachable: docker buildx imagetools inspect nvidia/cuda:13.0.1-base-ubuntu24.04
# Without a registry: `make base-image` (debootstrap, Debian bookworm, Python 3.11) and
# `make image` builds on it with BASE_IMAGE=prunelab-base:bookworm PYTHON_VERSION=3.11.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04@sha256:f8ef28f579ea42a44b415d2c5d46f788e6a9b395c6c83f2929416e1fc192c143
ARG PYTHON_VERSION=3.12

# --- builder: the virtual environment, from the wheelhouse only ------------------------------------------
FROM ${BASE_IMAGE} AS builder
ARG PYTHON_VERSION
ENV DEBIAN_FRONTEND=noninteractive

# The base's own Python when it has one with venv (the Debian base does), else the distribution's.
# hadolint ignore=DL3008
RUN if ! "python${PYTHON_VERSION}" -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-venv" \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && "python${PYTHON_VERSION}" -m venv /opt/venv

# Dependencies first, from the lock alone, so that code changes do not reinstall torch. The wheels come
# from the wheelhouse that `make wheelhouse` fills on the host (pip inside a container may not reach or
# trust an index): --no-index, every file checked against the lock's sha256, nothing built from source.
# wheelhouse/py3.X/requirements.lock is requirements.lock without its comments.
COPY wheelhouse/py${PYTHON_VERSION} /tmp/wheelhouse
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-index --find-links /tmp/wheelhouse \
        --require-hashes --only-binary=:all: -r /tmp/wheelhouse/requirements.lock

# The code as a wheel, outside /opt/venv: a code change then leaves the environment's layer (torch, some
# GB) untouched in both stages. setuptools comes from the lock, so --no-build-isolation keeps the build
# free of anything unhashed.
COPY pyproject.toml README.md LICENSE /tmp/src/
COPY study /tmp/src/study
COPY plugins /tmp/src/plugins
RUN /opt/venv/bin/pip wheel --no-cache-dir --disable-pip-version-check --no-index --no-deps \
        --no-build-isolation --wheel-dir /tmp/dist /tmp/src

# --- the image: the base, its Python, the environment; no compiler, no pip cache, no wheels -------------
FROM ${BASE_IMAGE}
ARG BASE_IMAGE
ARG PYTHON_VERSION
ENV DEBIAN_FRONTEND=noninteractive

# hadolint ignore=DL3008
RUN if ! command -v "python${PYTHON_VERSION}" >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends "python${PYTHON_VERSION}" ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# A non-root user. Its uid defaults to 1000 (the first user on most Linux hosts, taking the place of
# the Ubuntu base's "ubuntu" user) so that results written to a bind-mounted artifacts folder belong
# to that user; `make study` runs with the caller's own uid instead. Caches (Hugging Face models and
# datasets, prunelab's GGUF cache) live in /cache, writable by any uid.
ARG APP_UID=1000
RUN if id -u ubuntu >/dev/null 2>&1; then userdel ubuntu && rm -rf /home/ubuntu; fi \
    && if getent group ubuntu >/dev/null; then groupdel ubuntu; fi \
    && groupadd --gid "${APP_UID}" prunelab \
    && useradd --uid "${APP_UID}" --gid "${APP_UID}" --no-create-home --home-dir /cache \
        --shell /usr/sbin/nologin prunelab \
    && mkdir -p /cache /app/artifacts \
    && chmod 1777 /cache /app/artifacts

COPY --from=builder /opt/venv /opt/venv
# Everything that does not depend on the code comes before it, so that a new commit rebuilds only the
# code's layers and the provenance below (each layer costs the legacy builder a container and a commit).
# The NVIDIA runtime refuses a driver too old for torch's CUDA 13.0 build at start-up (the CUDA base
# sets this too; the Debian base does not), and mounts the compute libraries.
ENV NVIDIA_REQUIRE_CUDA="cuda>=13.0" \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/cache \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    PRUNELAB_CACHE=/cache/prunelab
WORKDIR /app
ENTRYPOINT ["prunelab"]
CMD ["study", "run", "studies/seed.toml"]

COPY --from=builder /tmp/dist /tmp/dist
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-index --no-deps /tmp/dist/*.whl \
    && rm -rf /tmp/dist
COPY studies ./studies
USER ${APP_UID}:${APP_UID}

# Provenance for the run manifest (prunelab.report.artifacts.container_provenance): the commit the image was
# built from (read when there is no git checkout), its tag, and the base image's reference and ID.
# The image's own ID cannot be known inside it: `make study` passes it as PRUNELAB_CONTAINER_IMAGE.
# Last, so that a new commit rebuilds only these two layers.
ARG IMAGE_TAG=prunelab:dev
ARG GIT_COMMIT=unknown
ARG BASE_IMAGE_ID=unknown
LABEL org.opencontainers.image.title="prunelab" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      org.opencontainers.image.base.digest="${BASE_IMAGE_ID}"
ENV PRUNELAB_IMAGE_TAG=${IMAGE_TAG} \
    PRUNELAB_BASE_IMAGE=${BASE_IMAGE} \
    PRUNELAB_BASE_IMAGE_ID=${BASE_IMAGE_ID} \
    PRUNELAB_GIT_COMMIT=${GIT_COMMIT}
