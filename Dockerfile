# vitc serving image (CPU): onnxruntime + OpenVINO, no torch, non-root, bundles mounted at /models.
#   docker build -t vitc-serve .
#   docker run --rm -p 8000:8000 -v "$PWD/exports:/models:ro" vitc-serve
# Every bundle directly under /models is served (VITC_MODEL_DIR); any flag of `python -m serve` can be appended,
# e.g. `docker run ... vitc-serve --backend openvino`. The GPU variant is Dockerfile.gpu.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY models ./models
COPY data ./data
COPY runtimes ./runtimes
COPY serve ./serve
# Exact pins from constraints.txt; the serve extra pulls no torch.
RUN python -m venv /opt/vitc \
    && /opt/vitc/bin/pip install --no-cache-dir -c constraints.txt ".[serve]" \
    && /opt/vitc/bin/python -c "import sys, serve.app; sys.exit('torch' in sys.modules)"

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/vitc/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VITC_HOST=0.0.0.0 \
    VITC_PORT=8000 \
    VITC_MODEL_DIR=/models
RUN groupadd --system --gid 10001 vitc \
    && useradd --system --uid 10001 --gid vitc --home-dir /home/vitc --create-home --shell /usr/sbin/nologin vitc \
    && mkdir -p /models && chown vitc:vitc /models
COPY --from=build /opt/vitc /opt/vitc
WORKDIR /home/vitc
USER 10001:10001
VOLUME ["/models"]
EXPOSE 8000
# Readiness, not just liveness: the container is healthy once every model is loaded and accepting requests.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('VITC_PORT', '8000') + '/v2/health/ready', timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "serve"]
