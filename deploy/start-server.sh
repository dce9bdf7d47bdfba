#!/usr/bin/env bash
# Start the team's MLflow tracking server: PostgreSQL backend store, proxied artifact store,
# basic-auth app. Every setting comes from the environment (README.md, "Team server"); no
# password or key lives in a file of this repository. Upgrades the database schemas first.
set -euo pipefail

die() { echo "start-server: $*" >&2; exit 2; }

db=${FLEXBENCH_SERVER_DB:-}
artifacts=${FLEXBENCH_SERVER_ARTIFACTS:-}
[ -n "$db" ] || die "set FLEXBENCH_SERVER_DB, e.g. postgresql+psycopg2://mlflow@db.lan:5432/mlflow \
(the database password goes in PGPASSWORD or ~/.pgpass)"
[ -n "$artifacts" ] || die "set FLEXBENCH_SERVER_ARTIFACTS to a directory or an s3:// URI"
[ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ] || die "set MLFLOW_FLASK_SERVER_SECRET_KEY \
(a long random string, e.g. \$(openssl rand -hex 32); the same on every restart)"
case "$db" in
    postgresql*) ;;
    *) die "FLEXBENCH_SERVER_DB must be a postgresql URI, got '${db%%://*}://...'" ;;
esac

auth_db=${FLEXBENCH_SERVER_AUTH_DB:-$db}
host=${FLEXBENCH_SERVER_HOST:-0.0.0.0}
port=${FLEXBENCH_SERVER_PORT:-5000}
workers=${FLEXBENCH_SERVER_WORKERS:-4}
permission=${FLEXBENCH_SERVER_DEFAULT_PERMISSION:-READ}
# Seconds a worker remembers a checked username/password (MLflow's auth_cache_ttl_seconds;
# MLflow's default 0 re-hashes the password on every request: see BENCHMARKS.md, team server).
auth_cache_ttl=${FLEXBENCH_SERVER_AUTH_CACHE_TTL:-60}
python=${FLEXBENCH_SERVER_PYTHON:-python3}
# Host headers the server answers: this machine by name, loopback and private LAN addresses.
short=$(hostname -s 2>/dev/null || hostname)
full=$(hostname -f 2>/dev/null || echo "$short")
lan="localhost:*,127.0.0.1:*,$short:*"
[ "$full" = "$short" ] || lan="$lan,$full:*"
lan="$lan,10.*,192.168.*,172.1[6-9].*,172.2?.*,172.3[01].*"
allowed_hosts=${FLEXBENCH_SERVER_ALLOWED_HOSTS:-$lan}

# The basic-auth app's settings file, written at start into a private directory. The admin
# password stays in MLFLOW_AUTH_ADMIN_PASSWORD (read on the first start only, to create the
# admin); the file holds the auth database URI (% doubled for the ini parser), so it is
# readable by this user alone, and removed when the server stops.
umask 077
conf_dir=$(mktemp -d "${TMPDIR:-/tmp}/flexbench-server.XXXXXX")
child=""
cleanup() {
    if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
        kill -TERM "$child" 2>/dev/null || true
        wait "$child" 2>/dev/null || true
    fi
    rm -rf "$conf_dir"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
cat >"$conf_dir/basic_auth.ini" <<INI
[mlflow]
default_permission = $permission
database_uri = ${auth_db//%/%%}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = $auth_cache_ttl
INI
export MLFLOW_AUTH_CONFIG_PATH="$conf_dir/basic_auth.ini"

echo "start-server: upgrading the tracking schema" >&2
"$python" -m mlflow db upgrade "$db"
echo "start-server: upgrading the auth schema" >&2
"$python" -m mlflow.server.auth db upgrade --url "$auth_db"

echo "start-server: serving on $host:$port (allowed hosts: $allowed_hosts)" >&2
"$python" -m mlflow server \
    --backend-store-uri "$db" \
    --artifacts-destination "$artifacts" \
    --serve-artifacts \
    --app-name basic-auth \
    --host "$host" --port "$port" \
    --allowed-hosts "$allowed_hosts" \
    --workers "$workers" &
child=$!
status=0
wait "$child" || status=$?
child=""
exit "$status"
