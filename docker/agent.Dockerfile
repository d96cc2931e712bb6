# syntax=docker/dockerfile:1
#
# The node agent, run on every edge node by the edgefleet-agent Helm chart (a DaemonSet).
# Only the `agent` extra: the model runtimes (onnxruntime, LiteRT) and the wire contract;
# no SQLAlchemy, Celery or FastAPI server stack, and no controller package.
#
#   docker buildx build --platform linux/amd64,linux/arm64 \
#     -f docker/agent.Dockerfile -t REGISTRY/edgefleet-agent:0.1.0 --push .
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
# The edge side never imports the controller, so its source stays out of the image.
COPY node_agent ./node_agent
RUN pip install --upgrade pip \
 && pip install ".[agent]" \
 && python -c "import node_agent.runtimes, onnxruntime, ai_edge_litert"

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
ARG EDGEFLEET_UID=10001
# /var/lib/edgefleet is the node-local model cache (a hostPath or emptyDir in the DaemonSet).
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
# The agent talks out to the controller; it listens on no port (yet: issue #5).
ENTRYPOINT ["edgefleet-agent"]
