"""One door for checkpoint specs: every expert resolves its weights files through `resolve_checkpoint`.

    resolve_checkpoint("THUDM/ImageReward", "ImageReward.pt", "ImageReward checkpoint")   # hub repo + default file
    resolve_checkpoint("org/repo/sub/file.pth", "x.pth", ...)                               # hub repo + explicit file
    resolve_checkpoint("/models/ImageReward.pt", "ImageReward.pt", ...)                     # local file
    resolve_checkpoint("/models/imagereward", "ImageReward.pt", ...)                        # local directory holding it
    resolve_checkpoint("tiny", "ImageReward.pt", ..., tiny=("imagereward", build, cache))   # tiny model, built on first use
    resolve_checkpoint("random", ...)                                                       # no file: random weights

The answer is a `Checkpoint`: the local path (None for `random`) and whether the weights are random.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import ModelLoadError
from .tiny import tiny_dir

TINY, RANDOM = "tiny", "random"


@dataclass(frozen=True)
class Checkpoint:
    spec: str
    path: Optional[Path]  # None: random weights, nothing to load
    random_weights: bool


TinySource = tuple[str, Callable[[Path], None], Path]  # (name, build(folder), cache_dir)


def resolve_checkpoint(spec: str, filename: str, what: str, tiny: Optional[TinySource] = None) -> Checkpoint:
    """Resolve `spec` to a local file named `filename` (or the file it names), downloading hub files.

    `what` names the thing in error messages ("ImageReward checkpoint", ...). `tiny` is the expert's
    tiny-model source: a name, the builder that writes `filename` into a folder, and the cache.
    """
    if spec == RANDOM:
        return Checkpoint(spec, None, True)
    if spec == TINY:
        if tiny is None:
            raise ModelLoadError(f"{what}: there is no tiny model for it; give a checkpoint")
        name, build, cache_dir = tiny
        return Checkpoint(spec, _in_dir(tiny_dir(cache_dir, name, build), filename, what), True)
    path = Path(spec).expanduser()
    if path.is_file():
        return Checkpoint(spec, path, False)
    if path.is_dir():
        return Checkpoint(spec, _in_dir(path, filename, what), False)
    if spec.startswith(("/", ".", "~")) or spec.count("/") == 0:
        raise ModelLoadError(f"{what}: no such file or directory: {spec}")
    parts = spec.split("/")
    repo_id = "/".join(parts[:2])
    file_in_repo = "/".join(parts[2:]) or filename
    try:
        from huggingface_hub import hf_hub_download

        return Checkpoint(spec, Path(hf_hub_download(repo_id=repo_id, filename=file_in_repo)), False)
    except Exception as e:
        raise ModelLoadError(
            f"{what}: could not get {file_in_repo!r} from the hub repo {repo_id!r} ({type(e).__name__}: {e}). "
            "Point the config at a local copy of the file, or use the 'tiny' profile offline."
        ) from None


def _in_dir(folder: Path, filename: str, what: str) -> Path:
    candidate = folder / filename
    if candidate.is_file():
        return candidate
    raise ModelLoadError(f"{what}: directory {folder} has no {filename}")
