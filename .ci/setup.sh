#!/usr/bin/env bash
# Builds .venv: the test/dev environment (CPU). Idempotent: does nothing when .venv is complete.
# torch comes from the pinned pair that also has a working torchvision (ldm and open_clip import
# torchvision at module level); pip takes both from the machine's local wheel store when present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=.venv
STAMP=$VENV/.complete-v3
if [ -f "$STAMP" ]; then exit 0; fi
"$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip install --disable-pip-version-check -q"
$PIP -c .ci/constraints.txt torch torchvision
# sdkit ships Stability's ldm package; its own pins are ancient and conflict: install it alone.
$PIP --no-deps stable-diffusion-sdkit==2.1.5
$PIP -c .ci/constraints.txt -r .ci/requirements-test.txt 2>&1 | grep -v "dependency resolver\|^stable-diffusion-sdkit " || true
"$VENV/bin/python" -c "import torch, torchvision, ldm.models.diffusion.ddpm, open_clip, transformers, safetensors" 2>/dev/null \
  || { "$VENV/bin/python" -c "import ldm.models.diffusion.ddpm"; exit 1; }
touch "$STAMP"
