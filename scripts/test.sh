#!/usr/bin/env bash
# Run the whole test suite headless (Xvfb via pytest-xvfb). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
command -v Xvfb >/dev/null || { echo "Xvfb is missing: install the apt package xvfb" >&2; exit 1; }
unset QT_QPA_PLATFORM
.venv/bin/ruff check .
.venv/bin/npe2 validate napari-sdunet
exec .venv/bin/python -m pytest -q "$@"
