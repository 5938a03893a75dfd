"""The container files: no Docker engine runs here, so check what can be checked without one."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian package) not installed")
def test_compose_file_is_valid():
    for args in ([], ["--profile", "cpu"]):
        done = subprocess.run(["docker-compose", "-f", "compose.yaml", *args, "config", "-q"], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_compose_services():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    gpu, cpu = compose["services"]["service"], compose["services"]["service-cpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "deploy" not in cpu and cpu["profiles"] == ["cpu"] and cpu["environment"]["T2I_SERVICE_PROFILE"] == "tiny"
    for svc in (gpu, cpu):
        assert svc["build"]["dockerfile"] == "docker/service.Dockerfile"
        assert any(v.endswith(":/cache") for v in svc["volumes"])  # model caches on a volume


def test_service_dockerfile():
    text = (ROOT / "docker/service.Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+runtime", text, re.M)
    assert re.search(r"^USER app$", text, re.M)  # not root
    assert "HEALTHCHECK" in text and "/readyz" in text
    assert 'CMD ["t2i-reward", "serve"]' in text
    for package in ("rewarders", "prompter", "service", "t2i_reward"):
        assert f"COPY {package} ./{package}" in text  # every package the console script imports
