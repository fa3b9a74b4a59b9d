#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian/Ubuntu machine, then runs them.
# Usage: bash scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

# PostgreSQL server binaries: the tests start a throwaway cluster of their own.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
        echo "PostgreSQL server binaries are missing: run 'sudo apt-get install postgresql'" >&2
        exit 1
    fi
fi

# docker-compose (Compose v1, Debian's package): validates docker-compose.yml; no Docker engine is needed.
if ! command -v docker-compose >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
    else
        echo "docker-compose is missing: run 'sudo apt-get install docker-compose'" >&2
        exit 1
    fi
fi

# g++: tests/test_cpp_client.py builds a C++ Flight client against pyarrow's headers and libraries.
if ! command -v g++ >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
    else
        echo "g++ is missing: run 'sudo apt-get install g++'" >&2
        exit 1
    fi
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[server,test]'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy  # files and settings: [tool.mypy] in pyproject.toml
exec .venv/bin/python -m pytest "$@"
