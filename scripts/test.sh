#!/usr/bin/env bash
# Installs the project with its test extras into ./.venv (created if missing) and runs the test suite.
# Extra arguments go to pytest. The first run downloads torch (several GB) and takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${T2I_REWARD_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".[test,docs]"
export HF_HUB_OFFLINE=1  # tests never download: a hub id must fail fast with our error
exec "$venv/bin/python" -m pytest -q -rs "$@"
