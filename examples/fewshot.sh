#!/usr/bin/env bash
# The paper's few-shot claim in miniature on celeb24: pre-train three ways, fine-tune few-shot, one
# table of held-out accuracy (docs/results.md). Arguments go to examples/fewshot.py (--help).
# Run from the repository root after README command 1 or 2 (it uses .venv when present).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" examples/fewshot.py "$@"
