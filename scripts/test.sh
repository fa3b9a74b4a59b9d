#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian/Ubuntu machine, then runs them.
# Usage: bash scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

# Installs Debian's package $1 (as root), or stops, saying "$2 missing" (what is missing, and "is" or "are").
install_package() {
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
    else
        echo "$2 missing: run 'sudo apt-get install $1'" >&2
        exit 1
    fi
}

# PostgreSQL server binaries: the tests start a throwaway cluster of their own.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    install_package postgresql "PostgreSQL server binaries are"
fi
# docker-compose (Compose v1, Debian's package): validates docker-compose.yml; no Docker engine is needed.
command -v docker-compose >/dev/null 2>&1 || install_package docker-compose "docker-compose is"
# g++: tests/test_cpp_client.py builds a C++ Flight client against pyarrow's headers and libraries.
command -v g++ >/dev/null 2>&1 || install_package g++ "g++ is"
# libfaketime: tests/test_clocks.py runs replicas whose clocks are minutes behind or hours ahead of the others.
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || install_package faketime "libfaketime is"
# Node.js and npm: tests/test_js_client.py runs a JavaScript Flight client, whose packages (pinned by
# tests/clients/package-lock.json) npm installs into tests/clients/node_modules here, again only when the lock file
# changed; the tests never reach the network.
command -v node >/dev/null 2>&1 || install_package nodejs "Node.js is"
command -v npm >/dev/null 2>&1 || install_package npm "npm is"
if [ tests/clients/package-lock.json -nt tests/clients/node_modules/.package-lock.json ]; then
    npm ci --prefix tests/clients --ignore-scripts --no-audit --no-fund --loglevel=error
fi

# promtool: tests/test_alerts.py checks deploy/prometheus/alerts.yml with it, tests/test_dashboard.py the queries of
# deploy/grafana/flight-server.json. Only the binary, unpacked from Debian's prometheus package into .tools/
# (installing the package would also start a Prometheus server).
if ! command -v promtool >/dev/null 2>&1 && [ ! -x .tools/prometheus/usr/bin/promtool ]; then
    tools="$(mktemp -d)"
    if ! (cd "$tools" && { apt-get download prometheus >/dev/null 2>&1 \
            || { [ "$(id -u)" = 0 ] && apt-get update -qq && apt-get download prometheus >/dev/null 2>&1; }; }); then
        echo "promtool missing: run 'sudo apt-get install prometheus', or put promtool on PATH" >&2
        exit 1
    fi
    mkdir -p .tools/prometheus
    dpkg-deb --fsys-tarfile "$tools"/prometheus_*.deb | tar -x -C .tools/prometheus ./usr/bin/promtool
    rm -rf "$tools"
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[server,test]'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy  # files and settings: [tool.mypy] in pyproject.toml
# Two test processes (TEST_WORKERS=N for another count, 0 for one): most tests wait on servers they started, so two
# keep two cores busy. Each takes a whole file at a time, with its module's server. A test process that crashes ends
# the run (a replaced one left pytest-xdist waiting once).
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile --max-worker-restart 0 "$@"
