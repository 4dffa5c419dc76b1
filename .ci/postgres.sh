#!/usr/bin/env bash
# A PostgreSQL server for the tests that run a real `mlflow server` with a PostgreSQL backend store.
#
# Idempotent; safe to run again. As root (CI): installs Debian's postgresql when its binaries are
# missing, starts the distribution's cluster and creates the role and database below. As another
# user: initdb + pg_ctl a private cluster under ~/.cache. Outside CI it never fails the build: when
# PostgreSQL cannot be started it says why and exits 0, and the server tests skip with that reason.
# In CI (CI=true) it exits 1 instead, and the server tests fail rather than skip: a green CI always
# exercised the PostgreSQL path.
#
# The tests read the URI from MFW_TEST_POSTGRES_URI, else from the file written here, else the default.
set -uo pipefail

PG_USER=${MFW_PG_USER:-mlflow}
PG_PASSWORD=${MFW_PG_PASSWORD:-mlflow}
PG_DB=${MFW_PG_DB:-mlflow}
PG_PORT=${MFW_PG_PORT:-5432}
URI_FILE=${MFW_TEST_POSTGRES_URI_FILE:-/tmp/mfw-test-postgres-uri}

say() { echo "postgres.sh: $*"; }
unavailable() {
  rm -f "$URI_FILE"
  if [ "${CI:-}" = true ]; then say "PostgreSQL is not available ($*); CI needs it."; exit 1; fi
  say "PostgreSQL is not available ($*); the server tests will be skipped."; exit 0
}

pg_bindir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
  [ -n "$dir" ] && echo "$dir" && return 0
  dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)"
}

install_if_missing() {
  if [ -x "$(pg_bindir)/initdb" ]; then return 0; fi
  [ "$(id -u)" -eq 0 ] || unavailable "its binaries are missing and installing them needs root: apt-get install postgresql"
  command -v apt-get >/dev/null || unavailable "its binaries are missing and there is no apt-get"
  say "installing Debian's postgresql"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; } || unavailable "apt-get install postgresql failed"
}

as_postgres() { runuser -u postgres -- "$@"; }

start_debian_cluster() {
  local version cluster port
  read -r version cluster port _ < <(pg_lsclusters --no-header 2>/dev/null | head -n1)
  if [ -z "${version:-}" ]; then
    version=$(basename "$(dirname "$(pg_bindir)")")
    cluster=main
    say "creating cluster $version/$cluster"
    pg_createcluster "$version" "$cluster" -p "$PG_PORT" >/dev/null || unavailable "pg_createcluster failed"
    port=$PG_PORT
  fi
  if ! pg_lsclusters --no-header | awk -v v="$version" -v c="$cluster" '$1==v && $2==c' | grep -q online; then
    say "starting cluster $version/$cluster on port $port"
    pg_ctlcluster "$version" "$cluster" start || unavailable "pg_ctlcluster $version $cluster start failed (see /var/log/postgresql)"
  fi
  PG_PORT=$port
  local sql="DO \$\$BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') THEN CREATE ROLE $PG_USER LOGIN; END IF;
  END\$\$; ALTER ROLE $PG_USER WITH LOGIN CREATEDB PASSWORD '$PG_PASSWORD';"
  as_postgres psql -q -p "$PG_PORT" -v ON_ERROR_STOP=1 -c "$sql" >/dev/null || unavailable "could not create role $PG_USER"
  if ! as_postgres psql -p "$PG_PORT" -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'" | grep -q 1; then
    as_postgres createdb -p "$PG_PORT" -O "$PG_USER" "$PG_DB" || unavailable "could not create database $PG_DB"
  fi
}

start_private_cluster() {
  local bin data log pwfile
  bin=$(pg_bindir)
  data=${MFW_PG_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/mfw-postgres}
  log="$data.log"
  if [ ! -f "$data/PG_VERSION" ]; then
    mkdir -p "$(dirname "$data")"
    pwfile=$(mktemp); echo "$PG_PASSWORD" >"$pwfile"
    say "initdb $data"
    "$bin/initdb" -D "$data" -U "$PG_USER" --pwfile="$pwfile" --auth-host=scram-sha-256 --auth-local=trust >/dev/null \
      || { rm -f "$pwfile"; unavailable "initdb failed"; }
    rm -f "$pwfile"
  fi
  if ! "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    say "starting a private server on 127.0.0.1:$PG_PORT"
    "$bin/pg_ctl" -D "$data" -l "$log" -w -o "-p $PG_PORT -k /tmp -c listen_addresses=127.0.0.1" start >/dev/null \
      || unavailable "pg_ctl start failed (see $log; is port $PG_PORT taken? set MFW_PG_PORT)"
  fi
  if ! "$bin/psql" -h /tmp -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'" | grep -q 1; then
    "$bin/createdb" -h /tmp -p "$PG_PORT" -U "$PG_USER" "$PG_DB" || unavailable "could not create database $PG_DB"
  fi
}

install_if_missing
if [ "$(id -u)" -eq 0 ] && command -v pg_ctlcluster >/dev/null && id postgres >/dev/null 2>&1; then
  start_debian_cluster
else
  start_private_cluster
fi

URI="postgresql://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB"
PGPASSWORD=$PG_PASSWORD "$(pg_bindir)/psql" "$URI" -tAc "SELECT 1" >/dev/null 2>&1 \
  || unavailable "the server started but $PG_USER cannot log in over TCP at 127.0.0.1:$PG_PORT"
echo "$URI" >"$URI_FILE"
say "ready: $URI (written to $URI_FILE; MFW_TEST_POSTGRES_URI overrides it)"
