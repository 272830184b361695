#!/bin/sh
# The stand-in postgres image's entrypoint: initialize the cluster from POSTGRES_* once.
set -eu
mkdir -p "$PGDATA" /run/postgresql
chown -R postgres:postgres "$PGDATA" /run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  echo "$POSTGRES_PASSWORD" >/tmp/pwfile
  chown postgres /tmp/pwfile
  su postgres -s /bin/sh -c "PATH=$PATH initdb -D '$PGDATA' -U '$POSTGRES_USER' --pwfile=/tmp/pwfile -A scram-sha-256 -E UTF8 --locale=C.UTF-8" >/dev/null
  rm -f /tmp/pwfile
  echo "host all all 0.0.0.0/0 scram-sha-256" >>"$PGDATA/pg_hba.conf"
  su postgres -s /bin/sh -c "PATH=$PATH pg_ctl -D '$PGDATA' -o '-c listen_addresses=' -w start" >/dev/null
  PGPASSWORD="$POSTGRES_PASSWORD" psql -h /run/postgresql -U "$POSTGRES_USER" -d postgres \
    -c "CREATE DATABASE \"$POSTGRES_DB\"" >/dev/null
  su postgres -s /bin/sh -c "PATH=$PATH pg_ctl -D '$PGDATA' -m fast -w stop" >/dev/null
fi
exec su postgres -s /bin/sh -c "exec postgres -D '$PGDATA' -c listen_addresses='*'"
