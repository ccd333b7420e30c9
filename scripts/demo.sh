#!/usr/bin/env bash
# Set up .venv if needed, then run a small offline demo: 8 peers, MNIST, 30 rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
DATA_DIR="${DATA_DIR:-}"
if [ -z "$DATA_DIR" ]; then
  if [ -d ../shared/data/MNIST/raw ]; then DATA_DIR=../shared/data; else DATA_DIR=./data; fi
fi
exec .venv/bin/python mar_fl.py --np 8 --gs 2 --gk 3 --ni 3 --iv 4 --rounds 30 --tf 5 -sd 42 \
  --data-dir "$DATA_DIR" --wandb offline "$@"
