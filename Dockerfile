# syntax=docker/dockerfile:1
# cxrsynth service image: ONNX Runtime on CUDA, no torch.
#
#   docker build -t cxrsynth:0.1.0 .                                        # bundle mounted at run time
#   docker run --gpus all -p 3000:3000 -v /path/to/bundle:/models/bundle:ro cxrsynth:0.1.0
#   docker build --target baked --build-arg BUNDLE_DIR=runs/demo/bundle -t cxrsynth:0.1.0-demo .
#
# onnxruntime-gpu 1.22 on PyPI is built for CUDA 12.x with cuDNN 9, so the base is CUDA 12.8 with
# cuDNN 9 (CUDA minor-version compatibility covers 12.x). Upgrade ORT_GPU and CUDA_IMAGE together.
# A CPU-only image for development: --build-arg ORT_PACKAGE=onnxruntime==1.22.0 --build-arg
# CUDA_IMAGE=ubuntu:24.04 (the service falls back to the CPU execution provider).

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---- build: a virtual environment with the project and its serving dependencies ----------------
FROM ${CUDA_IMAGE} AS build
ARG ORT_PACKAGE=onnxruntime-gpu==1.22.0
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
# The `serve` extra minus the CPU onnxruntime, plus the CUDA build: everything the service imports.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-deps . \
    && /opt/venv/bin/pip install "bentoml>=1.4,<1.5" "boto3>=1.34" "prometheus-client>=0.19" \
       "pydantic>=2.6" "pydantic-settings>=2.3" "pydicom>=3" "scikit-learn>=1.3" "numpy>=1.26" "pillow>=10.1" \
       "tqdm>=4.66" "${ORT_PACKAGE}" \
    && /opt/venv/bin/python -c "import bentoml, onnxruntime, boto3, sklearn.neighbors, service.archive, service.nearcopy, service.lco as lco; lco.adam_graph_bytes()" \
    && ! /opt/venv/bin/python -c "import torch" 2>/dev/null

# ---- runtime: the CUDA runtime libraries, the venv, a non-root user -------------------------------
FROM ${CUDA_IMAGE} AS runtime-base
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin cxrsynth
COPY --from=build /opt/venv /opt/venv
# BentoML and Prometheus write only under /tmp, so the root file system can be mounted read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    BENTOML_HOME=/tmp/bentoml \
    CXRSYNTH_BUNDLE=/models/bundle \
    CXRSYNTH_GPUS=1
WORKDIR /opt/cxrsynth
USER 10001:10001
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/livez', timeout=4)"]
ENTRYPOINT ["bentoml", "serve", "service.service:CXRSynth"]
CMD ["--host", "0.0.0.0", "--port", "3000"]

# ---- baked: the bundle inside the image ------------------------------------------------------------
FROM runtime-base AS baked
ARG BUNDLE_DIR=bundle
COPY --chown=10001:10001 ${BUNDLE_DIR} /models/bundle

# ---- runtime (default): the bundle is mounted at /models/bundle ------------------------------------
FROM runtime-base AS runtime
