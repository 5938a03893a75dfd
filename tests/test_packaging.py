"""What `pip install .` puts into site-packages: one import root, `t2i_reward`, whose subpackages import from
the repository root and from anywhere else, installed from the wheel or editable."""

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = ["t2i_reward", "t2i_reward.cli", "t2i_reward.rewarders", "t2i_reward.rewarders.experts.imagereward",
           "t2i_reward.prompter", "t2i_reward.finetune", "t2i_reward.finetune.worker", "t2i_reward.service",
           "t2i_reward.service.app"]
CHECK = ("import importlib, json, sys; "
         f"print(json.dumps({{m: importlib.import_module(m).__file__ for m in {IMPORTS!r}}}))")


def imported_from(python: str, cwd: Path) -> dict[str, str]:
    import json

    done = subprocess.run([python, "-c", CHECK], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (found,) = out.glob("t2i_reward-*.whl")
    return found


def test_the_wheel_has_one_import_root(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"t2i_reward"}
    for module in IMPORTS:
        path = module.replace(".", "/")
        assert f"{path}.py" in names or f"{path}/__init__.py" in names, module
    assert "t2i_reward/rewarders/data/calibration-tiny.json" in names  # package data travels too
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "t2i-reward = t2i_reward.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_wheel_installs_into_a_fresh_environment(wheel, tmp_path):
    """A fresh virtual environment gets the wheel (its dependencies are this environment's, seen through a
    plain path in a .pth file, so this environment's editable install is not seen there)."""
    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=300)
    python = str(env / "bin" / "python")
    done = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "project-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = {p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".pth"))
                 and p.name not in ("pip", "_distutils_hack", "setuptools", "pkg_resources", "__pycache__")}
    assert installed == {"t2i_reward"}
    for cwd in (ROOT, tmp_path):  # the repository's folders shadow nothing
        files = imported_from(python, cwd)
        assert all(Path(f).is_relative_to(site / "t2i_reward") for f in files.values()), files
    done = subprocess.run([str(env / "bin" / "t2i-reward"), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "serve" in done.stdout, done.stderr[-3000:]


def test_the_editable_install_imports_the_repository(tmp_path):
    """This environment's `pip install -e .`: the same names, read from the repository's folders."""
    for cwd in (ROOT, tmp_path):
        files = imported_from(sys.executable, cwd)
        assert Path(files["t2i_reward.rewarders"]) == ROOT / "rewarders" / "__init__.py"
        assert Path(files["t2i_reward.cli"]) == ROOT / "src" / "t2i_reward" / "cli.py"
        assert Path(files["t2i_reward.service.app"]) == ROOT / "service" / "app.py"
