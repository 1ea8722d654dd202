#!/usr/bin/env bash
# Serve the example apps (examples/apps/) on http://localhost:5006.
# Usage: scripts/serve-examples.sh [flask-docsync serve options...]
#   e.g. scripts/serve-examples.sh --port 8080 --address 127.0.0.1
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"

"$PYTHON" -m pip install -q --disable-pip-version-check -e .

exec "$PYTHON" -m flask_docsync serve \
  examples/apps/sliders.py examples/apps/streaming.py examples/apps/crossfilter "$@"
