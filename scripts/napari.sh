#!/usr/bin/env bash
# Open napari with the napari-sdunet widgets docked and a real sample image loaded.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec .venv/bin/python -m napari_sdunet.demo "$@"
