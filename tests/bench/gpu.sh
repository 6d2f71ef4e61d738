#!/usr/bin/env bash
# The speed benchmark on a machine with one NVIDIA GPU: random-weight full-size SD1.5 (512², batch 1/4/8)
# and SDXL (1024², batch 1/4), UNet-only LoRA rank 32, bf16, SDPA, AdamW, latents and text outputs cached;
# one JSON line per case and implementation (ours vs a plain reference step; see lora_trainer/bench.py).
#   bash tests/bench/gpu.sh                    # the GPU cases
#   bash tests/bench/gpu.sh --model tiny --device cpu --steps 2    # any bench arguments: how CI runs it
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || { bash .ci/setup.sh && PY=.venv/bin/python; }
if [ $# -gt 0 ]; then
    exec "$PY" -m lora_trainer bench "$@"
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: no CUDA device here')"
"$PY" -c "import torch; print('#', torch.__version__, torch.cuda.get_device_name(0))"
"$PY" -m lora_trainer bench --model sd15 --device cuda --steps 20 --warmup 5
"$PY" -m lora_trainer bench --model sdxl --device cuda --steps 10 --warmup 3
