#!/usr/bin/env bash
# Optional (not run by CI: it downloads a ~2.5 GB CUDA build of torch 2.1.2): runs the CPU test suite
# on the WebUI v1.10.1 default stack (torch 2.1.2, lycoris-lora 4.0.0, bitsandbytes 0.45.5), the floor
# this extension supports. Builds .venv-torch21 once.
set -euo pipefail
cd "$(dirname "$0")/.."
V=.venv-torch21
if [ ! -f "$V/.complete" ]; then
  python3.11 -m venv "$V"
  "$V/bin/pip" install -q torch==2.1.2 torchvision==0.16.2 numpy==1.26.2
  "$V/bin/pip" install -q --no-deps stable-diffusion-sdkit==2.1.5
  "$V/bin/pip" install -q pytorch_lightning==1.9.4 omegaconf==2.2.3 einops==0.4.1 transformers==4.30.2 \
    open-clip-torch==2.20.0 safetensors==0.4.2 numpy==1.26.2 "setuptools>=69,<81" Pillow tensorboard pytest \
    torch==2.1.2 torchvision==0.16.2 lycoris-lora==4.0.0 prodigyopt dadaptation lion-pytorch schedulefree \
    came-pytorch "bitsandbytes<=0.45.5" 2>&1 | grep -v "dependency resolver\|^stable-diffusion-sdkit " || true
  touch "$V/.complete"
fi
OMP_NUM_THREADS=1 "$V/bin/python" -m pytest -q -p no:cacheprovider "$@"
