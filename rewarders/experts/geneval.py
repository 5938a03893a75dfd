"""geneval: GenEval's object-level check of an image against its record (tag, include, exclude), as a reward.

Per image: a Mask2Former instance detector (transformers' `Mask2FormerForUniversalSegmentation`; default
`facebook/mask2former-swin-small-coco-instance`, GenEval's architecture: Swin-S, COCO instances) finds the
objects; the colours GenEval asks about are classified zero-shot by the shared CLIP (default
`ViT-L-14/openai`, GenEval's) on each object's crop, its background greyed out (#999) by its mask; then
`geneval_rules` judges the record. The score is our partial reward in [0, 1] (1 exactly when GenEval's
correctness is 1); extras: `correct` (GenEval's 0/1), `flow_grpo_score` and `flow_grpo_strict` (Flow-GRPO's
reward server's `scores` and `strict_rewards`, which `geneval_rules.flow_grpo_answer` assembles into its
answer). `summarize` gives per-tag means.

Detector post-processing is mmdet's (GenEval's detector code, `MaskFormerFusionHead.instance_postprocess`):
the top 100 of all (query, class) probabilities, each query's mask logits upsampled bilinearly to the input
size, mask = logits > 0, score = class probability x mean sigmoid inside the mask, box = the mask's extent
(x2, y2 exclusive). transformers' own `post_process_instance_segmentation` differs (it resizes masks through
a fixed 384 x 384 grid and thresholds the scores itself), so it is not used.

Input: the image resized (short side, bicubic) and center-cropped to `image_size` (800 by default: the test
scale of GenEval's mmdet config and of the Detectron2 release alike, for square images), plain [0, 1] RGB;
the detector's normalisation comes from the checkpoint's `preprocessor_config.json`. Crops for the colours are
cut from those pixels. Not differentiable (detections are discrete).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field

from .. import geneval_rules as rules
from ..checkpoints import TINY
from ..errors import InvalidRequestError, ModelLoadError
from ..images import Preprocess
from ..invariance import fixed_passes
from ..registry import Expert, ExpertConfig, ExpertOutput, register_expert
from .pickscore import resolve_folder

log = logging.getLogger(__name__)

DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE_DIVISOR = 32  # mmdet and the Detectron2 release pad the input to a multiple of 32

# Mask2Former Swin-S COCO instance (the released architecture), for `random`
SWIN_S = dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7, drop_path_rate=0.3,
              out_features=["stage1", "stage2", "stage3", "stage4"])
TINY_SWIN = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=7,
                 out_features=["stage1", "stage2", "stage3", "stage4"])
TINY_HEAD = dict(num_queries=16, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_layers=1, decoder_layers=2,
                 num_attention_heads=2, dim_feedforward=64, encoder_feedforward_dim=64)


def coco_id2label() -> dict[int, str]:
    """The released checkpoints' labels: COCO's 80 thing classes in mmdet's order, under COCO's own names."""
    return {i: rules.DETECTOR_NAMES.get(name, name) for i, name in enumerate(rules.COCO_CLASSES)}


def detector_config(backbone: dict, **head):
    from transformers import Mask2FormerConfig, SwinConfig

    labels = coco_id2label()
    return Mask2FormerConfig(backbone_config=SwinConfig(**backbone), num_labels=80, id2label=labels,
                             label2id={v: k for k, v in labels.items()}, use_pretrained_backbone=False, **head)


def build_tiny(out: Path) -> None:
    """A tiny random Mask2Former in the released layout (config.json with the COCO id2label,
    model.safetensors, preprocessor_config.json)."""
    from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    torch.manual_seed(11)
    model = Mask2FormerForUniversalSegmentation(detector_config(TINY_SWIN, **TINY_HEAD)).eval()
    with torch.no_grad():
        # random class logits are nearly flat over 81 classes (nothing would pass 0.3): sharpen them, so
        # the tiny detector finds objects, and scores and tests have something to judge
        model.class_predictor.weight.mul_(60.0)
    model.save_pretrained(out, safe_serialization=True)
    Mask2FormerImageProcessor(size={"shortest_edge": 800, "longest_edge": 1333}, size_divisor=SIZE_DIVISOR,
                              image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
                              num_labels=80, ignore_index=255).save_pretrained(out)


class GenEvalConfig(ExpertConfig):
    detector: str = Field(DEFAULT_DETECTOR, description="Mask2Former COCO instance checkpoint: a transformers folder (config.json, model.safetensors or pytorch_model.bin, preprocessor_config.json), a hub repo, 'tiny' or 'random' (the Swin-S architecture).")
    clip: str = Field("ViT-L-14/openai", description="CLIP for the zero-shot colours (GenEval's: OpenAI ViT-L/14), shared with the other CLIP experts; any CLIP spec or 'tiny'.")
    image_size: int = Field(800, ge=64, le=2048, description="The detector's input: the image's short side resized to this (bicubic) and center-cropped square; 800 is GenEval's test scale.")
    threshold: float = Field(rules.THRESHOLD, ge=0, le=1, description="An object counts when its score is above this (GenEval: 0.3).")
    counting_threshold: float = Field(rules.COUNTING_THRESHOLD, ge=0, le=1, description="The same for records tagged 'counting' (GenEval: 0.9).")
    max_objects: int = Field(rules.MAX_OBJECTS, ge=1, le=100, description="At most this many objects of a class, the most confident (GenEval: 16).")
    max_overlap: float = Field(rules.MAX_OVERLAP, gt=0, le=1, description="NMS: drop a box whose IoU with a more confident one of its class reaches this; 1.0 (GenEval's default) keeps all.")
    position_margin: float = Field(rules.POSITION_MARGIN, ge=0, le=1, description="Relative positions ignore offsets up to this fraction of both boxes' summed sizes (GenEval: 0.1).")
    max_detections: int = Field(100, ge=1, le=1000, description="The detector's top (query, class) pairs kept before thresholds (mmdet's max_per_image: 100).")
    crop_background: tuple[int, int, int] = Field((153, 153, 153), description="RGB filled outside an object's mask in its colour crop (GenEval's #999).")


@register_expert
class GenEvalExpert(Expert):
    """Partial GenEval reward in [0, 1]; extras `correct`, `flow_grpo_score`, `flow_grpo_strict`."""

    name = "geneval"
    Config = GenEvalConfig
    default_mean = 0.5  # a fraction of requirements met: centred on half
    default_std = 0.25
    build_tiny = staticmethod(build_tiny)
    uses_metadata = True
    metadata_fields = ("tag", "include")
    extras = ("correct", "flow_grpo_score", "flow_grpo_strict")

    def __init__(self, detector, clip, cfg: GenEvalConfig, norm: tuple[tuple, tuple], checkpoint: str, random_weights: bool):
        # clip_spec stays None: the mixture must not run CLIP on whole images for this expert, which only
        # classifies crops; the backbone is still the shared object (one copy of its weights)
        super().__init__(Preprocess(cfg.image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), checkpoint, random_weights)
        self.detector = detector
        self.clip = clip
        self.cfg = cfg
        self.register_buffer("det_mean", torch.tensor(norm[0], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("det_std", torch.tensor(norm[1], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        names = [detector.config.id2label[i] for i in range(detector.config.num_labels)]
        self.class_names = [_geneval_name(n) for n in names]
        self._colour_weights: dict[str, torch.Tensor] = {}  # class -> (10, D) zero-shot classifier

    @classmethod
    def from_config(cls, cfg: GenEvalConfig, ctx) -> "GenEvalExpert":
        from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

        tiny = ctx.tiny_source(cls)
        folder = resolve_folder(cfg.detector, ("config.json", "preprocessor_config.json"), "GenEval detector", tiny,
                                optional=WEIGHT_FILES)
        try:
            if folder is None:
                torch.manual_seed(ctx.seed + 5)
                model = Mask2FormerForUniversalSegmentation(detector_config(SWIN_S))
                norm = (IMAGENET_MEAN, IMAGENET_STD)
            else:
                model = Mask2FormerForUniversalSegmentation.from_pretrained(folder, dtype=torch.float32)
                proc = Mask2FormerImageProcessor.from_pretrained(folder)
                norm = (tuple(proc.image_mean), tuple(proc.image_std))
        except Exception as e:
            raise ModelLoadError(f"cannot load the GenEval detector from {cfg.detector!r}: {type(e).__name__}: {e}") from None
        _check_labels(model.config, cfg.detector)
        if max(norm[0]) > 1.5:  # Detectron2-style 0..255 statistics
            norm = (tuple(v / 255 for v in norm[0]), tuple(v / 255 for v in norm[1]))
        random_weights = folder is None or cfg.detector == TINY
        if random_weights:
            log.warning("geneval expert has a RANDOM detector (%s)", cfg.detector)
        model.eval().requires_grad_(False).to(device=ctx.device, dtype=ctx.dtype)
        clip = ctx.get_clip(cfg.clip)
        return cls(model, clip, cfg, norm, cfg.detector, random_weights or clip.random_weights)

    def describe(self) -> dict:
        return {**super().describe(), "clip": self.clip.spec}

    # -- requests ---------------------------------------------------------------------------------

    def check_pair(self, prompt: str, metadata: Mapping[str, Any]) -> None:
        rules.check_record(metadata, self.name, self.cfg.max_objects)

    # -- the detector -------------------------------------------------------------------------------

    @torch.no_grad()
    def detect(self, pixels: torch.Tensor, thresholds: Sequence[float]) -> list[dict[str, list[rules.Detection]]]:
        """GenEval's objects per image of a (B, 3, S, S) [0, 1] batch, each image with its threshold; each
        detection's `mask` is its (S, S) bool mask."""
        h, w = pixels.shape[-2:]
        x = (pixels.float() - self.det_mean) / self.det_std
        ph, pw = math.ceil(h / SIZE_DIVISOR) * SIZE_DIVISOR, math.ceil(w / SIZE_DIVISOR) * SIZE_DIVISOR
        x = F.pad(x, (0, pw - w, 0, ph - h))  # bottom/right zeros after normalising, as mmdet's Pad
        out = self.detector(pixel_values=x.to(self.detector.dtype))
        results = []
        for b, thr in enumerate(thresholds):
            cands = self.postprocess(out.class_queries_logits[b].float(), out.masks_queries_logits[b].float(), (ph, pw), (h, w), thr)
            results.append(rules.select_objects(cands, thr, self.cfg.max_objects, self.cfg.max_overlap))
        return results

    def postprocess(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, padded: tuple[int, int],
                    size: tuple[int, int], threshold: float) -> list[tuple[str, rules.Detection]]:
        """mmdet's instance post-processing of one image's (Q, C+1) class and (Q, h, w) mask logits, keeping
        only candidates that can pass `threshold`: a detection's score is its class probability times a mean
        sigmoid (< 1), so a class probability at or below the threshold can never pass; the rest are exact."""
        num_classes = class_logits.shape[-1] - 1
        probs = class_logits.softmax(-1)[:, :-1].flatten()
        top, index = probs.topk(min(self.cfg.max_detections, probs.numel()), sorted=False)
        keep = top > threshold
        top, index = top[keep], index[keep]
        if not len(index):
            return []
        query, label = index // num_classes, index % num_classes
        masks = F.interpolate(mask_logits[query][None], size=padded, mode="bilinear", align_corners=False)[0]
        masks = masks[:, : size[0], : size[1]]
        binary = masks > 0
        mask_score = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        scores = (top * mask_score).tolist()
        cands = []
        for j, (lab, sc) in enumerate(zip(label.tolist(), scores)):
            cands.append((self.class_names[lab], rules.Detection(_mask_box(binary[j]), sc, binary[j])))
        return cands

    # -- colours ------------------------------------------------------------------------------------

    def crops(self, image: torch.Tensor, dets: Sequence[rules.Detection]) -> torch.Tensor:
        """GenEval's colour crops of one (3, S, S) [0, 1] image: outside each mask the background colour,
        cut to the box, then CLIP's preprocessing (short side bicubic, center crop, normalise)."""
        bg = torch.tensor(self.cfg.crop_background, dtype=image.dtype, device=image.device).view(3, 1, 1) / 255
        out = []
        for d in dets:
            x1, y1, x2, y2 = (int(round(v)) for v in d.box)
            crop = torch.where(d.mask[None].to(image.device), image, bg)[:, y1:y2, x1:x2]
            # a thin object (1 x 800 px) would be resized to 224 x 179,200 before the center crop keeps its
            # middle: keep only a centered window 4x the short side first (the crop and the resampling
            # filter never reach beyond it)
            h, w = crop.shape[-2:]
            if max(h, w) > 4 * min(h, w):
                keep = 4 * min(h, w)
                crop = crop[:, (h - keep) // 2 : (h - keep) // 2 + keep, :] if h > w else crop[:, :, (w - keep) // 2 : (w - keep) // 2 + keep]
            out.append(self.clip.preprocess.tensor(crop[None].float())[0])
        return torch.stack(out)

    def colour_classifier(self, cls: str) -> torch.Tensor:
        """(10, D): per colour, the normalised mean of GenEval's three templates' normalised text embeddings."""
        if cls not in self._colour_weights:
            texts = [t.format(c=c, o=cls) for c in rules.COLORS for t in rules.COLOR_TEMPLATES]
            emb = self.clip.encode_texts(texts).view(len(rules.COLORS), len(rules.COLOR_TEMPLATES), -1).mean(1)
            self._colour_weights[cls] = emb / emb.norm(dim=-1, keepdim=True)
        return self._colour_weights[cls]

    @torch.no_grad()
    def classify_colours(self, pixels: torch.Tensor, records: Sequence[Mapping], objects: Sequence[Mapping]) -> None:
        """Set `color` on every object the rules read, with one CLIP pass over all crops of the batch."""
        todo = [(b, cls, objects[b][cls][i]) for b, rec in enumerate(records) for cls, i in rules.colour_requests(rec, objects[b])]
        if not todo:
            return
        crops = torch.cat([self.crops(pixels[b], [d]) for b, _, d in todo]).to(pixels.device)
        if self.batch_invariant:  # the number of crops follows the batch's images: passes of a fixed size
            emb = fixed_passes(self.clip.encode_images, crops, len(pixels))
        else:
            emb = self.clip.encode_images(crops)
        for (b, cls, det), e in zip(todo, emb):
            det.color = rules.COLORS[int((self.colour_classifier(cls) @ e).argmax())]

    # -- scoring ------------------------------------------------------------------------------------

    def forward(self, pixels, prompts, image_embeds=None, text_embeds=None, metadata=None) -> ExpertOutput:
        n = len(pixels)
        metadata = list(metadata) if metadata is not None else [{}] * n
        errors, ok = {}, []
        for i, rec in enumerate(metadata):
            try:
                rules.check_record(rec, self.name, self.cfg.max_objects)
                ok.append(i)
            except InvalidRequestError as e:  # a pair that slipped past check_pair (a direct call): NaN, not a crash
                errors[i] = str(e)
        nan = torch.full((n,), float("nan"))
        scores, correct, flow_score, flow_strict = nan.clone(), nan.clone(), nan.clone(), nan.clone()
        if ok:
            recs = [metadata[i] for i in ok]
            thresholds = [rules.threshold_for(r, self.cfg.threshold, self.cfg.counting_threshold) for r in recs]
            if self.batch_invariant and len(ok) < n:  # the detector at the batch's fixed shape: pad with a valid pair
                pad = ok + [ok[-1]] * (n - len(ok))
                objects = self.detect(pixels[pad], thresholds + [thresholds[-1]] * (n - len(ok)))[: len(ok)]
            else:
                objects = self.detect(pixels[ok], thresholds)
            self.classify_colours(pixels[ok], recs, objects)
            for i, rec, objs in zip(ok, recs, objects):
                j = rules.judge(rec, objs, self.cfg.position_margin)
                scores[i], correct[i] = j.reward, float(j.correct)
                flow_score[i], flow_strict[i] = j.flow_score, float(j.flow_strict)
        dev = pixels.device
        return ExpertOutput(scores.to(dev), {"correct": correct.to(dev), "flow_grpo_score": flow_score.to(dev),
                                             "flow_grpo_strict": flow_strict.to(dev)}, errors)

    def summarize(self, scores: torch.Tensor, extras: Mapping[str, torch.Tensor],
                  metadata: Sequence[Mapping[str, Any]]) -> Optional[dict]:
        """Per-tag means of `correct` and `reward` (images the expert scored), and GenEval's overall score:
        the mean over the tags present of their accuracy (its summary_scores.py)."""
        by_tag: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for s, c, rec in zip(scores.tolist(), extras["correct"].tolist(), metadata):
            if not math.isnan(s):
                by_tag[rec["tag"]].append((c, s))
        if not by_tag:
            return None
        tags = {t: {"images": len(v), "correct": sum(c for c, _ in v) / len(v), "reward": sum(s for _, s in v) / len(v)}
                for t, v in sorted(by_tag.items(), key=lambda kv: rules.TAGS.index(kv[0]) if kv[0] in rules.TAGS else 99)}
        return {"tags": tags, "overall": sum(t["correct"] for t in tags.values()) / len(tags)}


def _mask_box(mask: torch.Tensor) -> tuple[float, float, float, float]:
    """mmdet's `mask2bbox`: (x_min, y_min, x_max + 1, y_max + 1) of the mask's pixels; zeros when empty."""
    cols = torch.nonzero(mask.any(0)).flatten()
    rows = torch.nonzero(mask.any(1)).flatten()
    if not len(cols) or not len(rows):
        return (0.0, 0.0, 0.0, 0.0)
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def _geneval_name(label: str) -> str:
    """A detector label under GenEval's name ('mouse' -> 'computer mouse'); other names unchanged."""
    return {v: k for k, v in rules.DETECTOR_NAMES.items()}.get(label, label)


def _check_labels(config, spec: str) -> None:
    """The detector must be a COCO-instance one in the released label order: GenEval reads classes by index."""
    labels = [str(config.id2label.get(i, "")) for i in range(config.num_labels)]
    if config.num_labels != len(rules.COCO_CLASSES) or [_geneval_name(n) for n in labels] != list(rules.COCO_CLASSES):
        wrong = next((f"label {i} is {n!r}, expected {rules.COCO_CLASSES[i]!r}" for i, n in enumerate(labels)
                      if i < 80 and _geneval_name(n) != rules.COCO_CLASSES[i]), f"{config.num_labels} labels")
        raise ModelLoadError(f"GenEval detector {spec!r} is not a COCO instance model with the 80 classes in COCO's order ({wrong})")
