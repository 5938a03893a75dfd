"""The judges through the MLLM peer: unified_reward, pairwise_judge, vqascore (rewarders/judges.py and their experts).

Parsers on the published answer formats; the comparison schedule; win rates; VQAScore's formula against
t2v-metrics' on the same logits. Real models only: the tiny random LLaVA (whose answers are noise: garbage) and
"scripted" copies of it whose generation settings make their greedy answer a known text (so their preferences
are known), in-process and behind a real `transformers serve`; a peer that is slow or down."""

import base64
import io
import math
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from t2i_reward.rewarders import create_rewarder
from t2i_reward.rewarders.errors import InvalidRequestError
from t2i_reward.rewarders.judges import (
    PAIRWISE_THINK,
    UNIFIED_REWARD_V2,
    VQA_QUESTION,
    JudgeParseError,
    fill,
    min_comparisons,
    parse_dimension_scores,
    parse_final_score,
    parse_preference,
    parse_unified_reward,
    schedule,
    win_rates,
)
from t2i_reward.rewarders.mllm import HTTPPeer, MLLMConfig, MLLMError, create_peer, downscaled, t2v_probability
from t2i_reward.rewarders.tiny_vlm import ensure_scripted_vlm, ensure_tiny_vlm

from .conftest import free_port, smooth_image

NO_OTHERS = {"imagereward": None, "aesthetic": None, "mlp": None}
IMAGES = [smooth_image(s, 64, 80) for s in (1, 2, 3)] + [Image.new("RGB", (64, 64), (200, 30, 30))]
ACS = "Alignment Score (1-5): 4\nCoherence Score (1-5): 2.5\nStyle Score (1-5): 5"
# one answer every judge template can read: UnifiedReward's three lines, a final score, a verdict
EVERYTHING = ACS + "\nFinal Score: 3\n<answer>Image 1 is better</answer>"


# ------------------------------------------------------------------------------------------------
# parsers, on the formats the published models answer in


def test_unified_reward_answers_are_read_and_scaled():
    # UnifiedReward-2.0's example output (inference_qwen/UnifiedReward-2.0-inference/point_score_ACS_image_generation.py)
    published = "Alignment Score (1-5): 2.694700002670288\nCoherence Score (1-5): 2.371500015258789\nStyle Score (1-5): 2.802500009536743"
    assert parse_dimension_scores(published) == pytest.approx(
        {"alignment": (2.694700002670288 - 1) / 4, "coherence": (2.371500015258789 - 1) / 4, "style": (2.802500009536743 - 1) / 4})
    # 1.0-acs: word-wise scores first; "(1-5)" may be missing, bold marks too
    wordy = 'Word-wise Scores: [["a", 0.1], ["cat", 2.3]]\n\nAlignment Score: **5**\ncoherence score (1-5): 1\nStyle Score (1-5): 3'
    assert parse_unified_reward(wordy, "1.0-acs") == {"alignment": 1.0, "coherence": 0.0, "style": 0.5}
    # 1.0: elements, then the final score (the last one counts)
    v1 = "cat (object): 1\nsofa (object): 0\nFinal Score: 2\n...Final Score: 4.5"
    assert parse_final_score(v1) == pytest.approx(0.875) and parse_unified_reward(v1, "1.0") == {"final": 0.875}


@pytest.mark.parametrize("text, why", [
    ("", "no 'Final Score:'"), ("The image shows a cat. Score: 4", "no 'Final Score:'"), ("Final Score: 9", "outside its 1-5"),
    ("Final Score: 0", "outside its 1-5")])
def test_unreadable_final_scores_are_errors(text, why):
    with pytest.raises(JudgeParseError, match=why):
        parse_final_score(text)


def test_a_missing_dimension_is_an_error_naming_it():
    with pytest.raises(JudgeParseError, match="no style score"):
        parse_dimension_scores("Alignment Score (1-5): 3\nCoherence Score (1-5): 2")
    with pytest.raises(JudgeParseError, match="no alignment, coherence, style score"):
        parse_dimension_scores("Final Score: 3")


def test_verdicts_are_read_as_pref_grpo_reads_them():
    think = "<think>\n1. Semantic consistency: \n    Image 1 (9/10) - ...\n</think>\n<answer>Image 2 is better</answer>"
    assert parse_preference(think, "unifiedreward-think") == 0.0
    assert parse_preference("<answer>Image 1 is better</answer>", "unifiedreward-think") == 1.0
    assert parse_preference("Image 1 is better.", "unifiedreward") == 1.0
    assert parse_preference("Both images are equally good.", "unifiedreward") == 0.5
    # the think verdict must be inside <answer>; a verdict naming both or neither is no verdict
    for text, template in [("Image 1 is better", "unifiedreward-think"), ("<answer>the first</answer>", "unifiedreward-think"),
                           ("Image 1 is better. Image 2 is better.", "unifiedreward"), ("noise", "unifiedreward")]:
        with pytest.raises(JudgeParseError):
            parse_preference(text, template)


def test_templates_take_the_prompt_and_nothing_else():
    assert fill(UNIFIED_REWARD_V2, "a {red} cat").endswith("Text Caption: [a {red} cat]")
    assert "「a cat」" in fill(PAIRWISE_THINK, "a cat") and "{prompt}" not in fill(PAIRWISE_THINK, "a cat")
    assert fill(VQA_QUESTION, "a cat") == 'Does this figure show "a cat"? Please answer yes or no.'


# ------------------------------------------------------------------------------------------------
# the comparison schedule and win rates


def test_small_groups_compare_every_pair_in_both_orders():
    assert schedule(3, 56, 0) == [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)]
    assert schedule(4, 56, 0, both_orders=False) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]  # Pref-GRPO's
    assert len(schedule(8, 56, 0)) == 56  # the default budget covers a group of 8


@pytest.mark.parametrize("n, budget, both", [(16, 40, True), (9, 11, False), (30, 30, True), (5, 19, True)])
def test_large_groups_get_a_bounded_seeded_balanced_schedule(n, budget, both):
    plan = schedule(n, budget, seed=7, both_orders=both)
    assert len(plan) == (budget // 2 * 2 if both else budget)
    assert plan == schedule(n, budget, seed=7, both_orders=both)  # deterministic for the seed
    assert plan != schedule(n, budget, seed=8, both_orders=both) or n == 5
    pairs = [tuple(sorted(p)) for p in plan]
    if both:  # each pair asked twice, each image first once
        assert plan[0::2] == [(b, a) for a, b in plan[1::2]]
        pairs = pairs[0::2]
    assert len(set(pairs)) == len(pairs) and all(a != b for a, b in pairs)  # no pair twice, no image against itself
    seen = [sum(i in p for p in pairs) for i in range(n)]
    assert min(seen) >= 1 and max(seen) - min(seen) <= 2  # every image, about equally often


def test_a_budget_below_one_comparison_per_image_is_refused():
    assert min_comparisons(9) == 10 and min_comparisons(9, both_orders=False) == 5
    with pytest.raises(ValueError, match="9 images need at least 10 comparisons"):
        schedule(9, 9, 0)


def test_win_rates_count_wins_ties_and_leave_out_failures():
    comparisons = [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)]
    rates, counted = win_rates(3, comparisons, [1.0, 0.0, 0.5, None, 1.0, None])
    # image 0: won (0,1), won (1,0) as second, tied (0,2) -> 2.5 / 3; image 1: lost twice, won (1,2) -> 1/3;
    # image 2: tied, lost -> 0.5 / 2
    assert rates == pytest.approx([2.5 / 3, 1 / 3, 0.25]) and counted == [3, 3, 2]
    assert win_rates(2, [(0, 1)], [None]) == ([None, None], [0, 0])


# ------------------------------------------------------------------------------------------------
# in-process, on real models whose answers are known


@pytest.fixture(scope="module")
def vlm(cache_dir) -> Path:
    return ensure_tiny_vlm(cache_dir)


def judges(cache_dir, others: bool = False, **experts):
    """The tiny profile with these judges (and without its own experts unless `others`)."""
    return create_rewarder(profile="tiny", cache_dir=cache_dir, device="cpu", normalize=False,
                           experts={**({} if others else NO_OTHERS), **{n: {"image_size": 56, **c} for n, c in experts.items()}})


def test_a_scripted_model_answers_its_script(cache_dir):
    folder = ensure_scripted_vlm(cache_dir, "Image 1 is better.")
    peer = create_peer(MLLMConfig(model=str(folder), image_size=56), cache_dir)
    assert peer.answer(IMAGES[:2], "Which image is better?", 32) == "Image 1 is better."
    assert peer.calls == 1



def test_a_comparison_is_one_user_message_images_in_order_then_the_text():
    """What `HTTPPeer.answer` sends (mllm.py's own builder, so the format is asserted where it is made): one user
    turn, the images as PNG data URLs in the order given (Image 1, Image 2), downscaled, then the text."""
    (message,) = HTTPPeer.multi_image_messages([IMAGES[1], IMAGES[3]], "Which image is better?", 56)
    assert message["role"] == "user" and [part["type"] for part in message["content"]] == ["image_url", "image_url", "text"]
    assert message["content"][2]["text"] == "Which image is better?"
    for part, im in zip(message["content"][:2], [IMAGES[1], IMAGES[3]]):
        head, b64 = part["image_url"]["url"].split(",", 1)
        shown = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert head == "data:image/png;base64" and max(shown.size) <= 56
        assert shown.convert("RGB").tobytes() == downscaled(im, 56).tobytes()

def test_position_bias_cancels_with_both_orders(cache_dir):
    """A judge that always prefers the first image: asked both ways, every image wins half its comparisons;
    asked once in Pref-GRPO's order, image i beats every later image."""
    folder = str(ensure_scripted_vlm(cache_dir, "Image 1 is better."))
    r = judges(cache_dir, pairwise_judge={"model": folder, "template": "unifiedreward", "max_tokens": 16})
    res = r.score("a red square", IMAGES)
    assert [im.components["pairwise_judge"] for im in res.images] == [0.5] * 4
    assert [im.extras["pairwise_judge.calls"] for im in res.images] == [6.0] * 4  # 3 rivals, 2 orders
    assert res.summaries == {"pairwise_judge": {"calls": 12, "failed": 0}}
    assert r.experts["pairwise_judge"].peer.calls == 12  # what the peer counted itself

    once = judges(cache_dir, pairwise_judge={"model": folder, "template": "unifiedreward", "max_tokens": 16, "both_orders": False})
    res = once.score("a red square", IMAGES)
    assert [im.components["pairwise_judge"] for im in res.images] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert res.summaries["pairwise_judge"]["calls"] == 6


def test_the_think_template_in_process(cache_dir):
    """Pref-GRPO's default prompt; the verdict read inside <answer></answer>."""
    folder = str(ensure_scripted_vlm(cache_dir, "<think>\nTotal score:\nImage 1: 9\nImage 2: 7\n</think>\n<answer>Image 1 is better</answer>"))
    r = judges(cache_dir, pairwise_judge={"model": folder, "max_tokens": 80, "both_orders": False})
    res = r.score("a red square", IMAGES[:2])
    assert [im.components["pairwise_judge"] for im in res.images] == [1.0, 0.0] and res.summaries["pairwise_judge"]["calls"] == 1


def test_groups_are_judged_apart_and_checked_before_any_call(cache_dir):
    folder = str(ensure_scripted_vlm(cache_dir, "Image 1 is better."))
    r = judges(cache_dir, pairwise_judge={"model": folder, "template": "unifiedreward", "max_tokens": 16, "both_orders": False})
    peer = r.experts["pairwise_judge"].peer
    images = IMAGES + IMAGES[:1]
    c = r.check_request(["a red square", "a blue car", "a red square", "a blue car", "a red square"], images,
                        group_ids=["a", "b", "a", "b", "a"])
    (res,) = r.score_checked([c])
    # group a = images 0, 2, 4 (0 beats 2 and 4, 2 beats 4); group b = images 1, 3 (1 beats 3): 3 + 1 calls
    assert [im.components["pairwise_judge"] for im in res.images] == pytest.approx([1.0, 1.0, 0.5, 0.0, 0.0])
    assert res.summaries["pairwise_judge"] == {"calls": 4, "failed": 0} and peer.calls == 4
    assert res.advantages is not None  # the same group ids give the advantages
    for prompts, groups, why in [(["a red square"] * 5, [0, 0, 1, 1, 2], "a group has 1 image"),
                                 (["a red square"] * 4 + ["a blue car"], [0] * 5, "one prompt: a group has 2 prompts")]:
        with pytest.raises(InvalidRequestError, match=why):
            r.check_request(prompts, images, group_ids=groups)
    small = judges(cache_dir, pairwise_judge={"model": folder, "max_comparisons": 3})
    with pytest.raises(InvalidRequestError, match="a group of 5 images needs at least 6 comparisons; max_comparisons is 3"):
        small.check_request("a red square", images)
    with pytest.raises(InvalidRequestError, match="needs at least 2 images per request"):
        small.check_request("a red square", images[:1])
    assert peer.calls == 4  # refused requests never reached the peer


def test_a_bounded_schedule_makes_exactly_its_calls(cache_dir):
    folder = str(ensure_scripted_vlm(cache_dir, "Both images are equally good."))
    r = judges(cache_dir, pairwise_judge={"model": folder, "template": "unifiedreward", "max_tokens": 48, "max_comparisons": 6})
    images = [smooth_image(s, 40, 40) for s in range(6)]  # 30 comparisons for every pair: 6 are made
    res = r.score("a red square", images)
    assert res.summaries["pairwise_judge"] == {"calls": 6, "failed": 0}
    assert [im.components["pairwise_judge"] for im in res.images] == [0.5] * 6  # ties only
    assert sum(im.extras["pairwise_judge.calls"] for im in res.images) == 12


def test_garbage_answers_are_errors_for_their_pairs(cache_dir, vlm):
    """The tiny random model answers noise: no comparison has a verdict and no image a score; each image's
    error says why, the other experts' scores stand; `unparsed: tie` counts them as ties (Pref-GRPO)."""
    cfg = {"model": "tiny", "template": "unifiedreward", "max_tokens": 6, "weight": 1.0}
    r = create_rewarder(profile="tiny", cache_dir=cache_dir, device="cpu", normalize=False,
                        experts={"pairwise_judge": {**cfg, "image_size": 56},
                                 "unified_reward": {"model": "tiny", "image_size": 56, "max_tokens": 6}})
    res = r.score("a red square", IMAGES[:3])
    for im in res.images:
        assert im.components["pairwise_judge"] is None and im.components["unified_reward"] is None
        assert "names no better image" in im.errors["pairwise_judge"] and "no alignment, coherence, style score" in im.errors["unified_reward"]
        assert im.components["aesthetic"] is not None and im.total is None  # required judges failed: no total
    assert res.summaries["pairwise_judge"] == {"calls": 6, "failed": 6}
    tie = judges(cache_dir, pairwise_judge={**cfg, "unparsed": "tie"})
    res = tie.score("a red square", IMAGES[:3])
    assert [im.components["pairwise_judge"] for im in res.images] == [0.5] * 3 and res.images[0].errors is None


def test_unified_reward_scores_its_dimensions(cache_dir):
    folder = str(ensure_scripted_vlm(cache_dir, ACS))
    r = judges(cache_dir, unified_reward={"model": folder, "max_tokens": 64})
    (first, *rest) = r.score("a red square", IMAGES[:2]).images
    assert first.components["unified_reward"] == pytest.approx((0.75 + 0.375 + 1.0) / 3)
    assert first.extras == pytest.approx({"unified_reward.alignment": 0.75, "unified_reward.coherence": 0.375, "unified_reward.style": 1.0})
    style = judges(cache_dir, unified_reward={"model": folder, "max_tokens": 64, "dimension": "style", "version": "1.0-acs"})
    assert style.score("a red square", IMAGES[:1]).images[0].components["unified_reward"] == 1.0
    # version 1.0 asks for a final score, which this answer lacks: an error for each pair, never 0
    v1 = judges(cache_dir, unified_reward={"model": folder, "max_tokens": 64, "version": "1.0"})
    im = v1.score("a red square", IMAGES[:1]).images[0]
    assert im.components["unified_reward"] is None and "no 'Final Score:'" in im.errors["unified_reward"] and im.extras is None
    with pytest.raises(Exception, match="dimension must be 'overall'"):
        judges(cache_dir, unified_reward={"model": folder, "version": "1.0", "dimension": "style"})


# ------------------------------------------------------------------------------------------------
# VQAScore: t2v-metrics' formula on the same logits


def t2v_metrics_clip_t5(logits: torch.Tensor, answer_id: int) -> float:
    """t2v_metrics/models/vqascore_models/clip_t5_model.py: exp(-cross-entropy) of the answer token."""
    return float((-torch.nn.CrossEntropyLoss(reduction="mean")(logits[None], torch.tensor([answer_id]))).exp())


def t2v_metrics_api(top: list[tuple[str, float]], answer: str = "Yes") -> float:
    """t2v_metrics/models/vqascore_models/gpt4v_model.py `forward_single`, on (token, logprob) pairs."""
    target = answer.lower().strip()
    opposite = "no" if target == "yes" else "yes"
    target_logprob = opposite_logprob = None
    for token, logprob in top:
        token = token.strip().lower()
        if token == target:
            target_logprob = logprob
        elif token == opposite:
            opposite_logprob = logprob
    if target_logprob is not None:
        return math.exp(target_logprob)
    if opposite_logprob is not None:
        return 1 - math.exp(opposite_logprob)
    return 0.0


def test_vqascore_is_t2v_metrics_formula_on_the_same_logits(cache_dir, vlm):
    peer = create_peer(MLLMConfig(model="tiny", image_size=56), cache_dir)
    tok = peer.processor.tokenizer
    yes, no = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("Yes", "No"))
    for im, prompt in [(IMAGES[0], "a red square"), (IMAGES[3], "a blue car")]:
        question = fill(VQA_QUESTION, prompt)
        ours = peer.vqa_probability(im, question)
        # the same logits, taken independently: the processor, the model, generate's first-step scores
        inputs = peer._inputs(im, question)
        with torch.no_grad():
            logits = peer.model(**inputs).logits[0, -1].float()
            out = peer.model.generate(**inputs, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True)
        assert ours == pytest.approx(t2v_metrics_clip_t5(logits, yes), rel=1e-5)
        assert ours == pytest.approx(float(torch.softmax(out.scores[0][0].float(), -1)[yes]), rel=1e-5)  # qwen2vl_model.py
        # not yes / (yes + no): vlm_judge's number
        assert ours != pytest.approx(float(torch.softmax(logits[[yes, no]], 0)[0]), rel=1e-3)
        # a server's top log-probabilities read as t2v-metrics reads an API model's; all of them: the same P(Yes)
        logp = torch.log_softmax(logits, -1)
        ranked = [(tok.decode([int(i)]), float(logp[i])) for i in logp.argsort(descending=True)]
        assert t2v_probability(ranked) == pytest.approx(ours, rel=1e-5)
        for k in (2, 20, 200):
            top = ranked[:k]
            if any(t.strip().lower() in ("yes", "no") for t, _ in top):
                assert t2v_probability(top) == pytest.approx(t2v_metrics_api(top))
            else:  # t2v-metrics makes it 0.0; we make it an error
                with pytest.raises(MLLMError, match="neither 'yes' nor 'no'"):
                    t2v_probability(top)
    assert t2v_probability([(" no", math.log(0.3)), ("Maybe", -0.1)]) == pytest.approx(0.7) == t2v_metrics_api([(" no", math.log(0.3)), ("Maybe", -0.1)])
    assert t2v_probability([("Yes", -0.2), (" yes", -3.0)]) == t2v_metrics_api([("Yes", -0.2), (" yes", -3.0)]) == pytest.approx(math.exp(-3.0))


def test_the_vqascore_expert_in_process(cache_dir, vlm):
    r = judges(cache_dir, vqascore={"model": "tiny"})
    peer = r.experts["vqascore"].peer
    scores = [im.components["vqascore"] for im in r.score("a red square", IMAGES).images]
    assert all(0 < s < 1 for s in scores) and len(set(scores)) > 1
    from t2i_reward.rewarders.judges import pil_images

    pixels = r.experts["vqascore"].preprocess.pil(IMAGES[:1])  # what the expert sends: the same square crop
    assert scores[0] == pytest.approx(peer.vqa_probability(pil_images(pixels)[0], fill(VQA_QUESTION, "a red square")), rel=1e-5)
    with pytest.raises(Exception, match="not one token"):
        judges(cache_dir, vqascore={"model": "tiny", "answer": "Absolutely"})
    with pytest.raises(Exception, match="yes_no must be auto, logprobs or systemone"):
        judges(cache_dir, vqascore={"model": "tiny", "yes_no": "rating"})


# ------------------------------------------------------------------------------------------------
# through a real OpenAI-compatible server (transformers serve), slow and down


@pytest.fixture(scope="module")
def served(cache_dir, tmp_path_factory):
    """`transformers serve` of the scripted VLM that answers EVERYTHING, on a free loopback port."""
    from benchmarks.judge_latency import serve

    if not (Path(sys.executable).parent / "transformers").exists():
        pytest.skip("transformers serve is not installed (pip install 'transformers[serving]')")
    folder = ensure_scripted_vlm(cache_dir, EVERYTHING)
    port = free_port()
    proc = serve(folder, port, home=tmp_path_factory.mktemp("hf-home"), timeout_s=240)
    try:
        yield f"http://127.0.0.1:{port}", str(folder)
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_judges_through_transformers_serve(cache_dir, served):
    url, folder = served
    peer = {"url": url, "model": folder}
    r = judges(cache_dir, unified_reward={**peer, "max_tokens": 128},
               pairwise_judge={**peer, "template": "unifiedreward", "max_tokens": 128},
               vqascore=peer)
    res = r.score("a red square", IMAGES[:3])
    for im in res.images:
        assert im.components["unified_reward"] == pytest.approx((0.75 + 0.375 + 1.0) / 3) and im.errors is None
        assert im.components["pairwise_judge"] == 0.5  # "Image 1 is better" both ways
        assert 0 <= im.components["vqascore"] <= 1
    assert res.summaries["pairwise_judge"] == {"calls": 6, "failed": 0}
    assert r.experts["pairwise_judge"].peer.calls == 6 and r.experts["unified_reward"].peer.calls == 3
    assert r.experts["vqascore"].peer.describe()["yes_no"] == "systemone"  # this server has no log-probabilities
    again = r.score("a red square", IMAGES[:3])
    assert [im.components for im in again.images] == [im.components for im in res.images]  # deterministic
    v1 = judges(cache_dir, unified_reward={**peer, "max_tokens": 128, "version": "1.0"})
    assert v1.score("a red square", IMAGES[:1]).images[0].components["unified_reward"] == 0.5  # "Final Score: 3"
    # the think prompt (2660 tokens here) is longer than this tiny model takes: the server refuses it, a clear error
    think = judges(cache_dir, pairwise_judge={**peer, "template": "unifiedreward-think", "max_tokens": 128})
    with pytest.raises(MLLMError, match="refused /v1/chat/completions: 400"):
        think.score("a red square", IMAGES[:2])


def test_a_cut_answer_from_the_server_is_an_error_for_its_pair(cache_dir, served):
    url, folder = served
    r = judges(cache_dir, unified_reward={"url": url, "model": folder, "max_tokens": 12},
               pairwise_judge={"url": url, "model": folder, "template": "unifiedreward", "max_tokens": 12})
    res = r.score("a red square", IMAGES[:2])
    for im in res.images:
        assert im.total is None and set(im.components.values()) == {None}
        assert "has no" in im.errors["unified_reward"] and "names no better image" in im.errors["pairwise_judge"]
    assert res.summaries["pairwise_judge"] == {"calls": 2, "failed": 2}


def test_a_slow_peer_fails_the_call_or_its_pairs(cache_dir, served):
    url, folder = served
    slow = {"url": url, "model": folder, "timeout_s": 0.001, "retries": 0}
    for name, extra in [("unified_reward", {}), ("pairwise_judge", {"template": "unifiedreward"}), ("vqascore", {"yes_no": "systemone"})]:
        r = judges(cache_dir, **{name: {**slow, **extra}})
        t = time.perf_counter()
        with pytest.raises(MLLMError, match="did not answer within 0.001 s") as e:
            r.score("a red square", IMAGES[:2])
        assert e.value.kind == "timeout" and time.perf_counter() - t < 10
        optional = judges(cache_dir, others=True, **{name: {**slow, **extra, "required": False}})
        res = optional.score("a red square", IMAGES[:2])
        for im in res.images:
            assert im.components[name] is None and "did not answer within" in im.errors[name]
            assert im.total is not None  # the other experts' total, renormalised


def test_a_peer_that_is_down_fails_pair_by_pair_through_the_service(cache_dir):
    from fastapi.testclient import TestClient
    from t2i_reward.service.app import create_app
    from t2i_reward.service.settings import Settings

    down = {"url": f"http://127.0.0.1:{free_port()}", "retries": 0, "image_size": 56}
    required = judges(cache_dir, pairwise_judge=down)
    with pytest.raises(MLLMError, match="is unreachable"):
        required.score("a red square", IMAGES[:2])
    mixture = create_rewarder(profile="tiny", cache_dir=cache_dir, device="cpu",
                              experts={n: {**down, "required": False, "weight": 0.5} for n in ("unified_reward", "pairwise_judge", "vqascore")})
    files = []
    for i, im in enumerate(IMAGES[:3]):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        files.append(("images", (f"{i}.png", buf.getvalue(), "image/png")))
    with TestClient(create_app(Settings(), rewarder=mixture)) as client:
        r = client.post("/reward", data={"prompt": "a red square"}, files=files)
        assert r.status_code == 200, r.text
        out = r.json()
        for im in out["images"]:
            assert im["total"] is not None and set(im["errors"]) == {"unified_reward", "pairwise_judge", "vqascore"}
            assert all("unreachable" in why for why in im["errors"].values())
        assert out["summaries"]["pairwise_judge"] == {"calls": 6, "failed": 6}
        bad = client.post("/reward", data={"prompt": "a red square"}, files=files[:1])
        assert bad.status_code == 422 and "at least 2 images" in bad.json()["detail"]
