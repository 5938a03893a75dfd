"""Reward functions in the conventions of open-source RL fine-tuning trainers, backed by the reward service
(through `RewardClient.score_batch`, raw tensors, no PNG) or by a rewarder in this process (a `Mixture`
from `create_rewarder`, through `check_tensor_request` + `score_checked`). Both give the same numbers for
the same pixels. No FastAPI and nothing from `service/` is imported.

    from t2i_reward.rewarders.reward_fns import ddpo_reward_fn, flow_grpo_reward_fn, dance_grpo_reward_fn
    reward_fn = ddpo_reward_fn("http://a:8000,http://b:8000")        # or a RewardClient, or a Mixture
    scores, info = reward_fn(images, prompts, prompt_metadata)        # ddpo-pytorch / Flow-GRPO single score

| factory | call | returns |
| --- | --- | --- |
| `ddpo_reward_fn` | `fn(images, prompts, metadata)` | `(np.ndarray float32 (B,), {expert: np.ndarray (B,)})` |
| `flow_grpo_reward_fn` | `fn(images, prompts, metadata, only_strict=True)` | `({"avg": (B,), expert: (B,)}, {})`, numpy float32 |
| `dance_grpo_reward_fn` | `fn(images, prompts)` | `torch.Tensor` float32 (B,) on the images' device |

`target` is a service URL (or a comma-separated / list of replica URLs; keyword arguments such as
`api_key`, `timeout`, `retries` go to `RewardClient`), a `RewardClient`, or a rewarder (`Mixture`).

Images: what the trainers hold, a float tensor (B, 3, H, W) in [0, 1] (the pipelines' `output_type="pt"`,
on any device), a uint8 array (B, H, W, 3), or a list of PIL images of one size. With `quantize=True`
(the default) float images are rounded to uint8 first, `round(x * 255)`, as ddpo-pytorch's and
Flow-GRPO's own reward functions do before scoring; this sends a quarter of the bytes. `quantize=False`
scores the float pixels as they are.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np
import torch

from .client import AsyncRewardClient, RewardClient, _checked_batch, _part, merge_scores, to_image_tensor
from .wire import BatchScores, batch_scores_from_result

Scorer = Callable[..., BatchScores]


def _is_rewarder(target) -> bool:
    return callable(getattr(target, "check_tensor_request", None)) and callable(getattr(target, "score_checked", None))


def score_in_process(rewarder, prompts: str | Sequence[str], images, group_ids: Sequence[Hashable] | None = None,
                     weights: Mapping[str, float] | None = None, explain: bool = False,
                     chunk_size: int | None = None, metadata: Mapping | Sequence | None = None) -> BatchScores:
    """`RewardClient.score_batch` against a rewarder in this process: the same checks, chunks and answer.
    The chunks (whole groups each) are scored in one pooled `score_checked` call, each as its own request."""
    images, prompts, group_ids, metadata, chunks = _checked_batch(prompts, images, group_ids, chunk_size, metadata)
    n = int(images.shape[0])
    checked = []
    for chunk in chunks:
        ims, ps, gs, ms = _part(chunk, n, images, prompts, group_ids, metadata)
        checked.append(rewarder.check_tensor_request(ps, ims, weights, group_ids=gs, explain=explain, metadata=ms))
    results = rewarder.score_checked(checked)
    return merge_scores(chunks, [batch_scores_from_result(r) for r in results], n)


def make_scorer(target, *, weights: Mapping[str, float] | None = None, explain: bool = False,
                chunk_size: int | None = None, **client_kwargs) -> Scorer:
    """`scorer(prompts, images, group_ids=None, metadata=None) -> BatchScores` for a service URL (or replica URLs), a
    `RewardClient` or a rewarder (`Mixture`). A client built here from URLs is `scorer.client`."""
    if isinstance(target, AsyncRewardClient):
        raise TypeError("trainers call reward functions synchronously (in a thread pool): pass a URL, a RewardClient "
                        "or a rewarder, not an AsyncRewardClient")
    if client_kwargs and not isinstance(target, (str, list, tuple)):
        raise TypeError(f"{', '.join(client_kwargs)}: client options only apply when target is a URL")
    if isinstance(target, (str, list, tuple)):
        target = RewardClient(target, **client_kwargs)
    if isinstance(target, RewardClient):
        client = target

        def scorer(prompts, images, group_ids=None, metadata=None) -> BatchScores:
            return client.score_batch(prompts, images, group_ids, weights, explain, chunk_size, metadata)

        scorer.client = client
        return scorer
    if _is_rewarder(target):
        def scorer(prompts, images, group_ids=None, metadata=None) -> BatchScores:
            return score_in_process(target, prompts, images, group_ids, weights, explain, chunk_size, metadata)

        scorer.rewarder = target
        return scorer
    raise TypeError(f"target must be a service URL, a list of URLs, a RewardClient or a rewarder (Mixture), "
                    f"got {type(target).__name__}")


def trainer_images(images, quantize: bool = True) -> torch.Tensor:
    """A trainer's image batch as the tensor path takes it (CPU). Float (B, 3, H, W) in [0, 1], tensor or
    array: with `quantize`, rounded to uint8 (B, H, W, 3) on its own device first (`round(x * 255)`,
    clamped), as ddpo-pytorch and Flow-GRPO do; else sent as float. Anything else: `to_image_tensor`."""
    if isinstance(images, np.ndarray) and np.issubdtype(images.dtype, np.floating):
        images = torch.from_numpy(np.array(images, dtype=np.float32))
    if quantize and isinstance(images, torch.Tensor) and images.is_floating_point() and images.ndim == 4 \
            and images.shape[1] == 3:
        images = (images.detach() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return to_image_tensor(images)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32, copy=False)


def _attach(fn, scorer):
    fn.scorer = scorer
    fn.client = getattr(scorer, "client", None)
    fn.rewarder = getattr(scorer, "rewarder", None)
    return fn


def ddpo_reward_fn(target, *, weights: Mapping[str, float] | None = None, quantize: bool = True,
                   chunk_size: int | None = None, **client_kwargs) -> Callable:
    """A reward function in ddpo-pytorch's convention (`ddpo_pytorch/rewards.py`, called by
    `scripts/train.py` as `executor.submit(reward_fn, images, prompts, prompt_metadata)`):

        scores, info = fn(images, prompts, metadata)

    `images`: the pipeline's float tensor (B, 3, H, W) in [0, 1] (any device) or a uint8 array
    (B, H, W, 3); `prompts`: one per image (a tuple or list); `metadata`: the prompts' metadata, one dict
    per image (ddpo-pytorch's `prompt_metadata`), sent with each pair to the experts that read it (geneval,
    ocr); None or empty dicts send none. `scores`: numpy float32 (B,), the weighted totals (the training loop
    turns it into a tensor with `torch.as_tensor`), NaN for a pair without a total (see `errors` in
    `scorer`'s answer); `info`: each expert's raw scores, numpy float32 (B,). ddpo-pytorch computes its
    per-prompt advantages itself.
    """
    scorer = make_scorer(target, weights=weights, chunk_size=chunk_size, **client_kwargs)

    def reward_fn(images, prompts, metadata=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        s = scorer(_prompts(prompts), trainer_images(images, quantize), metadata=_metadata(metadata))
        return _numpy(s.rewards), {name: _numpy(v) for name, v in s.components.items()}

    return _attach(reward_fn, scorer)


def flow_grpo_reward_fn(target, *, weights: Mapping[str, float] | None = None, quantize: bool = True,
                        chunk_size: int | None = None, **client_kwargs) -> Callable:
    """A reward function in Flow-GRPO's multi-reward convention (`flow_grpo/rewards.py: multi_score`, called
    by `scripts/train_sd3.py` as `executor.submit(reward_fn, images, prompts, prompt_metadata,
    only_strict=True)`):

        score_details, info = fn(images, prompts, metadata, only_strict=True)

    `score_details`: `{"avg": totals, <expert>: raw scores}`, each numpy float32 (B,); `"avg"` is the
    weighted total the training loop turns into advantages (as `multi_score`'s weighted sum of its
    scorers), the others are logged as `reward_<expert>`; an expert's extra outputs are there too, as
    `<expert>.<name>` (geneval's `correct`). `metadata`: Flow-GRPO's `prompt_metadata`, one dict per image
    (GenEval's records), sent with each pair. `info` is `{}`. `only_strict` (Flow-GRPO's GenEval option)
    is accepted and ignored: the geneval expert reports both its partial reward and its strict correctness.
    For Flow-GRPO's single-score functions use `ddpo_reward_fn` (the same `(scores, info)` shape).
    """
    scorer = make_scorer(target, weights=weights, chunk_size=chunk_size, **client_kwargs)

    def reward_fn(images, prompts, metadata=None, only_strict: bool = True) -> tuple[dict[str, np.ndarray], dict]:
        s = scorer(_prompts(prompts), trainer_images(images, quantize), metadata=_metadata(metadata))
        details = {"avg": _numpy(s.rewards)}
        details.update({name: _numpy(v) for name, v in s.components.items() if name not in details})
        details.update({name: _numpy(v) for name, v in s.extras.items() if name not in details})
        return details, {}

    return _attach(reward_fn, scorer)


def dance_grpo_reward_fn(target, *, weights: Mapping[str, float] | None = None, device: Any = None,
                         quantize: bool = True, chunk_size: int | None = None, **client_kwargs) -> Callable:
    """A reward callable for DanceGRPO's training scripts, mirroring the reward step of
    `sample_reference_model` in `fastvideo/train_grpo_flux.py` (and `train_grpo_sd.py`): there each decoded
    image (`VaeImageProcessor.postprocess`, PIL by default) is scored by HPS-v2 or PickScore into a float
    tensor on the GPU, the per-image tensors are concatenated into `all_rewards` and then
    `samples["rewards"] = reward.to(torch.float32)`; the script z-scores them within each run of
    `num_generations` itself.

        rewards = fn(images, prompts)      # torch.float32 (B,), replacing the scorer call
        rewards = fn(images, prompts, metadata)   # with one dict per image for geneval / ocr

    `images`: a PIL image or a list of PIL images of one size (the postprocess output), a float tensor
    (B, 3, H, W) in [0, 1] (`output_type="pt"`) or uint8 (B, H, W, 3). `prompts`: one string for all or one
    per image (the `caption` list). The rewards land on the images' device when they are a tensor, else on
    `device` (the script's `device`; CPU when None).
    """
    scorer = make_scorer(target, weights=weights, chunk_size=chunk_size, **client_kwargs)

    def reward_fn(images, prompts, metadata=None) -> torch.Tensor:
        where = images.device if isinstance(images, torch.Tensor) else (device if device is not None else "cpu")
        s = scorer(prompts if isinstance(prompts, str) else _prompts(prompts), trainer_images(images, quantize),
                   metadata=_metadata(metadata))
        return s.rewards.to(device=where, dtype=torch.float32)

    return _attach(reward_fn, scorer)


def _prompts(prompts) -> str | list[str]:
    return prompts if isinstance(prompts, str) else list(prompts)


def _metadata(metadata):
    """A trainer's prompt metadata as the scorer takes it: None when there is none (None, or only empty
    dicts, as ddpo-pytorch's prompt functions give), else one dict per image (or one for all)."""
    if metadata is None or isinstance(metadata, Mapping):
        return metadata or None
    metadata = list(metadata)
    return metadata if any(metadata) else None
