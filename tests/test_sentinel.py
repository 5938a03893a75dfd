"""The reward-hacking sentinel: image statistics, drift arithmetic, the hacking rule, best step, state
round trip and the drift plot. Fast: no diffusion model, no expert."""

import json
import math

import pytest
import torch
from t2i_reward.finetune.sentinel import STAT_PREFIX, Sentinel, image_stats, plot_sentinel

H = W = 64


def _grid():
    return torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")


def test_saturation_black_grey_red():
    black, grey, red = torch.zeros(1, 3, H, W), torch.full((1, 3, H, W), 0.5), torch.zeros(1, 3, H, W)
    red[:, 0] = 1
    s = image_stats(torch.cat([black, grey, red]))
    assert s["saturation"].tolist() == [0.0, 0.0, 1.0]
    assert s["brightness"].tolist() == pytest.approx([0.0, 0.5, 0.299])
    assert s["contrast"].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)
    assert all(v.shape == (3,) for v in s.values())


def test_high_freq_checkerboard_gradient_flat_noise():
    yy, xx = _grid()
    checker = ((yy + xx) % 2).float().expand(1, 3, H, W)
    gradient = (xx / (W - 1)).float().expand(1, 3, H, W)
    flat = torch.full((1, 3, H, W), 0.3)
    noise = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(0))
    hf = image_stats(torch.cat([checker, gradient, flat, noise]))["high_freq"].tolist()
    assert hf[0] == pytest.approx(1.0, abs=1e-6)  # all its energy sits at the Nyquist corner
    assert hf[1] < 0.01  # a smooth gradient (the window hides the border seam)
    assert hf[2] == 0.0  # no energy at all
    assert hf[3] == pytest.approx(1 - math.pi / 16, abs=0.05)  # white noise: the area outside the disc
    # blur lowers it: a 4x4 box blur of the same noise
    blurred = torch.nn.functional.avg_pool2d(noise, 4, stride=1, padding=2)[..., :H, :W]
    assert image_stats(blurred)["high_freq"].item() < 0.2


def test_jpeg_bpp_noise_above_flat():
    flat = torch.full((1, 3, H, W), 0.5)
    noise = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(1))
    bpp = image_stats(torch.cat([flat, noise]))["jpeg_bpp"].tolist()
    assert bpp[1] > 3 * bpp[0] > 0


def _imgs(n=4):
    return torch.full((n, 3, 8, 8), 0.5)


def _obs(s, step, total, **components):
    return s.observe(step, torch.tensor(total, dtype=torch.float64),
                     {k: torch.tensor(v, dtype=torch.float64) for k, v in components.items()}, _imgs(len(total)))


def test_drift_arithmetic():
    s = Sentinel({"a"})
    base = _obs(s, 0, [1.0, 2.0, 3.0, 4.0], a=[1.0, 2.0, 3.0, 4.0], h=[0.0, 0.0, 0.0, 0.0])
    assert base["total"] == {"mean": 2.5, "se": pytest.approx(math.sqrt(5 / 3) / 2), "drift_se": 0.0}
    assert base["h"]["drift_se"] == 0.0  # zero variance, no change: the floor keeps it finite
    rec = _obs(s, 10, [3.0, 4.0, 5.0, 6.0], a=[1.0, 2.0, 3.0, 4.0], h=[1.0, 1.0, 1.0, 1.0])
    se = math.sqrt(5 / 3) / 2
    assert rec["total"]["mean"] == 4.5
    assert rec["total"]["drift_se"] == pytest.approx(2.0 / math.sqrt(2 * se**2))
    assert rec["a"]["drift_se"] == 0.0
    assert math.isfinite(rec["h"]["drift_se"]) and rec["h"]["drift_se"] > 1e6
    assert set(rec) == {"total", "a", "h"} | {STAT_PREFIX + k for k in
                                                ("saturation", "high_freq", "jpeg_bpp", "brightness", "contrast")}
    assert rec[STAT_PREFIX + "brightness"] == {"mean": pytest.approx(0.5), "se": 0.0, "drift_se": 0.0}
    assert [e["step"] for e in s.history] == [0, 10] and s.history[1]["metrics"] is rec


# hand-made scores with se = sqrt(5/3)/2 ≈ 0.645 each side, so a shift of d in the mean is
# d / 0.913 standard errors of the difference
SPREAD = [-1.5, -0.5, 0.5, 1.5]


def _shift(d):
    return [x + d for x in SPREAD]


def _sentinel(**kw):
    s = Sentinel({"opt"}, **kw)
    _obs(s, 0, _shift(0), opt=_shift(0), held=_shift(5))
    return s


def test_hacking_held_out_falls_while_optimised_rises():
    s = _sentinel(threshold_se=3.0)
    rec = _obs(s, 5, _shift(4), opt=_shift(4), held=_shift(1))  # total +4.4 SE, held -4.4 SE
    reason = s.hacking(rec)
    assert reason and "'held'" in reason and "fell 4.4 standard errors" in reason
    assert "(mean 5 -> 1)" in reason and "optimised reward rose 4.4" in reason


@pytest.mark.parametrize("total,opt,held", [
    (_shift(-4), _shift(-4), _shift(1)),  # both fall: a bad run, not hacking
    (_shift(4), _shift(4), _shift(3)),    # held out falls 2.2 SE < 3
    (_shift(4), _shift(-4), _shift(5)),   # the fall is in an optimised expert
    (_shift(0), _shift(0), _shift(1)),    # the optimised reward does not rise
])
def test_no_hacking(total, opt, held):
    s = _sentinel()
    assert s.hacking(_obs(s, 5, total, opt=opt, held=held)) is None


def test_image_stats_never_trigger():
    s = Sentinel(set())
    s.observe(0, torch.tensor(SPREAD), {}, torch.zeros(4, 3, 8, 8))
    rec = s.observe(5, torch.tensor(_shift(4)), {}, torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)))  # stats drift wildly
    assert rec[STAT_PREFIX + "brightness"]["drift_se"] > 10 and s.hacking(rec) is None


def test_should_stop_respects_flag():
    for stop in (False, True):
        s = _sentinel(stop_on_hacking=stop)
        rec = _obs(s, 5, _shift(4), opt=_shift(4), held=_shift(1))
        assert s.hacking(rec)
        assert (s.should_stop(rec) is not None) is stop
        assert s.should_stop(_obs(s, 6, _shift(1), opt=_shift(1), held=_shift(5))) is None


def test_best_step_skips_hacked_steps():
    s = _sentinel()
    assert s.best_step is None
    _obs(s, 10, _shift(1), opt=_shift(1), held=_shift(5))
    _obs(s, 20, _shift(2), opt=_shift(2), held=_shift(4.5))
    _obs(s, 30, _shift(6), opt=_shift(6), held=_shift(0))  # the highest total, but hacked
    _obs(s, 40, _shift(1.5), opt=_shift(1.5), held=_shift(5))
    assert s.best_step == 20


def test_round_trip():
    s = _sentinel(threshold_se=2.5, stop_on_hacking=True)
    _obs(s, 10, _shift(4), opt=_shift(4), held=_shift(1))
    data = json.loads(json.dumps(s.to_dict()))  # JSON-serialisable as is
    r = Sentinel.from_dict(data)
    assert (r.optimised, r.threshold_se, r.stop_on_hacking) == ({"opt"}, 2.5, True)
    assert r.history == s.history and r.to_dict() == s.to_dict()
    # the restored state goes on against the same baseline
    rec = _obs(r, 20, _shift(4), opt=_shift(4), held=_shift(1))
    assert r.should_stop(rec) == s.should_stop(s.history[-1]["metrics"])


def test_plot_is_png(tmp_path):
    s = _sentinel()
    _obs(s, 10, _shift(1), opt=_shift(1), held=_shift(4))
    _obs(s, 20, _shift(4), opt=_shift(4), held=_shift(1))
    path = tmp_path / "sentinel.png"
    plot_sentinel(s.history, path, optimised=s.optimised, threshold_se=s.threshold_se)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_with_sentinel(tmp_path):
    from t2i_reward.finetune.report import write_report

    s = _sentinel()
    _obs(s, 10, _shift(1), opt=_shift(1), held=_shift(4))
    ev = {"total": {"mean": 0.0, "se": 0.1}}
    imgs = torch.rand(2, 3, 16, 16)
    for sentinel in (None, s.to_dict()):
        write_report(tmp_path / "r.png", {"reward": [0.1, 0.2]}, imgs, imgs, ev, ev, sentinel=sentinel)
        assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
