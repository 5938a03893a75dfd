"""An expert defined outside the package, installed as a `t2i_reward.experts` entry point, enabled from a
YAML file and served over HTTP by `t2i-reward serve` in its own process."""

import base64
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from .conftest import free_port

PLUGIN = '''
import torch
from pydantic import Field

from t2i_reward.rewarders import Expert, ExpertConfig
from t2i_reward.rewarders.images import Preprocess


class BrightnessConfig(ExpertConfig):
    scale: float = Field(1.0, description="Multiplies the mean brightness.")


class Brightness(Expert):
    """Mean pixel value in [0, 1], times `scale`: an expert with no weights to load."""

    name = "brightness"
    Config = BrightnessConfig

    def __init__(self, scale):
        super().__init__()
        self.scale = scale
        self.preprocess = Preprocess(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.checkpoint = "none"
        self.random_weights = False

    @classmethod
    def from_config(cls, cfg, ctx):
        return cls(cfg.scale)

    def forward(self, pixels, prompts, image_embeds=None, text_embeds=None):
        return self.scale * pixels.float().mean(dim=(1, 2, 3))
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    """A folder that is on sys.path like site-packages: the module and its distribution's entry point."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "brightness_expert.py").write_text(PLUGIN)
    dist = root / "brightness_expert-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: brightness-expert\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[t2i_reward.experts]\nbrightness = brightness_expert:Brightness\n")
    return root


def png_b64(colour) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_entry_point_expert_is_listed_and_served(plugin_path, cache_dir, tmp_path):
    exe = Path(sys.executable).parent / "t2i-reward"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")]),
           "T2I_REWARD_CACHE_DIR": str(cache_dir)}
    listed = subprocess.run([str(exe), "experts"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and listed.stdout.split() == ["imagereward", "aesthetic", "mlp", "blip_score", "diversity", "pickscore", "hpsv2", "clip_score", "vlm_judge", "unified_reward", "pairwise_judge", "vqascore", "brightness"]

    config = tmp_path / "reward.yaml"
    config.write_text("profile: tiny\nexperts:\n  imagereward: {}\n  brightness: {scale: 2.0, weight: 0.5}\n")
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(exe), "serve", "--config", str(config), "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.time() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < end, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        r = httpx.post(f"{url}/reward", json={"prompt": "a lamp", "images": [png_b64((255, 255, 255)), png_b64((0, 0, 0))]},
                       timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        # the file lists exactly two experts: the profile's aesthetic and mlp are not loaded
        assert set(body["experts"]) == {"imagereward", "brightness"}
        white, black = body["images"]
        assert white["components"]["brightness"] == pytest.approx(2.0, abs=1e-5)
        assert black["components"]["brightness"] == pytest.approx(0.0, abs=1e-5)
        # total = imagereward (weight 1, mean 0, std 1) + 0.5 * brightness
        assert white["total"] == pytest.approx(white["components"]["imagereward"] + 1.0, abs=1e-5)
        models = httpx.get(f"{url}/models", timeout=10).json()
        assert models["experts"]["brightness"]["weight"] == 0.5
        bad = httpx.post(f"{url}/reward", json={"prompt": "a lamp", "images": [png_b64((1, 2, 3))], "weights": {"glow": 1}})
        assert bad.status_code == 422 and "unknown expert 'glow'" in bad.json()["detail"]
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_unknown_expert_in_a_config_file_is_a_clear_error(tmp_path):
    from t2i_reward.rewarders import InvalidRequestError, load_config

    config = tmp_path / "reward.yaml"
    config.write_text("experts:\n  shininess: {weight: 1}\n")
    with pytest.raises(InvalidRequestError, match="unknown expert 'shininess'"):
        load_config(config)
