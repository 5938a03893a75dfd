"""The reference implementations that the parity tests compare our experts against (docs/parity.md): where
their environments and random full-size checkpoints live, and what a parity test does when one is missing.

scripts/reference_envs.sh builds each environment into REFERENCE_DIR/<name> and marks it complete; the
checkpoints are made here on first use, into REFERENCE_DIR/checkpoints, and the reference's scores are kept in
REFERENCE_DIR/scores, so a second run on the same machine neither rebuilds nor rescores the reference (our side
is always computed afresh). Under T2I_REQUIRE_REFERENCES=1 (scripts/test.sh, hence CI) a reference that is
missing or cannot be made fails its test; without it (pytest by hand) the test skips and says why.
"""

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest

REFERENCE_DIR = Path(
    os.environ.get("T2I_REFERENCE_DIR")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "t2i-reward" / "reference"
)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference"  # ../shared/reference beside the repository
REPO_RECIPES = Path(__file__).resolve().parents[1] / "scripts" / "reference"  # recipes kept in the repository
REQUIRED = os.environ.get("T2I_REQUIRE_REFERENCES") == "1"


def unavailable(reason: str) -> NoReturn:
    """Skip, or under T2I_REQUIRE_REFERENCES=1 fail: CI must not pass with a parity test that never ran."""
    if REQUIRED:
        pytest.fail(f"{reason} (T2I_REQUIRE_REFERENCES=1: a parity test must run, not skip; see docs/parity.md)",
                    pytrace=False)
    pytest.skip(reason)


def script(relative: str) -> Path:
    """A reference script of ../shared/reference, e.g. 'hpsv2/ref_hpsv2.py', or of the repository's
    scripts/reference (hpsv3's)."""
    path = SHARED / relative
    if not path.is_file():
        path = REPO_RECIPES / relative
    if not path.is_file():
        unavailable(f"reference script {path} not found")
    return path


def python(name: str) -> Path:
    """The interpreter of the reference environment `name`, which scripts/reference_envs.sh has finished building."""
    env = REFERENCE_DIR / name
    if not (env / ".complete").is_file():
        log = REFERENCE_DIR / f"{name}.log"
        unavailable(f"reference environment {env} is not built: bash scripts/reference_envs.sh {name}"
                    + (f" (the last build's log: {log})" if log.is_file() else ""))
    return env / "bin" / "python"


def checkpoint(name: str, gib: float, python: Path | str, maker: Path) -> Path:
    """REFERENCE_DIR/checkpoints/<name>: random full-size weights in the released format, written by
    `python maker make PATH` on first use (a file or a folder, as the maker writes). It is made under another
    name and renamed when complete, so an interrupted make is never taken for a checkpoint; a lock keeps two
    test runs on one machine from making it twice."""
    folder = REFERENCE_DIR / "checkpoints"
    path = folder / name
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():  # another run made it while we waited
            return path
        free_disk = shutil.disk_usage(folder).free / 2**30
        free_ram = _available_memory_gib()
        if free_disk < gib + 1 or free_ram < 2 * gib:
            unavailable(f"making {path} needs {gib + 1:.0f} GiB of disk and {2 * gib:.0f} GiB of free memory "
                        f"(free: {free_disk:.1f} GiB, {free_ram:.1f} GiB)")
        partial = folder / f"{name}.partial"
        if partial.is_dir():  # left by an interrupted make
            shutil.rmtree(partial)
        partial.unlink(missing_ok=True)
        made = subprocess.run([str(python), str(maker), "make", str(partial)], capture_output=True, text=True)
        if made.returncode != 0:
            raise AssertionError(f"{maker} make failed ({made.returncode}):\n{made.stderr[-3000:]}")
        os.replace(partial, path)
    return path


def _available_memory_gib() -> float:
    """Memory the kernel can hand out (MemAvailable: free pages plus the page cache it can drop, which writing
    a checkpoint fills; the free pages alone understate it by gigabytes)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30


def scores(python: Path | str, maker: Path, *args) -> list:
    """A reference implementation's scores: `python maker *args` prints them as its last line of JSON. Kept in
    REFERENCE_DIR/scores, keyed by the interpreter (and the recipe its environment was built by), the script's
    text and the arguments: images by their bytes, checkpoints and folders by their names, sizes and times."""
    marker = Path(python).parents[1] / ".complete"
    key = hashlib.sha256(f"{python}\n{marker.read_text() if marker.is_file() else ''}\n".encode() + maker.read_bytes())
    for a in map(str, args):
        p = Path(a)
        try:
            p.exists()
        except OSError:  # a long prompt is no path
            p = Path("/nonexistent")
        if p.is_file() and p.stat().st_size < 2**24:  # an image: its bytes
            key.update(b"file:" + hashlib.sha256(p.read_bytes()).digest())
        elif p.is_file():  # a checkpoint: its path, size and time
            key.update(f"ckpt:{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode())
        elif p.is_dir():
            key.update(b"dir:" + "|".join(f"{c.name}:{c.stat().st_size}:{c.stat().st_mtime_ns}"
                                          for c in sorted(p.iterdir())).encode())
        else:
            key.update(b"arg:" + a.encode())
    cached = REFERENCE_DIR / "scores" / f"{key.hexdigest()}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    out = subprocess.run([str(python), str(maker), *map(str, args)], capture_output=True, text=True)
    if out.returncode != 0:
        raise AssertionError(f"the reference {maker.name} {args[0]} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    scores = json.loads(out.stdout.strip().splitlines()[-1])
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")  # written whole, then renamed: a reader never sees half
    tmp.write_text(json.dumps(scores))
    os.replace(tmp, cached)
    return scores
