# syntax=docker/dockerfile:1
# whatsapp-worker image: `docker build -t whatsapp-worker .`, run it with docker-compose.yml.
# With podman: `podman build --format docker -t whatsapp-worker .` (or BUILDAH_FORMAT=docker in
# the environment, e.g. for podman-compose): podman's default OCI format has no health check
# and drops the HEALTHCHECK below with a warning. docker-compose.yml states its checks anyway.
# Secrets never go in ENV or ARG: pass WORKER_DATABASE_URL_FILE and WHATSAPP_ACCESS_TOKEN_FILE
# pointing at mounted secret files (/run/secrets/...).

# --- build: a virtual environment with the worker and its dependencies ---------------------
FROM python:3.11-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python -m venv /opt/venv

# Dependencies and the package in one step (every dependency ships binary wheels: no compiler).
COPY pyproject.toml README.md ./
COPY worker/ worker/
RUN /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/whatsapp-worker --version

# --- runtime: slim Python, the venv, a numeric non-root user ---------------------------------
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="whatsapp-worker" \
      org.opencontainers.image.description="Drains a MySQL queue of WhatsApp messages: each once."

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    WORKER_LOG_FORMAT=json \
    WORKER_PIDFILE=/run/whatsapp-worker/whatsapp-worker.pid

RUN groupadd --system --gid 10001 worker \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin worker \
    && install -d -o 10001 -g 10001 -m 0700 /run/whatsapp-worker

COPY --from=build /opt/venv /opt/venv

USER 10001:10001

# The pidfile and heartbeat live in /run/whatsapp-worker (a tmpfs under compose's read_only).
# `health` reads those two local files: exit 0 while the daemon's loop goes round.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["whatsapp-worker", "health"]

# Exec form: whatsapp-worker is PID 1 (or the child of compose's init) and gets SIGTERM itself,
# then drains in-flight sends for WORKER_DRAIN_TIMEOUT (30 s): stop with a grace period above it.
STOPSIGNAL SIGTERM
ENTRYPOINT ["whatsapp-worker"]
CMD ["run"]
