#!/usr/bin/env bash
# LAFS's three stages in miniature on celeb24: stage 0 (labels), stage 1 (no labels: LAFS with the
# stage-0 landmarks, with grid and detector landmarks, the DINO-face baseline), stage 2 (few-shot),
# two seeds side by side, one table (docs/results.md). Arguments go to examples/pipeline.py (--help).
# Run from the repository root after README command 1 or 2 (it uses .venv when present).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" examples/pipeline.py "$@"
