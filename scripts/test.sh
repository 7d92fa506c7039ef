#!/usr/bin/env bash
# The README's test command: every test, servers and the browser end-to-end included.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -p no:cacheprovider --timeout=900 "$@"
