#!/usr/bin/env bash
# Builds an isolated virtual environment holding the reference HPSv3 package (hpsv3 1.0.0 from PyPI) with the
# transformers it pins (4.45.2), for parity and speed comparisons. Usage: setup_env.sh [VENV_DIR]
# (default /tmp/hpsv3-ref).
# hpsv3 is installed without its dependencies: it asks for deepspeed (an sdist whose build pulls a second torch),
# opencv, diffusers and timm, which its inference path never imports; what that path imports is listed here.
# torch 2.14.1 and torchvision 0.29.1 are the releases on this machine's disk (pip takes them from there).
set -euo pipefail
venv=${1:-/tmp/hpsv3-ref}
if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
py="$venv/bin/python"
"$py" -m pip install -q -U pip
"$py" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" "transformers==4.45.2" "tokenizers<0.21" \
  "huggingface_hub<1" "peft==0.13.2" "trl==0.11.4" "accelerate<1.3" "datasets<4" "numpy<2.3" \
  pandas matplotlib tensorboard fire omegaconf pyyaml requests safetensors pillow tqdm packaging rich
"$py" -m pip install -q --no-deps "hpsv3==1.0.0"
"$py" -c "import hpsv3.inference" 2>/dev/null && echo "reference ready: $venv"
