#!/usr/bin/env bash
# README's first command: install, then the whole pipeline on the toy corpus on CPU (demo.py says what it runs).
set -euo pipefail
cd "$(dirname "$0")"
pip install -q -r requirements.txt
python demo.py "$@"
