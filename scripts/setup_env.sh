#!/usr/bin/env bash
# Create (or update) the project environment in .venv from requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements.txt
  echo "$want" > "$stamp"
fi
# hivemind's p2pd is UPX-packed: unpack it once into the user's cache, so that the daemons of a host share its code
.venv/bin/python -W ignore -c "import peer_synchronization as s; print('p2pd:', s.prepare_daemon_binary())"
