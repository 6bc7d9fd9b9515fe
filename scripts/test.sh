#!/usr/bin/env bash
# Set up everything the test suite needs (a venv, the package, promtool), lint, type-check, and run it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh dev
# promtool (Debian package 'prometheus') checks metric exposition and rules, and a real
# Prometheus scrapes a real server in tests/deploy. Without it the tests that need it are skipped,
# and under CI=true they fail (tests/helpers.py: need_tool).
if ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
    || echo "warning: could not install the Debian package 'prometheus'" >&2
fi
if ! command -v promtool >/dev/null 2>&1; then
  case "${CI:-}" in
    true|TRUE|True|1) echo "error: promtool is missing (Debian package 'prometheus'); with CI=true the tests that need it fail" >&2 ;;
    *) echo "warning: promtool is missing (Debian package 'prometheus'); the tests that need it are skipped" >&2 ;;
  esac
fi
# Debian's chromium runs the playground's browser test (tests/http/test_playground_browser.py);
# Playwright cannot download a browser here. Without it that test is skipped, under CI=true it fails.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install the Debian package 'chromium'" >&2
fi
if [ ! -x /usr/bin/chromium ]; then
  case "${CI:-}" in
    true|TRUE|True|1) echo "error: chromium is missing (Debian package 'chromium'); with CI=true the browser test fails" >&2 ;;
    *) echo "warning: chromium is missing (Debian package 'chromium'); the browser test is skipped" >&2 ;;
  esac
fi
.venv/bin/ruff check service training tests benchmarks
.venv/bin/ruff format --check service training tests benchmarks
.venv/bin/mypy service training
.venv/bin/python -m pytest "$@"
