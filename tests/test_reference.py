"""A parity test whose reference environment is missing skips when run by hand and fails under
T2I_REQUIRE_REFERENCES=1 (scripts/test.sh, hence CI), saying how to build it (tests/reference.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARITY_TEST = "tests/test_imagereward.py::test_parity_with_reference_package"


@pytest.mark.parametrize(("required", "outcome"), [("1", "1 failed"), ("0", "1 skipped")])
def test_a_missing_reference_fails_only_when_required(tmp_path, required, outcome):
    env = {**os.environ, "T2I_REFERENCE_DIR": str(tmp_path / "empty"), "T2I_REQUIRE_REFERENCES": required}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", PARITY_TEST],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert outcome in run.stdout, run.stdout[-2000:]
    assert f"reference environment {tmp_path / 'empty' / 'imagereward'} is not built" in run.stdout
    assert "bash scripts/reference_envs.sh imagereward" in run.stdout
    assert not (tmp_path / "empty").exists()  # nothing was made for a reference that is not there
