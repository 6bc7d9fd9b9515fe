#!/usr/bin/env bash
# Set up everything the test suite needs (a venv, the package, promtool), lint, type-check, and run it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh dev
# promtool (Debian package 'prometheus') checks metric exposition and rules, and a real
# Prometheus scrapes a real server in tests/deploy.
if ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
    || echo "warning: could not install the prometheus package; tests needing promtool will be skipped" >&2
fi
.venv/bin/ruff check service training tests benchmarks
.venv/bin/ruff format --check service training tests benchmarks
.venv/bin/mypy service training
.venv/bin/python -m pytest "$@"
