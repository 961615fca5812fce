#!/usr/bin/env bash
# Headless Chromium for tests/test_report.py (it renders the HTML report): Debian's chromium package, installed
# with apt-get when `chromium` is not on PATH (as root, else through sudo); nothing is done when it is.
#
#   bash scripts/install_chromium.sh
set -euo pipefail
if command -v chromium >/dev/null; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  SUDO="sudo"
fi
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium
chromium --version
