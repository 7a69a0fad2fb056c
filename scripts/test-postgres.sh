#!/usr/bin/env bash
# A PostgreSQL server on loopback for tests/test_storage.py's server checks; prints the URL to export as
# FFABLATE_TEST_POSTGRES. CI runs it as root (it installs the server with apt where it is missing); it is safe to
# rerun. Its own cluster ("ffablate", port $FFABLATE_PG_PORT or 5433) leaves any other cluster on the machine alone.
# Everything but the URL goes to stderr; it exits non-zero where it cannot give a server.
set -euo pipefail
port=${FFABLATE_PG_PORT:-5433}
if ! command -v pg_createcluster >/dev/null; then
	apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
fi
version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
if ! pg_lsclusters -h | awk '{print $2}' | grep -qx ffablate; then
	pg_createcluster "$version" ffablate --port "$port" >&2
fi
if ! pg_lsclusters -h | awk '$2 == "ffablate" {print $4}' | grep -qx online; then
	pg_ctlcluster "$version" ffablate start >&2
fi
sql() { runuser -u postgres -- psql -p "$port" -v ON_ERROR_STOP=1 -qtAc "$1"; }
# CREATEROLE: one test makes a user who may not create tables, to see what a study tells such a user.
# The password is a word no message would hold otherwise: the tests check that none prints it.
if [ -z "$(sql "SELECT 1 FROM pg_roles WHERE rolname = 'ffablate'")" ]; then
	sql "CREATE ROLE ffablate LOGIN CREATEROLE" >&2
fi
sql "ALTER ROLE ffablate PASSWORD 'ci-secret-7f3a'" >&2
if [ -z "$(sql "SELECT 1 FROM pg_database WHERE datname = 'ffablate'")" ]; then
	sql "CREATE DATABASE ffablate OWNER ffablate" >&2
fi
echo "postgresql://ffablate:ci-secret-7f3a@localhost:$port/ffablate"
