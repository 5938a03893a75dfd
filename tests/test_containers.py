"""The container files: no Docker engine runs here, so check what can be checked without one."""

import re
import tomllib
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


@pytest.fixture(scope="module")
def services():
    if shutil.which("docker-compose"):  # the resolved file: anchors and merges applied by compose itself
        text = subprocess.run(["docker-compose", "-f", "compose.yaml", "--profile", "cpu", "config"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout
    else:  # unresolved: ${VAR:-default} read as compose reads it with VAR unset
        text = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", (ROOT / "compose.yaml").read_text())
    return yaml.safe_load(text)["services"]


def test_compose_services(services):
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and any(str(v).endswith("/data") or "redis-data" in str(v) for v in redis["volumes"])
    assert "redis-cli" in str(redis["healthcheck"]["test"])
    for name, target in (("service", "service"), ("worker", "worker"), ("service-cpu", "service"), ("worker-cpu", "worker")):
        svc = services[name]
        assert svc["build"]["target"] == target
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"  # both wait for a healthy Redis
        assert any("/jobs" in str(v) for v in svc["volumes"])  # the shared artifacts volume
        gpu = "deploy" in svc
        assert gpu == (name in ("service", "worker"))  # a GPU each; the cpu variants none
    assert services["worker"]["environment"]["T2I_SERVICE_REWARD_SERVICE_URL"] == "http://service:8000"
    assert services["worker-cpu"]["environment"]["T2I_SERVICE_PROFILE"] == "tiny"
    assert services["service-cpu"]["environment"]["T2I_SERVICE_PROFILE"] == "tiny"


def test_redis_needs_its_password_and_the_api_scales_out(services):
    redis = services["redis"]
    password = redis["command"][redis["command"].index("--requirepass") + 1]
    assert password and redis["environment"]["REDIS_PASSWORD"] == password  # the healthcheck authenticates too
    for name in ("service", "worker", "service-cpu", "worker-cpu"):
        assert services[name]["environment"]["T2I_SERVICE_REDIS_URL"] == f"redis://:{password}@redis:6379/0"
    assert int(services["service"]["deploy"]["replicas"]) >= 1


def test_workers_stop_within_their_grace_period_and_redis_never_evicts(services):
    """A worker's shutdown bound is under compose's grace period (else the SIGKILL comes first and the job loses
    its steps since the last checkpoint); Redis caps its memory and refuses writes when full rather than
    evicting job state (the API answers 503)."""
    from t2i_reward.finetune.settings import FinetuneSettings

    command = services["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction" and command[command.index("--maxmemory") + 1]
    for name in ("worker", "worker-cpu"):
        value, unit = re.fullmatch(r"(\d+)(s|m)", services[name]["stop_grace_period"]).groups()
        grace = int(value) * (60 if unit == "m" else 1)
        bound = float(services[name]["environment"]["T2I_SERVICE_SHUTDOWN_TIMEOUT_S"])
        assert bound == FinetuneSettings.model_fields["shutdown_timeout_s"].default and bound < grace, (name, bound, grace)


def test_dockerfile_targets():
    text = (ROOT / "docker/Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+runtime\S* AS base", text, re.M)
    assert re.search(r"^USER app$", text, re.M)  # not root
    service = text.split("FROM base AS service")[1].split("FROM base AS worker")[0]
    worker = text.split("FROM base AS worker")[1]
    assert "HEALTHCHECK" in service and "/readyz" in service and 'CMD ["t2i-reward", "serve"]' in service
    assert "HEALTHCHECK" in worker and 'CMD ["t2i-reward", "worker"]' in worker
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for folder in {f.split("/")[0] for f in setuptools["package-dir"].values()}:
        assert f"COPY {folder} ./{folder}" in text  # every folder the installed package is built from
    stand_ins = re.search(r"RUN for p in ([^;]+);", text).group(1).split()
    folders = setuptools["package-dir"]
    for package in setuptools["packages"]:  # the dependency layer installs with an empty stand-in for each
        root = max((p for p in folders if package == p or package.startswith(p + ".")), key=len)
        assert folders[root] + package[len(root):].replace(".", "/") in stand_ins, package
