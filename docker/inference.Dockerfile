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
# The listening port and a HEALTHCHECK arrive with the server itself (issue #5), so that
# they name a setting of its own rather than a number invented here.
ENTRYPOINT ["edgefleet-serve"]
