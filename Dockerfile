# syntax=docker/dockerfile:1
# xlora-server: serves the embedded default (SmolLM2-135M-Instruct + three experts) on port 8000.
#
#   CPU (default):  docker build -t xlora-server .
#   CUDA:           docker build -t xlora-server:cuda \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   Run:            docker run -p 8000:8000 -e XLORA_API_KEY -e XLORA_ADMIN_TOKEN xlora-server
#   Compiled decoding from the first request: --build-arg PRECOMPILE_CONFIG=default.yaml
#   Hub ids baked in (served offline): --build-arg PREFETCH_CONFIG=gpu-xlora-paper.yaml
#                   (a gated repository also needs --secret id=hf_token,env=HF_TOKEN)
#
# The install steps are scripts/install.sh, the same script `make` runs. Tokens (XLORA_API_KEY,
# XLORA_ADMIN_TOKEN) come from the environment at run time; none is baked into the image.

# A slim Python 3.11 image, or a CUDA image (which has no Python: the base stage installs one).
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- base: Python + venv support and a C++ compiler; both later stages start here, so the venv's interpreter
# path matches. The compiler is not optional: the compiled decode step (AOTInductor; Triton on CUDA) and our C++
# attention kernel are compiled on the machine that runs them, and without one the server decodes eagerly, at
# about half the speed (docs/compiled-decoding.md). The CUDA image's apt Python also needs its headers.
FROM ${BASE_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv python3-dev; \
    fi \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# ---- builder: the venv at /opt/venv, made by the shared install script (no extras, not editable)
FROM base AS builder
# torch build: the CPU wheel by default; for CUDA pass the index of your CUDA version (cu126, cu128, ...)
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Optional extras: "ray" for the Ray Serve replicas (deploy/kuberay-rayservice.yaml); none by default.
ARG EXTRAS=""
WORKDIR /src
COPY pyproject.toml README.md ./
COPY scripts/ scripts/
COPY xlora_core/ xlora_core/
COPY server/ server/
# The GGUF cache key includes the file's mtime; whole seconds survive every layer export and COPY, so the
# model converted below is found again when the container runs.
RUN TORCH_SPEC="${TORCH_SPEC}" TORCH_INDEX_URL="${TORCH_INDEX_URL}" scripts/install.sh /opt/venv "${EXTRAS}" \
    && gguf=$(/opt/venv/bin/python -c 'from xlora_core.base_model import default_gguf_path; print(default_gguf_path())') \
    && touch -m -d "@$(stat -c %Y "$gguf")" "$gguf"

# ---- assets: configs, experts and the trained router (experts/ and checkpoints/ may not exist yet)
FROM base AS assets
COPY . /ctx
RUN for d in configs experts checkpoints; do \
        mkdir -p "/app/$d" && if [ -d "/ctx/$d" ]; then cp -a "/ctx/$d/." "/app/$d/"; fi; \
    done

# ---- runtime
FROM base AS runtime
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/xlora --shell /usr/sbin/nologin xlora
COPY --from=builder /opt/venv /opt/venv
COPY --from=assets /app /app
ENV PATH=/opt/venv/bin:$PATH \
    XLORA_CACHE_DIR=/cache \
    HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=1
WORKDIR /app
# Convert the embedded GGUF now (about 30 s) and build the C++ attention kernel (about 10 s; keyed by the CPU, so
# a container on another CPU builds its own at start) so the container serves within seconds of start. A named or
# anonymous volume on /cache starts with this content; an empty bind mount converts once at first start.
RUN python -c "import os; from xlora_core.base_model import default_gguf_path; \
assert os.stat(default_gguf_path()).st_mtime_ns % 10**9 == 0, 'GGUF mtime is not whole seconds'" \
    && python -c "from xlora_core.base_model import load_base_model; load_base_model('default', device='cpu')" \
    && python -c "from xlora_core import native; assert native.load(), 'the C++ attention kernel did not build'" \
    && chown -R xlora:xlora /cache
# Optional: the Hugging Face Hub ids of one of configs/ (e.g. gpu-xlora-paper.yaml) fetched into the image's
# Hugging Face cache (HF_HOME), so it serves them offline; none by default (the GPU configs' models are GBs).
ARG PREFETCH_CONFIG=""
RUN --mount=type=secret,id=hf_token,required=false \
    if [ -n "${PREFETCH_CONFIG}" ]; then \
        HF_HUB_OFFLINE=0 HF_TOKEN="$(cat /run/secrets/hf_token 2>/dev/null || true)" \
            xlora-serve --config "/app/configs/${PREFETCH_CONFIG}" --download-only \
        && chown -R xlora:xlora /cache; \
    fi
# Optional: the compiled decode step of one of configs/ (e.g. default.yaml) built into /cache now (minutes), so
# that the container decodes compiled from its start. It is keyed by the CPU and torch's threads: a container
# on another CPU, or with another number of cores, builds its own in the background (docs/compiled-decoding.md).
ARG PRECOMPILE_CONFIG=""
RUN if [ -n "${PRECOMPILE_CONFIG}" ]; then \
        xlora-serve --config "/app/configs/${PRECOMPILE_CONFIG}" --precompile && chown -R xlora:xlora /cache; \
    fi
VOLUME ["/app/configs", "/cache"]
USER 10001:10001
EXPOSE 8000
# /ready answers 200 once the model serves, 503 while loading or draining.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]
ENTRYPOINT ["xlora-serve"]
CMD ["--config", "/app/configs/default.yaml", "--host", "0.0.0.0", "--port", "8000"]
