#!/usr/bin/env bash
# Set up everything the test suite needs (a venv, the package, promtool) and run it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
# promtool (Debian package 'prometheus') checks metric exposition and rules.
if ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
    || echo "warning: could not install the prometheus package; tests needing promtool will be skipped" >&2
fi
.venv/bin/ruff check service training tests benchmarks
.venv/bin/ruff format --check service training tests benchmarks
.venv/bin/mypy service training
.venv/bin/python -m pytest "$@"
