#!/bin/bash
# Runs once, when the postgres image's entrypoint initialises an empty data volume: it runs every
# /docker-entrypoint-initdb.d/*.sh as the image's user `postgres`, against a server that listens on
# its Unix socket only. Creates what the Socket Arena needs, and nothing more (docs/DATABASE.md):
#   role arena          LOGIN and no other attribute: the servers' role, CONNECT on `arena` only
#   role arena_monitor  LOGIN, member of pg_monitor: the exporter's role, CONNECT on `arena` only
#   database arena      owned by the superuser; PUBLIC may not connect to it (nor to `postgres`)
#                       and may not create in its schema `public`
# and replaces pg_hba.conf: those two roles with a password (SCRAM) to database `arena` over TCP;
# the superuser only through the Unix socket as the container's own user `postgres` (peer, for
# `docker compose exec postgres psql`); nothing else.
#
# The passwords come from Compose or Swarm secrets (files in /run/secrets), never from arguments
# or the environment: psql reads each file itself (\set NAME `cat FILE`), so no password shows in
# a process list, and the session does not log statements, not even a failing one (which would
# carry the password into the server log).
set -euo pipefail

arena_file=${ARENA_DB_PASSWORD_FILE:-/run/secrets/db-password}
monitor_file=${ARENA_DB_MONITOR_PASSWORD_FILE:-/run/secrets/db-monitor-password}
for file in "$arena_file" "$monitor_file"; do
  if [ ! -r "$file" ] || [ ! -s "$file" ]; then
    echo "10-arena-roles.sh: cannot read $file, or it is empty (a secret: docs/COMPOSE.md)" >&2
    exit 1
  fi
done

psql -v ON_ERROR_STOP=1 -v VERBOSITY=terse --no-psqlrc --no-password --quiet \
  --username "${POSTGRES_USER:-postgres}" --dbname postgres \
  --set arena_file="$arena_file" --set monitor_file="$monitor_file" <<'SQL'
SET log_min_error_statement = panic;
SET log_statement = none;
\set arena_password `cat :'arena_file'`
\set monitor_password `cat :'monitor_file'`
CREATE ROLE arena LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  PASSWORD :'arena_password';
CREATE ROLE arena_monitor LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  PASSWORD :'monitor_password' IN ROLE pg_monitor;
\unset arena_password
\unset monitor_password
CREATE DATABASE arena;
REVOKE ALL ON DATABASE arena FROM PUBLIC;
REVOKE ALL ON DATABASE postgres FROM PUBLIC;
GRANT CONNECT ON DATABASE arena TO arena, arena_monitor;
\connect arena
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
SQL

cat >"$PGDATA/pg_hba.conf" <<'HBA'
# Written once by docker/postgres/initdb/10-arena-roles.sh. First match wins; no match: refused.
# TYPE  DATABASE  USER           ADDRESS  METHOD
local   all       postgres                peer
host    arena     arena          all      scram-sha-256
host    arena     arena_monitor  all      scram-sha-256
HBA
echo "10-arena-roles.sh: roles arena and arena_monitor, database arena, pg_hba.conf written"
