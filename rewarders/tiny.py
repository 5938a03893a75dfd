"""Where tiny random-weight models live: one folder per model under `cache_dir/tiny-v{N}/`, built on first use.

Each expert (and the CLIP backbone) owns the builder of its tiny model, which writes files in exactly the
format of the published checkpoint it imitates, so they load through the real code path. Their scores
are meaningless, and every expert built from them reports `random_weights: true`.
This module only knows how to build a folder once, atomically; it imports nothing of the package.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

TINY_VERSION = "2"  # bump when a tiny architecture changes, so stale caches are rebuilt
MARKER = "COMPLETE"


def tiny_dir(cache_dir: str | os.PathLike, name: str, build: Callable[[Path], None]) -> Path:
    """`cache_dir/tiny-v{N}/{name}`, written by `build(folder)` unless it is there already."""

    def build_marked(tmp: Path) -> None:
        build(tmp)
        (tmp / MARKER).write_text("random weights: these models are for tests and demos only\n")

    return build_once(Path(cache_dir) / f"tiny-v{TINY_VERSION}" / name, MARKER, build_marked)


def build_once(root: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp)` into a temporary sibling of `root` and rename it to `root`, unless `root/marker`
    exists: concurrent first uses never see half-written files, and the loser of a race keeps the winner's."""
    if (root / marker).is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        build(tmp)
        try:
            tmp.rename(root)
        except OSError:
            if not (root / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
