#!/usr/bin/env bash
# Installs the project with its test extras into ./.venv (created if missing) and runs the test suite.
# Extra arguments go to pytest. The first run downloads torch (several GB) and takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${T2I_REWARD_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".[test,docs,ray]"  # ray: tests/test_ray.py's two-node cluster
export HF_HUB_OFFLINE=1  # tests never download: a hub id must fail fast with our error
# The parity tests' reference environments (docs/parity.md), built once per machine. With them required, a
# parity test whose reference is missing fails instead of skipping; T2I_REQUIRE_REFERENCES=0 neither builds
# them nor requires them (the parity tests then skip).
export T2I_REQUIRE_REFERENCES=${T2I_REQUIRE_REFERENCES:-1}
if [ "$T2I_REQUIRE_REFERENCES" = 1 ]; then
    bash scripts/reference_envs.sh || echo "a reference environment failed to build: its parity tests will fail"
fi
exec "$venv/bin/python" -m pytest -q -rs "$@"
