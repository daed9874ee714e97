#!/usr/bin/env bash
# Create or refresh .venv with napari-sdunet, PyQt6 and the test tools; install the apt packages
# that Xvfb and Qt need when they are missing. Sourced by the other scripts; safe to re-run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

APT_PKGS=(xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0 libxkbcommon-x11-0 libgl1 libegl1
          libdbus-1-3 libfontconfig1 g++ ninja-build)
missing=()
for p in "${APT_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  echo ">> installing apt packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# torch is pinned here (not in the package) so pip takes the local CPU wheel on these machines.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
[ -x .venv/bin/python ] || { echo ">> creating .venv"; python3 -m venv .venv; }
stamp=".venv/.napari-sdunet-stamp"
want="$(cat setup.cfg pyproject.toml scripts/requirements-dev.txt | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo ">> installing Python packages into .venv (first run takes a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "$TORCH_SPEC" -r scripts/requirements-dev.txt -e .
  echo "$want" > "$stamp"
fi
# Build the fused C++ SDN sweep now (about 30 s, once per machine) rather than on the first Segment;
# without a compiler the package falls back to the slower pure-torch sweep.
.venv/bin/python -m napari_sdunet.models.sdn.cpp >/dev/null 2>&1 || echo ">> note: the C++ sweep did not build; using the pure-torch sweep"
