# syntax=docker/dockerfile:1
# medssl DICOM gateway (medssl-serve): C-STORE in, DICOM SEG / TID 1500 SR out.
#
#   docker build -t medssl-gateway .
#   docker run --rm --gpus all --init -p 11112:11112 -p 9110:9110 \
#       -v $PWD/my-gateway.yaml:/etc/medssl/gateway.yaml:ro -v medssl-spool:/var/lib/medssl/spool \
#       medssl-gateway
#   (deploy/docker-compose.yml runs it with Orthanc and a Triton server; deploy/README.md.)
#
# Base image. onnxruntime-gpu links against the system's CUDA and cuDNN: its PyPI wheels
# 1.20-1.26 are built with CUDA 12.x + cuDNN 9.x (1.27 and later with CUDA 13), and onnxruntime's
# CUDA EP requirements say CUDA 12 builds run on any CUDA 12.x runtime (minor-version
# compatibility) while cuDNN must be 9.x. NVIDIA's cuDNN runtime image provides exactly those
# libraries (cudart, cuBLAS, cuFFT, cuRAND, cuDNN 9) on the default library path, so no
# LD_LIBRARY_PATH tricks, and the nvidia container toolkit sees the CUDA version it needs.
# Ubuntu 24.04 brings Python 3.12 (onnxruntime-gpu >= 1.24 needs >= 3.11).
# The host driver must support CUDA 12.6 (R560+); older R525+ data-center drivers work through
# minor-version compatibility if the container runs with NVIDIA_DISABLE_REQUIRE=1.
# Serving never imports torch: no torch, no train extra in this image (tests/serving/test_deploy_files.py).
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# build: a virtual environment with medssl[serve] and onnxruntime-gpu, built from this source.
FROM ${CUDA_IMAGE} AS build

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The distribution's Python; versions follow the base image tag.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# What pyproject.toml packages (training/ and export/ are listed there; nothing imports them
# in serving, and torch is never installed).
COPY pyproject.toml README.md ./
COPY medssl ./medssl
COPY training ./training
COPY export ./export
COPY serving ./serving
COPY cli ./cli

# medssl[serve] pulls the CPU onnxruntime; the two wheels share the `onnxruntime` package folder,
# so it is removed before onnxruntime-gpu goes in (never both in one environment).
# Majors are pinned where an API change would break the gateway (DICOM networking, SEG/SR
# writers, the Triton client, numpy's ABI) and onnxruntime-gpu to its CUDA 12 builds.
# (/src[serve]: this source tree with its serve extra.)
RUN pip install --no-cache-dir "/src[serve]" \
        "numpy>=1.24,<3" \
        "pydicom>=3.0,<4" \
        "pynetdicom>=2.1,<4" \
        "highdicom>=0.22,<1" \
        "tritonclient[http,grpc]>=2.40,<3" \
        "prometheus-client>=0.19,<1" \
        "dicomweb-client>=0.59,<1" \
    && pip uninstall -y onnxruntime \
    && pip install --no-cache-dir "onnxruntime-gpu>=1.20,<1.27" \
    && pip check \
    && python -c "import importlib.util as u, sys; sys.exit('torch must not be in the gateway image' if u.find_spec('torch') else 0)" \
    && python -c "import onnxruntime as o, sys; p = o.get_available_providers(); sys.exit(0 if 'CUDAExecutionProvider' in p else f'onnxruntime-gpu expected, providers: {p}')" \
    && medssl-serve --help > /dev/null

# ---------------------------------------------------------------------------------------------
# runtime: the same base (the venv's interpreter is its /usr/bin/python3), no build tools.
FROM ${CUDA_IMAGE} AS runtime

ENV DEBIAN_FRONTEND=noninteractive

# ca-certificates: STOW-RS destinations over https.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# A fixed non-root uid/gid (10001): a bind-mounted spool must be owned by it (chown 10001:10001).
RUN groupadd --system --gid 10001 medssl \
    && useradd --system --uid 10001 --gid medssl --home-dir /var/lib/medssl \
        --shell /usr/sbin/nologin medssl \
    && mkdir -p /var/lib/medssl/spool /etc/medssl /opt/medssl \
    && chown -R medssl:medssl /var/lib/medssl

# The shipped models (Triton layout + medssl.json cards), read-only for the gateway user.
COPY model_repository /opt/medssl/model_repository
# Default config (the compose one: Orthanc at orthanc:4242); mount your own over it.
COPY deploy/gateway.yaml /etc/medssl/gateway.yaml

WORKDIR /var/lib/medssl
# Numeric, so Kubernetes runAsNonRoot can verify it.
USER 10001:10001

# Received instances, the SQLite job store and results: keep them on a volume, or a restart
# loses acknowledged studies.
VOLUME ["/var/lib/medssl/spool"]

# DICOM (scp.port) and HTTP /metrics, /healthz, /readyz (http.port).
EXPOSE 11112 9110 9111

# medssl-serve handles SIGTERM itself: it stops accepting associations, finishes the study in
# hand or leaves it to be resumed, then exits. That takes up to ~90 s, more than docker's 10 s
# default: use `docker stop -t 120` / compose `stop_grace_period`. Running it as PID 1 is fine for
# signals (it installs handlers); `docker run --init` / compose `init: true` adds tini to reap
# zombies and forward signals.
STOPSIGNAL SIGTERM

# Liveness: /healthz answers 200 while every gateway loop is alive (readiness, /readyz, also
# needs the models loaded and Triton reachable). urllib, since the image has no curl. The port
# follows MEDSSL_GATEWAY__HTTP__PORT when set; http.host must include 127.0.0.1 (0.0.0.0 does).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, sys, urllib.request; port = os.environ.get('MEDSSL_GATEWAY__HTTP__PORT', '9110'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["medssl-serve"]
CMD ["--config", "/etc/medssl/gateway.yaml"]
