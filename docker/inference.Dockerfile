# syntax=docker/dockerfile:1
#
# The inference server an edge rollout deploys next to a model: `edgefleet-serve` on the
# `agent` extra's runtimes (onnxruntime, LiteRT). The same dependency set as the agent
# image, a different entry point, so the two share every layer but the last ones.
#
#   docker buildx build --platform linux/amd64,linux/arm64 \
#     -f docker/inference.Dockerfile -t REGISTRY/edgefleet-inference:0.1.0 --push .
#
# Both architectures install the same wheels from PyPI; no URL names an architecture.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build
# Optional: a pip constraints file (a path inside the build, e.g. a --volume) pinning every
# dependency; pip reads it from this variable. scripts/build-images.sh pins them to the
# versions the tests ran.
ARG PIP_CONSTRAINT=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY node_agent ./node_agent
RUN pip install --upgrade pip \
 && pip install ".[agent]" \
 && python -c "import node_agent.runtimes, onnxruntime, ai_edge_litert"
# The server never installs anything: pip and setuptools stay out of the image (~25 MB).
# A step of its own, so the layers above stay shared with the agent image's build.
RUN pip uninstall --yes setuptools pip

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
ARG EDGEFLEET_UID=10001
RUN groupadd --system --gid ${EDGEFLEET_UID} edgefleet \
 && useradd --system --uid ${EDGEFLEET_UID} --gid edgefleet --no-create-home \
            --home-dir /nonexistent --shell /usr/sbin/nologin edgefleet \
 && mkdir -p /var/lib/edgefleet/models \
 && chown -R ${EDGEFLEET_UID}:${EDGEFLEET_UID} /var/lib/edgefleet
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /var/lib/edgefleet
USER ${EDGEFLEET_UID}:${EDGEFLEET_UID}
# edgefleet-serve's default port (ServeSettings.port, EDGEFLEET_SERVE_PORT; the DaemonSet
# passes --port from the controller's EDGEFLEET_INFERENCE_PORT, 8500 by default).
EXPOSE 8500
# Liveness only: /healthz answers while the artifact downloads; /readyz (model loaded and
# warmed up) is the Kubernetes readiness probe's business. No curl in the slim image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8500/healthz', timeout=4)"]
ENTRYPOINT ["edgefleet-serve"]
