# syntax=docker/dockerfile:1
#
# The control plane image: one image, four roles, chosen by the command.
#
#   API (default)  edgefleet server --host 0.0.0.0 --port 8080
#   worker         edgefleet worker --concurrency 2
#   beat           edgefleet beat                    (exactly one replica)
#   migrations     edgefleet db upgrade              (before the others start)
#
# Build from the repo root, for both architectures K3s edge and cloud nodes run:
#
#   docker buildx build --platform linux/amd64,linux/arm64 \
#     -f docker/controller.Dockerfile -t REGISTRY/edgefleet-controller:0.1.0 --push .
#
# Nothing here is architecture specific: every dependency comes from PyPI as a wheel for
# the target platform (psycopg-binary, onnxruntime, ai-edge-litert, uvloop all publish
# manylinux aarch64 wheels), so no compiler is needed and no URL names an architecture.

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
# Only what the wheel is built from: the package metadata and the two packages.
COPY pyproject.toml README.md ./
COPY controller ./controller
COPY node_agent ./node_agent
# A regular (not editable) install: the image carries no source tree beside the venv.
RUN pip install --upgrade pip \
 && pip install ".[controller]" \
 && python -c "import controller, node_agent, onnxruntime, ai_edge_litert, celery, sqlalchemy"

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
ARG EDGEFLEET_UID=10001
# The artifact store: a volume (compose) or a PVC (Helm) is mounted at
# /var/lib/edgefleet/artifacts. A named Docker volume copies the ownership of the
# directory it is mounted over when it is first created, so the non-root user can write.
RUN groupadd --system --gid ${EDGEFLEET_UID} edgefleet \
 && useradd --system --uid ${EDGEFLEET_UID} --gid edgefleet --no-create-home \
            --home-dir /nonexistent --shell /usr/sbin/nologin edgefleet \
 && mkdir -p /var/lib/edgefleet/artifacts \
 && chown -R ${EDGEFLEET_UID}:${EDGEFLEET_UID} /var/lib/edgefleet
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# Alembic's scripts are not inside the package: `edgefleet db upgrade` finds them through
# EDGEFLEET_MIGRATIONS_DIR, `alembic upgrade head` (from /app) through alembic.ini.
COPY migrations ./migrations
COPY alembic.ini ./
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EDGEFLEET_MIGRATIONS_DIR=/app/migrations \
    EDGEFLEET_ARTIFACT_DIR=/var/lib/edgefleet/artifacts
USER ${EDGEFLEET_UID}:${EDGEFLEET_UID}
EXPOSE 8080
# No curl in the slim image: the interpreter is the HTTP client. /healthz answers 503
# when the database or Redis is down. Worker, beat and migrate containers run other
# commands and disable this check (see docker-compose.yml).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
CMD ["edgefleet", "server", "--host", "0.0.0.0", "--port", "8080"]
