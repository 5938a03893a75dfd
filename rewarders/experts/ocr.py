"""ocr: how accurately the image renders the text its prompt asks for, as Flow-GRPO's OCR reward computes it.

The rule (Flow-GRPO `flow_grpo/ocr.py`, `OcrScorer.__call__`), reproduced exactly:

- **target**: the text between the first pair of double quotes of the prompt (`prompt.split('"')[1]`), or
  the pair's `text` metadata field when given (it wins over the prompt);
- **recognised text**: every line the recogniser reads whose confidence passes `text_score` (PaddleOCR's
  `drop_score`, 0.5), joined with no separator, in reading order (top to bottom, then left to right);
- both sides lose their spaces (only ' ', as `str.replace(' ', '')`) and are lower-cased;
- distance 0 when the target is a substring of the recognised text, else their Levenshtein distance,
  capped at the target's length; reward `1 - distance / len(target)`, in [0, 1].

Quirks of the reference, and what we do about them:

- a prompt with an opening quote and no closing one has the rest of the prompt as its target
  (`'a sign "Hello'` -> `Hello`): kept;
- a prompt without quotes crashes the reference (IndexError) and an empty target (`""`, or only spaces)
  divides by zero: here both are "no target", refused with a 422 by `check_pair` naming the field `text`,
  or scored `neutral_score` when the config sets one;
- the reference hands PaddleOCR RGB arrays where it expects BGR (cv2's order); we give the recogniser the
  channel order it was trained on;
- extra recognised characters cost nothing when the target is among them (a substring), but every one
  counts once it is not (`hello` read as `helloo world` without `hello`...): the cap keeps the reward >= 0;
- a recogniser failure on one image is the reference's maximum penalty (reward 0); here that pair carries
  an error (`ExpertOutput.errors`) and no score.

The recogniser is PaddleOCR's PP-OCR pipeline (text detection, then line recognition; no angle
classifier, as the reference runs it with `cls=False`) through the `rapidocr` package on onnxruntime,
with the ONNX files its wheel ships (so nothing is downloaded, ever: `det_model`/`rec_model` may name
other PP-OCR ONNX files on disk). Detection sees the whole input at its own size rounded to a multiple
of 32, up to 960 px on the longer side (PaddleOCR's defaults). The input is the usual square center crop
(`size`, default 512, Flow-GRPO's resolution): text outside the central square of a non-square image is
not seen. On a CUDA mixture the sessions use onnxruntime's CUDA provider when onnxruntime-gpu is installed.
The expert has no torch parameters and no random weights.
"""

from __future__ import annotations

import importlib.metadata
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import numpy as np
import torch
from pydantic import Field

from ..errors import InvalidRequestError, ModelLoadError
from ..images import Preprocess
from ..registry import Expert, ExpertConfig, ExpertOutput, register_expert

log = logging.getLogger(__name__)

# PaddleOCR's detector defaults (det_limit_type 'max', det_limit_side_len 960): an input of 512 px is
# detected at 512, one of 1024 at 960; rapidocr's own default (the short side up to 736) would upscale
DET_LIMIT_TYPE, DET_LIMIT_SIDE = "max", 960
DET_MODEL, REC_MODEL = "PP-OCRv6_det_small.onnx", "PP-OCRv6_rec_small.onnx"  # the rapidocr wheel's


# -- the reward on strings --------------------------------------------------------------------------

def normalise(text: str) -> str:
    """What both sides of the comparison become: no ' ' and lower case (the reference's exact steps)."""
    return text.replace(" ", "").lower()


def prompt_target(prompt: str) -> Optional[str]:
    """The text between the first pair of double quotes (to the end when the second is missing), or None."""
    parts = prompt.split('"')
    return parts[1] if len(parts) > 1 else None


def target_for(prompt: str, metadata: Mapping[str, Any]) -> Optional[str]:
    """The normalised target of a pair: its `text` metadata when given, else the prompt's quoted text;
    None when it has none or it is empty once normalised."""
    raw = metadata.get("text") if metadata.get("text") is not None else prompt_target(prompt)
    if not isinstance(raw, str):
        return None
    target = normalise(raw)
    return target or None


def text_reward(recognised: str, target: str) -> float:
    """Flow-GRPO's reward of recognised text against a non-empty normalised target: 1 - capped distance / length."""
    from Levenshtein import distance  # the package the reference uses (python-Levenshtein)

    recognised = normalise(recognised)
    d = 0 if target in recognised else min(distance(recognised, target), len(target))
    return 1.0 - d / len(target)


# -- the expert ---------------------------------------------------------------------------------------

class OCRConfig(ExpertConfig):
    size: int = Field(512, ge=32, le=2000, description="Side of the square input the recogniser reads (center crop of the short side); 512 is Flow-GRPO's resolution.")
    det_model: Optional[str] = Field(None, description="PP-OCR text-detection ONNX file; None: the one shipped in the rapidocr wheel (PP-OCRv6 small).")
    rec_model: Optional[str] = Field(None, description="PP-OCR text-recognition ONNX file with its character list in the model's metadata; None: the rapidocr wheel's (PP-OCRv6 small).")
    text_score: float = Field(0.5, ge=0.0, le=1.0, description="A recognised line counts when its confidence is at least this (PaddleOCR's drop_score).")
    neutral_score: Optional[float] = Field(None, description="Score of a pair with no target (no quoted text, no 'text' metadata); None: such a pair is refused (422).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: onnxruntime's CUDA provider when the mixture runs on CUDA and onnxruntime-gpu is installed, else the CPU; cuda: fail to load without it.")
    threads: int = Field(0, ge=0, le=256, description="onnxruntime intra-op threads per session; 0: onnxruntime's default (one per core).")
    workers: Optional[int] = Field(None, ge=1, le=64, description="Images read at once (threads sharing the sessions); None: 1 on the CPU, 4 on CUDA.")


def _wheel_model(name: str) -> Path:
    import rapidocr

    return Path(rapidocr.__file__).parent / "models" / name


def _model_file(spec: Optional[str], default: str, what: str) -> Path:
    path = Path(spec).expanduser() if spec else _wheel_model(default)
    if not path.is_file():
        raise ModelLoadError(f"ocr {what} model not found: {path}" + ("" if spec else " (is the rapidocr wheel complete?)"))
    return path


def _use_cuda(cfg: OCRConfig, device: torch.device) -> bool:
    import onnxruntime as ort

    available = "CUDAExecutionProvider" in ort.get_available_providers()
    if cfg.device == "cuda" and not available:
        raise ModelLoadError("ocr device 'cuda' needs onnxruntime-gpu (onnxruntime offers no CUDA provider here)")
    want = cfg.device == "cuda" or (cfg.device == "auto" and device.type == "cuda")
    if want and available and hasattr(ort, "preload_dlls"):
        try:  # the CUDA and cuDNN libraries of the nvidia-* wheels torch brings, when the system has none
            ort.preload_dlls()
        except Exception as e:  # a system CUDA may still serve
            log.debug("onnxruntime.preload_dlls failed: %s", e)
    if cfg.device == "auto" and device.type == "cuda" and not available:
        log.warning("ocr expert runs on the CPU: install onnxruntime-gpu for its CUDA provider")
    return want and available


@register_expert
class OCRExpert(Expert):
    """Text rendering accuracy in [0, 1] (1: the target is read exactly, 0: nothing of it)."""

    name = "ocr"
    Config = OCRConfig
    default_mean = 0.5  # a fraction of the target read right
    default_std = 0.25
    uses_metadata = True
    per_pair = True  # one image at a time through onnxruntime: already batch-invariant, so never padded

    def __init__(self, engine, cfg: OCRConfig, device: torch.device, use_cuda: bool, checkpoint: str):
        super().__init__(Preprocess(cfg.size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), checkpoint, False)
        self.engine, self.cfg, self.use_cuda = engine, cfg, use_cuda
        self.onnx_device = f"cuda:{device.index or 0}" if use_cuda else "cpu"
        self.workers = cfg.workers or (4 if use_cuda else 1)
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def from_config(cls, cfg: OCRConfig, ctx) -> "OCRExpert":
        try:
            from rapidocr import RapidOCR
        except ImportError as e:
            raise ModelLoadError(f"the ocr expert needs the rapidocr and onnxruntime packages: {e}") from None
        det, rec = _model_file(cfg.det_model, DET_MODEL, "detection"), _model_file(cfg.rec_model, REC_MODEL, "recognition")
        if cfg.rec_model:  # the wheel's model carries its character list; without one rapidocr would download one
            _check_character_list(rec)
        use_cuda = _use_cuda(cfg, ctx.device)
        params = {
            "Global.log_level": "error",  # not a warning per image without text
            "Global.use_cls": False,  # the reference runs PaddleOCR with cls=False
            "Global.text_score": cfg.text_score,
            "Det.model_path": str(det),  # explicit files: rapidocr's download path is never taken
            "Rec.model_path": str(rec),
            "Det.limit_type": DET_LIMIT_TYPE,
            "Det.limit_side_len": DET_LIMIT_SIDE,
            "EngineConfig.onnxruntime.intra_op_num_threads": cfg.threads or -1,
            "EngineConfig.onnxruntime.use_cuda": use_cuda,
            "EngineConfig.onnxruntime.cuda_ep_cfg.device_id": ctx.device.index or 0,
        }
        try:
            engine = RapidOCR(params=params)
            # load both sessions now (rapidocr loads them on first use), so a broken file fails here
            blank = np.full((48, 160, 3), 255, np.uint8)
            engine(blank, use_det=False, use_cls=False, use_rec=True)
            engine(blank, use_det=True, use_cls=False, use_rec=True)  # and back to the full pipeline
        except Exception as e:
            raise ModelLoadError(f"cannot load the ocr models ({det.name}, {rec.name}): {type(e).__name__}: {e}") from None
        version = importlib.metadata.version("rapidocr")
        return cls(engine, cfg, ctx.device, use_cuda, f"rapidocr {version}: {det.name} + {rec.name}")

    # -- targets -------------------------------------------------------------------------------------

    def check_pair(self, prompt: str, metadata: Mapping[str, Any]) -> None:
        text = metadata.get("text")
        if text is not None and not (isinstance(text, str) and normalise(text)):
            raise InvalidRequestError("expert 'ocr': metadata field 'text' must be a non-empty string")
        if self.cfg.neutral_score is None and target_for(prompt, metadata) is None:
            raise InvalidRequestError(
                "expert 'ocr': nothing to read: the prompt has no text in double quotes and the pair no 'text' "
                "metadata field (or set the expert's neutral_score)"
            )

    # -- reading ---------------------------------------------------------------------------------------

    def read(self, image_bgr: np.ndarray) -> str:
        """The recognised lines of one uint8 BGR image, joined as the reference joins them."""
        # rapidocr answers a result without `txts` (or with None) when it finds no line
        return "".join(getattr(self.engine(image_bgr), "txts", None) or ())

    def read_all(self, images: Sequence[np.ndarray]) -> list[str | Exception]:
        """Each image's text, `workers` images at a time (onnxruntime releases the GIL); an exception in
        place of the text where the recogniser failed."""
        def one(im):
            try:
                return self.read(im)
            except Exception as e:  # one image's failure is that pair's error, not the batch's
                log.exception("ocr failed on an image")
                return e

        if self.workers == 1 or len(images) == 1:
            return [one(im) for im in images]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="ocr")
        return list(self._pool.map(one, images))

    def forward(self, pixels, prompts, image_embeds=None, text_embeds=None, metadata=None):
        metadata = metadata or [{}] * len(prompts)
        targets = [target_for(p, m) for p, m in zip(prompts, metadata)]
        if self.cfg.neutral_score is None and None in targets:  # check_pair refuses these; a direct call too
            self.check_pair(prompts[targets.index(None)], metadata[targets.index(None)])
        # [0, 1] RGB floats -> uint8 as the reference rounds them, then BGR, the recogniser's order
        arrays = (pixels.detach().float().mul(255).round().clamp(0, 255).to(torch.uint8)
                  .permute(0, 2, 3, 1).flip(-1).cpu().numpy())
        todo = [i for i, t in enumerate(targets) if t is not None]
        texts = dict(zip(todo, self.read_all([np.ascontiguousarray(arrays[i]) for i in todo])))
        scores, errors = [], {}
        for i, target in enumerate(targets):
            if target is None:
                scores.append(float(self.cfg.neutral_score))
            elif isinstance(texts[i], Exception):
                scores.append(float("nan"))
                errors[i] = f"ocr failed: {type(texts[i]).__name__}"
            else:
                scores.append(text_reward(texts[i], target))
        out = torch.tensor(scores, dtype=torch.float32, device=pixels.device)
        return ExpertOutput(out, errors=errors) if errors else out

    def describe(self) -> dict:
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.use_cuda else ["CPUExecutionProvider"]
        try:  # what the session really runs on (rapidocr falls back to the CPU with a warning)
            providers = self.engine.text_det.session.session.get_providers()
        except AttributeError:
            pass
        return {"checkpoint": self.checkpoint, "random_weights": False, "clip": None,
                "device": self.onnx_device if "CUDAExecutionProvider" in providers else "cpu",
                "dtype": "float32", "providers": list(providers), "workers": self.workers}


def _check_character_list(rec: Path) -> None:
    """A recognition model must carry its character list (rapidocr reads the `character` metadata);
    without it rapidocr would fetch a dictionary from the network, which never happens here."""
    import onnxruntime as ort

    try:
        meta = ort.InferenceSession(str(rec), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    except Exception as e:
        raise ModelLoadError(f"cannot read the ocr recognition model {rec.name}: {type(e).__name__}: {e}") from None
    if "character" not in meta:
        raise ModelLoadError(f"ocr recognition model {rec.name} has no 'character' list in its ONNX metadata")
