#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine, then run it.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"

if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "Installing Debian chromium for the browser tests..."
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  else
    echo "chromium is missing and apt-get is not available; browser tests will be skipped" >&2
  fi
fi

# nginx for tests/test_deploy.py (a real proxy in front of two gunicorns). Not
# fatal: without it those tests skip. RUNLEVEL=1 keeps the package from
# starting a system nginx on port 80; the tests run their own.
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "Installing Debian nginx for the deployment tests..."
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    { $SUDO apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $SUDO apt-get install -y -qq nginx >/dev/null; } \
      || echo "could not install nginx; the nginx deployment test will be skipped" >&2
  else
    echo "nginx is missing and apt-get is not available; the nginx deployment test will be skipped" >&2
  fi
fi

# redis-server for the broadcast tests (tests/test_broadcast_redis.py): each
# test starts its own on a free port, without persistence. RUNLEVEL=1 keeps
# the package from starting a system one.
if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "Installing Debian redis-server for the broadcast tests..."
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    { $SUDO apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $SUDO apt-get install -y -qq redis-server >/dev/null; } \
      || echo "could not install redis-server; the Redis broadcast tests will be skipped" >&2
  else
    echo "redis-server is missing and apt-get is not available; the Redis broadcast tests will be skipped" >&2
  fi
fi

"$PYTHON" -m pip install -q --disable-pip-version-check -e ".[test]"
"$PYTHON" -m pytest "$@"

# The project supports Python 3.12 with bokeh 3.10 as well; where that
# interpreter exists (pyenv's here) the suite runs again on it. Set
# DOCSYNC_SECOND_PYTHON to another interpreter, or to "none" to skip.
SECOND="${DOCSYNC_SECOND_PYTHON:-}"
if [ -z "$SECOND" ] && command -v pyenv >/dev/null 2>&1; then
  version="$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.|$)' | sort -V | tail -n 1 || true)"
  [ -n "$version" ] && SECOND="$(pyenv root)/versions/$version/bin/python"
fi
if [ -n "$SECOND" ] && [ "$SECOND" != "none" ] && [ -x "$SECOND" ]; then
  echo "Running the suite again on $("$SECOND" --version) ..."
  "$SECOND" -m pip install -q --disable-pip-version-check -e ".[test]"
  "$SECOND" -m pytest "$@"
fi
