import csv
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from t2i_reward.prompter import PromptIndex, PromptSourceError, build_index, default_prompts, read_prompts
from t2i_reward.rewarders.errors import InvalidRequestError
from t2i_reward.service.app import create_app
from t2i_reward.service.client import RewardClient, Validator
from t2i_reward.service.settings import Settings

from t2i_reward.cli import main

from .conftest import running_server

CORPUS = [
    "a red fox sleeping in the snow",
    "a red fox sleeping in the snow, highly detailed",
    "a red fox sleeping in deep snow, 4k photo",
    "a humpback whale jumping out of the ocean",
    "a bowl of ramen with a soft boiled egg",
    "a gothic cathedral with stained glass windows",
    "an astronaut riding a horse on the moon",
    "a watercolor painting of a lighthouse at dusk",
    "anime girl with long silver hair, studio ghibli style",
    "pixel art of a castle, 16-bit video game",
]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("prompt-index")
    build_index(CORPUS, out)
    return out


@pytest.fixture(scope="module")
def index(index_dir):
    return PromptIndex.load(index_dir)


def test_the_line_itself_is_the_nearest(index):
    for line in ("a bowl of ramen with a soft boiled egg", "pixel art of a castle, 16-bit video game"):
        found, scores = index.search([line], 3)
        assert found[0][0] == line
        assert scores[0][0] == pytest.approx(1.0, abs=1e-4)
        assert scores[0] == sorted(scores[0], reverse=True)


def test_topics_find_their_prompts(index):
    found, _ = index.search(["red fox", "space travel", "anime character"], 1)
    assert "red fox" in found[0][0]
    assert found[1:] == [["an astronaut riding a horse on the moon"], [CORPUS[8]]]


def test_mmr_diversifies(index):
    plain, _ = index.search(["a red fox in the snow"], 3)
    assert all("fox" in p for p in plain[0])  # three near-duplicates
    diverse, scores = index.search(["a red fox in the snow"], 3, diversity=0.7)
    assert diverse[0][0] == plain[0][0]  # the best match stays first
    assert sum("fox" in p for p in diverse[0]) == 1  # the rest are no longer copies of it
    assert len(set(diverse[0])) == 3


def test_length_filters(index):
    found, _ = index.search(["red fox"], 10, max_length=35)
    assert found[0] and all(len(p) <= 35 for p in found[0])
    found, _ = index.search(["red fox"], 2, min_length=45)
    assert len(found[0]) == 2 and all(len(p) >= 45 for p in found[0])
    with pytest.raises(InvalidRequestError):
        index.search(["x"], 2, diversity=1.5)


def test_hnsw_index_above_the_threshold(tmp_path):
    meta = build_index(CORPUS, tmp_path, approx_threshold=5)
    assert meta["kind"] == "hnsw"
    idx = PromptIndex.load(tmp_path)
    assert idx.search(["a humpback whale jumping out of the ocean"], 1)[0] == [["a humpback whale jumping out of the ocean"]]
    assert len(idx.search(["a red fox in the snow"], 3, diversity=0.7)[0][0]) == 3  # MMR reads vectors back


def test_rebuilding_the_same_source_is_a_no_op(tmp_path):
    assert build_index(CORPUS, tmp_path)["rebuilt"] is True
    stamp = os.stat(tmp_path / "index.faiss").st_mtime_ns
    assert build_index(CORPUS, tmp_path)["rebuilt"] is False
    assert os.stat(tmp_path / "index.faiss").st_mtime_ns == stamp
    assert build_index(CORPUS[:5], tmp_path)["rebuilt"] is True  # other prompts: rebuilt
    assert len(PromptIndex.load(tmp_path)) == 5


def test_every_file_format(tmp_path):
    expected = ["a cat", "a dog on a beach", "a castle"]
    (tmp_path / "list.json").write_text(json.dumps(["a cat", " a dog  on a beach", "a castle", "a cat", ""]))
    (tmp_path / "records.json").write_text(json.dumps([{"prompt": p, "id": i} for i, p in enumerate(expected)]))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": [{"text": p} for p in expected]}))
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps({"text": p, "image": "x"}) for p in expected) + "\n")
    with open(tmp_path / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt"])
        w.writerows([[i, p] for i, p in enumerate(expected)])
    (tmp_path / "table.tsv").write_text("caption\tid\n" + "".join(f"{p}\t{i}\n" for i, p in enumerate(expected)))
    pq.write_table(pa.table({"prompt": expected, "n": [1, 2, 3]}), tmp_path / "table.parquet")
    (tmp_path / "plain.txt").write_text("\n".join(expected) + "\n\n")
    for name in ("list.json", "records.json", "wrapped.json", "lines.jsonl", "table.csv", "table.parquet", "plain.txt"):
        assert read_prompts(str(tmp_path / name)) == expected, name
    assert read_prompts(str(tmp_path / "table.tsv"), text_field="caption") == expected


def test_bad_sources(tmp_path):
    (tmp_path / "x.csv").write_text("id,caption\n1,a cat\n")
    with pytest.raises(PromptSourceError, match="no 'prompt' or 'text' field"):
        read_prompts(str(tmp_path / "x.csv"))
    with pytest.raises(PromptSourceError, match="no field 'title'"):
        read_prompts(str(tmp_path / "x.csv"), text_field="title")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(PromptSourceError, match="cannot read"):
        read_prompts(str(tmp_path / "broken.json"))
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(PromptSourceError, match="unknown format"):
        read_prompts(str(tmp_path / "x.xlsx"))
    with pytest.raises(PromptSourceError, match="not a file"):
        read_prompts(str(tmp_path / "missing.json"))
    with pytest.raises(PromptSourceError, match="THUDM/ImageRewardDB: cannot download"):
        read_prompts("THUDM/ImageRewardDB")  # offline in tests: a clear error


def test_default_corpus():
    prompts = default_prompts()
    assert len(prompts) >= 300 and len(set(prompts)) == len(prompts)
    assert any("anime" in p for p in prompts) and any("watercolor" in p for p in prompts)


def test_cli_build_and_search(tmp_path, capsys):
    src = tmp_path / "p.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": p}) for p in CORPUS))
    out = tmp_path / "idx"
    assert main(["prompts", "build", "--source", str(src), "--out", str(out)]) == 0
    assert "wrote a flat index of 10 prompts" in capsys.readouterr().err
    assert main(["prompts", "build", "--source", str(src), "--out", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert main(["prompts", "search", "--index", str(out), "-n", "1", "ramen"]) == 0
    assert json.loads(capsys.readouterr().out)["prompts"] == [["a bowl of ramen with a soft boiled egg"]]
    assert main(["prompts", "build", "--source", str(tmp_path / "none.json"), "--out", str(out)]) == 2
    assert main(["prompts", "search", "--index", str(tmp_path), "cat"]) == 2
    assert "not a prompt index" in capsys.readouterr().err


@pytest.fixture
def api(tiny, index):
    with TestClient(create_app(Settings(max_topics=3, max_n_prompts=5), rewarder=tiny, prompter=index)) as client:
        yield client


def test_prompts_endpoint(api):
    r = api.post("/prompts", json={"topics": ["red fox", "ramen"], "n_prompts": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "red fox" in body["prompts"][0][0] and body["prompts"][1][0] == "a bowl of ramen with a soft boiled egg"
    assert len(body["scores"]) == 2 and len(body["scores"][0]) == 2
    diverse = api.post("/prompts", json={"topics": ["a red fox in the snow"], "n_prompts": 3, "diversity": 0.7}).json()
    assert sum("fox" in p for p in diverse["prompts"][0]) == 1
    short = api.post("/prompts", json={"topics": ["red fox"], "n_prompts": 5, "max_length": 35}).json()
    assert all(len(p) <= 35 for p in short["prompts"][0])


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"topics": [], "n_prompts": 2}, "empty"),
        ({"topics": ["a", "b", "c", "d"], "n_prompts": 2}, "limit is 3"),
        ({"topics": ["a"], "n_prompts": 0}, "greater than or equal to 1"),
        ({"topics": ["a"], "n_prompts": 6}, "limit is 5"),
        ({"topics": ["a"], "n_prompts": 2, "diversity": 2}, "less than or equal to 1"),
        ({"topics": ["a"], "n_prompts": 2, "min_length": 50, "max_length": 10}, "min_length"),
        ({"topics": ["  "], "n_prompts": 2}, "non-empty"),
        ({"topics": "fox", "n_prompts": 2}, "list"),
        ({"n_prompts": 2}, "topics"),
    ],
)
def test_prompts_bad_requests(api, body, fragment):
    r = api.post("/prompts", json=body)
    assert r.status_code == 422, r.text
    assert fragment in json.dumps(r.json()["detail"])


def test_client_and_validator_prompts(tiny, index, index_dir, cache_dir):
    with running_server(create_app(Settings(), rewarder=tiny, prompter=index)) as url:
        assert RewardClient(url).prompts(["ramen"], 1)["prompts"] == [["a bowl of ramen with a soft boiled egg"]]
    from t2i_reward.rewarders import load_config

    local = Validator(config=load_config(profile="tiny", cache_dir=cache_dir), prompts_index=index_dir)
    assert local.generate_prompt(["ramen", "whale"], n_prompts=1) == [
        ["a bowl of ramen with a soft boiled egg"], ["a humpback whale jumping out of the ocean"]]


def test_precomputed_vectors_and_topic_cache(tmp_path, index):
    vecs = index.index.reconstruct_n(0, len(CORPUS))
    build_index(CORPUS, tmp_path, vectors=vecs)
    again = PromptIndex.load(tmp_path)
    assert again.search(["ramen"], 2) == index.search(["ramen"], 2)
    with pytest.raises(InvalidRequestError, match="9 vectors for 10 prompts"):
        build_index(CORPUS, tmp_path / "x", vectors=vecs[:9])
    first = again.search(["a whale", "a whale", "ramen"], 1)
    assert list(again._query_cache) == ["a whale", "ramen"]  # embedded once each
    assert again.search(["a whale", "a whale", "ramen"], 1) == first
