#!/bin/sh
# The images' entrypoint (Dockerfile): bring the registry's schema and the storage up to date,
# then run the container's command (uvicorn, or a Celery worker).
#
# MIGRATE_ON_START=1 (the api image's default): `alembic upgrade head` (concurrent upgrades from
# several replicas are serialized by a database lock in migrations/env.py) and
# `tuneqdm-admin storage init` (creates the bucket or folder when missing, else only says so).
# The worker image defaults to 0: its containers wait for a healthy API, which has done both.
set -eu
if [ "${MIGRATE_ON_START:-0}" = "1" ]; then
  alembic upgrade head
  tuneqdm-admin storage init
fi
exec "$@"
