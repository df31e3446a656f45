# vitc serving image (CPU): onnxruntime + OpenVINO, no torch, non-root, bundles mounted at /models.
#   docker build -t vitc-serve .
#   docker run --rm -p 8000:8000 -v "$PWD/exports:/models:ro" vitc-serve
# Every bundle directly under /models is served (VITC_MODEL_DIR, a default: `--model /models/x` or
# `--model-repository /models` appended, or VITC_MODELS / VITC_MODEL_REPOSITORY set, serve just those instead); any
# flag of `python -m serve` can be appended, e.g. `docker run ... vitc-serve --backend openvino`, except the port: change it with `-e VITC_PORT=9000 -p
# 9000:9000`, which the healthcheck reads too (it cannot see a --port flag). Stop it with `docker stop -t 40` (see
# STOPSIGNAL). The GPU variant is Dockerfile.gpu.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# The pinned dependencies (the serve extra: no torch) in a layer of their own, so that a code edit reinstalls vitc
# alone, not onnxruntime and OpenVINO. Their metadata needs pyproject.toml and a README (an empty one until the real
# one is copied); pip is pinned like `make install`'s, which has --only-deps.
COPY pyproject.toml constraints.txt ./
RUN touch README.md \
    && python -m venv /opt/vitc \
    && /opt/vitc/bin/pip install --no-cache-dir pip==26.3 \
    && /opt/vitc/bin/pip install --no-cache-dir -c constraints.txt --only-deps ".[serve]"
COPY README.md LICENSE ./
COPY models ./models
COPY data ./data
COPY runtimes ./runtimes
COPY serve ./serve
# -P keeps /src off sys.path: the check imports the installed package, so a module or data file the wheel lacks
# fails here, not in the final image.
RUN /opt/vitc/bin/pip install --no-cache-dir --no-deps . \
    && /opt/vitc/bin/pip check \
    && /opt/vitc/bin/python -P -c "import sys, serve.app; sys.exit('torch' in sys.modules or not serve.app.__file__.startswith('/opt/vitc/'))"

FROM ${PYTHON_IMAGE}
# No telemetry: onnxruntime's is off by this variable, OpenVINO's by the consent file written below (the file
# `opt_in_out --opt_out` writes; that command itself reports the opt-out over the network).
ENV PATH=/opt/vitc/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ORT_DISABLE_TELEMETRY=1 \
    VITC_HOST=0.0.0.0 \
    VITC_PORT=8000 \
    VITC_MODEL_DIR=/models
RUN groupadd --system --gid 10001 vitc \
    && useradd --system --uid 10001 --gid vitc --home-dir /home/vitc --create-home --shell /usr/sbin/nologin vitc \
    && mkdir -p /models && chown vitc:vitc /models \
    && install -d -o vitc -g vitc /home/vitc/intel \
    && printf 0 > /home/vitc/intel/openvino_telemetry \
    && chown vitc:vitc /home/vitc/intel/openvino_telemetry
COPY --from=build /opt/vitc /opt/vitc
WORKDIR /home/vitc
USER 10001:10001
VOLUME ["/models"]
EXPOSE 8000
# Readiness, not just liveness: the container is healthy once every model is loaded and accepting requests.
# Never through a proxy (http_proxy set for the model store would answer for the server); a Kubernetes service
# link (VITC_PORT=tcp://...) means the server's default port, as the server reads it.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; p = os.environ.get('VITC_PORT', '8000').strip(); p = p if p.isascii() and p.isdigit() else '8000'; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:' + p + '/v2/health/ready', timeout=2)"]
# SIGTERM drains; a Dockerfile cannot set the grace period: `docker stop -t 40`, `docker run --stop-timeout 40`, or
# terminationGracePeriodSeconds: 40 in Kubernetes (above --graceful-timeout-s, 30 s by default).
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "serve"]
