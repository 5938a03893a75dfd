"""One door for checkpoints: a local file, a local directory, or a Hugging Face hub id.

    resolve_file("THUDM/ImageReward", "ImageReward.pt")      # hub repo + default file name
    resolve_file("org/repo/sub/file.pth", "x.pth")            # hub repo + explicit file
    resolve_file("/models/ImageReward.pt", "ImageReward.pt")  # local file
    resolve_file("/models/imagereward", "ImageReward.pt")     # local directory holding the file
"""

from __future__ import annotations

from pathlib import Path

from .errors import ModelLoadError


def resolve_file(spec: str, default_filename: str, what: str) -> Path:
    """Return a local path for `spec`, downloading from the hub when it is a hub id.

    `what` names the thing in error messages ("ImageReward checkpoint", ...).
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path / default_filename
        if candidate.is_file():
            return candidate
        raise ModelLoadError(f"{what}: directory {path} has no {default_filename}")
    if spec.startswith(("/", ".", "~")) or spec.count("/") == 0:
        raise ModelLoadError(f"{what}: no such file or directory: {spec}")
    parts = spec.split("/")
    repo_id = "/".join(parts[:2])
    filename = "/".join(parts[2:]) or default_filename
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except Exception as e:
        raise ModelLoadError(
            f"{what}: could not get {filename!r} from the hub repo {repo_id!r} ({type(e).__name__}: {e}). "
            "Point the config at a local copy of the file, or use the 'tiny' profile offline."
        ) from None
