import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from t2i_reward.cli import main

from .conftest import smooth_image


@pytest.fixture
def env(cache_dir, monkeypatch):
    monkeypatch.setenv("T2I_REWARD_CACHE_DIR", str(cache_dir))


def test_score_json(env, tmp_path, capsys):
    paths = []
    for i in range(2):
        smooth_image(i, 100, 120).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    assert main(["score", "--profile", "tiny", "--prompt", "a red apple", *paths, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["images"]) == 2
    assert set(out["images"][0]["components"]) == {"imagereward", "aesthetic", "mlp"}
    assert out["mean_reward"] == pytest.approx(sum(i["total"] for i in out["images"]) / 2, abs=1e-6)
    assert out["experts"]["imagereward"]["random_weights"] is True


def test_score_table_says_weights_are_random(env, tmp_path, capsys):
    smooth_image(0, 50, 50).save(tmp_path / "a.png")
    assert main(["score", "--profile", "tiny", "--prompt", "a cat", str(tmp_path / "a.png")]) == 0
    assert "random weights" in capsys.readouterr().out


def test_bad_inputs_exit_2_with_a_message(env, tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert main(["score", "--profile", "tiny", "--prompt", "a cat", str(tmp_path / "bad.png")]) == 2
    err = capsys.readouterr().err
    assert "not a recognised image format" in err and "Traceback" not in err
    assert main(["score", "--profile", "nope", "--prompt", "a cat", str(tmp_path / "bad.png")]) == 2
    assert "unknown profile" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bench", "--profile", "tiny", "--images", "0"])
    assert e.value.code == 2


def test_bench_json(env, capsys):
    assert main(["bench", "--profile", "tiny", "--images", "3", "--batch-size", "2", "--size", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out)[-1] == "images_per_s" and out["images_per_s"] > 0 and out["images"] == 3


def test_console_script(cache_dir, tmp_path):
    exe = Path(sys.executable).parent / "t2i-reward"
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    smooth_image(3, 80, 80).save(tmp_path / "x.png")
    env = {**os.environ, "T2I_REWARD_CACHE_DIR": str(cache_dir)}
    done = subprocess.run([str(exe), "score", "--profile", "tiny", "--prompt", "a dog", str(tmp_path / "x.png"), "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["images"]) == 1
