# syntax=docker/dockerfile:1
# The prunelab study image. `make study` builds it and runs studies/seed.toml in it; docs/docker.md
# explains building, running and the GPU requirements.
#
# Base image: NVIDIA's CUDA 13.0.1 "base" flavour on Ubuntu 24.04, pinned by the digest of the tag's
# multi-arch (amd64, arm64) index. torch 2.13.0's Linux x86_64 wheel is a CUDA 13.0 build that brings
# its own CUDA runtime, cuBLAS, cuDNN and NCCL as nvidia-* wheels (all hash-pinned in
# requirements.lock), so the slim "base" flavour is enough and nothing is installed twice; it still
# sets NVIDIA_REQUIRE_CUDA, so a host driver too old for CUDA 13.0 is refused when the container
# starts instead of failing deep inside torch.
# Where the digest came from: the development machines cannot reach the image registry, so it was
# taken from public projects that pin this same tag by digest (several independent ones agree, one
# listing it as the amd64+arm64 index). Check it on a machine with registry access:
#   docker buildx imagetools inspect nvidia/cuda:13.0.1-base-ubuntu24.04
ARG BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04@sha256:f8ef28f579ea42a44b415d2c5d46f788e6a9b395c6c83f2929416e1fc192c143
FROM ${BASE_IMAGE}
ARG BASE_IMAGE

ENV DEBIAN_FRONTEND=noninteractive

# Ubuntu's own Python 3.12, the interpreter requirements.lock is resolved for (`make lock`), in a
# virtual environment. apt packages follow Ubuntu's security updates on top of the pinned base;
# everything Python is pinned by version and hash.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# Dependencies first, from the lock alone, so that code changes do not reinstall torch. Wheels only:
# building an sdist would pull unhashed build requirements.
COPY requirements.lock /tmp/requirements.lock
RUN pip install --no-cache-dir --require-hashes --only-binary=:all: -r /tmp/requirements.lock \
    && rm /tmp/requirements.lock

# The code, without touching the dependencies. setuptools comes from the lock (torch needs it), so
# --no-build-isolation keeps the build free of anything unhashed.
COPY pyproject.toml README.md /tmp/src/
COPY study /tmp/src/study
COPY plugins /tmp/src/plugins
RUN pip install --no-cache-dir --no-deps --no-build-isolation /tmp/src \
    && rm -rf /tmp/src

# A non-root user. Its uid defaults to 1000 (the first user on most Linux hosts, taking the place of
# the base image's "ubuntu" user) so that results written to a bind-mounted artifacts folder belong
# to that user; `make study` runs with the caller's own uid instead. Caches (Hugging Face models and
# datasets, prunelab's GGUF cache) live in /cache, writable by any uid, a volume in `make study`.
ARG APP_UID=1000
RUN if id -u ubuntu >/dev/null 2>&1; then userdel ubuntu && rm -rf /home/ubuntu; fi \
    && if getent group ubuntu >/dev/null; then groupdel ubuntu; fi \
    && groupadd --gid "${APP_UID}" prunelab \
    && useradd --uid "${APP_UID}" --gid "${APP_UID}" --no-create-home --home-dir /cache \
        --shell /usr/sbin/nologin prunelab \
    && mkdir -p /cache /app/artifacts \
    && chmod 1777 /cache \
    && chown prunelab:prunelab /app/artifacts
ENV HOME=/cache \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    PRUNELAB_CACHE=/cache/prunelab

WORKDIR /app
COPY studies ./studies

# Provenance for the run manifest: which image, on which base, from which commit.
ARG IMAGE_TAG=prunelab:dev
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="prunelab" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
ENV PRUNELAB_CONTAINER_IMAGE=${IMAGE_TAG} \
    PRUNELAB_BASE_IMAGE=${BASE_IMAGE} \
    PRUNELAB_GIT_COMMIT=${GIT_COMMIT}

USER ${APP_UID}:${APP_UID}
ENTRYPOINT ["prunelab"]
CMD ["study", "run", "studies/seed.toml"]
