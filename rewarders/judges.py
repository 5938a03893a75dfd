"""The judges' prompts and how their answers are read: UnifiedReward's pointwise templates, the pairwise
comparison templates of UnifiedReward and Pref-GRPO, VQAScore's question; their parsers; the pairwise
comparison schedule and win rates. The experts `unified_reward`, `pairwise_judge` and `vqascore` ask these
through the MLLM peer (`rewarders/mllm.py`).

The templates are data: the published prompts word for word (a model trained on one prompt is asked with it),
each with the file it comes from. `{prompt}` is the image's prompt; nothing else in a template is a placeholder.
The parsers are ours. A parser that finds no score raises `JudgeParseError`, which the experts turn into an
error for that pair (never a made-up score).
"""

from __future__ import annotations

import itertools
import random
import re
from typing import Literal, Sequence

from .errors import RewardError


class JudgeParseError(RewardError):
    """A judge's answer holds no score in the template's format."""


def fill(template: str, prompt: str) -> str:
    """`template` for one prompt: `{prompt}` replaced, nothing else (a prompt's own braces stay)."""
    return template.replace("{prompt}", prompt)


def _snippet(text: str) -> str:
    return repr(text[:80]) + ("..." if len(text) > 80 else "")


# --------------------------------------------------------------------------------------------------
# UnifiedReward, pointwise (github.com/CodeGoat24/UnifiedReward)

# "1.0": UnifiedReward-qwen / UnifiedReward (LLaVA), inference_qwen/image_generation/qwen_point_score_image_generation.py:
# one "Final Score" from 1 to 5 after listing the caption's elements
UNIFIED_REWARD_V1 = (
    "You are given a text caption and a generated image based on that caption. Your task is to evaluate this image "
    "based on two key criteria:\n1. Alignment with the Caption: Assess how well this image aligns with the provided "
    "caption. Consider the accuracy of depicted objects, their relationships, and attributes as described in the "
    "caption.\n2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail "
    "preservation, color accuracy, and overall aesthetic appeal.\nExtract key elements from the provided text caption, "
    "evaluate their presence in the generated image using the format: 'element (type): value' (where value=0 means not "
    "generated, and value=1 means generated), and assign a score from 1 to 5 after 'Final Score:'.\nYour task is "
    "provided as follows:\nText Caption: [{prompt}]"
)

# "1.0-acs": UnifiedReward-qwen's alignment/coherence/style prompt with word-wise scores,
# inference_qwen/image_generation/qwen_point_score_ACS_image_generation.py
UNIFIED_REWARD_V1_ACS = (
    "You are presented with a generated image and its associated text caption. Your task is to analyze the image "
    "across multiple dimensions in relation to the caption. Specifically:\n\n"
    "1. Evaluate each word in the caption based on how well it is visually represented in the image. Assign a "
    "numerical score to each word using the format:\n"
    "   Word-wise Scores: [[\"word1\", score1], [\"word2\", score2], ..., [\"wordN\", scoreN], [\"[No_mistakes]\", scoreM]]\n"
    "   - A higher score indicates that the word is less well represented in the image.\n"
    "   - The special token [No_mistakes] represents whether all elements in the caption were correctly depicted. A "
    "high score suggests no mistakes; a low score suggests missing or incorrect elements.\n\n"
    "2. Provide overall assessments for the image along the following axes (each rated from 1 to 5):\n"
    "- Alignment Score: How well the image matches the caption in terms of content.\n"
    "- Coherence Score: How logically consistent the image is (absence of visual glitches, object distortions, etc.).\n"
    "- Style Score: How aesthetically appealing the image looks, regardless of caption accuracy.\n\n"
    "Output your evaluation using the format below:\n\n"
    "---\n\n"
    "Word-wise Scores: [[\"word1\", score1], ..., [\"[No_mistakes]\", scoreM]]\n\n"
    "Alignment Score (1-5): X\n"
    "Coherence Score (1-5): Y\n"
    "Style Score (1-5): Z\n\n"
    "Your task is provided as follows:\nText Caption: [{prompt}]"
)

# "2.0": UnifiedReward-2.0 (qwen, qwen3vl, qwen35), inference_qwen/UnifiedReward-2.0-inference/point_score_ACS_image_generation.py
# (also Pref-GRPO's fastvideo/rewards/templates.py `get_unifiedreward_image_template`)
UNIFIED_REWARD_V2 = (
    "You are presented with a generated image and its associated text caption. "
    "Your task is to analyze the image across multiple dimensions in relation to the caption. Specifically:\n"
    "Provide overall assessments for the image along the following axes (each rated from 1 to 5):\n"
    "- Alignment Score: How well the image matches the caption in terms of content.\n"
    "- Coherence Score: How logically consistent the image is (absence of visual glitches, object distortions, etc.).\n"
    "- Style Score: How aesthetically appealing the image looks, regardless of caption accuracy.\n\n"
    "Output your evaluation using the format below:\n\n"
    "Alignment Score (1-5): X\n"
    "Coherence Score (1-5): Y\n"
    "Style Score (1-5): Z\n\n"
    "Your task is provided as follows:\n"
    "Text Caption: [{prompt}]"
)

UnifiedRewardVersion = Literal["1.0", "1.0-acs", "2.0"]
UNIFIED_REWARD_TEMPLATES: dict[str, str] = {"1.0": UNIFIED_REWARD_V1, "1.0-acs": UNIFIED_REWARD_V1_ACS, "2.0": UNIFIED_REWARD_V2}
DIMENSIONS = ("alignment", "coherence", "style")
SCALE = (1.0, 5.0)  # every UnifiedReward image-generation score is on 1..5

_NUMBER = r"\**\s*([-+]?\d+(?:\.\d+)?)"  # a number, perhaps after markdown bold


def _scaled(value: float, what: str, text: str) -> float:
    lo, hi = SCALE
    if not lo <= value <= hi:
        raise JudgeParseError(f"the judge's {what} {value:g} is outside its {lo:g}-{hi:g} scale: {_snippet(text)}")
    return (value - lo) / (hi - lo)


def parse_final_score(text: str) -> float:
    """The last "Final Score: x" of an answer (UnifiedReward 1.0), scaled from 1..5 to [0, 1]."""
    found = re.findall(r"Final Score\s*:\s*" + _NUMBER, text or "", flags=re.IGNORECASE)
    if not found:
        raise JudgeParseError(f"the judge's answer holds no 'Final Score:': {_snippet(text or '')}")
    return _scaled(float(found[-1]), "final score", text)


def parse_dimension_scores(text: str) -> dict[str, float]:
    """The alignment, coherence and style lines of an answer ("Alignment Score (1-5): 2.69"; the "(1-5)" may be
    left out), each scaled from 1..5 to [0, 1]; the last line of each counts. All three must be there."""
    scores, missing = {}, []
    for dim in DIMENSIONS:
        found = re.findall(dim + r"\s+Score\s*(?:\(\s*1\s*-\s*5\s*\))?\s*:\s*" + _NUMBER, text or "", flags=re.IGNORECASE)
        if found:
            scores[dim] = _scaled(float(found[-1]), f"{dim} score", text)
        else:
            missing.append(dim)
    if missing:
        raise JudgeParseError(f"the judge's answer has no {', '.join(missing)} score: {_snippet(text or '')}")
    return scores


def parse_unified_reward(text: str, version: str) -> dict[str, float]:
    """An answer to UNIFIED_REWARD_TEMPLATES[version] as scores in [0, 1]: {"final"} for 1.0, the three
    dimensions for 1.0-acs and 2.0."""
    return {"final": parse_final_score(text)} if version == "1.0" else parse_dimension_scores(text)


# --------------------------------------------------------------------------------------------------
# Pairwise comparisons

# "unifiedreward-think": Pref-GRPO's default judge prompt (UnifiedReward-Think), fastvideo/rewards/templates.py
# `get_unifiedreward_think_image_template` (github.com/CodeGoat24/Pref-GRPO), indentation and all; the verdict
# comes inside <answer></answer>
PAIRWISE_THINK = '''You are an objective and precise evaluator for image quality comparison. I will provide you with a text caption and two images generated based on this caption. You must analyze the two images carefully and determine which image is better.

        Evaluation procedure:

        1. The caption for the generated images is: 「{prompt}」. You must evaluate the two images across these core dimensions:
        - Semantic consistency (how closely the image content aligns with the caption)
        - Aesthetics (composition, color usage, artistic expression)
        - Authenticity (realism and attention to detail)

        2. You are also encouraged to add up to two additional evaluation dimensions if they are relevant to the specific caption or images (e.g., creativity, spatial layout, fine-grained detail). If no extra dimensions are relevant, just keep the three core dimensions.

        3. For each evaluation dimension:
        - Provide a score between 1–10 for both Image 1 and Image 2
        - Provide a short rationale for each score (2–5 short sentences)
        - The evaluation must follow exactly this format with line breaks and indentation:
            Dimension name: 
                Image 1 (x/10) - rationale; 
                Image 2 (y/10) - rationale

        4. After evaluating all dimensions, calculate the total score for each image and show the calculation explicitly, following this exact format:
            Total score:
            Image 1: x+x+x=total
            Image 2: y+y+y=total

        5. Wrap all reasoning and scoring strictly within <think> and </think> tags.

        6. After </think>, output the final judgment strictly inside <answer> and </answer> tags, containing only one of:
        - Image 1 is better
        - Image 2 is better

        Constraints:
        - You must strictly follow the line breaks, indentation, and formatting shown in the example below.
        - Do not merge multiple dimensions into one line. Each dimension must follow the 3-line block format shown below.
        - Do not use Markdown formatting, bullet points, bold text, or headings.
        - Do not output explanations outside <think> and <answer>.
        - The <answer> tag must contain only the final string with no extra words.

        Required output format:

        <think>
        1. Semantic consistency: 
            Image 1 (9/10) - ...; 
            Image 2 (7/10) - ...
        2. Aesthetics: 
            Image 1 (8/10) - ...; 
            Image 2 (8/10) - ...
        3. Authenticity: 
            Image 1 (8/10) - ...; 
            Image 2 (5/10) - ...
        [Additional dimension if any]: 
            Image 1 (7/10) - ...; 
            Image 2 (8/10) - ...
        [Additional dimension if any]: 
            Image 1 (6/10) - ...; 
            Image 2 (7/10) - ...
        Total score:
        Image 1: 9+8+8+7+6=38
        Image 2: 7+8+5+8+7=35
        </think>
        <answer>Image 1 is better</answer>

        Note: The example above is only to illustrate the exact format (line breaks, indentation, symbols, and style). Your actual evaluation must follow this format exactly, but be based on the given caption and images.
        '''

# "unifiedreward": UnifiedReward-qwen's pair ranking, inference_qwen/image_generation/qwen_pair_rank_image_generation.py
PAIRWISE_RANK = (
    "You are given a text caption and two generated images based on that caption. Your task is to evaluate and compare "
    "these images based on two key criteria:\n1. Alignment with the Caption: Assess how well each image aligns with the "
    "provided caption. Consider the accuracy of depicted objects, their relationships, and attributes as described in "
    "the caption.\n2. Overall Image Quality: Examine the visual quality of each image, including clarity, detail "
    "preservation, color accuracy, and overall aesthetic appeal.\nCompare both images using the above criteria and "
    "select the one that better aligns with the caption while exhibiting superior visual quality.\nProvide a clear "
    "conclusion such as \"Image 1 is better.\", \"Image 2 is better.\" and \"Both images are equally good.\"\nYour task "
    "is provided as follows:\nText Caption: [{prompt}]"
)

PairwiseTemplate = Literal["unifiedreward-think", "unifiedreward"]
PAIRWISE_TEMPLATES: dict[str, str] = {"unifiedreward-think": PAIRWISE_THINK, "unifiedreward": PAIRWISE_RANK}


def parse_preference(text: str, template: str) -> float:
    """Image 1's share of one comparison: 1.0 ("Image 1 is better"), 0.0 ("Image 2 is better") or 0.5 ("equally
    good"). With the think template the verdict is read inside the last <answer></answer>, as Pref-GRPO does;
    JudgeParseError when there is no verdict (Pref-GRPO counts that as a tie: the expert's `unparsed: tie`)."""
    text = text or ""
    if template == "unifiedreward-think":
        answers = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
        if not answers:
            raise JudgeParseError(f"the judge's comparison has no <answer></answer>: {_snippet(text)}")
        verdict = answers[-1]
    else:
        verdict = text
    one, two = "Image 1 is better" in verdict, "Image 2 is better" in verdict
    if one and not two:
        return 1.0
    if two and not one:
        return 0.0
    if not one and not two and re.search(r"equally good", verdict, flags=re.IGNORECASE):
        return 0.5
    raise JudgeParseError(f"the judge's comparison names no better image: {_snippet(verdict)}")


def schedule(n: int, max_comparisons: int, seed: int, both_orders: bool = True) -> list[tuple[int, int]]:
    """The comparisons (first shown, second shown) among `n` images.

    Every pair when that fits in `max_comparisons` (both orders: n(n-1) comparisons; one order: n(n-1)/2 with the
    lower index first, as Pref-GRPO's `itertools.combinations`). Otherwise `max_comparisons` // 2 pairs (one
    order: `max_comparisons` pairs, each in a random order) drawn in rounds of random matchings, the least compared
    images first (the first round shows every image, an odd one out with a random other), so that each image takes
    part about equally often; deterministic for a `seed`. Raises ValueError when the budget cannot show every image once (`min_comparisons`).
    """
    per_pair = 2 if both_orders else 1
    every = list(itertools.combinations(range(n), 2))
    if per_pair * len(every) <= max_comparisons:
        pairs = every
    else:
        if max_comparisons < min_comparisons(n, both_orders):
            raise ValueError(f"{n} images need at least {min_comparisons(n, both_orders)} comparisons, the limit is {max_comparisons}")
        rng, want = random.Random(seed), max_comparisons // per_pair
        pairs, seen = [], set()

        def take(i: int, j: int) -> bool:
            key = (min(i, j), max(i, j))
            if i == j or key in seen or len(pairs) >= want:
                return False
            seen.add(key)
            pairs.append((i, j) if both_orders or rng.random() < 0.5 else (j, i))
            return True

        count = [0] * n
        for r in range(4 * n):  # rounds of matchings; they fill `want` long before this in practice
            order = list(range(n))
            rng.shuffle(order)
            order.sort(key=lambda i: count[i])  # (stable: random among equals) the least compared first
            free = set(order)
            for a in order:  # a greedy matching: each image with the least compared free image it has not met
                if a not in free:
                    continue
                b = next((b for b in order if b in free and b != a and (min(a, b), max(a, b)) not in seen), None)
                if b is not None and take(a, b):
                    free -= {a, b}
                    count[a] += 1
                    count[b] += 1
            if n % 2 and r == 0:  # the first round shows every image: the odd one out with a random other
                other = rng.choice(order[:-1])
                if take(order[-1], other):
                    count[order[-1]] += 1
                    count[other] += 1
            if len(pairs) == want:
                break
        rest = [p for p in every if p not in seen]  # (only when the rounds kept meeting used pairs)
        rng.shuffle(rest)
        for i, j in rest:
            take(i, j)
    if not both_orders:
        return pairs
    return [c for i, j in pairs for c in ((i, j), (j, i))]


def min_comparisons(n: int, both_orders: bool = True) -> int:
    """The fewest comparisons that show each of `n` images at least once: ceil(n / 2) pairs."""
    return (n + 1) // 2 * (2 if both_orders else 1)


def win_rates(n: int, comparisons: Sequence[tuple[int, int]], outcomes: Sequence[float | None]) -> tuple[list[float | None], list[int]]:
    """Each image's win rate: its share of the comparisons it took part in (a win 1, a tie 0.5, a loss 0), over the
    comparisons with an outcome (None: failed, left out); None for an image with none. Also each image's count
    of comparisons with an outcome."""
    won, counted = [0.0] * n, [0] * n
    for (first, second), share in zip(comparisons, outcomes):
        if share is None:
            continue
        won[first] += share
        won[second] += 1.0 - share
        counted[first] += 1
        counted[second] += 1
    return [w / c if c else None for w, c in zip(won, counted)], counted


# --------------------------------------------------------------------------------------------------
# VQAScore (github.com/linzhiqiu/t2v_metrics)

# t2v_metrics/models/vqascore_models/clip_t5_model.py: the question and answer of CLIP-FlanT5 and LLaVA-1.5 (VQAScore's
# paper); the newer API and Qwen models there ask 'Does this figure show "{}"? Please answer Yes or No.'
VQA_QUESTION = 'Does this figure show "{prompt}"? Please answer yes or no.'
VQA_ANSWER = "Yes"


# --------------------------------------------------------------------------------------------------
# What the three judge experts share: their images as the peer sees them, and calls in parallel


def pil_images(pixels) -> list:
    """A batch of [0, 1] pixels (B, 3, S, S) as RGB PIL images, as they go to the peer."""
    from torchvision.transforms.functional import to_pil_image

    return [to_pil_image(p.detach().float().clamp(0, 1).cpu()) for p in pixels]


def ask_all(fn, items: Sequence, workers: int, per_pair_errors: bool) -> list:
    """`fn(item)` for every item, `workers` at a time, in order. An answer that cannot be read (`JudgeParseError`)
    is returned in the item's place, always; a peer that is down, slow or refuses (`MLLMError`) too when
    `per_pair_errors` (an optional expert), else it raises: the scoring call fails with the peer's error."""
    from concurrent.futures import ThreadPoolExecutor

    from .mllm import MLLMError

    def one(item):
        try:
            return fn(item)
        except JudgeParseError as e:
            return e
        except MLLMError as e:
            if not per_pair_errors:
                raise
            return e

    if not items:
        return []
    with ThreadPoolExecutor(max(1, min(workers, len(items)))) as pool:
        return list(pool.map(one, items))


def failed(answer) -> bool:
    from .mllm import MLLMError

    return isinstance(answer, (JudgeParseError, MLLMError))
