# syntax=docker/dockerfile:1
# Two images from one file (docker-compose.yml builds both):
#   --target api     the API: no torch, starts in a second (docs/design.md)
#   --target worker  a GPU worker: CUDA torch from PyPI, the core, the shared app modules
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv/tuneqdm
# Named volumes mounted here start with this ownership, so the non-root user can write.
RUN useradd --create-home --uid 1000 tuneqdm \
    && mkdir -p /data/files /cache \
    && chown tuneqdm:tuneqdm /data/files /cache
COPY pyproject.toml README.md alembic.ini ./
COPY migrations ./migrations
COPY app ./app
COPY worker ./worker
COPY tuneqdm_core ./tuneqdm_core
# Migrations and storage init before the command, where MIGRATE_ON_START=1 (the api image).
COPY deploy/docker-entrypoint.sh /usr/local/bin/tuneqdm-entrypoint
ENTRYPOINT ["tuneqdm-entrypoint"]

FROM base AS api
RUN pip install ".[api]"
USER tuneqdm
EXPOSE 8000
# The entrypoint migrates the registry and creates the bucket (or folder) first.
ENV MIGRATE_ON_START=1
CMD ["uvicorn", "--factory", "app.main:create_app", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS worker
# The plain PyPI wheel of this pin on Linux x86_64 is the CUDA build.
ARG TORCH_SPEC=torch==2.13.0
RUN pip install "${TORCH_SPEC}" && pip install ".[core,api]"
USER tuneqdm
# Workers start after the API, which migrated; their metrics port (TUNEQDM_WORKER_METRICS_PORT).
ENV MIGRATE_ON_START=0
EXPOSE 9100
# One worker process per GPU: the solo pool runs one task at a time in this process, which
# holds the one quantized base (prefetch 1 and late acks are set in worker/celery_app.py).
CMD ["celery", "-A", "worker.celery_app", "worker", "--pool=solo", "-Q", "finetune,generate", "--loglevel=INFO"]
